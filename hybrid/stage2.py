"""Stage 2, full-model logit distillation: the one home of the pieces distill.py (stage 2),
select_layers.py (GA-S2 candidates and every KL score) and eval.py share.

    model = KLStudent(student, temperature, ce_weight, chunk_tokens)   # loss inside forward (DDP)
    opt = adamw(stage2_param_groups(student, lr_mixer, lr_other), ...)
    loss = accumulate_kl(model, teacher, loader, accum, device, autocast)  # one optimizer step's grads
    targets = TeacherTargets(teacher, ShardLoader(...), device)  # GA-S2: one teacher forward per batch
    loss = accumulate_kl(model, teacher, None, accum, device, autocast, targets=targets, first=step * accum)
    r = held_out_kl(student, teacher, val, device, autocast)  # r["val_kl"], r["val_kl_per_batch"], ...

`held_out_kl` is the one held-out KL(teacher || student) of the toolkit: stage 2's validation,
GA-S2's ranking and eval.py's report are the same number.
"""

import contextlib
import functools

import torch
from torch import nn

from .losses import chunked_distill_loss, stats_chunk_fn
from .parallel import all_mean, no_sync
from .surgery import mixer_parameters


class KLStudent(nn.Module):
    """The student with the distillation loss inside forward, so DDP sees every parameter's use.

    forward(x (B, T) ids, y (B, T) next ids, h_t (B, T, C) teacher final hidden, w_t (V, C) teacher
    LM head) -> (loss, {"kl", "ce"}).
    """

    def __init__(self, student: nn.Module, temperature: float = 1.0, ce_weight: float = 0.0, chunk_tokens: int = 4096,
                 fused: bool | None = None):
        super().__init__()
        self.student, self.temperature, self.ce_weight, self.chunk_tokens = student, temperature, ce_weight, chunk_tokens
        self.fused = fused  # chunked_distill_loss's fused: None = compiled fused chunk math on GPU, reference on CPU

    def forward(self, x, y, h_t, w_t):
        # to h_t's dtype: bf16 LM-head matmuls on GPU; no KV cache (see teacher_hidden)
        h_s = self.student.model(input_ids=x, use_cache=False).last_hidden_state.to(h_t.dtype)
        return chunked_distill_loss(h_s, self.student.lm_head.weight, h_t, w_t, targets=y, temperature=self.temperature,
                                    ce_weight=self.ce_weight, chunk_tokens=self.chunk_tokens, fused=self.fused)


