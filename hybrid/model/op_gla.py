"""Gated linear attention (GLA) kernel: recurrent reference, chunked torch form, fla fast path.

The recurrence, per head, with the state S in [K, V] layout (fla's `chunk_gla`):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T     # g: a per-key-channel log decay, <= 0
    o_t = scale * S_t^T q_t                      # scale defaults to K**-0.5

Layout (B, T, H, D) everywhere; states (B, H, K, V) in float32 (float64 for float64 inputs);
outputs in v's dtype; the torch paths compute in float32 for bf16/fp16 inputs.

This file imports only torch (fla lazily, for CUDA tensors) and nothing from the rest of the
package: export.py copies it beside the exported modeling file.
"""

import torch

from .op_common import check_shapes, compute_dtype, needs_grad, pair_scores, pick_kernel, to_chunks

def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token loop, the ground truth.

    q, k, g: (B, T, H, K); v: (B, T, H, V); initial_state: (B, H, K, V).
    Returns o (B, T, H, V) in v's dtype and the final state (B, H, K, V) or None.
    """
    check_shapes("gla", {"q": q, "k": k, "g": g}, v, initial_state)
    B, T, H, K = q.shape
    V = v.shape[3]
    dt, out_dtype = compute_dtype(v), v.dtype
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, dim=1) if T else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(out_dtype), (S if output_final_state else None)


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                scale: float | None = None, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form, the CPU default. Same arguments as gla_recurrent.

    With cumulative log decays G_i = g_1 + ... + g_i inside a chunk and chunk-start state S_0:
        o_i = scale * ((q_i * exp(G_i))^T S_0 + sum_{j<=i} [sum_d q_id k_jd exp(G_id - G_jd)] v_j)
        S_C = diag(exp(G_C)) S_0 + sum_j (k_j * exp(G_C - G_j)) v_j^T
    The intra-chunk scores never use the overflowing q*exp(G) . k*exp(-G) factorisation: see
    op_common.pair_scores (exact decays inside 16-token blocks, a safe matmul across blocks). T need not
    be a multiple of C: the tail is padded with g = 0, k = 0, which leaves the state untouched.
    """
    check_shapes("gla", {"q": q, "k": k, "g": g}, v, initial_state)
    B, T, H, K = q.shape
    V = v.shape[3]
    dt, out_dtype = compute_dtype(v), v.dtype
    scale = K ** -0.5 if scale is None else scale
    C = int(chunk_size)
    n = max(1, -(-T // C))

    q, k, v, g = (to_chunks(t, C, dt) for t in (q, k, v, g))  # (B, H, n, C, D)
    q = q * scale
    G = g.cumsum(3)  # (B, H, n, C, K)
    Aqk = pair_scores(q, k, G, G, strict=False)  # (B, H, n, C, C), lower triangular
    qG = q * G.exp()
    k_to_end = k * (G[:, :, :, -1:] - G).exp()  # decay from token j to the chunk end
    g_end = G[:, :, :, -1].exp()  # (B, H, n, K)

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for i in range(n):
        out.append(qG[:, :, i] @ S + Aqk[:, :, i] @ v[:, :, i])
        S = S * g_end[:, :, i, :, None] + k_to_end[:, :, i].transpose(-1, -2) @ v[:, :, i]
    o = torch.stack(out, dim=2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
        scale: float | None = None, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher; same arguments and numbers whichever path runs.

    impl="auto": fla's chunk kernel for CUDA/ROCm tensors (its fused recurrent kernel for a single
    decode step without autograd); on CPU the recurrent loop for T == 1 and the chunked form
    otherwise. "recurrent" | "chunked" force a torch path, "fla" forces fla.
    """
    kernel = pick_kernel("GLA", q, impl, "fla.ops.gla", "chunk_gla", "fused_recurrent_gla")
    if kernel == "recurrent":
        return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)
    if kernel == "chunked":
        return gla_chunked(q, k, v, g, scale, initial_state, output_final_state)
    chunk_fn, recurrent_fn = kernel
    check_shapes("gla", {"q": q, "k": k, "g": g}, v, initial_state)
    grad = needs_grad(q, k, v, g, initial_state)
    h0 = None if initial_state is None else initial_state.float().contiguous()  # chunk_gla asserts fp32
    q, k, v, g = (x.contiguous() for x in (q.to(v.dtype), k.to(v.dtype), v, g))  # one dtype for fla's dots
    if q.shape[1] == 1 and not grad:
        return recurrent_fn(q, k, v, gk=g, scale=scale, initial_state=h0, output_final_state=output_final_state)
    return chunk_fn(q, k, v, g, scale=scale, initial_state=h0, output_final_state=output_final_state)
