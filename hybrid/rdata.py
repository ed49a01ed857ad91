"""A small pure-Python reader for R's serialization format (XDR, versions 2 and 3).

Enough to get vectors out of R data files without R: `.rds`/`.rda`/`.RData` (`RDX2`/`RDX3` + a
serialized pairlist, optionally gzip/bzip2/xz compressed) and lazy-load databases (`Rdata.rdx` index +
`Rdata.rdb` blobs, as in an installed package's data/ folder). Vectors become Python lists (NA ->
None), named lists become dicts, pairlists become lists of (tag, value). Closures, environments and
bytecode are not supported (data files rarely hold them); they raise ValueError naming the type.
`austen_docs` turns the janeaustenr package's novels into one document per chapter.
"""

import bz2
import glob
import gzip
import lzma
import os
import re
import struct
import zlib
from typing import Iterator

NILVALUE, GLOBALENV, UNBOUND, MISSING, BASENS, EMPTYENV, BASEENV = 254, 253, 252, 251, 247, 242, 241
SPECIAL = {NILVALUE: None, GLOBALENV: "<globalenv>", UNBOUND: "<unbound>", MISSING: "<missing>",
           BASENS: "<basenamespace>", EMPTYENV: "<emptyenv>", BASEENV: "<baseenv>"}
PAIRLISTS = {2, 3, 5, 6, 17}  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP


class RVector(list):
    """An R vector: a list plus its R attributes (names, class, dim, ...)."""
    attributes: dict = {}


def decompress(data: bytes) -> bytes:
    """gzip / bzip2 / xz by magic bytes; anything else is returned unchanged."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.refs, self.where = data, 0, [], where

    def int(self) -> int:
        (x,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return x

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()

    def header(self) -> None:
        if self.data[:2] != b"X\n":
            raise ValueError(f"{self.where}: R serialization format {self.data[:2]!r}, only XDR ('X') is supported")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            n = self.int()
            self.pos += n  # native encoding name
        elif version != 2:
            raise ValueError(f"{self.where}: R serialization version {version}, expected 2 or 3")

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in SPECIAL:
            return SPECIAL[kind]
        if kind == 255:  # REFSXP: an earlier symbol or environment
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (244, 245, 246):  # PERSISTSXP, NAMESPACESXP, PACKAGESXP: a string vector
            self.int()
            value = [self.item() for _ in range(self.int())]
            self.refs.append(value)
            return value
        if kind in PAIRLISTS:
            return self.pairlist(flags)
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
        if kind == 238:  # ALTREP: (class info, state, attributes)
            info, state, attrs = self.item(), self.item(), self.item()
            return self.altrep(info[0][1] if isinstance(info, list) and info else info, state)
        n = self.length() if kind in (10, 13, 14, 15, 16, 19, 20, 24) else None
        if kind in (10, 13):  # LGLSXP, INTSXP: NA is INT_MIN
            value = [None if v == -(2**31) else v for v in struct.unpack_from(f">{n}i", self.data, self.pos)]
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == 15:  # CPLXSXP
            v = struct.unpack_from(f">{2 * n}d", self.data, self.pos)
            value = [complex(v[i], v[i + 1]) for i in range(0, 2 * n, 2)]
            self.pos += 16 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [self.item() for _ in range(n)]
        elif kind == 24:  # RAWSXP
            value = self.data[self.pos:self.pos + n]
            self.pos += n
            return value
        else:
            raise ValueError(f"{self.where}: unsupported R object type {kind} at byte {self.pos - 4}")
        out = RVector(value)
        out.attributes = dict(self.item()) if has_attr else {}
        names = out.attributes.get("names")
        if kind == 19 and isinstance(names, list) and len(names) == len(value):
            return dict(zip(names, value))
        return out

    def pairlist(self, flags: int) -> list:
        """A pairlist chain, read iteratively (data files hold long ones). -> [(tag, value), ...]"""
        out = []
        while True:
            kind = flags & 0xFF
            if kind == NILVALUE:
                return out
            if kind not in PAIRLISTS:  # a dotted tail
                self.pos -= 4
                out.append((None, self.item()))
                return out
            if flags & (1 << 9):
                self.item()  # attributes of the cell
            tag = self.item() if flags & (1 << 10) else None
            out.append((tag, self.item()))
            flags = self.int()

    def altrep(self, cls: str, state):
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (int(x) for x in state[:3])
            return RVector(range(start, start + n * step, step))
        if cls and cls.startswith("wrap_"):
            return state[0][1] if isinstance(state, list) and state and isinstance(state[0], tuple) else state[0]
        if cls == "deferred_string":
            arg = state[0][1] if isinstance(state, list) and state and isinstance(state[0], tuple) else state
            return RVector(str(v) for v in arg)
        raise ValueError(f"{self.where}: unsupported ALTREP class {cls!r}")


def unserialize(data: bytes, where: str = "<bytes>"):
    """One serialized R object (the body of an .rds file, after decompression)."""
    r = _Reader(data, where)
    r.header()
    return r.item()


def read_rdata(path: str) -> dict:
    """An .rda/.RData (RDX2/RDX3) or .rds file -> {name: value}."""
    with open(path, "rb") as f:
        data = decompress(f.read())
    if data[:5] in (b"RDX2\n", b"RDX3\n"):
        return dict(unserialize(data[5:], path))
    return {os.path.splitext(os.path.basename(path))[0]: unserialize(data, path)}


def read_lazyload(rdx_path: str) -> dict:
    """A lazy-load database (`X.rdx` index + `X.rdb`) -> {name: value}.

    Each .rdb entry is a 4-byte big-endian uncompressed length, then (compression type 2/3) a type
    byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none), then the compressed serialized object (zlib for type 1).
    """
    with open(rdx_path, "rb") as f:
        index = unserialize(decompress(f.read()), rdx_path)
    rdb_path = rdx_path[:-4] + ".rdb"
    with open(rdb_path, "rb") as f:
        rdb = f.read()
    compressed = index.get("compressed", [1])
    ctype = int(compressed[0]) if isinstance(compressed, list) else 1
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        (size,) = struct.unpack_from(">I", blob)
        if ctype in (2, 3):
            method, body = blob[4:5], blob[5:]
            body = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": lambda b: b}[method](body)
        else:
            body = zlib.decompress(blob[4:])
        if len(body) != size:
            raise ValueError(f"{rdb_path}: entry {name!r} inflates to {len(body)} bytes, index says {size}")
        out[name] = unserialize(body, f"{rdb_path}:{name}")
    return out


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


def austen_docs(data_dir: str) -> Iterator[tuple[str, str]]:
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
