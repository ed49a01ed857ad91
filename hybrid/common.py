"""Process setup shared by the scripts: the entry point (run_script: overrides, --help, one-line user
errors and interrupts), torchrun init, rank-0 printing, seeding, run logging.

One code path for 1 process and N: `init_dist()` reads torchrun's environment when present
(nccl on GPU, gloo on CPU, so a 2-process test runs on a laptop; gloo also where processes share
a GPU) and otherwise returns a single-process world.
"""

import glob
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from hybrid.config import apply_overrides

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_dist(share_gpus: bool = False) -> tuple[int, int, int, torch.device]:
    """-> (rank, local_rank, world_size, device). Initialises the process group under torchrun.
    share_gpus: more processes than GPUs on a node are allowed (see gpu_for_rank)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        index, backend = gpu_for_rank(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)),
                                      torch.cuda.device_count(), share_gpus)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, local_rank, world_size, device


def gpu_for_rank(local_rank: int, local_world_size: int, gpus: int, share_gpus: bool) -> tuple[int, str]:
    """-> (GPU index, backend): one GPU per process with nccl; with share_gpus and more processes than
    GPUs, GPU local_rank % gpus with gloo (nccl refuses two ranks on one GPU). For jobs whose ranks
    only exchange Python objects (select_layers.py), where one process leaves its GPU idle between
    launches and a second fills the gaps."""
    if local_world_size <= gpus:
        return local_rank, "nccl"
    if not share_gpus:
        raise ValueError(f"torchrun started {local_world_size} processes on a node with {gpus} GPU(s): use "
                         f"--nproc_per_node={gpus} (or fewer); only select_layers.py runs several processes per GPU")
    return local_rank % gpus, "gloo"


def cleanup_dist() -> None:
    """The end of a distributed run: a barrier, a pause, then the process group destroyed.

    The pause: a gloo worker thread frees a finished collective's tensors after the caller has moved
    on, and freeing a tensor that Python created takes the GIL. The process group's destructor joins
    those threads while holding the GIL (the last reference often goes with DDP's Reducer as main()
    returns), so a rank could deadlock right after the final barrier (seen with gdb: the main thread
    in ~ProcessGroupGloo joining a runloop thread that waits for the GIL in ~AsyncBarrierWork). The
    sleep lets the threads finish while the GIL is free."""
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.5)
        dist.destroy_process_group()


def is_master() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world() -> tuple[int, int]:
    """-> (rank, world_size), (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def print0(*args, **kwargs) -> None:
    if is_master():
        print(*args, **kwargs, flush=True)


def seed_all(seed: int) -> None:
    """The same seed on every rank before building modules, so initial weights agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (fast, no loss scaling), fp32 on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def git_info() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": run("git", "rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no"))}


def env_info(device: torch.device, world_size: int, dtype: torch.dtype) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "python": platform.python_version(), "device": str(device), "world_size": world_size,
            "dtype": str(dtype).replace("torch.", ""), **git_info()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    """45s | 2m10s | 1h05m: short enough for a log line, precise enough to plan by."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def val_label(batches: list, world_size: int = 1) -> str:
    """Which held-out slice a number comes from, for its log line: "val 8x4x128 = 4.1k tokens (first
    windows of the val shards, rank-strided over 2 ranks)". Same settings -> same windows."""
    n, (B, T) = len(batches), tuple(batches[0][0].shape)
    ranks = f", rank-strided over {world_size} ranks" if world_size > 1 else ""
    return f"val {n}x{B}x{T} = {format_tokens(n * B * T * world_size)} tok from the start of the val shards{ranks}"


class Pace:
    """Wall time per step over the steps since the last lap. Lap where the host has waited for the GPU (a
    log line's .item()): then a log's tokens/s is of finished steps, not of one step that also waited for
    the ones queued before it (184k vs 199k tokens/s of wall in a stage-2 run, 2026-12-06). reset() after
    work that is not a step (an eval, a checkpoint)."""

    def __init__(self, step: int = 0):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.t, self.step = time.time(), step

    def lap(self, step: int) -> float:
        """step: the steps done so far -> seconds per step since the last lap or reset."""
        dt = (time.time() - self.t) / max(1, step - self.step)
        self.reset(step)
        return dt


_current_progress: list = []  # the newest Progress: where an interrupted run says it stopped


class Progress:
    """Percent done and ETA of a loop over `total` units (steps, layer-steps, jobs, tasks).

    `line(done)` -> "37% | ETA 2m10s" for the end of a fixed-format log line. The rate is measured
    from construction (or the first `line` after a resume at `start`), so a resumed run's ETA is
    its own. The newest Progress is also what run_script names when a run is interrupted.
    """

    def __init__(self, total: int, label: str, unit: str = "step", start: int = 0):
        self.total, self.label, self.unit, self.start, self.done = max(1, total), label, unit, start, start
        self.t0 = time.time()
        _current_progress[:] = [self]

    def eta(self, done: int) -> float | None:
        rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
        return (self.total - done) / rate if rate > 0 else None

    def line(self, done: int) -> str:
        self.done = done
        eta = self.eta(done)
        return f"{100 * done / self.total:.0f}% | ETA {format_duration(eta) if eta is not None else '?'}"

    def where(self) -> str:
        return f"{self.label} ({self.done} of {self.total} {self.unit}s done at the last log line)"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_message(run_dir: str | None, resume: str) -> str:
    """One line: where the run stopped, its newest checkpoint, and how to continue."""
    where = f" during {_current_progress[0].where()}" if _current_progress else ""
    ckpts = sorted(glob.glob(os.path.join(run_dir, "ckpt", "*.pt"))) if run_dir else []
    newest = max(ckpts, key=os.path.getmtime) if ckpts else None
    saved = f"; newest checkpoint {newest}" if newest else ("; no checkpoint saved yet" if run_dir else "")
    return f"interrupted{where}{saved}; to continue: {resume}"


def _raised_by_us(e: BaseException) -> bool:
    """True when the innermost frame of e's traceback is this repo's code (not a library's)."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_REPO + os.sep) \
        and f"{os.sep}.venv{os.sep}" not in frames[-1].filename


def run_script(g: dict, main: Callable[[], object], interrupted: Callable[[], str] | None = None,
               argv: list[str] | None = None) -> None:
    """Every script's entry point: `if __name__ == "__main__": run_script(globals(), main, ...)`.

    --help prints the settings and exits 0; then the --name=value overrides (apply_overrides), then
    main(). Every rank ends the same way and only rank 0 prints, so torchrun shows one line, not a
    traceback per rank:
      a ValueError or FileNotFoundError raised by this repo's code is a user error (a bad setting, a
      missing file): `error: ...` on stderr and exit 2; one raised inside a library keeps its
      traceback (it may be a bug);
      Ctrl-C or SIGTERM (torchrun, schedulers): the line interrupted() returns (called then, so it
      sees the overridden settings; default: where the run stopped, re-run the command), exit 130."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        apply_overrides(g, argv)
        main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun follows Ctrl-C with SIGTERM: one message
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rank0:
            line = interrupted() if interrupted else interrupt_message(None, "re-run the same command")
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # no process-group teardown: the other ranks are stopping too
    except (ValueError, FileNotFoundError) as e:
        if not _raised_by_us(e):
            raise
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    signal.signal(signal.SIGTERM, previous)


class RunLogger:
    """Rank 0 echoes fixed-format lines to runs/<run>/log.txt and dicts to metrics.jsonl."""

    def __init__(self, run_dir: str | None, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled and run_dir is not None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
        self.t0 = time.time()

    def log(self, line: str | None = None, metrics: dict | None = None) -> None:
        if line is not None:
            print0(line)
        if not self.enabled:
            return
        if line is not None:
            with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
        if metrics is not None:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"time": round(time.time() - self.t0, 3), **metrics}) + "\n")
