"""Script configuration: UPPER_CASE constants at the top of a script, `--name=value` overrides.

    LR = 1e-3                 # in the script
    apply_overrides(globals()) # python distill.py --lr=3e-4

nanoGPT's configurator as a function, without `exec`: only existing names, values parsed with
`ast.literal_eval` (bare words fall back to strings), the default's type is required, typos get a
suggestion. The settings are the constants the script itself assigns in its `# ---` block (read from
its source), never names it imported (select_layers.py --softmax=... is a typo, not a setting).

Scripts call it through hybrid.common.run_script (one-line user errors, interrupts). --help / -h,
handled here, is generated from the same constants block (format_help).
"""

import ast
import difflib
import json
import os
import sys


def script_settings(path: str) -> set[str] | None:
    """The settings a script defines: the UPPER_CASE names its constants block assigns (settings_doc);
    None when the source cannot be read."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError:
        return None
    return {name for name, _, _ in settings_doc(source)[1] if name}


def config_names(g: dict) -> list[str]:
    """The config constants of a script's globals: UPPER_CASE names bound to plain values that the
    script itself defines (see script_settings; a dict without __file__, e.g. in tests, takes all)."""
    own = script_settings(g["__file__"]) if isinstance(g.get("__file__"), str) else None
    return [k for k, v in g.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None), list, tuple))
            and (own is None or k in own)]


def _literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --teacher=models/x is a string


def _parse(raw: str, default, name: str):
    value = _literal(raw)
    inner = raw.strip()[1:-1] if raw.strip()[:1] + raw.strip()[-1:] in ("[]", "()") else raw
    if isinstance(default, (list, tuple)) and isinstance(value, str) and not any(c in inner for c in "[]()"):
        # bare words in a flat list, as a shell passes them: --batches=[32,max] is [32, 'max']
        value = [_literal(item.strip()) for item in inner.split(",") if item.strip()]
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
    if "--help" in argv or "-h" in argv:
        print_help_and_exit(g)
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


def config_dict(g: dict) -> dict:
    """The resolved config of a script, JSON-serialisable, for logs and checkpoints."""
    return {k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in config_names(g)}


def dumps(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- --help
def settings_doc(source: str) -> tuple[str, list[tuple[str, str, str]]]:
    """Read a script's source -> (docstring, rows). The constants block (between the first two
    `# ----` lines; the whole module when there are none) is the documentation: each row is
    (name, default as written, trailing comment), or ("", heading, "") for a `# Heading` line.
    """
    import io
    import tokenize
    tree = ast.parse(source)
    lines = source.splitlines()
    rules = [i + 1 for i, line in enumerate(lines) if line.startswith("# ---")]
    first, last = (rules[0], rules[1]) if len(rules) >= 2 else (0, len(lines) + 1)
    comments = {}  # line number -> (comment text, whole line is a comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and first < tok.start[0] < last:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.start[1] == 0)
    rows = []
    for node in tree.body:
        if first < node.lineno < last and isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            text, _ = comments.get(node.end_lineno, ("", False))
            rows.append((node.lineno, node.targets[0].id, ast.get_source_segment(source, node.value), text))
    rows += [(n, "", text, "") for n, (text, whole) in comments.items() if whole and text]
    return ast.get_docstring(tree) or "", [r[1:] for r in sorted(rows)]


def _shell_value(value) -> str:
    """A value as it would be typed after --name= in a shell."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) and len(value) > 1 else str(value)
    if isinstance(value, (list, tuple)):
        text = f"[{text}]"
    return text if text and all(c.isalnum() or c in "._-/,:[]+" for c in text) else repr(text)


def format_help(script: str, source: str, g: dict) -> str:
    """The --help text of a script: its docstring's summary, usage, and every setting of the
    constants block with its default (as written and, where it differs, as evaluated) and comment."""
    doc, rows = settings_doc(source)
    summary = doc.split("\n\n")[0].replace("\n", " ")
    name = script if script.endswith(".py") else script + ".py"
    out = [f"{name}: {summary}", "", f"usage: python {name} [--name=value ...]   (names are the settings below, "
           "any case; values are Python literals or bare words)", ""]
    for setting, written, comment in rows:
        if not setting:
            if out[-1].startswith("  --"):  # a blank line between groups
                out.append("")
            out.append(written)
            continue
        default = _shell_value(g[setting]) if setting in g else written
        shown = f"--{setting.lower()}={default}"
        if written is not None and written not in (default, repr(g.get(setting))) and len(written) < 30 \
                and not written.startswith(("[", "(", "\"", "'")):
            comment = f"[{written}] {comment}".strip()
        out.append(f"  {shown:<34} {comment}".rstrip())
    launch = doc.split("\nLaunch", 1)
    if len(launch) == 2:
        out += ["", "Launch" + launch[1].split("\n\n")[0].split("\nReads")[0].split("\nLog line")[0]]
    return "\n".join(out) + "\n"


def print_help_and_exit(g: dict) -> None:
    """--help / -h: print format_help for the script whose globals are g, exit 0 (nothing loaded yet)."""
    path = g.get("__file__") or ""
    if path.endswith(".py") and os.path.isfile(path):
        with open(path) as f:
            source = f.read()
    else:  # no source to read (an interactive session): the names and defaults alone
        source = "# ---\n" + "".join(f"{k} = {g[k]!r}\n" for k in config_names(g)) + "# ---\n"
    sys.stdout.write(format_help(os.path.basename(path) or "script", source, g))
    sys.exit(0)
