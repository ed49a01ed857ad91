"""Gated DeltaNet (GDN) kernel: recurrent reference, chunked torch form, fla fast path.

The recurrence, per head, with the state S in [K, V] layout (fla's `chunk_gated_delta_rule`):

    S'_t = exp(g_t) * S_{t-1}                  # decay first (g is a log decay, <= 0)
    u_t  = beta_t * (v_t - S'_t^T k_t)          # delta rule: correct what the state recalls for k_t
    S_t  = S'_t + k_t u_t^T
    o_t  = scale * S_t^T q_t                    # scale defaults to K**-0.5

i.e. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. The caller does the q/k
L2 norm, the beta sigmoid and the decay parametrisation. v may have more heads than q/k (HV a
multiple of H, fla's grouped value attention): value head h reads q/k head h // (HV // H).

Layout (B, T, H, D) everywhere; states (B, HV, K, V) in float32 (float64 for float64 inputs, so
the tests can compare in double precision); outputs in v's dtype. The torch paths compute in
float32 for bf16/fp16 inputs.

This file imports only torch (fla lazily, for CUDA tensors) and nothing from the rest of the
package: export.py copies it beside the exported modeling file.
"""

import warnings

import torch
import torch.nn.functional as F

from .op_common import compute_dtype, fla_module, needs_grad, pick_kernel, relative_errors, to_chunks

def _check(q, k, v, g, beta, initial_state) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gdn: expected q, k (B, T, H, K) and v (B, T, HV, V); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"gdn: v has {HV} heads, not a multiple of the {H} q/k heads")
    if g.shape != (B, T, HV) or beta.shape != (B, T, HV):
        raise ValueError(f"gdn: expected g and beta of shape {(B, T, HV)} (one scalar per value head); "
                         f"got g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, HV, K, V):
        raise ValueError(f"gdn: expected initial_state of shape {(B, HV, K, V)} ([B, HV, K, V] like fla); "
                         f"got {tuple(initial_state.shape)}")


def _expand_qk(q: torch.Tensor, k: torch.Tensor, HV: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, H, K) -> (B, T, HV, K): value head h uses q/k head h // (HV // H)."""
    G = HV // q.shape[2]
    if G == 1:
        return q, k
    return q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)


