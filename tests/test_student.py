"""The student artifact: every checkpoint shape reads into one record, written back as one shape."""

import json

import pytest
import torch

from hybrid.checkpoint import atomic_torch_save
from hybrid.student import Artifact, load_student, rebuild_student
from hybrid.teacher import load_teacher

SPEC = ["gdn", "softmax", "swa", "gdn"]


def test_every_config_shape_reads_into_one_artifact(tmp_path):
    want = Artifact(teacher="models/t", hybrid_spec=SPEC, mixer_options={"window": 8}, untied=True, target="attn",
                    stage=1, stage1_mode="rotation")
    distill_old = {"teacher": "models/t", "hybrid_spec": SPEC, "mixer_options": {"window": 8}, "untied": True,
                   "stage": 1, "stage1_mode": "rotation", "resolved": {"TARGET": "attn", "LR": 1e-3}}
    assert Artifact.from_config(distill_old) == want
    train_old = {"MODEL": "embedded", "LR": 3e-4, "teacher": "models/t", "hybrid_spec": SPEC, "untied": True,
                 "mixer_options": {"window": 8}, "world_size": 1, "grad_accum": 2}
    assert Artifact.from_config(train_old) == want.replace(target="layer", stage=None, stage1_mode=None)
    written = want.to_config({"LR": 1e-3})
    assert written["settings"] == {"LR": 1e-3} and Artifact.from_config(json.loads(json.dumps(written))) == want
    export_cfg = {"hybrid_spec": SPEC, "hybrid_options": {"window": 8}, "tie_word_embeddings": False,
                  "model_type": "hybrid"}
    assert Artifact.from_config(export_cfg, "out/x") == Artifact(teacher="out/x", hybrid_spec=SPEC,
                                                                mixer_options={"window": 8}, untied=True)
    plain = Artifact.from_config({"teacher": "models/t", "hybrid_spec": None})
    assert plain.hybrid_spec is None and not plain.untied


def test_bad_artifacts_say_what_is_wrong():
    with pytest.raises(ValueError, match="lacks 'teacher' or 'hybrid_spec'"):
        Artifact.from_config({"teacher": "models/t"}, "bad.pt")
    with pytest.raises(ValueError, match=r"\['windw'\] are taken by no mixer; accepted options are .*swa: window"):
        Artifact(teacher="models/t", hybrid_spec=SPEC, mixer_options={"windw": 8})
    with pytest.raises(ValueError, match="target"):
        Artifact(teacher="models/t", hybrid_spec=SPEC, target="mlp")


def test_load_student_rebuilds_the_saved_module_tree(tiny_setup, tmp_path):
    teacher, _ = load_teacher(tiny_setup["model"])
    art = Artifact(teacher=tiny_setup["model"], hybrid_spec=SPEC, mixer_options={"window": 3}, untied=True)
    student = rebuild_student(art, teacher)
    assert student.model.layers[2].self_attn.window == 3
    assert student.lm_head.weight is not student.model.embed_tokens.weight
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    path = str(tmp_path / "ckpt" / "final.pt")
    atomic_torch_save({"model": student.state_dict(), "config": art.to_config({}), "step": 0}, path)
    loaded, _, got = load_student(str(tmp_path))
    assert got == art
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
