"""An RMSNorm (+ residual add) and the packed projection after it as one Triton kernel, for the
static engine's decode step (opt-in: StaticEngine(norm_linear=True)):

    x, h, y = norm_linear(x, weight, eps, w, residual=a)     # x + a, norm(x + a), norm(x + a) @ w.T
    x, h, y = norm_linear(x, weight, eps, w_gate_up, residual=a, swiglu=True)   # y = SiLU(gate) * up

One kernel where the engine otherwise runs op_decode.rms_norm, a cuBLAS GEMM and (for a gated MLP)
SiLU and a product: at batch 32 each is bound by launch latency, not bytes. Measured on the H200 with
rolled K loops: no faster than the four (docs/results.md, run 4); the loops are unrolled since.

Checked against HF's RMSNorm + F.linear (+ SiLU * up) in Triton's CPU interpreter and compiled for
sm_90 (tests/test_decode_kernels.py). This file imports only torch and op_common (Triton lazily): export.py
ships it.
"""

import os

import torch

from .op_common import lazy_kernels

tl = None  # triton.language once _kernels() has run: a module global, where Triton looks for it


def _define(triton) -> dict:
    """{"norm_linear": the autotuned kernel} (once, through _kernels)."""

    @triton.jit
    def norm_linear_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, bias_ptr, sum_ptr, h_ptr, y_ptr, M, eps,
                           K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SWIGLU: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)  # which BLOCK_N output columns (with SWIGLU: of gate, and the same of up)
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        ok_m = rows < M
        # pass 1: each row's mean square (the rows are a few KB: every program reads them from L2). Both
        # loops are unrolled (K is a constexpr), so the loads of all blocks can be issued before the math
        # that waits for them: a rolled loop waited one load latency per block (~10 us per call on the H200)
        sq = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = ok_m[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
            if HAS_RESIDUAL:  # the residual stream in its dtype, as `x + a` rounds it
                x = (x.to(tl.float32) + tl.load(r_ptr + rows[:, None] * K + cols[None, :], mask=ok,
                                                other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, 1)
        inv = tl.rsqrt(sq / K + eps)
        # pass 2: the normalised rows block by block (HF's roundings), times this program's weight rows
        n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        ok_n = n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok_k = cols < K
            ok = ok_m[:, None] & ok_k[None, :]
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(r_ptr + rows[:, None] * K + cols[None, :], mask=ok,
                                                other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
                tl.store(sum_ptr + rows[:, None] * K + cols[None, :], x, mask=ok & (pn == 0))
            normed = (x.to(tl.float32) * inv[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            h = (tl.load(nw_ptr + cols, mask=ok_k, other=0.0).to(tl.float32)[None, :] * normed).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None] * K + cols[None, :], h, mask=ok & (pn == 0))
            w = tl.load(w_ptr + n[:, None] * K + cols[None, :], mask=ok_n[:, None] & ok_k[None, :], other=0.0)
            acc += tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PREC)
            if SWIGLU:  # up's rows follow gate's N rows in the packed weight
                w = tl.load(w_ptr + (N + n[:, None]) * K + cols[None, :], mask=ok_n[:, None] & ok_k[None, :], other=0.0)
                acc_up += tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PREC)
        out_ty = y_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=ok_n, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:  # act(gate) * up with the roundings of the eager ops: gate, up, SiLU(gate) each in y's dtype
            gate = acc.to(out_ty).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32)
            acc = act * acc_up.to(out_ty).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * N + n[None, :], acc.to(out_ty), mask=ok_m[:, None] & ok_n[None, :])

    # norm_linear's blocks, measured once per shape (it writes only its outputs: trial runs change nothing)
    configs = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)] if os.environ.get("TRITON_INTERPRET") == "1" \
        else [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4)  # (64, 128) spills at BLOCK_M 64
              for bn, bk in ((16, 64), (16, 128), (32, 64), (32, 128), (64, 64))]
    norm_linear = triton.autotune(configs=configs, key=["M", "K", "N", "BLOCK_M", "SWIGLU"])(norm_linear_kernel)
    return {"norm_linear": norm_linear}


_kernels = lazy_kernels(globals(), _define)  # {name: jitted kernel}, defined on the first call


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm and the projection after it as one kernel: x (..., K) [+ residual] -> (x + residual
    (x itself without one), h = rms_norm(...), y). y = h @ weight.T + bias (weight (N, K), a packed
    projection), or with swiglu, weight = [gate; up] (2I, K) and y = SiLU(h @ gate.T) * (h @ up.T)
    (..., I): a gated MLP's input half. h and the residual sum are written too (by the first column
    of programs), for what else reads them. Roundings as rms_norm's and the eager ops'; the matmul
    accumulates in fp32."""
    K = x.shape[-1]
    N = weight.shape[0] // (2 if swiglu else 1)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        x, residual = x + residual, None  # torch's promotion, then the fused kernel on the sum
    if weight.shape[1] != K or not weight.is_contiguous() or norm_weight.shape != (K,) or (swiglu and bias is not None) \
            or weight.dtype != x.dtype or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"norm_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)}, swiglu={swiglu}: expected a contiguous (N, K) weight of x's "
                         f"dtype (with swiglu: (2I, K), no bias) and a (K,) norm weight")
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    M = x.numel() // K
    h = torch.empty(x.shape, dtype=torch.promote_types(norm_weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x) if residual is not None else x
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    kernel = _kernels()["norm_linear"]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    grid = lambda meta: (-(-M // block_m), -(-N // meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](x, residual if residual is not None else x, norm_weight, weight, bias if bias is not None else weight,
                 total, h, y, M, float(eps), K=K, N=N, BLOCK_M=block_m, HAS_RESIDUAL=residual is not None,
                 HAS_BIAS=bias is not None, SWIGLU=swiglu,
                 # Triton's CPU interpreter multiplies bf16 as raw bits: there the dots take fp32 copies
                 DOT_DTYPE=tl.float32 if interpret or x.dtype == torch.float32 else
                 {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype],
                 PREC="ieee" if x.dtype == torch.float32 else "tf32")
    return total, h, y
