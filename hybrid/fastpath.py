"""The GPU fast path of training: regional compile of decoder layers, and teacher targets shared
by the GA-S2 candidates.

    compile_layers(student); compile_layers(teacher)        # each decoder layer, in place
    targets = TeacherTargets(teacher, ShardLoader(...), device)   # one per selection run
    loss = accumulate_kl_cached(model, targets, first_batch, accum, autocast)

Regional compile: torch.compile of every decoder layer instead of the whole model. The layers of
one kind share their code, so dynamo compiles one graph per kind of layer (GDN, softmax; grad on
or off) and reuses it for the others: seconds instead of the ~160 s of a whole-model compile,
which traces all 30 layers and breaks its graph at every fla kernel. Inside a layer, inductor
fuses the elementwise work around the kernels (conv, SiLU, L2 norm, GQA expansion, fp32 gates,
gated RMSNorm, residuals, the MLP's SiLU-mul); the fla kernels themselves run eagerly between
the fused graphs (mixers.py marks them `torch.compiler.disable`).

Teacher targets: GA-S2's candidates train on the same batches in the same order by design, so the
teacher's final hidden states (B, T, C) are computed once per batch, the first time a candidate
needs it, and kept on the device for every later candidate (0.52M tokens of SmolLM2 = 0.6 GB in
bf16). The teacher then runs once per batch instead of once per batch per candidate.
"""

import contextlib

import torch
from torch import nn

from .kl import teacher_hidden
from .surgery import decoder_layers


def compile_layers(model: nn.Module, device: torch.device | str | None = None) -> int:
    """torch.compile each decoder layer of `model` in place (state-dict keys unchanged), on CUDA
    only: on CPU a compile costs more than it saves. -> the number of layers compiled (0 on CPU)."""
    layers = decoder_layers(model)
    if device is None:
        device = next(model.parameters()).device
    if torch.device(device).type != "cuda":
        return 0
    # one compiled graph per kind of layer and grad mode (teacher, student, eval) must fit the cache
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


class TeacherTargets:
    """(x, y, h_t) for batch i of `loader`'s fixed order, the teacher forward done once per batch.

    loader: anything with next_batch() -> (x, y) ids (B, T) (a ShardLoader made fresh, so its
    order is the one every candidate sees). Batches are read on first use and kept on `device`;
    teacher hidden states are kept until they take max_bytes, later ones are recomputed from the
    kept ids on every use (the old cost, never an error)."""

    def __init__(self, teacher: nn.Module, loader, device: torch.device, max_bytes: int = 16 * 2**30):
        self.teacher, self.loader, self.device, self.max_bytes = teacher, loader, device, max_bytes
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.kept_bytes = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        while len(self.batches) <= i:
            x, y = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
            h_t = teacher_hidden(self.teacher, x)
            size = h_t.numel() * h_t.element_size()
            keep = self.kept_bytes + size <= self.max_bytes
            self.kept_bytes += size if keep else 0
            self.batches.append((x, y, h_t if keep else None))
        x, y, h_t = self.batches[i]
        return x, y, (teacher_hidden(self.teacher, x) if h_t is None else h_t)

    def __len__(self) -> int:
        return len(self.batches)


def accumulate_kl_cached(model: nn.Module, targets: TeacherTargets, first: int, accum: int, w_t: torch.Tensor,
                         autocast) -> torch.Tensor:
    """accumulate_kl on cached teacher targets: micro-steps use batches first .. first+accum-1 of
    `targets`; model is a KLStudent (not under DDP: one candidate per rank). -> the mean loss, detached."""
    loss_sum = torch.zeros((), device=w_t.device)  # fp32, as accumulate_kl's
    for micro in range(accum):
        x, y, h_t = targets[first + micro]
        with autocast if autocast is not None else contextlib.nullcontext():
            loss, _ = model(x, y, h_t, w_t)
            (loss / accum).backward()
        loss_sum += loss.detach() / accum
    return loss_sum
