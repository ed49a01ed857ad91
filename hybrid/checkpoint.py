"""Atomic, self-describing checkpoints: runs/<run>/ckpt/step_000500.pt.

A checkpoint is a dict {model, optim, step, loader, config, rng, ...}; `config` holds whatever
defines the artifact (teacher, per-layer mixer spec), so later scripts read it from there.
Every file is written to `<path>.<host>.<pid>.tmp`, fsynced and renamed, so a crash never leaves a
half-written file under the real name and never destroys the previous checkpoint; the temp files a
killed writer left behind are removed at the next save or resume of the run (clean_stale_temps).

Stage-1 rotation checkpoints are partial (save_partial): step_k.pt holds only the parameters that
the k-th trained layer changed, plus the bookkeeping to resume; load_checkpoint gathers the layers of
step_1..k into one partial `model` state, which lands on a student freshly built from the teacher.
"""

import glob
import json
import os
import pickle
import re
import socket
import zipfile

import torch

_TMP = re.compile(r"\.([^./]+)\.(\d+)\.tmp$")


def _tmp_path(path: str) -> str:
    """Per host and process: two writers of one path must not share a temp file, and a cleaner can
    tell whether the writer of a temp file is still alive."""
    return f"{path}.{socket.gethostname().split('.')[0]}.{os.getpid()}.tmp"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that id runs (the writer of a temp file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def clean_stale_temps(run_dir: str) -> list[str]:
    """Remove the temp files a killed save left in run_dir/ and run_dir/ckpt/: those of this host whose
    writer is gone, and the old fixed-name `*.pt.tmp`. Temp files of other hosts are left alone (their
    writers may be alive). -> the removed paths."""
    host = socket.gethostname().split(".")[0]
    removed = []
    for path in glob.glob(os.path.join(run_dir, "*.tmp")) + glob.glob(os.path.join(run_dir, "ckpt", "*.tmp")):
        m = _TMP.search(path)
        if m is None and not path.endswith(".pt.tmp"):
            continue  # not one of ours
        if m is not None and (m.group(1) != host or int(m.group(2)) == os.getpid() or pid_alive(int(m.group(2)))):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass  # another process cleaned it first
    if removed:
        print(f"removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")
    return removed


def _fsync_dir(path: str) -> None:
    """Make a rename durable: without it a power loss can bring the old directory entry back."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a per-process temp file, flushed to disk before the rename (as atomic_write_bytes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # an exception (disk full, Ctrl-C) must not leave the temp file
            os.remove(tmp)
        raise
    _fsync_dir(path)


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
    """The newest checkpoint of a run (None without one); cleans the run's stale temp files first."""
    clean_stale_temps(run_dir)
    paths = list_checkpoints(run_dir, name)
    return paths[-1] if paths else None


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int = 3, name: str = "step") -> str:
    """Write state atomically as ckpt/<name>_<step>.pt and keep only the newest `keep` (0 = all)."""
    clean_stale_temps(run_dir)
    path = checkpoint_path(run_dir, step, name)
    atomic_torch_save(state, path)
    if keep > 0:
        for old in list_checkpoints(run_dir, name)[:-keep]:
            os.remove(old)
    return path


def module_state(module: torch.nn.Module, prefix: str) -> dict:
    """The entries of module.state_dict() under prefix (e.g. "model.layers.3.self_attn."), detached copies."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


def save_partial(run_dir: str, step: int, model_part: dict, state: dict) -> str:
    """Write ckpt/step_<step>.pt holding only `model_part` (what this step changed) plus `state`
    (bookkeeping). Steps 1..step-1 stay, since resuming needs them all; later steps are removed:
    they belong to an abandoned attempt and must not be gathered by a later resume."""
    clean_stale_temps(run_dir)
    path = checkpoint_path(run_dir, step)
    atomic_torch_save({**state, "model": model_part, "step": step, "partial": True}, path)
    for p in list_checkpoints(run_dir):
        if int(re.search(r"_(\d+)\.pt$", p).group(1)) > step:
            os.remove(p)
    return path


def _torch_load(path: str, map_location) -> dict:
    try:
        # weights_only=False: checkpoints hold numpy RNG state and python objects we wrote ourselves
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"truncated or corrupt: delete it (a resume then takes the previous one) or re-run "
                         f"the stage that wrote it") from e


def _gather_partial(path: str, ckpt: dict, map_location) -> dict:
    """The merged model state of partial checkpoints step_1..step_k of path's folder."""
    model = {}
    spec = (ckpt.get("config") or {}).get("hybrid_spec")
    for j in range(1, ckpt["step"]):
        earlier = os.path.join(os.path.dirname(path), f"step_{j:06d}.pt")
        if not os.path.exists(earlier):
            raise FileNotFoundError(f"{path} holds only what step {ckpt['step']} changed and needs {earlier}, "
                                    f"which is missing; restore that file, or start over in a new --run_dir")
        part = _torch_load(earlier, map_location)
        if not part.get("partial") or (part.get("config") or {}).get("hybrid_spec") != spec:
            raise ValueError(f"{earlier} is not a partial checkpoint of the same run as {path}; another run wrote "
                             f"into {os.path.dirname(path)}/: use a new --run_dir")
        model.update(part["model"])
    model.update(ckpt["model"])
    return {**ckpt, "model": model}


