"""The static engine (hybrid/model/engine.py) against eager uncached decoding, on tiny float64 models.

Every mixer, the teacher itself (its own HF class, every layer softmax), single and left-padded
batches, prompts shorter and longer than the swa window. On CUDA (`-m gpu`), the graph-captured
step against the eager step and the uncached forward.
"""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hybrid.model.engine import StaticEngine, cache_bytes_per_sequence
from hybrid.model.modeling_hybrid import HybridConfig, HybridForCausalLM

WINDOW = 4
SPECS = {"teacher": None, "every_mixer": ["softmax", "gdn", "gla", "rwkv7", "swa"],
         "gdn": ["gdn", "softmax", "gdn"], "gla": ["gla", "softmax", "gla"], "rwkv7": ["rwkv7", "softmax", "rwkv7"],
         "swa": ["swa", "softmax", "swa"], "all_linear": ["gdn", "swa", "rwkv7"]}
VOCAB = 97


def tiny_model(spec: list[str] | None, family: str = "llama", dtype=torch.float64, seed: int = 0):
    """A random tiny model, weights nudged off their init (so every gate and LoRA matters); spec None:
    the teacher's own LlamaForCausalLM."""
    torch.manual_seed(seed)
    n_layers = len(spec) if spec else 2
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True)
    cfg = Qwen3Config(**common, head_dim=16) if family == "qwen3" else LlamaConfig(**common)
    teacher_class = Qwen3ForCausalLM if family == "qwen3" else LlamaForCausalLM
    model = teacher_class(cfg) if spec is None else HybridForCausalLM(
        HybridConfig.from_teacher(cfg, spec, {"window": WINDOW}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = torch.ones(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :T - n], mask[i, :T - n] = 0, 0
    return ids, mask


@torch.no_grad()
def engine_logits(model, ids, mask, n_new: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy through the engine -> (tokens (B, n_new), logits (B, n_new, V)) of every step."""
    engine = StaticEngine(model, ids.shape[0], ids.shape[1] + n_new, **kw)
    logits = [engine.prefill(ids, mask).clone()]
    for _ in range(n_new - 1):
        logits.append(engine.decode(logits[-1].argmax(-1)).clone())
    logits = torch.stack(logits, 1)
    return logits.argmax(-1), logits


@torch.no_grad()
def uncached_logits(model, ids, mask, tokens) -> torch.Tensor:
    """Logits at each new position from full forwards over prompt + tokens (no cache)."""
    full = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens counted, as generate() does
    return model(full, attention_mask=full_mask, position_ids=positions, use_cache=False).logits[:, ids.shape[1] - 1:-1]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("lengths", [[9], [9, 3, 6]], ids=["single", "left_padded"])
def test_engine_equals_uncached_forward(name, lengths):
    model = tiny_model(SPECS[name])
    ids, mask = padded_batch(lengths)
    tokens, logits = engine_logits(model, ids, mask, 6)
    torch.testing.assert_close(logits, uncached_logits(model, ids, mask, tokens), atol=1e-9, rtol=0)
    for i, n in enumerate(lengths):  # each padded row decodes as it would alone
        alone, _ = engine_logits(model, ids[i:i + 1, -n:], mask[i:i + 1, -n:], 6)
        assert torch.equal(alone[0], tokens[i])


@pytest.mark.parametrize("name", ["every_mixer", "swa"])
def test_prompts_around_the_swa_window(name):
    """Prompt lengths 1..window+2, single and left-padded beside a longer row: engine, HF generate
    and the uncached forward agree (a short prompt once left a wrapped swa state)."""
    model = tiny_model(SPECS[name], seed=1)
    for n in range(1, WINDOW + 3):
        for lengths in ([n], [n, WINDOW + 2]):
            ids, mask = padded_batch(lengths, seed=n)
            tokens, logits = engine_logits(model, ids, mask, 5)
            torch.testing.assert_close(logits, uncached_logits(model, ids, mask, tokens), atol=1e-9, rtol=0)
            eager = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)
            assert torch.equal(eager[:, ids.shape[1]:], tokens), (n, lengths)


def test_qwen3_teacher_and_hybrid():
    for spec in (None, ["gdn", "softmax"]):
        model = tiny_model(spec, family="qwen3")
        ids, mask = padded_batch([7, 4])
        tokens, logits = engine_logits(model, ids, mask, 4)
        torch.testing.assert_close(logits, uncached_logits(model, ids, mask, tokens), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name,family", [("teacher", "llama"), ("every_mixer", "llama"), ("gdn", "qwen3"),
                                         ("teacher", "qwen3")])
def test_packed_projections_equal_separate_ones(name, family):
    model = tiny_model(SPECS[name], family=family)
    ids, mask = padded_batch([9, 3, 6])
    engine = StaticEngine(model, 3, 16, pack=True)
    for plan in engine.plans:  # the fused mixer step is off on CPU
        assert plan.mlp_pack is not None and (plan.attn_pack is not None) == (plan.kind == "softmax")
    packed_tokens, packed_logits = engine_logits(model, ids, mask, 6, pack=True)
    tokens, logits = engine_logits(model, ids, mask, 6, pack=False)
    assert torch.equal(packed_tokens, tokens)
    torch.testing.assert_close(packed_logits, logits, atol=1e-10, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_packed_rows_padded_to_the_alignment(bias):
    from hybrid.model.packed import PackedLinear
    torch.manual_seed(0)
    linears = [nn.Linear(12, n, bias=bias).double() for n in (5, 3, 2)]
    pack = PackedLinear(linears, align=8)
    assert pack.weight.shape == (16, 12) and not pack.weight[10:].any()  # 10 rows + 6 zero rows
    x = torch.randn(4, 12, dtype=torch.float64)
    outs = pack(x)
    assert [o.shape[-1] for o in outs] == [5, 3, 2]
    for out, lin in zip(outs, linears):
        torch.testing.assert_close(out, lin(x), atol=1e-12, rtol=0)
    assert PackedLinear(linears, align=5).weight.shape[0] == 10  # already aligned: no padding


@torch.no_grad()
def test_packed_weights_follow_the_model_at_the_next_prefill():
    model = tiny_model(SPECS["teacher"])
    ids, mask = padded_batch([9, 3])
    engine = StaticEngine(model, 2, 24, pack=True)
    before = engine.generate(ids, mask, max_new_tokens=6)
    layer = model.model.layers[1]
    for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj):  # in place, as an optimizer
        lin.weight.add_(0.5 * torch.randn_like(lin.weight))
    after = engine.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(after, StaticEngine(model, 2, 24, pack=False).generate(ids, mask, max_new_tokens=6))
    assert not torch.equal(after, before)  # the edit mattered, and the packed copy saw it


@torch.no_grad()
def test_fast_generate_matches_hf_generate_and_samples():
    model = tiny_model(SPECS["every_mixer"], seed=2)
    ids, mask = padded_batch([8, 5], seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    eager = model.generate(ids, do_sample=False, **kw)
    assert torch.equal(model.generate(ids, do_sample=False, cache_implementation="static", **kw), eager)
    assert torch.equal(model.fast_generate(ids, do_sample=True, top_k=1, **kw), eager)  # top_k=1 is greedy
    sampled = model.fast_generate(ids, do_sample=True, temperature=1.0, **kw)
    assert sampled.shape == eager.shape and torch.equal(sampled[:, :8], ids)
    first = model.fast_engine
    assert torch.equal(model.fast_generate(ids, pack=True, **kw), eager) and model.fast_engine is not first
    second = model.fast_engine
    assert second.plans[0].mlp_pack is not None  # rebuilt with the options asked for, then reused with the same
    assert torch.equal(model.fast_generate(ids, pack=True, **kw), eager) and model.fast_engine is second
    eos = int(eager[0, 9])  # the second new token of row 0 as EOS: the row ends there, pads after
    out = model.fast_generate(ids, **{**kw, "eos_token_id": eos})
    assert torch.equal(out[0, :10], eager[0, :10]) and (out[0, 10:] == 0).all()
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, cache_implementation="static", num_beams=2, **kw)


def test_cache_bytes_count_matches_allocation():
    for name, spec in SPECS.items():
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model(spec, dtype=dtype)
            engine = StaticEngine(model, 3, 40)
            assert engine.max_len == 64  # rounded up to SLOT_ALIGN
            assert engine.cache_nbytes() == 3 * cache_bytes_per_sequence(model, 64), name
    model = tiny_model(SPECS["gdn"], dtype=torch.bfloat16)
    kv = 2 * 2 * 16 * 2  # k and v, 2 kv heads of 16, bf16
    gdn = 4 * 16 * 16 * 4 + 3 * (4 + 2 * 2) * 16 * 2  # fp32 state (H, D, D) + conv state (W-1, (H + 2 Hkv) D)
    assert model.cache_bytes_per_sequence(1000) == 1000 * kv + 2 * gdn
    assert cache_bytes_per_sequence(model, 2000) - cache_bytes_per_sequence(model, 1000) == 1000 * kv


def test_a_dropped_engine_frees_its_buffers_at_once():
    """No reference cycle through the engine: its buffers go when the last reference does (bench.py
    and fast_generate build one engine after another; GPU memory must not wait for the collector)."""
    import gc
    import weakref
    model = tiny_model(SPECS["gdn"])
    ids, mask = padded_batch([5, 3])
    outputs = []
    gc.disable()
    try:
        for compile in (False, True):  # torch.compile'd decode layers, here also checked against eager ones
            engine = StaticEngine(model, 2, 16, compile=compile)
            outputs.append(engine.generate(ids, mask, max_new_tokens=4))
            ref = weakref.ref(engine.buffers[0]["S"])
            del engine
            assert ref() is None, compile
    finally:
        gc.enable()
    assert torch.equal(outputs[0], outputs[1])


def test_compiled_decode_compiles_per_layer_kind_not_per_layer():
    """compile=True: torch.compile(run_layer) is reused by every layer of a kind (the LayerPlans and
    modules differ, the code does not), so twice the depth compiles no more graphs. A per-layer
    specialisation would recompile 30 times on a real model and hit dynamo's limit (eager again)."""
    from torch._dynamo.utils import counters
    ids, mask = padded_batch([5, 3])
    graphs = []
    for depth in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model(["gdn", "softmax"] * depth)
        StaticEngine(model, 2, 16, compile=True, pack=True).generate(ids, mask, max_new_tokens=3)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] and 0 < graphs[0] <= 6, graphs


def test_errors():
    model = tiny_model(SPECS["gdn"])
    engine = StaticEngine(model, 2, 10)
    with pytest.raises(ValueError, match="batch 2, max_len 64"):
        engine.prefill(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed max_len"):
        engine.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=61)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["teacher", "gdn"])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_equals_eager_and_uncached(name, compile):
    """The captured step (fla's kernels for gdn; torch.compile'd layers too) replays the eager
    step's tokens, and follows the uncached forward (bf16, the speed path's dtype)."""
    model = tiny_model(SPECS[name], dtype=torch.bfloat16).cuda()
    ids, mask = padded_batch([12, 7, 9])
    ids, mask = ids.cuda(), mask.cuda()
    graph_tokens, graph_logits = engine_logits(model, ids, mask, 8, cuda_graph=True, compile=compile)
    eager_tokens, eager_logits = engine_logits(model, ids, mask, 8, cuda_graph=False)
    same = (graph_tokens == eager_tokens).float().mean()
    assert same == 1 or (compile and same > 0.9)  # fused kernels round differently in bf16
    if not compile:
        torch.testing.assert_close(graph_logits, eager_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(graph_logits.float(), uncached_logits(model, ids, mask, graph_tokens).float(),
                               atol=0.1, rtol=0.1)
    engine = StaticEngine(model, 3, 40)
    first = engine.generate(ids, mask, max_new_tokens=10)
    assert engine.graph is not None  # captured, and reused by the next generation
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=10), first)
