"""Readable text from documentation markup: HTML pages and Perl POD (man pages: hybrid/roff.py).

Each function takes the source text of one document and returns plain text: paragraphs separated by
blank lines, preformatted blocks (HTML <pre>, POD verbatim) kept line by line, all markup and
navigation dropped. Used by hybrid/corpus.py for the offline Debian corpus.
"""

import re
from html.entities import name2codepoint
from html.parser import HTMLParser

# ----------------------------------------------------------------------------- HTML

BLOCK_TAGS = {"p", "div", "pre", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "blockquote",
              "section", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "caption", "figure"}
SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "map", "button", "form"}
SKIP_MARKS = frozenset({"navheader", "navfooter", "sphinxsidebar", "related", "nav", "hd", "ft", "sidebar", "footer",
              "header", "global-nav", "breadcrumbs", "headerlink", "toc", "menu", "search"})
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "wbr", "source"}


class _TextParser(HTMLParser):
    def __init__(self, skip_marks: frozenset[str], skip_prefixes: tuple[str, ...]):
        super().__init__(convert_charrefs=True)
        self.skip_marks, self.skip_prefixes = skip_marks, skip_prefixes
        self.parts, self.stack, self.skip, self.pre = [], [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if tag in ("br", "hr") and not self.skip:
                self.parts.append("\n")
            return
        a = dict(attrs)
        marks = set((a.get("class") or "").split()) | {a.get("id") or ""}
        skip = tag in SKIP_TAGS or bool(marks & self.skip_marks) or (
            bool(self.skip_prefixes) and any(m.startswith(self.skip_prefixes) for m in marks if m))
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


def html_to_text(html: str, skip_marks: frozenset[str] = SKIP_MARKS, skip_prefixes: tuple[str, ...] = ()) -> str:
    """Readable text of an HTML page: scripts, styles, SVG and navigation dropped, <pre> kept verbatim.

    Elements whose class or id is in skip_marks or starts with one of skip_prefixes are dropped
    (navigation, a site generator's own boilerplate)."""
    p = _TextParser(skip_marks, skip_prefixes)
    p.feed(html)
    p.close()
    return tidy("".join(p.parts))


# ----------------------------------------------------------------------------- Perl POD

_POD_ENTITIES = {"verbar": "|", "sol": "/", **{k: chr(v) for k, v in name2codepoint.items()}}


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
            if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", inner):  # E<0x263A> hex, E<0351> octal, E<233> decimal
                inner = chr(int(inner, 16 if inner.startswith("0x") else 8 if inner.startswith("0") else 10))
            else:
                inner = _POD_ENTITIES.get(inner, "")
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
            cmd, rest = re.match(r"=(\S*)\s*(.*)", para, re.S).groups()
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
