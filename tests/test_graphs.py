"""hybrid/graphs.py: a GA-S2 candidate's optimizer step and held-out scoring replayed as CUDA graphs give
the plain calls' numbers. On CPU: the pieces a capture relies on (set_lr filling a tensor LR in place, the
step's micro-batch grouping, the plain fallback); on CUDA (`-m gpu`): graphed vs plain training and scoring
of a compiled GDN hybrid, the LR schedule moving every step."""

import functools

import pytest
import torch

from hybrid.fastpath import compile_layers
from hybrid.graphs import CudaGraphed, capturable, kl_step, masks_as_when_not_capturing
from hybrid.optim import adamw, optimizer_step, set_lr
from hybrid.stage2 import KLStudent, accumulate_kl, batch_stats, held_out_kl, stage2_param_groups, teacher_hidden
from hybrid.surgery import build_student
from tests.test_mixers import tiny_teacher

NULL = torch.autocast("cpu", enabled=False)


def test_set_lr_fills_a_captured_lr_in_place():
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw([{"params": [p], "lr": 2e-3}], 2e-3, 0.0, torch.device("cpu"))
    capturable(opt)
    lr = opt.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and opt.param_groups[0]["capturable"]
    set_lr(opt, 0.25)  # a replayed step reads this very tensor: it must change in place, not be replaced
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-4)
    set_lr(opt, 1.0)
    assert float(lr) == pytest.approx(2e-3)


def test_graphed_is_plain_off_cuda():
    seen = []
    g = CudaGraphed(lambda a, b: seen.append(1) or a + b, enabled=True)
    x = torch.ones(2)
    for _ in range(4):
        torch.testing.assert_close(g(x, x), 2 * x)
    assert len(seen) == 4 and g.replays == 0 and g.graph is None


def test_captured_forward_sees_the_plain_calls_masks(monkeypatch):
    """A stream capture, simulated on CPU: transformers then builds a causal mask for the softmax layers
    that a plain call does not (what made every capture recompile and fail on the H100); within
    masks_as_when_not_capturing they get the plain call's None again, and the same hidden states."""
    import transformers.utils.import_utils as import_utils
    teacher, student, batches = student_and_batches(torch.device("cpu"))
    seen = []
    softmax = student.model.layers[1].self_attn
    softmax.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    x = batches[0][0]
    with torch.no_grad():
        plain = student.model(input_ids=x, use_cache=False).last_hidden_state
        monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
        student.model(input_ids=x, use_cache=False)
        with masks_as_when_not_capturing():
            captured = student.model(input_ids=x, use_cache=False).last_hidden_state
    assert seen[0] is None and torch.is_tensor(seen[1]) and seen[2] is None
    torch.testing.assert_close(captured, plain)


def gpu_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # head_dim 64, as test_fastpath's GPU test (fla's GDN kernels at a Hopper shape)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=256)).cuda().eval().requires_grad_(False)


def student_and_batches(device, n_batches=4, B=2, T=64, compile_=False):
    teacher = tiny_teacher("llama_gqa", n_layers=3, dtype=torch.float32) if device.type == "cpu" else gpu_teacher()
    torch.manual_seed(3)
    student = build_student(teacher, ["gdn", "softmax", "gdn"]).to(device).requires_grad_(True).train()
    if compile_:
        compile_layers(student)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        x = torch.randint(0, teacher.config.vocab_size, (B, T), generator=g).to(device)
        y = torch.randint(0, teacher.config.vocab_size, (B, T), generator=g).to(device)
        batches.append((x, y, teacher_hidden(teacher, x)))
    return teacher, student, batches


def test_kl_step_is_accumulate_kl_then_a_step():
    """kl_step (what is captured) groups its flat tensors into micro-batches in order: the same weights as
    accumulate_kl over the same micro-batches and optimizer_step, bit for bit."""
    cpu = torch.device("cpu")
    runs = []
    for use_kl_step in (False, True):
        teacher, student, batches = student_and_batches(cpu)
        opt = adamw(stage2_param_groups(student, 1e-2, 1e-3), 1e-2, 0.0, cpu)
        model, params = KLStudent(student), list(student.parameters())
        for step in range(2):
            set_lr(opt, 1.0 / (step + 1))
            pair = batches[2 * step:2 * step + 2]  # accum 2
            if use_kl_step:
                loss = kl_step(model, teacher, opt, params, 1.0, cpu, NULL, *[t for b in pair for t in b])
            else:
                loss = accumulate_kl(model, teacher, None, 2, cpu, NULL, targets=pair)
                optimizer_step(opt, params, 1.0)
        runs.append((loss, [p.detach().clone() for p in params]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_training_and_scoring_match_plain():
    """Six steps of a compiled GDN hybrid with a new LR every step, plain vs captured after two warm-up steps
    (four replays), then its held-out scoring plain vs captured, twice with a step in between (the graph
    reads the current weights)."""
    cuda = torch.device("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    runs = []
    for graphs in (False, True):
        teacher, student, batches = student_and_batches(cuda, n_batches=6, compile_=True)
        opt = adamw(stage2_param_groups(student, 1e-2, 1e-3), 1e-2, 0.0, cuda)
        step = CudaGraphed(functools.partial(kl_step, KLStudent(student), teacher, opt, list(student.parameters()), 1.0,
                                             cuda, autocast), enabled=graphs, before_capture=lambda: capturable(opt))
        losses = []
        for i, b in enumerate(batches):
            set_lr(opt, 1.0 - 0.15 * i)
            losses.append(float(step(*b)))
        assert step.replays == (4 if graphs else 0)
        stats = CudaGraphed(functools.partial(batch_stats, student, teacher.lm_head.weight, autocast, 4096),
                            enabled=graphs)
        val = [(x, y) for x, y, _ in batches[:4]]
        h_val = [h for _, _, h in batches[:4]]
        scores = [held_out_kl(student, teacher, val, cuda, autocast, h_teacher=h_val, stats_fn=stats)["val_kl_per_batch"]]
        step(*batches[0])  # weights move: a captured scoring must see it
        scores.append(held_out_kl(student, teacher, val, cuda, autocast, h_teacher=h_val, stats_fn=stats)["val_kl_per_batch"])
        assert stats.replays == (6 if graphs else 0)
        runs.append((losses, scores, [p.detach().float().clone() for p in student.parameters()]))
    (l0, s0, w0), (l1, s1, w1) = runs
    assert l0 == pytest.approx(l1, rel=1e-3) and l0[-1] != pytest.approx(l0[0], rel=1e-3)  # it trains
    assert s0[0] != pytest.approx(s0[1], rel=1e-6)  # the step between the scorings moved them
    for a, b in zip(s0, s1):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_refuses_other_shapes():
    g = CudaGraphed(lambda a: a * 2, warmup=1)
    x = torch.ones(4, device="cuda")
    for _ in range(3):
        torch.testing.assert_close(g(x), 2 * x)
    assert g.replays == 2
    with pytest.raises(ValueError, match="captured for"):
        g(torch.ones(5, device="cuda"))