def load_checkpoint(path: str, map_location="cpu", partial_ok: bool = False) -> dict:
    """A checkpoint file, or a run dir (its final student, else its latest checkpoint).

    A partial checkpoint (save_partial) comes back with the model state of all its steps gathered; it
    holds only the trained parameters, so only a resume (partial_ok=True) may take it."""
    if os.path.isdir(path):  # a run dir: its final student, else its latest checkpoint
        found = final_path(path) if os.path.exists(final_path(path)) else latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoints under {path}/ckpt/; train first or pass a .pt file")
        path = found
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = _torch_load(path, map_location)
    if isinstance(ckpt, dict) and ckpt.get("partial"):
        if not partial_ok:
            run = os.path.dirname(os.path.dirname(path)) or "."
            raise ValueError(f"{path}: an unfinished stage-1 rotation ({ckpt['step']} layers trained), not a whole "
                             f"student; finish it (re-run it with --resume=auto) to get {final_path(run)}")
        ckpt = _gather_partial(path, ckpt, map_location)
    return ckpt


def load_state_strict(module: torch.nn.Module, state_dict: dict, what: str = "model", partial: bool = False) -> None:
    """load_state_dict(strict=True) with an error that names the first mismatched keys; partial=True
    (a partial checkpoint on a freshly built module) allows keys to be missing, never unexpected."""
    own = set(module.state_dict().keys())
    got = set(state_dict.keys())
    missing, unexpected = [] if partial else sorted(own - got), sorted(got - own)
    if missing or unexpected:
        raise ValueError(f"{what} checkpoint does not match the module: "
                         f"missing {len(missing)} keys (first: {missing[:5]}), "
                         f"unexpected {len(unexpected)} keys (first: {unexpected[:5]}); "
                         f"was it written for another teacher or layer spec?")
    module.load_state_dict(state_dict, strict=not partial)


# ----------------------------------------------------------------------------- which run a result belongs to
# distill.py's settings that cannot change what a run computes: a checkpoint written with any other setting
# different is refused on resume (resume_point), and results computed from it are keyed by the rest (init_key)
# (fsdp and ddp write the same checkpoints: switching modes resumes; a time limit only says where a run ends)
DISTILL_UNCHANGING = ("RUN_DIR", "RESUME", "LOG_EVERY", "SAVE_EVERY", "KEEP_CHECKPOINTS", "EVAL_EVERY", "PROFILE",
                      "COMPILE", "PARALLEL", "SHARD_TEACHER", "TIME_LIMIT_S")


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


def init_key(ckpt: dict) -> dict:
    """The settings a checkpoint's run was trained with, as "INIT.<NAME>" entries for the key of a result computed
    from it: redo that run with other settings in the same place and the stored results are refused, not reused."""
    settings = result_settings(checkpoint_settings(ckpt), DISTILL_UNCHANGING)
    return json.loads(json.dumps({f"INIT.{k}": v for k, v in settings.items()}, default=str))  # as stored


def resume_point(run_dir: str, resume: str, settings: dict, unchanging: tuple[str, ...]) -> tuple[str | None, dict | None]:
    """-> (path, checkpoint) a run continues from, or (None, None) to start fresh.

    resume "auto": the run dir's final checkpoint, else its latest; "" : start fresh, refused when
    run_dir already holds checkpoints (a new run never mixes with nor deletes another's files);
    a path: that checkpoint. A checkpoint written with other result-changing settings is refused,
    naming them. A rotation's partial checkpoint comes back with its steps gathered (its config is
    the artifact's, as in a whole one): a resume is the one reader that may take it."""
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
    ckpt = load_checkpoint(path, partial_ok=True)
    diff = settings_diff(result_settings(checkpoint_settings(ckpt), unchanging), result_settings(settings, unchanging))
    if diff:
        raise ValueError(f"{path} was written with other result-changing settings: {'; '.join(diff)}. Re-run with "
                         f"its settings to continue it, or pass a new --run_dir for this one (or --resume=<checkpoint> "
                         "of a run with these settings)")
    return path, ckpt
