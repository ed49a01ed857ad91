"""Students as artifacts: rebuild one from a checkpoint, or seed a new spec from an earlier stage.

A distill/train checkpoint's `config` holds "teacher" (the normalised teacher dir), "hybrid_spec"
(one mixer name per layer), "mixer_options" (keyword options of the mixers, e.g. a swa window)
and "untied" (whether the LM head was untied from the embeddings),
which is everything needed to rebuild the module tree before loading its `model` state.
"""

import os
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
                 models_dir: str = "models", teacher: str = "") -> tuple[nn.Module, object, dict]:
    """Checkpoint (.pt or run dir) -> (student in eval mode, the teacher's tokenizer, checkpoint).

    The student is rebuilt on the teacher's weights (its backbone) before the state dict lands;
    `teacher` overrides the teacher folder recorded in the checkpoint (e.g. on another machine)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    missing = [k for k in ("teacher", "hybrid_spec") if not isinstance(cfg, dict) or k not in cfg]
    if missing or "model" not in ckpt:
        raise ValueError(f"{path}: not a student checkpoint: its config lacks {missing or ['model']}; expected one "
                         "written by distill.py or train.py ({'model', 'config': {'teacher', 'hybrid_spec', ...}})")
    if not teacher and not os.path.isdir(cfg["teacher"]):
        raise FileNotFoundError(f"{path}: its teacher folder {cfg['teacher']!r} does not exist here; pass "
                                "--teacher=<HF folder of the same teacher> (or run prepare/distill on this machine)")
    base, tokenizer = load_teacher(teacher or cfg["teacher"], dtype=dtype, device="cpu", models_dir=models_dir)
    spec = cfg["hybrid_spec"] or ["softmax"] * base.config.num_hidden_layers  # train.py on a plain model: None
    student = build_student(base, spec, **(cfg.get("mixer_options") or {}))
    if cfg.get("untied"):
        untie_embeddings(student)
    load_state_strict(student, ckpt["model"], f"student ({path})")
    return student.to(device).eval(), tokenizer, ckpt
