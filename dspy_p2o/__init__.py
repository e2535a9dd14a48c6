"""dspy_p2o: co-optimise the prompt and the weights of a small open LM for DSPy programs (P^2O)."""

__version__ = "0.1.0"
