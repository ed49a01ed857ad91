"""Text sources for prepare.py: the offline Debian corpus, local text, FineWeb-Edu (streamed, online).

Every source yields documents `(doc_id, text)` in a fixed order. The Debian corpus comes from the
package registry of a fresh machine: `apt-get download <pkg>` + `dpkg-deb -x` (no install), cached
under data/_debian/. Each package has its own extractor: plain text and reStructuredText sources as they
are, HTML pages and POD (hybrid/markup.py), man pages (hybrid/roff.py), SWORD Bible and commentary
modules (hybrid/sword.py), and R data files (pure-Python reader in hybrid/rdata.py).
"""

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from typing import Callable, Iterator

from .markup import SKIP_MARKS, html_to_text, pod_to_text
from .rdata import austen_docs
from .roff import roff_to_text
from .sword import ztext_docs

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

def file_docs(root: str, pattern: str, skip: str | None, convert: Callable[[str], str],
              min_chars: int = 200) -> Iterator[Doc]:
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


def html_docs(root: str, pattern: str, skip: str | None = None, add_marks: tuple[str, ...] = (),
              keep_marks: tuple[str, ...] = (), skip_prefixes: tuple[str, ...] = ()) -> Iterator[Doc]:
    """HTML pages -> text (hybrid/markup.py html_to_text); add_marks / keep_marks: class or id names
    dropped on top of markup.SKIP_MARKS / taken out of it, for one site's layout."""
    marks = (SKIP_MARKS | set(add_marks)) - set(keep_marks)
    return file_docs(root, pattern, skip, lambda html: html_to_text(html, marks, skip_prefixes))


