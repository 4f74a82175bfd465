"""Stage 2: the latent denoiser. The data set is encoded once into posteriors (mean, log-variance), in
memory or, with data.latent_cache, in a sharded cache on disk (``training/latents.py``); every step trains
the U-Net on fresh latent samples from them.

The latent normalisation belongs to the codec (``Autoencoder.sample_latent`` / ``normalize``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from latentdiff.data.datasets import ImageItems
from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.loss import diffusion_loss, drop_cond
from latentdiff.errors import ConfigError
from latentdiff.pipeline import LatentDiffusion, resolve_device
from latentdiff.pipeline.config import Config
from latentdiff.training import distributed, rundir
from latentdiff.training.autoencoder import load_train_data, load_trained_autoencoder
from latentdiff.training.latents import (
    CachedLatents,
    Posteriors,
    cached_latents,
    encode_dataset,
    training_items,
)
from latentdiff.training.loop import Stage, TrainLoop
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.images import make_grid
from latentdiff.utils.state import state_digest

log = logging.getLogger(__name__)


def denoiser_stage(cfg: Config, den: Denoiser, latents: Posteriors | CachedLatents, labels: torch.Tensor | None,
                   on_sample=None, text: tuple[torch.Tensor, torch.Tensor] | None = None) -> Stage:
    """The denoiser's loss on the training latents (in memory or in the cache, with their text when the
    model has text); `labels` (N,) on the device, or None (unconditional); `text`: every caption's (context
    (N, L, ...), mask (N, L)) for in-memory Posteriors that do not hold it yet."""
    drop, gamma = cfg.diffusion.cond_drop_prob, cfg.diffusion.min_snr_gamma
    if text is not None:
        latents = Posteriors(latents.codec, latents.post, text)

    def loss(idx, gen, rows):
        # Every random draw covers the whole global batch (cheap next to the network), so that each
        # process's rows get exactly the numbers a single process would; the U-Net sees only `rows`.
        z0, context = latents.draw(idx, gen)
        cond = None
        if labels is not None or context is not None:
            at = idx.to(z0.device)
            cond = Cond(labels=labels[at] if labels is not None else None,
                        context=context[0] if context is not None else None,
                        context_mask=context[1] if context is not None else None)
            cond = drop_cond(cond, den.null_cond(len(idx), z0.device), drop, gen)
        return diffusion_loss(den, z0, cond, gen, gamma, rows), {}

    return Stage("denoiser", den.net, loss, len(latents), cfg.training, on_sample)


# "codec": the trained autoencoder's weights (their sha256), so that checkpoints of a denoiser trained on an
# earlier autoencoder are not resumed on a re-trained one.
DENOISER_SECTIONS = ("data", "autoencoder", "codec", "unet", "diffusion", "training", "conditional", "precision")


def train_diffusion(cfg: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                    progress: bool = True, grid_path: str | Path | None = None) -> LatentDiffusion:
    """Stage 2; when done, RUN_DIR is a model directory and a sample grid is written to `grid_path`
    (default RUN_DIR/samples.png). Under torchrun every process trains its share; rank 0 writes.
    RUN_DIR is locked while it runs; see ``training/rundir.py`` for `resume` and `overwrite`."""
    run_dir = Path(run_dir)
    device = distributed.setup(resolve_device(cfg.device))
    with rundir.locked(run_dir):
        return _train_diffusion(cfg, run_dir, device, resume, overwrite, progress, grid_path)


def _train_diffusion(cfg: Config, run_dir: Path, device, resume: bool, overwrite: bool, progress: bool,
                     grid_path) -> LatentDiffusion:
    main = distributed.is_main()
    ae, ae_meta = load_trained_autoencoder(run_dir, device)
    cfg.autoencoder = ae.cfg  # the trained codec is authoritative
    # the cache streams a captioned folder; in memory, the data set is loaded whole
    items = training_items(cfg, ae) if cfg.data.latent_cache else ImageItems(load_train_data(cfg))
    data = items.info
    if data.image_size != ae.image_size or data.channels != ae.cfg.image_channels:
        raise ConfigError(f"the data ({data.channels}×{data.image_size}) does not match the trained autoencoder "
                          f"({ae.cfg.image_channels}×{ae.image_size})")
    conditional = cfg.conditional and data.labels is not None and data.num_classes > 1
    cfg.unet.num_classes = data.num_classes if conditional else 0
    cfg.unet.in_channels = ae.cfg.latent_channels
    cfg.validate()
    captions = caption_list(cfg, data)
    if main:
        write_text_atomic(run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed)  # the same initial weights on every run
        pipe = LatentDiffusion.build(cfg, ae.image_size, data.class_names if conditional else ())
    pipe.autoencoder = ae
    den = pipe.denoiser.to(device)
    log.info(f"denoiser: {sum(p.numel() for p in den.parameters()) / 1e6:.2f}M parameters, latent {ae.latent_shape}, "
             f"{_condition_name(cfg, conditional, data.num_classes)}")
    latents = _training_latents(cfg, pipe, items, captions, run_dir, device)
    labels = torch.as_tensor(data.labels, device=device) if conditional else None

    def on_sample(step, net):
        snapshot = LatentDiffusion(cfg, ae, den.with_net(net), pipe.class_names)
        snapshot._text_encoder = pipe._text_encoder
        write_sample_grid(snapshot, run_dir / "samples" / f"step-{step:08d}.png", prompts=grid_prompts(captions))

    t0 = time.perf_counter()
    loop = TrainLoop(denoiser_stage(cfg, den, latents, labels, on_sample), run_dir, device, precision=cfg.precision,
                     config={**cfg.to_dict(), "codec": {"sha256": state_digest(ae.state_dict())}}, progress=progress,
                     sections=DENOISER_SECTIONS, overwrite=overwrite)
    net = loop.run(resume)
    train_seconds = time.perf_counter() - t0
    final = LatentDiffusion(cfg, ae, den.with_net(net), pipe.class_names).eval()
    final._text_encoder = pipe._text_encoder
    if main:
        _write_model(final, cfg, ae_meta, data.source, run_dir, grid_path, grid_prompts(captions))
        log.info(f"model written to {run_dir} ({train_seconds:.0f} s of denoiser training); samples in "
                 f"{grid_path or run_dir / 'samples.png'}")
    distributed.barrier()  # the other processes wait until rank 0 has written the model
    return final


def _training_latents(cfg: Config, pipe: LatentDiffusion, items, captions: list[str] | None, run_dir: Path,
                      device) -> Posteriors | CachedLatents:
    """The latents (and text) to train on: from the latent cache when data.latent_cache is set, else
    encoded once into memory."""
    if not cfg.data.latent_cache:
        post = encode_dataset(pipe.autoencoder, items.data.images, device)
        post.text = encode_captions(pipe, captions) if captions is not None else None
        return post
    if captions is not None:
        pipe.encode_prompts([""])  # fixes the null condition even when the cache already exists
    return cached_latents(cfg, pipe.autoencoder, items, pipe.encode_prompts if captions is not None else None,
                          run_dir, device)


def _condition_name(cfg: Config, conditional: bool, num_classes: int) -> str:
    parts = ([f"class-conditional ({num_classes} classes)"] if conditional else []) + (
        [f"text-conditioned ({cfg.text.encoder})"] if cfg.text.encoder != "none" else [])
    return " and ".join(parts) or "unconditional"


def caption_list(cfg: Config, data) -> list[str] | None:
    """The training captions when the config has a text encoder (an error when the data has none)."""
    if cfg.text.encoder == "none":
        return None
    captions = getattr(data, "captions", None)
    if captions is None or len(captions) != len(data):
        raise ConfigError(f"text.encoder is {cfg.text.encoder!r} but the data ({data.source}) has no captions: "
                          "use a captioned data set (e.g. --data emoji, or a folder with metadata.jsonl)")
    return [str(c) for c in captions]


def encode_captions(pipe: LatentDiffusion, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption's (context, mask), encoded once with the model's text encoder before training (a frozen
    encoder never runs in the training loop); this also fixes the denoiser's null condition, the empty prompt."""
    t0 = time.perf_counter()
    context, mask = pipe.encode_prompts(captions)
    log.info(f"text: {len(captions)} captions encoded with {pipe.cfg.text.encoder!r} in "
             f"{time.perf_counter() - t0:.0f} s, context {tuple(context.shape[1:])}")
    return context, mask


