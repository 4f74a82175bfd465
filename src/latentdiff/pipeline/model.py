"""LatentDiffusion: autoencoder (codec) + denoiser + schedule + config, and the model directory format.

A model directory holds ``config.json`` (everything needed to rebuild the networks and schedule,
plus image size, class names and the latent scale factor), ``autoencoder.safetensors``,
``denoiser.safetensors`` (the EMA weights used for sampling) and ``model_card.md``. Loading reads
only JSON and safetensors: no code runs.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from latentdiff.codecs.autoencoder import Autoencoder
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError, ModelError
from latentdiff.guidance.cfg import classifier_free
from latentdiff.guidance.gradient import classifier_guidance
from latentdiff.models.unet import UNet
from latentdiff.pipeline.config import PRECISIONS, Config, config_from_dict, uses_bf16
from latentdiff.sampling.samplers import SAMPLERS, sample
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.images import to_uint8
from latentdiff.utils.state import load_state, save_state

FORMAT_VERSION = 1
# Limits on what a model directory may declare; they are checked before anything is built, because a
# model directory may come from an untrusted source.
MAX_CONFIG_BYTES = 1 << 20
MAX_IMAGE_SIDE = 4096
MAX_CLASS_NAME = 255


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def build_schedule(cfg: Config) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.create(d.schedule, d.num_train_steps, d.beta_start, d.beta_end, d.zero_terminal_snr)


def pretrained_dir(name: str) -> Path:
    """The shipped model `name`; only names listed in the package's pretrained folder are accepted, so a
    name such as ``../../x`` can never reach outside it."""
    root = Path(str(resources.files("latentdiff") / "pretrained"))
    available = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if name not in available:
        raise ModelError(f"no pretrained model named {name!r}; available: {', '.join(available) or 'none'}")
    return root / name


def class_indices(labels, num_classes: int) -> torch.Tensor:
    """`labels` as a long tensor of class indices in 0…num_classes-1. Arrays and lists are range-checked
    before the conversion, so a value beyond int64 (a uint64 from NumPy) is an error, not a wrap-around."""
    if not isinstance(labels, torch.Tensor):
        arr = np.asarray(labels)
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ConfigError(f"class must be between 0 and {num_classes - 1}")
        labels = arr.astype(np.int64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"class must be between 0 and {num_classes - 1}")
    return labels


def model_dir(model: str | Path) -> Path:
    """The directory of `model`: a path, or ``pretrained:NAME`` for a model shipped with the package."""
    model = str(model)
    return pretrained_dir(model.split(":", 1)[1]) if model.startswith("pretrained:") else Path(model)


def _read_metadata(cfg_path: Path) -> tuple[Config, tuple[int, int], tuple[str, ...]]:
    """Parse and check a model's config.json: (config, image size, class names). Any problem -> ModelError."""
    try:
        if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelError(f"{cfg_path} is larger than {MAX_CONFIG_BYTES} bytes; it is not a latentdiff config")
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ModelError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{cfg_path} is invalid: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ModelError(f"{cfg_path} is invalid: format_version must be a non-negative integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelError(f"{cfg_path.parent} was written by a newer latentdiff (format {version})")
    if "config" not in meta:
        raise ModelError(f"{cfg_path} is invalid: it has no 'config' entry")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as e:
        raise ModelError(f"{cfg_path} holds an invalid config: {e}") from None
    size = meta.get("image_size")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in size)):
        raise ModelError(f"{cfg_path} is invalid: image_size must be [height, width] with integers in "
                         f"1…{MAX_IMAGE_SIDE}, got {size!r:.80}")
    names = meta.get("class_names", [])
    if (not isinstance(names, list) or len(names) not in (0, cfg.unet.num_classes)
            or not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME and c.isprintable() for c in names)):
        raise ModelError(f"{cfg_path} is invalid: class_names must be a list of {cfg.unet.num_classes} printable "
                         f"names (or empty), got {names!r:.80}")
    return cfg, (size[0], size[1]), tuple(names)


