"""Linear-attention kernels: chunked == recurrent (float64, outputs and grads), state hand-off,
single decode steps, the documented math, and (on a GPU with fla) fla == reference in bf16/fp32."""

import os
import pytest
import torch
import torch.nn.functional as F

from hybrid.model.op_gdn import gdn, gdn_chunked, gdn_recurrent
from hybrid.model.op_gla import gla, gla_chunked, gla_recurrent
from hybrid.model.op_rwkv7 import rwkv7, rwkv7_chunked, rwkv7_recurrent


def make_inputs(op: str, B: int, T: int, H: int, K: int, V: int, dtype=torch.float64, device="cpu",
                seed: int = 0, state: bool = True) -> dict:
    """Realistic ranges: unit-norm GDN keys, beta in (0, 1), decays as the mixers parametrise them."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if op == "gdn":
        x = dict(q=F.normalize(rnd(B, T, H, K), dim=-1), k=F.normalize(rnd(B, T, H, K), dim=-1), v=rnd(B, T, H, V),
                 g=F.logsigmoid(rnd(B, T, H) + 2.0), beta=torch.sigmoid(rnd(B, T, H)))
    elif op == "gla":
        x = dict(q=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V), g=F.logsigmoid(rnd(B, T, H, K)) / 4)
    else:
        kk = F.normalize(rnd(B, T, H, K), dim=-1)
        x = dict(r=rnd(B, T, H, K), w=-0.6065 * torch.sigmoid(rnd(B, T, H, K)), k=rnd(B, T, H, K) * 0.5,
                 v=rnd(B, T, H, V), a=-kk, b=kk * torch.sigmoid(rnd(B, T, H, K)))
    if state:
        x["initial_state"] = rnd(B, H, K, V) * 0.5
    return {n: t.to(device=device, dtype=torch.float32 if n == "initial_state" and dtype != torch.float64 else dtype)
            for n, t in x.items()}


OPS = {"gdn": (gdn_recurrent, gdn_chunked, gdn), "gla": (gla_recurrent, gla_chunked, gla),
       "rwkv7": (rwkv7_recurrent, rwkv7_chunked, rwkv7)}


def run_with_grads(fn, inputs: dict, seed: int = 1, **kw):
    """o, final state and the grads of a random projection of both w.r.t. every input."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    o, S = fn(**leaves, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S)
    ((o.float() * do.float()).sum() + (S.float() * dS.float()).sum()).backward()
    return o.detach(), S.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 64), (5, 16)])
def test_chunked_equals_recurrent_fwd_bwd(op, T, chunk):
    rec, chk, _ = OPS[op]
    x = make_inputs(op, B=2, T=T, H=3, K=8, V=6)
    o1, S1, g1 = run_with_grads(rec, x)
    o2, S2, g2 = run_with_grads(chk, x, chunk_size=chunk)
    torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(S2, S1, rtol=1e-9, atol=1e-10)
    for name in x:
        assert g1[name].abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-8, atol=1e-9, msg=f"{op} grad {name}")


