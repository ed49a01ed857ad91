"""Data parallelism for the trained student: DDP (every rank holds the whole model and optimizer)
or FSDP2 (`torch.distributed.fsdp.fully_shard`: each rank holds 1/N of the parameters, gradients
and AdamW state, and gathers one decoder block at a time), one code path for 1 process and N.

    model = wrap(student_or_KLStudent, decoder, mode, device)   # "ddp" | "fsdp"; before the optimizer
    shard_teacher(teacher, device)                         # optional: the frozen teacher's blocks too
    with no_sync(model): loss.backward()                   # grad accumulation without communication
    model_state, optim_state = full_state(raw_model, opt)  # collective; rank 0 gets the full tensors
    load_optimizer(opt, local_optimizer_state(opt, ckpt["optim"]))
    with gathered(model): held_out_kl(student, ...)        # a forward that bypasses model.forward

Checkpoints are the same under both modes: full tensors under the unwrapped module's keys and
`optimizer.state_dict()`'s integer-indexed shape, so export, eval and a resume with the other mode
(or another world size) read them unchanged. With one process "fsdp" wraps nothing (there is
nothing to shard), so 1 process is plain single-device training in both modes.

stage2_memory_gb() is the computed (not measured) per-GPU memory of stage 2 behind the README's
table of which teachers fit one GPU.
"""

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

MODES = ("ddp", "fsdp")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (_world_size(),))


def wrap(model: nn.Module, decoder: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """-> `model` ready for data-parallel training: DDP around it, or FSDP2 in place (each decoder
    block of `decoder` a unit, then `model` itself the root holding embeddings, final norm and LM
    head). `decoder`: the HF CausalLM whose `.model.layers` are the blocks (`model` itself or
    inside it). One process: `model` unchanged. Call before building the optimizer (FSDP2 swaps
    the parameters for sharded DTensors)."""
    if mode not in MODES:
        raise ValueError(f"--parallel={mode!r}: expected one of {MODES}")
    if _world_size() == 1:
        return model
    if mode == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    mesh = _mesh(device)
    for block in decoder.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_teacher(teacher: nn.Module, device: torch.device) -> str:
    """Shard the frozen teacher's decoder blocks over the ranks (FSDP2, gathered block by block in
    each forward), in place; one process: nothing. Its LM head stays whole on every rank (the KL
    reads the weight outside the teacher's forward), untied from the embedding first when shared;
    the embedding and final norm are sharded with `teacher.model` as the root. -> a line for the log."""
    if _world_size() == 1:
        return "teacher: whole (1 process)"
    from torch.distributed.fsdp import fully_shard
    head = teacher.lm_head
    if head.weight is teacher.model.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    mesh = _mesh(device)
    for block in teacher.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(teacher.model, mesh=mesh)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in teacher.parameters())
    total = sum(p.numel() for p in teacher.parameters())
    return f"teacher: FSDP2 over {_world_size()} ranks, {local / 1e6:.3f}M of {total / 1e6:.3f}M parameters on rank 0"


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def describe(model: nn.Module, mode: str) -> str:
    """One line for the log: how the trained model is spread over the ranks."""
    n_world = _world_size()
    if n_world == 1:
        return f"parallel: 1 process (--parallel={mode} wraps nothing)"
    if not is_sharded(model):
        return f"parallel: DDP over {n_world} ranks, the whole model on each"
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return f"parallel: FSDP2 over {n_world} ranks, {local / 1e6:.3f}M of {total / 1e6:.3f}M parameters on rank 0"


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Backward passes inside reduce no gradients (the micro-steps of grad accumulation before the
    last): DDP's no_sync, FSDP2's set_requires_gradient_sync(False); otherwise nothing."""
    if isinstance(model, DDP):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Hold the FSDP2 root's own parameters (embeddings, final norm, LM head) whole while inside, for
    code that runs the model other than through its forward (held-out KL reads student.model and
    student.lm_head.weight); the blocks gather themselves. Not sharded: nothing."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _full(t, keep: bool):
    """A whole CPU copy of a tensor (None where not `keep`), gathered when sharded: a collective, so
    every rank calls it for the same tensors in the same order; non-tensors unchanged."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if not torch.is_tensor(t):
        return t
    return t.detach().cpu() if keep else None


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict | None, dict | None]:
    """-> (model.state_dict(), optimizer.state_dict()) with every tensor whole and on the CPU, what a
    checkpoint stores whatever the mode, on rank 0; (None, None) on the other ranks, which must
    call it too under FSDP2 (it gathers) but keep no host copy (at 7B the AdamW state alone is
    ~90 GB per copy)."""
    keep = not dist.is_initialized() or dist.get_rank() == 0
    model_state = {k: _full(v, keep) for k, v in model.state_dict().items()}
    optim_state = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        optim_state = {**sd, "state": {i: {k: _full(v, keep) for k, v in s.items()} for i, s in sd["state"].items()}}
    return (model_state, optim_state) if keep else (None, None)


