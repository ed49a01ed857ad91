"""GDN's training kernels (hybrid/model/op_gdn_train.py) against mix()'s op-by-op path: outputs and the
gradients of every parameter and of the input. On CPU the kernels run in Triton's interpreter (a child
pytest with TRITON_INTERPRET=1, as in test_decode_kernels.py; Triton is not in CI's CPU set-up), and the
backward kernel is compiled for sm_90 to show it builds without spills; on CUDA (`-m gpu`) they run
compiled, inside a compiled decoder layer, in bf16."""

import pytest
import torch

from hybrid.model import mixers
from tests.conftest import interpreted, run_interpreted, triton_on_cpu
from hybrid.surgery import build_student
from tests.test_mixers import D_MODEL, make_mixer, tiny_teacher


@triton_on_cpu
def test_triton_interpreter_child_pytest():  # runs the tests named *interpreted*
    run_interpreted("tests/test_gdn_train.py", 6)


def mixer_and_grads(mixer, x: torch.Tensor, mode: str, monkeypatch, pad_mask=None):
    """mix(x) under GDN_TRAIN_KERNELS=mode -> (y, {name: grad} for x and every parameter); the kernels'
    use checked through a counter on gdn_train_inputs."""
    calls = []
    real = mixers.gdn_train_inputs
    monkeypatch.setattr(mixers, "GDN_TRAIN_KERNELS", mode)
    monkeypatch.setattr(mixers, "gdn_train_inputs", torch.compiler.disable(lambda *a: calls.append(1) or real(*a)))
    mixer.zero_grad()
    x = x.clone().requires_grad_(True)
    y, _ = mixer.mix(x, None, None, pad_mask, output_state=False)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype).to(y.device)  # weighs every output
    (y * w).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in mixer.named_parameters() if p.grad is not None}}
    return y.detach(), grads, len(calls)


