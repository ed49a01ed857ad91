"""Several projections of one input as one matmul, for the static engine (engine.py).

A decode step at batch 32 multiplies a few rows by each weight: every nn.Linear is one small GEMM
bound by launch latency, not bytes. Packed, a softmax layer's q/k/v is one GEMM, a GDN layer's
q/k/v/a/b/g one, an MLP's gate/up one, for the teacher and the hybrid alike.

The packed weight is a copy (the model's own parameters are left alone). It is refreshed in place,
keeping its address (and so a captured CUDA graph valid), whenever a source parameter has changed
since: `refresh()`, which the engine calls before each prefill.
"""

import torch
import torch.nn.functional as F
from torch import nn


ROW_ALIGN = 64  # packed weights' rows padded with zeros to a multiple of this (see PackedLinear)


def padded_sizes(sizes: list[int], align: int = ROW_ALIGN) -> list[int]:
    """The outputs' sizes, then the zero rows (if any) that make their sum a multiple of align."""
    pad = -sum(sizes) % align
    return list(sizes) + [pad] * (pad > 0)


class PackedLinear(nn.Module):
    """linears (same in_features) -> forward(x) = the tuple of their outputs, from one matmul (the
    outputs are column slices of one tensor: views with its row stride).

    align: the packed weight's rows padded with zeros to a multiple of it. A GDN layer's q/k/v/a/b/g
    are 1554 rows in the SmolLM2 shape: an output row of 3108 bytes is not 16-byte aligned, and
    cuBLAS then ran a split-K fallback GEMM plus a reduce kernel (6.1 us at 16K B32, H200 profile)."""

    def __init__(self, linears: list[nn.Linear], align: int = 1):
        super().__init__()
        self.sources = tuple(linears)  # a tuple: not registered as submodules (no second copy in state_dict)
        self.sizes = [lin.out_features for lin in linears]
        self.split_sizes = padded_sizes(self.sizes, align)  # the padding columns are dropped by outputs()
        w = linears[0].weight
        rows = sum(self.split_sizes)
        self.register_buffer("weight", torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device))
        has_bias = any(lin.bias is not None for lin in linears)
        self.register_buffer("bias", torch.zeros(rows, dtype=w.dtype, device=w.device) if has_bias else None)
        self.seen = None
        self.refresh()

    def _versions(self) -> list:
        return [(t.data_ptr(), t._version) for lin in self.sources for t in (lin.weight, lin.bias) if t is not None]

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the sources in again if any changed (an optimizer step, load_state_dict, .to())."""
        now = self._versions()
        if now == self.seen:
            return
        start = 0
        for lin, n in zip(self.sources, self.sizes):
            self.weight[start:start + n].copy_(lin.weight)
            if lin.bias is not None:
                self.bias[start:start + n].copy_(lin.bias)
            start += n
        self.seen = now

    def outputs(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The packed matmul's output (..., rows) -> each source's columns."""
        return y.split(self.split_sizes, dim=-1)[:len(self.sizes)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.outputs(F.linear(x, self.weight, self.bias))


def pack_attention(attn: nn.Module, kind: str) -> PackedLinear | None:
    """The projections a decode step of this layer reads from one input: q/k/v of the teacher's
    attention, or a mixer's own (`decode_linears`); None if there is nothing to pack."""
    if kind == "softmax":
        return PackedLinear([attn.q_proj, attn.k_proj, attn.v_proj], align=ROW_ALIGN)
    linears = attn.decode_linears() if hasattr(attn, "decode_linears") else None
    return PackedLinear(linears, align=ROW_ALIGN) if linears else None


def pack_mlp(mlp: nn.Module) -> PackedLinear | None:
    """gate/up of a gated MLP (Llama, Mistral, Qwen: down(act(gate(x)) * up(x))); None otherwise."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return PackedLinear([mlp.gate_proj, mlp.up_proj])  # unpadded: norm_linear's swiglu reads [gate; up] as halves
    return None


def packed_mlp(mlp: nn.Module, pack: PackedLinear | None, x: torch.Tensor) -> torch.Tensor:
    if pack is None:
        return mlp(x)
    gate, up = pack(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)
