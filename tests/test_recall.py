"""Recall suite: deterministic generation, prompt invariants, scorers, run_recall end to end (CPU, offline)."""

import copy
import random
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hybrid.recall_score import (answer_nll, length_retention, logits_at, read_suite, retention, run_recall,
                                 score_generation, summarize)
from hybrid.recall_tasks import TASKS, build_suite, write_suite

LENGTHS = (256, 512)
HAY_WORDS = ("the a river stone walks over under bright quiet house table runs near far old new green small "
             "large city road music light dark water fire wind tree leaf north south east west and of to "
             "in on with from slow fast warm cold").split()
EXTRA_WORDS = ("apple banana cherry grape lemon mango olive peach plum melon kiwi lime berry onion garlic "
               "pepper carrot potato tomato radish celery spinach squash turnip ginger fennel basil thyme "
               "sage mint dill clove cumin anise nutmeg saffron vanilla cocoa coffee honey sugar flour bread "
               "butter cheese cream yogurt pasta rice beans lentil barley wheat oats corn millet quinoa "
               "walnut almond cashew hazel pecan acorn sesame poppy mustard radar laser sonar piano flute "
               "harp drum banjo cello oboe tuba organ lute zither bugle").split()

TEMPLATE_WORDS = ("Some special magic numbers uuids are hidden in the following text. Memorize them; I will ask you "
                  "about them afterwards. What is the number uuid for mentioned above? A pass key somewhere long "
                  "below. Find it and remember it. Memorize and track chains of variable assignments all "
                  "variables assigned value Answer: they Now same pairs again, another order each word followed "
                  "by its")


