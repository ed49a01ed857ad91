"""Optimisation shared by train.py, distill.py and select_layers.py: AdamW, the LR schedule, one
optimizer step, and the token-batch arithmetic.

    opt = adamw([{"params": mixers, "lr": 1e-3}, {"params": rest, "lr": 1e-4}], 1e-3, 0.0, device)
    set_lr(opt, cosine_lr(step, max_steps, warmup_steps, 1.0, min_frac))  # every group: its peak x scale
    sched = TimedCosine(max_steps, warmup_steps, min_frac, limit_s=450)     # a run with a wall-time limit
    norm = optimizer_step(opt, params, grad_clip)
"""

import math

import torch

from hybrid.common import print0


def cosine_lr(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr` over warmup_steps, then cosine decay to `min_lr` at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class TimedCosine:
    """cosine_lr over a run whose wall time is limited: after the first step (it compiles) and `probe`
    more, the steps that fit in what is left of limit_s at the measured pace (times `margin`, for the
    evals and jitter) become the schedule's length, so a run its limit stops ends annealed instead of
    mid-decay. The caller hands observe() the elapsed seconds at the steps wants_time() names (after a
    GPU sync, and the same on every rank). limit_s = 0: cosine_lr over max_steps, untouched."""

    def __init__(self, max_steps: int, warmup: int, min_frac: float, limit_s: float = 0.0, start: int = 0,
                 probe: int = 10, margin: float = 0.97):
        self.total, self.max_steps, self.warmup, self.min_frac = max_steps, max_steps, warmup, min_frac
        self.limit_s, self.margin, self.t_first = limit_s, margin, 0.0
        self.marks = (start, start + probe) if limit_s > 0 and start + probe < max_steps - 1 else ()

    def scale(self, step: int) -> float:
        return cosine_lr(step, self.total, self.warmup, 1.0, self.min_frac)

    def wants_time(self, step: int) -> bool:
        return step in self.marks

    def observe(self, step: int, elapsed: float) -> str:
        """elapsed: seconds of the limit spent when `step` ended; -> a line for the log once it plans."""
        if step == self.marks[0]:
            self.t_first = elapsed
            return ""
        pace = (elapsed - self.t_first) / (self.marks[1] - self.marks[0])
        fit = step + 1 + int(self.margin * (self.limit_s - elapsed) / max(pace, 1e-9))
        self.total = max(step + 2, min(self.max_steps, fit))
        return (f"time limit {self.limit_s:.0f} s at {pace:.3f} s/step (steps {self.marks[0] + 1}-{step}): "
                + (f"all {self.max_steps} steps fit" if self.total == self.max_steps else
                   f"the LR schedule ends at step {self.total} of {self.max_steps}, annealed before the limit"))


def capped_warmup(warmup_steps: int, steps: int, frac: float = 0.1) -> int:
    """Warm-up of at most `frac` of a run's steps (at least 1), so a short budget leaves warm-up
    (20 warm-up steps in a 20-step run would never reach the peak LR); says so when it caps."""
    capped = min(warmup_steps, max(1, int(steps * frac)))
    if capped < warmup_steps:
        print0(f"warm-up: {capped} steps (WARMUP_STEPS={warmup_steps} capped at {frac:.0%} of the {steps}-step run)")
    return capped


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that all ranks together see total_batch_tokens."""
    per_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_step:
        raise ValueError(f"TOTAL_BATCH_TOKENS={total_batch_tokens} not divisible by MICRO_BATCH*SEQ_LEN*world_size = "
                         f"{micro_batch}*{seq_len}*{world_size} = {per_step}; pick a multiple of {per_step}")
    return total_batch_tokens // per_step


def adamw(param_groups: list[dict], lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95); the fused CUDA kernel on GPU. Each group's peak LR (its "lr",
    default `lr`) is kept as "base_lr" for set_lr."""
    opt = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                            fused=device.type == "cuda")
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


def set_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """The one LR convention: every group runs at its peak LR (base_lr) times the schedule's scale."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # a captured step reads its LR from this tensor (graphs.capturable)
            group["lr"].fill_(group["base_lr"] * scale)
        else:
            group["lr"] = group["base_lr"] * scale


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this run's peak LRs (a checkpoint's groups may lack them)."""
    base = [group["base_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, base):
        group["base_lr"] = lr


def optimizer_step(optimizer: torch.optim.Optimizer, params, grad_clip: float) -> torch.Tensor:
    """Clip the global grad norm of params to grad_clip (0 = no clipping), step, zero the grads;
    -> the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
