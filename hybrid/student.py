"""Students as artifacts: rebuild one from a checkpoint, or seed a new spec from an earlier stage.

A distill/train checkpoint's `config` holds "teacher" (the normalised teacher dir), "hybrid_spec"
(one mixer name per layer), "mixer_options" (keyword options of the mixers, e.g. a swa window)
and "untied" (whether the LM head was untied from the embeddings),
which is everything needed to rebuild the module tree before loading its `model` state.
"""

import re

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_state_strict
from .surgery import build_student
from .teacher import load_teacher

_ATTN_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.")


def untie_embeddings(model: nn.Module) -> None:
    """Give the LM head its own copy of the embedding matrix (RADLADS found tied embeddings hurt
    distillation); the config says so, so a saved model reloads untied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def seed_from(student: nn.Module, state: dict, state_spec: list[str], spec: list[str]) -> list[int]:
    """Load a checkpoint's student weights into a student of another spec.

    Layers whose mixer matches take the checkpoint's attention weights; layers whose mixer differs
    keep their fresh init (e.g. a layer restored to softmax keeps the teacher's attention).
    Everything outside attention comes from the checkpoint. -> the layers seeded from it.
    """
    own = student.state_dict()
    if len(state_spec) != len(spec):
        raise ValueError(f"checkpoint has {len(state_spec)} layers, the student {len(spec)}: another teacher?")
    seeded = [i for i, (a, b) in enumerate(zip(state_spec, spec)) if a == b]
    merged = {}
    for key, value in own.items():
        m = _ATTN_KEY.match(key)
        if m and state_spec[int(m.group(1))] != spec[int(m.group(1))]:
            merged[key] = value
        elif key in state:
            merged[key] = state[key]
        elif key == "lm_head.weight" and "model.embed_tokens.weight" in state:
            merged[key] = state["model.embed_tokens.weight"]  # untied student from a tied checkpoint
        else:
            raise ValueError(f"checkpoint lacks {key}; was it written for another teacher or mixer?")
    load_state_strict(student, merged, "student")
    return seeded


def load_student(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 models_dir: str = "models") -> tuple[nn.Module, nn.Module, dict]:
    """Checkpoint (.pt or run dir) -> (student, teacher, checkpoint). The teacher is loaded too:
    its weights are the student's backbone before the state dict lands, and callers usually need it."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config", {})
    if "teacher" not in cfg or "hybrid_spec" not in cfg:
        raise ValueError(f"{path}: checkpoint config lacks 'teacher'/'hybrid_spec'; not written by distill.py or train.py")
    teacher, _ = load_teacher(cfg["teacher"], dtype=dtype, device=device, models_dir=models_dir)
    spec = cfg["hybrid_spec"] or ["softmax"] * teacher.config.num_hidden_layers  # train.py on a plain model: None
    student = build_student(teacher, spec, **(cfg.get("mixer_options") or {}))
    if cfg.get("untied"):
        untie_embeddings(student)
    load_state_strict(student, ckpt["model"], f"student ({path})")
    return student.to(device), teacher, ckpt
