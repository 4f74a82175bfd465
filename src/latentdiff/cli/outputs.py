"""Every image file the CLI writes goes through here: the provenance record, the watermark key, the signature.

Defaults are on: outputs are watermarked (the key in generation) and C2PA-signed when the `provenance` extra is
installed; `--no-watermark` / `--no-sign` turn them off, and the record says so.
"""

from __future__ import annotations

import sys

import click

from latentdiff.cli.options import compose


def provenance_options():
    return compose(
        click.option("--no-watermark", is_flag=True,
                     help="do not put the invisible watermark into the images (recorded in the metadata)"),
        click.option("--no-sign", is_flag=True, help="do not sign PNG/GIF outputs with a C2PA manifest"),
    )


def output_key(opts, pipe):
    """The watermark key for generation, or None (--no-watermark, or a runtime without the z_T seam)."""
    from latentdiff.pipeline.keys import watermark_key

    if getattr(opts, "no_watermark", False) or not hasattr(pipe, "initial_noise"):
        return None
    return watermark_key()


def output_record(opts, pipe, request: dict, key, **extra) -> dict:
    """The provenance record of this command's outputs (one line on stderr when signing is unavailable)."""
    from latentdiff.pipeline.provenance import c2pa_available, generation_record

    sign = not getattr(opts, "no_sign", False)
    if sign and not c2pa_available():
        sys.stderr.write("latentdiff: note: outputs carry the record and the watermark but no C2PA signature "
                         "(pip install 'latentdiff[provenance]')\n")
    if getattr(opts, "no_watermark", False):
        extra.pop("watermark_note", None)  # the user's choice is what the record says
    return generation_record(pipe, opts.model, request, key, sign=sign, **extra)


def write_file(path, image, record: dict, opts, scale: int = 1):
    from latentdiff.pipeline.provenance import write_output

    write_output(path, image, record, sign=not getattr(opts, "no_sign", False), scale=scale)


def save_any(images, out, labels, record: dict, opts, nrow=None, scale: int = 2):
    """`.png`: a signed grid with the record; `.npz`: the arrays (the watermark is in the pixels)."""
    from latentdiff.utils.images import make_grid, save_samples

    if out.suffix.lower() == ".png":
        write_file(out, make_grid(images, nrow), {**record, "grid": {"n": len(images), "nrow": nrow,
                                                                      "pad": 2, "scale": scale}}, opts, scale)
    else:
        save_samples(images, out, labels)
