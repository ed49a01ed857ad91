"""Gated DeltaNet's elementwise work in training, with autograd: between the packed projection and
fla's chunk kernel in one Triton kernel each way, where a compiled mix() runs ~6 fused graphs that
read and write the packed projection's misaligned column slices several times; and the output norm.

    q, k, v, beta, g, gate = gdn_train_inputs(P, conv_weight, A_log, dt_bias, H, HKV, D)
    o, _ = gdn(q, k, v, g, beta)                       # fla's chunk kernel, its own autograd
    y = gdn_train_norm(o, gate, norm_weight, eps)      # then o_proj

P (B, T, PW) is the packed projection's output (TeacherInitMixer.project_packed), columns
[q (H D) | k (HKV D) | v (HKV D) | a (H) | b (H) | gate (H D) | zero padding]. Forward: op_gdn_prefill's
inputs kernel (no pads: training rows are whole) and a copy of the gate columns. Backward, two
kernels, each with one program per (sequence, block of tokens, head of the conv channels [q | k | v
heads]): gdn_train_inputs_bwd forms the conv output's gradient once per token (the SiLU and L2 norm's
backward from q's gradient; k and v sum their GQA copies) into a scratch tensor of P's dtype, the q-head
programs add the gates' gradients (beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)), copy the
gate's, and the first program zeroes the padding columns; gdn_train_conv_bwd then runs the causal conv
backwards (dx[t] from dy[t .. t + W - 1]) into dP and sums the conv weight's share of each block. With
no conv the first kernel writes dP itself. Every column of dP is written once, with no concatenation
of per-slice gradients. The output's gated RMSNorm likewise: forward op_gdn_prefill's norm kernel,
backward one kernel per (sequence, block of tokens, head) with partial sums for the norm weight.

The reference is GatedDeltaNetMixer.mix()'s op-by-op path (tests/test_gdn_train.py: values and
gradients, in Triton's CPU interpreter; on the GPU, compiled). This file imports only torch and its
op neighbours (Triton lazily): export.py copies it beside the exported modeling file.
"""

import torch

from .op_common import lazy_kernels
from .op_gdn_prefill import gated_rms_norm_prefill, gdn_prefill_inputs

tl = None  # triton.language once _kernels() has run
BLOCK_T = {16: 16, 32: 16, 64: 16, 128: 8}  # tokens per backward program by head_dim: no spills on sm_90
CONV_BLOCK_T = {16: 64, 32: 64, 64: 32, 128: 16}  # the same for the conv's backward


