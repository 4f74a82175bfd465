"""Typed configuration: dataclasses, YAML files that mirror them, dotted overrides (named presets: presets.py).

Every field is documented where it is declared. A YAML config or ``--set a.b=value`` override is
checked field by field (unknown names, wrong types, out-of-range values) before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from latentdiff.codecs.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.codecs.mel import MelConfig
from latentdiff.diffusion.schedule import PREDICTIONS, SCHEDULES, make_betas
from latentdiff.errors import ConfigError
from latentdiff.models.text import TextConfig
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.sampling.samplers import SAMPLERS

# The largest network (autoencoder + U-Net parameters) a config may ask for: 8 GB of float32 weights.
# Configs can come from untrusted model directories, so sizes are checked before anything is allocated.
MAX_PARAMETERS = 2_000_000_000
MAX_SEED = 2**63 - 1


@dataclass
class DataConfig:
    source: str = "bundled"        # "bundled" (packaged subset), "fashion-mnist" (full IDX files) or a folder of images
    data_dir: str | None = None    # where the Fashion-MNIST IDX files are (default: system package dir, then cache)
    image_size: int | None = None  # resize images to this square size (default: the data's own size)
    channels: int | None = None    # 1 grayscale or 3 RGB (default: the data's own)
    limit: int | None = None       # use only the first N training images
    latent_cache: str | None = None  # stage 2's sharded latent cache folder ("auto": RUN_DIR/latent-cache), else in memory
    workers: int = 0               # DataLoader workers decoding images while the latent cache is built
    cache_shard_size: int = 1024   # items per latent cache shard

    def validate(self):
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ConfigError(f"data.image_size must be between 8 and 1024, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1, got {self.limit}")
        if self.latent_cache is not None and not str(self.latent_cache).strip():
            raise ConfigError("data.latent_cache must be a folder path or 'auto'")
        if not (0 <= self.workers <= 64 and 1 <= self.cache_shard_size <= 1_000_000):
            raise ConfigError(f"data.workers must be in 0…64 and data.cache_shard_size in 1…1000000, got "
                              f"{self.workers} and {self.cache_shard_size}")


@dataclass
class DiffusionConfig:
    schedule: str = "linear"       # β schedule: linear (DDPM), scaled-linear, cosine
    num_train_steps: int = 1000    # T
    beta_start: float = 1e-4       # β_1 for linear / scaled-linear
    beta_end: float = 0.02         # β_T for linear / scaled-linear
    zero_terminal_snr: bool = False  # rescale so that ᾱ_T = 0 (Lin et al. 2023); needs prediction v
    prediction: str = "v"          # what the network predicts: v (default; stable at high noise), eps or x0
    min_snr_gamma: float = 5.0     # min-SNR loss weighting γ (Hang et al. 2023); 0 disables it
    cond_drop_prob: float = 0.1    # probability of replacing the label by the null label (classifier-free guidance)

    def validate(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"diffusion.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"diffusion.prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if not 2 <= self.num_train_steps <= 100_000:
            raise ConfigError(f"diffusion.num_train_steps must be in 2…100000, got {self.num_train_steps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("diffusion: need 0 < beta_start < beta_end < 1")
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ConfigError("diffusion.zero_terminal_snr needs prediction 'v' or 'x0' (ε is undefined at ᾱ_T = 0)")
        if self.min_snr_gamma < 0 or not 0 <= self.cond_drop_prob < 1:
            raise ConfigError("diffusion: min_snr_gamma must be >= 0 and cond_drop_prob in [0, 1)")
        if self.prediction == "eps":
            # x̂0 = (x_T - sqrt(1-ᾱ_T) ε̂) / sqrt(ᾱ_T): below MIN_EPS_ABAR_T the first sampling step multiplies the
            # network's error by more than 1e10 (and ᾱ_T = 0 in float32 divides by zero), so such a model trains
            # but can never sample. The cosine schedule's ᾱ_T = 2.4e-9 passes; v- and x0-prediction have no limit.
            abar_t = float(make_betas(self.schedule, self.num_train_steps, self.beta_start, self.beta_end)
                           .neg().log1p().sum().exp())
            if abar_t < MIN_EPS_ABAR_T:
                raise ConfigError(f"diffusion: this schedule ends at ᾱ_T = {abar_t:.3g}, too small for ε-prediction "
                                  f"(at least {MIN_EPS_ABAR_T:g}): lower diffusion.beta_end, or use "
                                  "diffusion.prediction v")


NONFINITE_MODES = ("stop", "skip")
MIN_EPS_ABAR_T = 1e-20  # the smallest ᾱ_T an ε-prediction schedule may end at (see DiffusionConfig.validate)
PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` means bf16 autocast on `device`: "auto" is bf16 on CUDA and float32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass
class TrainConfig:
    steps: int = 10_000            # optimizer steps
    batch_size: int = 128          # global batch size (split across processes under torchrun)
    lr: float = 2e-4               # peak AdamW learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 200        # linear learning-rate warm-up
    grad_clip: float = 1.0         # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999       # EMA of weights (used for sampling); 0 disables EMA
    log_every: int = 50            # steps between progress-bar loss updates (one device sync each)
    sample_every: int = 0          # steps between sample grids written to RUN/samples (0: only at the end)
    checkpoint_every: int = 1000   # steps between resumable checkpoints
    keep_checkpoints: int = 2      # how many recent checkpoints to keep
    seed: int = 0                  # seeds the weight initialisation, the batch order and the noise
    nonfinite: str = "stop"        # on a NaN/inf loss or gradient: "stop" (keep the last good checkpoint) or
                                   # "skip" the batch (no optimizer/EMA update; costs one device sync per step)
    compile: bool = False          # run the trained network through torch.compile (nn.Module.compile); pays off on
                                   # GPUs, not on CPUs (docs/benchmarks.md); the first steps wait for the compiler
    channels_last: bool = False    # NHWC weights (and so activations) for the trained network: what cuDNN's bf16
                                   # convolutions prefer on GPUs; slower on the 2-core CPU (docs/benchmarks.md)
    tensorboard: bool = False      # also write the logged scalars to RUN_DIR/tensorboard/<stage> (needs the
                                   # `tensorboard` package; the metrics .jsonl file is always written)

    def validate(self, name: str):
        for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch_size > 65536:
            raise ConfigError(f"{name}.batch_size must be <= 65536, got {self.batch_size}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"{name}.seed must be in 0…2^63-1, got {self.seed}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"{name}.lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{name}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.sample_every < 0 or self.weight_decay < 0:
            raise ConfigError(f"{name}: warmup_steps, grad_clip, sample_every and weight_decay must be >= 0")
        if self.nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"{name}.nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {self.nonfinite!r}")


@dataclass
class SampleConfig:
    sampler: str = "ddim"          # default sampler for grids and `latentdiff sample`
    steps: int = 50                # default number of sampling steps
    guidance: float = 1.0          # default classifier-free guidance scale (1 = none)

    def validate(self, num_train_steps: int):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sample.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not 1 <= self.steps <= num_train_steps:
            raise ConfigError(f"sample.steps must be in 1…diffusion.num_train_steps ({num_train_steps}), "
                              f"got {self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ConfigError(f"sample.guidance must be a finite number >= 0, got {self.guidance}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    autoencoder_training: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=1e-3, ema_decay=0.0))
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    conditional: bool = True       # train with class labels when the data has them (CFG-ready); with a text
                                   # encoder, captions are the condition and labels are used only if this is true
    modality: str = "image"        # "image", or "audio": the images are log-mel spectrograms (the `mel` section)
    mel: MelConfig = field(default_factory=MelConfig)  # audio only: the mel front end (codecs/mel.py)
    device: str = "auto"           # auto, cpu or cuda
    precision: str = "auto"        # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16": autocast on any device; "fp32"

    def validate(self) -> "Config":
        self.data.validate()
        self.autoencoder.validate()
        self.text.validate()
        # The text encoder decides the U-Net's context width (and whether it owns a trainable token encoder)
        self.unet.context_dim, self.unet.token_layers = self.text.context_dim, self.text.token_layers
        self.unet.validate()
        self.diffusion.validate()
        self.autoencoder_training.validate("autoencoder_training")
        self.training.validate("training")
        self.sample.validate(self.diffusion.num_train_steps)
        if self.modality not in ("image", "audio"):
            raise ConfigError(f"modality must be image or audio, got {self.modality!r}")
        self.mel.validate()
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", self.device):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.unet.in_channels != self.autoencoder.latent_channels:
            raise ConfigError(f"unet.in_channels ({self.unet.in_channels}) must equal autoencoder.latent_channels "
                              f"({self.autoencoder.latent_channels}): the U-Net denoises the autoencoder's latents")
        n = self.parameter_count()
        if n > MAX_PARAMETERS:
            raise ConfigError(f"this config asks for {n / 1e9:.1f} billion parameters; at most "
                              f"{MAX_PARAMETERS / 1e9:.0f} billion are allowed (reduce base_channels, "
                              "channel_mults or num_res_blocks)")
        return self

    def parameter_count(self) -> int:
        """Autoencoder + U-Net parameters, counted on the meta device (nothing is allocated)."""
        # The label embedding is counted by hand: nn.Embedding's normal_ init on the meta device imports
        # torch._dynamo, which takes seconds.
        with torch.device("meta"):
            nets = (Autoencoder(self.autoencoder), UNet(dataclasses.replace(self.unet, num_classes=0)))
        labels = (self.unet.num_classes + 1) * nets[1].time_mlp[-1].out_features if self.unet.num_classes else 0
        return labels + sum(p.numel() for net in nets for p in net.parameters())

    def to_dict(self) -> dict:
        return asdict(self)


# --- presets: a dict of named configs, no registry --------------------------------------------

# --- loading and overriding -------------------------------------------------------------------

def _convert(value, tp, where: str):
    """Check/convert one YAML/JSON/CLI value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        return _convert(value, args[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")
                     if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_convert(v, typing.get_args(tp)[0], where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            if isinstance(value, str):
                value = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        if "\x00" in str(value):  # would fail later as a file name, with a traceback
            raise ConfigError(f"{where} must not contain a NUL character")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def apply_updates(obj, updates: dict, prefix: str = ""):
    """Set fields of the dataclass `obj` from a nested mapping, converting and checking each value's type
    (unknown keys and wrong types raise ConfigError naming `prefix` + key); ranges are checked by validate()."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_updates(current, value, where + ".")
        else:
            setattr(obj, key, _convert(value, hints[key], where))


def load_config(path: str | Path | None = None, preset: str | None = None, overrides: list[str] | None = None,
                fields: dict[str, object] | None = None) -> Config:
    """Preset (or a YAML file, which may name a `preset:` to start from) + `key.sub=value` overrides (YAML
    values) + `fields` ({"data.data_dir": "0123"}: typed values, e.g. from command-line flags, set as given)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:  # safe_load: YAML tags such as !!python/object are refused, never executed
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {_first_line(e)}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        preset = data.pop("preset", preset)
    name = preset or "default"
    from latentdiff.pipeline.presets import PRESETS

    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    apply_updates(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        nested: dict = {}
        cur = nested
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        try:
            cur[parts[-1]] = yaml.safe_load(value) if value.strip() else value
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {_first_line(e)}") from None
        apply_updates(cfg, nested)
    for key, value in (fields or {}).items():
        set_field(cfg, key, value)
    return cfg.validate()


def set_field(cfg: Config, key: str, value) -> None:
    """Set the dotted field `key` to the typed `value` (a str stays that str: never re-read as YAML, so "0123"
    is not the number 83 and "yes" is not True); the type is checked, ranges are left to validate()."""
    *path, name = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key {key!r}")
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}")
    tp = hints[name]
    if value is not None and typing.get_origin(tp) in (typing.Union, types.UnionType):
        # Optional[X] with a value: convert to X directly, so the *string* "none" stays a string
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    setattr(obj, name, _convert(value, tp, key))


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__  # PyYAML's messages span several lines


def config_from_dict(d: dict) -> Config:
    """Rebuild a config saved by ``to_dict`` (e.g. a model's config.json), validating every field."""
    cfg = Config()
    apply_updates(cfg, d)
    return cfg.validate()


def dump_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=False)
