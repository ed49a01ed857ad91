"""RMSNorm of a few rows in one Triton kernel, optionally after a residual add, for the static engine.

HF's RMSNorm (Llama, Mistral, Qwen2, Qwen3: fp32 mean of squares, rsqrt, cast back, times the
weight) is ~7 kernels in eager mode; a decode step runs two per layer, so at batch 32 they were a
third of its kernels, each bound by launch latency. Here:

    h = rms_norm(x, weight, eps)                 # = norm(x)
    x, h = rms_norm(x, weight, eps, residual=a)  # x + a, and norm(x + a), in one kernel

with HF's roundings (the sum and the normalised row rounded to x's dtype before the weight), so
the outputs equal HF's up to the order of one fp32 sum (tests/test_decode_kernels.py runs it in Triton's
CPU interpreter). This file imports only torch (Triton lazily): export.py ships it with the model.
"""

import torch

tl = None  # triton.language, imported by the first call: a module global, where Triton looks for it
_KERNEL = []


def _kernel():
    """The jitted kernel, defined on the first call (Triton through __import__: no import statement,
    which transformers' remote-code check would make a requirement of every export)."""
    global tl
    if _KERNEL:
        return _KERNEL[0]
    triton = __import__("triton.language")
    tl = triton.language

    @triton.jit
    def rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, h_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)  # the residual stream in its dtype, as `x + a` rounds it
            tl.store(sum_ptr + row * N + cols, x, mask=mask)
        xf = x.to(tl.float32)
        normed = xf * tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # HF casts back before the weight
        h = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * normed
        tl.store(h_ptr + row * N + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    _KERNEL.append(rms_norm_kernel)
    return rms_norm_kernel


def hf_rms_norm_eps(norm: torch.nn.Module) -> float | None:
    """eps of an HF RMSNorm whose arithmetic this kernel repeats (weight * normed, no offset), else None."""
    name = type(norm).__name__
    eps = getattr(norm, "variance_epsilon", None)
    if name.endswith("RMSNorm") and "Gemma" not in name and eps is not None and getattr(norm, "weight", None) is not None:
        return float(eps)
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) -> norm(x); with residual (same shape): (x + residual, norm(x + residual))."""
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        x, residual = x + residual, None  # torch's broadcasting and type promotion, then the norm alone
        return x, rms_norm(x, weight, eps)
    x = x.contiguous()  # (no copy when it already is)
    residual = residual.contiguous() if residual is not None else None
    N = x.shape[-1]
    rows = x.numel() // N
    h = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x) if residual is not None else x
    block = 1 << (N - 1).bit_length()
    _kernel()[(rows,)](x, residual if residual is not None else x, weight, total, h, float(eps), N=N, BLOCK=block,
                       HAS_RESIDUAL=residual is not None)
    return (total, h) if residual is not None else h