def _define(triton) -> dict:
    @triton.jit
    def conv_out_grad(src, p_st, convw_ptr, dq_ptr, dk_ptr, dv_ptr, bi, tt, c, d, ch, T, H: tl.constexpr,
                      HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
                      HAS_CONV: tl.constexpr):
        """The gradient of channel head c's conv output at tokens tt (BLOCK_T,), fp32 (BLOCK_T, D), 0 past T."""
        ok = tt < T
        if HAS_CONV:
            y = tl.zeros((BLOCK_T, D), tl.float32)
            for j in tl.static_range(W):
                ts = tt - (W - 1) + j
                okj = (ts >= 0) & (ts < T)
                xj = tl.load(src + ts[:, None] * p_st + d[None, :], mask=okj[:, None], other=0.0).to(tl.float32)
                y += xj * tl.load(convw_ptr + ch * W + j).to(tl.float32)[None, :]
        else:
            y = tl.load(src + tt[:, None] * p_st + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        REP: tl.constexpr = H // HKV
        dy = tl.zeros((BLOCK_T, D), tl.float32)
        if c < H + HKV:  # q, k: n = s / max(|s|, eps), s = SiLU(y); dn from q's grad or k's GQA copies
            if c < H:
                dn = tl.load(dq_ptr + ((bi * T + tt[:, None]) * H + c) * D + d[None, :], mask=ok[:, None],
                             other=0.0).to(tl.float32)
            else:
                dn = tl.zeros((BLOCK_T, D), tl.float32)
                for copy in tl.static_range(REP):
                    dn += tl.load(dk_ptr + ((bi * T + tt[:, None]) * H + (c - H) * REP + copy) * D + d[None, :],
                                  mask=ok[:, None], other=0.0).to(tl.float32)
            sig = tl.sigmoid(y)
            s = y * sig
            norm = tl.sqrt(tl.sum(s * s, 1))
            r = tl.maximum(norm, 1e-12)  # F.normalize's eps
            n = s / r[:, None]
            along = tl.where(norm > 1e-12, tl.sum(n * dn, 1), 0.0)
            ds = (dn - n * along[:, None]) / r[:, None]
            dy = ds * sig * (1.0 + y * (1.0 - sig))
        else:  # v: no activation; the sum of its GQA copies' grads
            for copy in tl.static_range(REP):
                dy += tl.load(dv_ptr + ((bi * T + tt[:, None]) * H + (c - H - HKV) * REP + copy) * D + d[None, :],
                              mask=ok[:, None], other=0.0).to(tl.float32)
        return tl.where(ok[:, None], dy, 0.0)

    globals()["conv_out_grad"] = conv_out_grad  # Triton resolves the kernel's callees in the module's globals

    @triton.jit
    def gdn_train_inputs_bwd(p_ptr, p_sb, p_st, convw_ptr, alog_ptr, dtb_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,
                             dgate_ptr, dp_ptr, dy_ptr, dalog_ptr, ddtb_ptr, T, PW,
                             H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                             BLOCK_T: tl.constexpr, HAS_CONV: tl.constexpr, NPAD: tl.constexpr, PAD_BLOCK: tl.constexpr):
        """The conv output's gradient of channel head c at this block's tokens, once: into dy (B, T, C D), or
        with no conv straight into dP; the q-head programs also write the gates' and the gate's columns."""
        bi = tl.program_id(0).to(tl.int64)
        tb = tl.program_id(1)
        c = tl.program_id(2)
        part = bi * tl.num_programs(1) + tb  # this program's row of the partial-sum buffers
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        ch = c * D + d
        C: tl.constexpr = H + 2 * HKV
        ok = t < T
        src = p_ptr + bi * p_sb + c * D  # conv channel head c: P's columns [c D, c D + D)
        row = dp_ptr + (bi * T + t) * PW  # dP: contiguous (B, T, PW)
        dst = row[:, None]
        dy = conv_out_grad(src, p_st, convw_ptr, dq_ptr, dk_ptr, dv_ptr, bi, t, c, d, ch, T, H, HKV, D, W, BLOCK_T,
                           HAS_CONV)
        out_ty = dp_ptr.dtype.element_ty
        if HAS_CONV:  # gdn_train_conv_bwd takes it from here
            tl.store(dy_ptr + (bi * T + t[:, None]) * (C * D) + ch[None, :], dy.to(dy_ptr.dtype.element_ty),
                     mask=ok[:, None])
        else:
            tl.store(dst + ch[None, :], dy.to(out_ty), mask=ok[:, None])
        if c < H:  # this head's gates and gate columns
            A = C * D  # first a column
            a = tl.load(p_ptr + bi * p_sb + t * p_st + A + c, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(p_ptr + bi * p_sb + t * p_st + A + H + c, mask=ok, other=0.0).to(tl.float32)
            dg = tl.load(dg_ptr + (bi * T + t) * H + c, mask=ok, other=0.0).to(tl.float32)
            dbeta = tl.load(dbeta_ptr + (bi * T + t) * H + c, mask=ok, other=0.0).to(tl.float32)
            z = a + tl.load(dtb_ptr + c).to(tl.float32)
            decay = -tl.exp(tl.load(alog_ptr + c).to(tl.float32))
            softplus = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))  # F.softplus's threshold
            da = dg * decay * tl.where(z > 20.0, 1.0, tl.sigmoid(z))
            beta = tl.sigmoid(b)
            tl.store(row + A + c, da.to(out_ty), mask=ok)
            tl.store(row + A + H + c, (dbeta * beta * (1.0 - beta)).to(out_ty), mask=ok)
            tl.store(dalog_ptr + part * H + c, tl.sum(dg * decay * softplus, 0))  # dg/dA_log = g
            tl.store(ddtb_ptr + part * H + c, tl.sum(da, 0))
            G = A + 2 * H  # first gate column
            dgate = tl.load(dgate_ptr + (bi * T + t[:, None]) * (H * D) + ch[None, :], mask=ok[:, None], other=0.0)
            tl.store(dst + G + ch[None, :], dgate.to(out_ty), mask=ok[:, None])
            if NPAD > 0:
                if c == 0:
                    cols = tl.arange(0, PAD_BLOCK)
                    tl.store(dst + G + H * D + cols[None, :], tl.zeros((BLOCK_T, PAD_BLOCK), tl.float32).to(out_ty),
                             mask=ok[:, None] & (cols < NPAD)[None, :])

    @triton.jit
    def gdn_train_conv_bwd(p_ptr, p_sb, p_st, convw_ptr, dy_ptr, dp_ptr, dw_ptr, T, PW, CD: tl.constexpr,
                           D: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr):
        """The causal conv's backward for channel head c: y[t] = sum_j w_j x[t - (W-1) + j], so
        dx[t] = sum_s w_{W-1-s} dy[t + s] into dP's columns, and this block's share of dw_j = sum_t dy[t] x[t-(W-1)+j]."""
        bi = tl.program_id(0).to(tl.int64)
        tb = tl.program_id(1)
        c = tl.program_id(2)
        part = bi * tl.num_programs(1) + tb
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        ch = c * D + d
        ok = t < T
        dyb = dy_ptr + bi * T * CD + ch[None, :]
        dy0 = tl.load(dyb + t[:, None] * CD, mask=ok[:, None], other=0.0).to(tl.float32)
        dx = dy0 * tl.load(convw_ptr + ch * W + W - 1).to(tl.float32)[None, :]
        for s in tl.static_range(1, W):
            ts = t + s
            dys = tl.load(dyb + ts[:, None] * CD, mask=(ts < T)[:, None], other=0.0).to(tl.float32)
            dx += dys * tl.load(convw_ptr + ch * W + W - 1 - s).to(tl.float32)[None, :]
        tl.store(dp_ptr + (bi * T + t[:, None]) * PW + ch[None, :], dx.to(dp_ptr.dtype.element_ty), mask=ok[:, None])
        src = p_ptr + bi * p_sb + c * D
        for j in tl.static_range(W):
            ts = t - (W - 1) + j
            okj = (ts >= 0) & (ts < T)
            xj = tl.load(src + ts[:, None] * p_st + d[None, :], mask=okj[:, None], other=0.0).to(tl.float32)
            tl.store(dw_ptr + (part * CD + ch) * W + j, tl.sum(dy0 * xj, 0))

    @triton.jit
    def gdn_train_norm_bwd(o_ptr, gate_ptr, w_ptr, dy_ptr, do_ptr, dgate_ptr, dw_ptr, eps, T,
                        H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
        """y = w * RMSNorm(o) * SiLU(gate) per (token, head) backward; o, do (B, T, H, D), gate, dy, dgate
        (B, T, H D), all contiguous: one flat index. dw: this program's partial sum."""
        bi = tl.program_id(0).to(tl.int64)
        tb = tl.program_id(1)
        h = tl.program_id(2)
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        ok = (t < T)[:, None]
        idx = ((bi * T + t[:, None]) * H + h) * D + d[None, :]
        o = tl.load(o_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d).to(tl.float32)[None, :]
        rstd = tl.rsqrt(tl.sum(o * o, 1) / D + eps)[:, None]
        n = o * rstd
        sig = tl.sigmoid(gate)
        dnw = dy * gate * sig  # d(w n)
        tl.store(dw_ptr + ((bi * tl.num_programs(1) + tb) * H + h) * D + d, tl.sum(dnw * n, 0))
        dn = dnw * w
        do = rstd * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
        tl.store(do_ptr + idx, do.to(do_ptr.dtype.element_ty), mask=ok)
        dgate = dy * w * n * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dgate_ptr + idx, dgate.to(dgate_ptr.dtype.element_ty), mask=ok)

    return {"bwd": gdn_train_inputs_bwd, "conv_bwd": gdn_train_conv_bwd,  # the names the profiler shows
            "norm_bwd": gdn_train_norm_bwd}


