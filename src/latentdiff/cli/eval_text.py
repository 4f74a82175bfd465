"""`latentdiff eval --model M` for text-to-image models: the emoji metrics on training and held-out captions."""

from __future__ import annotations

import json
import time

import numpy as np

from latentdiff.errors import ConfigError


def is_text_model(model) -> bool:
    """Whether the model directory's config.json names a text encoder (read without loading any weights; a
    directory that cannot be read is left to the ordinary path, which reports the problem)."""
    from latentdiff.pipeline.directory import model_dir

    try:
        meta = json.loads((model_dir(model) / "config.json").read_text(encoding="utf-8"))
        return meta["config"].get("text", {}).get("encoder", "none") != "none"
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the ordinary path
        return False


def evaluate_text_model(opts, device) -> None:
    """Generate one image per caption of each split's half A and print the table of
    :func:`latentdiff.evaluation.text_to_image.evaluate_text_to_image` (value and real-data floor)."""
    from latentdiff.evaluation.text_to_image import evaluate_text_to_image, format_table
    from latentdiff.pipeline import LatentDiffusion

    pipe = LatentDiffusion.load(opts.model, device)
    if opts.extractor not in ("fashion-mnist-classifier", "emoji-classifier") or opts.inception_weights:
        raise ConfigError("text-to-image models are scored in the emoji classifier's features; drop --extractor")
    c, h, w = pipe.image_shape
    if c != 3 or h != w:
        raise ConfigError(f"text-to-image evaluation needs square RGB images; this model makes {c}×{h}×{w}")
    timing = {"images": 0, "seconds": 0.0}

    def generate(captions: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        images, _ = pipe.generate(len(captions), prompt=tuple(captions), seed=opts.seed, sampler=opts.sampler,
                                  steps=opts.steps, guidance=opts.guidance, spacing=opts.spacing,
                                  batch_size=opts.batch_size)
        timing["images"] += len(captions)
        timing["seconds"] += time.perf_counter() - t0
        return images

    splits = ("train", "heldout") if opts.split == "both" else (opts.split,)
    results = evaluate_text_to_image(generate, n=opts.n or 200, seed=opts.seed, splits=splits, root=opts.emoji_dir,
                                     size=h)
    print(f"text-to-image: {opts.model}, one image per caption of a random half of each split, against the other "
          f"half's real images; 'real' columns: those real images instead of samples (the floor). "
          f"Sampling: {timing['images']} images in {timing['seconds']:.1f} s.")
    print(format_table(results))
    if opts.as_json:
        print(json.dumps({"model": str(opts.model), **results, "sample_seconds": round(timing["seconds"], 2)}))
