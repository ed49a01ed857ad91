"""Checkpoint files: per-process temp files, flushed to disk before the rename; a resume of a rotation's partial
checkpoints."""

import os

import pytest
import torch

from hybrid import checkpoint


def test_atomic_torch_save_uses_a_per_process_synced_temp_file(tmp_path, monkeypatch):
    seen = {"fsync": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        seen["src"], seen["synced_before_rename"] = src, seen["fsync"] > 0
        return real_replace(src, dst)

    def fsync(fd):
        seen["fsync"] += 1
        return real_fsync(fd)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    path = str(tmp_path / "ckpt" / "step_000001.pt")
    checkpoint.atomic_torch_save({"w": torch.arange(3)}, path)
    assert seen["src"] == checkpoint._tmp_path(path) and seen["src"].endswith(f".{os.getpid()}.tmp")
    assert seen["synced_before_rename"]
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert os.listdir(tmp_path / "ckpt") == ["step_000001.pt"]


def test_resume_point_gathers_a_rotation_and_checks_its_settings(tmp_path):
    run = str(tmp_path / "run")
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    settings = {"LR": 1e-3, "RUN_DIR": run}
    cfg = {"hybrid_spec": ["gdn", "gdn"], "settings": settings}
    for k, prefix in ((1, "0."), (2, "1.")):
        checkpoint.save_partial(run, k, checkpoint.module_state(net, prefix), {"config": cfg, "layers_done": k})
    path, ckpt = checkpoint.resume_point(run, "auto", {**settings, "RUN_DIR": "elsewhere"}, ("RUN_DIR",))
    assert path == checkpoint.checkpoint_path(run, 2) and ckpt["partial"] and ckpt["layers_done"] == 2
    assert set(ckpt["model"]) == set(net.state_dict())  # steps 1 and 2 gathered
    with pytest.raises(ValueError, match=r"other result-changing settings: LR \(0.001 there, 0.01 here\)"):
        checkpoint.resume_point(run, "auto", {**settings, "LR": 1e-2}, ("RUN_DIR",))
    with pytest.raises(ValueError, match="another run's checkpoints"):
        checkpoint.resume_point(run, "", settings, ("RUN_DIR",))
