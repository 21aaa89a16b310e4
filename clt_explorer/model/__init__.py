"""The model: the frozen teacher, sparsifiers, the CLT, its surrogate (the edit seam) and zero-shot classification."""
