"""Checkpoint files: per-process temp files, flushed to disk before the rename."""

import os

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
    assert seen["src"] == f"{path}.{os.getpid()}.tmp" and seen["synced_before_rename"]
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert os.listdir(tmp_path / "ckpt") == ["step_000001.pt"]
