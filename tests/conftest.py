"""Shared test setup: offline, no writes to the home directory, small threads."""

import os
import tempfile

os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), "dspy_p2o_test_dspy_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
