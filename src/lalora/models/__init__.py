"""The model: the zoo's base models, LoRA adapters, the answer-token classifier, memory
estimates, layer pruning, batching and loading an adapted model, the non-Bayesian baselines."""
