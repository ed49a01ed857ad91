"""Script configuration: UPPER_CASE constants at the top of a script, `--name=value` overrides.

    LR = 1e-3                 # in the script
    apply_overrides(globals()) # python distill.py --lr=3e-4

nanoGPT's configurator as a function, without `exec`: only existing names, values parsed with
`ast.literal_eval` (bare words fall back to strings), the default's type is required, typos get a
suggestion. The settings are the constants the script itself assigns in its `# ---` block (read from
its source), never names it imported (select_layers.py --softmax=... is a typo, not a setting).

    if __name__ == "__main__":
        run_script(globals(), main)   # overrides, then main(); a user error is one line and exit 2
"""

import ast
import difflib
import json
import os
import sys
import traceback

_RULE = "# " + "-" * 20  # the lines that open and close a script's settings block
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_settings(path: str) -> set[str] | None:
    """UPPER_CASE names a script assigns at its top level, inside its `# -----` block when it has one;
    None when the source cannot be read."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError:
        return None
    rules = [n for n, line in enumerate(source.splitlines(), 1) if line.startswith(_RULE)]
    lo, hi = (rules[0], rules[1]) if len(rules) >= 2 else (0, float("inf"))
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        else:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and lo < node.lineno < hi:
                names.add(t.id)
    return names


def config_names(g: dict) -> list[str]:
    """The config constants of a script's globals: UPPER_CASE names bound to plain values that the
    script itself defines (see script_settings; a dict without __file__, e.g. in tests, takes all)."""
    own = script_settings(g["__file__"]) if isinstance(g.get("__file__"), str) else None
    return [k for k, v in g.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None), list, tuple))
            and (own is None or k in own)]


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


def check_choice(name: str, value, allowed: tuple) -> None:
    """ValueError unless value is one of allowed: `--stage=3: expected one of 1, 2`."""
    if value not in allowed:
        raise ValueError(f"--{name}={value}: expected one of {', '.join(map(str, allowed))}")


def _raised_by_us(e: BaseException) -> bool:
    """True when the innermost frame of e's traceback is this repo's code (not a library's)."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_REPO + os.sep) \
        and f"{os.sep}.venv{os.sep}" not in frames[-1].filename


def run_script(g: dict, main, argv: list[str] | None = None) -> None:
    """A script's entry point: apply_overrides(g, argv), then main(). A ValueError or FileNotFoundError
    raised by this repo's code is a user error (a bad setting, a missing file): one line on stderr
    (rank 0 only under torchrun; every rank exits) and exit status 2, not a traceback. Errors raised
    inside libraries keep their traceback: they may be bugs."""
    try:
        apply_overrides(g, argv)
        main()
    except (ValueError, FileNotFoundError) as e:
        if not _raised_by_us(e):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def config_dict(g: dict) -> dict:
    """The resolved config of a script, JSON-serialisable, for logs and checkpoints."""
    return {k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in config_names(g)}


def dumps(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True)