class LatentDiffusion:
    def __init__(self, cfg: Config, autoencoder: Autoencoder, denoiser: Denoiser, class_names: tuple[str, ...] = ()):
        self.cfg = cfg
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.class_names = tuple(class_names)
        self._compiled: dict[str, Denoiser] = {}  # compile mode -> Denoiser sharing the weights
        self.directory: Path | None = None  # where it was loaded from (for its optional classifier)
        self.classifier = None  # a noise-aware classifier for classifier guidance, see load_classifier

    @classmethod
    def build(cls, cfg: Config, image_size: tuple[int, int], class_names=()) -> "LatentDiffusion":
        ae = Autoencoder(cfg.autoencoder, image_size)
        den = Denoiser(UNet(cfg.unet), build_schedule(cfg), cfg.diffusion.prediction)
        return cls(cfg, ae, den, class_names)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.cfg.unet.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.autoencoder.image_channels, *self.autoencoder.image_size)

    def to(self, device) -> "LatentDiffusion":
        self.autoencoder.to(device)
        self.denoiser.to(device)
        return self

    def eval(self) -> "LatentDiffusion":
        self.autoencoder.eval()
        self.denoiser.eval()
        return self

    # --- saving and loading -----------------------------------------------------------------

    def save(self, directory: str | Path, card: str | None = None, dtype: torch.dtype = torch.float32, extra=None,
             autoencoder_meta: dict | None = None):
        """Write the model directory; `autoencoder_meta` (stage-1 metrics etc.) goes into the codec's header."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "config": self.cfg.to_dict(),
                "image_size": list(self.autoencoder.image_size), "class_names": list(self.class_names),
                "scale_factor": float(self.autoencoder.scale_factor), **(extra or {})}

        def cast(sd):
            return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

        ae_meta = {**(autoencoder_meta or {}), "autoencoder": dataclasses.asdict(self.autoencoder.cfg),
                   "image_size": list(self.autoencoder.image_size)}
        save_state(directory / "autoencoder.safetensors", cast(self.autoencoder.state_dict()), ae_meta)
        save_state(directory / "denoiser.safetensors", cast(self.denoiser.net.state_dict()))
        write_text_atomic(directory / "config.json", json.dumps(meta, indent=2))
        write_text_atomic(directory / "model_card.md", card or default_card(meta))

    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "cpu") -> "LatentDiffusion":
        """Load a model directory, or `pretrained:NAME` for a model shipped with the package."""
        directory = model_dir(model)
        cfg_path = directory / "config.json"
        if not directory.is_dir():
            raise ModelError(f"model directory not found: {directory}")
        if not cfg_path.is_file():
            raise ModelError(f"{directory} is not a latentdiff model: config.json is missing "
                             "(a training run becomes a model when `latentdiff train` finishes)")
        cfg, image_size, class_names = _read_metadata(cfg_path)  # all checked before anything is built
        pipe = cls.build(cfg, image_size, class_names)
        for module, name in ((pipe.autoencoder, "autoencoder"), (pipe.denoiser.net, "denoiser")):
            path = directory / f"{name}.safetensors"
            tensors, _ = load_state(path)
            try:
                module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
            except RuntimeError as e:
                raise ModelError(f"{path} does not match config.json: {str(e).splitlines()[0]}") from None
            if not all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point()):
                raise ModelError(f"{path} holds NaN or infinite weights")
        if not pipe.autoencoder.scale_factor > 0:
            raise ModelError(f"{directory / 'autoencoder.safetensors'} holds a latent scale factor <= 0")
        pipe.directory = directory
        return pipe.to(device).eval()

    def load_classifier(self, path: str | Path | None = None):
        """Load the noise-aware classifier for classifier guidance (default: MODEL_DIR/classifier.safetensors)."""
        from latentdiff.models.classifier import CLASSIFIER_FILE, check_compatible, load_classifier

        if path is None:
            if self.directory is None or not (self.directory / CLASSIFIER_FILE).is_file():
                where = self.directory or "this model"
                raise ModelError(f"{where} has no {CLASSIFIER_FILE} for classifier guidance; train one with "
                                 "`latentdiff train-classifier --model MODEL [--out PATH]`")
            path = self.directory / CLASSIFIER_FILE
        elif not Path(path).is_file():
            raise ModelError(f"classifier file not found: {path}")
        net, meta = load_classifier(path, self.device)
        check_compatible(meta, path, latent_shape=self.autoencoder.latent_shape,
                         num_train_steps=self.denoiser.schedule.num_steps,
                         scale_factor=float(self.autoencoder.scale_factor))
        self.classifier = net
        return net

    # --- generation ---------------------------------------------------------------------------

    def check_labels(self, labels) -> torch.Tensor | None:
        if labels is None:
            return None
        if self.num_classes == 0:
            raise ConfigError("this model is unconditional: --class cannot be used")
        return class_indices(labels, self.num_classes)

    @torch.no_grad()
    def generate(self, n: int, *, sampler: str | None = None, steps: int | None = None, seed: int = 0,
                 labels=None, guidance: float | None = None, batch_size: int = 256, eta: float = 0.0,
                 spacing: str | None = None, compile: bool | str = False, classifier_scale: float = 0.0,
                 precision: str = "auto",
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Generate `n` images: uint8 (n, H, W, C) and the labels used (None if unconditional).

        The same (seed, n, batch_size, sampler, steps, spacing, labels, guidance, classifier_scale) gives the
        same images. `spacing` picks the timestep grid (``schedule.ALL_SPACINGS``; default "trailing").
        `compile` runs the U-Net through ``torch.compile`` (True, or a torch.compile mode such as
        "reduce-overhead"); it pays off for many batches and falls back to eager with a warning where
        compilation fails. `classifier_scale` > 0 adds classifier guidance towards `labels` with the
        noise-aware classifier (``self.classifier``, loaded from the model directory on first use); it
        composes with classifier-free guidance and also works on an unconditional denoiser.
        `precision` is the networks' arithmetic: "auto" (bf16 autocast on CUDA, float32 elsewhere), "bf16"
        or "fp32"; the sampler's own arithmetic and the decoder always run in float32. One `batch_size`
        covers the network calls and the decoding of each batch.
        """
        sampler = sampler or self.cfg.sample.sampler
        steps = steps or self.cfg.sample.steps
        guidance = self.cfg.sample.guidance if guidance is None else guidance
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= self.denoiser.schedule.num_steps:
            raise ConfigError(f"steps must be between 1 and {self.denoiser.schedule.num_steps}, got {steps}")
        if guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {guidance}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        denoiser = self.compiled_denoiser(compile) if compile else self.denoiser
        if not classifier_scale >= 0:
            raise ConfigError(f"classifier scale must be >= 0, got {classifier_scale}")
        clf = None
        if classifier_scale > 0:
            clf = self.classifier if self.classifier is not None else self.load_classifier()
            if labels is None:
                raise ConfigError("classifier guidance needs the classes to guide towards (labels / --class)")
            labels = class_indices(labels, clf.num_classes)
        if self.num_classes or clf is None:  # an unconditional denoiser takes no labels, its classifier does
            labels = self.check_labels(labels)
        cond = bool(self.num_classes) and labels is not None
        if labels is not None and labels.ndim == 0:
            labels = labels.expand(n)
        if labels is not None and len(labels) != n:
            raise ConfigError(f"got {len(labels)} labels for {n} images")
        device = self.device
        gen = torch.Generator(device=device).manual_seed(seed)
        options = {"eta": eta} if sampler == "ddim" else {}
        bf16 = uses_bf16(precision, device)
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            noise = torch.randn((b, *self.autoencoder.latent_shape), generator=gen, device=device)
            y = labels[start:start + b].to(device) if labels is not None else None
            fn = classifier_free(denoiser, y, guidance) if cond else denoiser.bind(None)
            if clf is not None:
                fn = classifier_guidance(fn, clf, y, classifier_scale, self.denoiser.schedule)
            if bf16:
                fn = _under_bf16_autocast(fn, device.type)
            z0 = sample(fn, noise, self.denoiser.schedule, sampler=sampler, steps=steps, spacing=spacing,
                        generator=gen, **options)
            out.append(to_uint8(self.autoencoder.from_latent(z0)))
            if progress:
                progress(b)
        return np.concatenate(out), (labels.numpy() if labels is not None else None)

    def compiled_denoiser(self, mode: bool | str = True) -> Denoiser:
        """A Denoiser sharing this one's weights whose U-Net runs through ``torch.compile`` (cached per mode)."""
        mode = "default" if mode is True else mode
        if mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if mode not in self._compiled:
            net = CompiledNet(self.denoiser.net, mode)
            self._compiled[mode] = Denoiser(net, self.denoiser.schedule, self.denoiser.prediction)
        return self._compiled[mode]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def _under_bf16_autocast(fn, device_type: str):
    """`fn` with its network calls under bf16 autocast; the Denoiser returns float32 predictions, so the
    sampler's updates stay in float32."""

    def run(x, t):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(x, t)

    return run


