"""The model directory format: what a trained model is on disk, and how it is written and read back.

A model directory holds ``config.json`` (everything needed to rebuild the networks and schedule, plus image
size, class names and the codec's latent statistics), ``autoencoder.safetensors``, ``denoiser.safetensors``
(the EMA weights used for sampling), optionally ``classifier.safetensors``, and ``model_card.md``. Loading
reads only JSON and safetensors: no code runs, and every declared size is checked before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from latentdiff.errors import ConfigError, ModelError
from latentdiff.pipeline.config import Config, config_from_dict
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.state import is_verified, load_into, load_state, save_state, state_digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Limits on what a model directory may declare; they are checked before anything is built, because a
# model directory may come from an untrusted source.
MAX_CONFIG_BYTES = 1 << 20
MAX_IMAGE_SIDE = 4096
MAX_CLASS_NAME = 255


def pretrained_dir(name: str) -> Path:
    """The shipped model `name`; only names listed in the package's pretrained folder are accepted, so a
    name such as ``../../x`` can never reach outside it."""
    root = Path(str(resources.files("latentdiff") / "pretrained"))
    available = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if name not in available:
        raise ModelError(f"no pretrained model named {name!r}; available: {', '.join(available) or 'none'}")
    return root / name


def model_dir(model: str | Path) -> Path:
    """The directory of `model`: a path, or ``pretrained:NAME`` for a model shipped with the package."""
    model = str(model)
    return pretrained_dir(model.split(":", 1)[1]) if model.startswith("pretrained:") else Path(model)


def read_metadata(cfg_path: Path) -> tuple[Config, tuple[int, int], tuple[str, ...]]:
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


def write_model(directory: str | Path, cfg: Config, autoencoder: nn.Module, denoiser_net: nn.Module,
                class_names=(), *, card: str | None = None, dtype: torch.dtype = torch.float32, extra=None,
                autoencoder_meta: dict | None = None) -> Path:
    """Write a model directory; `autoencoder_meta` (stage-1 metrics etc.) goes into the codec's header."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(),
            "image_size": list(autoencoder.image_size), "class_names": list(class_names),
            "latent_stats": autoencoder.latent_stats(), **(extra or {})}

    def cast(sd):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    ae_meta = {**(autoencoder_meta or {}), "autoencoder": dataclasses.asdict(autoencoder.cfg),
               "image_size": list(autoencoder.image_size)}
    codec = cast(autoencoder.state_dict())
    meta["codec_sha256"] = state_digest(codec)  # the denoiser belongs to this codec: see check_codec
    save_state(directory / "autoencoder.safetensors", codec, ae_meta)
    save_state(directory / "denoiser.safetensors", cast(denoiser_net.state_dict()), {"codec_sha256": meta["codec_sha256"]})
    write_text_atomic(directory / "config.json", json.dumps(meta, indent=2))
    write_text_atomic(directory / "model_card.md", card or default_card(meta))
    return directory


def check_model_directory(model: str | Path) -> tuple[Path, Config, tuple[int, int], tuple[str, ...]]:
    """(directory, config, image size, class names) of a model, all checked before anything is built."""
    directory = model_dir(model)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}")
    if not cfg_path.is_file():
        raise ModelError(f"{directory} is not a latentdiff model: config.json is missing "
                         "(a training run becomes a model when `latentdiff train` finishes)")
    return (directory, *read_metadata(cfg_path))


