"""bench.py end to end on CPU: teacher vs a tiny hybrid export, table and JSON written."""

import json

import pytest

import bench
from hybrid.checkpoint import atomic_torch_save
from hybrid.surgery import build_student
from hybrid.teacher import load_teacher


def test_bench_runs_and_reports_both_models(tiny_setup, tmp_path, monkeypatch):
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
    for k, v in dict(TEACHER=tiny_setup["model"], HYBRID=str(tmp_path / "export"), CONTEXTS=[16, 32], BATCHES=[2],
                     NEW_TOKENS=3, REPEATS=1, OUT_DIR=str(tmp_path / "bench")).items():
        monkeypatch.setattr(bench, k, v)
    bench.main()
    rows = json.load(open(tmp_path / "bench" / "bench.json"))["rows"]
    assert {(r["model"], r["context"]) for r in rows} == {(m, c) for m in ("teacher", "hybrid") for c in (16, 32)}
    assert all(r["decode_tok_s"] > 0 and r["ttft_s"] > 0 for r in rows)
    teacher_ctx = lambda m, c: bench.state_bytes(m, 2, c)  # noqa: E731
    from transformers import AutoModelForCausalLM
    hybrid = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True)
    # the hybrid's cache read per step grows only through its one softmax layer (swa is capped at 8)
    assert teacher_ctx(hybrid, 64) - teacher_ctx(hybrid, 32) == pytest.approx(
        (teacher_ctx(teacher, 64) - teacher_ctx(teacher, 32)) / 4)
    assert (tmp_path / "bench" / "bench.md").read_text().count("| hybrid |") == 2
