"""A Gated DeltaNet prompt pass without the eager elementwise ops around fla's chunk kernel, for the
static engine's prefill (no autograd): two Triton kernels where GatedDeltaNetMixer.mix runs ~30 ops.

    q, k, v, beta, g = gdn_prefill_inputs(q, k, v, a, b, conv_weight, A_log, dt_bias, mask)
    o, S = gdn(q, k, v, g, beta)                       # fla's chunk kernel (torch's chunked form on CPU)
    y = gated_rms_norm_prefill(o, gate, norm_weight, eps)   # then o_proj

1. inputs, one program per (sequence, block of tokens, head of the conv channels [q | k | v heads]):
   the short causal conv from the masked projections (a prompt starts from an empty window), then q,
   k = L2norm(SiLU(.)), written in the model's dtype with k and v expanded to the q heads (GQA) and k
   zeroed at pads; the q-head programs also write beta = sigmoid(b) and g = -exp(A_log) softplus(a +
   dt_bias), zero at pads, in fp32.
2. norm, one program per (sequence, block of tokens, head): RMSNorm(o) * w * SiLU(gate) with
   HeadRMSNorm's and the eager product's roundings.
mix() runs the same math op by op; at batch 1 and 16K tokens its ~30 eager ops per GDN layer cost
more host time than their GPU work (docs/results.md, issue 12). The conv and norms here keep fp32
inside and round once where mix() rounds after each op.

The reference is mix() (tests/test_decode_kernels.py, in Triton's CPU interpreter). This file imports
only torch and op_common (Triton lazily, on the first call): export.py copies it beside the exported modeling file.
"""

import torch

from .op_common import lazy_kernels

tl = None  # triton.language once _kernels() has run: a module global, where Triton looks for it
BLOCK_T = 16  # tokens per program
CHECKED = set()  # (device, dtype) where GatedDeltaNetMixer.prefill_fused has matched mix() once