def text_files(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """Plain text, reStructuredText or Markdown sources as they are."""
    return file_docs(root, pattern, skip, str.strip)


def man_docs(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """roff man pages (man or mdoc macros) -> text; pages that only `.so`-include another one are left out."""
    return file_docs(root, pattern, skip, roff_to_text)


def pod_docs(root: str, pattern: str, skip: str | None = None) -> Iterator[Doc]:
    """Perl POD documents -> text."""
    return file_docs(root, pattern, skip, pod_to_text)


# ----------------------------------------------------------------------------- sources

DOC = "usr/share/doc"
SPHINX_SKIP = r"^(_modules|_static|_images|genindex|py-modindex|search|index|contents)"
RUSTDOC_MARKS = ("rightside", "test-arrow", "notable-traits", "trait-implementations-list", "sub-variant",
                 "synthetic-implementations-list", "blanket-implementations-list", "implementors-list",
                 "menu-bar", "mobile-topbar", "search-form")
# package[:part] -> (extractor, path inside the unpacked package, extractor keyword arguments). Chosen by
# the teacher's bits per byte on a sample (docs/data.md); English only, each manual in one version and form.
DEBIAN_SOURCES = {
    "python3.11-doc": (text_files, f"{DOC}/python3.11/html/_sources", dict(pattern="**/*.rst.txt")),
    "postgresql-doc-15": (html_docs, f"{DOC}/postgresql-doc-15/html", dict(pattern="*.html", skip=r"^(index|bookindex)")),
    "python-django-doc": (html_docs, f"{DOC}/python-django-doc/html", dict(pattern="**/*.html", skip=SPHINX_SKIP)),
    "sqlite3-doc": (html_docs, f"{DOC}/sqlite3",  # index pages, and capi3ref duplicating c3ref/
                    dict(pattern="**/*.html", skip=r"(index|crossref|sitemap|toc|docs\.html|doclist|requirements"
                                                   r"|capi3ref|syntaxdiagrams)")),
    "sword-text-web": (ztext_docs, "usr/share/sword/modules/texts/ztext/engWEB2015eb", {}),
    "r-cran-janeaustenr": (austen_docs, "usr/lib/R/site-library/janeaustenr/data", {}),
    # books: Bible commentaries (18th and 19th century prose) and a second Bible
    "sword-comm-tdavid": (ztext_docs, "usr/share/sword/modules/comments/zcom/tdavid", dict(wide=True)),
    "sword-comm-mhcc": (ztext_docs, "usr/share/sword/modules/comments/zcom/mhcc", {}),
    "sword-text-kjv": (ztext_docs, "usr/share/sword/modules/texts/ztext/engKJV2006eb", {}),  # the one other Bible
    # man pages and POD
    "manpages": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "manpages-dev": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "freebsd-manpages": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "libssl-doc": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "tcl8.6-doc": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "tk8.6-doc": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "systemd": (man_docs, "usr/share/man", dict(pattern="man*/*.gz")),
    "perl-doc": (pod_docs, "usr/share/perl/5.36.0/pod", dict(pattern="*.pod", skip=r"delta\.pod$")),
    # manuals as reStructuredText / AsciiDoc / vim help sources
    "linux-doc-6.1": (text_files, f"{DOC}/linux-doc-6.1/Documentation",
                      dict(pattern="**/*.rst.gz", skip=r"^(translations|ABI|devicetree|output)/")),
    "llvm-15-doc": (text_files, f"{DOC}/llvm-15-doc/html/_sources", dict(pattern="**/*.txt", skip=r"^AMDGPU")),
    "clang-15-doc": (text_files, f"{DOC}/clang-15/html/_sources", dict(pattern="**/*.txt")),
    "python-sklearn-doc": (text_files, f"{DOC}/python-sklearn-doc/html/_sources", dict(pattern="**/*.rst.txt")),
    "python-statsmodels-doc": (text_files, f"{DOC}/python-statsmodels-doc/html/_sources", dict(pattern="**/*.rst.txt")),
    "python-pandas-doc": (text_files, f"{DOC}/python-pandas-doc/html/_sources", dict(pattern="**/*.rst.txt")),
    "python-astropy-doc": (text_files, f"{DOC}/python-astropy-doc/html/_sources", dict(pattern="**/*.rst.txt")),
    "python-sqlalchemy-doc": (text_files, f"{DOC}/python-sqlalchemy-doc/rst", dict(pattern="**/*.rst")),
    "sphinx-doc": (text_files, f"{DOC}/sphinx-doc/html/_sources", dict(pattern="**/*.txt")),
    "cmake-doc": (text_files, f"{DOC}/cmake-data/html/_sources", dict(pattern="**/*.txt")),
    "ghc-doc:guide": (text_files, f"{DOC}/ghc-doc/html/users_guide/_sources", dict(pattern="**/*.txt")),
    "developers-reference": (text_files, "usr/share/developers-reference/_sources", dict(pattern="*.txt")),
    "debian-policy": (text_files, f"{DOC}/debian-policy/policy.html/_sources", dict(pattern="*.txt")),
    "git-doc": (text_files, f"{DOC}/git-doc", dict(pattern="**/*.txt")),
    "vim-runtime": (text_files, "usr/share/vim/vim90/doc", dict(pattern="*.txt")),
    # manuals as HTML
    "rust-doc": (html_docs, f"{DOC}/rust-doc/html",
                 dict(pattern="**/*.html", skip=r"^(core|alloc|src|implementors|test)/|(first|second|2018)-edition/"
                                                r"|print\.html$|toc\.html$|404\.html$|/all\.html$|index\.html$",
                      add_marks=RUSTDOC_MARKS, skip_prefixes=("deref-methods-",))),
    "racket-doc": (html_docs, f"{DOC}/racket", dict(pattern="**/*.html", skip=r"(index|local-redirect|search|release)")),
    "debian-handbook": (html_docs, f"{DOC}/debian-handbook/html/en-US", dict(pattern="*.html", skip=r"^(index|ix01)")),
    "debian-reference-en": (html_docs, "usr/share/debian-reference", dict(pattern="*.en.html", skip=r"^index")),
    "libreoffice-help-en-us": (html_docs, "usr/share/libreoffice/help/en-US/text", dict(pattern="**/*.html")),
    "gimp-help-en": (html_docs, "usr/share/gimp/2.0/help/en", dict(pattern="*.html", skip=r"^(index|ix)")),
    "bash-doc": (html_docs, f"{DOC}/bash", dict(pattern="bashref.html")),  # bash.html is the man page
    "gettext-doc": (html_docs, f"{DOC}/gettext", dict(pattern="gettext_*.html", skip=r"_(toc|abt)\.html")),
    "nodejs-doc": (html_docs, f"{DOC}/nodejs/api", dict(pattern="*.html", skip=r"^(all|index)\.html")),
    "python-scipy-doc": (html_docs, f"{DOC}/python-scipy-doc/html", dict(pattern="**/*.html", skip=SPHINX_SKIP)),
    "python-sympy-doc": (html_docs, f"{DOC}/python-sympy-doc/html", dict(pattern="**/*.html", skip=SPHINX_SKIP)),
    "maxima-doc": (html_docs, f"{DOC}/maxima-doc/html", dict(pattern="*.html", skip=r"index|contents")),
    "octave-doc": (html_docs, f"{DOC}/octave/octave.html", dict(pattern="*.html", skip=r"index|XREF")),
    "r-doc-html": (html_docs, "usr/share/R/doc/manual", dict(pattern="*.html")),
    "lilypond-doc-html": (html_docs, f"{DOC}/lilypond/html/Documentation",  # each manual as one page
                          dict(pattern="*-big-page.html", skip=r"internals|snippets|changes")),
    "apache2-doc": (html_docs, f"{DOC}/apache2-doc/manual",
                    dict(pattern="**/*.html", skip=r"^(?!en/)|index|sitemap|quickreference")),
    "exim4-doc-html": (html_docs, f"{DOC}/exim4-doc-html/spec_html", dict(pattern="*.html", skip=r"index")),
    "postfix-doc": (html_docs, f"{DOC}/postfix/html", dict(pattern="*.html", skip=r"index|\.[58]\.html$")),
    "bind9-doc": (html_docs, f"{DOC}/bind9-doc/arm", dict(pattern="*.html", skip=r"genindex|search|index")),
    "zsh-doc": (html_docs, f"{DOC}/zsh-common/html", dict(pattern="*.html", skip=r"index")),
    "wireshark-doc": (html_docs, f"{DOC}/wireshark", dict(pattern="**/*.html", skip=r"index")),
    "gnucash-docs": (html_docs, f"{DOC}/gnucash-docs", dict(pattern="gnucash-*-en/*.html", skip=r"index")),
    "gnuplot-doc": (html_docs, f"{DOC}/gnuplot/htmldocs", dict(pattern="*.html", skip=r"index")),
    "kicad-doc-en": (html_docs, f"{DOC}/kicad/help/en", dict(pattern="*.html")),
    # API references: class and function pages with their prose, member lists and navigation dropped
    "openjdk-17-doc": (html_docs, f"{DOC}/openjdk-17-jre-headless/api",
                       dict(pattern="**/*.html", skip=r"(class-use|index-files|package-tree|package-use|-summary"
                                                      r"|allclasses|allpackages|overview-tree|deprecated|help-doc"
                                                      r"|serialized-form|constant-values|index)",
                            add_marks=("summary", "inherited-list", "sub-nav", "top-nav", "flex-header",
                                       "member-summary"))),
    "qtbase5-doc-html": (html_docs, "usr/share/qt5/doc",  # Qt never closes its header <div>: keep it
                         dict(pattern="**/*.html", skip=r"-(members|obsolete)\.html$|examples|index|-module\.html$"
                                                        r"|annotated|classes\.html|functions\.html|overviews",
                              add_marks=("navigationbar", "alignedsummary", "propsummary"), keep_marks=("header",))),
    "ghc-doc:libs": (html_docs, f"{DOC}/ghc-doc/html/libraries",
                     dict(pattern="**/*.html", skip=r"(/src/|doc-index|index|ghc-9|^ghc/)",
                          add_marks=("package-header", "module-header", "table-of-contents", "synopsis", "link",
                                     "selflink"))),
    "cppreference-doc-en-html": (html_docs, "usr/share/cppreference/doc/html/en",
                                 dict(pattern="**/*.html", skip=r"index|symbol_index",
                                      add_marks=("t-navbar", "siteSub", "contentSub", "printfooter", "catlinks"))),
    "libboost1.81-doc": (html_docs, f"{DOC}/libboost1.81-doc",  # the manuals, not the generated per-header reference
                         dict(pattern="**/*.html", skip=r"(reference|boost/|index|\.hpp\.html)")),
    "erlang-doc": (html_docs, f"{DOC}/erlang-doc", dict(pattern="**/*.html", skip=r"(java/|index|release_notes"
                                                                              r"|notes\.html|wx-)")),
}
DEBIAN_SMALL = tuple(DEBIAN_SOURCES)[:6]  # the first six alone: 8.7M tokens, prepared in minutes on a CPU


def debian_documents(pkg: str, cache_dir: str) -> tuple[dict, Iterator[Doc]]:
    """-> (provenance {package, version, sha256, deb}, documents) of one DEBIAN_SOURCES entry."""
    info = fetch_deb(pkg.partition(":")[0], cache_dir)
    extract, sub, kwargs = DEBIAN_SOURCES[pkg]
    root = os.path.join(info.pop("root"), sub)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not in package {pkg} {info['version']}; its layout changed, "
                                f"update DEBIAN_SOURCES in hybrid/corpus.py")
    return info, _unique(extract(root, **kwargs))


def _unique(docs: Iterator[Doc]) -> Iterator[Doc]:
    """Drop documents whose text (whitespace aside) was already yielded: the same page under two names."""
    seen = set()
    for doc_id, text in docs:
        key = hashlib.sha1(" ".join(text.split()).encode()).digest()
        if key not in seen:
            seen.add(key)
            yield doc_id, text


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
