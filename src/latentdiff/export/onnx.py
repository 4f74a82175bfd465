"""Export a LatentDiffusion's networks to ONNX (torch.onnx's dynamo exporter) and check them against PyTorch.

OUT/ holds ``unet.onnx`` (x_t, t[, class labels][, text context and its padding mask] -> the network output), ``decoder.onnx`` (unscaled latent ->
image in [-1, 1], not clamped), ``encoder.onnx`` (image -> posterior mean and log-variance stacked on channels) and
``config.json``: the model's own config.json plus an "onnx" entry describing each graph's inputs and outputs, the
noise schedule (ᾱ_t for every t, so a runtime without latentdiff can sample) and the parity measured at export.
Every graph has a dynamic batch dimension, and a text model's context a dynamic token count; the image size is
fixed, as it is for the model. The text encoder is not in the graphs: the runtime encodes prompts with the model's
own encoder (frozen MiniLM states, or byte token ids that the U-Net's own token encoder, inside the graph, embeds).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdiff.errors import ConfigError, ModelError
from latentdiff.export.runtime import ONNX_FORMAT, ONNX_FORMAT_VERSION, open_session
from latentdiff.models.unet import UNet
from latentdiff.pipeline.model import LatentDiffusion
from latentdiff.utils.files import write_text_atomic

OPSET = 18
# Float32 kernels of ONNX Runtime and PyTorch sum in different orders: measured differences are ~1e-6 of the
# output scale. The check is max |onnx - torch| <= tolerance · max(1, max |torch|), per graph.
DEFAULT_TOLERANCE = 1e-4
PARITY_BATCH = 3  # differs from the export example's batch (2), so the check also exercises the dynamic batch
EXPORT_TOKENS, PARITY_TOKENS = 5, 9  # likewise for a text model's token count


class _Decode(nn.Module):
    """The decoder at the model's one image size (its `sizes` argument becomes a constant of the graph)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.decoder = autoencoder.decoder
        self.sizes = autoencoder.upsample_sizes()

    def forward(self, z):
        return self.decoder(z, self.sizes)


def _graphs(pipe: LatentDiffusion) -> dict[str, tuple[nn.Module, list[dict], dict]]:
    """name -> (module, input specs, output spec). Shapes name the batch "batch"; dtypes are numpy names."""
    c, h, w = pipe.autoencoder.latent_shape
    img = list(pipe.image_shape)
    unet_in = [{"name": "sample", "shape": ["batch", c, h, w], "dtype": "float32", "meaning": "x_t (normalised)"},
               {"name": "timestep", "shape": ["batch"], "dtype": "float32", "meaning": "t in 0…T-1"}]
    if pipe.num_classes:
        unet_in.append({"name": "class_labels", "shape": ["batch"], "dtype": "int64",
                        "meaning": f"class 0…{pipe.num_classes - 1}, or {pipe.num_classes} for none (null label)"})
    if pipe.has_text:
        unet_in += _text_inputs(pipe.cfg)
    unet_out = {"name": "out", "shape": ["batch", c, h, w], "dtype": "float32",
                "meaning": f"{pipe.cfg.diffusion.prediction}-prediction"}
    dec_in = [{"name": "latent", "shape": ["batch", c, h, w], "dtype": "float32",
               "meaning": "unnormalised latent: z0 / scale + shift, per channel"}]
    dec_out = {"name": "image", "shape": ["batch", *img], "dtype": "float32", "meaning": "image in [-1, 1], unclamped"}
    enc_in = [{"name": "image", "shape": ["batch", *img], "dtype": "float32", "meaning": "image in [-1, 1]"}]
    enc_out = {"name": "moments", "shape": ["batch", 2 * c, h, w], "dtype": "float32",
               "meaning": "posterior mean and log-variance of the unscaled latent, stacked on channels"}
    return {"unet": (pipe.denoiser.net, unet_in, unet_out), "decoder": (_Decode(pipe.autoencoder), dec_in, dec_out),
            "encoder": (pipe.autoencoder.encoder, enc_in, enc_out)}