def gdn_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token loop, the ground truth.

    q, k: (B, T, H, K); v: (B, T, HV, V); g, beta: (B, T, HV); initial_state: (B, HV, K, V).
    Returns o (B, T, HV, V) in v's dtype and the final state (B, HV, K, V) or None.
    """
    _check(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dt, out_dtype = compute_dtype(v), v.dtype
    scale = K ** -0.5 if scale is None else scale
    q, k = _expand_qk(q, k, HV)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))  # (B, HV, V)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, dim=1) if T else v.new_zeros(B, 0, HV, V, dtype=dt)
    return o.to(out_dtype), (S if output_final_state else None)


def gdn_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                scale: float | None = None, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form (WY representation), the CPU default. Same arguments as gdn_recurrent.

    Inside a chunk of C tokens with cumulative log decay G_i = g_1 + ... + g_i and chunk-start
    state S_0, the corrected values u solve the unit lower-triangular system
        (I + A) u = beta * v - beta * exp(G) * k S_0,   A_ij = beta_i exp(G_i - G_j) k_i.k_j  (j < i)
    then o_i = scale * (exp(G_i) q_i^T S_0 + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) u_j) and
    S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j u_j^T. Everything but the S_0 hand-off between
    chunks runs for all chunks at once. T need not be a multiple of C: the tail is padded with
    beta = 0, g = 0, k = 0, which leaves the state untouched.
    """
    _check(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dt, out_dtype = compute_dtype(v), v.dtype
    scale = K ** -0.5 if scale is None else scale
    C = int(chunk_size)
    n = max(1, -(-T // C))
    q, k = _expand_qk(q, k, HV)

    q, k, v, g, beta = (to_chunks(t, C, dt) for t in (q, k, v, g, beta))  # (B, HV, n, C, ...)
    q = q * scale
    G = g.cumsum(-1)  # (B, HV, n, C)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~incl, float("-inf")).exp()  # (B, HV, n, C, C)
    A = (k @ k.transpose(-1, -2)) * decay.masked_fill(~strict, 0.0) * beta[..., :, None]
    eye = torch.eye(C, dtype=dt, device=q.device)
    W = torch.linalg.solve_triangular(eye + A, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    U0 = torch.linalg.solve_triangular(eye + A, beta[..., None] * v, upper=False, unitriangular=True)
    Aqk = (q @ k.transpose(-1, -2)) * decay  # (B, HV, n, C, C)
    qG = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # decay from token j to the chunk end
    g_end = G[..., -1].exp()  # (B, HV, n)

    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for i in range(n):
        u = U0[:, :, i] - W[:, :, i] @ S  # (B, HV, C, V)
        out.append(qG[:, :, i] @ S + Aqk[:, :, i] @ u)
        S = S * g_end[:, :, i, None, None] + k_to_end[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(B, HV, n * C, V)[:, :, :T].transpose(1, 2)  # (B, T, HV, V)
    return o.to(out_dtype), (S if output_final_state else None)


HOPPER_WORKAROUND = "checked"  # fla #640 on Hopper with Triton < 3.7.1: "checked" | "narrow" | "pad" (see below)
WORKAROUNDS = ("checked", "narrow", "pad")
DQKWG_VERDICT = {}  # (device, dtype, H, K, HV, V) -> "fla" | "narrow": what "checked" found on its first call


def _fla_hopper_bug() -> bool:
    """fla #640: on Hopper with 3.4 <= Triton < 3.7.1, fla's gated chunk_bwd_dqkwg miscompiles at
    block width 64 (wrong dk/dg) and fla 0.6 refuses the whole GDN backward there. The issue's
    bisection shows widths 32 and 128 are correct. fla's guard was seen on the H100 and the H200 with
    torch 2.11 / Triton 3.6; on the H200 the width-64 gradients then matched the reference
    (bench_train.py --sections=kpad, 2026-12-02), which is why "checked" exists."""
    fu = fla_module("fla.utils")
    return bool(getattr(fu, "IS_NVIDIA_HOPPER", False) and getattr(fu, "TRITON_ABOVE_3_4_0", False)
                and not getattr(fu, "TRITON_ABOVE_3_7_1", True))


def _guard_dqkwg() -> None:
    """Installs (once) the wrapper of the GDN backward's one affected kernel, chunk_bwd_dqkwg, that the
    "narrow" and "checked" workarounds for fla #640 share; every other kernel runs at K = 64 as fla
    picks.
    - "narrow": the kernel at block width 32 (K = 64 in two blocks): correct by the bisection, and
      1.46x fla's fwd+bwd time on the H200 (kpad).
    - "checked": fla's own width 64, checked against the narrow
      result on the first real call per (device, dtype, heads, head dims), the key fla tunes the
      kernel by; where they disagree (the miscompile) it warns and keeps to narrow.
    fla sizes that kernel's blocks from its module's `check_shared_mem` (Hopper -> 128, ... -> 32) and
    refuses to run while its `TRITON_ABOVE_3_7_1` is False; the wrapper sets what it needs for the
    length of its call only. Module globals: one backward at a time per process, as autograd runs
    them; the rest of fla never sees the change."""
    chunk = fla_module("fla.ops.gated_delta_rule.chunk")
    if getattr(chunk.chunk_bwd_dqkwg, "original", None) is not None:
        return
    chunk_o, original = fla_module("fla.ops.common.chunk_o"), chunk.chunk_bwd_dqkwg

    def run(narrow: bool, args, kwargs):
        saved = chunk_o.check_shared_mem, chunk_o.TRITON_ABOVE_3_7_1
        if narrow:
            chunk_o.check_shared_mem = lambda *a, **k: False
        chunk_o.TRITON_ABOVE_3_7_1 = True
        try:
            return original(*args, **kwargs)
        finally:
            chunk_o.check_shared_mem, chunk_o.TRITON_ABOVE_3_7_1 = saved

    def chunk_bwd_dqkwg(*args, **kwargs):
        k, v = kwargs["k"] if "k" in kwargs else args[1], kwargs["v"] if "v" in kwargs else args[2]
        key = (k.device, k.dtype, *k.shape[2:], *v.shape[2:])  # fla tunes the kernel per heads and head dims
        if HOPPER_WORKAROUND == "narrow" or DQKWG_VERDICT.get(key) == "narrow":
            return run(True, args, kwargs)
        out = run(False, args, kwargs)
        if key not in DQKWG_VERDICT:
            ref = run(True, args, kwargs)
            errors = relative_errors((n, a, b) for n, a, b in zip(("dq", "dk", "dw", "dg"), out, ref) if a is not None)
            if not all(e == e and e != float("inf") for e in errors.values()):
                return out  # non-finite gradients (a diverged step) decide nothing: check again next call
            DQKWG_VERDICT[key] = "fla" if all(e <= 0.05 for e in errors.values()) else "narrow"
            if DQKWG_VERDICT[key] == "narrow":
                warnings.warn(f"fla #640: GDN's chunk_bwd_dqkwg at block width 64 disagrees with width 32 on {key} "
                              f"(relative errors {errors}); training continues at width 32", stacklevel=2)
                return ref
        return out

    chunk_bwd_dqkwg.original = original
    chunk.chunk_bwd_dqkwg = chunk_bwd_dqkwg


def _pad_k(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The "pad" workaround for fla #640 (the first one; `bench_train.py --sections=kpad` times each):
    zero-pad q/k to K = 128 so fla picks block width 128 (correct) in every kernel; the extra zero
    dims add nothing to q.k, to the state rows that are read, or to the output, and their grads are
    sliced off. fla's blanket guard, which it checks in the backward, is lifted once: every gated call
    that reaches it from here is padded. Costs 1.58x fla's fwd+bwd time on the H200 (kpad), far
    cheaper than the torch fallback (15-60x)."""
    fla_module("fla.ops.common.chunk_o").TRITON_ABOVE_3_7_1 = True
    K = q.shape[-1]
    pad = (0, 128 - K)
    return F.pad(q, pad), F.pad(k, pad), K


def gdn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        scale: float | None = None, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher; same arguments and numbers whichever path runs.

    impl="auto": fla's chunk kernel for CUDA/ROCm tensors (its fused recurrent kernel for a single
    decode step without autograd, since that kernel has no backward; K = 64 heads padded to 128
    for training on Hopper with Triton < 3.7.1 the fla #640 workaround HOPPER_WORKAROUND picks:
    _guard_dqkwg or _pad_k); on CPU the recurrent loop for T == 1 and the chunked form otherwise.
    "recurrent" | "chunked" force a torch path, "fla" forces fla (CUDA tensors and flash-linear-attention required).
    """
    if HOPPER_WORKAROUND not in WORKAROUNDS:
        raise ValueError(f"gdn: fla #640 workaround op_gdn.HOPPER_WORKAROUND = {HOPPER_WORKAROUND!r}; "
                         f"expected one of {WORKAROUNDS}")
    kernel = pick_kernel("GDN", q, impl, "fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                         "fused_recurrent_gated_delta_rule")
    if kernel == "recurrent":
        return gdn_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
    if kernel == "chunked":
        return gdn_chunked(q, k, v, g, beta, scale, initial_state, output_final_state)
    grad = needs_grad(q, k, v, g, beta, initial_state)
    chunk_fn, recurrent_fn = kernel
    _check(q, k, v, g, beta, initial_state)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    # one dtype for q/k/v: under autocast F.normalize returns fp32 q/k beside bf16 v, which fla's dots reject
    q, k, v, g, beta = (x.contiguous() for x in (q.to(v.dtype), k.to(v.dtype), v, g, beta))
    if q.shape[1] == 1 and not grad:
        return recurrent_fn(q, k, v, g=g, beta=beta, scale=scale, initial_state=h0,
                            output_final_state=output_final_state)
    K = q.shape[-1]
    if grad and _fla_hopper_bug() and 32 < K <= 64 and HOPPER_WORKAROUND != "pad":
        _guard_dqkwg()
    elif grad and _fla_hopper_bug() and 32 < K < 128:
        scale = K ** -0.5 if scale is None else scale
        q, k, K = _pad_k(q, k)
        if h0 is not None:  # the state's padded rows are zero and stay zero (k is zero there)
            h0 = F.pad(h0, (0, 0, 0, 128 - K))
        o, S = chunk_fn(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state)
        return o, (S[:, :, :K] if S is not None else None)
    return chunk_fn(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state)