def check_codec(directory: Path, codec_sha256: str, denoiser_meta: dict) -> None:
    """Refuse a denoiser trained on another codec: its latents mean nothing to this decoder, so it would sample
    garbage without complaint. (This happens when the autoencoder is re-trained in a finished model folder.)
    Models written before the codec hash was recorded carry none and are accepted."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for source, recorded in (("denoiser.safetensors", denoiser_meta.get("codec_sha256")),
                             ("config.json", config.get("codec_sha256"))):
        if recorded is not None and recorded != codec_sha256:
            raise ModelError(f"{directory} mixes two models: {source} was trained on the autoencoder "
                             f"{str(recorded)[:12]}…, but autoencoder.safetensors is {codec_sha256[:12]}… (it was "
                             f"re-trained afterwards); train a denoiser on it with `latentdiff train --run-dir "
                             f"{directory}`, or restore the autoencoder it was trained on")


def load_weights(directory: Path, autoencoder: nn.Module, denoiser_net: nn.Module) -> None:
    """Fill the two networks from the directory's safetensors files (float32), refusing mismatches, NaNs and a
    denoiser trained on another codec."""
    digests, denoiser_meta = [], {}
    for module, name in ((autoencoder, "autoencoder"), (denoiser_net, "denoiser")):
        path = directory / f"{name}.safetensors"
        tensors, meta = load_state(path)
        if not is_verified(path):
            log.warning(f"{path} carries no latentdiff checksum: its contents could not be verified")
        digests.append(state_digest(tensors))
        denoiser_meta = meta
        if hasattr(module, "upgrade_state"):
            tensors = module.upgrade_state(tensors)
        load_into(module, tensors, path, "config.json")
        if not all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point()):
            raise ModelError(f"{path} holds NaN or infinite weights")
    if not bool((autoencoder.latent_scale > 0).all()):
        raise ModelError(f"{directory / 'autoencoder.safetensors'} holds a latent scale <= 0 (its latent "
                         "statistics are unusable)")
    check_codec(directory, digests[0], denoiser_meta)  # each file is sound: now, do they belong together?


def _stats_text(meta: dict) -> str:
    stats = meta.get("latent_stats")
    if isinstance(stats, dict):
        return ("latent statistics (per channel) shift " + ", ".join(f"{v:.3f}" for v in stats["shift"])
                + "; scale " + ", ".join(f"{v:.3f}" for v in stats["scale"]))
    return f"latent scale factor {meta.get('scale_factor', float('nan')):.4f}"


def _text_line(text: dict) -> str:
    encoder = text.get("encoder", "none")
    if encoder == "none":
        return "none"
    if encoder == "minilm":
        return f"prompts, frozen all-MiniLM-L6-v2 (extra `text`), {text.get('max_tokens')} tokens"
    return f"prompts, built-in byte encoder ({text.get('layers')} layers, width {text.get('width')})"


def default_card(meta: dict) -> str:
    cfg = meta["config"]
    metrics = meta.get("metrics", {})
    lines = [
        "# latentdiff model", "",
        f"- image size: {meta['image_size'][0]}×{meta['image_size'][1]}, "
        f"{cfg['autoencoder']['image_channels']} channel(s)",
        f"- data: {meta.get('data_source', cfg['data']['source'])}",
        f"- classes: {', '.join(meta['class_names']) or 'none'}",
        f"- text: {_text_line(cfg.get('text') or {})}",
        f"- autoencoder: factor {cfg['autoencoder']['factor']}, {cfg['autoencoder']['latent_channels']} latent "
        f"channels, {_stats_text(meta)}",
        f"- diffusion: {cfg['diffusion']['schedule']} schedule, T = {cfg['diffusion']['num_train_steps']}, "
        f"{cfg['diffusion']['prediction']}-prediction",
        f"- training: {meta.get('train_steps', '?')} denoiser steps, "
        f"{meta.get('autoencoder_steps', '?')} autoencoder steps",
    ]
    lines += [f"- {k}: {v}" for k, v in metrics.items()]
    if cfg.get("modality") == "audio":
        mel = cfg["mel"]
        lines += [f"- audio: the images are log-mel spectrograms ({mel['n_mels']} mels × {mel['frames']} frames, "
                  f"{mel['clip_samples'] / mel['sample_rate']:g} s at {mel['sample_rate']} Hz); waveforms come "
                  f"from fast Griffin-Lim ({mel['griffin_lim_iters']} iterations); generated WAVs carry the "
                  "provenance record in a RIFF LIST/INFO comment"]
    lines += ["", "## Intended use", "",
              "Research and teaching: sampling, editing and evaluating small latent diffusion models. "
              "Generated images are synthetic and carry provenance metadata in their PNG text chunks.", ""]
    return "\n".join(lines)
