"""Guidance: wrappers that take a denoiser and return a denoiser, so every sampler gets every kind of guidance."""

from latentdiff.guidance.cfg import blend, classifier_free
from latentdiff.guidance.gradient import (
                                          brightness,
                                          classifier_guidance,
                                          decoded,
                                          gradient_guidance,
                                          region_mean,
                                          user_guidance,
)

__all__ = ["blend", "brightness", "classifier_free", "classifier_guidance", "decoded", "gradient_guidance",
           "region_mean", "user_guidance"]
