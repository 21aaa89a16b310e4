"""Evaluation: metrics, one-pass evaluation of a CLT, the layer-term experiment and reports."""