def _text_inputs(cfg) -> list[dict]:
    """The U-Net's text inputs: MiniLM states (float) or byte token ids (int64), and the padding mask."""
    from latentdiff.models.text import BYTE_VOCAB

    states = cfg.text.token_layers == 0
    context = ({"name": "encoder_hidden_states", "shape": ["batch", "tokens", cfg.unet.context_dim], "dtype": "float32",
                "meaning": f"the prompt's {cfg.text.encoder} token states (the empty prompt's for none)"} if states else
               {"name": "encoder_hidden_states", "shape": ["batch", "tokens"], "dtype": "int64",
                "meaning": f"byte token ids 0…{BYTE_VOCAB - 1} (0 padding, 1 start, 2 + byte) of the prompt"})
    mask = {"name": "encoder_attention_mask", "shape": ["batch", "tokens"], "dtype": "bool",
            "meaning": "True for real tokens, False for padding"}
    return [context, mask]


def _example(specs: list[dict], batch: int, num_classes: int, T: int, generator: torch.Generator,
             tokens: int = EXPORT_TOKENS) -> tuple:
    """Random inputs following `specs`: normal floats, timesteps in 0…T-1, labels including the null label, and for
    text a context whose first row is partly padding."""
    out = []
    for s in specs:
        shape = [batch if d == "batch" else tokens if d == "tokens" else d for d in s["shape"]]
        if s["name"] == "timestep":
            out.append(torch.randint(0, T, shape, generator=generator).float())
        elif s["name"] == "class_labels":
            out.append(torch.randint(0, num_classes + 1, shape, generator=generator))
        elif s["name"] == "encoder_attention_mask":
            mask = torch.ones(shape, dtype=torch.bool)
            mask[0, max(1, tokens // 2):] = False
            out.append(mask)
        elif s["dtype"] == "int64":  # byte token ids
            out.append(torch.randint(1, 258, shape, generator=generator))
        else:
            out.append(torch.randn(shape, generator=generator))
    return tuple(out)


def _forward_args(module: nn.Module, specs: list[dict], args: tuple) -> dict:
    """The graph inputs as keyword arguments of `module.forward` (the U-Net's are named after UNet.forward's)."""
    names = {"sample": "x", "timestep": "t", "class_labels": "labels", "encoder_hidden_states": "context",
             "encoder_attention_mask": "context_mask"}
    if isinstance(module, UNet):
        return {names[s["name"]]: a for s, a in zip(specs, args)}
    import inspect

    return dict(zip(inspect.signature(module.forward).parameters, args))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs progress and warns about optional torchvision ops; the user needs neither."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_graph(module: nn.Module, args: tuple, specs: list[dict], out: dict, path: Path):
    kwargs = _forward_args(module, specs, args)
    dims = {"batch": torch.export.Dim("batch"), "tokens": torch.export.Dim("tokens", min=1, max=512)}
    dynamic = {p: {i: dims[d] for i, d in enumerate(s["shape"]) if d in dims} for p, s in zip(kwargs, specs)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _quiet_exporter():
            torch.onnx.export(module, (), str(tmp), kwargs=kwargs, dynamo=True, opset_version=OPSET, external_data=False,
                              input_names=[s["name"] for s in specs], output_names=[out["name"]],
                              dynamic_shapes=dynamic, verbose=False)
        tmp.replace(path)  # atomic: a half-written graph never carries the final name
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise
        raise ModelError(f"ONNX export of {path.stem} failed: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None


def export_onnx(pipe: LatentDiffusion, out_dir: str | Path, *, check: bool = True,
                tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write OUT/{unet,decoder,encoder}.onnx and config.json (see the module docstring); with `check`, compare each
    graph with PyTorch on random inputs and raise ModelError when max |onnx - torch| exceeds
    tolerance · max(1, max |torch|). Returns a summary: files, opset, seconds, the measured errors."""
    if not tolerance > 0:
        raise ConfigError(f"tolerance must be > 0, got {tolerance}")
    try:
        import onnx  # noqa: F401 - the exporter needs onnx and onnxscript; fail with one line, not deep inside
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxscript, which are not installed; "
                          "install the optional extra: pip install 'latentdiff[onnx]'") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe.to("cpu").eval()
    gen = torch.Generator().manual_seed(0)
    T = pipe.denoiser.schedule.num_steps
    start = time.perf_counter()
    graphs = _graphs(pipe)
    for name, (module, specs, out) in graphs.items():
        with torch.no_grad():
            _export_graph(module, _example(specs, 2, pipe.num_classes, T, gen), specs, out, out_dir / f"{name}.onnx")
    seconds = time.perf_counter() - start
    errors = check_parity(pipe, out_dir, tolerance=tolerance) if check else {}
    meta = json.loads((pipe.directory / "config.json").read_text(encoding="utf-8")) if pipe.directory else None
    meta = _model_meta(pipe, meta)
    meta["onnx"] = {
        "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "opset": OPSET,
        "graphs": {name: {"file": f"{name}.onnx", "inputs": specs, "outputs": [out]}
                   for name, (_, specs, out) in graphs.items()},
        "schedule": _schedule_entry(pipe),
        "latent": {"shape": list(pipe.autoencoder.latent_shape), "latent_stats": pipe.autoencoder.latent_stats(),
                   "decode": "per channel: image = decoder(z0 / scale + shift); z0 = (mean(encoder(image)) - shift) "
                             "· scale"},
        "parity": {"checked": bool(check), "tolerance": tolerance, "max_abs_error": errors,
                   "rule": "max |onnx - torch| <= tolerance * max(1, max |torch|)"},
    }
    write_text_atomic(out_dir / "config.json", json.dumps(meta, indent=2))
    return {"dir": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir() if p.suffix in (".onnx", ".json")),
            "opset": OPSET, "export_seconds": round(seconds, 2), "max_abs_error": errors, "tolerance": tolerance}


def _model_meta(pipe: LatentDiffusion, meta: dict | None) -> dict:
    """The model's config.json content (from its directory, or rebuilt as ``save`` writes it)."""
    if meta is None:
        meta = {"format_version": 1, "config": pipe.cfg.to_dict(), "image_size": list(pipe.autoencoder.image_size),
                "class_names": list(pipe.class_names)}
    meta["latent_stats"] = pipe.autoencoder.latent_stats()
    meta.pop("scale_factor", None)  # written by models from before per-channel statistics
    return meta


def _schedule_entry(pipe: LatentDiffusion) -> dict:
    d = pipe.cfg.diffusion
    return {"kind": d.schedule, "num_train_steps": d.num_train_steps, "beta_start": d.beta_start,
            "beta_end": d.beta_end, "zero_terminal_snr": d.zero_terminal_snr, "prediction": d.prediction,
            "alphas_cumprod": [float(a) for a in pipe.denoiser.schedule.alpha_bar],
            "sampler_default": pipe.cfg.sample.sampler, "steps_default": pipe.cfg.sample.steps,
            "guidance_default": pipe.cfg.sample.guidance}


def check_parity(pipe: LatentDiffusion, out_dir: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                 threads: int | None = None) -> dict[str, float]:
    """Run each exported graph and its PyTorch module on the same random batch; ModelError past the tolerance."""
    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(1)
    errors = {}
    for name, (module, specs, _) in _graphs(pipe.to("cpu").eval()).items():
        args = _example(specs, PARITY_BATCH, pipe.num_classes, pipe.denoiser.schedule.num_steps, gen, PARITY_TOKENS)
        with torch.no_grad():
            ref = module(**_forward_args(module, specs, args)).float().numpy()
        session = open_session(out_dir / f"{name}.onnx", threads)
        feed = {s["name"]: a.numpy().astype(s["dtype"]) for s, a in zip(specs, args)}
        got = session.run(None, feed)[0]
        err = float(np.abs(got - ref).max())
        errors[name] = err
        if not err <= tolerance * max(1.0, float(np.abs(ref).max())):
            raise ModelError(f"ONNX parity check failed for {name}: max |onnx - torch| = {err:.3g} exceeds "
                             f"the tolerance {tolerance:g} (times max(1, max |torch|) = "
                             f"{max(1.0, float(np.abs(ref).max())):.3g})")
    return errors
