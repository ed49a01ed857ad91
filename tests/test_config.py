import os

import pytest
import torch

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
