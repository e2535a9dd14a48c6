"""Offline test doubles that speak real protocols (e.g. a vLLM-compatible HTTP server on CPU)."""