def check_matches_mix(family: str, conv_size: int, T: int, monkeypatch, dtype=torch.float64, device="cpu",
                      rel: float = 1e-4, sharp: bool = True):
    """dtype float64 on CPU: mix() exact, the kernels fp32 inside. sharp: a + dt_bias past softplus's
    threshold (20) for some heads, which makes A_log's gradient (a sum of dg * g over every token) an
    ill-conditioned sum: two fp32 paths differed by 2e-3 in it."""
    _, mixer = make_mixer("gdn", family, conv_size=conv_size)
    with torch.no_grad():
        for p in mixer.parameters():  # off the identity conv and unit norms: every term matters
            p.add_(0.3 * torch.randn_like(p))
        mixer.a_proj.weight.mul_(20.0 if sharp else 1.0)
    mixer = mixer.to(device, dtype)
    x = torch.randn(3, T, D_MODEL, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    want_y, want, n_ref = mixer_and_grads(mixer, x, "off", monkeypatch)
    got_y, got, n_fast = mixer_and_grads(mixer, x, "always", monkeypatch)
    assert (n_ref, n_fast) == (0, 1)
    assert got.keys() == want.keys() and {"x", "A_log", "dt_bias", "a_proj.weight", "o_norm.weight"} <= want.keys()
    assert ("conv_weight" in want) == (conv_size > 1)
    assert_close_rel(got_y, got, want_y, want, rel)


def assert_close_rel(got_y, got: dict, want_y, want: dict, rel: float) -> None:
    """Output and every gradient within rel of the reference's largest magnitude."""
    for name, a, b in [("y", got_y, want_y)] + [(n, got[n], want[n]) for n in want]:
        err = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
        assert err < rel, (name, err)


@interpreted
@pytest.mark.parametrize("family,conv_size,T", [("llama_gqa", 4, 37), ("llama_gqa", 4, 50), ("llama3_mha", 4, 33),
                                                ("mistral_mqa", 4, 40), ("llama_gqa", 1, 37), ("llama_gqa", 2, 5)])
def test_interpreted_train_kernels_equal_mix(family, conv_size, T, monkeypatch):
    # kv groups of 2, 1 and 4 heads; rows across 1-4 blocks of 16 tokens, the conv's window across blocks; no conv
    check_matches_mix(family, conv_size, T, monkeypatch)


def test_train_kernels_only_where_they_apply(monkeypatch):
    """On CUDA tensors only by default; with pads, a state, or a Qwen3 q/k norm the op-by-op path runs (no Triton
    needed)."""
    _, mixer = make_mixer("gdn", "llama_gqa")
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    assert mixers.GDN_TRAIN_KERNELS == "cuda"
    assert mixer_and_grads(mixer, x, "off", monkeypatch)[2] == 0
    assert not mixer._train_kernels(x, None, None, False) and not mixer._train_kernels(x, None, None, True)
    monkeypatch.setattr(mixers, "GDN_TRAIN_KERNELS", "cuda")
    assert not mixer._train_kernels(x, None, None, False)  # CPU tensors
    monkeypatch.setattr(mixers, "GDN_TRAIN_KERNELS", "always")
    assert mixer._train_kernels(x, None, None, False)
    pads = torch.ones(2, 5, dtype=torch.bool)
    assert not mixer._train_kernels(x, None, pads, False) and not mixer._train_kernels(x, {"S": None}, None, False)
    _, qwen3 = make_mixer("gdn", "qwen3_qknorm")
    assert not qwen3._train_kernels(x, None, None, False)
    # a model's training forward (HF's sdpa attention, the default) hands its GDN layers no pad mask and no
    # state: the kernels' case (under eager attention a 4D causal mask arrives, and mix() runs op by op)
    seen = []
    monkeypatch.setattr(mixers.GatedDeltaNetMixer, "_train_kernels", lambda self, *a: seen.append(a) or False)
    teacher = tiny_teacher("llama_gqa", n_layers=2)
    student = build_student(teacher, ["gdn", "softmax"])
    assert student.config._attn_implementation == "sdpa"
    student.model(input_ids=torch.randint(0, teacher.config.vocab_size, (2, 16)), use_cache=False)
    assert len(seen) == 1 and seen[0][1:] == (None, None, False), seen  # (x, state, pad_mask, output_state)


@triton_on_cpu
def test_backward_kernels_compile_for_hopper_without_spills():
    from hybrid.model import op_gdn_train
    from tests.test_decode_kernels import ptxas_report
    p, i32 = "*bf16", "i32"
    sig = {"p_ptr": p, "p_sb": i32, "p_st": i32, "convw_ptr": "*fp32", "alog_ptr": "*fp32", "dtb_ptr": "*fp32",
           "dq_ptr": p, "dk_ptr": p, "dv_ptr": p, "dbeta_ptr": "*fp32", "dg_ptr": "*fp32", "dgate_ptr": p, "dp_ptr": p,
           "dy_ptr": p, "dalog_ptr": "*fp32", "ddtb_ptr": "*fp32", "T": i32, "PW": i32}
    conv = {"p_ptr": p, "p_sb": i32, "p_st": i32, "convw_ptr": "*fp32", "dy_ptr": p, "dp_ptr": p, "dw_ptr": "*fp32",
            "T": i32, "PW": i32}
    for D in (64, 128):  # SmolLM2's padded layout: 46 zero columns
        report = ptxas_report(op_gdn_train._kernels()["bwd"], sig, {"H": 9, "HKV": 3, "D": D, "W": 4, "HAS_CONV": True,
                                                                    "BLOCK_T": op_gdn_train.BLOCK_T[D], "NPAD": 46,
                                                                    "PAD_BLOCK": 64}, 4)
        assert "0 bytes spill stores" in report, (D, report)
        report = ptxas_report(op_gdn_train._kernels()["conv_bwd"], conv, {"CD": 15 * D, "D": D, "W": 4,
                                                                          "BLOCK_T": op_gdn_train.CONV_BLOCK_T[D]}, 4)
        assert "0 bytes spill stores" in report, (D, report)
        norm = {"o_ptr": p, "gate_ptr": p, "w_ptr": "*fp32", "dy_ptr": p, "do_ptr": p, "dgate_ptr": p, "dw_ptr": "*fp32",
                "eps": "fp32", "T": i32}
        report = ptxas_report(op_gdn_train._kernels()["norm_bwd"], norm, {"H": 9, "D": D,
                                                                         "BLOCK_T": op_gdn_train.BLOCK_T[D]}, 4)
        assert "0 bytes spill stores" in report, (D, report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_train_kernels_equal_mix_compiled(monkeypatch):
    """The kernels compiled on the GPU against mix()'s path, fp32 (fla's dots in tf32), plain and inside a
    compiled mix() (the fast path of training; its bf16 losses: bench_train.py --gdn_train_kernels=cuda)."""
    for family, conv_size in (("llama_gqa", 4), ("mistral_mqa", 4), ("llama_gqa", 1)):
        check_matches_mix(family, conv_size, 300, monkeypatch, torch.float32, "cuda", rel=1e-2, sharp=False)
    _, mixer = make_mixer("gdn", "llama_gqa")
    mixer = mixer.to("cuda", torch.float32)  # make_mixer builds float64
    x = torch.randn(2, 256, D_MODEL, device="cuda")
    want_y, want, _ = mixer_and_grads(mixer, x, "off", monkeypatch)
    mixer.mix = torch.compile(mixer.mix, dynamic=False)
    got_y, got, n = mixer_and_grads(mixer, x, "cuda", monkeypatch)
    assert n == 1
    assert_close_rel(got_y, got, want_y, want, 1e-2)
