import pytest
import torch
import torch.nn.functional as F

from hybrid.losses import chunked_distill_loss, kl_reference, layer_mse


def _plain(h_s, w_s, h_t, w_t, targets, mask, temperature, ce_weight):
    zs, zt = h_s @ w_s.t(), h_t @ w_t.t()
    loss = kl_reference(zs, zt, temperature, mask)
    if ce_weight:
        ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), targets.reshape(-1), reduction="none")
        ce = ce[mask.reshape(-1)].mean() if mask is not None else ce.mean()
        loss = loss + ce_weight * ce
    return loss


@pytest.mark.parametrize("temperature,ce_weight,use_mask,chunk", [
    (1.0, 0.0, False, 7), (2.0, 0.0, True, 5), (1.0, 0.5, True, 64), (1.5, 0.3, False, 3)])
def test_chunked_equals_plain_values_and_grads(temperature, ce_weight, use_mask, chunk):
    torch.manual_seed(0)
    B, T, C, Ct, V = 2, 11, 8, 12, 37
    h_s = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(B, T, Ct, dtype=torch.float64), torch.randn(V, Ct, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3 if use_mask else None
    ref = _plain(h_s, w_s, h_t, w_t, targets, mask, temperature, ce_weight)
    g_ref = torch.autograd.grad(ref * 3.0, (h_s, w_s))  # a non-unit upstream grad
    loss, parts = chunked_distill_loss(h_s, w_s, h_t, w_t, targets, mask, temperature, ce_weight, chunk)
    g = torch.autograd.grad(loss * 3.0, (h_s, w_s))
    torch.testing.assert_close(loss, ref)
    zs, zt = h_s @ w_s.t(), h_t @ w_t.t()
    torch.testing.assert_close(parts["kl"], kl_reference(zs, zt, temperature, mask).detach())  # the KL part alone
    torch.testing.assert_close(loss.detach(), parts["kl"] + ce_weight * parts["ce"])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_kl_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(1)
    h, w = torch.randn(3, 5, 8), torch.randn(20, 8)
    loss, _ = chunked_distill_loss(h, w, h, w)
    assert abs(loss.item()) < 1e-6
    loss2, _ = chunked_distill_loss(h, w, torch.randn(3, 5, 8), w)
    assert loss2.item() > 1e-3


def test_kl_falls_when_trained():
    torch.manual_seed(2)
    h_t, w_t = torch.randn(4, 16, 8), torch.randn(50, 8)
    w_s = torch.nn.Parameter(torch.randn(50, 8))
    opt = torch.optim.Adam([w_s], lr=0.05)
    losses = []
    for _ in range(30):
        loss, _ = chunked_distill_loss(h_t, w_s, h_t, w_t, chunk_tokens=16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_ce_needs_targets():
    with pytest.raises(ValueError, match="targets"):
        chunked_distill_loss(torch.randn(1, 2, 4), torch.randn(5, 4), torch.randn(1, 2, 4), torch.randn(5, 4), ce_weight=1.0)


def test_layer_mse():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(layer_mse(a, b), ((a - b) ** 2).mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla fused KL needs CUDA")
def test_fla_fused_kl_matches_chunked():
    """fla's fused KL (temperature 1, no mask, no CE) as a cross-check of the chunked KL on the GPU."""
    fla_modules = pytest.importorskip("fla.modules")
    torch.manual_seed(0)
    h_s = torch.randn(2, 64, 32, device="cuda", requires_grad=True)
    w_s = torch.randn(1000, 32, device="cuda", requires_grad=True)
    h_t, w_t = torch.randn(2, 64, 32, device="cuda"), torch.randn(1000, 32, device="cuda")
    ref, _ = chunked_distill_loss(h_s, w_s, h_t, w_t, chunk_tokens=32)
    g_ref = torch.autograd.grad(ref, (h_s, w_s))
    out = fla_modules.FusedKLDivLoss()(h_s.reshape(-1, 32), h_t.reshape(-1, 32), w_s, w_t)
    g = torch.autograd.grad(out, (h_s, w_s))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("temperature,ce_weight,use_mask,chunk", [
    (1.0, 0.0, False, 7), (2.0, 0.0, True, 5), (1.0, 0.5, True, 64), (1.5, 0.3, False, 3)])
def test_fused_chunk_math_equals_reference_values_and_grads(temperature, ce_weight, use_mask, chunk):
    # the GPU fast path compiles kl_ce_chunk_fused; uncompiled on CPU it must give the reference's numbers
    torch.manual_seed(3)
    B, T, C, V = 2, 9, 8, 41
    h_s = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(B, T, C, dtype=torch.float64), torch.randn(V, C, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3 if use_mask else None
    out = {}
    for fused in (False, True):
        loss, parts = chunked_distill_loss(h_s, w_s, h_t, w_t, targets, mask, temperature, ce_weight, chunk,
                                           fused=fused)
        out[fused] = (loss, parts["kl"], parts["ce"], *torch.autograd.grad(loss * 2.0, (h_s, w_s)))
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b)
    assert out[True][1] > 0 and (ce_weight == 0 or out[True][2] > 0)


def test_fused_chunk_function_equals_reference_in_fp32_with_bf16_grads():
    from hybrid.losses import kl_ce_chunk_fused, kl_ce_chunk_reference
    torch.manual_seed(4)
    zs, zt = torch.randn(6, 300) * 4, torch.randn(6, 300) * 4
    wt, tgt = torch.rand(6, 1), torch.randint(0, 300, (6,))
    for tau, cw, t in ((1.0, 0.0, None), (2.0, 0.7, tgt), (1.0, 1.0, tgt)):
        ref = kl_ce_chunk_reference(zs.clone(), zt, wt, t, tau, cw, torch.float32, torch.bfloat16)
        got = kl_ce_chunk_fused(zs.clone(), zt, wt, t, tau, cw, torch.float32, torch.bfloat16)
        assert got[2].dtype == torch.bfloat16
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.compile of the fused chunk)")
def test_compiled_fused_kl_matches_reference_on_gpu():
    torch.manual_seed(0)
    h_s = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_s = torch.randn(5000, 64, device="cuda", requires_grad=True)
    h_t, w_t = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16), torch.randn(5000, 64, device="cuda")
    y = torch.randint(0, 5000, (2, 300), device="cuda")
    res = {}
    for fused in (False, None):
        loss, _ = chunked_distill_loss(h_s, w_s, h_t, w_t, y, None, 1.5, 0.2, 256, fused=fused)
        res[fused] = (loss, *torch.autograd.grad(loss, (h_s, w_s)))
    for a, b in zip(res[None], res[False]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-4)


def test_fused_stats_chunk_equals_reference():
    """The held-out statistics' fused form (compiled on GPU) == the op-by-op reference, ties in argmax included."""
    from hybrid.losses import stats_chunk_fused, stats_chunk_reference
    torch.manual_seed(0)
    zs, zt = torch.randn(300, 997) * 3, torch.randn(300, 997) * 3
    zs[:5] = zt[:5]  # rows where student and teacher agree exactly
    tgt = torch.randint(0, 997, (300,))
    torch.testing.assert_close(stats_chunk_fused(zs, zt, tgt), stats_chunk_reference(zs, zt, tgt), rtol=1e-5, atol=1e-4)
    got = stats_chunk_fused(zs.bfloat16(), zt.bfloat16(), tgt)  # bf16 logits: fp32 math inside, as the reference
    torch.testing.assert_close(got, stats_chunk_reference(zs.bfloat16(), zt.bfloat16(), tgt), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.compile of the fused statistics)")
def test_compiled_stats_chunk_matches_reference_on_gpu():
    from hybrid.losses import stats_chunk_fn, stats_chunk_reference
    torch.manual_seed(0)
    zs, zt = (torch.randn(4096, 5000, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(2))
    tgt = torch.randint(0, 5000, (4096,), device="cuda")
    got = stats_chunk_fn(zs.device)(zs, zt, tgt)
    torch.testing.assert_close(got, stats_chunk_reference(zs, zt, tgt), rtol=1e-4, atol=1e-2)
