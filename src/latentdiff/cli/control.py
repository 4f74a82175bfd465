"""The control commands of `latentdiff`: edit, inpaint, repair, interpolate, combine.

Inputs are read by :mod:`latentdiff.cli.inputs`. Results are PNGs carrying their provenance in
text chunks.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from latentdiff.cli.inputs import load_image, load_mask, rect_mask, span_mask
from latentdiff.cli.options import (
    NONNEG_INT,
    SEED,
    STRENGTH,
    Bounded,
    Parsed,
    argument,
    command,
    compose,
    device_option,
    exclusive,
    guidance_option,
    model_option,
    out_option,
    runtime_options,
    seed_option,
    steps_option,
    with_namespace,
)
from latentdiff.cli.outputs import provenance_options
from latentdiff.errors import ConfigError, DataError

DEFAULT_MODEL = "pretrained:fashion-mnist"


# --- option types ------------------------------------------------------------------------------


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers such as 0.5,0.5, got {text!r}") from None
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"every weight must be a positive finite number, got {text}")
    return values


def _rect(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected four integers x0,y0,x1,y1, got {text!r}") from None
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ValueError(f"need 0 <= x0 < x1 and 0 <= y0 < y1, got {text}")
    return x0, y0, x1, y1


def _span(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected two numbers START,END in seconds, got {text!r}") from None
    if not (np.isfinite(start) and np.isfinite(end) and 0 <= start < end):
        raise ValueError(f"need 0 <= START < END, got {text}")
    return start, end


def _classes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected K or K1,K2, got {text!r}") from None
    if len(values) > 2 or min(values) < 0:
        raise ValueError(f"expected one or two class indices >= 0, got {text}")
    return values


FRAMES = Bounded(int, 2, 1000, requirement="must be between 2 and 1000")
SCALE = Bounded(int, 1, 16, requirement="must be between 1 and 16")
RESAMPLE = Bounded(int, 0, 100, requirement="must be >= 0 and at most 100")
IMAGE_HELP = ("input image (PNG/JPEG); colour is converted to the model's channels and a different size is resized "
              "if the aspect ratio matches")


def common_options(out_default: str, class_type=NONNEG_INT,
                   class_help: str = "condition on class K (conditional models)"):
    """The options every control command has."""
    return compose(
        model_option(required=False, default=DEFAULT_MODEL),
        out_option(out_default, f"output PNG (default: {out_default})"),
        click.option("--class", "class_", type=class_type, metavar="K", help=class_help),
        click.option("--prompt", metavar="TEXT", help="condition on this text (text models, e.g. pretrained:emoji)"),
        steps_option("sampling steps of the full grid (default: the model's)"),
        guidance_option("classifier-free guidance scale with --class (1 = none; default: the model's)"),
        seed_option(help="random seed; same seed, same result (default: 0)"),
        device_option(),
        runtime_options(),
        provenance_options(),
    )


# --- shared steps ------------------------------------------------------------------------------


def _load_pipe(opts):
    from latentdiff.cli.inputs import load_model

    return load_model(opts)


def _check_out(opts, suffix=".png") -> Path:
    from latentdiff.utils.files import check_output

    return check_output(opts.out, (suffix, ".wav") if suffix == ".png" else (suffix,))


def _request(opts, pipe, n: int, **fields):
    """The command's SampleRequest for `n` images, resolved against the model (every check happens there)."""
    return pipe.request(n, labels=opts.class_, prompt=opts.prompt, guidance=opts.guidance, steps=opts.steps,
                        seed=opts.seed, **fields)


# RePaint draws fresh noise at every step and keeps the known pixels, so a key in its start noise is not
# detectable afterwards (measured: p ≈ 0.97 with half the image regenerated): the regenerated pixels carry the
# decoder mark only, and the record says so.
REPAINT_NOTE = ("noise mark not applied: inpainting draws fresh noise at every step (RePaint), so a keyed start "
                "does not survive; the regenerated pixels carry the decoder mark")
INVERTED_NOTE = "noise mark not applied: frames between inverted images reproduce those images' own noise"


def _key(opts, pipe):
    from latentdiff.cli.outputs import output_key

    return output_key(opts, pipe)


