"""Small fused kernels of the static engine's step (engine.py), for the teacher and the hybrid alike.

A decode step at batch 32 is bound by kernel count, not bytes: each eager op on a few rows is one
launch-latency-bound kernel. Here, each in one Triton kernel:

    h = rms_norm(x, weight, eps)                 # HF's RMSNorm (~7 eager kernels)
    x, h = rms_norm(x, weight, eps, residual=a)  # x + a, and norm(x + a)
    y = silu_mul(gate, up)                       # a gated MLP's SiLU(gate) * up (2 eager kernels)
    q = rope_kv_step(q, k, v, cos, sin, kbuf, vbuf, slot)
        # RoPE on q and k (HF's rotate_half convention), k and v written into the KV buffers at
        # `slot` (a device tensor: no host sync, so it can sit in a CUDA graph): ~14 eager kernels
    o = attend_cache_split(q, kbuf, vbuf, scale, bias, slot)
        # one query per sequence against the KV buffers, split-KV ("flash-decoding"): K and V read
        # once per kv head, in parallel over slot ranges, slots after `slot` skipped; then a merge

RMSNorm keeps HF's roundings (the sum and the normalised row rounded to x's dtype before the
weight), so it equals HF's up to the order of one fp32 sum; RoPE rounds once where HF rounds three
times; the attention keeps its scores and softmax in fp32 where the eager path (attend_cache, below)
rounds the scores to the model's dtype. All are checked against the eager ops in Triton's CPU
interpreter and compiled for sm_90 (tests/test_decode_kernels.py). This file imports only torch and
op_common (Triton lazily): export.py ships it.
"""

import os

import torch

from .op_common import lazy_kernels, relative_errors

tl = None  # triton.language once _kernels() has run: a module global, where Triton looks for it


