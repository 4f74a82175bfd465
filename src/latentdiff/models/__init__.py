"""Networks that know no diffusion: the U-Net and the noise-aware classifier."""
