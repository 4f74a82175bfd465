"""The mel front end of audio models: waveform <-> log-mel "image" in [-1, 1], in torch (no torchaudio).

waveform ──STFT (Hann, |X| / Σw)──▶ magnitude ──Slaney mel filters──▶ mel amplitude ──20·log10, clip
[db_min, db_max]──▶ affine to [-1, 1]: a 1×n_mels×frames image that the KL autoencoder (codecs/autoencoder.py)
encodes like any grayscale picture, so the whole diffusion stack runs unchanged.

Back: image ──dB──▶ mel amplitude ──non-negative least squares through the filters──▶ linear magnitude
──fast Griffin-Lim (Perraudin, Balazs & Søndergaard 2013: Griffin-Lim with momentum α)──▶ waveform.

The mel scale and filters follow Slaney's Auditory Toolbox (the default of librosa.filters.mel): the scale is
linear below 1 kHz (200/3 Hz per mel) and logarithmic above (27 mels per factor 6.4), and each triangle is
area-normalised (2 / bandwidth in Hz).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentdiff.errors import ConfigError


@dataclass
class MelConfig:
    sample_rate: int = 16_000     # Hz
    clip_samples: int = 16_000    # waveform length of one sample (1 s)
    n_fft: int = 1024             # FFT size = Hann window length (64 ms at 16 kHz)
    hop: int = 250                # samples between frames (15.6 ms); centred frames, the first `frames` kept
    n_mels: int = 64              # mel bands (the image height)
    frames: int = 64              # STFT frames kept (the image width)
    fmin: float = 20.0            # lowest filter edge, Hz
    fmax: float = 8000.0          # highest filter edge, Hz (at most sample_rate / 2)
    db_min: float = -115.0        # log-mel floor in dB re amplitude 1 (maps to -1); quieter bins are clipped
    db_max: float = -35.0         # log-mel ceiling in dB (maps to +1); a full-scale word peaks near -43 dB
    griffin_lim_iters: int = 64   # phase-reconstruction iterations
    momentum: float = 0.99        # fast Griffin-Lim α (0 = the original Griffin-Lim)

    def validate(self):
        if not 1000 <= self.sample_rate <= 192_000:
            raise ConfigError(f"mel.sample_rate must be in 1000…192000 Hz, got {self.sample_rate}")
        if not 16 <= self.n_fft <= 8192 or not 1 <= self.hop <= self.n_fft:
            raise ConfigError("mel: need 16 <= n_fft <= 8192 and 1 <= hop <= n_fft")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ConfigError(f"mel: need 0 <= fmin < fmax <= sample_rate/2, got {self.fmin}, {self.fmax}")
        if not 8 <= self.n_mels <= 512 or not 8 <= self.frames <= 4096:
            raise ConfigError("mel: n_mels must be in 8…512 and frames in 8…4096")
        if self.frames > self.clip_samples // self.hop + 1:
            raise ConfigError(f"mel.frames ({self.frames}) exceeds the {self.clip_samples // self.hop + 1} frames "
                              f"of a {self.clip_samples}-sample clip")
        if not self.db_min < self.db_max or not 0 <= self.momentum < 1.2 or self.griffin_lim_iters < 0:
            raise ConfigError("mel: need db_min < db_max, 0 <= momentum < 1.2, griffin_lim_iters >= 0")


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: f / (200/3) below 1 kHz, 15 + 27·log(f/1000)/log(6.4) above."""
    f = torch.as_tensor(f, dtype=torch.float64)
    return torch.where(f < 1000, f * 3 / 200, 15 + torch.log(f.clamp_min(1e-9) / 1000) * 27 / math.log(6.4))


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    return torch.where(m < 15, m * 200 / 3, 1000 * torch.exp((m - 15) * math.log(6.4) / 27))


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """n_mels × (n_fft/2+1) triangular, area-normalised filters (float32)."""
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # FFT bin centres, Hz
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2,
                                     dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # each n_mels×1
    rising = (bins - lo) / (mid - lo)
    falling = (hi - bins) / (hi - mid)
    w = torch.clamp(torch.minimum(rising, falling), min=0)
    return (w * (2.0 / (hi - lo))).float()


