"""The control subcommands of `latentdiff`: edit, inpaint, repair, interpolate, combine.

Inputs are image files (any size with the model's aspect ratio; colour is converted to the
model's channels), masks are image files of the input's size (white = regenerate) or a
rectangle. Results are PNGs carrying their provenance in text chunks. Added to the parser by
``cli.build_parser`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from latentdiff.cli.main import _seed, bounded, one_line
from latentdiff.errors import ConfigError, DataError

# torch and the pipeline are imported inside the commands: `register` runs for every `latentdiff`
# invocation, and `latentdiff --help` should not wait for torch.

DEFAULT_MODEL = "pretrained:fashion-mnist"


# --- option types ------------------------------------------------------------------------------


_strength = bounded(float, 0, 1, open_low=True, requirement="must be in (0, 1]")
_frames = bounded(int, 2, 1000, requirement="must be between 2 and 1000")
_scale = bounded(int, 1, 16, requirement="must be between 1 and 16")
_resample = bounded(int, 0, 100, requirement="must be >= 0 and at most 100")


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5, got {text!r}") from None
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every weight must be a positive finite number, got {text}")
    return values


def _rect(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four integers x0,y0,x1,y1, got {text!r}") from None
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise argparse.ArgumentTypeError(f"need 0 <= x0 < x1 and 0 <= y0 < y1, got {text}")
    return x0, y0, x1, y1


def _classes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K1,K2, got {text!r}") from None
    if len(values) > 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected one or two class indices >= 0, got {text}")
    return values


# --- input files -------------------------------------------------------------------------------


def _warn(message: str):
    sys.stderr.write(f"latentdiff: warning: {one_line(message)}\n")


def load_image(path: str | Path, pipe) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file -> (uint8 1×H×W×C in the model's shape, the file's own (width, height)).

    Colour mode is converted to the model's channels (RGB -> L by ITU-R 601 luma, L -> RGB by
    repetition, alpha dropped). A different size is resized only if the aspect ratio is the same.
    """
    from PIL import Image

    from latentdiff.data import as_mode, open_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    c, h, w = pipe.image_shape
    im = as_mode(open_image(path), c)
    size = im.size
    if size != (w, h):
        if size[0] * h != size[1] * w:
            raise DataError(f"{path} is {size[0]}×{size[1]} but the model works on {w}×{h} images; the aspect "
                            f"ratio differs, so crop it to {w}:{h} first")
        _warn(f"resized {path.name} from {size[0]}×{size[1]} to {w}×{h}")
        im = im.resize((w, h), Image.Resampling.LANCZOS)
    return np.array(im, dtype=np.uint8).reshape(1, h, w, c), size  # a writable copy for torch


def load_mask(path: str | Path, image_size: tuple[int, int], model_hw: tuple[int, int]) -> np.ndarray:
    """A mask file of the input image's size (white, >= 128, = regenerate) -> bool H×W at the model's size.

    When the image was resized, the mask is box-filtered to the model's size and any coverage
    counts, so that resizing never shrinks the hole.
    """

    from latentdiff.data import as_mode, open_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file not found: {path}")
    im = as_mode(open_image(path), 1)
    if im.size != image_size:
        raise DataError(f"the mask {path} is {im.size[0]}×{im.size[1]} but the image is "
                        f"{image_size[0]}×{image_size[1]}; they must be the same size")
    return _resize_mask(np.asarray(im) >= 128, model_hw)


def rect_mask(rect: tuple[int, int, int, int], image_size: tuple[int, int], model_hw: tuple[int, int]) -> np.ndarray:
    """x0,y0,x1,y1 (x1, y1 exclusive) in the input image's pixels -> bool H×W at the model's size."""
    x0, y0, x1, y1 = rect
    w, h = image_size
    if x1 > w or y1 > h:
        raise ConfigError(f"--rect {x0},{y0},{x1},{y1} reaches outside the {w}×{h} image")
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return _resize_mask(mask, model_hw)


