"""One Gated DeltaNet decode token in two Triton kernels: what GatedDeltaNetMixer.mix does between
its projections and o_proj, for T = 1, with the states updated in place.

    y = gdn_step(q, k, v, a, b, gate, conv_state, conv_weight, S, A_log, dt_bias, norm_weight, eps)

1. qkv, one program per sequence and head of the conv channels [q heads | k heads | v heads]: the
   short causal conv over [conv_state, this token] (the window shifts by one in place; the program
   owns its channels), then q, k = L2norm(SiLU(.)), into an fp32 scratch row.
2. step, one program per sequence and q/value head (its k and v are those of its kv group): beta =
   sigmoid(b), g = -exp(A_log) softplus(a + dt_bias), the delta rule on the fp32 state (S <- exp(g) S;
   u = beta (v - S^T k); S <- S + k u^T; o = S^T q / sqrt(D)), then RMSNorm(o) * w * SiLU(gate).
Two kernels because the k/v conv window is shared by the heads of a group: shifting it in place in
the step kernel would race with the other heads' reads. Everything runs in fp32 and is rounded once,
to y's dtype. The eager step is ~45 small kernels per layer, each bound by launch latency, not bytes
(docs/results.md, issue 12).

The reference is the mixer's own mix() (tests/test_decode_kernels.py: the same outputs and states, in
Triton's CPU interpreter and on the GPU). This file imports only torch, op_common and op_decode
(Triton lazily, on the first call): export.py copies it beside the exported modeling file.
"""

import torch

from .op_common import lazy_kernels
from .op_decode import check_agrees

tl = None  # triton.language once _kernels() has run: a module global, where Triton looks for it


