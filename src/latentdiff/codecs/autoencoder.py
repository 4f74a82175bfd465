"""KL-regularised convolutional autoencoder (Rombach et al. 2022, §3 and appendix G).

Images x ∈ [-1, 1]^(C×H×W) are encoded to a diagonal Gaussian posterior q(z|x) with
z ∈ R^(c × H/f × W/f). The codec owns the latent normalisation: per-channel statistics
(``latent_shift``, ``latent_scale``, estimated from data and saved with the weights) map z to the
zero-mean, unit-variance latents the diffusion model sees, z_n = (z - shift) · scale. No other module
knows the constants: everything else calls :meth:`Autoencoder.to_latent` / :meth:`from_latent` /
:meth:`sample_latent`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import ConfigError
from latentdiff.nn.layers import Attention, ResBlock, group_norm
from latentdiff.utils.images import to_tensor

FACTORS = (1, 2, 4, 8)
LATENT_STATS = ("per-channel", "global")


@dataclass
class AutoencoderConfig:
    image_channels: int = 1        # 1 grayscale, 3 RGB
    latent_channels: int = 4       # c: channels of the latent
    factor: int = 4                # f: spatial downsampling factor, one of 1, 2, 4, 8
    base_channels: int = 32        # width at full resolution; doubles per downsampling (capped at 4×)
    num_res_blocks: int = 1        # ResBlocks per resolution level
    attention: bool = False        # self-attention at the latent resolution
    kl_weight: float = 1e-6        # β of the β·KL term
    recon_loss: str = "l1"         # "l1" or "l2"
    latent_stats: str = "per-channel"  # latent normalisation fitted after training: "per-channel" mean/std, or
                                       # "global" (shift 0, one scale 1/std: Rombach et al. 2022's scale factor)

    def validate(self):
        if self.factor not in FACTORS:
            raise ConfigError(f"autoencoder.factor must be one of {FACTORS}, got {self.factor}")
        if self.image_channels not in (1, 3):
            raise ConfigError(f"autoencoder.image_channels must be 1 or 3, got {self.image_channels}")
        # Upper bounds refuse absurd sizes (e.g. from an untrusted config.json) before anything is allocated.
        if not (1 <= self.latent_channels <= 64 and 8 <= self.base_channels <= 1024 and 1 <= self.num_res_blocks <= 8):
            raise ConfigError("autoencoder: latent_channels in 1…64, base_channels in 8…1024 and num_res_blocks in "
                              f"1…8 required, got {self.latent_channels}, {self.base_channels}, {self.num_res_blocks}")
        if self.recon_loss not in ("l1", "l2"):
            raise ConfigError(f"autoencoder.recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if self.kl_weight < 0:
            raise ConfigError("autoencoder.kl_weight must be >= 0")
        if self.latent_stats not in LATENT_STATS:
            raise ConfigError(f"autoencoder.latent_stats must be one of {', '.join(LATENT_STATS)}, "
                              f"got {self.latent_stats!r}")

    @property
    def levels(self) -> int:
        return self.factor.bit_length() - 1  # f = 2^levels

    def widths(self) -> list[int]:
        return [self.base_channels * min(2**i, 4) for i in range(self.levels + 1)]

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        h, w = image_size
        for _ in range(self.levels):  # stride-2 conv with padding 1: ceil(n / 2)
            h, w = (h + 1) // 2, (w + 1) // 2
        return self.latent_channels, h, w


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self):
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + std·ε with ε ~ N(0, I) drawn from `generator`, or the given `noise` ε."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1 - self.logvar).flatten(1).sum(1)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        w = cfg.widths()
        layers: list[nn.Module] = [nn.Conv2d(cfg.image_channels, w[0], 3, padding=1)]
        for i in range(cfg.levels + 1):
            cin = w[max(i - 1, 0)]
            for j in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin if j == 0 else w[i], w[i]))
            if i < cfg.levels:
                layers.append(nn.Conv2d(w[i], w[i], 3, stride=2, padding=1))
        if cfg.attention:
            layers.append(Attention(w[-1]))
        layers += [group_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], 2 * cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        w = cfg.widths()[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, w[0], 3, padding=1)
        self.attn = Attention(w[0]) if cfg.attention else nn.Identity()
        self.levels = nn.ModuleList()
        for i in range(cfg.levels + 1):
            blocks = [ResBlock(w[max(i - 1, 0)] if j == 0 else w[i], w[i]) for j in range(cfg.num_res_blocks + 1)]
            self.levels.append(nn.Sequential(*blocks))
        self.ups = nn.ModuleList([nn.Conv2d(w[i], w[i], 3, padding=1) for i in range(cfg.levels)])
        self.out = nn.Sequential(group_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.image_channels, 3, padding=1))

    def forward(self, z, sizes: list[tuple[int, int]]):
        """`sizes[i]` is the spatial size after upsampling step i (undoes ceil rounding exactly)."""
        h = self.attn(self.conv_in(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.ups):
                h = self.ups[i](F.interpolate(h, size=sizes[i], mode="nearest"))
        return self.out(h)


class Autoencoder(nn.Module):
    """Encoder + decoder + the latent statistics (buffers, saved with the weights): the image codec."""

    def __init__(self, cfg: AutoencoderConfig, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.image_size = tuple(image_size)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_channels))  # per-channel mean of z
        self.register_buffer("latent_scale", torch.ones(cfg.latent_channels))   # per-channel 1/std of z

    def compile_targets(self) -> tuple[nn.Module, ...]:
        """What `training.compile` compiles: the codec is used through encode/decode, never forward()."""
        return (self.encoder, self.decoder)

    def upsample_sizes(self) -> list[tuple[int, int]]:
        """The spatial size after each of the decoder's upsamplings, coarse to fine (undoes the encoder's ceil rounding)."""
        h, w = self.image_size
        sizes = [(h, w)]
        for _ in range(self.cfg.levels):
            h, w = (h + 1) // 2, (w + 1) // 2
            sizes.append((h, w))
        return sizes[-2::-1]  # sizes to reach on the way up, coarse to fine

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_shape(self.image_size)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1] -> posterior over *unnormalised* latents."""
        if tuple(x.shape[-2:]) != self.image_size or x.shape[1] != self.cfg.image_channels:
            raise ConfigError(f"autoencoder expects images of shape {self.cfg.image_channels}×{self.image_size[0]}×"
                              f"{self.image_size[1]}, got {tuple(x.shape[1:])}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised latents -> images (not clamped)."""
        return self.decoder(z, self.upsample_sizes())

    # --- the latent normalisation: the diffusion model only ever sees normalised latents ----------

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (z.ndim - 2)  # (C,) -> (1, C, 1, 1)
        return self.latent_shift.reshape(shape), self.latent_scale.reshape(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """z_n = (z - shift) · scale, per channel."""
        shift, scale = self._stats(z)
        return (z - shift) * scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """z = z_n / scale + shift, per channel (the inverse of :meth:`normalize`)."""
        shift, scale = self._stats(z)
        return z / scale + shift

    def sample_latent(self, posterior: DiagonalGaussian, generator: torch.Generator | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """A normalised sample of the posterior: z_n = (μ + σ ε - shift) · scale."""
        return self.normalize(posterior.sample(generator, noise))

    def to_latent(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images -> normalised latents (the posterior mean, or a sample with `sample`)."""
        post = self.encode(x)
        return self.sample_latent(post, generator) if sample else self.normalize(post.mean)

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in about [-1, 1] (not clamped)."""
        return self.decode(self.denormalize(z))

    def latent_stats(self) -> dict[str, list[float]]:
        """The normalisation as plain numbers (for model cards, headers and compatibility checks)."""
        return {"shift": [float(v) for v in self.latent_shift], "scale": [float(v) for v in self.latent_scale]}

    @torch.no_grad()
    def encode_dataset(self, images, batch_size: int = 500, device=None) -> DiagonalGaussian:
        """The posteriors of a whole data set, encoded once in batches: one DiagonalGaussian over unnormalised
        latents (N, c, h, w). `images`: a float tensor (N, C, H, W) in [-1, 1], or uint8 images N×H×W×C
        (converted batch by batch, so the float copy of a large set never exists at once)."""
        device = device if device is not None else next(self.parameters()).device
        means, logvars = [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            x = x if isinstance(x, torch.Tensor) else to_tensor(x)
            post = self.encode(x.to(device))
            means.append(post.mean)
            logvars.append(post.logvar)
        return DiagonalGaussian(torch.cat(means), torch.cat(logvars))

    @torch.no_grad()
    def fit_latent_stats(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[float]]:
        """Estimate the normalisation from the posterior means of `images` (Rombach et al. 2022, appendix G, for
        "global"; per-channel mean and std for "per-channel", the colour-ready default)."""
        z = self.encode_dataset(images, batch_size).mean.float()  # (N, c, h, w)
        if self.cfg.latent_stats == "global":
            self.latent_shift.zero_()
            self.latent_scale.fill_(1.0 / max(z.std().item(), 1e-8))
        else:
            per_channel = z.transpose(0, 1).flatten(1)  # (c, N·h·w)
            self.latent_shift.copy_(per_channel.mean(1))
            self.latent_scale.copy_(1.0 / per_channel.std(1).clamp_min(1e-8))
        return self.latent_stats()

    def upgrade_state(self, state_dict: dict) -> dict:
        """A state dict in today's format. Files written before per-channel statistics hold one ``scale_factor``
        s: it becomes shift 0 and scale s in every channel (the same arithmetic, so old models give the same
        images)."""
        state_dict = dict(state_dict)
        if "scale_factor" in state_dict and "latent_scale" not in state_dict:
            s = state_dict.pop("scale_factor")
            state_dict["latent_scale"] = s.reshape(1).expand(self.cfg.latent_channels).clone()
            state_dict["latent_shift"] = torch.zeros(self.cfg.latent_channels, dtype=s.dtype)
        return state_dict

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self.upgrade_state(state_dict), strict=strict, assign=assign)

    def loss(self, x: torch.Tensor, generator=None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-sample reconstruction (L1 or L2, mean over pixels) + β·KL (per latent element).

        `noise` (the posterior sample's ε, latent-shaped) may be given instead of `generator`."""
        post = self.encode(x)
        rec = self.decode(post.sample(generator, noise))
        err = (rec - x).abs() if self.cfg.recon_loss == "l1" else (rec - x) ** 2
        rec_loss = err.flatten(1).mean(1)
        kl = post.kl() / post.mean[0].numel()
        return rec_loss + self.cfg.kl_weight * kl, {"rec": rec_loss.detach().mean(), "kl": kl.detach().mean()}
