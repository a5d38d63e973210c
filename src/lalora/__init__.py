"""lalora: Laplace-LoRA, Bayesian low-rank adaptation of LLMs as a reproducible pipeline."""

__version__ = "0.1.0"
