"""ONNX Runtime stand-ins for the networks, so that ``LatentDiffusion.generate`` and every sampler and guidance
wrapper run unchanged: the U-Net is replaced at the network level (``net(x_t, t, labels)``, the call the Denoiser
makes) and the codec's encoder and decoder by modules with the same call signatures. numpy goes in, torch comes out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdiff.codecs.autoencoder import Autoencoder
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.errors import ConfigError, ModelError
from latentdiff.pipeline.config import Config
from latentdiff.pipeline.directory import read_metadata
from latentdiff.pipeline.model import LatentDiffusion, build_schedule

ONNX_FORMAT = "latentdiff-onnx"
ONNX_FORMAT_VERSION = 2  # 2: text models (the U-Net takes encoder_hidden_states and encoder_attention_mask)
EXTRA_HINT = "install the optional extra: pip install 'latentdiff[onnx]'"


def require_onnxruntime():
    """The onnxruntime module, or one clear error line saying how to get it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"the ONNX runtime needs onnxruntime, which is not installed; {EXTRA_HINT}") from None
    return onnxruntime


def open_session(path: Path, threads: int | None = None):
    """An InferenceSession on the CPU; `threads` sets the intra-op thread count (None: ONNX Runtime's default)."""
    ort = require_onnxruntime()
    if threads is not None and not 1 <= threads <= 1024:
        raise ConfigError(f"threads must be between 1 and 1024, got {threads}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's warnings are about graph rewrites, not the user's input
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad file
        raise ModelError(f"{path} could not be loaded by ONNX Runtime: {str(e).splitlines()[0][:200]}") from None


class OrtModule(nn.Module):
    """One ONNX graph behind an nn.Module: positional tensors -> the graph's inputs (in order), first output back.

    It holds an empty parameter so that code asking a module for its device (``next(parameters()).device``) works.
    Gradients cannot flow through ONNX Runtime, so a call that needs them is refused with one clear line.
    """

    def __init__(self, session, dtypes: tuple[np.dtype, ...]):
        super().__init__()
        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.dtypes = dtypes
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise ConfigError("this needs gradients through a network, which ONNX Runtime does not compute "
                              "(classifier or objective guidance); use the PyTorch runtime")
        feed = {n: np.ascontiguousarray(t.detach().cpu().numpy().astype(d, copy=False))
                for n, t, d in zip(self.names, tensors, self.dtypes)}
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(out).to(tensors[0].device)


class OrtUNet(OrtModule):
    """The U-Net contract ``net(x_t, t, labels=None, context=None, context_mask=None) -> output`` over an ONNX graph;
    ``cfg`` is the UNetConfig."""

    def __init__(self, session, cfg):
        self.conditional, self.text = bool(cfg.num_classes), bool(cfg.context_dim)
        dtypes = [np.float32, np.float32] + [np.int64] * self.conditional
        if self.text:  # states (frozen encoder) or byte token ids (the graph holds the token encoder)
            dtypes += [np.int64 if cfg.token_layers else np.float32, np.bool_]
        super().__init__(session, tuple(dtypes))
        self.cfg = cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The exported U-Net with UNet.forward's signature (the fields of a Cond) and its checks."""
        if x.shape[1] != self.cfg.in_channels:
            raise ConfigError(f"U-Net expects {self.cfg.in_channels} input channels, got {x.shape[1]}")
        if context is not None and not self.text:
            raise ConfigError("this model takes no text (it was trained without a text encoder)")
        if context is None and self.text:
            raise ConfigError("this text-conditioned U-Net needs a text context (the empty prompt's for none)")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # a scalar t counts for the batch
        inputs = [x, t]
        if self.conditional:
            if labels is None:  # unconditional request on a conditional model: the null label, as in UNet.forward
                labels = torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
            inputs.append(labels)
        if self.text:
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
            inputs += [context, context_mask]
        return self.run(*inputs)


class OrtDecoder(OrtModule):
    """``decoder(z, sizes)``: the graph was exported for the model's one image size, so `sizes` is fixed."""

    def __init__(self, session):
        super().__init__(session, (np.float32,))

    def forward(self, z: torch.Tensor, sizes=None) -> torch.Tensor:
        return self.run(z)


class OrtEncoder(OrtModule):
    def __init__(self, session):
        super().__init__(session, (np.float32,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class OnnxLatentDiffusion(LatentDiffusion):
    """A LatentDiffusion whose networks run in ONNX Runtime. What needs PyTorch's autograd or compiler is refused."""

    def load_classifier(self, path=None):
        raise ConfigError("classifier guidance needs gradients, which ONNX Runtime does not compute; "
                          "use the PyTorch runtime for --classifier-scale")

    def compiled_denoiser(self, mode=True):
        raise ConfigError("--compile applies to the PyTorch runtime, not to ONNX Runtime")

    def to(self, device) -> OnnxLatentDiffusion:
        if torch.device(device).type != "cpu":
            raise ConfigError("the ONNX runtime runs on the CPU here; use --device cpu")
        return super().to(device)


def read_onnx_config(directory: Path) -> tuple[Config, tuple[int, int], tuple[str, ...], dict]:
    """(config, image size, class names, the "onnx" entry) of an export's config.json. The file is the model's
    config.json plus an "onnx" entry, so the model part is checked by the model directory's own code."""
    path = directory / "config.json"
    if not directory.is_dir() or not path.is_file():
        raise ModelError(f"{directory} is not an ONNX export: config.json is missing "
                         "(write one with `latentdiff export onnx MODEL OUT/`)")
    cfg, image_size, class_names = read_metadata(path)
    meta = json.loads(path.read_text(encoding="utf-8"))
    onnx = meta.get("onnx")
    if not isinstance(onnx, dict) or onnx.get("format") != ONNX_FORMAT:
        raise ModelError(f"{directory} is a model directory, not an ONNX export (its config.json has no 'onnx' "
                         "entry); write one with `latentdiff export onnx MODEL OUT/`")
    version = onnx.get("format_version")
    if not isinstance(version, int) or version > ONNX_FORMAT_VERSION:
        raise ModelError(f"{directory} was written by a newer latentdiff (ONNX export format {version!r})")
    onnx["latent_stats"] = _latent_stats(meta, cfg.autoencoder.latent_channels, path)
    return cfg, image_size, class_names, onnx


def _latent_stats(meta: dict, channels: int, path: Path) -> dict[str, list[float]]:
    """The codec's per-channel latent statistics from an export's config.json, checked (scale > 0, finite)."""
    stats = meta.get("latent_stats")
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and len(stats[k]) == channels
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in stats[k])
        for k in ("shift", "scale"))
    if not ok or not all(v > 0 for v in stats["scale"]):
        raise ModelError(f"{path} is invalid: latent_stats must hold {channels} finite shifts and {channels} scales "
                         f"> 0, got {stats!r:.80}")
    return {"shift": [float(v) for v in stats["shift"]], "scale": [float(v) for v in stats["scale"]]}


def load_onnx(out_dir: str | Path, *, threads: int | None = None) -> LatentDiffusion:
    """The pipeline of an ONNX export: U-Net, encoder and decoder in ONNX Runtime; schedule, samplers, guidance
    and the codec's latent statistics in PyTorch, so ``generate`` and the control functions work as usual."""
    require_onnxruntime()
    directory = Path(out_dir)
    cfg, image_size, class_names, onnx = read_onnx_config(directory)
    sessions = {}
    for name in ("unet", "decoder", "encoder"):
        path = directory / f"{name}.onnx"
        if not path.is_file():
            raise ModelError(f"{path} is missing from the ONNX export")
        sessions[name] = open_session(path, threads)
    ae = Autoencoder(cfg.autoencoder, image_size)
    ae.decoder, ae.encoder = OrtDecoder(sessions["decoder"]), OrtEncoder(sessions["encoder"])
    ae.latent_shift.copy_(torch.tensor(onnx["latent_stats"]["shift"]))
    ae.latent_scale.copy_(torch.tensor(onnx["latent_stats"]["scale"]))
    denoiser = Denoiser(OrtUNet(sessions["unet"], cfg.unet), build_schedule(cfg), cfg.diffusion.prediction,
                        cfg.unet.num_classes)
    pipe = OnnxLatentDiffusion(cfg, ae, denoiser, class_names)
    pipe.directory = directory
    return pipe.eval()
