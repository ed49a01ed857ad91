"""Text sources for prepare.py: the offline Debian corpus, local text, FineWeb-Edu (streamed, online).

Every source yields documents `(doc_id, text)` in a fixed order. The Debian corpus comes from the
package registry of a fresh machine: `apt-get download <pkg>` + `dpkg-deb -x` (no install), cached
under data/_debian/. Each package has its own extractor: reStructuredText sources, HTML pages (stdlib
html.parser, navigation dropped), a SWORD zText Bible module, and R data files (pure-Python reader in
hybrid/rdata.py).
"""

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from typing import Iterator

from .markup import html_to_text, pod_to_text, roff_to_text
from .rdata import read_lazyload, read_rdata

Doc = tuple[str, str]  # (doc_id, text)


# ----------------------------------------------------------------------------- fetching .deb files

def _apt_download(pkg: str, cache_dir: str) -> None:
    for attempt in range(2):
        r = subprocess.run(["apt-get", "download", pkg], cwd=cache_dir, capture_output=True, text=True)
        if r.returncode == 0:
            return
        if attempt == 0:  # a fresh image has empty package lists
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
    raise RuntimeError(f"`apt-get download {pkg}` failed: {r.stderr.strip()[-300:]}; the embedded corpus needs "
                       f"a Debian/Ubuntu package registry (run `apt-get update`), or pass --dataset=<text dir>")


def fetch_deb(pkg: str, cache_dir: str) -> dict:
    """Download (once) and unpack (once) a package. -> {package, version, sha256, deb, root}."""
    os.makedirs(cache_dir, exist_ok=True)
    found = sorted(glob.glob(os.path.join(cache_dir, f"{pkg}_*.deb")))
    if not found:
        _apt_download(pkg, cache_dir)
        found = sorted(glob.glob(os.path.join(cache_dir, f"{pkg}_*.deb")))
    deb = found[-1]
    root = os.path.join(cache_dir, pkg)
    if not os.path.isdir(root):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        os.replace(tmp, root)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with open(deb, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"package": pkg, "version": version, "sha256": sha, "deb": os.path.basename(deb), "root": root}


# ----------------------------------------------------------------------------- files -> documents

def file_docs(root: str, pattern: str, skip: str | None, convert, min_chars: int = 200) -> Iterator[Doc]:
    """One document per file under root matching the glob pattern (.gz read through), text = convert(source).

    Names (relative to root) matching the regex `skip` are left out, and so are symbolic links: Debian
    links identical files together, and man pages link each alias name to the page."""
    for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
        rel = os.path.relpath(path, root)
        if os.path.islink(path) or not os.path.isfile(path) or (skip and re.search(skip, rel)):
            continue
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
            text = convert(f.read())
        if len(text) >= min_chars:
            yield rel, text


