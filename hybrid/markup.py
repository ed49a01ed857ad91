"""Readable text from documentation markup: HTML pages, roff man pages (man and mdoc macros), Perl POD.

Each function takes the source text of one document and returns plain text: paragraphs separated by
blank lines, preformatted blocks (HTML <pre>, roff .nf/.EX/.Bd, POD verbatim) kept line by line, all
markup and navigation dropped. Used by hybrid/corpus.py for the offline Debian corpus.
"""

import re
import shlex
from html.parser import HTMLParser

# ----------------------------------------------------------------------------- HTML

BLOCK_TAGS = {"p", "div", "pre", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "blockquote",
              "section", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "caption", "figure"}
SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "map", "button", "form"}
SKIP_MARKS = {"navheader", "navfooter", "sphinxsidebar", "related", "nav", "hd", "ft", "sidebar", "footer",
              "header", "global-nav", "breadcrumbs", "headerlink", "toc", "menu", "search"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "wbr", "source"}


class _TextParser(HTMLParser):
    def __init__(self, skip_marks: set[str]):
        super().__init__(convert_charrefs=True)
        self.skip_marks = skip_marks
        self.parts, self.stack, self.skip, self.pre = [], [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if tag in ("br", "hr") and not self.skip:
                self.parts.append("\n")
            return
        a = dict(attrs)
        marks = set((a.get("class") or "").split()) | {a.get("id") or ""}
        skip = tag in SKIP_TAGS or bool(marks & self.skip_marks)
        self.stack.append((tag, skip))
        self.skip += skip
        self.pre += tag == "pre"
        if tag in BLOCK_TAGS and not self.skip:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table") else "\n")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr") and not self.skip:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, _ in self.stack):
            return  # stray end tag
        while self.stack:  # close unclosed children too (<li> without </li> and the like)
            t, skip = self.stack.pop()
            self.skip -= skip
            self.pre -= t == "pre"
            if t == tag:
                break
        if tag in BLOCK_TAGS and not self.skip:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def tidy(text: str) -> str:
    """Strip trailing spaces, blank out space-only lines, squeeze 3+ newlines to 2."""
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(html: str, skip_marks: frozenset[str] = frozenset()) -> str:
    """Readable text of an HTML page: scripts, styles, SVG and navigation dropped, <pre> kept verbatim.

    skip_marks: extra class or id names whose elements are dropped (a site's own boilerplate)."""
    p = _TextParser(SKIP_MARKS | set(skip_marks))
    p.feed(html)
    p.close()
    return tidy("".join(p.parts))


# ----------------------------------------------------------------------------- roff (man pages)

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
_DELIMS = set(".,:;)]?!")
_SECTION = {"SH", "SS", "Sh", "Ss"}
_BREAK = {"PP", "P", "LP", "Pp", "Lp", "sp", "br", "TP", "IP", "HP", "TQ", "RS", "RE", "Bl", "El", "It", "Rs", "Re",
          "D1", "Dl", "in", "ti"}
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
        elif name in _NOFILL_START:
            flush()
            nofill = True
        elif name in _NOFILL_END:
            flush()
            nofill = False
        elif name in _BREAK:
            tag_next = name in ("TP", "TQ")
            if name in ("It", "TP", "IP", "TQ", "D1", "Dl") or not nofill:
                flush()
            text = " ".join(args[:1] if name == "IP" else [] if name not in ("It", "D1", "Dl") else [])
            if name in ("It", "D1", "Dl"):
                text = _mdoc_args("No", args)
            if text.strip():
                cur.append(text.strip())
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
        elif name[:1].isupper() and name not in ("TH", "Dd", "Dt", "Os", "Bf", "Bk", "Nd") or name == "Nd":
            text = _mdoc_args(name, args) if name in _MDOC_PLAIN or name in _MDOC_QUOTES or name in _MDOC_OPEN \
                or name in _MDOC_CLOSE or name in _MDOC_NAMES else ""
            if name == "Nd":
                text = "\u2014 " + text
            if text:
                if cur and text[:1] in _DELIMS:
                    cur[-1] += text
                else:
                    cur.append(text)
    flush()
    return tidy("\n\n".join(p for p in paras if p))


# ----------------------------------------------------------------------------- Perl POD

_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'",
                 "nbsp": " ", "copy": "\u00a9", "eacute": "\u00e9", "auml": "\u00e4", "ouml": "\u00f6"}


def _pod_codes(s: str) -> str:
    """Formatting codes B<> I<> C<> F<> S<> L<> E<> X<> Z<>, nested, with C<< >> multi-bracket forms."""
    out, i = [], 0
    while i < len(s):
        m = re.match(r"([BICFSLEXZ])(<+)(\s?)", s[i:]) if s[i] in "BICFSLEXZ" else None
        if m and len(m.group(2)) > 1 and not m.group(3):  # C<<x>> without the space is C< <x >>
            m = re.match(r"([BICFSLEXZ])(<)()", s[i:])
        if not m:
            out.append(s[i])
            i += 1
            continue
        code, n = m.group(1), len(m.group(2))
        close = ">" * n if n == 1 else " " + ">" * n
        start = i + m.end()
        depth, j = 0, start
        if n == 1:  # single brackets nest: count < and > of inner codes
            while j < len(s):
                if s[j] == "<" and j > 0 and s[j - 1] in "BICFSLEXZ":
                    depth += 1
                elif s[j] == ">":
                    if depth == 0:
                        break
                    depth -= 1
                j += 1
            inner, end = s[start:j], j + 1
        else:
            j = s.find(close, start)
            j = len(s) if j < 0 else j
            inner, end = s[start:j], j + len(close)
        inner = _pod_codes(inner)
        if code == "E":
            inner = _POD_ENTITIES.get(inner, chr(int(inner, 0)) if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", inner) else "")
        elif code in "XZ":
            inner = ""
        elif code == "L":
            inner = inner.split("|", 1)[0] if "|" in inner else re.sub(r'^.*?/"?|"$', "", inner) or inner
        out.append(inner)
        i = end
    return "".join(out)


def pod_to_text(src: str) -> str:
    """Text of a POD document: =head lines as headings, =item labels on their own lines, ordinary
    paragraphs joined into one line with formatting codes resolved, verbatim (indented) paragraphs kept,
    =begin/=for blocks of other formats and everything after =cut up to the next command dropped."""
    out, in_pod, skip_block = [], src.lstrip().startswith("="), None
    for para in re.split(r"\n[ \t]*\n", src):
        if not para.strip():
            continue
        if para.startswith("="):
            cmd, _, rest = para[1:].partition(" ") if " " in para.split("\n")[0] else (para[1:].split("\n")[0], "", "")
            cmd = cmd.strip()
            in_pod = cmd != "cut"
            if skip_block:
                if cmd == "end" and rest.strip().split()[:1] == [skip_block]:
                    skip_block = None
                continue
            if cmd == "begin" and rest.strip().split()[:1] not in (["text"], ["pod"]):
                skip_block = (rest.strip().split() or [""])[0]
            elif cmd.startswith("head") or cmd == "item":
                label = _pod_codes(" ".join(rest.split()))
                if cmd == "item" and label in ("*", ""):
                    continue
                out.append(label)
            continue
        if not in_pod or skip_block:
            continue
        if para[:1] in (" ", "\t"):
            out.append(para.rstrip("\n"))
        else:
            out.append(_pod_codes(" ".join(para.split())))
    return tidy("\n\n".join(out))
