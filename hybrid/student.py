"""The student as an artifact: what defines one, the one place that rebuilds it, seeding a new spec.

    art = Artifact.from_config(ckpt["config"], path)   # any checkpoint config (old shapes too) or export config.json
    student = rebuild_student(art, teacher)            # surgery on the teacher model, untied head if recorded
    student, tokenizer, art = load_student("runs/distill")   # .pt, run dir or export folder

A checkpoint's `config` is written in one shape, `art.to_config(settings)`: the artifact fields at
the top level (teacher, hybrid_spec, mixer_options, untied, target, stage, stage1_mode) and the
script's resolved settings under "settings". Older checkpoints still load: distill.py kept its
settings under "resolved", train.py at the top level beside the artifact fields.
"""

import copy
import dataclasses
import json
import os
import re

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_state_strict
from .model.spec import check_options
from .surgery import build_student
from .teacher import load_teacher

_ATTN_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.")
TARGETS = ("layer", "attn")  # stage-1 MSE on decoder-layer outputs or on attention outputs

# transformers 5's AutoTokenizer reads a folder's config.json before the tokenizer files, and an
# export's config names custom code (auto_map.AutoConfig, needed by AutoModelForCausalLM): without
# trust_remote_code it stops at "Do you wish to run the custom code? [y/N]" for 15 s. export.py also
# writes the tokenizer files alone into this subfolder, which has no config.json and nothing to ask.
EXPORT_TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True)
class Artifact:
    """Everything needed to rebuild a student's module tree before its weights land."""
    teacher: str                        # the normalised teacher folder (its weights are the backbone)
    hybrid_spec: list[str] | None       # one mixer name per layer; None = the plain teacher (train.py)
    mixer_options: dict = dataclasses.field(default_factory=dict)  # keyword options of the mixers
    untied: bool = False                # the LM head has its own weights (stage 2 --untie_embeddings)
    target: str = "layer"               # what stage 1 aligned: "layer" or "attn" outputs
    stage: int | None = None            # the distill stage that wrote it (None: train.py)
    stage1_mode: str | None = None      # "rotation" | "all" for a stage-1 checkpoint

    def __post_init__(self):
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"artifact teacher {self.teacher!r}: expected the teacher folder")
        if self.hybrid_spec is not None and not all(isinstance(n, str) for n in self.hybrid_spec):
            raise ValueError(f"artifact hybrid_spec {self.hybrid_spec!r}: expected one mixer name per layer")
        if self.target not in TARGETS:
            raise ValueError(f"artifact target {self.target!r}: expected one of {TARGETS}")
        check_options(self.mixer_options)

    @classmethod
    def from_config(cls, cfg: dict, where: str = "checkpoint") -> "Artifact":
        """From a checkpoint `config` (this shape, or distill's/train.py's older ones) or an export's config.json."""
        exported = isinstance(cfg, dict) and "hybrid_options" in cfg
        if not exported and (not isinstance(cfg, dict) or "teacher" not in cfg or "hybrid_spec" not in cfg):
            keys = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
            raise ValueError(f"{where}: not a student checkpoint: its config (keys {keys}) lacks 'teacher' or "
                             "'hybrid_spec'; expected one written by "
                             "distill.py or train.py ({'model', 'config': {'teacher', 'hybrid_spec', ...}}) or an "
                             "export folder from export.py")
        if exported:  # an export's config.json: the folder is its own backbone
            return cls(teacher=cfg.get("teacher") or where, hybrid_spec=list(cfg["hybrid_spec"]),
                       mixer_options=dict(cfg["hybrid_options"]), untied=not cfg.get("tie_word_embeddings", True))
        settings = cfg.get("settings") or cfg.get("resolved") or cfg  # train.py's old shape: settings at the top
        spec = cfg.get("hybrid_spec")
        return cls(teacher=cfg["teacher"], hybrid_spec=list(spec) if spec else None,
                   mixer_options=dict(cfg.get("mixer_options") or {}), untied=bool(cfg.get("untied")),
                   target=cfg.get("target") or settings.get("TARGET") or "layer", stage=cfg.get("stage"),
                   stage1_mode=cfg.get("stage1_mode"))

    def replace(self, **changes) -> "Artifact":
        return dataclasses.replace(self, **changes)

    def to_config(self, settings: dict) -> dict:
        """The one shape of a checkpoint's `config`: these fields, and the script's settings."""
        return {**dataclasses.asdict(self), "settings": settings}


def untie_embeddings(model: nn.Module) -> None:
    """Give the LM head its own copy of the embedding matrix (RADLADS found tied embeddings hurt
    distillation); the config says so, so a saved model reloads untied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def rebuild_student(art: Artifact, teacher: nn.Module) -> nn.Module:
    """The student's module tree for `art` on the teacher model (not modified): the spec's mixers
    initialised from the teacher (build_student: only mixers trainable), the head untied if recorded.
    A plain artifact (hybrid_spec None) gives a copy of the teacher."""
    student = build_student(teacher, art.hybrid_spec, **art.mixer_options) if art.hybrid_spec else copy.deepcopy(teacher)
    if art.untied:
        untie_embeddings(student)
    return student


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


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "modeling_hybrid.py"))


def check_export_dir(path: str) -> None:
    """Clear errors for a folder that is not an export (before transformers gives a vaguer one)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder; create an export with `python export.py --out_dir={path}`")
    missing = [f for f in ("config.json", "model.safetensors", "modeling_hybrid.py", "mixers.py")
               if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path}: missing {missing}; not a complete hybrid export, re-run "
                                f"`python export.py --out_dir={path}`")


def load_export(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """-> (model, tokenizer) from an export folder, through transformers' remote-code loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_export_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(device).eval()
    tok_dir = os.path.join(path, EXPORT_TOKENIZER_DIR)  # absent in exports written before it existed
    return model, AutoTokenizer.from_pretrained(tok_dir if os.path.isdir(tok_dir) else path, trust_remote_code=True)


def load_student(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 models_dir: str = "models", teacher: str = "") -> tuple[nn.Module, object, Artifact]:
    """A checkpoint (.pt or run dir) or an export folder -> (student in eval mode, tokenizer, artifact).

    A checkpoint's student is rebuilt on the teacher's weights (its backbone) before the state dict
    lands; `teacher` overrides the teacher folder recorded in it (e.g. on another machine)."""
    if os.path.isdir(path) and is_export(path):
        model, tokenizer = load_export(path, dtype=dtype, device=device)
        with open(os.path.join(path, "config.json")) as f:
            return model, tokenizer, Artifact.from_config(json.load(f), path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a student checkpoint (no 'model'); expected one written by distill.py or train.py")
    art = Artifact.from_config(ckpt.get("config"), path)
    if teacher:
        art = art.replace(teacher=teacher)
    elif not os.path.isdir(art.teacher):
        raise FileNotFoundError(f"{path}: its teacher folder {art.teacher!r} does not exist here; pass "
                                "--teacher=<HF folder of the same teacher> (or run prepare/distill on this machine)")
    base, tokenizer = load_teacher(art.teacher, dtype=dtype, device="cpu", models_dir=models_dir)
    student = rebuild_student(art, base)
    load_state_strict(student, ckpt["model"], f"student ({path})")
    return student.to(device).eval(), tokenizer, art
