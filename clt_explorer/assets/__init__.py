"""Bundles: the on-disk layout, the pipeline that builds them, their evaluation and Hub upload."""