class MelFrontEnd:
    """Waveforms (B×T float in [-1, 1]) <-> log-mel images (B×1×n_mels×frames in [-1, 1])."""

    def __init__(self, cfg: MelConfig):
        cfg.validate()
        self.cfg = cfg
        self.window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64).float()
        self.filters = mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)  # M×F
        self.pinv = torch.linalg.pinv(self.filters.double()).float()  # F×M, the start of the NNLS iterations

    def stft(self, wave: torch.Tensor) -> torch.Tensor:
        """Complex B×F×N spectrum, scaled so that a sine of amplitude A peaks near A/2."""
        return torch.stft(wave.float(), self.cfg.n_fft, self.cfg.hop, window=self.window, center=True,
                          return_complex=True) / self.window.sum()

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(spec * self.window.sum(), self.cfg.n_fft, self.cfg.hop, window=self.window,
                           center=True, length=length)

    def magnitude_to_image(self, mag: torch.Tensor) -> torch.Tensor:
        """B×F×N linear magnitude -> B×1×M×frames image in [-1, 1]."""
        db = 20 * torch.log10((self.filters @ mag[..., :self.cfg.frames]).clamp_min(1e-10))
        x = (db - self.cfg.db_min) / (self.cfg.db_max - self.cfg.db_min) * 2 - 1
        return x.clamp(-1, 1)[:, None]

    def wave_to_image(self, wave: torch.Tensor) -> torch.Tensor:
        """B×T waveforms -> B×1×n_mels×frames log-mel images in [-1, 1]."""
        return self.magnitude_to_image(self.stft(wave).abs())

    def image_to_mel(self, image: torch.Tensor) -> torch.Tensor:
        """B×1×M×N image -> B×M×N mel amplitude (inverse of the affine dB map)."""
        db = (image[:, 0].float() + 1) / 2 * (self.cfg.db_max - self.cfg.db_min) + self.cfg.db_min
        return 10 ** (db / 20)

    def mel_to_magnitude(self, mel: torch.Tensor, iters: int = 100) -> torch.Tensor:
        """Non-negative least squares min ||W s - mel||² over s >= 0 by projected gradient, from pinv(W)·mel."""
        W = self.filters
        s = (self.pinv @ mel).clamp_min(0)  # B×F×N
        step = 1.0 / float(torch.linalg.matrix_norm(W, 2) ** 2)  # 1/L for the gradient W^T(Ws - mel)
        for _ in range(iters):
            s = (s - step * (W.T @ (W @ s - mel))).clamp_min(0)
        return s

    def griffin_lim(self, mag: torch.Tensor, length: int, iters: int | None = None,
                    momentum: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fast Griffin-Lim: c_n = P1(P2(t_{n-1})), t_n = c_n + α(c_n - c_{n-1}) (Perraudin et al. 2013, alg. 2).

        P2 sets the magnitude to `mag` (B×F×N) keeping the phase; P1 = STFT∘iSTFT projects onto consistent
        spectrograms. Starts from random phases (seeded by `generator`). Returns B×length waveforms.
        """
        iters = self.cfg.griffin_lim_iters if iters is None else iters
        alpha = self.cfg.momentum if momentum is None else momentum
        phase = torch.rand(mag.shape, generator=generator) * (2 * math.pi)
        t = torch.polar(mag, phase)
        prev = torch.zeros_like(t)
        for _ in range(iters):
            c = self.stft(self.istft(t, length))[..., :mag.shape[-1]]  # P1
            c = mag * torch.exp(1j * torch.angle(c))                  # then P2 (a consistent step, re-magnitude)
            t, prev = c + alpha * (c - prev), c
        return self.istft(mag * torch.exp(1j * torch.angle(t)), length)

    def image_to_wave(self, image: torch.Tensor, iters: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """B×1×M×frames images -> B×clip_samples waveforms (mel inversion, then fast Griffin-Lim)."""
        mel = self.image_to_mel(image)
        n_total = self.cfg.clip_samples // self.cfg.hop + 1
        mag = self.mel_to_magnitude(mel)
        if mag.shape[-1] < n_total:  # the dropped trailing frames: repeat the last kept one
            mag = torch.cat([mag, mag[..., -1:].expand(*mag.shape[:-1], n_total - mag.shape[-1])], dim=-1)
        with torch.no_grad():
            wave = self.griffin_lim(mag, self.cfg.clip_samples, iters, generator=generator)
        return wave.clamp(-1, 1)


def waves_to_uint8(waves, cfg: MelConfig | None = None, batch: int = 256):
    """N×T float waveforms (numpy or torch) -> N×n_mels×frames×1 uint8 log-mel images (row 0: lowest band).

    uint8 over [db_min, db_max] is 0.35 dB a step with the defaults, so audio becomes the same kind of array as
    pictures and the image data path (autoencoder, training, evaluation) runs on it unchanged."""
    import numpy as np

    front = MelFrontEnd(cfg or MelConfig())
    out = []
    with torch.no_grad():
        for i in range(0, len(waves), batch):
            img = front.wave_to_image(torch.as_tensor(waves[i:i + batch]))  # B×1×M×N in [-1, 1]
            out.append(((img[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    m, n = front.cfg.n_mels, front.cfg.frames
    return np.concatenate(out)[..., None] if out else np.zeros((0, m, n, 1), np.uint8)


def uint8_to_waves(images, cfg: MelConfig | None = None, iters: int | None = None, seed: int = 0,
                   batch: int = 64):
    """N×n_mels×frames[×1] uint8 log-mel images -> N×clip_samples float32 numpy waveforms (Griffin-Lim)."""
    import numpy as np

    front = MelFrontEnd(cfg or MelConfig())
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(images).reshape(len(images), 1, front.cfg.n_mels, front.cfg.frames))
    x = x.float() / 127.5 - 1
    out = [front.image_to_wave(x[i:i + batch], iters, generator=gen) for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, front.cfg.clip_samples), np.float32)


def spectral_convergence(mag: torch.Tensor, wave: torch.Tensor, front: MelFrontEnd) -> float:
    """|| |STFT(wave)| - mag ||_F / ||mag||_F: how consistent a reconstruction is with its target magnitude."""
    got = front.stft(wave).abs()[..., :mag.shape[-1]]
    return float(torch.linalg.vector_norm(got - mag) / torch.linalg.vector_norm(mag))