def stage2_param_groups(student: nn.Module, lr_mixer: float, lr_other: float) -> list[dict]:
    """AdamW groups for stage 2: mixer parameters at lr_mixer, everything else at lr_other (each
    group's peak LR, which optim.set_lr scales)."""
    mixer_ids = {id(p) for p in mixer_parameters(student)}
    groups = [{"params": [p for p in student.parameters() if id(p) in mixer_ids], "lr": lr_mixer},
              {"params": [p for p in student.parameters() if id(p) not in mixer_ids], "lr": lr_other}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def teacher_hidden(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, C) the teacher's final hidden states (after its final norm)."""
    # no KV cache (HF builds one by default): it costs memory, and a compiled layer specialises on its state
    return teacher.model(input_ids=x, use_cache=False).last_hidden_state


@torch.no_grad()
def teacher_targets(teacher: nn.Module, batches: list, device: torch.device) -> list[torch.Tensor]:
    """The teacher's final hidden states (B, T, C) for each (x, y) batch, computed once (GA-S2
    scores hundreds of students on the same val batches)."""
    return [teacher_hidden(teacher, x.to(device)) for x, _ in batches]


class TeacherTargets:
    """(x, y, h_t) for batch i of `loader`'s fixed order, the teacher forward done once per batch.

    GA-S2's candidates train on the same batches in the same order by design, so the teacher's final
    hidden states (B, T, C) are computed the first time a candidate needs batch i and kept on `device`
    for every later candidate (0.52M tokens of SmolLM2 = 0.6 GB in bf16): the teacher runs once per
    batch instead of once per batch per candidate. loader: anything with next_batch() -> (x, y) ids
    (B, T), made fresh so its order is the one every candidate sees. States beyond max_bytes are not
    kept: those batches' states are recomputed from the kept ids on every use (the old cost, never an error).
    """

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


def accumulate_kl(model: nn.Module, teacher: nn.Module, loader, accum: int, device: torch.device, autocast,
                  targets: TeacherTargets | None = None, first: int = 0) -> torch.Tensor:
    """`accum` micro-steps of the KL forward + backward on `model` (a KLStudent, maybe under DDP or
    FSDP2: then grads sync on the last micro-step only), loss scaled by 1/accum; -> the mean loss, detached.
    Each micro-step reads loader.next_batch() and runs the teacher, or, given cached `targets`
    (GA-S2; loader unused), takes batches first .. first + accum - 1 of them."""
    w_t = teacher.lm_head.weight
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        if targets is None:
            x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
            h_t = teacher_hidden(teacher, x)
        else:
            x, y, h_t = targets[first + micro]
        last = micro == accum - 1
        with (no_sync(model) if not last else contextlib.nullcontext()), autocast:
            loss, _ = model(x, y, h_t, w_t)
            (loss / accum).backward()
        loss_sum += loss.detach() / accum
    return loss_sum


@torch.no_grad()
def logit_stats(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, y: torch.Tensor,
                chunk_tokens: int = 4096) -> torch.Tensor:
    """Means over tokens of [KL(teacher || student), student CE, teacher CE, top-1 agreement], from
    hidden states (B, T, C) and LM heads (V, C), each logit chunk built once (losses.stats_chunk_fn:
    compiled on GPU). y (B, T) next ids."""
    h_s, h_t, y = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1]), y.reshape(-1)
    stats = stats_chunk_fn(h_s.device)
    sums = torch.zeros(4, dtype=torch.float32, device=h_s.device)
    for i in range(0, h_s.shape[0], chunk_tokens):
        sums += stats(h_s[i:i + chunk_tokens] @ w_s.to(h_s.dtype).t(), h_t[i:i + chunk_tokens] @ w_t.to(h_t.dtype).t(),
                      y[i:i + chunk_tokens])
    return sums / h_s.shape[0]


@torch.no_grad()
def batch_stats(student: nn.Module, w_t: torch.Tensor, autocast, chunk_tokens: int, x: torch.Tensor, y: torch.Tensor,
                h_t: torch.Tensor) -> torch.Tensor:
    """logit_stats of the student on one held-out batch (x, y on the device, h_t the teacher's states) -> (4,)."""
    with autocast:
        h_s = student.model(input_ids=x, use_cache=False).last_hidden_state.to(h_t.dtype)
    return logit_stats(h_s, student.lm_head.weight, h_t, w_t, y, chunk_tokens)


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: nn.Module, batches: list, device: torch.device, autocast,
                chunk_tokens: int = 4096, h_teacher: list[torch.Tensor] | None = None, reduce: bool = False,
                stats_fn=None) -> dict:
    """Held-out KL(teacher || student) at temperature 1, both perplexities and top-1 agreement over
    `batches` of (x, y). h_teacher: the teacher's final hidden states per batch, when computed once
    (teacher_targets). Means over ranks when reduce=True (False when each rank scores its own model).
    -> {"val_kl", "val_ppl", "teacher_ppl", "top1_agreement"} (means over batches), plus this rank's
    "val_kl_per_batch" and their "val_kl_std". stats_fn(x, y, h_t): batch_stats of this student in another
    form (select_layers.py's is a graphs.CudaGraphed of it)."""
    was_training = student.training
    student.eval()
    rows = []
    stats_fn = stats_fn or functools.partial(batch_stats, student, teacher.lm_head.weight, autocast, chunk_tokens)
    for j, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        h_t = teacher_hidden(teacher, x) if h_teacher is None else h_teacher[j]
        rows.append(stats_fn(x, y, h_t).clone())  # a replayed graph's output is overwritten by the next batch
    student.train(was_training)
    total = sum(rows) / len(rows)
    if reduce:
        total = all_mean(total)
    kl, ce_s, ce_t, top1 = total.tolist()
    per_batch = [float(r[0]) for r in rows]
    return {"val_kl": kl, "val_ppl": float(torch.tensor(ce_s).exp()), "teacher_ppl": float(torch.tensor(ce_t).exp()),
            "top1_agreement": top1, "val_kl_per_batch": per_batch,
            "val_kl_std": float(torch.tensor(per_batch, dtype=torch.float64).std()) if len(rows) > 1 else 0.0}
