"""Text of roff man pages written with the man(7) or mdoc(7) macros, without groff.

Section headings on their own lines, paragraphs filled, displays (.nf/.EX/.Bd) and tbl tables kept line
by line, escapes mapped to characters, comments, macro definitions and page headers dropped. Used by
hybrid/corpus.py for the offline Debian corpus (Linux, FreeBSD and OpenSSL man pages).
"""

import re
import shlex

from .markup import tidy

_ROFF_GLYPHS = {"em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
                "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
                "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260",
                "->": "\u2192", "<-": "\u2190", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "ba": "|",
                "sl": "/", "Fo": "\u00ab", "Fc": "\u00bb", "de": "\u00b0", "Lq": "\u201c", "Rq": "\u201d",
                "R": "\u00ae", "Tm": "\u2122"}
_ROFF_ESCAPE = re.compile(r"\\(\((..)|\[([^\]]*)\]|\*(\(..|\[[^\]]*\]|.)|[fFgkmnV](\(..|\[[^\]]*\]|.)"
                          r"|s[+-]?(\d|\(\d\d|\[\d+\])|[hvwlLNoDbxXYZHSAR]'[^']*'|.)")
# mdoc macros that print their arguments as they are (the macro name itself is dropped)
_MDOC_PLAIN = set("Ad An Ar Cd Cm Dv Em Er Ev Fa Fd Fr Ft Ic In Lb Li Ms Mt Nd No Ns Pa Sy Tn Ux Va Vt Ql Dq Sq Pq "
                  "Qq Op Oo Oc Ao Ac Bo Bc Do Dc Po Pc Qo Qc So Sc Xo Xc Bq Brq Bro Brc Eo Ec Aq Bx Ox Nx Fx Bsx "
                  "Dx At St Fo Fc Lk Ta Pf Sm Es En Ef Ek Ot Ap Ud Rv Ex %A %B %D %I %J %N %O %P %Q %R %T %U %V "
                  "Fn Fl Xr Nm".split())
_MDOC_QUOTES = {"Dq": ("\u201c", "\u201d"), "Sq": ("\u2018", "\u2019"), "Pq": ("(", ")"), "Qq": ('"', '"'),
                "Op": ("[", "]"), "Bq": ("[", "]"), "Aq": ("<", ">"), "Brq": ("{", "}")}
_MDOC_OPEN = {"Oo": "[", "Bo": "[", "Do": "\u201c", "Po": "(", "Qo": '"', "So": "\u2018", "Ao": "<", "Bro": "{"}
_MDOC_CLOSE = {"Oc": "]", "Bc": "]", "Dc": "\u201d", "Pc": ")", "Qc": '"', "Sc": "\u2019", "Ac": ">", "Brc": "}"}
_MDOC_NAMES = {"Bx": "BSD", "Ox": "OpenBSD", "Nx": "NetBSD", "Fx": "FreeBSD", "Bsx": "BSD/OS", "Dx": "DragonFly",
               "Ux": "UNIX", "At": "AT&T UNIX"}
_MDOC_TEXT = _MDOC_PLAIN | set(_MDOC_QUOTES) | set(_MDOC_OPEN) | set(_MDOC_CLOSE) | set(_MDOC_NAMES)
_DELIMS = set(".,:;)]?!")
_SECTION = {"SH", "SS", "Sh", "Ss"}
_BREAK = {"PP", "P", "LP", "Pp", "Lp", "sp", "br", "TP", "IP", "HP", "TQ", "RS", "RE", "Bl", "El", "It", "Rs", "Re",
          "D1", "Dl", "in", "ti"}
_ITEMS = {"It", "TP", "IP", "TQ", "D1", "Dl"}  # a list item or a one-line display starts a new line
_MDOC_ITEMS = {"It", "D1", "Dl"}  # ... with its text on the macro line
_NOFILL_START, _NOFILL_END = {"nf", "EX", "Bd", "TS"}, {"fi", "EE", "Ed", "TE"}
_FONT = {"B", "I", "R", "SM", "SB", "BR", "RB", "BI", "IB", "IR", "RI"}


def _roff_escapes(s: str) -> str:
    def sub(m: re.Match) -> str:
        whole = m.group(1)
        if m.group(2):
            return _ROFF_GLYPHS.get(m.group(2), "")
        if m.group(3) is not None:
            name = m.group(3)
            return _ROFF_GLYPHS.get(name, chr(int(name[1:], 16)) if re.fullmatch(r"u[0-9A-F]{4,5}", name) else "")
        if m.group(4):
            return {"(lq": "\u201c", "(rq": "\u201d", "R": "\u00ae", "(Tm": "\u2122"}.get(m.group(4), "")
        return {"-": "-", "e": "\\", "\\": "\\", "~": " ", " ": " ", "0": " ", "'": "'", "`": "`", ".": ".",
                "t": "\t", "(": "", "|": "", "^": "", "&": "", "%": "", "c": "", ":": "", "/": "", ",": "",
                "}": "", "{": "", "\n": ""}.get(whole, "")
    return _ROFF_ESCAPE.sub(sub, s)