def _resize_mask(mask: np.ndarray, model_hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if mask.shape == tuple(model_hw):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize(model_hw[::-1], Image.Resampling.BOX)
    return np.asarray(im) > 0


# --- commands ----------------------------------------------------------------------------------


def _load_pipe(args):
    from latentdiff.pipeline.model import LatentDiffusion, resolve_device

    return LatentDiffusion.load(args.model, resolve_device(args.device))


def _check_out(args, suffix=".png") -> Path:
    from latentdiff.utils.files import check_output

    return check_output(args.out, (suffix,))


def _meta(args, command: str, inputs, **extra) -> dict:
    from latentdiff import __version__

    info = {"command": command, "model": str(args.model), "inputs": [Path(str(p)).name for p in inputs],
            "seed": args.seed, "steps": args.steps, "guidance": args.guidance, "class": args.class_,
            **extra, "synthetic": True}
    return {"Software": f"latentdiff {__version__}", "latentdiff": info}


def _save(img: np.ndarray, out: Path, meta: dict):
    from latentdiff.utils.images import save_png

    save_png(img, out, meta)
    print(f"wrote {out}")


def cmd_edit(args):
    from latentdiff.pipeline.control import img2img

    out = _check_out(args)
    pipe = _load_pipe(args)
    image, _ = load_image(args.image, pipe)
    result = img2img(pipe, image, args.strength, label=args.class_, guidance=args.guidance, steps=args.steps,
                     seed=args.seed)
    _save(result[0], out, _meta(args, "edit", [args.image], strength=args.strength))


def cmd_inpaint(args):
    from latentdiff.pipeline.control import inpaint

    out = _check_out(args)
    pipe = _load_pipe(args)
    image, size = load_image(args.image, pipe)
    hw = pipe.image_shape[1:]
    mask = load_mask(args.mask, size, hw) if args.mask else rect_mask(args.rect, size, hw)
    if not mask.any():
        raise DataError("the mask is empty: nothing to inpaint (white pixels, >= 128, mark what to regenerate)")
    result = inpaint(pipe, image, mask, steps=args.steps, resample=args.resample, seed=args.seed,
                     label=args.class_, guidance=args.guidance)
    _save(result[0], out, _meta(args, "inpaint", [args.image] + ([args.mask] if args.mask else []),
                                rect=args.rect, resample=args.resample))


def cmd_repair(args):
    from latentdiff.pipeline.control import repair

    out = _check_out(args)
    pipe = _load_pipe(args)
    image, size = load_image(args.image, pipe)
    mask = load_mask(args.mask, size, pipe.image_shape[1:]) if args.mask else None
    result, used = repair(pipe, image, mask, steps=args.steps, resample=args.resample, seed=args.seed,
                          label=args.class_, guidance=args.guidance)
    _save(result[0], out, _meta(args, "repair", [args.image] + ([args.mask] if args.mask else []),
                                resample=args.resample, damaged_pixels=int(used.sum())))
    print(f"repaired {int(used.sum())} pixels ({'given mask' if args.mask else 'detected damage'})")


def _seed_of(text: str) -> int:
    """`seed:K` -> K."""
    try:
        return _seed(text[5:])
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"expected seed:INTEGER with an integer between 0 and 2^63-1, got {text!r} ({e})") from None


def _endpoint(text: str, pipe, steps, label):
    """`seed:K` -> that seed's starting noise; an image file -> its DDIM inversion. Returns (noise, is_image)."""
    from latentdiff.pipeline.control import invert, seed_noise

    if text.startswith("seed:"):
        return seed_noise(pipe, _seed_of(text)), False
    image, _ = load_image(text, pipe)
    return invert(pipe, image, steps=steps, label=label), True


def cmd_interpolate(args):
    from PIL import Image

    from latentdiff.pipeline.control import interpolate_noise
    from latentdiff.utils.files import atomic_path, check_output
    from latentdiff.utils.images import make_grid, save_png, to_pil

    out = _check_out(args)
    gif = check_output(out.with_suffix(".gif"))
    for end in (args.a, args.b):  # check both ends before the slow inversion of either
        if end.startswith("seed:"):
            _seed_of(end)
        elif not Path(end).is_file():
            raise DataError(f"image file not found: {end}")
    pipe = _load_pipe(args)
    classes = args.class_
    if classes is not None and len(classes) == 1:
        classes = (classes[0], classes[0])
    na, img_a = _endpoint(args.a, pipe, args.steps, None if classes is None else classes[0])
    nb, img_b = _endpoint(args.b, pipe, args.steps, None if classes is None else classes[1])
    # An inverted image is only reproduced by the unguided model it was inverted with.
    guidance = 1.0 if (img_a or img_b) else args.guidance
    if guidance is None:
        guidance = pipe.cfg.sample.guidance
    frames = interpolate_noise(pipe, na, nb, args.frames, label=classes, guidance=guidance, steps=args.steps)
    meta = _meta(args, "interpolate", [p for p in (args.a, args.b) if not p.startswith("seed:")],
                 endpoints=[Path(p).name for p in (args.a, args.b)], frames=args.frames, guidance_used=guidance)
    meta["latentdiff"]["class"] = None if classes is None else list(classes)
    pils = [to_pil(f) for f in frames]
    if args.scale > 1:
        pils = [p.resize((p.width * args.scale, p.height * args.scale), Image.NEAREST) for p in pils]
    with atomic_path(gif) as tmp:  # the strip is written inside: a failed write leaves neither file
        pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:], duration=100, loop=0)
        save_png(make_grid(frames, nrow=len(frames)), out, meta, scale=args.scale)
    print(f"wrote {out} and {gif} ({len(frames)} frames)")


def cmd_combine(args):
    from latentdiff.pipeline.control import combine

    out = _check_out(args)
    if len(args.images) < 2:
        raise ConfigError(f"combine needs at least two images, got {len(args.images)}")
    weights = args.weights or [1.0] * len(args.images)
    if len(weights) != len(args.images):
        raise ConfigError(f"--weights has {len(weights)} values for {len(args.images)} images")
    pipe = _load_pipe(args)
    images = np.concatenate([load_image(p, pipe)[0] for p in args.images])
    result = combine(pipe, images, weights, args.strength, label=args.class_, guidance=args.guidance,
                     steps=args.steps, seed=args.seed)
    total = sum(weights)
    _save(result[0], out, _meta(args, "combine", args.images, weights=[w / total for w in weights],
                                strength=args.strength))


