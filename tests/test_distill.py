"""distill.py on a tiny random teacher: stage 1 (rotation and all-layers), stage 2 KL, resume, 2 processes."""

import json
import os
import re
import shutil

import pytest
import torch

import distill
from hybrid import checkpoint
from tests.conftest import launch

SETTINGS = dict(SEQ_LEN=32, MICRO_BATCH=2, TOTAL_BATCH_TOKENS=128, STEPS_PER_LAYER=12, STAGE1_STEPS=12,
                STAGE2_STEPS=12, LR=1e-2, LR_MIXER=1e-2, WARMUP_STEPS=2, EVAL_BATCHES=2, EVAL_EVERY=6, LOG_EVERY=1,
                SAVE_EVERY=1000, KEEP_CHECKPOINTS=0, INIT="", SPEC="gdn", LAYERS="all", STAGE1_MODE="rotation",
                TARGET="layer", TRAIN_MLP=False, UNTIE_EMBEDDINGS=False, CE_WEIGHT=0.0, TEMPERATURE=1.0, COMPILE=False,
                SMOKE=False, LATENT_CACHE_TOKENS=4 * 64, KL_CHUNK_TOKENS=24, SEED=1337,
                MIXER_OPTIONS="{}", REPEAT_ROWS=0.0, DATA_START="auto")


def configure(monkeypatch, setup, run_dir, **kw):
    for name, value in {**SETTINGS, "TEACHER": setup["model"], "DATA_DIR": setup["data"], "RUN_DIR": str(run_dir),
                        **kw}.items():
        assert hasattr(distill, name), name
        monkeypatch.setattr(distill, name, value)


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def attn_keys(state: dict, layer: int) -> list[str]:
    return [k for k in state if k.startswith(f"model.layers.{layer}.self_attn.")]


@pytest.fixture(scope="module")
def stage1_run(tiny_setup, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage1")
    mp = pytest.MonkeyPatch()
    configure(mp, tiny_setup, run)
    distill.main()
    mp.undo()
    return str(run)


def test_rotation_loss_falls_per_layer_and_touches_only_that_layer(stage1_run):
    rows = [m for m in metrics(stage1_run) if "loss" in m]
    for layer in range(4):
        losses = [m["loss"] for m in rows if m["layer"] == layer]
        assert len(losses) == SETTINGS["STEPS_PER_LAYER"]
        assert losses[-1] < 0.7 * losses[0], (layer, losses)
    ckpts = checkpoint.list_checkpoints(stage1_run)
    assert len(ckpts) == 4  # one per layer
    final = checkpoint.load_checkpoint(stage1_run)
    parts = [torch.load(p, weights_only=False)["model"] for p in ckpts]
    for i in range(4):  # the checkpoint after layer i holds only what layer i changed: its mixer
        assert set(parts[i]) == set(attn_keys(final["model"], i))
    states = [checkpoint.load_checkpoint(p, partial_ok=True)["model"] for p in ckpts]
    for i in range(1, 4):  # between the checkpoints after layers i-1 and i, only layer i's mixer moved
        changed = {k for k in states[i] if k not in states[i - 1] or not torch.equal(states[i][k], states[i - 1][k])}
        assert changed and changed <= set(attn_keys(states[i], i)), changed
    assert all(torch.equal(states[3][k], final["model"][k]) for k in states[3])
    assert final["config"]["hybrid_spec"] == ["gdn"] * 4
    summary = json.load(open(os.path.join(stage1_run, "summary.json")))
    assert set(summary["val_mse"]) == {"0", "1", "2", "3"}


def test_all_layers_mode_trains_every_mixer(tiny_setup, tmp_path, monkeypatch):
    configure(monkeypatch, tiny_setup, tmp_path, STAGE1_MODE="all", STAGE1_STEPS=15)
    distill.main()
    losses = [m["loss"] for m in metrics(tmp_path) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    from hybrid.surgery import build_student
    from hybrid.teacher import load_teacher
    teacher, _ = load_teacher(tiny_setup["model"])
    fresh = build_student(teacher, ["gdn"] * 4).state_dict()
    trained = checkpoint.load_checkpoint(str(tmp_path))["model"]
    for layer in range(4):
        assert any(not torch.equal(fresh[k], trained[k]) for k in attn_keys(trained, layer)), layer
    mlp = [k for k in trained if ".mlp." in k]
    assert all(torch.equal(fresh[k], trained[k]) for k in mlp)  # TRAIN_MLP=False


def test_stage2_kl_falls_and_keeps_softmax_teacher_weights(tiny_setup, stage1_run, tmp_path, monkeypatch):
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, SPEC="gdn;softmax=1", STAGE2_STEPS=15,
              EVAL_EVERY=15)
    distill.main()
    rows = metrics(tmp_path)
    losses = [m["loss"] for m in rows if "loss" in m]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["val_kl"] > 0 and summary["val_ppl"] > 1
    final = checkpoint.load_checkpoint(str(tmp_path))
    assert final["config"]["hybrid_spec"] == ["gdn", "softmax", "gdn", "gdn"]
    init = checkpoint.load_checkpoint(stage1_run)["model"]
    for key in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(final["model"][key], init[key]), key  # all parameters train in stage 2


def test_stage2_untied_embeddings(tiny_setup, stage1_run, tmp_path, monkeypatch):
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, STAGE2_STEPS=3, UNTIE_EMBEDDINGS=True,
              CE_WEIGHT=0.5)
    distill.main()
    final = checkpoint.load_checkpoint(str(tmp_path))
    assert final["config"]["untied"]
    assert not torch.equal(final["model"]["lm_head.weight"], final["model"]["model.embed_tokens.weight"])
    from hybrid.student import load_student
    student, _, _ = load_student(str(tmp_path))
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()