def grid_prompts(captions: list[str] | None, count: int = 8) -> list[str] | None:
    """`count` training captions spread over the data set, for the sample grids (one row each)."""
    if captions is None:
        return None
    return [captions[i] for i in np.linspace(0, len(captions) - 1, count).astype(int)]


def _write_model(final: LatentDiffusion, cfg: Config, ae_meta: dict, source: str, run_dir: Path, grid_path,
                 prompts: list[str] | None = None):
    ae_metrics = ae_meta.get("metrics") or {}  # absent when the autoencoder came from a saved model directory
    extra = {"train_steps": cfg.training.steps, "autoencoder_steps": ae_metrics.get("steps"), "data_source": source,
             "metrics": {label: round(ae_metrics[key], digits) for label, key, digits in
                         (("autoencoder PSNR (dB)", "psnr", 2), ("autoencoder SSIM", "ssim", 4))
                         if isinstance(ae_metrics.get(key), (int, float))}}
    final.save(run_dir, extra=extra, autoencoder_meta=ae_meta)
    write_sample_grid(final, Path(grid_path) if grid_path else run_dir / "samples.png", prompts=prompts)


def write_sample_grid(pipe: LatentDiffusion, path: Path, per_class: int = 8, seed: int = 0,
                      prompts: list[str] | None = None):
    """A grid of samples: one row per prompt for text models, per class for conditional models, else 8×8."""
    from latentdiff.pipeline.keys import watermark_key
    from latentdiff.pipeline.provenance import generation_record, write_output

    key = watermark_key()  # the demo's grid is an output like any other: watermarked, signed, recorded
    if prompts:
        request = pipe.request(len(prompts) * per_class, prompt=[p for p in prompts for _ in range(per_class)],
                               seed=seed)
        nrow = per_class
    elif pipe.num_classes:
        labels = np.repeat(np.arange(pipe.num_classes), per_class)
        request = pipe.request(len(labels), labels=labels, seed=seed)
        nrow = per_class
    else:
        request = pipe.request(64, seed=seed)
        nrow = 8
    images, _ = pipe.generate(request, watermark=key)
    record = generation_record(pipe, str(path.parent), request.to_dict(), key,
                               grid={"n": len(images), "nrow": nrow, "pad": 2, "scale": 2})
    write_output(path, make_grid(images, nrow), record, scale=2)
