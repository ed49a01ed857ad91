"""Atomic, self-describing checkpoints: runs/<run>/ckpt/step_000500.pt.

A checkpoint is a dict {model, optim, step, loader, config, rng, ...}; `config` holds whatever
defines the artifact (teacher, per-layer mixer spec), so later scripts read it from there.
Every file is written to a per-process `<path>.<pid>.tmp`, fsynced and renamed, so a crash never
leaves a half-written file under the real name and never destroys the previous checkpoint.
"""

import glob
import json
import os
import re

import torch


def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers of one path must not share a temp file
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a per-process temp file, flushed to disk before the rename (as atomic_write_bytes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(run_dir: str, step: int, name: str = "step") -> str:
    return os.path.join(run_dir, "ckpt", f"{name}_{step:06d}.pt")


def list_checkpoints(run_dir: str, name: str = "step") -> list[str]:
    """Checkpoints of a run, oldest first (by the step in the file name)."""
    paths = glob.glob(os.path.join(run_dir, "ckpt", f"{name}_*.pt"))
    pat = re.compile(rf"{re.escape(name)}_(\d+)\.pt$")
    return sorted((p for p in paths if pat.search(p)), key=lambda p: int(pat.search(p).group(1)))


def final_path(run_dir: str) -> str:
    """Where a finished run puts its final student (the artifact later stages read)."""
    return os.path.join(run_dir, "ckpt", "final.pt")


def latest_checkpoint(run_dir: str, name: str = "step") -> str | None:
    paths = list_checkpoints(run_dir, name)
    return paths[-1] if paths else None


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int = 3, name: str = "step") -> str:
    """Write state atomically as ckpt/<name>_<step>.pt and keep only the newest `keep` (0 = all)."""
    path = checkpoint_path(run_dir, step, name)
    atomic_torch_save(state, path)
    if keep > 0:
        for old in list_checkpoints(run_dir, name)[:-keep]:
            os.remove(old)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if os.path.isdir(path):  # a run dir: its final student, else its latest checkpoint
        found = final_path(path) if os.path.exists(final_path(path)) else latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoints under {path}/ckpt/; train first or pass a .pt file")
        path = found
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only=False: checkpoints hold numpy RNG state and python objects we wrote ourselves
    return torch.load(path, map_location=map_location, weights_only=False)


def load_state_strict(module: torch.nn.Module, state_dict: dict, what: str = "model") -> None:
    """load_state_dict(strict=True) with an error that names the first mismatched keys."""
    own = set(module.state_dict().keys())
    got = set(state_dict.keys())
    missing, unexpected = sorted(own - got), sorted(got - own)
    if missing or unexpected:
        raise ValueError(f"{what} checkpoint does not match the module: "
                         f"missing {len(missing)} keys (first: {missing[:5]}), "
                         f"unexpected {len(unexpected)} keys (first: {unexpected[:5]}); "
                         f"was it written for another teacher or layer spec?")
    module.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- which run a result belongs to
def result_settings(cfg: dict, unchanging: tuple[str, ...]) -> dict:
    """A script's settings less those listed as unable to change a result (paths of outputs, log
    cadence, ...): a setting added later counts, unless someone argues it onto the list."""
    return {k: v for k, v in cfg.items() if k not in unchanging}


def settings_diff(have: dict, want: dict) -> list[str]:
    """'NAME (a there, b here)' for every setting that differs, missing on either side included."""
    missing = "<unset>"
    return [f"{k} ({have.get(k, missing)!r} there, {want.get(k, missing)!r} here)"
            for k in sorted(set(have) | set(want)) if have.get(k, missing) != want.get(k, missing)]


def checkpoint_settings(ckpt: dict) -> dict:
    """The settings a checkpoint was written with, in any config shape (see hybrid/student.py)."""
    cfg = ckpt.get("config") or {}
    old_train = {k: v for k, v in cfg.items() if k.isupper() or k in ("world_size", "grad_accum")}
    return cfg.get("settings") or cfg.get("resolved") or old_train


def resume_point(run_dir: str, resume: str, settings: dict, unchanging: tuple[str, ...]) -> tuple[str | None, dict | None]:
    """-> (path, checkpoint) a run continues from, or (None, None) to start fresh.

    resume "auto": the run dir's final checkpoint, else its latest; "" : start fresh, refused when
    run_dir already holds checkpoints (a new run never mixes with nor deletes another's files);
    a path: that checkpoint. A checkpoint written with other result-changing settings is refused,
    naming them."""
    if resume == "":
        found = list_checkpoints(run_dir) + [p for p in [final_path(run_dir)] if os.path.exists(p)]
        if found:
            raise ValueError(f"{run_dir}/ckpt holds another run's checkpoints ({', '.join(map(os.path.basename, found))})"
                             f" and --resume='' starts over: pass --resume=auto to continue that run, a new "
                             f"--run_dir, or move {run_dir}/ckpt away yourself (nothing is deleted for you)")
        return None, None
    if resume == "auto":
        path = final_path(run_dir) if os.path.exists(final_path(run_dir)) else latest_checkpoint(run_dir)
        if path is None:
            return None, None
    elif not os.path.exists(resume):
        raise FileNotFoundError(f"--resume={resume} does not exist; pass a checkpoint .pt, a run dir, or "
                                f"--resume=auto to continue the latest checkpoint in --run_dir={run_dir}")
    else:
        path = resume
    ckpt = load_checkpoint(path)
    diff = settings_diff(result_settings(checkpoint_settings(ckpt), unchanging), result_settings(settings, unchanging))
    if diff:
        raise ValueError(f"{path} was written with other result-changing settings: {'; '.join(diff)}. Re-run with "
                         f"its settings to continue it, or pass a new --run_dir for this one (or --resume=<checkpoint> "
                         "of a run with these settings)")
    return path, ckpt
