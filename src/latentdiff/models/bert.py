"""A BERT encoder forward pass (Devlin et al. 2019) over a packaged checkpoint's safetensors weights.

Used for the frozen all-MiniLM-L6-v2 text encoder: ``transformers`` builds the same network, but importing it
costs about 10 s of a 2-core CPU, half the time budget of sampling 16 emoji from a prompt. This module needs
only torch, safetensors and the ``tokenizers`` package; tests/test_text.py checks it against ``transformers``.
Loading reads tensors only (safetensors), never code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from latentdiff.errors import ModelError


class BertEncoder:
    """The last hidden states of a BERT checkpoint folder (config.json, model.safetensors, tokenizer.json)."""

    def __init__(self, folder: str | Path, max_tokens: int, device: torch.device | str = "cpu"):
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            self.w = {k: v.float().to(device) for k, v in load_file(str(folder / "model.safetensors")).items()}
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load the text encoder from {folder}: {e}") from None
        self.layers, self.heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding(length=max_tokens, pad_id=0, pad_token="[PAD]")
        self.device = torch.device(device)

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer.encode_batch(list(prompts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=self.device)  # (B, L)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool, device=self.device)
        return ids, mask

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, H), mask (B, L) bool) of the prompts, padded or cut to max_tokens."""
        ids, mask = self.tokens(prompts)
        w = self.w
        pos = torch.arange(ids.shape[1], device=self.device)
        h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos] \
            + w["embeddings.token_type_embeddings.weight"][0]
        h = self._ln(h, "embeddings.LayerNorm")
        B, L, H = h.shape
        d = H // self.heads
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): padding is never attended to
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(x):
                return x.reshape(B, L, self.heads, d).transpose(1, 2)  # (B, L, H) -> (B, heads, L, d)

            q, k, v = (split(self._lin(h, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1 / math.sqrt(d))
            a = a.transpose(1, 2).reshape(B, L, H)
            h = self._ln(h + self._lin(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            f = F.gelu(self._lin(h, f"{p}.intermediate.dense"))  # BERT's exact (erf) GELU
            h = self._ln(h + self._lin(f, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return h, mask
