"""latentdiff: latent diffusion models in PyTorch (autoencoder + latent U-Net + samplers).

The public API, imported lazily so that ``latentdiff --help`` does not pay for torch::

    from latentdiff import LatentDiffusion, SampleRequest, Cond
    pipe = LatentDiffusion.load("pretrained:fashion-mnist")
    images, labels = pipe.generate(SampleRequest(n=16, labels=8, guidance=3.0, seed=0))
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LatentDiffusion": "latentdiff.pipeline.model",
    "SampleRequest": "latentdiff.pipeline.request",
    "Cond": "latentdiff.diffusion.cond",
    "Denoiser": "latentdiff.diffusion.denoiser",
    "Prediction": "latentdiff.diffusion.denoiser",
    "NoiseSchedule": "latentdiff.diffusion.schedule",
    "Autoencoder": "latentdiff.codecs.autoencoder",
    "timesteps": "latentdiff.sampling.grids",
    "karras_sigmas": "latentdiff.sampling.grids",
    "sample": "latentdiff.sampling.samplers",
    "SAMPLERS": "latentdiff.sampling.samplers",
    "ddpm": "latentdiff.sampling.samplers",
    "ddim": "latentdiff.sampling.samplers",
    "ddim_invert": "latentdiff.sampling.samplers",
    "euler": "latentdiff.sampling.samplers",
    "heun": "latentdiff.sampling.samplers",
    "dpmpp_2m": "latentdiff.sampling.samplers",
    "dpmpp_2m_sde": "latentdiff.sampling.samplers",
    "unipc": "latentdiff.sampling.samplers",
    "classifier_free": "latentdiff.guidance.cfg",
    "blend": "latentdiff.guidance.cfg",
    "classifier_guidance": "latentdiff.guidance.gradient",
    "user_guidance": "latentdiff.guidance.gradient",
    "gradient_guidance": "latentdiff.guidance.gradient",
    "decoded": "latentdiff.guidance.gradient",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
