"""The spoken-digit classifier: the feature extractor of the SaShiMi/WaveGAN SC09 protocol, on log-mel images.

FD, IS, modified IS and the class accuracy of conditional samples are all measured in this network's
features and predictions, as SC09 papers measure them in a digit classifier trained on the data. It is trained
on the training voices only (``scripts/train_audio_classifier.py``) and its held-out-voice accuracy is
recorded in its weight file's header. Its extractor, ``spoken-digit-classifier``, is in ``features.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DIGIT_CLASSIFIER_ASSET = "spoken_digit_classifier.safetensors"
DIGIT_CLASSIFIER_ARCH_VERSION = 1
MEL_SHAPE = (64, 64)  # n_mels × frames of the default mel front end


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.MaxPool2d(2)]


class DigitClassifier(nn.Module):
    """v1: 4 conv blocks (16-32-64-128 channels, each halving the size) -> global mean over time, max over
    frequency -> 128-d features -> 10 logits. Input N×1×64×64 log-mel images in [-1, 1]. About 0.1 M
    parameters and 15 M MACs per clip, so it trains in minutes on a CPU."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(*_block(1, 16), *_block(16, 32), *_block(32, 64), *_block(64, 128))  # 128×4×4
        self.embed = nn.Sequential(nn.Linear(128 * 4, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
                                   nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)                         # N×128×4(freq)×4(time)
        h = h.mean(dim=3).flatten(1)             # N×512: mean over time (the word may sit anywhere in the second)
        return self.embed(h)                     # N×128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def inception_score(logits: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """(IS, modified IS) from classifier logits (N×K).

    IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016); mIS = exp(E_{x,x'} KL(p(y|x) || p(y|x')))
    (Gurumurthy et al. 2017), which also rewards diversity *within* a class. With `splits` > 1 the mean over
    equal parts is returned (the customary reporting).
    """
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    logp = np.log(np.clip(p, 1e-12, None))
    scores, mscores = [], []
    for part in np.array_split(np.arange(len(p)), splits):
        pp, lp = p[part], logp[part]
        py = pp.mean(axis=0)
        scores.append(float(np.exp((pp * (lp - np.log(np.clip(py, 1e-12, None)))).sum(axis=1).mean())))
        # E_{x,x'} KL(p_x || p_x') = E_x Σ_y p_x log p_x - E_x Σ_y p_x E_x'[log p_x']
        cross = (pp * lp.mean(axis=0)).sum(axis=1).mean()
        mscores.append(float(np.exp((pp * lp).sum(axis=1).mean() - cross)))
    return float(np.mean(scores)), float(np.mean(mscores))


def log_spectral_distance(ref: torch.Tensor, est: torch.Tensor, front, floor_db: float = -100.0) -> float:
    """LSD in dB: mean over clips and frames of sqrt(mean over frequency of (10·log10 P - 10·log10 P̂)²), with P the
    STFT power of `front` (a MelFrontEnd) floored at `floor_db` so that digital silence does not dominate."""
    def power_db(w):
        return (10 * torch.log10(front.stft(w).abs().pow(2))).clamp_min(floor_db)
    d = power_db(ref) - power_db(est)                                    # B×F×N
    return float(d.pow(2).mean(dim=1).sqrt().mean())


def mel_l1(ref: torch.Tensor, est: torch.Tensor, front) -> float:
    """Mean absolute difference of the log-mel spectrograms, in dB, inside the front end's [db_min, db_max]."""
    scale = (front.cfg.db_max - front.cfg.db_min) / 2                    # image units -> dB
    return float((front.wave_to_image(ref) - front.wave_to_image(est)).abs().mean() * scale)
