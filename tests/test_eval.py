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


def test_join_pairs_runs_of_separate_leases(tmp_path, monkeypatch):
    """eval.py --join: the models of two eval.json files in one table, a name in both files as name@<folder>, the
    first teacher as the reference and how far the second one agrees with it; other inputs are refused."""
    def model(kls, scores, outputs):
        samples = [{"task": "passkey", "length": 1024, "index": i, "score": s, "nll": 1.0 - s / 2, "output": o}
                   for i, (s, o) in enumerate(zip(scores, outputs))]
        mean = sum(scores) / len(scores)
        return {"val_kl": sum(kls) / len(kls), "val_ppl": 14.0 + sum(kls), "top1_agreement": 0.9,
                "val_kl_per_batch": kls,
                "recall": {"samples": samples, "scores": {"passkey": {"1024": mean}}, "task_mean": {"passkey": mean},
                           "overall": mean, "nll": {"passkey": {"1024": 0.5}}}}
    meta = {"data_dir": "data/debian", "val_tokens": 128, "recall_lengths": [1024], "recall_samples": 4}
    runs = {"a": {"teacher": model([0, 0], [1, 1, 0, 1], "78x9"), "ga_s2": model([0.3, 0.4], [0, 1, 0, 0], "0000")},
            "b": {"teacher": model([0, 0], [1, 1, 1, 1], "7859"), "ga_s2": model([0.2, 0.5], [1, 1, 0, 0], "0000"),
                  "mse": model([0.5, 0.6], [0, 0, 0, 0], "0000")}}  # (outputs: one character per prompt)
    paths = []
    for folder, results in runs.items():
        (tmp_path / folder).mkdir()
        paths.append(str(tmp_path / folder / "eval.json"))
        (tmp_path / folder / "eval.json").write_text(json.dumps({"meta": meta, "results": results}))
    joined_meta, results, notes = evaluate.join_results(paths)
    assert list(results) == ["teacher", "ga_s2@a", "ga_s2@b", "mse"] and results["teacher"] is not None
    assert results["teacher"]["recall"]["overall"] == 0.75 and joined_meta["joined"] == paths  # the first teacher
    assert notes == [f"teacher of {paths[1]} against {paths[0]}'s (the reference): the same score on 3 of 4 recall "
                     f"prompts, the same greedy output on 3; perplexity 14.0000 vs 14.0000"]
    table = evaluate.markdown(results)
    assert "| ga_s2@a vs ga_s2@b | 1 / 1 of 2 (p 1.00) | 0 / 1 of 4 (p 1.00) | 0 / 1 of 4 (p 1.00) |" in table
    assert "| ga_s2@b vs mse | 2 / 0 of 2 (p 0.50) | 2 / 0 of 4 (p 0.50) |" in table
    out = tmp_path / "joined"
    monkeypatch.setattr(evaluate, "JOIN", ",".join(paths))
    monkeypatch.setattr(evaluate, "OUT_DIR", str(out))
    evaluate.main()  # no model is loaded: the files are all it reads
    assert json.loads((out / "eval.json").read_text())["results"].keys() == results.keys()
    assert (out / "eval.md").read_text().startswith(notes[0]) and (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "b" / "eval.json").write_text(json.dumps({"meta": {**meta, "val_tokens": 256}, "results": runs["b"]}))
    with pytest.raises(ValueError, match=r"scored other inputs than .*val_tokens 256 vs 128"):
        evaluate.join_results(paths)
    (tmp_path / "b" / "eval.json").write_text(json.dumps({"results": runs["b"]}))
    with pytest.raises(ValueError, match="not an eval.json of eval.py"):
        evaluate.join_results(paths)
    with pytest.raises(ValueError, match="two or more"):
        evaluate.join_results(paths[:1])
