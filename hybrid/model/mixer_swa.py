"""The sliding-window softmax mixer ("swa"): the teacher's own attention over the last `window` tokens,
with a fixed-size decode state (the last window - 1 keys and values). Imports only torch and
mixer_base.py (export.py ships it beside the modeling file)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mixer_base import TeacherInitMixer, apply_rope, zero_pads


class SlidingWindowMixer(TeacherInitMixer):
    """Softmax attention over the last `window` tokens with the teacher's q/k/v/o, q/k norms, RoPE
    and scaling. Decoding keeps only the last window - 1 keys/values (post-RoPE)."""

    mixer_name = "swa"

    def __init__(self, teacher_attn: nn.Module, config, layer_idx: int, window: int = 512):
        super().__init__(teacher_attn, config, layer_idx)
        if window < 1:
            raise ValueError(f"swa mixer: window={window}; expected >= 1")
        self.window = window

    def cache_shapes(self, batch: int, dtype: torch.dtype) -> dict:
        kv = ((batch, self.window - 1, self.n_kv_heads, self.head_dim), dtype)
        return {"k": kv, "v": kv, "valid": ((batch, self.window - 1), torch.bool)}

    def mix(self, x: torch.Tensor, position_embeddings=None, state: dict | None = None,
            pad_mask: torch.Tensor | None = None, output_state: bool = True) -> tuple[torch.Tensor, dict | None]:
        """x (B, T, C) -> y (B, T, C), state {"k", "v": (B, window - 1, Hkv, D), "valid": (B, window - 1) bool}:
        always window - 1 slots (a fixed size, for static caches), oldest first, unused ones not valid."""
        B, T, _ = x.shape
        x = zero_pads(x, pad_mask)
        q, k, v = self.project(x)
        q = apply_rope(q, position_embeddings, f"swa mixer (layer {self.layer_idx})")
        k = apply_rope(k, position_embeddings, f"swa mixer (layer {self.layer_idx})")
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if pad_mask is None else pad_mask.bool()
        if state is not None:
            k, v = torch.cat([state["k"].to(k.dtype), k], 1), torch.cat([state["v"].to(v.dtype), v], 1)
            valid = torch.cat([state["valid"], valid], 1)
        L = k.shape[1] - T  # cached tokens before this call
        qpos = torch.arange(T, device=x.device)[:, None] + L
        kpos = torch.arange(L + T, device=x.device)[None, :]
        band = (kpos <= qpos) & (kpos > qpos - self.window)  # (T, L + T)
        # pad keys are masked; every query keeps itself so a pad query row is never empty (no NaN)
        allowed = (band & valid[:, None, :]) | (kpos == qpos)  # (B, T, L + T)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.expand_kv(k).transpose(1, 2), self.expand_kv(v).transpose(1, 2),
            attn_mask=allowed[:, None], scale=self.scaling)  # (B, H, T, D)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        if not output_state:
            return y, None
        keep = self.window - 1
        short = keep - k.shape[1]
        if short > 0:  # fewer tokens so far than slots: empty (not valid) slots in front, never a wrapped slice
            k, v = F.pad(k, (0, 0, 0, 0, short, 0)), F.pad(v, (0, 0, 0, 0, short, 0))
            valid = F.pad(valid, (short, 0), value=False)
        return y, {"k": k[:, k.shape[1] - keep:], "v": v[:, v.shape[1] - keep:], "valid": valid[:, valid.shape[1] - keep:]}
