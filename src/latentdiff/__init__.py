"""latentdiff: latent diffusion models in PyTorch (autoencoder + latent U-Net + samplers)."""

__version__ = "0.1.0"