def _meta(opts, pipe, name: str, inputs, request, key, note: str | None = None, noise_mark: bool = True,
          **extra) -> dict:
    """The provenance record: the command, its inputs, the resolved request and the operation's own settings.
    `key`: the watermark key the output was made with (None: --no-watermark); `noise_mark`: whether the operation
    put it into noise it added (SDEdit, seed interpolation: see docs/responsible-generation.md), else `note`
    says why not."""
    from latentdiff.cli.outputs import output_record

    return output_record(opts, pipe, {"command": name, "inputs": [Path(str(p)).name for p in inputs],
                                      **request.to_dict(), **extra}, key, noise_mark=noise_mark,
                         **({"watermark_note": note} if note and not noise_mark else {}))


def _save(img: np.ndarray, out: Path, meta: dict, opts, pipe=None):
    """A PNG through the provenance writer (for an audio model: the spectrogram, low frequencies at the
    bottom), or a WAV from an audio model (the record in its RIFF comment chunk)."""
    from latentdiff.cli.outputs import write_file

    audio = pipe is not None and pipe.cfg.modality == "audio"
    if out.suffix.lower() == ".wav":
        if not audio:
            raise ConfigError(f"--out {out}: a .wav output needs an audio model")
        from latentdiff.codecs.mel import uint8_to_waves
        from latentdiff.utils.audio import write_wav

        wave = uint8_to_waves(img[None], pipe.cfg.mel, seed=meta.get("seed") or 0)[0]
        write_wav(out, wave, pipe.cfg.mel.sample_rate, meta)
    else:
        write_file(out, img[::-1] if audio else img, meta, opts)
    print(f"wrote {out}")


# --- edit, inpaint, repair, combine --------------------------------------------------------------


@command("edit", help="Noise the image's latent to strength·T and denoise it again (SDEdit, Meng et al. 2022): low "
                      "strength keeps the image, strength 1 ignores it. With --class the result is pulled towards "
                      "that class.")
@argument("image", metavar="IMAGE", help=IMAGE_HELP)
@click.option("--strength", type=STRENGTH, default=0.6, metavar="S", help="how much to change, in (0, 1] (default: 0.6)")
@common_options("edited.png")
@with_namespace
def edit(opts):
    from latentdiff.pipeline.control import img2img

    out = _check_out(opts)
    pipe = _load_pipe(opts)
    image, _ = load_image(opts.image, pipe)
    request, key = _request(opts, pipe, len(image)), _key(opts, pipe)
    result = img2img(pipe, image, opts.strength, request, watermark=key)
    _save(result[0], out, _meta(opts, pipe, "edit", [opts.image], request, key, strength=opts.strength), opts, pipe)


@command("inpaint", help="Regenerate the pixels under a mask (RePaint, Lugmayr et al. 2022): at every step the known "
                         "region is replaced by the input noised to the current level. Pixels outside the mask are "
                         "copied from the input unchanged. Give --mask or --rect (audio models: --span, or a "
                         "mask over the spectrogram).")
@argument("image", metavar="IMAGE", help=IMAGE_HELP)
@click.option("--mask", metavar="MASK.png", help="mask image of the input's size; white (>= 128) = regenerate")
@click.option("--rect", type=Parsed("rect", _rect), metavar="x0,y0,x1,y1",
              help="regenerate this rectangle (input pixels, x1 and y1 exclusive)")
@click.option("--span", type=Parsed("span", _span), metavar="START,END",
              help="audio models: regenerate this time span, in seconds (e.g. 0.2,0.5)")
@click.option("--resample", type=RESAMPLE, default=0, metavar="N",
              help="RePaint resampling: redo each step N more times for a better fit (default: 0)")
@common_options("inpainted.png")
@with_namespace
def inpaint(opts):
    from latentdiff.pipeline.inpaint import inpaint as run

    exclusive(click.get_current_context(), "--mask", "--rect", "--span")
    out = _check_out(opts)
    pipe = _load_pipe(opts)
    image, size = load_image(opts.image, pipe)
    hw = pipe.image_shape[1:]
    if opts.span is not None:
        if pipe.cfg.modality != "audio":
            raise ConfigError("--span needs an audio model; use --rect or --mask for images")
        mask = span_mask(opts.span, pipe)
    else:
        mask = load_mask(opts.mask, size, hw) if opts.mask else rect_mask(opts.rect, size, hw)
    if not mask.any():
        raise DataError("the mask is empty: nothing to inpaint (white pixels, >= 128, mark what to regenerate)")
    request, key = _request(opts, pipe, len(image)), _key(opts, pipe)
    result = run(pipe, image, mask, request, resample=opts.resample, watermark=key)
    _save(result[0], out, _meta(opts, pipe, "inpaint", [opts.image] + ([opts.mask] if opts.mask else []), request,
                                key, REPAINT_NOTE, False, rect=opts.rect, span=opts.span, resample=opts.resample),
          opts, pipe)


