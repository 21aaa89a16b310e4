"""The training-image corpus: layer-wise retrieval indexes, thumbnails and per-feature statistics."""