def _define(triton) -> dict:
    """The jitted kernels {"qkv", "step"} (once, through _kernels)."""

    @triton.jit
    def gdn_qkv_kernel(q_ptr, k_ptr, v_ptr, q_rs, k_rs, v_rs, conv_ptr, convw_ptr, x_ptr, H: tl.constexpr,
                       HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, HAS_CONV: tl.constexpr):
        b = tl.program_id(0)
        c = tl.program_id(1)  # a head of the conv channels [q heads | k heads | v heads]
        C = (H + 2 * HKV) * D
        d = tl.arange(0, D)
        ch = c * D + d
        if c < H:  # *_rs: row strides (the inputs may be column views of one packed projection)
            x = tl.load(q_ptr + b * q_rs + c * D + d).to(tl.float32)
        elif c < H + HKV:
            x = tl.load(k_ptr + b * k_rs + (c - H) * D + d).to(tl.float32)
        else:
            x = tl.load(v_ptr + b * v_rs + (c - H - HKV) * D + d).to(tl.float32)
        if HAS_CONV:
            x_in = x
            x = x_in * tl.load(convw_ptr + ch * W + W - 1).to(tl.float32)
            for w in tl.static_range(W - 1):  # taps 0..W-2 read the stored inputs, oldest first
                x += tl.load(conv_ptr + (b * (W - 1) + w) * C + ch).to(tl.float32) * \
                    tl.load(convw_ptr + ch * W + w).to(tl.float32)
            # shift the window in place (this program alone owns these channels). A value may live in
            # several threads, so barriers order every read of a row before any write to it.
            tl.debug_barrier()
            for w in tl.static_range(W - 2):
                nxt = tl.load(conv_ptr + (b * (W - 1) + w + 1) * C + ch)
                tl.debug_barrier()
                tl.store(conv_ptr + (b * (W - 1) + w) * C + ch, nxt)
                tl.debug_barrier()
            tl.store(conv_ptr + (b * (W - 1) + W - 2) * C + ch, x_in.to(conv_ptr.dtype.element_ty))
        if c < H + HKV:  # q and k: L2norm(SiLU(.)), F.normalize's eps
            x = x * tl.sigmoid(x)
            x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), 1e-12)
        tl.store(x_ptr + b * C + ch, x)

    @triton.jit
    def gdn_step_kernel(x_ptr, a_ptr, b_ptr, gate_ptr, a_rs, b_rs, gate_rs, s_ptr, alog_ptr, dtb_ptr, normw_ptr,
                        y_ptr, eps, scale, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # one q/value head; its k and v are kv head h // (H // HKV)
        j = h // (H // HKV)
        C = (H + 2 * HKV) * D
        d = tl.arange(0, D)
        q = tl.load(x_ptr + b * C + h * D + d)
        k = tl.load(x_ptr + b * C + (H + j) * D + d)
        v = tl.load(x_ptr + b * C + (H + HKV + j) * D + d)
        beta = tl.sigmoid(tl.load(b_ptr + b * b_rs + h).to(tl.float32))
        x = tl.load(a_ptr + b * a_rs + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
        softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # F.softplus's threshold
        g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus

        s_off = ((b * H + h) * D + d[:, None]) * D + d[None, :]  # S[b, h] is (K, V), row-major
        S = tl.load(s_ptr + s_off) * tl.exp(g)
        u = beta * (v - tl.sum(S * k[:, None], 0))
        S = S + k[:, None] * u[None, :]
        tl.store(s_ptr + s_off, S)
        o = tl.sum(S * q[:, None], 0) * scale

        o = o * (1.0 / tl.sqrt(tl.sum(o * o, 0) / D + eps))
        gate = tl.load(gate_ptr + b * gate_rs + h * D + d).to(tl.float32)
        y = o * tl.load(normw_ptr + d).to(tl.float32) * gate * tl.sigmoid(gate)
        tl.store(y_ptr + b * H * D + h * D + d, y.to(y_ptr.dtype.element_ty))

    return {"qkv": gdn_qkv_kernel, "step": gdn_step_kernel}


_kernels = lazy_kernels(globals(), _define)  # {name: jitted kernel}, defined on the first call


CHECKED = set()  # (device, dtype) where the kernel has matched its reference once


@torch.no_grad()
def check_once(x: torch.Tensor, state: dict, fused, reference, tolerance: float = 0.05) -> None:
    """On the first call for x's device and dtype: fused(copy of state) -> y against reference(copy of
    state) -> (y, new state), outputs and states (op_decode.check_agrees: RuntimeError past
    `tolerance` of the largest value)."""
    key = (x.device, x.dtype)
    if key in CHECKED:
        return
    want, want_state = reference({n: t.clone() for n, t in state.items()})
    trial = {n: t.clone() for n, t in state.items()}
    CHECKED.add(key)  # the fused call below must not check again
    try:
        got = fused(trial)
        check_agrees(f"the fused GDN decode kernel (op_gdn_step) disagrees with mix() on {x.device} {x.dtype}",
                     [("output", got, want)] + [(n, trial[n], want_state[n]) for n in want_state], tolerance)
    except Exception:
        CHECKED.discard(key)
        raise


# warps per program by head_dim, (qkv kernel, step kernel): the step holds one head's (D, D) fp32
# state tile and the q/k rows broadcast over it in registers. ptxas for sm_90 (bf16): D=64 at 8 warps
# 101 registers, no spills (4 warps: 184); D=128 at 16 warps 128 registers and 200 bytes of spills
# (4-8 warps: 255 registers and more spills; a V-split grid would avoid them).
NUM_WARPS = {16: (1, 1), 32: (1, 2), 64: (2, 8), 128: (4, 16)}


def supported(head_dim: int) -> bool:
    """The kernel holds a (D, D) state tile in registers: D a power of two from 16 to 128."""
    return head_dim in NUM_WARPS


def gdn_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             gate: torch.Tensor, conv_state: torch.Tensor | None, conv_weight: torch.Tensor | None,
             S: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
             eps: float) -> torch.Tensor:
    """One decode token. q, gate (B, H*D); k, v (B, Hkv*D) (the teacher's projections, q/k norms
    applied); a, b (B, H) (a_proj, b_proj outputs); these six may be column slices of one packed
    projection (any row stride, unit column stride). conv_state (B, W-1, (H + 2 Hkv) D) and S (B, H,
    D, D) fp32 are updated in place; conv_weight ((H + 2 Hkv) D, W). -> y (B, H*D) in q's dtype,
    ready for o_proj. conv_state/conv_weight None: no conv."""
    B, HD = q.shape
    H, D = S.shape[1], S.shape[-1]
    HKV = k.shape[1] // D
    if S.shape != (B, H, D, D) or S.dtype != torch.float32 or H * D != HD or H % HKV or not supported(D):
        raise ValueError(f"gdn_step: q {tuple(q.shape)}, k {tuple(k.shape)}, S {tuple(S.shape)} {S.dtype}: expected q "
                         f"(B, H*D), k (B, Hkv*D), S (B, H, D, D) float32 with D in 16..128 a power of two")
    has_conv = conv_state is not None
    W = conv_weight.shape[1] if has_conv else 2
    rows = (q, k, v, a, b, gate)
    for name, t, width in zip(("q", "k", "v", "a", "b", "gate"), rows, (HD, HKV * D, HKV * D, H, H, HD)):
        if t.shape != (B, width) or (t.stride(1) != 1 and width > 1):
            raise ValueError(f"gdn_step: {name} {tuple(t.shape)} stride {t.stride()}: expected ({B}, {width}) with "
                             f"unit column stride")
    for name, t in (("S", S), ("conv_state", conv_state), ("conv_weight", conv_weight)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"gdn_step: {name} must be contiguous (the kernel computes flat offsets)")
    C = (H + 2 * HKV) * D
    x = torch.empty(B, C, dtype=torch.float32, device=q.device)  # q, k (normalised) and v after the conv
    y = torch.empty(B, HD, dtype=q.dtype, device=q.device)
    dummy = S  # an unused pointer argument when there is no conv
    kernels = _kernels()
    kernels["qkv"][(B, H + 2 * HKV)](q, k, v, q.stride(0), k.stride(0), v.stride(0), conv_state if has_conv else dummy,
                                      conv_weight if has_conv else dummy, x, H=H, HKV=HKV, D=D, W=W,
                                      HAS_CONV=has_conv, num_warps=NUM_WARPS[D][0])
    kernels["step"][(B, H)](x, a, b, gate, a.stride(0), b.stride(0), gate.stride(0), S, A_log, dt_bias, norm_weight, y,
                            float(eps), float(D) ** -0.5, H=H, HKV=HKV, D=D, num_warps=NUM_WARPS[D][1])
    return y
