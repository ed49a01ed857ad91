"""hybrid/retrieval.py: the teacher's copy (retrieval) heads, against HF's own eager attention weights."""

import numpy as np
import pytest
import torch
from conftest import make_teacher_dir, tiny_tokenizer
from transformers import LlamaForCausalLM

from hybrid.retrieval import (attention_argmax, copy_pairs, head_copy_scores, keep_then_fill, layer_scores, mqar_prompts,
                              previous_token_rates)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = make_teacher_dir(str(tmp_path_factory.mktemp("teacher")), layers=3, seed=3)
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def records():
    hay = np.random.default_rng(0).integers(2, 256, size=4000)
    return mqar_prompts(tiny_tokenizer(), hay, n=3, length=96, seed=0)


def test_copy_pairs_point_from_each_repeated_key_to_its_value(records):
    for r in records:
        ids, pairs = r["input_ids"], copy_pairs(r["input_ids"], r["answer_positions"])
        assert len(pairs) == len(r["answer_positions"]) > 0
        for (q, s), p in zip(pairs, r["answer_positions"]):
            assert q == p - 1 and ids[s] == ids[p] and s < q  # the value's first occurrence, before the key
            assert ids[s - 1] == ids[q]  # ... right after the same key in the pairs
    assert copy_pairs([5, 6, 7, 5, 6], [4]) == [(3, 1)]


def test_attention_argmax_matches_hf_eager_attention(teacher, records):
    """The argmax from the layers' own q/k/RoPE (GQA: 4 query heads on 2 KV heads) is HF's eager attention's."""
    ids = torch.tensor([r["input_ids"] for r in records])
    query = torch.tensor([[q for q, _ in copy_pairs(r["input_ids"], r["answer_positions"])] for r in records])
    ours = attention_argmax(teacher, ids, query)  # (L, B, P, H)
    with torch.no_grad():
        att = teacher(ids, output_attentions=True).attentions  # L x (B, H, T, T)
    ref = torch.stack([a.gather(2, query[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[3])).argmax(-1)
                       .transpose(1, 2) for a in att])
    assert ours.shape == (3, len(records), query.shape[1], 4)
    assert torch.equal(ours, ref)
    assert (ours <= query[None, ..., None]).all()  # causal
    assert len(set(ours.flatten().tolist())) > 10  # the heads look at many places: not a degenerate case


def test_previous_token_rates_from_hf_eager_attention(teacher, records):
    ids = torch.tensor([r["input_ids"] for r in records])
    rates = previous_token_rates(teacher, ids, stride=2)
    with torch.no_grad():
        att = teacher(ids, output_attentions=True).attentions  # L x (B, H, T, T)
    q = torch.arange(32, ids.shape[1], 2)
    ref = torch.stack([(a[:, :, q].argmax(-1) == q - 1).float().mean((0, 2)) for a in att])  # (L, H)
    assert rates.shape == (3, 4) and torch.equal(rates, ref) and 0 < rates.sum() < rates.numel()


def test_head_copy_scores_count_hits_at_the_values(teacher, records, monkeypatch):
    scores, n = head_copy_scores(teacher, records, torch.device("cpu"), batch=2)
    pairs = [copy_pairs(r["input_ids"], r["answer_positions"]) for r in records]
    best = attention_argmax(teacher, torch.tensor([r["input_ids"] for r in records]),
                            torch.tensor([[q for q, _ in ps] for ps in pairs]))
    source = torch.tensor([[s for _, s in ps] for ps in pairs])
    assert n == source.numel() and scores.shape == (3, 4)
    torch.testing.assert_close(scores, (best == source[None, ..., None]).float().mean((1, 2)))
    # the bookkeeping across batches: an attention that lands on the values in head 0 of layer 1 only
    import hybrid.retrieval as retrieval

    def forged(model, ids, query):
        best = torch.zeros(3, *query.shape, 4, dtype=torch.long)
        for b, row in enumerate(ids.tolist()):  # head 0 of layer 1: the token after the key's first occurrence
            best[1, b, :, 0] = torch.tensor([row.index(row[q]) + 1 for q in query[b].tolist()])
        return best
    monkeypatch.setattr(retrieval, "attention_argmax", forged)
    hit, _ = head_copy_scores(teacher, records, torch.device("cpu"), batch=2)
    assert hit[1].tolist() == [1.0, 0.0, 0.0, 0.0] and hit[0].eq(0).all() and hit[2].eq(0).all()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="MQAR records of one length"):
        head_copy_scores(teacher, [records[0], {**records[1], "answer_positions": records[1]["answer_positions"][:2]}],
                         torch.device("cpu"))