def _define(triton) -> dict:
    """The jitted kernels (once, through _kernels)."""

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

    @triton.jit
    def silu_mul_kernel(g_ptr, u_ptr, y_ptr, g_rs, u_rs, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(g_ptr + row * g_rs + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)  # F.silu, rounded as its output
        u = tl.load(u_ptr + row * u_rs + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_kv_kernel(q_ptr, k_ptr, v_ptr, q_rs, k_rs, v_rs, cos_ptr, sin_ptr, qo_ptr, kbuf_ptr, vbuf_ptr,
                       slot_ptr, S, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)  # q heads 0..H-1, then kv heads
        half = tl.arange(0, D // 2)
        c1 = tl.load(cos_ptr + b * D + half).to(tl.float32)
        c2 = tl.load(cos_ptr + b * D + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin_ptr + b * D + half).to(tl.float32)
        s2 = tl.load(sin_ptr + b * D + D // 2 + half).to(tl.float32)
        if i < H:
            src = q_ptr + b * q_rs + i * D
            dst = qo_ptr + (b * H + i) * D
        else:
            j = i - H
            slot = tl.load(slot_ptr)
            src = k_ptr + b * k_rs + j * D
            dst = kbuf_ptr + ((b * HKV + j) * S + slot) * D
            vdst = vbuf_ptr + ((b * HKV + j) * S + slot) * D
            tl.store(vdst + half, tl.load(v_ptr + b * v_rs + j * D + half))
            tl.store(vdst + D // 2 + half, tl.load(v_ptr + b * v_rs + j * D + D // 2 + half))
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty))  # x * cos + rotate_half(x) * sin
        tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty))

    @triton.jit
    def attn_split_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, slot_ptr, o_ptr, m_ptr, l_ptr, S, scale,
                          HKV: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
                          SPLIT: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)  # kv head: its REP q heads are the rows of one dot
        s = tl.program_id(2)  # which SPLIT slots
        r = tl.arange(0, REP_P)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + ((b * HKV + j) * REP + r[:, None]) * D + d[None, :], mask=r[:, None] < REP, other=0.0)
        q = q.to(DOT_DTYPE)
        last = tl.load(slot_ptr)  # the current token's slot
        m = tl.full((REP_P,), float("-inf"), tl.float32)
        l = tl.zeros((REP_P,), tl.float32)
        acc = tl.zeros((REP_P, D), tl.float32)
        kv = (b * HKV + j) * S
        lo = s * SPLIT
        hi = tl.minimum(lo + SPLIT, last + 1)  # slots after the current token's hold nothing yet
        # compiled: a loop of the real length, which Triton software-pipelines (loads ahead of the dots);
        # Triton's CPU interpreter needs constant bounds (inline: it makes every assigned value a
        # tensor), and there the blocks past hi are no-ops
        for i in range(0, SPLIT // BLOCK_S if INTERPRET else tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_S)):
            offs = lo + i * BLOCK_S + tl.arange(0, BLOCK_S)
            ok = offs < hi
            k = tl.load(k_ptr + (kv + offs[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0).to(DOT_DTYPE)
            x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (REP_P, BLOCK_S) in fp32
            x += tl.load(bias_ptr + b * S + offs, mask=ok, other=float("-inf")).to(tl.float32)[None, :]
            m_new = tl.maximum(m, tl.max(x, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid slot yet stays empty
            p = tl.exp(x - shift[:, None])
            alpha = tl.exp(m - shift)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (kv + offs[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PREC)
            m = m_new
        part = (b * HKV + j) * REP + r  # q head, then this split: every program writes, empty or not
        tl.store(o_ptr + (part[:, None] * NSPLIT + s) * D + d[None, :], acc, mask=r[:, None] < REP)
        tl.store(m_ptr + part * NSPLIT + s, m, mask=r < REP)
        tl.store(l_ptr + part * NSPLIT + s, l, mask=r < REP)

    @triton.jit
    def attn_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, NSPLIT: tl.constexpr, NSPLIT_P: tl.constexpr,
                            D: tl.constexpr):
        h = tl.program_id(0)  # (sequence, q head), flat
        s = tl.arange(0, NSPLIT_P)
        d = tl.arange(0, D)
        m = tl.load(m_ptr + h * NSPLIT + s, mask=s < NSPLIT, other=float("-inf"))
        w = tl.exp(m - tl.max(m, 0))  # an empty split (m = -inf) weighs 0
        w = tl.where(m == float("-inf"), 0.0, w)
        total = tl.sum(w * tl.load(l_ptr + h * NSPLIT + s, mask=s < NSPLIT, other=0.0), 0)
        acc = tl.load(o_ptr + (h * NSPLIT + s[:, None]) * D + d[None, :], mask=s[:, None] < NSPLIT, other=0.0)
        tl.store(out_ptr + h * D + d, (tl.sum(w[:, None] * acc, 0) / total).to(out_ptr.dtype.element_ty))

    # the split kernel's block, warps and pipeline depth, measured on the first call per shape (it only
    # writes its own partial buffers, so the trial runs change nothing); one fixed config interpreted
    configs = [triton.Config({"BLOCK_S": 64}, num_warps=4)] if os.environ.get("TRITON_INTERPRET") == "1" else [
        triton.Config({"BLOCK_S": block}, num_warps=warps, num_stages=stages)
        for block in (64, 128) for warps in (4, 8) for stages in (2, 3, 4)]
    attn_split = triton.autotune(configs=configs, key=["S", "SPLIT", "HKV", "REP_P", "D"])(attn_split_kernel)
    return dict(rms_norm=rms_norm_kernel, silu_mul=silu_mul_kernel, rope_kv=rope_kv_kernel, attn_split=attn_split,
                attn_combine=attn_combine_kernel)


_kernels = lazy_kernels(globals(), _define)  # {name: jitted kernel}, defined on the first call


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
    _kernels()["rms_norm"][(rows,)](x, residual if residual is not None else x, weight, total, h, float(eps), N=N,
                                    BLOCK=block, HAS_RESIDUAL=residual is not None)
    return (total, h) if residual is not None else h


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A gated MLP's SiLU(gate) * up in one kernel (two eager ones), with their roundings: gate, up (...,
    N) of one dtype, each any row stride with unit column stride (e.g. halves of one packed matmul)."""
    N = gate.shape[-1]
    if up.shape != gate.shape or up.dtype != gate.dtype or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} stride {gate.stride()}, up {tuple(up.shape)} "
                         f"{up.dtype} stride {up.stride()}: expected one shape and dtype, unit column strides")
    g, u = gate.reshape(-1, N), up.reshape(-1, N)  # views for row-strided slices
    y = torch.empty(*gate.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, 1 << (N - 1).bit_length())
    _kernels()["silu_mul"][(g.shape[0], -(-N // block))](g, u, y, g.stride(0), u.stride(0), N=N, BLOCK=block)
    return y


def rope_kv_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kbuf: torch.Tensor, vbuf: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """One decode token of a softmax layer. q (B, H*D), k and v (B, Hkv*D) (projections, q/k norms
    applied; any row stride, e.g. column views of one packed matmul); cos, sin (B, D) (the teacher's
    rotary embedding at each row's position); kbuf, vbuf (B, Hkv, S, D) contiguous; slot (1,) long.
    Writes RoPE(k) and v at kbuf/vbuf[:, :, slot] -> RoPE(q) as (B, H, 1, D)."""
    B, S, D = kbuf.shape[0], kbuf.shape[2], kbuf.shape[3]
    H, HKV = q.shape[1] // D, kbuf.shape[1]
    if D % 2 or D & (D - 1) or k.shape != (B, HKV * D) or v.shape != k.shape or not kbuf.is_contiguous() or \
            not vbuf.is_contiguous() or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"rope_kv_step: q {tuple(q.shape)}, k {tuple(k.shape)}, kbuf {tuple(kbuf.shape)}: expected "
                         f"(B, H*D), (B, Hkv*D) rows and contiguous (B, Hkv, S, D) buffers, D a power of two")
    cos, sin = (t.reshape(B, D).contiguous() for t in (cos, sin))
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    _kernels()["rope_kv"][(B, H + HKV)](q, k, v, q.stride(0), k.stride(0), v.stride(0), cos, sin, out, kbuf, vbuf,
                                        slot, S, H=H, HKV=HKV, D=D)
    return out


def attend_cache(q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, scale: float,
                 bias: torch.Tensor) -> torch.Tensor:
    """One query per sequence against the whole static KV buffer: q (B, H, 1, D), kbuf/vbuf
    (B, Hkv, S, D), bias (B, S) 0 at valid slots and -inf elsewhere. The q heads sharing a kv head
    are stacked as rows of one matmul, so each K/V byte is read once (no repeat_kv copy); scores in
    the model's dtype as HF's eager attention has them, scaled and masked in one kernel, softmax
    accumulated in fp32 inside the kernel: few passes over the small (B, H, S) scores."""
    B, H, _, D = q.shape
    Hkv = kbuf.shape[1]
    scores = q.reshape(B, Hkv, H // Hkv, D) @ kbuf.transpose(-1, -2)  # (B, Hkv, rep, S)
    scores = torch.add(bias[:, None, None, :], scores, alpha=scale)
    return (scores.softmax(-1) @ vbuf).reshape(B, H, 1, D)


ATTN_UNIT = 128  # a split's slots are a multiple of this (the largest block the autotuner tries)
ATTN_PROGRAMS = 2048  # aim: enough (sequence, kv head, split) programs to fill every SM several times
ATTN_CHECKED = set()  # (device, dtype) where the split kernels have matched attend_cache once


def attend_cache_split(q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, scale: float,
                       bias: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """attend_cache as split-KV ("flash-decoding") kernels: each program streams K and V of
    one kv head over a range of slots once, for all the q heads that share it, with an online fp32
    softmax; a second kernel merges the ranges. Slots after `slot` (the current token's, a device
    tensor) are skipped: they hold nothing yet. q (B, H, 1, D) contiguous; kbuf, vbuf (B, Hkv, S, D)
    contiguous; bias (B, S) additive (0 / -inf) -> (B, H, 1, D) in q's dtype."""
    B, H, _, D = q.shape
    HKV, S = kbuf.shape[1], kbuf.shape[2]
    if H % HKV or D < 16 or D & (D - 1) or not all(t.is_contiguous() for t in (q, kbuf, vbuf, bias)) \
            or bias.shape != (B, S) or vbuf.shape != kbuf.shape or kbuf.dtype not in (torch.float32, torch.bfloat16,
                                                                                    torch.float16):
        raise ValueError(f"attend_cache_split: q {tuple(q.shape)}, kbuf {tuple(kbuf.shape)}, bias {tuple(bias.shape)}: "
                         f"expected contiguous (B, H, 1, D), (B, Hkv, S, D), (B, S), H a multiple of Hkv, "
                         f"D a power of two >= 16")
    units = -(-S // ATTN_UNIT)
    want = max(1, ATTN_PROGRAMS // (B * HKV))  # splits per (sequence, kv head)
    split = ATTN_UNIT * -(-units // min(want, units))
    nsplit = -(-S // split)
    rep = H // HKV
    part_o = torch.empty(B, H, nsplit, D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B, H, nsplit, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    kernels = _kernels()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kernels["attn_split"][(B, HKV, nsplit)](
        q, kbuf, vbuf, bias, slot, part_o, part_m, part_l, S, float(scale), HKV=HKV, REP=rep,
        REP_P=max(16, 1 << (rep - 1).bit_length()), D=D, SPLIT=split, NSPLIT=nsplit,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's CPU interpreter multiplies bf16 as raw bits: there the dots take fp32 copies
        DOT_DTYPE=tl.float32 if interpret else
        {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[kbuf.dtype],
        INTERPRET=interpret)
    out = torch.empty_like(q)
    kernels["attn_combine"][(B * H,)](part_o, part_m, part_l, out, NSPLIT=nsplit,
                                      NSPLIT_P=1 << (nsplit - 1).bit_length(), D=D, num_warps=4)
    if (q.device, q.dtype) not in ATTN_CHECKED:  # first call: against the reference
        later = torch.arange(S, device=q.device) > slot  # the reference masks the skipped slots too
        want = attend_cache(q, kbuf, vbuf, scale, bias.masked_fill(later, float("-inf")))
        check_agrees(f"the split-KV decode attention (op_decode) disagrees with attend_cache on {q.device} {q.dtype}",
                     [("output", out, want)])
        ATTN_CHECKED.add((q.device, q.dtype))
    return out


def check_agrees(what: str, pairs: list, tolerance: float = 0.05) -> None:
    """A fast path's check against its reference, which each runs on its first call per device and
    dtype: a kernel that miscompiles on some GPU or Triton version must fail loudly, not decode wrong
    tokens. pairs: (name, got, want); RuntimeError `what: ...` when a largest difference passes
    `tolerance` of want's largest value (bf16 rounding is ~1e-2)."""
    errors = relative_errors(pairs)
    if not all(e <= tolerance for e in errors.values()):
        raise RuntimeError(f"{what}: relative errors {errors}; decode without it (StaticEngine(..., fused=False) or "
                           f"fast_generate(..., fused=False)) and report this")
