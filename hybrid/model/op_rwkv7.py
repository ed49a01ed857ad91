"""RWKV-7 kernel (diagonal-plus-low-rank delta rule): recurrent reference, chunked torch form, fla.

The recurrence, per head, with the state S in [K, V] layout, exactly as fla's `chunk_rwkv7` /
`fused_recurrent_rwkv7` (both call fla's DPLR delta rule with q=r, gk=w):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
        = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T r_t                               # scale defaults to 1.0, as in chunk_rwkv7

w is a per-key-channel log decay (<= 0). Note that a_t reads the *undecayed* previous state.
RWKV-7 itself uses a = -kk, b = kk * iclr (kk the L2-normalised key), which makes the transition
diag(w) - kk (kk * iclr)^T; this op accepts any a, b. (In RWKV's own [V, K] state notation the
same step reads S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, with their a/b as our a/b.)
fla's fused_recurrent_rwkv7 defaults to scale = K**-0.5 but chunk_rwkv7 to 1.0; the dispatcher
always passes the scale explicitly, so both paths agree.

Layout (B, T, H, D) everywhere; states (B, H, K, V) in float32 (float64 for float64 inputs);
outputs in v's dtype; the torch paths compute in float32 for bf16/fp16 inputs.

This file imports only torch (fla lazily, for CUDA tensors) and nothing from the rest of the
package: export.py copies it beside the exported modeling file.
"""

import warnings

import torch

from .op_common import check_shapes, compute_dtype, needs_grad, pair_scores, pick_kernel, to_chunks

def rwkv7_recurrent(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, scale: float = 1.0, initial_state: torch.Tensor | None = None,
                    output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token loop, the ground truth.

    r, w, k, a, b: (B, T, H, K); v: (B, T, H, V); initial_state: (B, H, K, V).
    Returns o (B, T, H, V) in v's dtype and the final state (B, H, K, V) or None.
    """
    check_shapes("rwkv7", {"r": r, "w": w, "k": k, "a": a, "b": b}, v, initial_state)
    B, T, H, K = r.shape
    V = v.shape[3]
    dt, out_dtype = compute_dtype(v), v.dtype
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for t in range(T):
        sa = torch.einsum("bhk,bhkv->bhv", a[:, t], S)  # (B, H, V): a_t^T S_{t-1}
        S = (S * w[:, t].exp()[..., None] + b[:, t, :, :, None] * sa[:, :, None, :]
             + k[:, t, :, :, None] * v[:, t, :, None, :])
        out.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    o = torch.stack(out, dim=1) if T else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(out_dtype), (S if output_final_state else None)


def rwkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, scale: float = 1.0, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form, the CPU default. Same arguments as rwkv7_recurrent.

    Inside a chunk with cumulative log decays G_i = w_1 + ... + w_i (G_0 = 0) and chunk-start
    state S_0, the low-rank reads x_i = a_i^T S_{i-1} (rows of X, (C, V)) solve
        (I - A_ab) X = (a * exp(G_{i-1}))^T S_0 + A_ak v,
        A_ak[i, j] = sum_d a_id k_jd exp(G_{i-1,d} - G_jd) (j < i), A_ab likewise with b_j;
    then o_i = scale * ((r_i * exp(G_i))^T S_0 + sum_{j<=i} A_rk[i, j] v_j + A_rb[i, j] x_j)
    with A_rk, A_rb using exp(G_i - G_j), and S_C = diag(exp(G_C)) S_0 + sum_j exp(G_C - G_j) *
    (k_j v_j^T + b_j x_j). The default chunk of 16 matches fla's default for RWKV-7 and keeps the
    triangular solve well conditioned. T need not be a multiple of the chunk: the tail is padded
    with zeros (w = 0: no decay), which leaves the state untouched.
    """
    check_shapes("rwkv7", {"r": r, "w": w, "k": k, "a": a, "b": b}, v, initial_state)
    B, T, H, K = r.shape
    V = v.shape[3]
    dt, out_dtype = compute_dtype(v), v.dtype
    C = int(chunk_size)
    n = max(1, -(-T // C))

    r, w, k, v, a, b = (to_chunks(t, C, dt) for t in (r, w, k, v, a, b))  # (B, H, n, C, D)
    r = r * scale
    G = w.cumsum(3)  # (B, H, n, C, K), decay through token i
    Gp = G - w  # decay through token i-1
    A_rk, A_rb = pair_scores(r, k, G, G, False), pair_scores(r, b, G, G, False)
    A_ak, A_ab = pair_scores(a, k, Gp, G, True), pair_scores(a, b, Gp, G, True)
    eye = torch.eye(C, dtype=dt, device=r.device)
    X_v = torch.linalg.solve_triangular(eye - A_ab, A_ak @ v, upper=False, unitriangular=True)  # (B, H, n, C, V)
    X_s = torch.linalg.solve_triangular(eye - A_ab, a * Gp.exp(), upper=False, unitriangular=True)  # (B, H, n, C, K)
    rG = r * G.exp()
    to_end = (G[:, :, :, -1:] - G).exp()  # decay from token j to the chunk end
    k_to_end, b_to_end = k * to_end, b * to_end
    g_end = G[:, :, :, -1].exp()  # (B, H, n, K)

    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for i in range(n):
        x = X_v[:, :, i] + X_s[:, :, i] @ S  # (B, H, C, V)
        out.append(rG[:, :, i] @ S + A_rk[:, :, i] @ v[:, :, i] + A_rb[:, :, i] @ x)
        S = (S * g_end[:, :, i, :, None] + k_to_end[:, :, i].transpose(-1, -2) @ v[:, :, i]
             + b_to_end[:, :, i].transpose(-1, -2) @ x)
    o = torch.stack(out, dim=2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def rwkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher; same arguments and numbers whichever path runs.

    impl="auto": fla's chunk kernel for CUDA/ROCm tensors (its fused recurrent kernel for a single
    decode step without autograd); on CPU the recurrent loop for T == 1 and the chunked form
    otherwise. "recurrent" | "chunked" force a torch path, "fla" forces fla.
    """
    kernel = pick_kernel("RWKV-7", r, impl, "fla.ops.rwkv7", "chunk_rwkv7", "fused_recurrent_rwkv7")
    if kernel == "recurrent":
        return rwkv7_recurrent(r, w, k, v, a, b, scale, initial_state, output_final_state)
    if kernel == "chunked":
        return rwkv7_chunked(r, w, k, v, a, b, scale, initial_state, output_final_state)
    chunk_fn, recurrent_fn = kernel
    check_shapes("rwkv7", {"r": r, "w": w, "k": k, "a": a, "b": b}, v, initial_state)
    grad = needs_grad(r, w, k, v, a, b, initial_state)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if r.shape[1] == 1 and not grad:
        return recurrent_fn(r, w, k, v, a, b, scale=scale, initial_state=h0, output_final_state=output_final_state)
    with warnings.catch_warnings():  # fla warns that fp32 "is not supported on some platforms"; it runs on CUDA
        warnings.filterwarnings("ignore", message=".*does not support float32.*")
        return chunk_fn(r, w, k, v, a, b, scale=scale, initial_state=h0, output_final_state=output_final_state)