class Killed(Exception):
    pass


def kill_then_resume(monkeypatch, at_step: int) -> None:
    """distill.main() until the checkpoint of `at_step` is on disk, killed there, then RESUME=auto."""
    reals = {name: getattr(distill, name) for name in ("save_checkpoint", "save_partial")}

    def dying(real):
        def save_then_die(run_dir, step, *args, **kw):
            real(run_dir, step, *args, **kw)
            if step == at_step:
                raise Killed
        return save_then_die
    for name, real in reals.items():
        monkeypatch.setattr(distill, name, dying(real))
    with pytest.raises(Killed):
        distill.main()
    for name, real in reals.items():
        monkeypatch.setattr(distill, name, real)
    monkeypatch.setattr(distill, "RESUME", "auto")
    distill.main()


def test_stage2_kill_and_resume_is_bit_exact(tiny_setup, stage1_run, tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    configure(monkeypatch, tiny_setup, full, STAGE=2, INIT=stage1_run, STAGE2_STEPS=6, SAVE_EVERY=3, EVAL_EVERY=100)
    distill.main()
    configure(monkeypatch, tiny_setup, killed, STAGE=2, INIT=stage1_run, STAGE2_STEPS=6, SAVE_EVERY=3, EVAL_EVERY=100)
    kill_then_resume(monkeypatch, at_step=3)
    a = {m["step"]: m["loss"] for m in metrics(full) if "loss" in m}
    b = {m["step"]: m["loss"] for m in metrics(killed) if "loss" in m}
    assert a == b  # bit-exact, every step


def test_stage2_repeat_rows_train_on_edited_rows_and_resume_bit_exact(tiny_setup, stage1_run, tmp_path, monkeypatch):
    from hybrid import repeats
    monkeypatch.setattr(repeats, "MIN_SPAN", 4)  # rows of 32 tokens: spans of 4-8
    monkeypatch.setattr(repeats, "MAX_SPAN", 8)
    runs = {}
    for name, share in (("plain", 0.0), ("full", 1.0), ("killed", 1.0)):
        configure(monkeypatch, tiny_setup, tmp_path / name, STAGE=2, INIT=stage1_run, STAGE2_STEPS=6, SAVE_EVERY=3,
                  EVAL_EVERY=6, REPEAT_ROWS=share)
        kill_then_resume(monkeypatch, at_step=3) if name == "killed" else distill.main()
        runs[name] = {m["step"]: m["loss"] for m in metrics(tmp_path / name) if "loss" in m}
    assert runs["full"] == runs["killed"]  # the edits depend on the batch index: a resumed run sees the same rows
    assert runs["full"] != runs["plain"]
    val = [json.load(open(tmp_path / n / "summary.json"))["teacher_ppl"] for n in ("plain", "full")]
    assert val[0] == val[1]  # held-out rows stay plain text
    with pytest.raises(ValueError, match="--repeat_rows=0.5: a share of stage 2's rows"):
        configure(monkeypatch, tiny_setup, tmp_path / "s1", STAGE=1, REPEAT_ROWS=0.5)
        distill.check_settings()


def _cli(setup, run_dir, nproc, *extra):
    args = [f"--{k.lower()}={v}" for k, v in {**SETTINGS, "TEACHER": setup["model"], "DATA_DIR": setup["data"],
                                             "RUN_DIR": str(run_dir)}.items()] + list(extra)
    out = launch("distill.py", args, nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_mixer_options_travel_with_the_checkpoint(tiny_setup, tmp_path, monkeypatch):
    """A non-default mixer shape (gdn conv_size 2) is stored in the checkpoint, so every later
    stage (stage 2 from INIT, load_student, export) rebuilds the same module tree."""
    configure(monkeypatch, tiny_setup, tmp_path / "s1", STEPS_PER_LAYER=2, MIXER_OPTIONS="{'conv_size': 2}")
    distill.main()
    ck = checkpoint.load_checkpoint(str(tmp_path / "s1"))
    assert ck["config"]["mixer_options"] == {"conv_size": 2}
    assert ck["model"]["model.layers.0.self_attn.conv_weight"].shape[1] == 2
    configure(monkeypatch, tiny_setup, tmp_path / "s2", STAGE=2, INIT=str(tmp_path / "s1"), STAGE2_STEPS=2)
    distill.main()  # would fail to seed (shape mismatch) without the checkpoint's options
    from hybrid.student import load_student
    student, _, _ = load_student(str(tmp_path / "s2"))
    assert student.model.layers[1].self_attn.conv_size == 2


def test_rotation_kill_and_resume_is_bit_exact(tiny_setup, stage1_run, tmp_path, monkeypatch):
    """Killed after its second layer, a resumed rotation rebuilds the latent cache from the saved
    loader position and ends with the same weights as the uninterrupted run (stage1_run)."""
    configure(monkeypatch, tiny_setup, tmp_path)
    kill_then_resume(monkeypatch, at_step=2)
    a, b = checkpoint.load_checkpoint(stage1_run)["model"], checkpoint.load_checkpoint(str(tmp_path))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = [m["layer"] for m in metrics(tmp_path) if "loss" in m]  # both runs append to one metrics.jsonl
    assert [trained.count(i) for i in range(4)] == [SETTINGS["STEPS_PER_LAYER"]] * 4  # layers 0, 1 not redone
    summary = json.load(open(os.path.join(tmp_path, "summary.json")))  # the partial checkpoints carry val MSE
    assert set(summary["val_mse"]) == {"0", "1", "2", "3"}


def test_rerun_continues_and_a_finished_run_keeps_its_summary(tiny_setup, stage1_run, tmp_path, monkeypatch):
    """Re-running the same command is a resume (the default): after a crash it continues, after the
    end it says the run is finished and leaves summary.json as it was (it used to be overwritten
    with an empty result)."""
    assert distill.RESUME == "auto"
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, STAGE2_STEPS=4, SAVE_EVERY=2, EVAL_EVERY=4)
    real = distill.save_checkpoint

    def save_then_die(run_dir, step, state, **kw):
        real(run_dir, step, state, **kw)
        if step == 2:
            raise Killed
    monkeypatch.setattr(distill, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        distill.main()
    monkeypatch.setattr(distill, "save_checkpoint", real)
    first = distill.main()  # the same command again
    assert sorted(m["step"] for m in metrics(tmp_path) if "loss" in m) == [0, 1, 2, 3]  # steps 0, 1 not redone
    before = open(tmp_path / "summary.json").read()
    assert first["val_kl"] > 0 and json.loads(before)["val_kl"] == first["val_kl"]
    n_lines = len(metrics(tmp_path))
    again = distill.main()
    assert again == first and open(tmp_path / "summary.json").read() == before and len(metrics(tmp_path)) == n_lines


def test_another_runs_checkpoints_are_never_mixed_with(tiny_setup, stage1_run, tmp_path, monkeypatch):
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, STAGE2_STEPS=2, SAVE_EVERY=1)
    distill.main()
    files = sorted(os.listdir(tmp_path / "ckpt"))
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, STAGE2_STEPS=2, SAVE_EVERY=1, LR_MIXER=3e-3)
    with pytest.raises(ValueError, match=r"other result-changing settings: LR_MIXER \(0.01 there, 0.003 here\).*--run_dir"):
        distill.main()
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, STAGE2_STEPS=2, SAVE_EVERY=1, RESUME="")
    with pytest.raises(ValueError, match="another run's checkpoints .*nothing is deleted"):
        distill.main()
    assert sorted(os.listdir(tmp_path / "ckpt")) == files


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_bit_exact(tiny_setup, stage1_run, tmp_path):
    """FSDP2 over 2 gloo processes (student sharded per block, teacher sharded too) follows the
    1-process run and 2-process DDP (the held-out KL too, whose val windows depend on the world
    size); its checkpoints hold whole tensors in the 1-process shape; resuming its step-2
    checkpoint under FSDP2 redoes steps 2-3 bit-exactly, and 1 process resumes it too."""
    extra = ("--stage=2", f"--init={stage1_run}", "--stage2_steps=4", "--eval_every=2", "--save_every=2")
    fsdp = extra + ("--parallel=fsdp", "--shard_teacher=True")
    _cli(tiny_setup, tmp_path / "one", 1, *extra)
    _cli(tiny_setup, tmp_path / "ddp", 2, *extra)
    out = _cli(tiny_setup, tmp_path / "two", 2, *fsdp)
    local, total = (float(x) for x in re.search(r"FSDP2 over 2 ranks, ([\d.]+)M of ([\d.]+)M", out).groups())
    assert total > 0.15 and local < 0.6 * total  # sharded, not replicated
    local, total = (float(x) for x in re.search(r"teacher: FSDP2 over 2 ranks, ([\d.]+)M of ([\d.]+)M", out).groups())
    assert total > 0.15 and local < 0.75 * total  # blocks sharded; the LM head stays whole
    one, ddp, two = (metrics(tmp_path / d) for d in ("one", "ddp", "two"))
    a, d, b = ([m["loss"] for m in rows if "loss" in m] for rows in (one, ddp, two))
    assert len(a) == len(b) == 4 and a[3] != a[0]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(d), rtol=1e-4, atol=1e-5)
    assert len(d) == 4  # 2-process DDP == 1 process (this run doubles as that check)
    torch.testing.assert_close(torch.tensor(d), torch.tensor(a), rtol=1e-4, atol=1e-5)
    kl_d, kl_b = ([m["val_kl"] for m in rows if "val_kl" in m] for rows in (ddp, two))
    assert len(kl_b) == 2
    torch.testing.assert_close(torch.tensor(kl_b), torch.tensor(kl_d), rtol=1e-4, atol=1e-5)
    ck_a, ck_b = (checkpoint.load_checkpoint(str(d / "ckpt" / "step_000004.pt")) for d in (tmp_path / "one", tmp_path / "two"))
    assert list(ck_a["model"]) == list(ck_b["model"])
    for k in ck_a["model"]:
        torch.testing.assert_close(ck_b["model"][k], ck_a["model"][k], rtol=1e-3, atol=1e-5)
    assert ck_a["optim"]["state"].keys() == ck_b["optim"]["state"].keys()
    for i, s in ck_a["optim"]["state"].items():
        assert {k: tuple(v.shape) for k, v in s.items()} == {k: tuple(v.shape) for k, v in ck_b["optim"]["state"][i].items()}
    assert {k: v for k, v in ck_a["optim"].items() if k != "state"} == {k: v for k, v in ck_b["optim"].items() if k != "state"}
    final = checkpoint.load_checkpoint(str(tmp_path / "two" / "ckpt" / "final.pt"))["model"]
    assert all(torch.equal(final[k], ck_b["model"][k]) for k in final)

    # a kill right after the step-2 checkpoint leaves exactly this run dir behind
    for name, procs, args in (("again", 2, fsdp), ("as_ddp", 1, extra)):
        (tmp_path / name / "ckpt").mkdir(parents=True)
        shutil.copy(tmp_path / "two" / "ckpt" / "step_000002.pt", tmp_path / name / "ckpt")
        _cli(tiny_setup, tmp_path / name, procs, *args)
        c = {m["step"]: m["loss"] for m in metrics(tmp_path / name) if "loss" in m}
        assert sorted(c) == [2, 3]
        ck_c = checkpoint.load_checkpoint(str(tmp_path / name / "ckpt" / "step_000004.pt"))
        if name == "again":
            assert [c[2], c[3]] == b[2:]  # bit-exact
            assert all(torch.equal(ck_c["model"][k], ck_b["model"][k]) for k in ck_b["model"])
        else:
            torch.testing.assert_close(torch.tensor([c[2], c[3]]), torch.tensor(b[2:]), rtol=1e-4, atol=1e-5)


