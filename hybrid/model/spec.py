"""Hybrid specs: one mixer name per layer, and the one function that builds a layer stack from one.

    names = parse_spec("gdn;softmax=3,7", n_layers=30)
    install_mixers(layers, names, config, {"window": 512})  # layers[i].self_attn -> mixer (or kept)

A name is a key of mixers.MIXERS ("gdn", "gla", "rwkv7", "swa") or "softmax" (the teacher's own
attention module, kept as is). Surgery on a teacher (hybrid/surgery.py) and the export's model
class (modeling_hybrid.py) both call `install_mixers`, so a student and its export are built by
the same code. Imports only torch and mixers.py: export.py copies this file into the export.
"""

import inspect

from torch import nn

from .mixers import MIXERS, build_mixer

SOFTMAX = "softmax"  # the teacher's own attention, kept


def mixer_names() -> list[str]:
    return sorted(MIXERS) + [SOFTMAX]


def check_names(names: list[str], where: str) -> list[str]:
    bad = [n for n in names if n not in mixer_names()]
    if bad:
        raise ValueError(f"hybrid spec {where!r}: unknown mixer name(s) {bad}; expected one of {mixer_names()}")
    return names


def check_spec(spec: list[str], n_layers: int, where: str = "hybrid_spec") -> list[str]:
    """A list of names, one per layer, each known."""
    if len(spec) != n_layers:
        raise ValueError(f"{where} has {len(spec)} names for num_hidden_layers={n_layers}; expected one mixer name "
                         "per layer")
    return check_names(list(spec), where)


def with_softmax(base: list[str], layers) -> list[str]:
    """base spec with `layers` turned to softmax."""
    return [SOFTMAX if i in set(layers) else name for i, name in enumerate(base)]


def parse_spec(spec: str | list[str], n_layers: int) -> list[str]:
    """One mixer name per layer from
      "gdn"                      every layer gdn
      "gdn,softmax,gdn,gdn"      one name per layer (exactly n_layers of them)
      "gdn;softmax=3,7;swa=0"    a default, then name=layer indices exceptions
      ["gdn", "softmax", ...]    a list, already one per layer."""
    if isinstance(spec, (list, tuple)):
        names = [str(s).strip() for s in spec]
        if len(names) != n_layers:
            raise ValueError(f"hybrid spec {names}: {len(names)} names for {n_layers} layers; give one per layer")
        return check_names(names, str(spec))
    text = str(spec).replace(" ", "")
    parts = text.split(";")
    if len(parts) == 1 and "=" not in text:
        names = text.split(",")
        if len(names) == 1:
            return check_names(names * n_layers, text)
        if len(names) != n_layers:
            raise ValueError(f"hybrid spec {text!r}: {len(names)} names for {n_layers} layers; give one per "
                             "layer, a single name, or 'default;name=i,j' (e.g. 'gdn;softmax=3,7')")
        return check_names(names, text)
    default, exceptions = parts[0], parts[1:]
    if "=" in default or not default:
        raise ValueError(f"hybrid spec {text!r}: expected a default name first, e.g. 'gdn;softmax=3,7'")
    names = [default] * n_layers
    seen: dict[int, str] = {}
    for part in exceptions:
        name, _, idx = part.partition("=")
        try:
            indices = [int(i) for i in idx.split(",") if i]
        except ValueError:
            raise ValueError(f"hybrid spec {text!r}: bad layer list in {part!r}; expected e.g. 'softmax=3,7'") from None
        if not name or not indices:
            raise ValueError(f"hybrid spec {text!r}: bad exception {part!r}; expected name=i,j e.g. 'softmax=3,7'")
        for i in indices:
            if not 0 <= i < n_layers:
                raise ValueError(f"hybrid spec {text!r}: layer {i} out of range for {n_layers} layers (0..{n_layers - 1})")
            if i in seen:
                raise ValueError(f"hybrid spec {text!r}: layer {i} is named twice ({seen[i]}, {name}); name each layer once")
            seen[i] = name
            names[i] = name
    return check_names(names, text)


def accepted_options(name: str) -> list[str]:
    """The keyword options mixer `name`'s constructor takes (beyond the teacher attention, config, index)."""
    params = list(inspect.signature(MIXERS[name].__init__).parameters)
    return [p for p in params if p not in ("self", "teacher_attn", "config", "layer_idx")]


def check_options(options: dict) -> dict:
    """Every option must be taken by some mixer; a typo is an error naming what each mixer accepts."""
    known = {name: accepted_options(name) for name in sorted(MIXERS)}
    unknown = sorted(k for k in options if not any(k in acc for acc in known.values()))
    if unknown:
        listing = "; ".join(f"{n}: {', '.join(acc) or '(none)'}" for n, acc in known.items())
        raise ValueError(f"mixer option(s) {unknown} are taken by no mixer; accepted options are {listing}")
    return dict(options)


def options_for(name: str, options: dict) -> dict:
    """The subset of `options` that mixer `name` takes (options are shared by all layers)."""
    accepted = accepted_options(name)
    return {k: v for k, v in options.items() if k in accepted}


def install_mixers(layers: nn.ModuleList, spec: list[str], config, options: dict | None = None) -> list[nn.Module]:
    """Replace layers[i].self_attn by build_mixer(spec[i], ...) wherever spec[i] is not softmax (the
    mixer is initialised from the attention it replaces). -> the new mixers, in layer order."""
    check_spec(spec, len(layers))
    options = check_options(options or {})
    mixers = []
    for i, name in enumerate(spec):
        if name != SOFTMAX:
            layers[i].self_attn = build_mixer(name, layers[i].self_attn, config, i, **options_for(name, options))
            mixers.append(layers[i].self_attn)
    return mixers