@command("repair", help="Detect damaged pixels (isolated black/white specks, thin bright or dark lines) unless --mask "
                        "is given, and inpaint them; undamaged pixels are copied unchanged.")
@argument("image", metavar="IMAGE", help=IMAGE_HELP)
@click.option("--mask", metavar="MASK.png", help="mask image of the input's size; white (>= 128) = damaged")
@click.option("--resample", type=RESAMPLE, default=2, metavar="N", help="RePaint resampling (default: 2)")
@common_options("repaired.png")
@with_namespace
def repair(opts):
    from latentdiff.pipeline.inpaint import repair as run

    out = _check_out(opts)
    pipe = _load_pipe(opts)
    image, size = load_image(opts.image, pipe)
    mask = load_mask(opts.mask, size, pipe.image_shape[1:]) if opts.mask else None
    request, key = _request(opts, pipe, len(image)), _key(opts, pipe)
    result, used = run(pipe, image, mask, request, resample=opts.resample, watermark=key)
    _save(result[0], out, _meta(opts, pipe, "repair", [opts.image] + ([opts.mask] if opts.mask else []), request,
                                key, REPAINT_NOTE, False, resample=opts.resample, damaged_pixels=int(used.sum())),
          opts)
    print(f"repaired {int(used.sum())} pixels ({'given mask' if opts.mask else 'detected damage'})")


@command("combine", help="Encode the images, mix their latents with the (normalised) weights, then partially denoise "
                         "the mix (SDEdit at --strength) so that it looks like one image again. Without --class, a "
                         "class-conditional model denoises towards the inputs' own classes (as it classifies them); "
                         "a text model towards --prompt.")
@argument("images", nargs=-1, required=True, metavar="IMAGE...", help="two or more images")
@click.option("--weights", type=Parsed("weights", _weights), metavar="W1,W2,...",
              help="one positive weight per image (default: equal)")
@click.option("--strength", type=STRENGTH, default=0.5, metavar="S",
              help="denoising strength in (0, 1] (default: 0.5)")
@common_options("combined.png")
@with_namespace
def combine(opts):
    from latentdiff.pipeline.control import combine as run

    out = _check_out(opts)
    if len(opts.images) < 2:
        raise ConfigError(f"combine needs at least two images, got {len(opts.images)}")
    weights = opts.weights or [1.0] * len(opts.images)
    if len(weights) != len(opts.images):
        raise ConfigError(f"--weights has {len(weights)} values for {len(opts.images)} images")
    pipe = _load_pipe(opts)
    images = np.concatenate([load_image(p, pipe)[0] for p in opts.images])
    request, key = _request(opts, pipe, 1), _key(opts, pipe)
    result = run(pipe, images, weights, opts.strength, request, watermark=key)
    total = sum(weights)
    _save(result[0], out, _meta(opts, pipe, "combine", opts.images, request, key,
                                weights=[w / total for w in weights], strength=opts.strength), opts)


# --- interpolate ---------------------------------------------------------------------------------


def _seed_of(text: str) -> int:
    """`seed:K` -> K."""
    try:
        return SEED.parse(text[5:])
    except ValueError as e:
        raise ConfigError(f"expected seed:INTEGER with an integer between 0 and 2^63-1, got {text!r} ({e})") from None


def _check_endpoints(*ends: str) -> None:
    """Both ends before the slow inversion of either."""
    for end in ends:
        if end.startswith("seed:"):
            _seed_of(end)
        elif not Path(end).is_file():
            raise DataError(f"image file not found: {end}")


def _endpoint(text: str, pipe, steps, label, prompt=None):
    """`seed:K` -> that seed's starting noise; an image file -> its DDIM inversion. Returns (noise, is_image)."""
    from latentdiff.pipeline.control import invert, seed_noise

    if text.startswith("seed:"):
        return seed_noise(pipe, _seed_of(text)), False
    image, _ = load_image(text, pipe)
    return invert(pipe, image, steps=steps, labels=label, guidance=1.0,
                  **({"prompt": prompt} if prompt is not None else {})), True