def test_stage2_time_limit_ends_like_a_planned_end(tiny_setup, stage1_run, tmp_path, monkeypatch):
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, SPEC="gdn;softmax=1", STAGE2_STEPS=15,
              EVAL_EVERY=100, TIME_LIMIT_S=1e-9)
    distill.main()
    rows = metrics(tmp_path)
    assert [m["step"] for m in rows if "loss" in m] == [0]  # one step, then the limit had passed
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["stopped_at_step"] == 1 and summary["val_kl"] > 0  # the end-of-run eval still ran
    final = checkpoint.load_checkpoint(str(tmp_path))
    assert final["config"]["hybrid_spec"] == ["gdn", "softmax", "gdn", "gdn"]
    assert "time_limit_s=1e-09 reached after step 1 of 15" in open(tmp_path / "log.txt").read()


def test_stage2_time_limit_fits_the_lr_schedule(tiny_setup, stage1_run, tmp_path, monkeypatch):
    """A limit the run would overshoot at its measured pace shortens the LR schedule: it ends, annealed and
    evaluated, at the planned step, before the limit (here a fake clock: 80 s per step, 1000 s allowed)."""
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, SPEC="gdn;softmax=1", STAGE2_STEPS=15,
              EVAL_EVERY=100, TIME_LIMIT_S=1000)
    asked = []
    monkeypatch.setattr(distill, "synced_seconds", lambda t, device: asked.append(t) or (10.0, 810.0)[len(asked) - 1])
    distill.main()
    rows = metrics(tmp_path)
    assert len(asked) == 2 and [m["step"] for m in rows if "loss" in m] == list(range(13))  # 11 + 0.97 * 190 / 80
    lrs = [m["lr"] for m in rows if "loss" in m]
    warmup = distill.capped_warmup(2, 15)  # 1 step
    assert lrs[-1] == pytest.approx(1e-2 * distill.cosine_lr(12, 13, warmup, 1.0, 0.1)) and lrs[-1] < 0.2 * max(lrs)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["stopped_at_step"] == 13 and summary["val_kl"] > 0
    log = open(tmp_path / "log.txt").read()
    assert "the LR schedule ends at step 13 of 15" in log and "planned: the LR schedule fitted to it ends after step 13" in log