def _define(triton) -> dict:
    """The jitted kernels {"inputs", "norm"} (once, through _kernels)."""

    @triton.jit
    def inputs_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, q_sb, q_st, k_sb, k_st, v_sb, v_st, ab_sb, ab_st,
                      convw_ptr, mask_ptr, alog_ptr, dtb_ptr, qo_ptr, ko_ptr, vo_ptr, beta_ptr, g_ptr, T,
                      H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
                      HAS_CONV: tl.constexpr, HAS_MASK: tl.constexpr):
        bi = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements at many rows x long prompts
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(2)  # a head of the conv channels [q heads | k heads | v heads]
        d = tl.arange(0, D)
        ch = c * D + d
        # *_sb, *_st: batch and token strides (the inputs may be column views of one packed projection)
        if c < H:
            src, sb, st = q_ptr + c * D, q_sb, q_st
        elif c < H + HKV:
            src, sb, st = k_ptr + (c - H) * D, k_sb, k_st
        else:
            src, sb, st = v_ptr + (c - H - HKV) * D, v_sb, v_st
        ok_t = t < T
        if HAS_MASK:
            m = tl.load(mask_ptr + bi * T + t, mask=ok_t, other=0.0).to(tl.float32)
        if HAS_CONV:  # y[t] = sum_j w[:, j] x[t - (W - 1) + j], the masked inputs, zero before the prompt
            x = tl.zeros((BLOCK_T, D), tl.float32)
            for j in tl.static_range(W):
                tt = t - (W - 1) + j
                ok = (tt >= 0) & (tt < T)
                xj = tl.load(src + bi * sb + tt[:, None] * st + d[None, :], mask=ok[:, None], other=0.0)
                xj = xj.to(tl.float32)
                if HAS_MASK:
                    xj = xj * tl.load(mask_ptr + bi * T + tt, mask=ok, other=0.0).to(tl.float32)[:, None]
                x += xj * tl.load(convw_ptr + ch * W + j).to(tl.float32)[None, :]
        else:
            x = tl.load(src + bi * sb + t[:, None] * st + d[None, :], mask=ok_t[:, None], other=0.0).to(tl.float32)
        REP: tl.constexpr = H // HKV
        out_ty = qo_ptr.dtype.element_ty
        if c < H + HKV:  # q and k: L2norm(SiLU(.)), F.normalize's eps
            x = x * tl.sigmoid(x)
            x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)[:, None]
        if c < H:
            tl.store(qo_ptr + ((bi * T + t[:, None]) * H + c) * D + d[None, :], x.to(out_ty), mask=ok_t[:, None])
            # this q head's gates (the token's a and b columns)
            ab = (bi * ab_sb + t * ab_st) + c
            beta = tl.sigmoid(tl.load(b_ptr + ab, mask=ok_t, other=0.0).to(tl.float32))
            z = tl.load(a_ptr + ab, mask=ok_t, other=0.0).to(tl.float32) + tl.load(dtb_ptr + c).to(tl.float32)
            softplus = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))  # F.softplus's threshold
            g = -tl.exp(tl.load(alog_ptr + c).to(tl.float32)) * softplus
            if HAS_MASK:  # beta = 0, g = 0 at pads: the state passes through unchanged
                beta, g = beta * m, g * m
            tl.store(beta_ptr + (bi * T + t) * H + c, beta, mask=ok_t)
            tl.store(g_ptr + (bi * T + t) * H + c, g, mask=ok_t)
        else:  # k or v: one copy per q head of its group
            is_k = c < H + HKV
            if is_k and HAS_MASK:
                x = x * m[:, None]
            j0 = (c - H) * REP if is_k else (c - H - HKV) * REP
            dst = ko_ptr if is_k else vo_ptr
            for r in tl.static_range(REP):
                tl.store(dst + ((bi * T + t[:, None]) * H + j0 + r) * D + d[None, :], x.to(out_ty), mask=ok_t[:, None])

    @triton.jit
    def norm_kernel(o_ptr, o_sb, o_st, o_sh, gate_ptr, gate_sb, gate_st, w_ptr, y_ptr, eps, T,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
        bi = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(2)
        d = tl.arange(0, D)
        ok = (t < T)[:, None]
        o_ty = o_ptr.dtype.element_ty
        y_ty = y_ptr.dtype.element_ty
        o = tl.load(o_ptr + bi * o_sb + t[:, None] * o_st + h * o_sh + d[None, :], mask=ok, other=0.0).to(tl.float32)
        normed = (o * tl.rsqrt(tl.sum(o * o, 1) / D + eps)[:, None]).to(o_ty).to(tl.float32)  # HeadRMSNorm's roundings
        normed = (tl.load(w_ptr + d).to(tl.float32)[None, :] * normed).to(y_ty).to(tl.float32)
        gate = tl.load(gate_ptr + bi * gate_sb + t[:, None] * gate_st + h * D + d[None, :], mask=ok,
                       other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(y_ty).to(tl.float32)  # F.silu in the gate's dtype
        tl.store(y_ptr + ((bi * T + t[:, None]) * H + h) * D + d[None, :], (normed * act).to(y_ty), mask=ok)

    return {"inputs": inputs_kernel, "norm": norm_kernel}


_kernels = lazy_kernels(globals(), _define)  # {name: jitted kernel}, defined on the first call


def _token_strides(t: torch.Tensor, name: str, B: int, T: int, width: int) -> tuple[int, int]:
    """(batch stride, token stride) of a (B, T, width) tensor with unit column stride (any row strides:
    e.g. a column slice of one packed projection, or a (B, T, heads, D) tensor viewed flat)."""
    if t.shape[:2] != (B, T) or t[0, 0].numel() != width or (width > 1 and t.stride(-1) != 1) or (
            t.dim() == 4 and t.stride(2) != t.shape[3]):
        raise ValueError(f"gdn prefill: {name} {tuple(t.shape)} stride {t.stride()}: expected ({B}, {T}, {width}) "
                         "with unit column stride")
    return t.stride(0), t.stride(1)


@torch.no_grad()
def gdn_prefill_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       conv_weight: torch.Tensor | None, A_log: torch.Tensor, dt_bias: torch.Tensor,
                       mask: torch.Tensor | None, head_dim: int) -> tuple[torch.Tensor, ...]:
    """A prompt from an empty state. q (B, T, H*D or H, D); k, v (B, T, Hkv*D or Hkv, D) (the teacher's
    projections, q/k norms applied, pads zeroed); a, b (B, T, H); mask (B, T) (1 = real token) or
    None; conv_weight ((H + 2 Hkv) D, W) or None. -> q, k, v (B, T, H, D) in q's dtype (k, v expanded
    to the q heads, k zero at pads), beta, g (B, T, H) fp32 (zero at pads): gdn()'s arguments."""
    B, T = q.shape[:2]
    D = head_dim
    H, HKV = q[0, 0].numel() // D, k[0, 0].numel() // D
    if H % HKV or D & (D - 1) or D < 16 or a.shape != (B, T, H) or b.shape != a.shape:
        raise ValueError(f"gdn prefill: q {tuple(q.shape)}, k {tuple(k.shape)}, a {tuple(a.shape)}: expected H a "
                         f"multiple of Hkv, head_dim a power of two >= 16, a and b (B, T, H)")
    strides = [_token_strides(t, n, B, T, w) for t, n, w in ((q, "q", H * D), (k, "k", HKV * D), (v, "v", HKV * D))]
    if a.stride() != b.stride() or a.stride(-1) != 1:
        raise ValueError(f"gdn prefill: a {a.stride()} and b {b.stride()}: expected the same strides, unit column stride")
    out = [torch.empty(B, T, H, D, dtype=q.dtype, device=q.device) for _ in range(3)]
    beta, g = (torch.empty(B, T, H, dtype=torch.float32, device=q.device) for _ in range(2))
    has_conv = conv_weight is not None
    maskf = mask.to(torch.float32).contiguous() if mask is not None else beta  # beta: an unused pointer
    _kernels()["inputs"][(B, -(-T // BLOCK_T), H + 2 * HKV)](
        q, k, v, a, b, *strides[0], *strides[1], *strides[2], a.stride(0), a.stride(1),
        conv_weight.contiguous() if has_conv else beta, maskf, A_log, dt_bias, *out, beta, g, T, H=H, HKV=HKV, D=D,
        W=conv_weight.shape[1] if has_conv else 1, BLOCK_T=BLOCK_T, HAS_CONV=has_conv, HAS_MASK=mask is not None,
        num_warps=4)
    return (*out, beta, g)


@torch.no_grad()
def gated_rms_norm_prefill(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """o (B, T, H, D) (any strides with a unit last one), gate (B, T, H*D) (column view allowed) ->
    HeadRMSNorm(o) * SiLU(gate) as (B, T, H*D) in gate's dtype (mixer_base.gated_rms_norm's math)."""
    B, T, H, D = o.shape
    if o.stride(-1) != 1 or D & (D - 1) or weight.shape != (D,):
        raise ValueError(f"gdn prefill norm: o {tuple(o.shape)} stride {o.stride()}, weight {tuple(weight.shape)}: "
                         "expected (B, T, H, D) with unit last stride, D a power of two")
    gs = _token_strides(gate, "gate", B, T, H * D)
    y = torch.empty(B, T, H * D, dtype=gate.dtype, device=o.device)
    _kernels()["norm"][(B, -(-T // BLOCK_T), H)](o, o.stride(0), o.stride(1), o.stride(2), gate, *gs, weight, y,
                                                  float(eps), T, H=H, D=D, BLOCK_T=BLOCK_T, num_warps=4)
    return y
