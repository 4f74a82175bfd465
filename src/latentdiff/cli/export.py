"""`latentdiff export onnx|diffusers MODEL OUT/`: the model in portable formats (extras `onnx` and `export`)."""

from __future__ import annotations

import json

import click

from latentdiff.cli.options import Bounded, argument, command, with_namespace

MODEL_HELP = "a model directory or pretrained:NAME"


def _load(model: str):
    from latentdiff.pipeline import LatentDiffusion

    return LatentDiffusion.load(model, "cpu")


def _out_dir(out: str):
    from pathlib import Path

    from latentdiff.errors import ConfigError

    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not an empty folder; give a new folder for the export")
    return path


@command("onnx", help="Export the U-Net, the decoder and the encoder as ONNX graphs (dynamo exporter, opset 18, "
                      "dynamic batch) plus a config.json describing inputs, outputs and the schedule; each graph is "
                      "checked against PyTorch on random inputs and the export fails if they differ beyond "
                      "--tolerance. Sample from it with `latentdiff sample --model OUT --runtime onnx`.")
@argument("model", metavar="MODEL", help=MODEL_HELP)
@argument("out", metavar="OUT", help="a new (or empty) folder for the export")
@click.option("--tolerance", type=Bounded(float, 0, 1, open_low=True, requirement="must be in (0, 1]"),
              default=1e-4, metavar="TOL", help="parity tolerance: max |onnx - torch| <= TOL · max(1, max |torch|) "
                                                "(default: 1e-4)")
@with_namespace
def onnx(opts):
    from latentdiff.export import export_onnx

    out = _out_dir(opts.out)
    result = export_onnx(_load(opts.model), out, tolerance=opts.tolerance)
    errors = ", ".join(f"{k} {v:.2g}" for k, v in result["max_abs_error"].items())
    print(f"wrote {', '.join(result['files'])} to {out} in {result['export_seconds']:.0f} s "
          f"(opset {result['opset']}; max |onnx - torch|: {errors})")


@command("diffusers", help="Write a folder in the diffusers layout: unet/ (UNet2DModel), scheduler/ (DDIMScheduler "
                           "with our schedule and parameterisation), vae/ (our decoder as a custom component: the "
                           "codec does not map exactly onto AutoencoderKL, see docs/benchmarks.md), model_index.json "
                           "and pipeline.py (class-conditional, with classifier-free guidance). Load it with "
                           "DiffusionPipeline.from_pretrained(OUT, custom_pipeline=OUT, trust_remote_code=True).")
@argument("model", metavar="MODEL", help=MODEL_HELP)
@argument("out", metavar="OUT", help="a new (or empty) folder for the export")
@with_namespace
def diffusers(opts):
    from latentdiff.export import export_diffusers

    out = _out_dir(opts.out)
    result = export_diffusers(_load(opts.model), out)
    print(json.dumps(result, indent=2, default=str))


@click.group("export", context_settings={"help_option_names": ["-h", "--help"]})
def export():
    """Export a model for portable inference: `onnx` (ONNX Runtime) or `diffusers` (a diffusers folder)."""


export.add_command(onnx)
export.add_command(diffusers)
