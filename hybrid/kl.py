"""Full-model logit distillation pieces shared by distill.py (stage 2) and select_layers.py."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .losses import chunked_distill_loss
from .surgery import mixer_parameters
from .train_loop import all_mean


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
    """AdamW groups for stage 2: mixer parameters at lr_mixer, everything else at lr_other; each
    group keeps its `base_lr` for the schedule to scale."""
    mixer_ids = {id(p) for p in mixer_parameters(student)}
    groups = [{"params": [p for p in student.parameters() if id(p) in mixer_ids], "base_lr": lr_mixer},
              {"params": [p for p in student.parameters() if id(p) not in mixer_ids], "base_lr": lr_other}]
    return [g for g in groups if g["params"]]


def accumulate_kl(model: nn.Module, teacher: nn.Module, loader, accum: int, device: torch.device,
                  autocast) -> torch.Tensor:
    """`accum` micro-steps of the KL forward + backward on `model` (a KLStudent, maybe under DDP:
    then grads sync on the last micro-step only), loss scaled by 1/accum; -> the mean loss, detached."""
    w_t = teacher.lm_head.weight
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        h_t = teacher_hidden(teacher, x)
        last = micro == accum - 1
        with (model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()), autocast:
            loss, _ = model(x, y, h_t, w_t)
            (loss / accum).backward()
        loss_sum += loss.detach() / accum
    return loss_sum


@torch.no_grad()
def teacher_hidden(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, C) the teacher's final hidden states (after its final norm)."""
    # no KV cache (HF builds one by default): it costs memory, and a compiled layer specialises on its state
    return teacher.model(input_ids=x, use_cache=False).last_hidden_state


@torch.no_grad()
def logit_stats(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, y: torch.Tensor,
                chunk_tokens: int = 4096) -> torch.Tensor:
    """Means over tokens of [KL(teacher || student), student CE, teacher CE, top-1 agreement], from
    hidden states (B, T, C) and LM heads (V, C), each logit chunk built once. y (B, T) next ids."""
    h_s, h_t, y = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1]), y.reshape(-1)
    sums = torch.zeros(4, dtype=torch.float32, device=h_s.device)
    for i in range(0, h_s.shape[0], chunk_tokens):
        log_ps = F.log_softmax((h_s[i:i + chunk_tokens] @ w_s.to(h_s.dtype).t()).float(), dim=-1)
        log_pt = F.log_softmax((h_t[i:i + chunk_tokens] @ w_t.to(h_t.dtype).t()).float(), dim=-1)
        tgt = y[i:i + chunk_tokens, None]
        sums += torch.stack([(log_pt.exp() * (log_pt - log_ps)).sum(), -log_ps.gather(1, tgt).sum(),
                             -log_pt.gather(1, tgt).sum(), (log_ps.argmax(-1) == log_pt.argmax(-1)).sum().float()])
    return sums / h_s.shape[0]


@torch.no_grad()
def evaluate_kl(teacher: nn.Module, student: nn.Module, batches: list, device: torch.device, autocast,
                chunk_tokens: int = 4096, reduce: bool = True) -> dict:
    """Held-out KL(teacher || student) at temperature 1 and both perplexities over `batches` of
    (x, y); averaged over ranks when reduce=True (set False when each rank scores its own model)."""
    was_training = student.training
    student.eval()
    total = torch.zeros(4, device=device)
    w_t = teacher.lm_head.weight
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        h_t = teacher_hidden(teacher, x)
        with autocast:
            h_s = student.model(input_ids=x, use_cache=False).last_hidden_state.to(h_t.dtype)
        total += logit_stats(h_s, student.lm_head.weight, h_t, w_t, y, chunk_tokens)
    student.train(was_training)
    total /= len(batches)
    if reduce:
        total = all_mean(total)
    kl, ce_s, ce_t, top1 = total.tolist()
    return {"val_kl": kl, "val_ppl": float(torch.tensor(ce_s).exp()), "teacher_ppl": float(torch.tensor(ce_t).exp()),
            "top1_agreement": top1}
