"""Export a LatentDiffusion as a diffusers folder: ``unet/`` (stock ``UNet2DModel``), ``scheduler/`` (stock
``DDIMScheduler``), ``vae/`` (our decoder as a diffusers custom component built from diffusers' own blocks),
``model_index.json`` and ``pipeline.py``, a small class-conditional custom pipeline:

    DiffusionPipeline.from_pretrained(OUT, custom_pipeline=str(OUT), trust_remote_code=True)

Why the decoder is not an ``AutoencoderKL`` is stated by :func:`autoencoderkl_blockers` (and docs/benchmarks.md).
The weight-name mapping is written once, as module pairs (:func:`unet_module_pairs`, :func:`decoder_module_pairs`)
expanded to tensors by :func:`map_state`; a test checks that every tensor on both sides is covered exactly once.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from latentdiff.errors import ConfigError, ModelError
from latentdiff.models.unet import UNetConfig
from latentdiff.nn.layers import Attention
from latentdiff.pipeline.model import LatentDiffusion
from latentdiff.utils.files import atomic_path, write_text_atomic

PIPELINE_CLASS = "LatentDiffClassPipeline"
DECODER_MODULE, DECODER_CLASS = "latentdiff_decoder", "LatentDiffDecoder"
SCHEDULES = {"linear": "linear", "scaled-linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
RES = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
       "skip": "conv_shortcut"}  # our ResBlock -> diffusers' ResnetBlock2D


# --- the weight-name mapping: module pairs (ours, theirs, kind) ---------------------------------------------------

def unet_module_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """Our U-Net's modules and UNet2DModel's, in the order UNet.__init__ builds them; kind: res, attn or same."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", "same"), ("time_mlp.2", "time_embedding.linear_2", "same"),
             ("conv_in", "conv_in", "same")]
    if cfg.num_classes:
        pairs.append(("label_emb", "class_embedding", "same"))
    levels, k = len(cfg.channel_mults), 0
    for lvl in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"down.{k}.0", f"down_blocks.{lvl}.resnets.{j}", "res"))
            if lvl in cfg.attention_levels:
                pairs.append((f"down.{k}.1", f"down_blocks.{lvl}.attentions.{j}", "attn"))
            k += 1
        if lvl < levels - 1:
            pairs.append((f"down.{k}.conv", f"down_blocks.{lvl}.downsamplers.0.conv", "same"))
            k += 1
    pairs += [("mid.0", "mid_block.resnets.0", "res"), ("mid.1", "mid_block.attentions.0", "attn"),
              ("mid.2", "mid_block.resnets.1", "res")]
    k = 0
    for i, lvl in enumerate(reversed(range(levels))):  # up block i runs at level L-1-i
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"up.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if lvl in cfg.attention_levels:
                pairs.append((f"up.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if lvl > 0:
            pairs.append((f"up.{k}.conv", f"up_blocks.{i}.upsamplers.0.conv", "same"))
            k += 1
    return pairs + [("norm_out", "conv_norm_out", "same"), ("conv_out", "conv_out", "same")]


def decoder_module_pairs(levels: int, num_res_blocks: int, attention: bool) -> list[tuple[str, str, str]]:
    """Our Decoder's modules and the vae component's (named as in AutoencoderKL's decoder)."""
    pairs = [("conv_in", "conv_in", "same")] + ([("attn", "mid_attn", "attn")] if attention else [])
    for i in range(levels + 1):
        pairs += [(f"levels.{i}.{j}", f"up_blocks.{i}.resnets.{j}", "res") for j in range(num_res_blocks + 1)]
        if i < levels:
            pairs.append((f"ups.{i}", f"up_blocks.{i}.upsamplers.0.conv", "same"))
    return pairs + [("out.0", "conv_norm_out", "same"), ("out.2", "conv_out", "same")]


def _expand(src: str, dst: str, kind: str, keys: list[str]) -> list[tuple[str, str, int | None]]:
    """Tensor rules (our key, their key, part): `part` i takes the i-th third of a fused q|k|v tensor."""
    rules = []
    for key in keys:
        suffix = key[len(src) + 1:]
        name, _, leaf = suffix.rpartition(".")
        if kind == "same":
            rules.append((key, f"{dst}.{suffix}", None))
        elif kind == "res":
            rules.append((key, f"{dst}.{RES[name]}.{leaf}", None))
        elif name == "norm":  # attention: GroupNorm, fused 1×1-conv q|k|v, 1×1-conv output
            rules.append((key, f"{dst}.group_norm.{leaf}", None))
        elif name == "qkv":
            rules += [(key, f"{dst}.{proj}.{leaf}", part) for part, proj in enumerate(("to_q", "to_k", "to_v"))]
        elif name == "out":
            rules.append((key, f"{dst}.to_out.0.{leaf}", None))
        else:
            raise ModelError(f"no diffusers name for {key}")
    return rules


def map_state(state: dict[str, torch.Tensor], pairs: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers names. 1×1 convs become Linear weights (C, C, 1, 1) -> (C, C); the fused q|k|v
    conv (3C, C, 1, 1) splits in channel order q, k, v, the order our Attention's reshape uses. Every tensor of
    `state` must be used: a tensor that no pair covers is an error, never silently dropped."""
    out, used = {}, set()
    for src, dst, kind in pairs:
        keys = [k for k in state if k.startswith(src + ".")]
        for key, name, part in _expand(src, dst, kind, keys):
            t = state[key]
            if part is not None:
                t = t.chunk(3, dim=0)[part]  # (3C, ...) -> (C, ...)
            if kind == "attn" and t.ndim == 4:
                t = t[:, :, 0, 0]  # (C, C, 1, 1) 1×1 conv -> (C, C) Linear
            out[name] = t.detach().float().contiguous().clone()
            used.add(key)
    left = sorted(set(state) - used)
    if left:
        raise ModelError(f"{len(left)} tensors have no diffusers name, e.g. {left[0]}")
    return out


# --- configs and what blocks the stock classes --------------------------------------------------------------------

def _groups(net: nn.Module) -> set[int]:
    return {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}


def unet_blockers(pipe: LatentDiffusion) -> list[str]:
    """Why our U-Net's weights would not map exactly onto UNet2DModel (empty: they do)."""
    cfg, net = pipe.cfg.unet, pipe.denoiser.net
    found = []
    groups = _groups(net)
    if len(groups) > 1:  # ours: gcd(32, C) per layer; UNet2DModel: one norm_num_groups for every GroupNorm
        found.append(f"GroupNorm group counts differ between layers ({sorted(groups)}; every width must be a "
                     "multiple of 32), while UNet2DModel has one norm_num_groups")
    widths = {m.out.out_channels for m in net.modules() if isinstance(m, Attention)}
    if any(c % cfg.head_dim for c in widths):  # UNet2DModel: heads = C // attention_head_dim, inner dim heads·dim
        found.append(f"attention widths {sorted(widths)} are not multiples of head_dim {cfg.head_dim}")
    if cfg.context_dim:
        found.append("it is text-conditioned (cross-attention), which UNet2DModel lacks and the mapping to "
                     "UNet2DConditionModel is not written; export it with `latentdiff export onnx` instead")
    return found


def autoencoderkl_blockers(pipe: LatentDiffusion) -> list[str]:
    """Why the codec does not map exactly onto AutoencoderKL. The first one always holds."""
    ae = pipe.autoencoder
    found = [("encoder: our stride-2 convs pad 1 pixel on every side; AutoencoderKL's encoder (downsample_padding=0) "
              "pads only right and bottom, which samples other pixels: no weights reproduce ours")]
    groups = _groups(ae.decoder)
    if len(groups) > 1:
        found.append(f"decoder: GroupNorm group counts differ between layers ({sorted(groups)}: gcd(32, width) for "
                     f"widths {ae.cfg.widths()}), while AutoencoderKL has one norm_num_groups")
    chain = [tuple(ae.latent_shape[1:]), *ae.upsample_sizes()]  # latent size, then the size after each upsampling
    if any(b != (2 * a[0], 2 * a[1]) for a, b in itertools.pairwise(chain)):
        found.append(f"decoder: the sizes {chain} do not double at every level; AutoencoderKL upsamples by exactly 2")
    if ae.cfg.attention and ae.cfg.widths()[-1] > 63:
        found.append("decoder: our attention has width/32 heads; AutoencoderKL's mid-block attention has one")
    found.append("decoder: AutoencoderKL's mid block has two ResnetBlock2D that ours lacks (they could be set to the "
                 "identity by zeroing conv2; not blocking alone)")
    return found


def unet_config(pipe: LatentDiffusion) -> dict:
    cfg = pipe.cfg.unet
    levels = range(len(cfg.channel_mults))
    down = ["AttnDownBlock2D" if lvl in cfg.attention_levels else "DownBlock2D" for lvl in levels]
    up = ["AttnUpBlock2D" if lvl in cfg.attention_levels else "UpBlock2D" for lvl in reversed(levels)]
    _, h, w = pipe.autoencoder.latent_shape
    return {
        "_class_name": "UNet2DModel", "sample_size": [h, w], "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels, "center_input_sample": False, "time_embedding_type": "positional",
        "flip_sin_to_cos": True, "freq_shift": 0,  # ours: [cos, sin] of t·10000^(-i/half)
        "down_block_types": down, "mid_block_type": "UNetMidBlock2D", "up_block_types": up,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mults],
        "layers_per_block": cfg.num_res_blocks, "mid_block_scale_factor": 1, "downsample_padding": 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": cfg.dropout, "act_fn": "silu",
        "attention_head_dim": cfg.head_dim, "norm_num_groups": min(_groups(pipe.denoiser.net)),
        "attn_norm_num_groups": None, "norm_eps": 1e-6, "resnet_time_scale_shift": "default",
        "add_attention": True, "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,  # + the null label K
    }


def scheduler_config(pipe: LatentDiffusion) -> dict:
    d = pipe.cfg.diffusion
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": d.num_train_steps, "beta_start": d.beta_start,
            "beta_end": d.beta_end, "beta_schedule": SCHEDULES[d.schedule], "trained_betas": None,
            "prediction_type": PREDICTIONS[d.prediction], "timestep_spacing": "trailing", "steps_offset": 0,
            "clip_sample": False, "set_alpha_to_one": True,  # the last step lands on ᾱ = 1, as our DDIM's t = -1
            "thresholding": False, "rescale_betas_zero_snr": d.zero_terminal_snr}


def decoder_config(pipe: LatentDiffusion) -> dict:
    ae = pipe.autoencoder
    attn = ae.decoder.attn
    return {"_class_name": DECODER_CLASS, "latent_channels": ae.cfg.latent_channels,
            "image_channels": ae.cfg.image_channels, "widths": ae.cfg.widths()[::-1],
            "num_res_blocks": ae.cfg.num_res_blocks, "attention_heads": attn.heads if ae.cfg.attention else 0,
            "sizes": [list(s) for s in ae.upsample_sizes()], **_stats_config(ae)}


def _stats_config(ae) -> dict:
    stats = ae.latent_stats()
    return {"latent_shift": stats["shift"], "latent_scale": stats["scale"]}


# --- writing the folder -------------------------------------------------------------------------------------------

def _save_weights(path: Path, tensors: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def export_diffusers(pipe: LatentDiffusion, out_dir: str | Path) -> dict:
    """Write the diffusers folder (see the module docstring). Raises ModelError when the U-Net does not map exactly
    onto UNet2DModel. Needs no diffusers to write; loading it needs diffusers >= 0.30."""
    blockers = unet_blockers(pipe)
    if blockers:
        raise ModelError("this U-Net cannot be written as a diffusers UNet2DModel: " + "; ".join(blockers))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    pipe = pipe.to("cpu")
    unet = map_state(pipe.denoiser.net.state_dict(), unet_module_pairs(pipe.cfg.unet))
    ae = pipe.autoencoder
    dec = map_state(ae.decoder.state_dict(), decoder_module_pairs(ae.cfg.levels, ae.cfg.num_res_blocks,
                                                                 ae.cfg.attention))
    _save_weights(out / "unet" / "diffusion_pytorch_model.safetensors", unet)
    _write_json(out / "unet" / "config.json", unet_config(pipe))
    _save_weights(out / "vae" / "diffusion_pytorch_model.safetensors", dec)
    _write_json(out / "vae" / "config.json", decoder_config(pipe))
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(pipe))
    templates = resources.files("latentdiff.export")
    for src, dst in (("decoder_template.py", out / "vae" / f"{DECODER_MODULE}.py"),
                     ("pipeline_template.py", out / "pipeline.py")):
        write_text_atomic(dst, (templates / src).read_text(encoding="utf-8"))
    _write_json(out / "model_index.json", {
        "_class_name": PIPELINE_CLASS, "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": [DECODER_MODULE, DECODER_CLASS],
        "class_names": list(pipe.class_names) or [f"class {i}" for i in range(pipe.num_classes)],
        "default_guidance": float(pipe.cfg.sample.guidance), "default_steps": int(pipe.cfg.sample.steps)})
    _, h, w = ae.latent_shape
    levels = len(pipe.cfg.unet.channel_mults)
    notes = [] if h % 2 ** (levels - 1) == 0 and w % 2 ** (levels - 1) == 0 else [(
        f"latent {h}×{w} is not a multiple of {2 ** (levels - 1)}: UNet2DModel.forward passes no upsample sizes, "
        "so pipeline.py gives each Upsample2D the skip's size (a forward pre-hook); the stock forward alone "
        "fails at this size")]
    return {"dir": str(out), "unet": "UNet2DModel", "scheduler": "DDIMScheduler",
            "vae": f"{DECODER_MODULE}.{DECODER_CLASS} (custom component)", "tensors": len(unet) + len(dec),
            "autoencoderkl_blockers": autoencoderkl_blockers(pipe), "notes": notes,
            "load": f"DiffusionPipeline.from_pretrained({str(out)!r}, custom_pipeline={str(out)!r}, "
                    "trust_remote_code=True)"}

