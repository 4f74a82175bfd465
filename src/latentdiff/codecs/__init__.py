"""Codecs: images <-> normalised latents (the KL autoencoder)."""
