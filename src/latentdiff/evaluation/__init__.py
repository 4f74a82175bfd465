"""Evaluation: image and distribution metrics, feature extractors, likelihood."""
