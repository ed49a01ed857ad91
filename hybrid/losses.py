"""Distillation losses: layer MSE and a memory-efficient logit KL.

The logit KL never materialises B*T*V fp32 logits: `chunked_distill_loss` walks over chunks of
tokens, builds student and teacher logits for one chunk from hidden states and LM-head weights,
computes the loss and its gradient w.r.t. the student's hidden states and LM-head weight right
there (the softmax gradient is closed-form), and keeps only those gradients. Peak extra memory
is ~3 * CHUNK * V floats instead of ~3 * B*T * V, and there is one matmul pass instead of a
forward plus a recomputing backward. `kl_reference` is the plain version it is tested against.

    loss = temperature**2 * KL(p_t || p_s) + ce_weight * CE(student, targets)
    p = softmax(logits / temperature); KL and CE are means over unmasked tokens.
"""

import functools

import torch
import torch.nn.functional as F


def layer_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 between two (B, T, C) activations."""
    return F.mse_loss(student_out.float(), teacher_out.float())


def kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """temperature^2 * KL(softmax(t/T) || softmax(s/T)), mean over tokens. logits (..., V), mask (...) bool."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    log_ps = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if mask is not None:
        return temperature ** 2 * kl[mask].mean()
    return temperature ** 2 * kl.mean()


