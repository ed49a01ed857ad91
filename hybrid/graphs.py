"""Small, repeated GPU work as CUDA graphs: one launch from the host instead of thousands.

A GA-S2 candidate's optimizer step (32,768 tokens at T=512) makes the host issue a compiled graph
and fla's kernels for every layer, forward and backward; on an H100 that took 236 ms of wall time per
step against 150 ms of GPU work (docs/results.md, fifth speed lease), and the candidates' held-out
scoring is a smaller forward still. `CudaGraphed(fn)` runs `fn` plainly for its first calls (torch.compile,
fla's autotune and the optimizer's state happen there), captures the next call as a CUDA graph and
replays it for every later call: the same kernels on the same memory, so the same numbers as plain calls
(tests/test_graphs.py), with one host launch per call.

    step = CudaGraphed(lambda x, y, h: kl_step(...), before_capture=lambda: capturable(opt))
    for i in range(steps):
        set_lr(opt, scale(i))          # a tensor LR once captured: set_lr fills it in place
        loss = step(x_i, y_i, h_i)     # replays after the warm-up calls

What a captured call may do: fixed shapes (checked: a call with other shapes is an error), no host
syncs (`.item()`, printing a tensor), no CPU-side randomness; the tensors it reads that are not its
arguments (weights, optimizer state) must stay where they are: updated in place, as AdamW does. The
output is overwritten by the next replay (clone what you keep). While capturing, transformers builds its
attention masks as in the plain calls (masks_as_when_not_capturing). Off CUDA, or with enabled=False, every
call is plain: the fallback is the reference. A capture that fails warns and leaves every later call plain
(a lease's run goes on, slower; the GPU test counts replays, so it cannot pass that way).
"""

import contextlib
import functools
import warnings
from typing import Callable

import torch

from .optim import optimizer_step
from .stage2 import accumulate_kl, batch_stats


def capturable(opt: torch.optim.Optimizer) -> None:
    """Make an optimizer's step capturable: AdamW's "capturable" flag on, and each group's LR a 0-d tensor
    on its parameters' device (set_lr then fills it in place, so a replayed step reads the current LR)."""
    for group in opt.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


class CudaGraphed:
    """fn(*tensors) -> tensor: plain for the first `warmup` calls, then captured once and replayed.

    The last warm-up call runs on the capture stream (lazily made per-stream state, e.g. cuBLAS
    workspaces, then exists there); `before_capture` runs just before the capture (e.g. `capturable`).
    `replays` counts the calls served by the graph."""

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2, enabled: bool = True,
                 before_capture: Callable[[], None] | None = None):
        self.fn, self.warmup, self.before_capture = fn, max(1, warmup), before_capture
        self.enabled = enabled and torch.cuda.is_available()
        self.calls, self.replays = 0, 0
        self.graph, self.inputs, self.out = None, None, None
        self.stream = torch.cuda.Stream() if self.enabled else None

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.enabled or (self.graph is None and self.calls <= self.warmup):
            if self.enabled and self.calls == self.warmup:
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    out = self.fn(*tensors)
                torch.cuda.current_stream().wait_stream(self.stream)
                return out
            return self.fn(*tensors)
        if self.graph is None:
            try:
                self._capture(tensors)
            except RuntimeError as e:  # keep a long run alive, plainly, and say so (tests count the replays)
                warnings.warn(f"CudaGraphed: capturing {getattr(self.fn, 'func', self.fn)} failed, so its calls run "
                              f"without a graph from here on ({e})")
                self.enabled, self.graph, self.inputs, self.out = False, None, None, None
                torch.cuda.synchronize()
                return self.fn(*tensors)
        self._check(tensors)
        for dst, src in zip(self.inputs, tensors):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.out

    def _capture(self, tensors) -> None:
        if self.before_capture is not None:
            self.before_capture()
        self.inputs = [t.detach().clone() for t in tensors]
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream), masks_as_when_not_capturing():
            self.out = self.fn(*self.inputs)  # e.g. a host sync inside fn makes this raise

    def _check(self, tensors) -> None:
        if len(tensors) != len(self.inputs):
            raise ValueError(f"CudaGraphed: captured with {len(self.inputs)} tensors, called with {len(tensors)}")
        for i, (a, b) in enumerate(zip(self.inputs, tensors)):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(f"CudaGraphed: argument {i} is {tuple(b.shape)} {b.dtype} on {b.device}, but the graph "
                                 f"was captured for {tuple(a.shape)} {a.dtype} on {a.device}: a graph replays fixed "
                                 "shapes; keep every call's batch the same size (or pass enabled=False)")


@contextlib.contextmanager
def masks_as_when_not_capturing():
    """transformers' mask builder takes a capturing CUDA stream for tracing (its is_tracing), and where it
    would read data it gives up: in a plain call it checks the positions for packed sequences (a host sync),
    finds none and lets SDPA's is_causal stand in for the mask; in a captured call it builds a (B, 1, T, T)
    mask instead. The compiled softmax layers then see a mask their warm-up calls did not, recompile inside
    the capture, and the capture fails (on the H100, transformers 5.17, 2026-12-06). Within this context it
    decides as in the plain calls: no packed sequences (a captured call's positions are the forward's own
    0..T-1: don't capture a call that passes packed position_ids) and no mask when there is no padding mask
    (a padding mask still counts as traced: reading it would sync)."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        yield
        return
    saved = {name: getattr(mu, name) for name in ("is_tracing", "find_packed_sequence_indices") if hasattr(mu, name)}
    if "is_tracing" in saved:
        mu.is_tracing = lambda tensor=None: tensor is not None and saved["is_tracing"](tensor)
    if "find_packed_sequence_indices" in saved:
        mu.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(mu, name, fn)


def kl_step(model: torch.nn.Module, teacher: torch.nn.Module, opt: torch.optim.Optimizer, params: list,
            grad_clip: float, device: torch.device, autocast, *tensors: torch.Tensor) -> torch.Tensor:
    """One optimizer step on cached teacher targets, as GA-S2's candidates take it: the KL forward +
    backward of each micro-batch (tensors = x, y, h_t of each, flat), clip, AdamW, grads dropped.
    -> the mean loss (0-d, on device). What `CudaGraphed` captures for select_layers.py."""
    batches = [tensors[i:i + 3] for i in range(0, len(tensors), 3)]
    opt.zero_grad(set_to_none=True)  # none are left from a step, but a failed capture may leave some behind
    loss = accumulate_kl(model, teacher, None, len(batches), device, autocast, targets=batches)
    optimizer_step(opt, params, grad_clip)
    return loss


def candidate_calls(model, student: torch.nn.Module, teacher: torch.nn.Module, opt: torch.optim.Optimizer,
                    grad_clip: float, device: torch.device, autocast, chunk_tokens: int,
                    enabled: bool) -> tuple[CudaGraphed, CudaGraphed]:
    """A GA-S2 candidate's two repeated calls, graphed when enabled: its optimizer step on cached teacher
    targets (kl_step; model: the KLStudent of `student`) and its held-out scoring of one batch (batch_stats,
    for held_out_kl's stats_fn). select_layers.py trains with them and bench_train.py times them."""
    step = CudaGraphed(functools.partial(kl_step, model, teacher, opt, list(student.parameters()), grad_clip, device,
                                         autocast), enabled=enabled, before_capture=lambda: capturable(opt))
    stats = CudaGraphed(functools.partial(batch_stats, student, teacher.lm_head.weight, autocast, chunk_tokens),
                        enabled=enabled)
    return step, stats
