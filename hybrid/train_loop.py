"""Mechanism shared by train.py, distill.py and select_layers.py: LR schedule, optimizer,
gradient averaging across ranks, and the token-batch arithmetic.
"""

import math

import torch
import torch.distributed as dist

from hybrid.common import print0


def cosine_lr(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr` over warmup_steps, then cosine decay to `min_lr` at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


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
    """AdamW with betas (0.9, 0.95); the fused CUDA kernel on GPU."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, scale_lr: float, base_lr: float) -> None:
    """Scale every group's own base LR (group['base_lr'], default base_lr) by scale_lr / base_lr."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", base_lr) * scale_lr / base_lr


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """all_reduce(AVG) the grads of params that are not under DDP (stage 1 trains one layer at a
    time: broadcasting it once and averaging its grads is simpler than DDP with unused params)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Make every rank hold rank 0's values (cheap insurance next to a shared seed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar tensor over ranks (for logging and validation)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value