def _mdoc_args(macro: str, args: list[str]) -> str:
    """The text an mdoc macro line prints: nested macro names dropped, delimiters attached, Fl/Xr/quotes."""
    out, attach, i = [], False, 0
    pending_close = []
    tokens = [macro] + args
    while i < len(tokens):
        t = tokens[i]
        i += 1
        if t in _MDOC_QUOTES:
            o, c = _MDOC_QUOTES[t]
            out.append(o)
            attach = True
            pending_close.append(c)
            continue
        if t in _MDOC_OPEN:
            out.append(_MDOC_OPEN[t])
            attach = True
            continue
        if t in _MDOC_CLOSE:
            out[-1:] = [(out[-1] if out else "") + _MDOC_CLOSE[t]]
            continue
        if t in ("Ns", "Pf", "Ap"):
            attach = True
            if t == "Ap":
                out[-1:] = [(out[-1] if out else "") + "'"]
            continue
        if t in _MDOC_NAMES:
            t = _MDOC_NAMES[t]
        elif t == "Fl":
            t = "-" + (tokens[i] if i < len(tokens) and tokens[i] not in _MDOC_PLAIN else "")
            i += t != "-"
        elif t == "Xr" and i + 1 < len(tokens):
            t, i = f"{tokens[i]}({tokens[i + 1]})", i + 2
        elif t == "Fn" and i < len(tokens):
            j = i + 1
            while j < len(tokens) and tokens[j] not in _DELIMS and tokens[j] not in _MDOC_PLAIN:
                j += 1
            t, i = f"{tokens[i]}({', '.join(tokens[i + 1:j])})", j
        elif t in _MDOC_PLAIN:
            continue
        if out and (attach or (t in _DELIMS)):
            out[-1] += t
        else:
            out.append(t)
        attach = t in ("(", "[")
    text = " ".join(out)
    for c in reversed(pending_close):  # a quote macro encloses the rest of its line, delimiters after it
        m = re.search(r"[.,:;)\]?!]*$", text)
        text = text[:m.start()] + c + text[m.start():]
    return text


def roff_to_text(src: str) -> str:
    """Text of a man page in man(7) or mdoc(7) macros: section headings on their own lines, paragraphs
    filled, .nf/.EX/.Bd displays and tbl tables kept line by line, comments and definitions dropped."""
    paras, cur, nofill, skip_to, tag_next = [], [], False, None, False

    def flush():
        if cur:
            paras.append(("\n" if nofill else " ").join(cur).strip())
            cur.clear()

    lines = src.replace("\\\n", "").split("\n")
    for line in lines:
        if skip_to:  # inside .de/.ig: up to the terminator
            if line.strip() == skip_to:
                skip_to = None
            continue
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line.strip() in (".", "'"):
            continue
        line = re.sub(r'\\".*', "", line)  # trailing comment
        if line[:1] not in (".", "'"):  # text line
            text = _roff_escapes(line)
            if nofill:
                cur.append(text.rstrip())
            elif text.strip():
                cur.append(text.strip())
            else:
                flush()
            if tag_next:  # the line after .TP is the item's label: a line of its own
                flush()
                tag_next = False
            continue
        m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        if name in ("de", "de1", "am", "ig"):
            skip_to = ".." if name != "ig" or not rest.strip() else "." + rest.strip()
            continue
        if name == "so":
            return ""  # a page that only includes another one
        try:
            args = shlex.split(rest.replace("\\(dq", "\u201d"), posix=True)
        except ValueError:
            args = rest.split()
        args = [_roff_escapes(a) for a in args]
        if name in _SECTION:
            flush()
            paras.append(" ".join(args).strip())
            tag_next = not args  # `.SH` alone: the heading is the next line
        elif name in _NOFILL_START:
            flush()
            nofill = True
        elif name in _NOFILL_END:
            flush()
            nofill = False
        elif name in _BREAK:
            tag_next = name in ("TP", "TQ")
            if name in _ITEMS or not nofill:
                flush()
            label = args[0] if name == "IP" and args else _mdoc_args("No", args) if name in _MDOC_ITEMS else ""
            if label.strip():
                cur.append(label.strip())
                if name in ("It", "IP"):
                    flush()
        elif name in _FONT:
            alternate = len(name) == 2 and name not in ("SM", "SB")
            cur.append(("" if alternate else " ").join(args))
            if tag_next:
                flush()
                tag_next = False
        elif name in ("In", "Ft", "Fd"):  # synopsis lines: one per include and per prototype
            flush()
            cur.append(f"#include <{args[0]}>" if name == "In" and args else " ".join(args))
            if name != "Ft":
                flush()
        elif name in ("UR", "MT", "UE", "ME"):
            cur.extend(args[:1] if name in ("UE", "ME") else [])
        elif name in _MDOC_TEXT:
            text = ("\u2014 " if name == "Nd" else "") + _mdoc_args(name, args)
            if cur and text[:1] in _DELIMS:
                cur[-1] += text
            elif text:
                cur.append(text)
    flush()
    return tidy("\n\n".join(p for p in paras if p))
