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
