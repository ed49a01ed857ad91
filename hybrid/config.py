"""Script configuration: UPPER_CASE constants at the top of a script, `--name=value` overrides.

    LR = 1e-3                 # in the script
    apply_overrides(globals()) # python distill.py --lr=3e-4

nanoGPT's configurator as a function, without `exec`: only existing names, values parsed with
`ast.literal_eval` (bare words fall back to strings), the default's type is required, typos get a
suggestion.
"""

import ast
import difflib
import json
import sys


def config_names(g: dict) -> list[str]:
    """The config constants of a script's globals: UPPER_CASE names bound to plain values."""
    return [k for k, v in g.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None), list, tuple))]


def _parse(raw: str, default, name: str):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as --teacher=models/x is a string
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"--{name.lower()}={raw}: expected True/False (the default is {default!r})")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return raw  # --layers=0,4 parses as a tuple; the default says it is a string
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (int, float)):
        return type(default)([value])
    if type(value) is not type(default):
        raise ValueError(f"--{name.lower()}={raw}: expected {type(default).__name__} "
                         f"like the default {default!r}, got {type(value).__name__}")
    return value


def apply_overrides(g: dict, argv: list[str] | None = None, verbose: bool = True) -> dict:
    """Apply `--name=value` arguments to the UPPER_CASE constants in `g` (a script's globals()).

    Returns the overrides applied. Raises ValueError for an unknown name (with a suggestion), a
    malformed argument, or a value whose type does not match the default.
    """
    argv = sys.argv[1:] if argv is None else argv
    names = config_names(g)
    applied = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"bad argument {arg!r}: expected --name=value (settings: "
                             f"{', '.join(n.lower() for n in names)})")
        key, raw = arg[2:].split("=", 1)
        name = key.upper().replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"; did you mean --{close[0].lower()}?" if close else ""
            raise ValueError(f"unknown setting --{key}{hint} (settings: {', '.join(n.lower() for n in names)})")
        g[name] = applied[name] = _parse(raw, g[name], name)
        if verbose:
            print(f"override: {name} = {g[name]!r}")
    return applied


def config_dict(g: dict) -> dict:
    """The resolved config of a script, JSON-serialisable, for logs and checkpoints."""
    return {k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in config_names(g)}


def dumps(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True)
