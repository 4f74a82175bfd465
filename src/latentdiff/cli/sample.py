"""`latentdiff sample`: generate images (a PNG grid or an .npz archive) or, from an audio model, sounds (WAV, an
.npz of waveforms, and spectrogram grids)."""

from __future__ import annotations

import time

import click

from latentdiff.cli.options import (
    COMPILE_MODES,
    COUNT,
    NONNEG_FLOAT,
    NONNEG_INT,
    PRECISIONS,
    UNIT_FLOAT,
    batch_size_option,
    command,
    device_option,
    guidance_option,
    model_option,
    no_progress_option,
    out_option,
    prompt_options,
    runtime_options,
    sampler_option,
    seed_option,
    spacing_option,
    steps_option,
    with_namespace,
)
from latentdiff.cli.outputs import output_key, output_record, provenance_options, save_any, write_file
from latentdiff.errors import ConfigError

MAX_GRID = 10_000  # images in one PNG grid; more go to an .npz


def _check_outputs(opts):
    from latentdiff.utils.files import check_output, check_output_dir

    out = check_output(opts.out, (".png", ".npz", ".wav"))
    if out.suffix.lower() == ".png" and opts.n > MAX_GRID:
        raise ConfigError(f"--out {out}: a PNG grid holds at most {MAX_GRID} images; write --n {opts.n} to an .npz")
    if opts.save_individual:
        check_output_dir(opts.save_individual, option="--save-individual")
    if opts.spectrograms:
        check_output(opts.spectrograms, (".png",), option="--spectrograms")
    return out


def _num_classes(opts, pipe) -> int:
    """The classes to sample from: the model's, or with classifier guidance the classifier's."""
    if opts.classifier_scale:
        if opts.unconditional:
            raise ConfigError("--unconditional cannot be combined with --classifier-scale, which guides towards "
                              "classes; for the unconditional denoiser plus classifier guidance use --guidance 0")
        return pipe.load_classifier(opts.classifier).num_classes
    if opts.classifier:
        raise ConfigError("--classifier only applies with --classifier-scale")
    return pipe.num_classes


def _labels(opts, num_classes: int):
    import numpy as np

    if opts.class_ is not None:
        return np.full(opts.n, opts.class_)
    if num_classes and not opts.unconditional:
        return np.arange(opts.n) % num_classes  # every class in turn
    return None


def _request(opts, pipe, labels):
    """The one SampleRequest of this command, resolved against the model (every check happens there)."""
    from latentdiff.pipeline.request import SampleRequest

    return pipe.request(SampleRequest.build(
        opts.n, labels=labels, prompt=opts.prompt, negative_prompt=opts.negative_prompt, sampler=opts.sampler,
        steps=opts.steps, spacing=opts.spacing, seed=opts.seed, guidance=opts.guidance, classifier_scale=opts.classifier_scale, eta=opts.eta, batch_size=opts.batch_size,
        compile=opts.compile, precision=opts.precision))


def _generate(pipe, request, show_progress: bool, watermark=None):
    """(images, labels used, seconds) with a progress bar when `show_progress`."""
    from latentdiff.utils.progress import progress_bar

    bar = progress_bar(request.n, "sampling", show_progress)
    t0 = time.perf_counter()
    try:
        kw = {"watermark": watermark} if watermark is not None else {}  # the ONNX runtime has no watermark seam
        images, used = pipe.generate(request, progress=bar.update if bar else None, **kw)
    finally:
        if bar:
            bar.close()
    return images, used, time.perf_counter() - t0


@command("sample", help="Generate images. --out FILE.png writes a grid; --out FILE.npz writes uint8 `images` "
                              "(N×H×W or N×H×W×C) and `labels` for conditional models.")
@model_option()
@click.option("--n", type=COUNT, default=64, metavar="N", help="number of images (default: 64)")
@steps_option()
@sampler_option("sampler (default: the model's); heun costs two network evaluations per step, the others one")
@spacing_option()
@click.option("--compile", is_flag=False, flag_value="default", default=None, type=COMPILE_MODES,
              help="run the U-Net through torch.compile; --compile alone means mode default (reduce-overhead adds "
                   "CUDA graphs on a GPU). Pays off for many batches; falls back to eager")
@click.option("--precision", type=PRECISIONS, default="auto", help="network arithmetic: auto (bf16 autocast on "
              "CUDA, float32 on CPU), bf16 or fp32 (default: auto)")