def _write_strip(frames, out: Path, gif: Path, meta: dict, scale: int, opts) -> None:
    """The frames as a PNG strip and an animated GIF (both signed, with the record), both or neither."""
    from latentdiff.pipeline.provenance import write_output
    from latentdiff.utils.files import atomic_path
    from latentdiff.utils.images import make_grid

    sign = not getattr(opts, "no_sign", False)
    with atomic_path(gif) as tmp:  # the strip is written inside: a failed write leaves neither file
        write_output(tmp.with_suffix(".gif"), frames, meta, sign=sign, scale=scale)
        tmp.with_suffix(".gif").replace(tmp)
        write_output(out, make_grid(frames, nrow=len(frames)), meta, sign=sign, scale=scale)


@command("interpolate", help="Interpolate between two endpoints, each an image (inverted with deterministic DDIM) or "
                             "seed:K (that seed's starting noise): the noises are interpolated spherically and "
                             "decoded with DDIM. Writes OUT (a strip) and an animated GIF of the same name. "
                             "--guidance applies only when both ends are seeds.")
@argument("a", metavar="A", help="first endpoint: an image file or seed:K")
@argument("b", metavar="B", help="last endpoint: an image file or seed:K")
@click.option("--frames", type=FRAMES, default=8, metavar="N", help="number of frames, >= 2 (default: 8)")
@click.option("--scale", type=SCALE, default=1, metavar="N",
              help="enlarge the strip and GIF N times, up to 16 (default: 1)")
@click.option("--prompt-b", metavar="TEXT", help="text at B, blended frame by frame from --prompt at A (text models)")
@common_options("interpolation.png", class_type=Parsed("classes", _classes),
                class_help="K for both ends, or K1,K2 to blend from class K1 to class K2")
@with_namespace
def interpolate(opts):
    from latentdiff.pipeline.control import interpolate_noise
    from latentdiff.utils.files import check_output

    out = _check_out(opts)
    gif = check_output(out.with_suffix(".gif"))
    _check_endpoints(opts.a, opts.b)
    pipe = _load_pipe(opts)
    classes = opts.class_
    if classes is not None and len(classes) == 1:
        classes = (classes[0], classes[0])
    prompts = None
    if opts.prompt is not None or opts.prompt_b is not None:
        prompts = (opts.prompt or "", opts.prompt_b if opts.prompt_b is not None else opts.prompt)
    # Two seeds: both ends keyed with one pattern, so every frame is (slerp keeps shared signs); an image end
    # brings its own noise, and the frames carry the decoder mark only.
    key, seeds = _key(opts, pipe), opts.a.startswith("seed:") and opts.b.startswith("seed:")
    if key is not None and seeds:
        from latentdiff.pipeline.control import seed_pair_noise

        (na, nb), img_a, img_b = seed_pair_noise(pipe, _seed_of(opts.a), _seed_of(opts.b), key), False, False
    else:
        na, img_a = _endpoint(opts.a, pipe, opts.steps, None if classes is None else classes[0],
                              None if prompts is None else prompts[0])
        nb, img_b = _endpoint(opts.b, pipe, opts.steps, None if classes is None else classes[1],
                              None if prompts is None else prompts[1])
    # An inverted image is only reproduced by the unguided model it was inverted with.
    guidance = 1.0 if (img_a or img_b) else opts.guidance
    if guidance is None:
        guidance = pipe.cfg.sample.guidance
    request = pipe.request(opts.frames, guidance=guidance, steps=opts.steps, seed=opts.seed)
    frames = interpolate_noise(pipe, na, nb, opts.frames, classes=classes, prompts=prompts, request=request,
                               watermark=key)
    meta = _meta(opts, pipe, "interpolate", [p for p in (opts.a, opts.b) if not p.startswith("seed:")], request, key,
                 INVERTED_NOTE, seeds,
                 endpoints=[Path(p).name for p in (opts.a, opts.b)], frames=opts.frames,
                 classes=None if classes is None else list(classes),
                 **({"prompts": list(prompts)} if prompts is not None else {}))
    _write_strip(frames, out, gif, meta, opts.scale, opts)
    print(f"wrote {out} and {gif} ({len(frames)} frames)")
