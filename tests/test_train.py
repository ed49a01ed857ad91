"""train.py: loss falls, kill + resume is bit-exact, 2-process DDP equals 1 process, CLI smoke, bad settings.

Tiny random Llama (hidden 64, 2 layers, vocab 256) with a word-level tokenizer, saved with
save_pretrained; shards of a repeated random pattern (learnable in a few steps) in tmp_path.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from hybrid import checkpoint
from hybrid.shards import sha256_file, tokenizer_info, write_shard
from tests.conftest import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", unk_token="t1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """-> {"model": HF dir, "data": shard dir}."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, eos_token_id=0)
    model_dir, data_dir = str(root / "model"), str(root / "data")
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    pattern = rng.integers(1, VOCAB, size=61)  # a 61-token cycle: learnable, not aligned with T
    shards = []
    for split, n in (("train", 20000), ("val", 2000)):
        tokens = np.tile(pattern, n // len(pattern) + 1)[:n]
        tokens[rng.integers(0, n, size=n // 50)] = 0  # some EOS noise
        name = f"{split}_000000.bin"
        write_shard(os.path.join(data_dir, name), tokens, VOCAB)
        sha = sha256_file(os.path.join(data_dir, name))
        shards.append({"file": name, "split": split, "n_tokens": n, "sha256": sha})
    manifest = {**tokenizer_info(tokenizer), "dtype": "uint16", "shards": shards}
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return {"model": model_dir, "data": data_dir}


SETTINGS = dict(SEQ_LEN=32, MICRO_BATCH=2, TOTAL_BATCH_TOKENS=128, LR=1e-2, MIN_LR=1e-3, WARMUP_STEPS=2,
                MAX_STEPS=6, WEIGHT_DECAY=0.1, GRAD_CLIP=1.0, EVAL_EVERY=3, EVAL_BATCHES=2, LOG_EVERY=1,
                SAVE_EVERY=1000, KEEP_CHECKPOINTS=0, CHECKPOINT="", INIT="pretrained", SEED=1337,
                COMPILE=False, DTYPE="fp32")


def configure(monkeypatch, tiny, run_dir, **kw):
    for name, value in {**SETTINGS, "MODEL": tiny["model"], "DATA_DIR": tiny["data"], "RUN_DIR": str(run_dir),
                        **kw}.items():
        assert hasattr(train, name), name
        monkeypatch.setattr(train, name, value)


def metrics(run_dir, key="loss") -> dict[int, float]:
    """step -> value from metrics.jsonl (the last line per step wins, as after a resume)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if key in m:
                out[m["step"]] = m[key]
    return out


def test_loss_falls(tiny, tmp_path, monkeypatch):
    configure(monkeypatch, tiny, tmp_path, MAX_STEPS=20, EVAL_EVERY=10)
    train.main()
    loss, val = metrics(tmp_path), metrics(tmp_path, "val_loss")
    assert sorted(loss) == list(range(20)) and sorted(val) == [0, 10, 20]
    assert all(np.isfinite(v) for v in loss.values())
    assert loss[19] < loss[0] - 1.0, loss
    assert val[20] < val[0] - 1.0, val
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["config"]["teacher"] == tiny["model"] and cfg["config"]["settings"]["grad_accum"] == 2
    assert cfg["params"]["trainable"] == cfg["params"]["total"] > 0
    ck = checkpoint.load_checkpoint(str(tmp_path))  # the final step is always saved
    assert ck["step"] == 20 and ck["config"]["hybrid_spec"] is None
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


class Killed(Exception):
    pass


def test_kill_and_resume_is_bit_exact(tiny, tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    configure(monkeypatch, tiny, full, SAVE_EVERY=3)
    train.main()

    # the same run, killed right after its step-3 checkpoint is on disk
    real_save = checkpoint.save_checkpoint

    def save_then_die(run_dir, step, state, **kw):
        path = real_save(run_dir, step, state, **kw)
        if step == 3:
            raise Killed
        return path

    configure(monkeypatch, tiny, killed, SAVE_EVERY=3)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train.main()
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert sorted(metrics(killed)) == [0, 1, 2]

    configure(monkeypatch, tiny, killed, SAVE_EVERY=3, RESUME="auto")
    train.main()
    a, b = metrics(full), metrics(killed)
    assert sorted(a) == sorted(b) == list(range(6))
    assert [a[s] for s in range(6)] == [b[s] for s in range(6)]  # bit-identical, not just close
    assert metrics(full, "val_loss") == metrics(killed, "val_loss")
    wa = checkpoint.load_checkpoint(str(full / "ckpt" / "step_000006.pt"))["model"]
    wb = checkpoint.load_checkpoint(str(killed / "ckpt" / "step_000006.pt"))["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a[5] != a[0]  # the run did train


def _run(args: list[str], nproc: int = 1, timeout: int = 180) -> subprocess.CompletedProcess:
    return launch("train.py", args, nproc, timeout)


def _cli_args(tiny, run_dir, **kw) -> list[str]:
    s = {**SETTINGS, "MODEL": tiny["model"], "DATA_DIR": tiny["data"], "RUN_DIR": str(run_dir), **kw}
    return [f"--{k.lower()}={v}" for k, v in s.items() if k not in ("RESUME", "CHECKPOINT")]


def test_two_process_ddp_matches_one_process(tiny, tmp_path, monkeypatch):
    # the same global batch (128 tokens): 1 rank x 2 micro-steps vs 2 ranks x 1 micro-step
    configure(monkeypatch, tiny, tmp_path / "one", MAX_STEPS=4)
    train.main()
    r = _run(_cli_args(tiny, tmp_path / "two", MAX_STEPS=4), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(4))
    np.testing.assert_allclose([two[s] for s in range(4)], [one[s] for s in range(4)], rtol=1e-5)
    np.testing.assert_allclose(list(metrics(tmp_path / "two", "val_loss").values()),
                               list(metrics(tmp_path / "one", "val_loss").values()), rtol=1e-5)
    assert json.load(open(tmp_path / "two" / "config.json"))["config"]["settings"]["grad_accum"] == 1


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_resumes_bit_exact(tiny, tmp_path, monkeypatch):
    """FSDP2 over 2 gloo processes, 2 micro-steps each (gradient sync skipped on the first): the
    1-process losses and weights; whole-tensor checkpoints in the 1-process shape; its step-2
    checkpoint resumed under FSDP2 gives steps 2-3 and the final weights bit-exactly."""
    kw = dict(MAX_STEPS=4, TOTAL_BATCH_TOKENS=256, SAVE_EVERY=2, EVAL_EVERY=2)
    configure(monkeypatch, tiny, tmp_path / "one", **kw)
    train.main()
    r = _run(_cli_args(tiny, tmp_path / "two", PARALLEL="fsdp", **kw), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "parallel: FSDP2 over 2 ranks" in r.stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(4)) and one[3] != one[0]
    np.testing.assert_allclose([two[s] for s in range(4)], [one[s] for s in range(4)], rtol=1e-5)
    np.testing.assert_allclose(list(metrics(tmp_path / "two", "val_loss").values()),
                               list(metrics(tmp_path / "one", "val_loss").values()), rtol=1e-5)
    np.testing.assert_allclose(list(metrics(tmp_path / "two", "norm").values()),  # the global grad norm
                               list(metrics(tmp_path / "one", "norm").values()), rtol=1e-4)
    assert json.load(open(tmp_path / "two" / "config.json"))["config"]["settings"]["grad_accum"] == 2
    wa, wb = (checkpoint.load_checkpoint(str(d / "ckpt" / "step_000004.pt")) for d in (tmp_path / "one", tmp_path / "two"))
    assert list(wa["model"]) == list(wb["model"])
    for k in wa["model"]:
        torch.testing.assert_close(wb["model"][k], wa["model"][k], rtol=1e-4, atol=1e-6)
    assert {i: sorted(s) for i, s in wa["optim"]["state"].items()} == {i: sorted(s) for i, s in wb["optim"]["state"].items()}
    assert all(wb["optim"]["state"][i]["exp_avg"].shape == s["exp_avg"].shape for i, s in wa["optim"]["state"].items())

    again = tmp_path / "again"  # what a kill right after the step-2 checkpoint leaves behind
    (again / "ckpt").mkdir(parents=True)
    shutil.copy(tmp_path / "two" / "ckpt" / "step_000002.pt", again / "ckpt")
    r = _run(_cli_args(tiny, again, PARALLEL="fsdp", **kw), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = metrics(again)
    assert sorted(c) == [2, 3] and [c[2], c[3]] == [two[2], two[3]]  # bit-exact
    wc = checkpoint.load_checkpoint(str(again / "ckpt" / "step_000004.pt"))
    assert all(torch.equal(wc["model"][k], wb["model"][k]) for k in wb["model"])


def test_cli_smoke(tiny, tmp_path):
    r = _run(_cli_args(tiny, tmp_path, MAX_STEPS=3, SAVE_EVERY=2, KEEP_CHECKPOINTS=1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "override: MAX_STEPS = 3" in r.stdout
    lines = open(tmp_path / "log.txt").read().splitlines()
    train_lines = [ln for ln in lines if "| loss " in ln]
    assert len(train_lines) == 3 and train_lines[0].startswith("step 00000/00003 | loss ")
    for field in ("| lr ", "| dt ", "ms | tok/s ", "| mem ", "GB"):
        assert field in train_lines[-1]
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == ["step_000003.pt"]


def test_bad_settings(tiny, tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, "train.py", "--max_step=3"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert r.returncode != 0 and "did you mean --max_steps?" in r.stderr
    configure(monkeypatch, tiny, tmp_path, TOTAL_BATCH_TOKENS=100)
    with pytest.raises(ValueError, match=r"TOTAL_BATCH_TOKENS=100 not divisible .* = 2\*32\*1 = 64"):
        train.main()
    configure(monkeypatch, tiny, tmp_path, RESUME=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="--resume=auto"):
        train.main()
    configure(monkeypatch, tiny, tmp_path, PARALLEL="zero3")
    with pytest.raises(ValueError, match="--parallel='zero3': expected 'ddp' or 'fsdp'"):
        train.main()


def test_finetune_hybrid_checkpoint(tiny, tmp_path, monkeypatch):
    """CHECKPOINT=<distill checkpoint>: the student is rebuilt from its config with the checkpoint's
    weights (not a fresh init), trains, and its spec carries on into train.py's checkpoints."""
    surgery = pytest.importorskip("hybrid.surgery")
    from hybrid.shards import val_batches
    from hybrid.teacher import load_teacher
    teacher, _ = load_teacher(tiny["model"])
    spec = ["gdn", "softmax"]
    torch.manual_seed(1)
    student = surgery.build_student(teacher, spec)
    with torch.no_grad():
        for p in student.parameters():  # "distilled" weights that a fresh build cannot reproduce
            p.add_(0.05 * torch.randn_like(p))
        val = val_batches(tiny["data"], 2, 32, 2)
        expected = float(np.mean([torch.nn.functional.cross_entropy(student(input_ids=x).logits.flatten(0, 1),
                                                                     y.flatten()).item() for x, y in val]))
    ck = str(tmp_path / "distill.pt")
    checkpoint.atomic_torch_save({"model": student.state_dict(), "step": 7,
                                  "config": {"teacher": tiny["model"], "hybrid_spec": spec}}, ck)
    configure(monkeypatch, tiny, tmp_path / "ft", CHECKPOINT=ck, MAX_STEPS=3, LR=3e-3)
    train.main()
    loss = metrics(tmp_path / "ft")
    assert sorted(loss) == [0, 1, 2] and all(np.isfinite(v) for v in loss.values())
    assert metrics(tmp_path / "ft", "val_loss")[0] == pytest.approx(expected, rel=1e-5)
    out = checkpoint.load_checkpoint(str(tmp_path / "ft"))
    assert out["config"]["hybrid_spec"] == spec and out["step"] == 3
    new = surgery.build_student(teacher, spec)
    checkpoint.load_state_strict(new, out["model"])  # a train.py checkpoint rebuilds the same way


def test_rerun_of_a_finished_run_and_of_another_runs_dir(tiny, tmp_path, monkeypatch):
    """The same command again continues (here: the run is finished, nothing is redone); other
    result-changing settings in the same run dir are refused by name; --resume='' never mixes."""
    assert train.RESUME == "auto"
    configure(monkeypatch, tiny, tmp_path, MAX_STEPS=2)
    train.main()
    lines = open(tmp_path / "metrics.jsonl").read()
    train.main()
    assert open(tmp_path / "metrics.jsonl").read() == lines
    configure(monkeypatch, tiny, tmp_path, MAX_STEPS=2, LR=3e-3)
    with pytest.raises(ValueError, match=r"other result-changing settings: LR \(0.01 there, 0.003 here\)"):
        train.main()
    configure(monkeypatch, tiny, tmp_path, MAX_STEPS=2, RESUME="")
    with pytest.raises(ValueError, match="another run's checkpoints"):
        train.main()
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == ["step_000002.pt"]