def test_layer_scores_and_keep_then_fill():
    heads = torch.tensor([[0.1, 0.2], [0.9, 0.0], [0.3, 0.6], [0.0, 0.0]])
    scores = layer_scores(heads, [0, 1, 2, 3])
    assert scores == pytest.approx({0: 0.2, 1: 0.9, 2: 0.6, 3: 0.0})
    assert keep_then_fill(scores, 0.5, [3, 0, 2, 1]) == [1, 2, 3, 0]  # kept best first, then the ranking's order
    assert keep_then_fill(scores, 0.95, [3, 0, 2, 1]) == [3, 0, 2, 1]  # nothing kept: the ranking itself


def test_captured_latents_are_causal_under_eager_and_sdpa_attention(teacher):
    """hybrid.capture runs decoder layers one by one with no mask: HF's eager attention is causal only with
    the mask capture.causal_mask gives it, sdpa without. Both match the model's own forward."""
    from hybrid.capture import capture_all_layers
    ids = torch.randint(2, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = teacher(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    sdpa = LlamaForCausalLM.from_pretrained(teacher.name_or_path, attn_implementation="sdpa").eval()
    for model in (teacher, sdpa):
        got = capture_all_layers(model, ids, [0, 1])
        for i in (0, 1):
            torch.testing.assert_close(got[i][0], ref[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[i][1], ref[i + 1], atol=1e-5, rtol=1e-5)


def test_ablate_heads_script(tiny_setup, monkeypatch):
    """experiments/ablate_heads.py: the intact row is the teacher itself (KL 0), ablations cost KL, weights come back."""
    import experiments.ablate_heads as ab
    for name, value in dict(TEACHER=tiny_setup["model"], DATA_DIR=tiny_setup["data"], PROMPTS=2, LENGTH=64,
                            EVAL_BATCHES=1, ABLATIONS="copy:1;layers:1;heads:0.1,0.2").items():
        monkeypatch.setattr(ab, name, value)
    before = {k: v.clone() for k, v in ab.load_teacher(tiny_setup["model"])[0].state_dict().items()}
    rows = ab.main()
    assert [r["ablation"] for r in rows] == ["none", "copy:1", "layers:1", "heads:0.1,0.2"]
    for kl in ("val_kl", "repeats_kl"):
        assert rows[0][kl] == pytest.approx(0, abs=1e-6) and all(r[kl] > 1e-6 for r in rows[1:])
    x, y = ab.val_batches(tiny_setup["data"], 4, 64, 1)[0]
    (xr, yr), = ab.repeated_batches([(x, y)], 1.0, 0)
    assert torch.equal(xr[:, 1:], yr[:, :-1]) and not torch.equal(xr, x)  # rows edited, still shifted by one
    assert rows[2]["heads"] == ["1.0", "1.1", "1.2", "1.3"] and rows[3]["heads"] == ["0.1", "0.2"]
    assert all(0 <= r["mqar"] <= 1 for r in rows)
    model = ab.load_teacher(tiny_setup["model"])[0]
    saved = ab.zero_heads(model, [(0, 1)])
    assert model.model.layers[0].self_attn.o_proj.weight[:, 16:32].abs().sum() == 0  # head 1 of 4, head_dim 16
    ab.restore(saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="copy:N, layers:a,b"):
        ab.parse("every:2", torch.zeros(2, 4), None)