class CompiledNet(torch.nn.Module):
    """`net` behind ``torch.compile``, falling back to eager (one warning) if compiling or running it fails.

    Compilation is lazy, so failures (no C compiler, unsupported platform) surface on the first call;
    the eager rerun then either succeeds or raises the real error. Weights stay shared with `net`.
    """

    def __init__(self, net: torch.nn.Module, mode: str = "default"):
        super().__init__()
        self.eager = net
        # CUDA graphs (reduce-overhead) replay into the same output memory: each call is a new step, and
        # its output is copied out, since samplers keep earlier predictions (multistep history, guidance).
        self.graphs = mode == "reduce-overhead"
        self.cfg = getattr(net, "cfg", None)  # guidance reads net.cfg.num_classes
        try:
            self._fn = torch.compile(net, mode=mode)
        except Exception as e:  # noqa: BLE001 - any failure means: run eager
            self._fall_back(e)

    def _fall_back(self, e: Exception):
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {first_line}); "
                      "running the network eagerly", RuntimeWarning, stacklevel=3)
        self._fn = self.eager

    def forward(self, *args):
        if self._fn is self.eager:
            return self.eager(*args)
        try:
            if not self.graphs:
                return self._fn(*args)
            torch.compiler.cudagraph_mark_step_begin()
            return self._fn(*args).clone()
        except Exception as e:  # noqa: BLE001
            self._fall_back(e)
            return self.eager(*args)


