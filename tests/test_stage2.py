"""The one held-out KL: its KL equals the training loss's KL; precomputed teacher states change nothing."""

import contextlib
import time

import torch

from hybrid.losses import chunked_distill_loss
from hybrid.optim import TimedCosine, adamw, cosine_lr, load_optimizer, optimizer_step, set_lr
from hybrid.parallel import synced_seconds
from hybrid.shards import val_batches
from hybrid.stage2 import held_out_kl, stage2_param_groups, teacher_hidden, teacher_targets
from hybrid.surgery import build_student
from hybrid.teacher import load_teacher


def test_held_out_kl_agrees_with_the_training_kl(tiny_setup):
    teacher, _ = load_teacher(tiny_setup["model"])
    student = build_student(teacher, ["gdn", "softmax", "gla", "gdn"])
    val = val_batches(tiny_setup["data"], 2, 32, 3)
    cpu, plain = torch.device("cpu"), contextlib.nullcontext()
    r = held_out_kl(student, teacher, val, cpu, plain, chunk_tokens=7)
    again = held_out_kl(student, teacher, val, cpu, plain, chunk_tokens=64, h_teacher=teacher_targets(teacher, val, cpu))
    torch.testing.assert_close(torch.tensor(again["val_kl_per_batch"]), torch.tensor(r["val_kl_per_batch"]))
    with torch.no_grad():
        ref = [float(chunked_distill_loss(student.model(input_ids=x).last_hidden_state, student.lm_head.weight,
                                          teacher_hidden(teacher, x), teacher.lm_head.weight)[1]["kl"]) for x, _ in val]
    torch.testing.assert_close(torch.tensor(r["val_kl_per_batch"]), torch.tensor(ref), rtol=1e-5, atol=1e-7)
    assert abs(r["val_kl"] - sum(ref) / 3) < 1e-6
    assert r["val_kl_std"] > 0 and 0 <= r["top1_agreement"] < 1 and r["val_ppl"] > 1
    same = held_out_kl(teacher, teacher, val, cpu, plain)
    assert abs(same["val_kl"]) < 1e-6 and same["top1_agreement"] == 1.0 and same["val_ppl"] == same["teacher_ppl"]


def test_one_lr_convention_and_optimizer_step(tiny_setup):
    teacher, _ = load_teacher(tiny_setup["model"])
    student = build_student(teacher, ["gdn", "softmax", "gla", "gdn"]).requires_grad_(True)
    opt = adamw(stage2_param_groups(student, 1e-3, 1e-4), 1e-3, 0.0, torch.device("cpu"))
    scale = cosine_lr(5, 10, 2, 1.0, 0.1)
    set_lr(opt, scale)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * scale, 1e-4 * scale]
    x = torch.randint(0, 256, (1, 8))
    student(input_ids=x).logits.square().mean().backward()
    before = [p.detach().clone() for p in student.parameters()]
    norm = optimizer_step(opt, student.parameters(), 0.0)  # 0 = no clipping (not: clip to zero)
    assert norm > 0 and all(p.grad is None for p in student.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    state = opt.state_dict()
    for g in state["param_groups"]:
        del g["base_lr"]  # an older checkpoint's groups
    fresh = adamw(stage2_param_groups(student, 1e-3, 1e-4), 1e-3, 0.0, torch.device("cpu"))
    load_optimizer(fresh, state)
    set_lr(fresh, 1.0)
    assert [g["lr"] for g in fresh.param_groups] == [1e-3, 1e-4]


def test_timed_cosine_fits_the_schedule_to_a_time_limit():
    """A run with --time_limit_s: the pace of the 10 steps after the first (compiling) one sets the schedule's
    length, so the steps the limit leaves room for end at the cosine's floor; without a limit, cosine_lr."""
    plain = TimedCosine(100, 12, 0.1)
    assert not any(plain.wants_time(s) for s in range(100))  # no limit: no timing, no GPU syncs
    assert [plain.scale(s) for s in range(100)] == [cosine_lr(s, 100, 12, 1.0, 0.1) for s in range(100)]
    timed = TimedCosine(100, 12, 0.1, limit_s=60)
    assert [s for s in range(100) if timed.wants_time(s)] == [0, 10]
    before = [timed.scale(s) for s in range(11)]
    assert timed.observe(0, 10.0) == ""  # the first step compiled for 10 s
    note = timed.observe(10, 20.0)  # then 1 s per step: 40 s left fit 38 more steps (x 0.97)
    assert timed.total == 49 and "ends at step 49 of 100" in note and "1.000 s/step" in note
    assert before == [timed.scale(s) for s in range(11)]  # inside the warm-up: the LR so far is unchanged
    assert timed.scale(48) < 0.102 and timed.scale(30) > 0.5  # annealed by its last step, not before
    roomy = TimedCosine(100, 12, 0.1, limit_s=1e4, start=40)  # a resumed run times its own steps
    assert [s for s in range(100) if roomy.wants_time(s)] == [40, 50]
    roomy.observe(40, 5.0)
    assert "all 100 steps fit" in roomy.observe(50, 15.0) and roomy.total == 100
    late = TimedCosine(100, 12, 0.1, limit_s=60)
    late.observe(0, 10.0)
    late.observe(10, 80.0)  # already past the limit: the schedule still ends after the next step
    assert late.total == 12 and not TimedCosine(10, 2, 0.1, limit_s=60).marks  # too short a run to time
    assert 5.0 <= synced_seconds(time.time() - 5.0, torch.device("cpu")) < 6.0  # what distill.py hands observe()
