"""bench.py end to end on CPU: random tiny models and an export, every figure positive and finite."""

import json
import math

import pytest

import bench
from hybrid.checkpoint import atomic_torch_save
from hybrid.model.engine import cache_bytes_per_sequence
from hybrid.surgery import build_student
from hybrid.teacher import load_teacher

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=512)
FIGURES = ("ttft_s", "prefill_tok_s", "decode_step_ms", "decode_tok_s", "roofline_step_ms", "roofline_fraction",
           "cache_bytes_per_seq")


def run(monkeypatch, tmp_path, **settings) -> dict:
    base = dict(CONTEXTS=[16, 32], BATCHES=[2, "max"], DECODE_STEPS=3, REPEATS=2, EAGER_STEPS=2,
                CACHE_BUDGET_GB=2e-4, PREFILL_TOKENS=32, OUT_DIR=str(tmp_path / "bench"))
    for k, v in {**base, **settings}.items():
        assert hasattr(bench, k), k
        monkeypatch.setattr(bench, k, v)
    return bench.main()


def check_rows(rows: list[dict]) -> None:
    assert {r["model"] for r in rows} == {"teacher eager", "teacher engine", "hybrid engine"}
    for r in rows:
        assert not r.get("oom"), r
        for key in FIGURES:
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        if "cache_bytes_allocated" in r:
            assert r["cache_bytes_allocated"] >= r["batch"] * r["cache_bytes_per_seq"]


def test_bench_random_models(monkeypatch, tmp_path, capsys):
    result = run(monkeypatch, tmp_path, RANDOM=True, RANDOM_SHAPE=TINY, RANDOM_SPEC="gdn;softmax=1", PROFILE_PREFILL=[16])
    printed = capsys.readouterr().out
    for side in ("teacher", "hybrid"):  # the prefill profile: its wall time and the top host ops
        line = next(x for x in printed.splitlines() if x.startswith(f"== prefill {side} engine ctx 16 B 1: wall "))
        assert float(line.split("wall ")[1].split(" ms")[0]) > 0, line
    rows = result["rows"]
    check_rows(rows)
    assert len(rows) == 2 * (3 + 2)  # per context: eager + 2 engines at B2, 2 engines at max batch
    cache = {(r["model"], r["context"]): r["cache_bytes_per_seq"] for r in rows if r["batch"] == 2 and "engine" in r["model"]}
    # 1 of 4 layers keeps KV: the hybrid's cache grows a quarter as fast as the teacher's
    assert cache[("hybrid engine", 32)] - cache[("hybrid engine", 16)] == \
        (cache[("teacher engine", 32)] - cache[("teacher engine", 16)]) / 4
    maxb = result["max_batch"]
    assert maxb["hybrid engine @ 32"] > maxb["teacher engine @ 32"] >= 1
    assert (tmp_path / "bench" / "bench.md").read_text().count("| hybrid engine |") == 4
    assert json.load(open(tmp_path / "bench" / "bench.json"))["targets"] == result["targets"]


def test_bench_export_against_teacher(tiny_setup, tmp_path, monkeypatch):
    import export
    teacher, _ = load_teacher(tiny_setup["model"])
    spec = ["gdn", "softmax", "swa", "gdn"]
    ckpt = str(tmp_path / "s.pt")
    atomic_torch_save({"model": build_student(teacher, spec, window=8).state_dict(), "step": 0,
                       "config": {"teacher": tiny_setup["model"], "hybrid_spec": spec, "mixer_options": {"window": 8}}},
                      ckpt)
    for k, v in dict(CHECKPOINT=ckpt, OUT_DIR=str(tmp_path / "export"), DTYPE="float32").items():
        monkeypatch.setattr(export, k, v)
    export.main()
    result = run(monkeypatch, tmp_path, TEACHER=tiny_setup["model"], HYBRID=str(tmp_path / "export"), BATCHES=[2])
    check_rows(result["rows"])
    from transformers import AutoModelForCausalLM
    hybrid = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True)
    # the cache grows only through the one softmax layer (swa is capped at its window)
    assert cache_bytes_per_sequence(hybrid, 64) - cache_bytes_per_sequence(hybrid, 32) == pytest.approx(
        (cache_bytes_per_sequence(teacher, 64) - cache_bytes_per_sequence(teacher, 32)) / 4)


def test_targets_name_what_a_run_did_not_measure():
    row = dict(context=16384, batch=32, decode_tok_s=100.0, roofline_fraction=0.5, cache_bytes_per_seq=10.0,
               prefill_tok_s=1.0)
    rows = [dict(row, model="teacher engine"), dict(row, model="hybrid engine", decode_tok_s=250.0, cache_bytes_per_seq=3.0)]
    lines = bench.targets(rows, {})  # 16K B32 only: no B1 prefill, no 32K, no max batch, no eager or unfused rows
    assert "hybrid / teacher-engine decode at 16K B32: x2.50 (target >= 3.0)" in lines
    assert "cache bytes/seq at 16K, hybrid / teacher: 30.0% (target <= 30%)" in lines  # from the B32 rows
    missing = [x for x in lines if "not measured in this run" in x]
    assert len(missing) == 8 and not any("nan" in x or "None)" in x.split(":")[-1] for x in lines), lines
