"""Stage 1: fit the KL autoencoder on images, estimate its latent statistics, evaluate, write it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from latentdiff.codecs.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.data import ImageData, load_dataset
from latentdiff.errors import ConfigError, DataError, ModelError
from latentdiff.pipeline import resolve_device
from latentdiff.pipeline.config import Config, apply_updates
from latentdiff.training import distributed, rundir
from latentdiff.training.loop import Stage, TrainLoop
from latentdiff.utils import state as ld_state
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.images import to_tensor

log = logging.getLogger(__name__)


def load_train_data(cfg: Config, split: str = "train") -> ImageData:
    d = cfg.data
    return load_dataset(d.source, split, data_dir=d.data_dir, image_size=d.image_size, channels=d.channels,
                        limit=d.limit if split == "train" else None)


def autoencoder_stage(cfg: Config, ae: Autoencoder, images: torch.Tensor, device: torch.device) -> Stage:
    """The autoencoder's loss over resident `images` (N, C, H, W) in [-1, 1]."""

    def loss(idx, gen, rows):
        # ε of the posterior sample for the whole global batch, drawn on every process; each keeps its rows
        noise = torch.randn((len(idx), *ae.latent_shape), generator=gen, device=device)
        return ae.loss(images[idx[rows].to(device)], noise=noise[rows])

    return Stage("autoencoder", ae, loss, len(images), cfg.autoencoder_training, section="autoencoder_training")


def evaluate_autoencoder(ae: Autoencoder, images: np.ndarray, device) -> dict:
    """PSNR and SSIM of reconstructions (posterior mean) on uint8 images."""
    from latentdiff.evaluation.evaluate import reconstruct
    from latentdiff.evaluation.metrics import psnr, ssim

    rec = reconstruct(ae, images, device)
    return {"psnr": float(np.mean(psnr(images, rec))), "ssim": float(np.mean(ssim(images, rec))),
            "n": len(images)}


AUTOENCODER_SECTIONS = ("data", "autoencoder", "autoencoder_training", "precision")  # what stage 1 depends on


def train_autoencoder(cfg: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                      progress: bool = True) -> tuple[Autoencoder, dict]:
    """Stage 1 (also one process of several under torchrun; rank 0 evaluates and writes the model).
    RUN_DIR is locked while it runs; see ``training/rundir.py`` for `resume` and `overwrite`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.setup(resolve_device(cfg.device))
    with rundir.locked(run_dir):
        return _train_autoencoder(cfg, run_dir, device, resume, overwrite, progress)


def _train_autoencoder(cfg: Config, run_dir: Path, device, resume: bool, overwrite: bool, progress: bool):
    main = distributed.is_main()
    data = load_train_data(cfg)
    cfg.autoencoder.image_channels = data.channels
    ae_cfg = cfg.autoencoder
    ae_cfg.validate()
    if main:
        write_text_atomic(run_dir / "autoencoder_config.json", json.dumps(cfg.to_dict(), indent=2))
    log.info(f"autoencoder: {len(data)} images from {data.source}, {data.channels}×{data.image_size[0]}×"
             f"{data.image_size[1]} -> latent {ae_cfg.latent_shape(data.image_size)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.autoencoder_training.seed)  # the same initial weights on every run
        ae = Autoencoder(ae_cfg, data.image_size)
    images = to_tensor(data.images).to(device)  # small data sets stay resident on the device
    stage = autoencoder_stage(cfg, ae, images, device)
    TrainLoop(stage, run_dir, device, precision=cfg.precision, config=cfg.to_dict(), progress=progress,
              sections=AUTOENCODER_SECTIONS, overwrite=overwrite).run(resume)
    ae.eval()
    stats = ae.fit_latent_stats(images[:5000])
    metrics: dict = {}
    if main:
        metrics = _evaluate_and_save(cfg, ae, data, stats, run_dir, device)
    distributed.barrier()  # the other processes wait until rank 0 has written the model
    return ae, metrics


def _evaluate_and_save(cfg: Config, ae: Autoencoder, data: ImageData, stats: dict, run_dir: Path, device) -> dict:
    try:
        test, held_out = load_train_data(cfg, "test"), "test split"
    except DataError:  # an image folder without a test/ subfolder: report on training images
        test, held_out = data, "training images (no held-out split)"
    metrics = evaluate_autoencoder(ae, test.images[:2000], device)
    metrics.update(evaluated_on=held_out, latent_stats=stats, steps=cfg.autoencoder_training.steps)
    ld_state.save_state(run_dir / "autoencoder.safetensors", ae.state_dict(),
                        {"autoencoder": vars(ae.cfg), "image_size": list(data.image_size), "metrics": metrics,
                         "class_names": list(data.class_names), "data_source": data.source})
    log.info(f"autoencoder on {held_out}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
             f"latent scale per channel {', '.join(f'{v:.3f}' for v in stats['scale'])}")
    return metrics


def load_trained_autoencoder(run_dir: Path, device) -> tuple[Autoencoder, dict]:
    path = Path(run_dir) / "autoencoder.safetensors"
    if not path.is_file():
        raise ModelError(f"{path} not found: train the autoencoder first with "
                         f"`latentdiff train-autoencoder --run-dir {run_dir}`")
    tensors, meta = ld_state.load_state(path)
    size = meta.get("image_size")
    try:  # the header is data from disk: check types and ranges before building anything
        ae_cfg = AutoencoderConfig()
        apply_updates(ae_cfg, meta.get("autoencoder"), "autoencoder.")
        ae_cfg.validate()
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
            raise ConfigError(f"image_size must be [height, width] with integers in 1…4096, got {size!r:.80}")
        ae = Autoencoder(ae_cfg, (size[0], size[1]))
    except ConfigError as e:
        raise ModelError(f"{path} is not a usable latentdiff autoencoder: {e}") from None
    ld_state.load_into(ae, ae.upgrade_state(tensors), path, "the autoencoder settings in its header")
    return ae.to(device).eval(), meta