def default_card(meta: dict) -> str:
    cfg = meta["config"]
    metrics = meta.get("metrics", {})
    lines = [
        "# latentdiff model", "",
        f"- image size: {meta['image_size'][0]}×{meta['image_size'][1]}, "
        f"{cfg['autoencoder']['image_channels']} channel(s)",
        f"- data: {meta.get('data_source', cfg['data']['source'])}",
        f"- classes: {', '.join(meta['class_names']) or 'unconditional'}",
        f"- autoencoder: factor {cfg['autoencoder']['factor']}, {cfg['autoencoder']['latent_channels']} latent "
        f"channels, latent scale factor {meta['scale_factor']:.4f}",
        f"- diffusion: {cfg['diffusion']['schedule']} schedule, T = {cfg['diffusion']['num_train_steps']}, "
        f"{cfg['diffusion']['prediction']}-prediction",
        f"- training: {meta.get('train_steps', '?')} denoiser steps, "
        f"{meta.get('autoencoder_steps', '?')} autoencoder steps",
    ]
    lines += [f"- {k}: {v}" for k, v in metrics.items()]
    lines += ["", "## Intended use", "",
              "Research and teaching: sampling, editing and evaluating small latent diffusion models. "
              "Generated images are synthetic and carry provenance metadata in their PNG text chunks.", ""]
    return "\n".join(lines)