def html_docs(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """HTML pages -> text (hybrid/markup.py html_to_text)."""
    return file_docs(root, pattern, skip, html_to_text)


def text_files(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """Plain text, reStructuredText or Markdown sources as they are."""
    return file_docs(root, pattern, skip, str.strip)


def man_docs(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """roff man pages (man or mdoc macros) -> text; pages that only `.so`-include another one are left out."""
    return file_docs(root, pattern, skip, roff_to_text)


def pod_docs(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """Perl POD documents -> text."""
    return file_docs(root, pattern, skip, pod_to_text)


# ----------------------------------------------------------------------------- SWORD zText Bible

def _osis_to_text(osis: str) -> str:
    osis = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)  # footnotes and cross references
    osis = re.sub(r"<(title|chapter|div)\b[^>]*>", "\n", osis)  # headings, chapters, paragraphs break lines
    osis = re.sub(r"</title>", "\n", osis)
    osis = re.sub(r"<[^>]+>", "", osis)
    osis = osis.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    osis = re.sub(r"[ \t]+", " ", osis)
    return "\n".join(line.strip() for line in osis.split("\n") if line.strip())


def ztext_docs(module_dir: str, wide: bool = False) -> Iterator[Doc]:
    """A SWORD zText/zCom module: one document per compressed block (a book or a chapter).

    Per testament (`ot`, `nt`): `.bzs` = block index, 12 bytes per block (uint32 LE offset into `.bzz`,
    compressed size, uncompressed size); `.bzz` = zlib streams; `.bzv` = verse index, 10 bytes per
    entry (uint32 block, uint32 offset in the uncompressed block, uint16 size) in canonical order.
    Chapter-blocked modules use `.czs/.czv/.czz`; `wide` (zVerse4, ModDrv=zCom4) = uint32 verse sizes.
    Verse text is OSIS XML: footnotes dropped, markup stripped.
    """
    entry = "<III" if wide else "<IIH"
    for testament in ("ot", "nt"):
        for kind in "bc":
            paths = [os.path.join(module_dir, f"{testament}.{kind}{ext}") for ext in ("zs", "zv", "zz")]
            if all(os.path.exists(p) for p in paths):
                break
        else:
            continue
        bzs, bzv, bzz = (open(p, "rb").read() for p in paths)
        blocks, verses = {}, {}  # block -> inflated bytes, block -> [(offset, size)] (first-seen order)
        step = struct.calcsize(entry)
        for i in range(len(bzv) // step):
            block, off, size = struct.unpack_from(entry, bzv, i * step)
            if size == 0:
                continue
            if block not in blocks:
                start, csize, usize = struct.unpack_from("<III", bzs, block * 12)
                blocks[block] = zlib.decompress(bzz[start:start + csize])
                if len(blocks[block]) != usize:
                    raise ValueError(f"{paths[2]}: block {block} inflates to {len(blocks[block])} bytes, "
                                     f"index says {usize}; damaged module, delete data/_debian/ and re-run")
                verses[block] = []
            verses[block].append((off, size))
        # apocrypha sit in later blocks: group by block, text order; a commentary links every verse of a
        # passage to the same entry, so each span counts once
        for block, spans in verses.items():
            raw = blocks[block]
            text = _osis_to_text(" ".join(raw[o:o + n].decode("utf-8", errors="replace") for o, n in sorted(set(spans))))
            text = re.sub(r" +([,.;:!?])", r"\1", text)
            if len(text) > 200:
                yield f"{testament}/{block:03d}", text


# ----------------------------------------------------------------------------- R data (janeaustenr)

def reflow(lines: list[str]) -> str:
    """Hard-wrapped lines -> paragraphs (blank lines separate paragraphs)."""
    paras, cur = [], []
    for line in lines + [""]:
        if line is None or not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(line.strip())
    return "\n\n".join(paras)


def austen_docs(data_dir: str) -> Iterator[Doc]:
    """The novels of janeaustenr (character vectors, one line each), one document per chapter."""
    rdx = os.path.join(data_dir, "Rdata.rdx")
    if os.path.exists(rdx):
        objects = read_lazyload(rdx)
    else:
        objects = {}
        for path in sorted(glob.glob(os.path.join(data_dir, "*.rd*"))):
            objects.update(read_rdata(path))
    for name in sorted(objects):
        lines = objects[name]
        if not (isinstance(lines, list) and lines and all(x is None or isinstance(x, str) for x in lines)):
            continue
        chapter, buf = 0, []
        for line in lines + ["CHAPTER END"]:
            if line and re.match(r"^\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+|END)\b", line):
                text = reflow(buf)
                if len(text) > 200:
                    yield f"{name}/{chapter:03d}", text
                chapter, buf = chapter + 1, []
            buf.append(line)


# ----------------------------------------------------------------------------- sources

# package -> (extractor, path inside the unpacked package, extractor arguments)
DEBIAN_SOURCES = {
    "python3.11-doc": (text_files, "usr/share/doc/python3.11/html/_sources", ("**/*.rst.txt",)),
    "postgresql-doc-15": (html_docs, "usr/share/doc/postgresql-doc-15/html", ("*.html", r"^(index|bookindex)")),
    "python-django-doc": (html_docs, "usr/share/doc/python-django-doc/html",
                          ("**/*.html", r"^(_modules|genindex|py-modindex|search|index|contents)")),
    "sqlite3-doc": (html_docs, "usr/share/doc/sqlite3",  # index pages, and capi3ref duplicating c3ref/
                    ("**/*.html", r"(index|crossref|sitemap|toc|docs\.html|doclist|requirements|capi3ref"
                                  r"|syntaxdiagrams)")),
    "sword-text-web": (ztext_docs, "usr/share/sword/modules/texts/ztext/engWEB2015eb", ()),
    "r-cran-janeaustenr": (austen_docs, "usr/lib/R/site-library/janeaustenr/data", ()),
}


def debian_documents(pkg: str, cache_dir: str) -> tuple[dict, Iterator[Doc]]:
    """-> (provenance {package, version, sha256, deb}, documents) of one DEBIAN_SOURCES package."""
    info = fetch_deb(pkg, cache_dir)
    extract, sub, args = DEBIAN_SOURCES[pkg]
    root = os.path.join(info.pop("root"), sub)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not in package {pkg} {info['version']}; its layout changed, "
                                f"update DEBIAN_SOURCES in hybrid/corpus.py")
    return info, extract(root, *args)


def local_documents(path: str) -> Iterator[Doc]:
    """A text file (one document, or one per line for .jsonl with a "text" field) or a folder of them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder; --dataset takes 'debian', 'fineweb-edu' "
                                f"or a path to local text")
    files = [path] if os.path.isfile(path) else sorted(
        p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
        if os.path.isfile(p) and p.endswith((".txt", ".md", ".rst", ".text", ".jsonl")))
    if not files:
        raise ValueError(f"{path}: no .txt/.md/.rst/.jsonl files found")
    for p in files:
        with open(p, encoding="utf-8", errors="replace") as f:
            if p.endswith(".jsonl"):
                for i, line in enumerate(f):
                    if line.strip():
                        yield f"{p}:{i}", json.loads(line)["text"]
            else:
                text = f.read().strip()
                if text:
                    yield p, text


def fineweb_documents(subset: str = "sample-10BT") -> Iterator[Doc]:
    """FineWeb-Edu streamed from the Hugging Face hub (needs `pip install datasets` and the network)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--dataset=fineweb-edu streams with the `datasets` package: pip install datasets") from e
    ds = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=subset, split="train", streaming=True)
    for row in ds:
        yield row["id"], row["text"]
