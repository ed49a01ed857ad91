"""eval.py: intrinsic metrics for the teacher, a distill checkpoint and an export; clear errors."""

import json

import pytest
import torch

import eval as evaluate
from hybrid.checkpoint import atomic_torch_save
from hybrid.surgery import build_student
from hybrid.teacher import load_teacher


@pytest.fixture(scope="module")
def student_ckpt(tiny_setup, tmp_path_factory):
    teacher, _ = load_teacher(tiny_setup["model"])
    spec = ["gdn", "softmax", "gla", "gdn"]
    student = build_student(teacher, spec)
    path = str(tmp_path_factory.mktemp("ck") / "student.pt")
    atomic_torch_save({"model": student.state_dict(), "config": {"teacher": tiny_setup["model"], "hybrid_spec": spec,
                                                                  "untied": False}, "step": 0}, path)
    return path


def test_eval_teacher_checkpoint_and_export(tiny_setup, student_ckpt, tmp_path, monkeypatch):
    import export
    for k, v in dict(CHECKPOINT=student_ckpt, OUT_DIR=str(tmp_path / "export"), DTYPE="float32").items():
        monkeypatch.setattr(export, k, v)
    export.main()
    for k, v in dict(MODELS=f"teacher,ck={student_ckpt},ex={tmp_path / 'export'}", TEACHER=tiny_setup["model"],
                     DATA_DIR=tiny_setup["data"], OUT_DIR=str(tmp_path / "eval"), SEQ_LEN=64, MICRO_BATCH=2,
                     EVAL_BATCHES=3, RECALL=False).items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    res = json.load(open(tmp_path / "eval" / "eval.json"))["results"]
    assert res["teacher"]["val_kl"] == pytest.approx(0.0, abs=1e-6) and res["teacher"]["top1_agreement"] == 1.0
    assert res["ck"]["val_kl"] > 1e-4 and res["ck"]["top1_agreement"] < 1.0
    # the export is the same model as the checkpoint it came from
    assert res["ex"]["val_kl"] == pytest.approx(res["ck"]["val_kl"], rel=1e-4)
    assert res["ex"]["val_ppl"] == pytest.approx(res["ck"]["val_ppl"], rel=1e-4)
    table = open(tmp_path / "eval" / "eval.md").read()
    assert "| ck |" in table and "| teacher |" in table


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="export folder"):
        evaluate.load_model(str(tmp_path / "nothing"), None, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="duplicate"):
        evaluate.parse_models("a=x,a=y")
    assert evaluate.parse_models("teacher,runs/a/export") == [("teacher", "teacher"), ("export", "runs/a/export")]


def test_paired_comparison_counts_and_sign_test():
    """The eval table's paired section: batches with the lower KL and prompts with the higher recall per
    pair of non-teacher models, and the sign test's p (exact binomial, two-sided, ties dropped)."""
    def model(kls, scores, nlls):
        return {"val_kl": sum(kls) / len(kls), "val_ppl": 1.0, "top1_agreement": 1.0, "val_kl_per_batch": kls,
                "recall": {"samples": [{"task": "passkey", "length": "1024", "index": i, "score": s, "nll": n}
                                       for i, (s, n) in enumerate(zip(scores, nlls))]}}
    results = {"teacher": {"val_kl": 0.0, "val_ppl": 1.0, "top1_agreement": 1.0},
               "a": model([0.1, 0.2, 0.3], [1, 0, 1, 1, 0], [1.0, 2.0, 0.5, 0.5, 3.0]),
               "b": model([0.2, 0.3, 0.25], [0, 0, 1, 0, 0], [2.0, 2.5, 0.7, 0.9, 4.0])}
    lines = evaluate.paired(results)
    assert lines[-1] == "| a vs b | 2 / 1 of 3 (p 1.00) | 2 / 0 of 5 (p 0.50) | 5 / 0 of 5 (p 0.06) |"
    assert evaluate.sign_test(7, 4) == pytest.approx(0.5488, abs=1e-4) and evaluate.sign_test(0, 0) == 1.0
    assert evaluate.sign_test(10, 0) == pytest.approx(2 / 1024)
    assert evaluate.paired({"teacher": results["teacher"], "a": results["a"]}) == []  # one model: no pairs
    assert "| a vs b |" in evaluate.markdown(results)


def test_markdown_retention_is_the_ratio_of_the_task_means():
    """eval.md's bracket at a length: the hybrid's mean over tasks / the teacher's (0.2 / 0.4), not the mean of
    per-task ratios (which would read (0.47 + 3.0) / 2 = 1.73 here: the teacher all but fails the second task)."""
    def model(a, b):
        scores = {"passkey": {"1024": a}, "mqar": {"1024": b}}
        return {"val_kl": 0.0, "val_ppl": 1.0, "top1_agreement": 1.0,
                "recall": {"scores": scores, "task_mean": {"passkey": a, "mqar": b}, "overall": (a + b) / 2, "nll": {}}}
    table = evaluate.markdown({"teacher": model(0.79, 0.01), "hybrid": model(0.37, 0.03)})
    assert "| hybrid | 0.200 (0.50) |" in table and "| teacher | 0.400 |" in table
