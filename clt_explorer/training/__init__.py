"""Training: teacher activations as token batches, the CLT training loop, checkpoints, the offline tiny CLIP."""
