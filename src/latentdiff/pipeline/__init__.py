"""The pipeline layer: a model (codec + denoiser + config), its directory format, sampling requests, control."""

from latentdiff.pipeline.directory import model_dir, pretrained_dir
from latentdiff.pipeline.model import LatentDiffusion
from latentdiff.pipeline.request import SampleRequest
from latentdiff.pipeline.runtime import resolve_device

__all__ = ["LatentDiffusion", "SampleRequest", "model_dir", "pretrained_dir", "resolve_device"]