def _sentences(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = [rng.choice(HAY_WORDS) for _ in range(rng.randint(5, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return out


@pytest.fixture(scope="module")
def haystack() -> list[str]:
    rng = random.Random(0)
    return [" ".join(_sentences(rng, 60)) + "\nSection ends here." for _ in range(12)]


@pytest.fixture(scope="module")
def tokenizer(haystack):
    """A byte-level BPE (like SmolLM2's) trained offline; EXTRA_WORDS never occur in the haystack."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = haystack + [" ".join(EXTRA_WORDS * 20), " ".join(HAY_WORDS * 20), "VAR = 0123456789 :,.-"] + [TEMPLATE_WORDS] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def suite(tokenizer, haystack):
    return build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples=3, seed=1)


def test_suite_is_deterministic(tokenizer, haystack, suite, tmp_path):
    write_suite(str(tmp_path / "a.jsonl"), suite)
    write_suite(str(tmp_path / "b.jsonl"), build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples=3, seed=1))
    a, b = (tmp_path / "a.jsonl").read_bytes(), (tmp_path / "b.jsonl").read_bytes()
    assert a == b
    other = build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples=3, seed=2)
    assert [r.get("prompt") for r in other] != [r.get("prompt") for r in suite]
    assert read_suite(str(tmp_path / "a.jsonl")) == suite
    assert {(r["task"], r["length"]) for r in suite} == {(t, L) for t in TASKS for L in LENGTHS}


def test_prompt_lengths_within_tolerance(tokenizer, suite):
    for r in suite:
        n = len(r["input_ids"]) if r["task"] == "mqar" else len(tokenizer.encode(r["prompt"], add_special_tokens=False))
        assert n == r["n_tokens"]
        assert abs(n - r["length"]) <= max(8, 0.02 * r["length"]), (r["task"], n, r["length"])


def test_answers_present_exactly_once(suite):
    gen = [r for r in suite if r["task"] != "mqar"]
    for r in gen:
        if r["task"] == "vt":  # each answer variable is assigned exactly once; the last one is never referenced
            for name in r["answers"]:
                assert r["prompt"].count(f"VAR {name} =") == 1
            assert r["prompt"].count(r["answers"][-1]) == 1
        else:
            for a in r["answers"]:
                assert r["prompt"].count(a) == 1, (r["task"], a)
        assert r["prompt"].rstrip().endswith(("is", "are", "are:", "they are:"))
    multi = [r for r in gen if r["task"] == "niah_multikey"]
    for r in multi:  # distractors present, with values other than the answer
        needles = dict(re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", r["prompt"]))
        asked = re.search(r"magic number for ([a-z]+-[a-z]+) mentioned", r["prompt"]).group(1)
        assert len(needles) == 4 and len(set(needles.values())) == 4 and needles[asked] == r["answers"][0]
    assert all(len(r["answers"]) == 4 for r in gen if r["task"] == "niah_multivalue")
    depths = [r["depth"] for r in gen if r["task"] == "passkey" and r["length"] == 256]
    assert depths == [0.0, 0.5, 1.0]


def test_needle_depth_follows_request(tokenizer, suite):
    for r in suite:
        if r["task"] != "passkey":
            continue
        i = r["prompt"].index("The pass key is")
        start, end = r["prompt"].index("\n\n") + 2, r["prompt"].rindex("\n\n")
        frac = (i - start) / (end - start)
        assert abs(frac - r["depth"]) < 0.15, (frac, r["depth"])


def test_mqar_records(tokenizer, suite):
    for r in (r for r in suite if r["task"] == "mqar"):
        ids, pos = r["input_ids"], r["answer_positions"]
        assert len(ids) == r["length"] and len(set(pos)) == len(pos)
        for p in pos:  # the key before each queried value occurs once before, followed by the same value
            key, value = ids[p - 1], ids[p]
            first = ids.index(key)
            assert first < p - 1 and ids[first + 1] == value
            assert ids.count(key) == 2 and ids.count(value) == 2 and key != value


def test_generation_scorer():
    assert score_generation(["12345"], "The pass key is 12345.") == 1.0
    assert score_generation(["12345"], "") == 0.0
    assert score_generation(["a1", "b2", "c3", "d4"], "b2 and D4") == 0.5


class OracleLM(torch.nn.Module):
    """Predicts input_ids[t + shift] at position t; `generate` appends a fixed text per prompt."""

    def __init__(self, vocab_size: int, shift: int = 1, replies: dict | None = None, keep_logits: bool = True):
        super().__init__()
        self.vocab_size, self.shift, self.replies, self.keep_logits = vocab_size, shift, replies or {}, keep_logits

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        target = torch.roll(input_ids, -self.shift, dims=1)
        logits = torch.nn.functional.one_hot(target, self.vocab_size).float()
        if self.keep_logits and isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        return type("Out", (), {"logits": logits})()

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for b in range(input_ids.shape[0]):
            prompt = input_ids[b][attention_mask[b].bool()].tolist()
            reply = self.replies.get(tuple(prompt), [])[:max_new_tokens]
            rows.append(torch.tensor(reply + [0] * (max_new_tokens - len(reply))))
        return torch.cat([input_ids, torch.stack(rows)], dim=1)


def test_mqar_scores_the_value_predicted_before_it(tokenizer, suite):
    """run_recall scores an MQAR value at position p by the prediction made at p - 1: an oracle of the
    next token gets 1, a model predicting the current token (or the one after next) about 0."""
    mqar = [r for r in suite if r["task"] == "mqar"]
    V = len(tokenizer)
    assert run_recall(OracleLM(V, 1), tokenizer, mqar, batch_size=2)["overall"] == 1.0
    assert run_recall(OracleLM(V, 0), tokenizer, mqar, batch_size=2)["overall"] == 0.0
    assert run_recall(OracleLM(V, 2), tokenizer, mqar, batch_size=2)["overall"] <= 0.05


def test_run_recall_oracle_and_null(tokenizer, suite):
    replies = {tuple(tokenizer.encode(r["prompt"], add_special_tokens=False)):
               tokenizer.encode(" " + ", ".join(r["answers"]), add_special_tokens=False) for r in suite if "prompt" in r}
    V = len(tokenizer)
    for keep in (True, False):
        res = run_recall(OracleLM(V, 1, replies, keep), tokenizer, suite, batch_size=2)
        assert res["overall"] == 1.0, list(res["scores"].items())
    null = run_recall(OracleLM(V, 0, {}), tokenizer, suite, batch_size=3)  # echoes nothing; the prompt holds the answer
    assert null["overall"] == 0.0, null["scores"]
    # the answer NLL: the next-token oracle's is below the null model's on every sample that has one
    nll = {(s["task"], s["length"], s["index"]): s["nll"] for s in null["samples"] if "nll" in s}
    assert len(nll) > 0 and all(s["nll"] < nll[(s["task"], s["length"], s["index"])]
                                for s in res["samples"] if "nll" in s)
    assert retention(null, res) == {t: {str(L): 0.0 for L in LENGTHS} for t in TASKS}
    assert length_retention(null, res) == {str(L): 0.0 for L in LENGTHS}
    assert length_retention(res, res) == {str(L): 1.0 for L in LENGTHS}
    assert "niah_single" in null["task_mean"]


def test_length_retention_is_a_ratio_of_means_not_inflated_by_a_task_the_teacher_fails():
    """The 2026-12-06 pipeline's scores at 8K: the teacher all but fails MQAR (0.003), the hybrid got 0.009. The
    mean of per-task ratios counted that as 300% kept and read 94%; the ratio of the means reads 61%."""
    teacher = {"passkey": {"8000": 0.4}, "niah_single": {"8000": 0.5}, "niah_uuid": {"8000": 0.1},
               "niah_multikey": {"8000": 0.5}, "niah_multivalue": {"8000": 0.15}, "vt": {"8000": 0.0},
               "mqar": {"8000": 0.003}}
    hybrid = {"passkey": {"8000": 0.3}, "niah_single": {"8000": 0.4}, "niah_uuid": {"8000": 0.0},
              "niah_multikey": {"8000": 0.2}, "niah_multivalue": {"8000": 0.1}, "vt": {"8000": 0.0},
              "mqar": {"8000": 0.009}}
    per_task = [r["8000"] for r in retention(hybrid, teacher).values() if r["8000"] is not None]
    assert sum(per_task) / len(per_task) == pytest.approx(0.936, abs=1e-3)  # what eval.md printed before
    assert length_retention({"scores": hybrid}, {"scores": teacher}) == {"8000": pytest.approx(1.009 / 1.653)}
    assert length_retention({"passkey": {"1024": 0.5}}, {"passkey": {"1024": 0.0}}) == {"1024": None}
    assert length_retention({}, teacher) == {}  # a student without those tasks: nothing to compare


def test_run_recall_tiny_llama(tokenizer, suite, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    small = [r for r in suite if r["length"] == 256 and r["index"] < 2]
    path = str(tmp_path / "suite.jsonl")
    write_suite(path, small)
    lines = []
    res = run_recall(model, tokenizer, path, batch_size=2, log=lines.append)
    assert set(res["scores"]) == set(TASKS) and len(lines) == len(TASKS)
    assert all(0.0 <= v <= 1.0 for by_len in res["scores"].values() for v in by_len.values())
    assert len(res["samples"]) == len(small)
    # MQAR through logits_to_keep equals the full-logits argmax
    r = next(r for r in small if r["task"] == "mqar")
    ids = torch.tensor([r["input_ids"]])
    full = model(input_ids=ids).logits[0].argmax(-1)
    before = [p - 1 for p in r["answer_positions"]]
    got = logits_at(model, ids, [before])[0].argmax(-1)  # MQAR's prediction at each answer
    assert torch.equal(got, full[before])
    # the teacher-forced answer NLL: right-padded rows of different lengths, kept logits only, equal to
    # each row alone through full logits
    rows = [r["input_ids"][:50], r["input_ids"][:37]]
    targets = [[10, 20, 49], [5, 36]]
    want = []
    for row, tg in zip(rows, targets):
        logp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].double(), -1)
        want.append(-sum(logp[p - 1, row[p]].item() for p in tg) / len(tg))
    assert answer_nll(model, rows, targets, 0, "cpu") == pytest.approx(want, rel=1e-5)
    odd = lambda input_ids, **kw: type("Out", (), {"logits": torch.zeros(2, 7, 5)})()  # noqa: E731
    with pytest.raises(ValueError, match=r"recall: the model returned logits of shape \(2, 7, 5\) for 50 tokens and 5 kept"):
        answer_nll(odd, rows, targets, 0, "cpu")
    assert all(("nll" in s) == (s["task"] in ("passkey", "niah_single", "niah_uuid", "niah_multikey", "mqar"))
               for s in res["samples"])
    assert set(res["nll"]) == {"passkey", "niah_single", "niah_uuid", "niah_multikey", "mqar"}
    # batched (left-padded) generation equals one prompt at a time
    pair = [small[0], {**small[0], "index": 1, "prompt": small[0]["prompt"][60:]}]  # prompts of different lengths
    one = run_recall(model, tokenizer, pair, batch_size=1)
    two = run_recall(model, tokenizer, pair, batch_size=2)
    assert [s["output"] for s in one["samples"]] == [s["output"] for s in two["samples"]]


def test_chat_mode(tokenizer, haystack):
    with pytest.raises(ValueError, match="chat_template"):
        build_suite(tokenizer, haystack, lengths=(256,), n_samples=1, tasks=("passkey",), chat=True)
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    for r in build_suite(chat_tok, haystack, lengths=(256,), n_samples=2, tasks=("passkey", "niah_single"), chat=True):
        assert r["prompt"].startswith("<user>") and "</user><bot>" in r["prompt"]
        assert abs(len(chat_tok.encode(r["prompt"], add_special_tokens=False)) - 256) <= 8


def test_bad_inputs(tokenizer, haystack, tmp_path):
    with pytest.raises(ValueError, match="unknown recall tasks"):
        build_suite(tokenizer, haystack, tasks=("needle",))
    with pytest.raises(ValueError, match="max_context"):
        build_suite(tokenizer, haystack, lengths=(1024,), max_context=512)
    with pytest.raises(ValueError, match="pass more text"):
        build_suite(tokenizer, haystack[:1], lengths=(8192,))
    with pytest.raises(FileNotFoundError, match="build_suite"):
        read_suite(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"task": "passkey"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_suite(str(tmp_path / "bad.jsonl"))
    records = [{"task": "passkey", "length": 8, "index": 0, "prompt": "x", "answers": ["1"], "max_new_tokens": 1,
                "tokenizer_sha": "0000"}]
    with pytest.raises(ValueError, match="another tokenizer"):
        run_recall(OracleLM(len(tokenizer)), tokenizer, records)


def test_summarize_means():
    samples = [{"task": "a", "length": 8, "score": s} for s in (1.0, 0.0)] + [{"task": "b", "length": 8, "score": 1.0}]
    res = summarize(samples)
    assert res["scores"] == {"a": {"8": 0.5}, "b": {"8": 1.0}} and res["overall"] == 0.75


def test_recall_through_the_engine_equals_generate(tokenizer, suite, monkeypatch):
    """eval.py decodes recall prompts through the static engine on GPU: the same outputs as generate(),
    for the teacher's own class and for a hybrid, left-padded batches included."""
    from hybrid import recall_score
    from hybrid.model.modeling_hybrid import HybridConfig, HybridForCausalLM
    calls = []
    real = recall_score.Engines.generate
    monkeypatch.setattr(recall_score.Engines, "generate", lambda self, *a: calls.append(1) or real(self, *a))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    small = [r for r in suite if r["length"] == 256 and r["index"] < 2 and r["task"] != "mqar"]
    small += [{**small[0], "index": 7, "prompt": small[0]["prompt"][80:]}]  # a shorter row: left padding
    for make in (lambda: LlamaForCausalLM(config),
                 lambda: HybridForCausalLM(HybridConfig.from_teacher(config, ["gdn", "softmax", "gdn"], {}))):
        torch.manual_seed(0)
        model = make().double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # off the init, so outputs vary by prompt
        slow = run_recall(model, tokenizer, small, batch_size=3)
        calls.clear()
        fast = run_recall(model, tokenizer, small, batch_size=3, engine=True)
        assert len(calls) == len({r["task"] for r in small})  # one batch of <= 3 rows per task, each decoded by it
        assert [s["output"] for s in fast["samples"]] == [s["output"] for s in slow["samples"]]
        assert len({s["output"] for s in slow["samples"]}) > 1  # not one constant string


def test_recall_builds_one_engine_per_length(tokenizer, haystack, monkeypatch):
    """Every task at one prompt length decodes through one engine (the suite lists its tasks first, lengths
    second: that order built one per task and length once lengths were more than 2x apart), with the outputs
    of generate()."""
    from hybrid.model import engine as engine_mod
    from hybrid.model.modeling_hybrid import HybridConfig, HybridForCausalLM
    built = []
    real = engine_mod.StaticEngine
    monkeypatch.setattr(engine_mod, "StaticEngine", lambda *a, **kw: built.append(a[1:3]) or real(*a, **kw))
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig.from_teacher(config, ["gdn", "softmax"], {})).double().eval()
    suite = build_suite(tokenizer, haystack, lengths=(128, 768), n_samples=1, seed=1,
                        tasks=("passkey", "niah_single", "niah_uuid"))
    assert [r["length"] for r in suite] == [128, 768] * 3  # tasks first, lengths second
    fast = run_recall(model, tokenizer, suite, batch_size=2, engine=True)
    assert len(built) == 2 and built[0][1] < 300 < 800 < built[1][1]  # 128's, then 768's (6 in the suite's order)
    slow = run_recall(model, tokenizer, suite, batch_size=2)
    assert [s["output"] for s in fast["samples"]] == [s["output"] for s in slow["samples"]]
    assert [s["length"] for s in fast["samples"]] == [128] * 3 + [768] * 3


def test_lengths_keep_room_for_the_answer_inside_max_context(tokenizer, haystack):
    from hybrid.recall_tasks import room_needed
    room = room_needed(512, TASKS)
    assert room == 512 // 50 + 80  # the tolerance at 512 and niah_multivalue's 80 new tokens
    kept = build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples=1, max_context=512 + room)
    assert sorted({r["length"] for r in kept}) == [256, 512]
    short = build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples=1, max_context=512 + room - 1)
    assert sorted({r["length"] for r in short}) == [256]
    only_mqar = build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples=1, tasks=("mqar",), max_context=512)
    assert sorted({r["length"] for r in only_mqar}) == [256, 512]  # one forward of exactly the length


def test_a_failing_engine_falls_back_to_generate_loudly(tokenizer, suite, monkeypatch):
    """A lease's eval must not be lost to the fast path: the engine's error is reported and the rest of
    that model's prompts decode through generate(), with generate()'s outputs."""
    from hybrid import recall_score
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    small = [r for r in suite if r["length"] == 256 and r["index"] < 2 and r["task"] != "mqar"]
    calls = []

    def broken(self, *a):
        calls.append(1)
        raise RuntimeError("CUDA graph capture failed")

    monkeypatch.setattr(recall_score.Engines, "generate", broken)
    with pytest.warns(UserWarning, match="static engine failed .*CUDA graph capture failed"):
        fast = run_recall(model, tokenizer, small, batch_size=2, engine=True)
    assert len(calls) == 1  # tried once, then generate() for every later batch
    slow = run_recall(model, tokenizer, small, batch_size=2)
    assert [s["output"] for s in fast["samples"]] == [s["output"] for s in slow["samples"]]