_kernels = lazy_kernels(globals(), _define)


def packed_layout(H: int, HKV: int, D: int) -> list[int]:
    """The column counts of P before its padding: q, k, v, a, b, gate."""
    return [H * D, HKV * D, HKV * D, H, H, H * D]


class _GdnInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, conv_weight, A_log, dt_bias, H, HKV, D):
        q, k, v, a, b, gate = P.split(packed_layout(H, HKV, D) + [P.shape[-1] - sum(packed_layout(H, HKV, D))], -1)[:6]
        outs = gdn_prefill_inputs(q, k, v, a, b, conv_weight, A_log, dt_bias, None, D)
        ctx.save_for_backward(P, conv_weight, A_log, dt_bias)
        ctx.dims = (H, HKV, D)
        return (*outs, gate.contiguous())

    @staticmethod
    def backward(ctx, dq, dk, dv, dbeta, dg, dgate):
        P, conv_weight, A_log, dt_bias = ctx.saved_tensors
        H, HKV, D = ctx.dims
        B, T, PW = P.shape
        qkv_shape, gate_shape = (B, T, H, D), (B, T, H * D)
        dq, dk, dv, dgate = (torch.zeros(s, dtype=P.dtype, device=P.device) if t is None else t.contiguous()
                             for t, s in ((dq, qkv_shape), (dk, qkv_shape), (dv, qkv_shape), (dgate, gate_shape)))
        dbeta, dg = (torch.zeros(B, T, H, dtype=torch.float32, device=P.device) if t is None else t.contiguous()
                     for t in (dbeta, dg))
        C, W = H + 2 * HKV, 1 if conv_weight is None else conv_weight.shape[1]
        block_t = BLOCK_T.get(D, 8)
        nt = -(-T // block_t)
        dP = torch.empty(B, T, PW, dtype=P.dtype, device=P.device)
        dy = dP if conv_weight is None else torch.empty(B, T, C * D, dtype=P.dtype, device=P.device)
        dalog, ddtb = (torch.empty(B * nt, H, dtype=torch.float32, device=P.device) for _ in range(2))
        npad = PW - sum(packed_layout(H, HKV, D))
        _kernels()["bwd"][(B, nt, C)](
            P, P.stride(0), P.stride(1), dalog if conv_weight is None else conv_weight, A_log, dt_bias, dq, dk, dv,
            dbeta, dg, dgate, dP, dy, dalog, ddtb, T, PW, H=H, HKV=HKV, D=D, W=W, BLOCK_T=block_t,
            HAS_CONV=conv_weight is not None, NPAD=npad, PAD_BLOCK=max(16, 1 << max(npad - 1, 0).bit_length()),
            num_warps=4)
        dconv = None
        if conv_weight is not None:
            block_c = CONV_BLOCK_T.get(D, 16)
            nc = -(-T // block_c)
            dw = torch.empty(B * nc, C * D, W, dtype=torch.float32, device=P.device)
            _kernels()["conv_bwd"][(B, nc, C)](P, P.stride(0), P.stride(1), conv_weight, dy, dP, dw, T, PW, CD=C * D,
                                               D=D, W=W, BLOCK_T=block_c, num_warps=4)
            dconv = dw.sum(0).to(conv_weight.dtype)
        return dP, dconv, dalog.sum(0).to(A_log.dtype), ddtb.sum(0).to(dt_bias.dtype), None, None, None


class _GdnNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, gate, weight, eps):
        o, gate = o.contiguous(), gate.contiguous()
        ctx.save_for_backward(o, gate, weight)
        ctx.eps = eps
        return gated_rms_norm_prefill(o, gate, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        o, gate, weight = ctx.saved_tensors
        B, T, H, D = o.shape
        block_t = BLOCK_T.get(D, 8)
        nt = -(-T // block_t)
        do, dgate = torch.empty_like(o), torch.empty_like(gate)
        dw = torch.empty(B * nt * H, D, dtype=torch.float32, device=o.device)
        _kernels()["norm_bwd"][(B, nt, H)](o, gate, weight, dy.contiguous(), do, dgate, dw, float(ctx.eps), T, H=H, D=D,
                                           BLOCK_T=block_t, num_warps=4)
        return do, dgate, dw.sum(0).to(weight.dtype), None


def gdn_train_norm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """o (B, T, H, D), gate (B, T, H D) -> RMSNorm(o) * weight * SiLU(gate) as (B, T, H D) in gate's dtype
    (mixer_base.gated_rms_norm's math; forward op_gdn_prefill's norm kernel), with gradients for all three."""
    return _GdnNorm.apply(o, gate, weight, eps)


def gdn_train_inputs(P: torch.Tensor, conv_weight: torch.Tensor | None, A_log: torch.Tensor, dt_bias: torch.Tensor,
                     H: int, HKV: int, D: int) -> tuple[torch.Tensor, ...]:
    """P (B, T, PW) (unit column stride, the layout above) -> q, k, v (B, T, H, D) in P's dtype (k and v
    expanded to the q heads), beta, g (B, T, H) fp32, gate (B, T, H D): mix()'s inputs of gdn() and of the
    gated norm, for whole rows (no pads) from an empty state, with gradients for P, conv_weight ((H + 2 HKV) D,
    W) or None, A_log and dt_bias (H,)."""
    if P.stride(-1) != 1 or P.shape[-1] < sum(packed_layout(H, HKV, D)) or D & (D - 1) or D < 16 or H % HKV:
        raise ValueError(f"gdn_train_inputs: P {tuple(P.shape)} stride {P.stride()} for H={H}, HKV={HKV}, D={D}: "
                         f"expected >= {sum(packed_layout(H, HKV, D))} columns of unit stride, D a power of two >= 16, "
                         "H a multiple of HKV")
    return _GdnInputs.apply(P, conv_weight, A_log, dt_bias, H, HKV, D)
