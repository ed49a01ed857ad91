"""HF surgery: find the decoder layers, swap `self_attn` for student mixers, track the hybrid spec.

    spec = parse_spec("gdn;softmax=3,7", n_layers=len(decoder_layers(teacher)))
    student = build_student(teacher, spec)        # deep copy; mixers initialised from the teacher
    opt = AdamW([{"params": mixer_parameters(student), "lr": 1e-3}, ...])

A hybrid spec is one name per layer: a key of mixers.MIXERS ("gdn", "gla", "rwkv7", "swa") or
"softmax" (the teacher's own attention module, kept as is). The spec of a model is read from its
modules (`model_spec`) and mirrored in `model.config.hybrid_spec` after every change, so it is
saved with the config (checkpoints, exports). Works on any HF decoder whose layers are
`model.model.layers[i]` with `self_attn.{q,k,v,o}_proj`; nothing here imports transformers.
"""

import copy
import json
import os

from torch import nn

from .model.spec import SOFTMAX, install_mixers, parse_spec, with_softmax

SUPPORTED = "Llama, SmolLM2, Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm) style decoders"
LOOKED_FOR = "model.model.layers[i].self_attn.{q,k,v,o}_proj"


def spec_file(spec: str) -> tuple[str, str]:
    """(the selection.json a spec names, the method after its ":" or ""); ("", "") for a plain spec."""
    path, sep, method = spec.partition(".json:")
    if sep:
        return path + ".json", method
    return (spec, "") if spec.endswith(".json") else ("", "")


def read_spec(spec: str, n_layers: int) -> list[str]:
    """parse_spec, where `spec` may also name a selection.json from select_layers.py: its "chosen_spec",
    or with ":<method>" appended (selection.json:uniform) that method's top-K layers at the selection's
    softmax fraction turned softmax in its stage-1 spec (the comparison arms of one selection), or
    with ":<method>@<K>" its top K (K softmax layers: the K lever; uniform: K evenly spread)."""
    path, method = spec_file(spec)
    if not path:
        return parse_spec(spec, n_layers)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--spec={spec}: no such file; run select_layers.py first or pass a spec "
                                "like 'gdn;softmax=3,7'")
    with open(path) as f:
        sel = json.load(f)
    if not method:
        if sel.get("chosen_spec") is None:
            raise ValueError(f"--spec={spec}: no 'chosen_spec' in it; expected a selection.json of select_layers.py")
        return parse_spec(sel["chosen_spec"], n_layers)
    method, _, k = method.partition("@")
    if k and not (k.isdigit() and 0 < int(k) <= len(sel.get("candidates", []))):
        raise ValueError(f"--spec={spec}: K={k!r} after '@'; expected a number of softmax layers from 1 to the "
                         f"{len(sel.get('candidates', []))} candidates of {path}")
    methods = sel.get("methods", {})
    k = k or str(sel.get("k_fraction"))
    top = methods.get(method, {}).get("top", {}).get(k)
    if top is None and method in methods:  # a K the selection did not list: from the method's ranking
        from .selection import top_k, uniform_layers  # here: selection.py imports this module
        ranking = methods[method].get("ranking")
        top = uniform_layers(sel["candidates"], int(k)) if method == "uniform" else (
            top_k(ranking, int(k)) if ranking else None)
    if top is None:
        raise ValueError(f"--spec={spec}: {path} has no top-{k} set for method {method!r}; "
                         f"it has: {', '.join(sorted(methods)) or 'none'}")
    return with_softmax(parse_spec(sel["stage1_spec"], n_layers), top)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """model.model.layers, checked: every layer has a self_attn with q/k/v/o projections."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        all(hasattr(getattr(layer, "self_attn", None), p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        for layer in layers)
    if not ok:
        raise ValueError(f"{type(model).__name__}: no decoder layers at {LOOKED_FOR}; "
                         f"supported: {SUPPORTED}. Load a causal-LM model (AutoModelForCausalLM) of such a family.")
    return layers


def model_spec(model: nn.Module) -> list[str]:
    """The per-layer spec of a model, read from its modules ("softmax" for a non-mixer self_attn)."""
    return [getattr(layer.self_attn, "mixer_name", SOFTMAX) for layer in decoder_layers(model)]


def _record_spec(model: nn.Module) -> None:
    if getattr(model, "config", None) is not None:
        model.config.hybrid_spec = model_spec(model)


def swap_attention(model: nn.Module, idx: int, module: nn.Module) -> nn.Module:
    """Put `module` in layer idx as self_attn; returns the module it replaces."""
    layers = decoder_layers(model)
    if not 0 <= idx < len(layers):
        raise ValueError(f"swap_attention: layer {idx} out of range for {len(layers)} layers")
    old = layers[idx].self_attn
    layers[idx].self_attn = module
    _record_spec(model)
    return old


def build_student(teacher: nn.Module, spec: str | list[str], **options) -> nn.Module:
    """A deep copy of the teacher with layer i's self_attn replaced by build_mixer(spec[i], ...)
    ("softmax" keeps the copied teacher attention). The teacher is not modified. Trainable set on
    return: exactly the mixer parameters (requires_grad True); everything else is frozen, which is
    what stage 1 wants; stage 2 calls student.requires_grad_(True). options go to every mixer of
    a kind that accepts them, e.g. window=1024 for swa (see mixers.build_mixer)."""
    names = parse_spec(spec, len(decoder_layers(teacher)))
    student = copy.deepcopy(teacher)
    student.requires_grad_(False)
    for mixer in install_mixers(decoder_layers(student), names, student.config, options):
        mixer.requires_grad_(True)
    _record_spec(student)
    return student


def mixer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the non-softmax mixers (their own LR group), teacher-copied q/k/v/o included."""
    return [p for layer in decoder_layers(model) if hasattr(layer.self_attn, "mixer_name")
            for p in layer.self_attn.parameters()]