# --- the parser ----------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the edit, inpaint, repair, interpolate and combine subcommands to the `latentdiff` parser."""
    from latentdiff.cli.main import _nonneg_float, _nonneg_int, _positive_int

    def common(p, out_default: str, class_type=_nonneg_int, class_help="condition on class K (conditional models)"):
        p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR",
                       help=f"a model directory or pretrained:NAME (default: {DEFAULT_MODEL})")
        p.add_argument("--out", default=out_default, help=f"output PNG (default: {out_default})")
        p.add_argument("--class", dest="class_", type=class_type, metavar="K", help=class_help)
        p.add_argument("--steps", type=_positive_int, help="sampling steps of the full grid (default: the model's)")
        p.add_argument("--guidance", type=_nonneg_float,
                       help="classifier-free guidance scale with --class (1 = none; default: the model's)")
        p.add_argument("--seed", type=_seed, default=0, help="random seed; same seed, same result (default: 0)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")

    image_help = ("input image (PNG/JPEG); colour is converted to the model's channels and a different size "
                  "is resized if the aspect ratio matches")

    p = subparsers.add_parser(
        "edit", help="re-imagine an image, keeping its layout (SDEdit)",
        description="Noise the image's latent to strength·T and denoise it again (SDEdit, Meng et al. 2022): "
                    "low strength keeps the image, strength 1 ignores it. With --class the result is pulled "
                    "towards that class.")
    p.add_argument("image", help=image_help)
    p.add_argument("--strength", type=_strength, default=0.6, help="how much to change, in (0, 1] (default: 0.6)")
    common(p, "edited.png")
    p.set_defaults(func=cmd_edit)

    p = subparsers.add_parser(
        "inpaint", help="regenerate a masked region of an image, keep the rest",
        description="Regenerate the pixels under a mask (RePaint, Lugmayr et al. 2022): at every step the known "
                    "region is replaced by the input noised to the current level. Pixels outside the mask are "
                    "copied from the input unchanged.")
    p.add_argument("image", help=image_help)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", metavar="MASK.png", help="mask image of the input's size; white (>= 128) = regenerate")
    where.add_argument("--rect", type=_rect, metavar="x0,y0,x1,y1",
                       help="regenerate this rectangle (input pixels, x1 and y1 exclusive)")
    p.add_argument("--resample", type=_resample, default=0, metavar="N",
                   help="RePaint resampling: redo each step N more times for a better fit (default: 0)")
    common(p, "inpainted.png")
    p.set_defaults(func=cmd_inpaint)

    p = subparsers.add_parser(
        "repair", help="remove salt-and-pepper noise and scratches (or a given mask) by inpainting",
        description="Detect damaged pixels (isolated black/white specks, thin bright or dark lines) unless "
                    "--mask is given, and inpaint them; undamaged pixels are copied unchanged.")
    p.add_argument("image", help=image_help)
    p.add_argument("--mask", metavar="MASK.png", help="mask image of the input's size; white (>= 128) = damaged")
    p.add_argument("--resample", type=_resample, default=2, metavar="N", help="RePaint resampling (default: 2)")
    common(p, "repaired.png")
    p.set_defaults(func=cmd_repair)

    p = subparsers.add_parser(
        "interpolate", help="a strip and animated GIF morphing from A to B",
        description="Interpolate between two endpoints, each an image (inverted with deterministic DDIM) or "
                    "seed:K (that seed's starting noise): the noises are interpolated spherically and decoded "
                    "with DDIM. Writes OUT (a strip) and an animated GIF of the same name. --guidance applies "
                    "only when both ends are seeds.")
    p.add_argument("a", help="first endpoint: an image file or seed:K")
    p.add_argument("b", help="last endpoint: an image file or seed:K")
    p.add_argument("--frames", type=_frames, default=8, help="number of frames, >= 2 (default: 8)")
    p.add_argument("--scale", type=_scale, default=1, help="enlarge the strip and GIF N times, up to 16 (default: 1)")
    common(p, "interpolation.png", class_type=_classes,
           class_help="K for both ends, or K1,K2 to blend from class K1 to class K2")
    p.set_defaults(func=cmd_interpolate)

    p = subparsers.add_parser(
        "combine", help="mix several images into one",
        description="Encode the images, mix their latents with the (normalised) weights, then partially "
                    "denoise the mix (SDEdit at --strength) so that it looks like one image again.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="two or more images")
    p.add_argument("--weights", type=_weights, metavar="W1,W2,...", help="one positive weight per image "
                   "(default: equal)")
    p.add_argument("--strength", type=_strength, default=0.5, help="denoising strength in (0, 1] (default: 0.5)")
    common(p, "combined.png")
    p.set_defaults(func=cmd_combine)
