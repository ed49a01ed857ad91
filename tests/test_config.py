import json
import os
import subprocess
import sys

import pytest
import torch

from hybrid import checkpoint
from hybrid.checkpoint import latest_checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from hybrid.config import apply_overrides, config_dict, config_names


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
    g3 = _cfg()  # bare words in a list, as a shell passes them unquoted
    apply_overrides(g3, ["--ks=[32,max]"], verbose=False)
    assert g3["KS"] == [32, "max"]
    apply_overrides(g3, ["--ks=(64, gdn;softmax=0)"], verbose=False)
    assert g3["KS"] == [64, "gdn;softmax=0"]
    g4 = _cfg()  # a setting given twice: the last wins (distill.sh appends overrides after its own)
    apply_overrides(g4, ["--layers=0,4", "--steps=3", "--layers=1"], verbose=False)
    assert g4["LAYERS"] == "1" and g4["STEPS"] == 3


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
    stale = [os.path.join(ckpt, f"step_000002.pt.{host}.{int(dead.stdout)}.tmp"),
             os.path.join(ckpt, "step_000003.pt.tmp"),
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


def test_settings_are_the_scripts_own_constants(tmp_path):
    import eval as eval_script
    import select_layers
    g = dict(vars(select_layers))
    assert "SOFTMAX" in g  # imported
    with pytest.raises(ValueError, match="unknown setting --softmax"):
        apply_overrides(g, ["--softmax=mamba"], verbose=False)
    script = tmp_path / "script.py"  # a constant defined below the settings block is no setting either
    script.write_text("import os\nTOP = 0\n# " + "-" * 77 + "\nLR = 1.0\n# " + "-" * 77 + "\nMETHODS = 'a,b'\n")
    mod = {"__file__": str(script), "TOP": 0, "LR": 1.0, "METHODS": "a,b"}
    assert config_names(mod) == ["LR"]
    with pytest.raises(ValueError, match="unknown setting --methods"):
        apply_overrides(mod, ["--methods=x"], verbose=False)
    with pytest.raises(ValueError, match="unknown setting --tasks"):
        apply_overrides(dict(vars(eval_script)), ["--tasks=1"], verbose=False)
    assert apply_overrides(g, ["--ks=[2]"], verbose=False) == {"KS": [2]}
    assert "SOFTMAX" not in config_dict(g) and "KS" in config_dict(g)


def _failing_main(exc):
    def main():
        raise exc
    return main


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    from hybrid.common import run_script
    g = {"__file__": "x.py", "STEPS": 1}
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        run_script(g, _failing_main(ValueError("--stage=3: expected one of 1, 2")), argv=[])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --stage=3: expected one of 1, 2\n"
    with pytest.raises(SystemExit) as e:
        run_script(g, lambda: None, argv=["--stepz=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unknown setting --stepz; did you mean --steps?")
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 prints it; every rank exits
    with pytest.raises(SystemExit) as e:
        run_script(g, _failing_main(FileNotFoundError("data/x: no such file")), argv=[])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    with pytest.raises(json.JSONDecodeError):  # raised inside a library: a traceback, it may be a bug
        run_script(g, lambda: json.loads("{"), argv=[])


def test_distill_checks_settings_before_loading(tiny_setup, tmp_path, monkeypatch):
    import distill
    import hybrid.teacher
    loaded = []
    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: loaded.append(a) or 1 / 0)
    base = dict(TEACHER=tiny_setup["model"], DATA_DIR=tiny_setup["data"], RUN_DIR=str(tmp_path / "run"), SMOKE=False,
                RESUME="", INIT="", SPEC="gdn", SEQ_LEN=32, STAGE=1, STAGE1_MODE="rotation")
    cases = [(dict(STAGE=3), ValueError, r"--stage=3: expected one of 1, 2"),
             (dict(STAGE1_MODE="al"), ValueError, r"--stage1_mode=al: expected one of rotation, all"),
             (dict(SPEC=str(tmp_path / "selection.json")), FileNotFoundError, r"selection\.json.*select_layers\.py"),
             (dict(INIT=str(tmp_path / "s1")), FileNotFoundError, r"--init=.*s1: no such file"),
             (dict(SEQ_LEN=100000), ValueError, r"--seq_len=100000 is longer than the teacher's 512 positions"),
             (dict(TEACHER="models/does-not-exist"), FileNotFoundError, r"models/does-not-exist: no such folder")]
    for change, exc, msg in cases:
        for k, v in {**base, **change}.items():
            monkeypatch.setattr(distill, k, v)
        with pytest.raises(exc, match=msg):
            distill.main()
    assert loaded == [] and not os.path.exists(tmp_path / "run")  # nothing loaded, nothing written
    assert hybrid.teacher.max_positions(tiny_setup["model"]) == 512


def test_cli_user_error_exit_code(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "distill.py", "--stage=3", f"--run_dir={tmp_path / 'run'}"], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --stage=3: expected one of 1, 2", r.stderr
    assert not os.path.exists(tmp_path / "run")


SCRIPTS = ["prepare", "distill", "select_layers", "train", "export", "eval", "bench", "bench_kernels", "bench_train"]
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
