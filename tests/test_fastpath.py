import pytest
import torch

from hybrid.fastpath import compile_layers, compile_report
from hybrid.stage2 import KLStudent, TeacherTargets, accumulate_kl, teacher_hidden
from hybrid.model.mixer_base import causal_conv
from hybrid.shards import RandomBatches
from hybrid.surgery import build_student
from test_mixers import tiny_teacher


def test_cached_teacher_targets_give_the_same_loss_and_grads_as_teacher_forwards():
    teacher = tiny_teacher("llama_gqa", n_layers=2)
    vocab = teacher.config.vocab_size
    students = []
    for _ in range(2):
        torch.manual_seed(5)
        students.append(build_student(teacher, ["gdn", "softmax"]).requires_grad_(True))
    cpu, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    ref_loss = accumulate_kl(KLStudent(students[0]), teacher, RandomBatches(2, 12, vocab, n=3), 2, cpu, autocast)
    targets = TeacherTargets(teacher, RandomBatches(2, 12, vocab, n=3), cpu)
    loss = accumulate_kl(KLStudent(students[1]), teacher, None, 2, cpu, autocast, targets=targets, first=0)
    torch.testing.assert_close(loss, ref_loss)
    for (n, a), b in zip(students[1].named_parameters(), students[0].parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    assert len(targets) == 2  # filled on demand, kept for the next candidate
    x, y, h = targets[1]
    assert targets[1][2] is h and h.shape == (*x.shape, teacher.config.hidden_size)
    small = TeacherTargets(teacher, RandomBatches(2, 12, vocab, n=3), torch.device("cpu"),
                           max_bytes=h.numel() * h.element_size())
    assert small.batches[0:0] == [] and small[1][2].shape == h.shape  # over budget: recomputed, same values
    assert small.batches[0][2] is not None and small.batches[1][2] is None
    torch.testing.assert_close(small[1][2], h)
    # a later optimizer step (first=2) reads the batches after the first step's, in the loader's order
    later = RandomBatches(2, 12, vocab, n=3)
    later.next_batch(), later.next_batch()
    ref2 = accumulate_kl(KLStudent(students[0]), teacher, later, 2, cpu, autocast)
    got2 = accumulate_kl(KLStudent(students[1]), teacher, None, 2, cpu, autocast, targets=targets, first=2)
    torch.testing.assert_close(got2, ref2)
    assert not torch.allclose(got2, loss)


def test_compile_layers_is_a_no_op_on_cpu():
    teacher = tiny_teacher("llama_gqa", n_layers=2)
    assert compile_layers(teacher) == 0
    assert all(layer._compiled_call_impl is None for layer in teacher.model.layers)


def test_causal_conv_compiled_branch_equals_the_reference(monkeypatch):
    # under torch.compile causal_conv takes a shifted-sum branch; force it without compiling (slow on CPU)
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True), torch.randn(6, 4, dtype=torch.float64)
    state = torch.randn(2, 3, 6, dtype=torch.float64)
    ref = causal_conv(x, w, state)
    g_ref = torch.autograd.grad(ref[0].square().sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = causal_conv(x, w, state)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(torch.autograd.grad(got[0].square().sum(), x), g_ref)


def test_regional_compile_is_one_graph_per_layer_kind():
    """compile_layers' promise (seconds, not a whole-model compile): every layer of a kind reuses one
    graph, so twice the depth compiles no more graphs (traced with grad, as in training; the backward
    runs too). Compiled here on CPU by hand (compile_layers itself only compiles on CUDA), with the eager
    backend: dynamo's graphs and guards, where a per-layer specialisation would show, are inductor's,
    without AOT autograd or code generation (18 s -> 8 s)."""
    from torch._dynamo.utils import counters
    graphs = []
    for depth in (1, 2):
        torch._dynamo.reset()
        counters.clear()
        teacher = tiny_teacher("llama_gqa", n_layers=2 * depth)
        student = build_student(teacher, ["gdn", "softmax"] * depth).requires_grad_(True)
        for layer in student.model.layers:
            layer.compile(dynamic=False, backend="eager")
        x = torch.randint(0, teacher.config.vocab_size, (2, 16))
        student.model(input_ids=x, use_cache=False).last_hidden_state.square().mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0, graphs
    assert compile_report().startswith(f"compile: {graphs[1]} graphs | FX graph cache 0 hit, 0 miss"), compile_report()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_layers_match_eager_on_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # head_dim 64: fla's GDN backward on Hopper with Triton < 3.7.1 needs K padded to 128
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=256)).cuda().eval()
    torch.manual_seed(5)
    eager = build_student(teacher, ["gdn", "softmax"]).requires_grad_(True)
    fast = build_student(teacher, ["gdn", "softmax"]).requires_grad_(True)
    fast.load_state_dict(eager.state_dict())
    assert compile_layers(fast) == 2
    x = torch.randint(0, teacher.config.vocab_size, (2, 64), device="cuda")
    outs = []
    for m in (eager, fast):
        h = m.model(input_ids=x).last_hidden_state
        h.square().mean().backward()
        outs.append((h, m.model.layers[0].self_attn.q_proj.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_training_forwards_build_no_kv_cache(monkeypatch):
    # HF builds a DynamicCache unless told not to: memory, and a compiled layer would specialise on its state
    teacher = tiny_teacher("llama_gqa", n_layers=2)
    student = build_student(teacher, ["gdn", "softmax"])
    seen = []
    for m in (teacher.model, student.model):
        forward = m.forward
        monkeypatch.setattr(m, "forward", lambda *a, _f=forward, **kw: seen.append(kw.get("use_cache")) or _f(*a, **kw))
    x = torch.randint(0, teacher.config.vocab_size, (1, 8))
    h_t = teacher_hidden(teacher, x)
    KLStudent(student)(x, x, h_t, teacher.lm_head.weight)
    assert seen == [False, False]


def test_bench_train_smoke_runs_every_section_and_paths_agree(tmp_path, monkeypatch):
    import bench_train
    monkeypatch.setattr(bench_train, "lines", [])
    settings = dict(SMOKE=True, DEVICE="cpu", OUT_DIR=str(tmp_path), SECTIONS="stage2,phases,stage1,gas2")
    for name, value in settings.items():
        monkeypatch.setattr(bench_train, name, value)
    smoke = {}
    bench_train.smoke_settings(smoke)
    for name in smoke:  # main() applies them to the module: monkeypatch restores them afterwards
        monkeypatch.setattr(bench_train, name, getattr(bench_train, name))
    bench_train.main()
    text = (tmp_path / "bench_train.md").read_text()
    rows = [r.split("|") for r in text.splitlines() if r.startswith("| stage2 |")]
    assert len(rows) == 4 and {r[3].strip() for r in rows} == {"eager", "fast kernels"}  # GDN_TRAIN_KERNELS "cuda"
    for spec in {r[2] for r in rows}:  # same init and batches: the fast path's losses are the eager ones
        losses = [r[-2].split() for r in rows if r[2] == spec]
        assert losses[0] == losses[1] and len(losses[0]) == 3
    assert "ETA 30 layers" in text and "ETA 30 candidates" in text and "| all-gdn | fast kernels |" in text
    assert "| fast kernels graphs |" in text and "steady ms/step" in text  # GA-S2 with its graphs off and on