@click.option("--eta", type=UNIT_FLOAT, default=0.0, metavar="ETA", help="DDIM stochasticity η in [0, 1] (default: 0)")
@seed_option()
@click.option("--class", "class_", type=NONNEG_INT, metavar="K",
              help="generate only class K (conditional models); default: all classes in turn")
@click.option("--unconditional", is_flag=True, help="ignore classes (null label) on a conditional model")
@guidance_option()
@prompt_options()
@click.option("--classifier-scale", type=NONNEG_FLOAT, default=0.0, metavar="S",
              help="classifier guidance scale with the model's noise-aware classifier (0 = none; default: 0)")
@click.option("--classifier", metavar="PATH",
              help="classifier file for --classifier-scale (default: MODEL_DIR/classifier.safetensors)")
@out_option("samples.png", ".png grid or .npz archive (default: samples.png)")
@click.option("--save-individual", metavar="DIR", help="also write one PNG per image (one WAV per sound) into DIR")
@click.option("--spectrograms", metavar="FILE.png", help="audio models: also write a grid of the log-mel "
              "spectrograms (low frequencies at the bottom)")
@click.option("--griffin-lim-iters", type=NONNEG_INT, metavar="N",
              help="audio models: phase-reconstruction iterations (default: the model's)")
@batch_size_option()
@device_option()
@runtime_options()
@no_progress_option("no progress bar")
@provenance_options()
@with_namespace
def sample(opts):
    from latentdiff.cli.inputs import load_model
    from latentdiff.utils.files import staged_dir

    out = _check_outputs(opts)
    pipe = load_model(opts)
    audio = pipe.cfg.modality == "audio"
    if not audio and (out.suffix.lower() == ".wav" or opts.spectrograms or opts.griffin_lim_iters is not None):
        raise ConfigError(f"{opts.model} is an image model: .wav output, --spectrograms and --griffin-lim-iters "
                          "need an audio model")
    num_classes = _num_classes(opts, pipe)
    request = _request(opts, pipe, _labels(opts, num_classes))
    key = output_key(opts, pipe)
    images, used, seconds = _generate(pipe, request, not opts.no_progress, key)
    record = output_record(opts, pipe, request.to_dict(), key)
    nrow = num_classes if (used is not None and opts.class_ is None and opts.n % num_classes == 0) else None
    if audio:
        return _write_audio(opts, pipe, out, images, used, record, seconds, nrow)
    if opts.save_individual:  # the PNGs and the grid arrive together or not at all
        with staged_dir(opts.save_individual) as stage:
            for i, img in enumerate(images):
                write_file(stage / f"{i:05d}.png", img, record, opts)
            save_any(images, out, used, record, opts, nrow)
    else:
        save_any(images, out, used, record, opts, nrow)
    print(f"wrote {len(images)} images to {out} ({len(images) / seconds:.1f} images/s on {pipe.device})")


def _write_audio(opts, pipe, out, images, used, record, seconds, nrow=None):
    """Audio outputs: WAV/.npz (and the spectrogram grid when --out is .png or --spectrograms), one set. WAVs carry
    the record in their RIFF comment chunk; spectrogram PNGs go through the provenance writer like any image."""
    from pathlib import Path

    from latentdiff.codecs.mel import uint8_to_waves
    from latentdiff.utils.audio import save_audio_samples, spectrogram_view, write_wavs
    from latentdiff.utils.files import staged_dir

    mel = pipe.cfg.mel
    iters = opts.griffin_lim_iters if opts.griffin_lim_iters is not None else mel.griffin_lim_iters
    record = {**record, "griffin_lim_iters": iters}
    waves = uint8_to_waves(images, mel, iters, seed=opts.seed or 0)

    def write(stage=None):
        if stage is not None:
            write_wavs(waves, stage, mel.sample_rate, record)
        if out.suffix.lower() == ".png":
            save_any(spectrogram_view(images), out, used, record, opts, nrow)
        else:
            save_audio_samples(waves, out, mel.sample_rate, used, record, images)
        if opts.spectrograms:
            save_any(spectrogram_view(images), Path(opts.spectrograms), used, record, opts, nrow)

    if opts.save_individual:
        with staged_dir(opts.save_individual) as stage:
            write(stage)
    else:
        write()
    print(f"wrote {len(waves)} sounds to {out} ({len(waves) / seconds:.2f} sounds/s on {pipe.device}, "
          f"{iters} Griffin-Lim iterations)")