def local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A checkpoint's optimizer state (full tensors, optimizer.state_dict() shape) cut to this rank's
    shards where the optimizer's parameters are sharded, ready for load_state_dict; unchanged
    otherwise. Every rank holds the checkpoint, so each cuts its own shard (no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    return {**state, "state": out}


# ----------------------------------------------------------------------------- computed memory
def decoder_params(layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int,
                   tied: bool) -> int:
    """Parameters of a Llama/Qwen2-shaped decoder (q/k/v/o, SwiGLU MLP, 2 norms per block, embedding,
    final norm, LM head unless tied); attention biases left out (< 0.1%)."""
    head_dim = hidden // heads
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    block = attn + 3 * hidden * inter + 2 * hidden
    return layers * block + vocab * hidden * (1 if tied else 2) + hidden


def stage2_memory_gb(layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int, tied: bool,
                     tokens: int, chunk_tokens: int = 4096, world_size: int = 1, mode: str = "ddp",
                     shard_teacher: bool = False, act_factor: float = 2.4) -> dict:
    """Computed (not measured) stage-2 memory per GPU in GB (1e9 bytes), the student the teacher's size:
      teacher   bf16 weights, 2 bytes/param (split over the ranks when sharded);
      student   fp32 weights + grads + AdamW moments, 4+4+8 = 16 bytes/param (split over the ranks
                under fsdp, plus two whole fp32 blocks: the one gathered and the one prefetched);
      activations  of one micro-batch of `tokens` tokens per rank: act_factor x (18*hidden + 8*inter)
                bytes per token and block, the bf16 tensors a block keeps for backward (normed inputs,
                q/k/v, mixer output, residuals, SwiGLU gate/up/product) scaled by act_factor = 2.4, the
                ratio of the one measured peak (H100, SmolLM2-135M all-GDN stage 2 at 16 x 2048
                tokens: 57.7 GB max allocated, docs/results.md) to that count (what the count
                leaves out: the GDN mixer's fp32 gates and chunk intermediates, autocast's bf16
                weight copies, the teacher forward's transients);
      logits    the KL chunk: 3 x chunk_tokens x vocab fp32."""
    n = decoder_params(layers, hidden, inter, vocab, heads, kv_heads, tied)
    n_block = (n - vocab * hidden * (1 if tied else 2)) // layers
    w = world_size if mode == "fsdp" else 1
    parts = {"teacher": 2 * n / (world_size if shard_teacher and mode == "fsdp" else 1),
             "student": 16 * n / w + (2 * 4 * n_block if w > 1 else 0),
             "activations": act_factor * tokens * layers * (18 * hidden + 8 * inter),
             "logits": 3 * min(chunk_tokens, tokens) * vocab * 4}
    out = {k: v / 1e9 for k, v in parts.items()}
    return {"params_B": n / 1e9, **out, "total": sum(out.values())}


# (layers, hidden, intermediate, vocab, heads, kv heads, tied embeddings) from the models' config.json
TEACHER_SHAPES = {"SmolLM2-135M": (30, 576, 1536, 49152, 9, 3, True),
                  "Qwen2.5-0.5B": (24, 896, 4864, 151936, 14, 2, True),
                  "Qwen2.5-1.5B": (28, 1536, 8960, 151936, 12, 2, True),
                  "Qwen2.5-3B": (36, 2048, 11008, 151936, 16, 2, True),
                  "Qwen2.5-7B": (28, 3584, 18944, 152064, 28, 4, False),
                  "Llama-3.1-8B": (32, 4096, 14336, 128256, 32, 8, False)}


def memory_table(seq_len: int = 512, micro_batch: int = 16, gpus_gb: tuple[int, ...] = (80, 141)) -> str:
    """The README's computed stage-2 memory tables (markdown): GB per GPU at `micro_batch` x `seq_len`
    tokens per rank, and the largest power-of-2 micro-batch <= micro_batch that fits each GPU size
    under DDP and under FSDP2 (student and teacher sharded) on 2 and 8 GPUs ("-": not even 1)."""
    setups = [("DDP", 1, "ddp"), ("FSDP2 x2", 2, "fsdp"), ("FSDP2 x8", 8, "fsdp")]
    head = ["| teacher | params | teacher bf16 | student 16 B/param | activations per 1k tokens | logit chunk |"
            + "".join(f" {name} total |" for name, _, _ in setups), "|---" * (6 + len(setups)) + "|"]
    fits = ["| teacher |" + "".join(f" {name}, {gb} GB |" for name, _, _ in setups for gb in gpus_gb),
            "|---" * (1 + len(setups) * len(gpus_gb)) + "|"]
    for name, shape in TEACHER_SHAPES.items():
        def total(mb, w, mode):
            return stage2_memory_gb(*shape, tokens=mb * seq_len, world_size=w, mode=mode, shard_teacher=w > 1)
        r, per_k = total(micro_batch, 1, "ddp"), stage2_memory_gb(*shape, tokens=1000)["activations"]
        head.append(f"| {name} | {r['params_B']:.2f}B | {r['teacher']:.1f} | {r['student']:.1f} | {per_k:.2f} | "
                    f"{r['logits']:.1f} |" + "".join(f" {total(micro_batch, w, m)['total']:.0f} |" for _, w, m in setups))
        cells = []
        for _, w, mode in setups:
            for gb in gpus_gb:
                ok = [mb for mb in (16, 8, 4, 2, 1) if mb <= micro_batch and total(mb, w, mode)["total"] <= gb]
                cells.append(f" {ok[0]} |" if ok else " - |")
        fits.append(f"| {name} |" + "".join(cells))
    return "\n".join(head) + "\n\n" + "\n".join(fits)


# ----------------------------------------------------------------------------- collectives (no-ops on one process)
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


def synced_seconds(t_start: float, device: torch.device) -> float:
    """Seconds since t_start once this rank's queued GPU work has run, averaged over ranks (every rank gets
    the same number, so decisions taken on it agree)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return all_mean(torch.tensor(time.time() - t_start, dtype=torch.float64, device=device)).item()


def past_limit(t_start: float, limit_s: float, device: torch.device) -> bool:
    """Whether limit_s seconds have passed since t_start on any rank (every rank gets the same answer, so all
    stop together; with several ranks this syncs)."""
    up = float(time.time() - t_start > limit_s)
    if dist.is_initialized() and dist.get_world_size() > 1:
        up = all_mean(torch.tensor(up, device=device)).item()
    return up > 0
