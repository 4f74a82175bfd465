"""An invisible watermark that lives in generation: Gaussian Shading (Yang et al., CVPR 2024) on z_T.

Why in generation: at 28×28 and 64×64 post-hoc marks do not survive JPEG or resizing (see
docs/responsible-generation.md), while the start noise z_T is a property of *how* the image was made.
Embedding: z_T = |ε| · s with ε ~ N(0, I) drawn from the request's generator and s ∈ {-1, +1}^d a keyed
sign pattern. For any fixed s, |ε|·s has the law of ε (the half-normal magnitude is independent of the
sign), so each watermarked z_T is exactly N(0, I): the sample distribution is unchanged, and the same seed
with the same key gives the same image. Detection: encode the image (codec posterior mean), run DDIM
backwards to z_T (`ddim_invert`, unconditional) and count the k of d coordinates whose sign matches s.
Under H0 (an image made without this key) each sign matches with probability 1/2 independently of s, so
k ~ Binomial(d, 1/2) and the p-value P(K ≥ k) is exact; it is the false-positive rate at threshold k.

The pattern is HMAC-SHA256(secret, shape ‖ counter) bits: one image reveals at most a noisy copy of s,
never the secret, and the secret is never written into any image.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from latentdiff.sampling.grids import timesteps
from latentdiff.sampling.samplers import ddim_invert
from latentdiff.utils.images import to_tensor

DETECT_STEPS = 10         # DDIM inversion steps: 25 gave no better sign agreement on Fashion-MNIST
DEFAULT_P_VALUE = 1e-3    # "detected" when the p-value (false-positive rate) is at most this


@dataclass(frozen=True)
class WatermarkKey:
    """A secret (bytes) and the label recorded in outputs (never the secret itself)."""

    secret: bytes
    label: str  # e.g. "installation a1b2c3d4" or "development (public, not secret)"

    @property
    def fingerprint(self) -> str:
        """A short public id of the key (a hash of a hash: reveals nothing usable about the secret)."""
        return hashlib.sha256(b"latentdiff-key-id|" + self.secret).hexdigest()[:16]

    def signs(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The ±1 pattern s for a latent of `shape` (float32)."""
        d = math.prod(shape)
        tag = "x".join(str(v) for v in shape).encode()
        stream, counter = b"", 0
        while len(stream) * 8 < d:
            stream += hmac.new(self.secret, b"latentdiff-watermark|" + tag + b"|" + counter.to_bytes(4, "big"),
                               hashlib.sha256).digest()
            counter += 1
        bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:d].astype(np.float32)
        return torch.from_numpy(bits * 2 - 1).reshape(shape).to(device)


def keyed_noise(noise: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """z_T = |ε| · s: the same law as ε, with the key's signs (one pattern per latent shape)."""
    return noise.abs() * key.signs(tuple(noise.shape[1:]), noise.device)


@dataclass(frozen=True)
class Detection:
    agree: int        # k: coordinates whose inverted sign matches the key
    bits: int         # d: latent size
    p_value: float    # P(K ≥ k | no watermark), K ~ Binomial(d, 1/2)

    @property
    def score(self) -> float:
        return self.agree / self.bits

    def detected(self, alpha: float = DEFAULT_P_VALUE) -> bool:
        return self.p_value <= alpha

    def to_dict(self, alpha: float = DEFAULT_P_VALUE) -> dict:
        return {"detected": self.detected(alpha), "score": round(self.score, 4), "agree": self.agree,
                "bits": self.bits, "p_value": self.p_value, "threshold_p": alpha}


def p_value(agree: int, bits: int) -> float:
    """P(K ≥ agree) for K ~ Binomial(bits, 1/2): the chance an unwatermarked image scores this high."""
    return float(binom.sf(agree - 1, bits, 0.5))


@torch.no_grad()
def invert_to_noise(model, images: np.ndarray, steps: int = DETECT_STEPS, batch_size: int = 256) -> torch.Tensor:
    """uint8 N×H×W×C images -> the z_T that unconditional DDIM would decode to them (N×latent_shape)."""
    den = model.denoiser.bind(None)
    ts = timesteps(model.denoiser.schedule.num_steps, steps, "trailing").to(model.device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(np.ascontiguousarray(images[start:start + batch_size])).to(model.device)
        z0 = model.autoencoder.to_latent(x)  # posterior mean, normalised
        out.append(ddim_invert(den, z0, model.denoiser.schedule, ts).cpu())
    return torch.cat(out)


def agreements(z: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """Per image, how many coordinates of z (N×latent_shape) have the key's sign."""
    s = key.signs(tuple(z.shape[1:]))
    return (torch.sign(z) == s).flatten(1).sum(1)


def detect(model, images: np.ndarray, key: WatermarkKey, steps: int = DETECT_STEPS) -> list[Detection]:
    """Watermark detection for each uint8 N×H×W×C image (which must have the model's image size)."""
    z = invert_to_noise(model, images, steps)
    bits = math.prod(z.shape[1:])
    return [Detection(int(k), bits, p_value(int(k), bits)) for k in agreements(z, key)]