def test_stage2_profile_writes_its_table(tiny_setup, stage1_run, tmp_path, monkeypatch):
    """--profile=True: steps 3-7 under torch.profiler, the top ops by time in RUN_DIR/profile.txt."""
    configure(monkeypatch, tiny_setup, tmp_path, STAGE=2, INIT=stage1_run, SPEC="gdn;softmax=1", STAGE2_STEPS=10,
              EVAL_EVERY=100, PROFILE=True)
    distill.main()
    table = open(tmp_path / "profile.txt").read()
    assert "Self CPU" in table and "aten::" in table


def test_stage2_continues_from_a_stage2_run_on_longer_rows(tiny_setup, stage1_run, tmp_path, monkeypatch):
    """distill.sh's long part: --init=<a stage-2 run> carries every weight over, not only the mixers, and reads on
    where that run's data stopped (--data_start=auto) instead of from the first token again."""
    first = tmp_path / "s2"
    configure(monkeypatch, tiny_setup, first, STAGE=2, INIT=stage1_run, SPEC="gdn;softmax=1", STAGE2_STEPS=3,
              EVAL_EVERY=100)
    distill.main()
    trained = checkpoint.load_checkpoint(str(first))["model"]
    seen = {}
    real = distill.rebuild_student

    def spy(art, teacher):
        student = real(art, teacher)
        seen["student"] = student
        return student

    monkeypatch.setattr(distill, "rebuild_student", spy)
    starts, real_next = [], distill.ShardLoader.next_batch  # (B, T, loader step) of every training batch

    def next_batch(self):
        if self.split == "train":
            starts.append((self.B, self.T, self.step))
        return real_next(self)

    monkeypatch.setattr(distill.ShardLoader, "next_batch", next_batch)
    configure(monkeypatch, tiny_setup, tmp_path / "long", STAGE=2, INIT=str(first), SPEC="gdn;softmax=1",
              SEQ_LEN=64, STAGE2_STEPS=1, LR=0.0, LR_MIXER=0.0, EVAL_EVERY=100)
    distill.main()  # LR 0: the weights after the step are the ones it started from
    state = {k: v.cpu() for k, v in seen["student"].state_dict().items()}
    for key in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight",
                "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert torch.equal(state[key], trained[key]), key
    # the first part read 3 steps x 128 tokens = 6 windows of 2 x 32; the long part's windows of 2 x 64 start at the 4th
    assert starts[0] == (2, 64, 3)
    configure(monkeypatch, tiny_setup, tmp_path / "from0", STAGE=2, INIT=str(first), SPEC="gdn;softmax=1",
              SEQ_LEN=64, STAGE2_STEPS=1, EVAL_EVERY=100, DATA_START="0")
    distill.main()
    assert starts == [(2, 64, 3), (2, 64, 0)]  # --data_start=0: from the first token, as before


def test_a_missing_selection_file_is_named_before_anything_loads(monkeypatch, tmp_path):
    for spec in (str(tmp_path / "nope.json"), str(tmp_path / "nope.json") + ":uniform"):
        monkeypatch.setattr(distill, "SPEC", spec)
        monkeypatch.setattr(distill, "INIT", "")
        with pytest.raises(FileNotFoundError, match=r"--spec=.*nope\.json: no such file or folder; run select_layers"):
            distill.check_settings()
    monkeypatch.setattr(distill, "SPEC", "gdn")
    monkeypatch.setattr(distill, "DATA_START", "1e6")
    with pytest.raises(ValueError, match=r"--data_start=1e6: a number of train tokens to skip, or \"auto\""):
        distill.check_settings()
    from hybrid.surgery import spec_file
    assert spec_file("gdn;softmax=1") == ("", "") and spec_file("a/s.json") == ("a/s.json", "")
    assert spec_file("a/s.json:uniform") == ("a/s.json", "uniform")
