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


SCRIPTS = ["prepare", "distill", "select_layers", "train", "export", "eval", "bench", "bench_kernels"]
_SOURCE = '''"""Do a thing to tokens.

Longer text.
"""
import os
# -----------------------------------------------------------------------------
# Data
DATA_DIR = "data/x"             # shards from prepare.py
STEPS = 2**4                    # optimizer steps
# Other
KS = [4, 8]
NAME = ""                       # "" = automatic
# -----------------------------------------------------------------------------
AFTER = 3                       # not a setting: below the block
'''


def test_help_lists_settings_defaults_comments_and_headings():
    from hybrid.config import format_help, settings_doc
    doc, rows = settings_doc(_SOURCE)
    assert doc.startswith("Do a thing to tokens.")
    assert rows == [("", "Data", ""), ("DATA_DIR", '"data/x"', "shards from prepare.py"),
                    ("STEPS", "2**4", "optimizer steps"), ("", "Other", ""), ("KS", "[4, 8]", ""),
                    ("NAME", '""', '"" = automatic')]
    text = format_help("tool.py", _SOURCE, {"DATA_DIR": "data/x", "STEPS": 16, "KS": [4, 8], "NAME": "", "AFTER": 3})
    assert text.startswith("tool.py: Do a thing to tokens.\n")
    assert "--data_dir=data/x" in text and "shards from prepare.py" in text
    assert "--steps=16" in text and "[2**4] optimizer steps" in text  # evaluated default and the expression
    assert "--ks=[4,8]" in text and "--name=''" in text and "after" not in text.lower().split("usage")[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_documents_its_block(script):
    from hybrid.config import settings_doc
    with open(f"{script}.py") as f:
        doc, rows = settings_doc(f.read())
    settings = [r for r in rows if r[0]]
    assert doc and len(settings) >= 5, (script, rows)
    assert sum(bool(c) for _, _, c in settings) >= len(settings) // 2  # most settings carry a comment


def test_help_cli_exits_zero_before_loading(tmp_path):
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "distill.py", "--help", "--teacher=/nonexistent"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "--steps_per_layer=200" in out.stdout and "rotation: optimizer steps per layer" in out.stdout
    assert out.stdout.startswith("distill.py: Distill")


def test_help_without_a_source_file_lists_names(capsys):
    with pytest.raises(SystemExit) as stop:
        apply_overrides(_cfg(), ["--lr=1", "-h"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--lr=0.001" in out and "--ks=[4,8]" in out and "override" not in out  # nothing applied
