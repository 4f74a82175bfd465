"""Diffusion maths: schedule, condition, denoiser contract and parameterisations, loss, likelihood."""