@pytest.mark.parametrize("op", list(OPS))
def test_split_sequence_carries_state(op):
    _, chk, _ = OPS[op]
    x = make_inputs(op, B=2, T=50, H=2, K=8, V=4, seed=3)
    o, S = chk(**x, output_final_state=True, chunk_size=16)
    first = {n: (t[:, :21] if t.dim() >= 3 and n != "initial_state" else t) for n, t in x.items()}
    second = {n: t[:, 21:] for n, t in x.items() if n != "initial_state"}
    oa, Sa = chk(**first, output_final_state=True, chunk_size=16)
    ob, Sb = chk(**second, initial_state=Sa, output_final_state=True, chunk_size=16)
    torch.testing.assert_close(torch.cat([oa, ob], dim=1), o, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(Sb, S, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("op", list(OPS))
def test_single_step_equals_recurrent(op):
    """Prefill then one decode step (T == 1, via the dispatcher and the chunked form) == one recurrent pass."""
    rec, chk, dispatch = OPS[op]
    x = make_inputs(op, B=2, T=9, H=2, K=8, V=4, seed=4)
    o_full, S_full = rec(**x, output_final_state=True)
    prefix = {n: (t[:, :8] if n != "initial_state" else t) for n, t in x.items()}
    step = {n: t[:, 8:] for n, t in x.items() if n != "initial_state"}
    _, S8 = dispatch(**prefix, output_final_state=True)
    for fn in (dispatch, chk):
        o9, S9 = fn(**step, initial_state=S8, output_final_state=True)
        assert o9.shape[1] == 1
        torch.testing.assert_close(o9, o_full[:, 8:], rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(S9, S_full, rtol=1e-10, atol=1e-11)


def test_documented_math_matches_recurrent():
    """One step written as the explicit matrix transition of each docstring, against the loops."""
    x = make_inputs("gdn", B=1, T=1, H=1, K=4, V=3, seed=5)
    q, k, v, g, beta, S0 = (x[n][0, 0, 0] if n != "initial_state" else x[n][0, 0]
                            for n in ("q", "k", "v", "g", "beta", "initial_state"))
    S1 = g.exp() * (torch.eye(4, dtype=S0.dtype) - beta * torch.outer(k, k)) @ S0 + beta * torch.outer(k, v)
    o, S = gdn_recurrent(**x, scale=0.7, output_final_state=True)
    torch.testing.assert_close(S[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], 0.7 * S1.T @ q)

    x = make_inputs("gla", B=1, T=1, H=1, K=4, V=3, seed=6)
    q, k, v, g = (x[n][0, 0, 0] for n in ("q", "k", "v", "g"))
    S1 = torch.diag(g.exp()) @ x["initial_state"][0, 0] + torch.outer(k, v)
    o, S = gla_recurrent(**x, output_final_state=True)
    torch.testing.assert_close(S[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], 4 ** -0.5 * S1.T @ q)

    x = make_inputs("rwkv7", B=1, T=1, H=1, K=4, V=3, seed=7)
    r, w, k, v, a, b = (x[n][0, 0, 0] for n in ("r", "w", "k", "v", "a", "b"))
    S1 = (torch.diag(w.exp()) + torch.outer(b, a)) @ x["initial_state"][0, 0] + torch.outer(k, v)
    o, S = rwkv7_recurrent(**x, output_final_state=True)  # scale defaults to 1.0, like chunk_rwkv7
    torch.testing.assert_close(S[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], S1.T @ r)


def test_gdn_grouped_value_heads():
    """HV = 2H value heads: head h reads q/k head h // 2, as fla's GVA does."""
    x = make_inputs("gdn", B=1, T=20, H=4, K=8, V=4, seed=8)
    qk = {n: x[n][:, :, :2] for n in ("q", "k")}
    o, S = gdn_chunked(**qk, **{n: x[n] for n in ("v", "g", "beta", "initial_state")},
                       output_final_state=True, chunk_size=8)
    ref, S_ref = gdn_recurrent(**{n: x[n][:, :, [0, 0, 1, 1]] for n in ("q", "k")},
                               **{n: x[n] for n in ("v", "g", "beta", "initial_state")}, output_final_state=True)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(S, S_ref)


@pytest.mark.parametrize("op", list(OPS))
def test_bf16_inputs_fp32_state(op):
    rec, _, dispatch = OPS[op]
    x = make_inputs(op, B=1, T=40, H=2, K=16, V=8, dtype=torch.bfloat16, seed=9)
    o, S = dispatch(**x, output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ref, S_ref = rec(**{n: t.double() for n, t in x.items()}, output_final_state=True)
    assert (o.double() - ref).norm() / ref.norm() < 1e-2
    assert (S.double() - S_ref).norm() / S_ref.norm() < 1e-5


def test_bad_input_errors():
    x = make_inputs("gdn", B=1, T=4, H=2, K=8, V=4)
    with pytest.raises(ValueError, match="g and beta"):
        gdn(**{**x, "g": x["g"][..., None]})
    with pytest.raises(ValueError, match="initial_state"):
        gla(**{**make_inputs("gla", 1, 4, 2, 8, 4), "initial_state": torch.zeros(1, 2, 4, 8)})
    with pytest.raises(ValueError, match="impl"):
        rwkv7(**make_inputs("rwkv7", 1, 4, 2, 8, 4), impl="triton")
    with pytest.raises(ValueError, match="CUDA"):
        gdn(**x, impl="fla")


# ---------------------------------------------------------------------------- GPU: fla == reference

def _fla_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops  # noqa: F401
    except ImportError:
        return False
    return True


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error ||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fla_vs_reference(op: str, dtype, B=2, T=300, H=3, D=64, seed=0) -> dict:
    """Relative errors of fla (impl='fla') against the float64 torch reference on the same rounded inputs."""
    _, chk, dispatch = OPS[op]
    x = make_inputs(op, B, T, H, D, D, dtype=dtype, device="cuda", seed=seed)
    o1, S1, g1 = run_with_grads(dispatch, x, impl="fla")
    o2, S2, g2 = run_with_grads(chk, {n: t.double() for n, t in x.items()})
    errs = {"o": rel_err(o1, o2), "state": rel_err(S1, S2)}
    errs.update({f"d{n}": rel_err(g1[n], g2[n]) for n in x})
    finite = all(torch.isfinite(t).all() for t in (o1, S1, *g1.values()))
    return {"errs": errs, "finite": finite}


def check_fla_vs_reference(op, dtype, tol):
    res = fla_vs_reference(op, dtype)
    print(op, dtype, {k: f"{v:.1e}" for k, v in res["errs"].items()})
    assert res["finite"], f"{op}: fla produced NaN/inf"
    bad = {k: v for k, v in res["errs"].items() if not v <= tol}
    assert not bad, f"{op} {dtype}: relative error above {tol}: {bad}"


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(), reason="needs a CUDA device and flash-linear-attention")
@pytest.mark.parametrize("op", list(OPS))
def test_fla_matches_reference(op):
    check_fla_vs_reference(op, torch.bfloat16, 1e-2)  # the inputs' dtype in training (autocast); fp32: last


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(), reason="needs a CUDA device and flash-linear-attention")
@pytest.mark.parametrize("op", list(OPS))
def test_fla_decode_step_matches_reference(op):
    """T == 1 without grad takes fla's fused recurrent kernel; it must continue a prefilled state."""
    rec, _, dispatch = OPS[op]
    x = make_inputs(op, B=2, T=1, H=3, K=64, V=64, dtype=torch.bfloat16, device="cuda", seed=11)
    with torch.no_grad():
        o1, S1 = dispatch(**x, output_final_state=True)
    o2, S2 = rec(**{n: t.double() for n, t in x.items()}, output_final_state=True)
    assert rel_err(o1, o2) < 1e-2 and rel_err(S1, S2) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(), reason="needs a CUDA device and flash-linear-attention")
@pytest.mark.parametrize("workaround", ["checked", "narrow", "pad"])
def test_fla_gdn_fp32_gates_with_bf16_qkv(workaround, monkeypatch):
    """The GDN mixer passes fp32 g/beta beside bf16 q/k/v (as fla's own layer does). On Hopper with
    Triton < 3.7.1 this also checks each workaround for fla #640 (gradients included)."""
    from hybrid.model import op_gdn
    monkeypatch.setattr(op_gdn, "HOPPER_WORKAROUND", workaround)
    x = make_inputs("gdn", B=2, T=200, H=3, K=64, V=64, dtype=torch.bfloat16, device="cuda", seed=12)
    x["g"], x["beta"] = x["g"].float(), x["beta"].float()
    o1, S1, g1 = run_with_grads(gdn, x, impl="fla")
    o2, S2, g2 = run_with_grads(gdn_chunked, {n: t.double() for n, t in x.items()})
    errs = {"o": rel_err(o1, o2), "state": rel_err(S1, S2), **{f"d{n}": rel_err(g1[n], g2[n]) for n in x}}
    assert all(v < 1e-2 for v in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(), reason="needs a CUDA device and flash-linear-attention")
@pytest.mark.parametrize("op", list(OPS))
def test_fla_matches_reference_fp32_inputs(op):
    """Last of the GPU tests: fp32 inputs make fla compile and autotune every kernel again (minutes per op on a
    fresh machine), and training never passes them (bf16 q/k/v beside fp32 gates: the test above). fla's
    Triton dots run in TF32, so fp32 lands near 1e-3 (GLA on the H100: 1.2e-3), not 1e-4."""
    check_fla_vs_reference(op, torch.float32, 5e-3)


@pytest.mark.parametrize("miscompiled", [False, True])
def test_dqkwg_guard_checks_width_64_once_and_keeps_to_width_32_where_it_is_wrong(miscompiled, monkeypatch):
    """op_gdn's fla #640 guard on stand-in fla modules. Inside the wrapped chunk_bwd_dqkwg fla's guard is
    lifted and, for width 32, its shared-memory check says no; afterwards (even after a raise) both are
    as before. "checked" runs width 64 and, on its first call per shape, width 32 beside it: it keeps
    width 64 where they agree, else warns and uses width 32 from then on; "narrow" always width 32."""
    import types
    import warnings
    from hybrid.model import op_gdn
    calls = []

    def chunk_bwd_dqkwg(q, k, v, fail=False):
        narrow = not chunk_o.check_shared_mem("hopper", 0)
        calls.append(("narrow" if narrow else "fla", chunk_o.TRITON_ABOVE_3_7_1))
        if fail:
            raise RuntimeError("kernel failed")
        wrong = 100.0 if miscompiled and not narrow else 0.0
        return q + k, q - k + wrong, None, v.sum(-1)

    chunk_o = types.SimpleNamespace(check_shared_mem=lambda arch="none", idx=0: True, TRITON_ABOVE_3_7_1=False)
    chunk = types.SimpleNamespace(chunk_bwd_dqkwg=chunk_bwd_dqkwg)
    fake = {"fla.ops.gated_delta_rule.chunk": chunk, "fla.ops.common.chunk_o": chunk_o}
    monkeypatch.setattr(op_gdn, "fla_module", fake.__getitem__)
    monkeypatch.setattr(op_gdn, "DQKWG_VERDICT", {})
    monkeypatch.setattr(op_gdn, "HOPPER_WORKAROUND", "checked")
    op_gdn._guard_dqkwg()
    op_gdn._guard_dqkwg()
    assert chunk.chunk_bwd_dqkwg.original is chunk_bwd_dqkwg
    q, k, v = torch.ones(2, 5, 3, 4), torch.full((2, 5, 3, 4), 0.5), torch.ones(2, 5, 3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = chunk.chunk_bwd_dqkwg(q=q, k=k, v=v)
    assert calls == [("fla", True), ("narrow", True)] and len(caught) == int(miscompiled)
    assert torch.equal(first[1], q - k)  # the right answer either way
    calls.clear()
    chunk.chunk_bwd_dqkwg(q, k, v)  # decided: one run, the kept width
    assert calls == [("narrow" if miscompiled else "fla", True)]
    op_gdn.DQKWG_VERDICT.clear()
    calls.clear()
    chunk.chunk_bwd_dqkwg(q, k, v * float("nan"))  # non-finite grads decide nothing
    assert calls == [("fla", True), ("narrow", True)] and not op_gdn.DQKWG_VERDICT
    with warnings.catch_warnings(record=True) as caught:  # decides again (warning as above)
        warnings.simplefilter("always")
        chunk.chunk_bwd_dqkwg(q, k, v)
    assert len(caught) == int(miscompiled)
    calls.clear()
    chunk.chunk_bwd_dqkwg(q, k, v)
    assert calls == [("narrow" if miscompiled else "fla", True)]
    calls.clear()
    monkeypatch.setattr(op_gdn, "HOPPER_WORKAROUND", "narrow")
    with pytest.raises(RuntimeError, match="kernel failed"):
        chunk.chunk_bwd_dqkwg(q, k, v, fail=True)
    assert calls == [("narrow", True)]
    assert chunk_o.check_shared_mem("hopper", 0) is True and chunk_o.TRITON_ABOVE_3_7_1 is False


def test_unknown_fla640_workaround_is_named(monkeypatch):
    from hybrid.model import op_gdn
    monkeypatch.setattr(op_gdn, "HOPPER_WORKAROUND", "padd")
    with pytest.raises(ValueError, match="HOPPER_WORKAROUND = 'padd'.*checked"):
        gdn(**make_inputs("gdn", B=1, T=4, H=2, K=8, V=8, state=False))


def test_gdn_zero_padded_head_dim_is_exact():
    """The premise of the Hopper workaround for fla #640 (op_gdn._pad_k): zero-padding q/k from K to
    128 changes neither the output, nor the state rows that exist, nor the grads of the real dims."""
    x = make_inputs("gdn", B=2, T=37, H=3, K=64, V=32, seed=5)
    x["initial_state"] = torch.randn(2, 3, 64, 32, dtype=torch.float64)
    o, S, g = run_with_grads(gdn_chunked, x)
    pad = {**x, "q": torch.nn.functional.pad(x["q"], (0, 64)), "k": torch.nn.functional.pad(x["k"], (0, 64)),
           "initial_state": torch.nn.functional.pad(x["initial_state"], (0, 0, 0, 64))}
    pad = {n: t.detach().requires_grad_(True) for n, t in pad.items()}
    o2, S2 = gdn_chunked(**pad, scale=64 ** -0.5, output_final_state=True)
    gen = torch.Generator().manual_seed(1)  # the same output/state projections as run_with_grads
    do, dS = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, S))
    ((o2.float() * do.float()).sum() + (S2[:, :, :64].float() * dS.float()).sum()).backward()
    torch.testing.assert_close(o2, o)
    torch.testing.assert_close(S2[:, :, :64], S)
    assert S2[:, :, 64:].abs().max() == 0
    torch.testing.assert_close(pad["q"].grad[..., :64], g["q"])
    torch.testing.assert_close(pad["k"].grad[..., :64], g["k"])
    for n in ("v", "g", "beta"):
        torch.testing.assert_close(pad[n].grad, g[n])


def test_fla_import_keeps_autotune_results_on_disk_unless_the_user_chose(monkeypatch):
    from hybrid.model.op_common import fla_module
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    assert fla_module("json.decoder").__name__ == "json.decoder"
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    fla_module("json.decoder")
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "0"
