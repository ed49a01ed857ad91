import os
import subprocess
import sys

import pytest
import torch

from hybrid import checkpoint
from hybrid.checkpoint import latest_checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from hybrid.config import apply_overrides, config_dict


def _cfg():
    return {"LR": 1e-3, "LAYERS": "all", "STEPS": 10, "COMPILE": False, "KS": [4, 8], "RESUME": "", "lower": 1}


def test_overrides_parse_and_check_types():
    g = _cfg()
    applied = apply_overrides(g, ["--lr=3e-4", "--layers=0,4", "--steps=20", "--compile=True", "--ks=[2]",
                                  "--resume=runs/x"], verbose=False)
    assert g["LR"] == 3e-4 and g["LAYERS"] == "0,4" and g["STEPS"] == 20 and g["COMPILE"] is True
    assert g["KS"] == [2] and g["RESUME"] == "runs/x" and set(applied) == {"LR", "LAYERS", "STEPS", "COMPILE", "KS", "RESUME"}
    g2 = _cfg()
    apply_overrides(g2, ["--lr=1"], verbose=False)  # an int where a float is expected is fine
    assert g2["LR"] == 1.0 and isinstance(g2["LR"], float)


def test_unknown_setting_suggests():
    with pytest.raises(ValueError, match="did you mean --lr"):
        apply_overrides(_cfg(), ["--lrr=1e-3"], verbose=False)
    with pytest.raises(ValueError, match="unknown setting --lower"):
        apply_overrides(_cfg(), ["--lower=2"], verbose=False)  # only UPPER_CASE names are settings


def test_bad_type_and_format():
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(_cfg(), ["--steps=1.5"], verbose=False)
    with pytest.raises(ValueError, match="True/False"):
        apply_overrides(_cfg(), ["--compile=maybe"], verbose=False)
    with pytest.raises(ValueError, match="--name=value"):
        apply_overrides(_cfg(), ["steps=3"], verbose=False)


def test_config_dict_only_constants():
    assert config_dict(_cfg()) == {"LR": 1e-3, "LAYERS": "all", "STEPS": 10, "COMPILE": False, "KS": [4, 8], "RESUME": ""}


def test_checkpoint_atomic_keep_and_strict(tmp_path):
    run = str(tmp_path / "run")
    m = torch.nn.Linear(3, 2)
    for step in range(5):
        save_checkpoint(run, step, {"model": m.state_dict(), "step": step}, keep=2)
    names = sorted(os.listdir(os.path.join(run, "ckpt")))
    assert names == ["step_000003.pt", "step_000004.pt"]  # no .tmp left, only the last 2 kept
    assert latest_checkpoint(run).endswith("step_000004.pt")
    assert load_checkpoint(run)["step"] == 4
    with pytest.raises(ValueError, match="missing 1 keys"):
        load_state_strict(m, {"weight": m.weight.detach()})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_killed_save_leaves_no_temp_file_behind(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    m = torch.nn.Linear(3, 2)
    save_checkpoint(run, 1, {"model": m.state_dict(), "step": 1})
    ckpt = os.path.join(run, "ckpt")
    # a writer killed mid-save (a process that is gone now), an old fixed-name temp, a live writer's
    # temp and another host's temp
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = checkpoint._tmp_path("x").split(".")[-3]
    stale = [os.path.join(ckpt, f"step_000002.pt.{host}.{int(dead.stdout)}.tmp"), os.path.join(ckpt, "step_000003.pt.tmp"),
             os.path.join(run, f"config.json.{host}.{int(dead.stdout)}.tmp")]
    live = [os.path.join(ckpt, f"step_000004.pt.{host}.{os.getpid()}.tmp"),
            os.path.join(ckpt, f"step_000005.pt.otherhost.{int(dead.stdout)}.tmp"), os.path.join(ckpt, "notes.tmp")]
    for p in stale + live:
        with open(p, "wb") as f:
            f.write(b"\0" * 1000)
    assert latest_checkpoint(run).endswith("step_000001.pt")  # the next start cleans up
    assert not any(os.path.exists(p) for p in stale) and all(os.path.exists(p) for p in live)
    for p in live:
        os.remove(p)

    def torch_save_dies(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.torch, "save", torch_save_dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 2, {"model": m.state_dict(), "step": 2})
    assert sorted(os.listdir(ckpt)) == ["step_000001.pt"]


def test_corrupt_checkpoint_names_its_path(tmp_path):
    run = str(tmp_path / "run")
    path = save_checkpoint(run, 7, {"model": torch.nn.Linear(3, 2).state_dict(), "step": 7})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"step_000007\.pt: not a readable checkpoint.*corrupt"):
        load_checkpoint(run)
    with open(path, "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"step_000007\.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_partial_checkpoints_gather_and_refuse_as_whole(tmp_path):
    run = str(tmp_path / "run")
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = {"hybrid_spec": ["gdn", "gdn"]}
    for k, prefix in ((1, "0."), (2, "1.")):
        checkpoint.save_partial(run, k, checkpoint.module_state(net, prefix), {"config": cfg, "layers_done": k})
    assert set(torch.load(checkpoint.checkpoint_path(run, 2), weights_only=False)["model"]) == {"1.weight", "1.bias"}
    with pytest.raises(ValueError, match=r"unfinished stage-1 rotation.*--resume=auto"):
        load_checkpoint(run)
    got = load_checkpoint(run, partial_ok=True)
    assert got["layers_done"] == 2 and set(got["model"]) == set(net.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    load_state_strict(fresh, got["model"], partial=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    checkpoint.save_partial(run, 1, checkpoint.module_state(net, "0."), {"config": cfg, "layers_done": 1})
    assert checkpoint.list_checkpoints(run) == [checkpoint.checkpoint_path(run, 1)]  # a restart drops later steps
    os.remove(checkpoint.checkpoint_path(run, 1))
    checkpoint.save_partial(run, 2, checkpoint.module_state(net, "1."), {"config": cfg, "layers_done": 2})
    with pytest.raises(FileNotFoundError, match=r"step_000001\.pt, which is missing"):
        load_checkpoint(run, partial_ok=True)