def kl_ce_chunk_reference(zs: torch.Tensor, zt: torch.Tensor, wt: torch.Tensor, tgt: torch.Tensor | None,
                          tau: float, ce_weight: float, acc: torch.dtype,
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of the loss, op by op (the reference). zs, zt (c, V) student/teacher logits, wt (c, 1)
    token weights, tgt (c,) or None. -> (weighted tau^2 KL sum, weighted CE sum, dL/dzs (c, V) in out_dtype)."""
    zs, zt = zs.to(acc), zt.to(acc)
    log_ps = F.log_softmax(zs / tau, dim=-1)
    log_pt = F.log_softmax(zt / tau, dim=-1)
    pt = log_pt.exp()
    kl = (wt * pt * (log_pt - log_ps)).sum() * tau ** 2
    g = tau * (log_ps.exp() - pt)                     # d(tau^2 KL)/dz_s
    ce = zs.new_zeros(())
    if tgt is not None:
        log_q = log_ps if tau == 1.0 else F.log_softmax(zs, dim=-1)
        ce = -(wt[:, 0] * log_q.gather(1, tgt[:, None])[:, 0]).sum()
        q = log_q.exp()
        q[torch.arange(q.shape[0], device=q.device), tgt] -= 1.0  # dCE/dz = softmax - onehot
        g = g + ce_weight * q
    return kl, ce, (g * wt).to(out_dtype)


def kl_ce_chunk_fused(zs: torch.Tensor, zt: torch.Tensor, wt: torch.Tensor, tgt: torch.Tensor | None,
                      tau: float, ce_weight: float, acc: torch.dtype,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kl_ce_chunk_reference written for torch.compile: no in-place index update, the two row
    statistics (max, log-sum-exp) per side and one elementwise pass, so the compiled kernels read
    each (c, V) logit tile about twice instead of the ~15 fp32 passes of the op-by-op form."""
    zs, zt = zs.to(acc), zt.to(acc)
    log_ps = zs / tau - torch.logsumexp(zs / tau, dim=-1, keepdim=True)
    log_pt = zt / tau - torch.logsumexp(zt / tau, dim=-1, keepdim=True)
    pt = log_pt.exp()
    kl = (wt * pt * (log_pt - log_ps)).sum() * tau ** 2
    g = tau * (log_ps.exp() - pt)
    ce = zs.new_zeros(())
    if tgt is not None:
        log_q = log_ps if tau == 1.0 else zs - torch.logsumexp(zs, dim=-1, keepdim=True)
        onehot = torch.arange(zs.shape[1], device=zs.device)[None, :] == tgt[:, None]  # (c, V)
        ce = -(wt * torch.where(onehot, log_q, 0.0)).sum()
        g = g + ce_weight * (log_q.exp() - onehot.to(acc))
    return kl, ce, (g * wt).to(out_dtype)


@functools.cache
def _compiled(fn):
    """torch.compile(fn), once per process and lazily: importing the module compiles nothing."""
    return torch.compile(fn, dynamic=False)


def _chunk_fn(fused: bool | None, device: torch.device):
    """fused None: the compiled fused chunk on GPU, the reference elsewhere (compiling costs more
    than it saves on CPU); True: the fused form (compiled on GPU, plain on CPU); False: the reference."""
    if fused is None:
        fused = device.type == "cuda"
    if not fused:
        return kl_ce_chunk_reference
    return _compiled(kl_ce_chunk_fused) if device.type == "cuda" else kl_ce_chunk_fused


@functools.cache
def _fp32_addmm(device: torch.device) -> bool:
    """Whether cuBLAS adds a bf16 product straight into an fp32 matrix here (addmm's out_dtype; older torch
    builds refuse an fp32 `self`): one probe per device and process."""
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        return bool((torch.addmm(torch.ones(2, 2, device=device), a, a, out_dtype=torch.float32) == 3).all())
    except (RuntimeError, TypeError):
        return False


def _stats(log_ps: torch.Tensor, log_pt: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return torch.stack([(log_pt.exp() * (log_pt - log_ps)).sum(), -log_ps.gather(1, tgt[:, None]).sum(),
                        -log_pt.gather(1, tgt[:, None]).sum(), (log_ps.argmax(-1) == log_pt.argmax(-1)).sum().float()])


def stats_chunk_reference(zs: torch.Tensor, zt: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """One chunk of held-out statistics, op by op (the reference). zs, zt (c, V) student/teacher logits, tgt
    (c,) next ids -> sums over the chunk of [KL(teacher || student), student CE, teacher CE, top-1 agreement]."""
    return _stats(F.log_softmax(zs.float(), dim=-1), F.log_softmax(zt.float(), dim=-1), tgt)


def stats_chunk_fused(zs: torch.Tensor, zt: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """stats_chunk_reference written for torch.compile (row statistics, then one pass; as kl_ce_chunk_fused)."""
    zs, zt = zs.float(), zt.float()
    return _stats(zs - torch.logsumexp(zs, dim=-1, keepdim=True), zt - torch.logsumexp(zt, dim=-1, keepdim=True), tgt)


def stats_chunk_fn(device: torch.device):
    """The compiled fused statistics on GPU (a held-out KL scores every GA-S2 candidate twice), the
    reference elsewhere."""
    return _compiled(stats_chunk_fused) if device.type == "cuda" else stats_chunk_reference


class _ChunkedDistill(torch.autograd.Function):
    """Loss and gradients in one pass over token chunks; backward only scales the stored grads."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, weights, temperature, ce_weight, chunk, fused):
        # h_s (N, C) student hidden, w_s (V, C) student LM head, h_t (N, Ct), w_t (V, Ct) teacher,
        # targets (N,) long or None, weights (N,) float: 1/n_tokens on kept tokens, 0 on masked ones.
        N = h_s.shape[0]
        acc = torch.promote_types(h_s.dtype, torch.float32)  # fp32 for bf16 inputs, fp64 stays fp64
        grad_h = torch.zeros_like(h_s, dtype=acc) if h_s.requires_grad else None
        grad_w = torch.zeros_like(w_s, dtype=acc) if w_s.requires_grad else None
        total_kl = h_s.new_zeros((), dtype=acc)
        total_ce = h_s.new_zeros((), dtype=acc)
        mm = h_s.dtype  # matmuls in the input dtype (bf16 on GPU), softmax math in `acc`
        w_mm, wt_mm = w_s.to(mm), w_t.to(h_t.dtype)
        chunk_fn = _chunk_fn(fused, h_s.device)
        # the fast path adds each chunk's LM-head gradient into the fp32 sum inside the matmul (the reference: a
        # bf16 (V, C) product, its fp32 copy and an add per chunk, ~14 ms of a 326 ms stage-2 step on an H100)
        add_fp32 = (fused is not False and h_s.is_cuda and mm in (torch.bfloat16, torch.float16) and acc == torch.float32
                    and grad_w is not None and _fp32_addmm(h_s.device))
        use_ce = targets is not None and bool(ce_weight)
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            for i in range(0, N, chunk):
                hs, wt = h_s[i:i + chunk], weights[i:i + chunk, None]
                zs = hs @ w_mm.t()                                # (c, V) student logits
                zt = h_t[i:i + chunk] @ wt_mm.t()                 # (c, V) teacher logits
                kl, ce, g = chunk_fn(zs, zt, wt, targets[i:i + chunk] if use_ce else None, temperature,
                                     ce_weight, acc, mm)           # g (c, V) dL/dz_s
                total_kl += kl
                total_ce += ce
                if grad_h is not None:
                    grad_h[i:i + chunk] = g @ w_mm
                if add_fp32:
                    grad_w = torch.addmm(grad_w, g.t(), hs, out_dtype=acc)
                elif grad_w is not None:
                    grad_w += (g.t() @ hs).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return total_kl + ce_weight * total_ce, total_kl.detach(), total_ce.detach()

    @staticmethod
    def backward(ctx, grad_loss, _g_kl, _g_ce):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_loss).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None


def chunked_distill_loss(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                         targets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         temperature: float = 1.0, ce_weight: float = 0.0,
                         chunk_tokens: int = 4096, fused: bool | None = None) -> tuple[torch.Tensor, dict]:
    """temperature^2 * KL(teacher || student) + ce_weight * CE from hidden states, chunked over tokens.

    h_s (B, T, C) student final hidden states (after the final norm), w_s (V, C) student LM head;
    h_t (B, T, Ct), w_t (V, Ct) the teacher's (no grad); targets (B, T) next-token ids, needed when
    ce_weight > 0; mask (B, T) bool, True = token counts. Returns (loss, {"kl": ..., "ce": ...}),
    the dict detached. The teacher's logits are computed in the chunk too, so neither side's full
    logits ever exist. fused: None = the compiled fused chunk math on GPU and the op-by-op
    reference on CPU; False forces the reference, True the fused form (see _chunk_fn).
    """
    if ce_weight and targets is None:
        raise ValueError("ce_weight > 0 needs targets")
    h_s2, h_t2 = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1]).detach()
    N = h_s2.shape[0]
    if mask is None:
        weights = h_s2.new_full((N,), 1.0 / N, dtype=torch.promote_types(h_s.dtype, torch.float32))
    else:
        m = mask.reshape(-1).to(torch.promote_types(h_s.dtype, torch.float32))
        weights = m / m.sum().clamp_min(1.0)
    tgt = targets.reshape(-1) if targets is not None else None
    loss, kl, ce = _ChunkedDistill.apply(h_s2, w_s, h_t2, w_t.detach(), tgt, weights, float(temperature),
                                         float(ce_weight), int(chunk_tokens), fused)
    return loss, {"kl": kl, "ce": ce}
