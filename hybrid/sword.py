"""SWORD Bible and commentary modules (zText, zCom, zCom4) read without the SWORD library."""

import os
import re
import struct
import zlib
from typing import Iterator

def _osis_to_text(osis: str) -> str:
    osis = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)  # footnotes and cross references
    osis = re.sub(r"<(title|chapter|div)\b[^>]*>", "\n", osis)  # headings, chapters, paragraphs break lines
    osis = re.sub(r"</title>", "\n", osis)
    osis = re.sub(r"<[^>]+>", "", osis)
    osis = osis.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    osis = re.sub(r"[ \t]+", " ", osis)
    return "\n".join(line.strip() for line in osis.split("\n") if line.strip())


def ztext_docs(module_dir: str, wide: bool = False) -> Iterator[tuple[str, str]]:
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
            verse_texts = (raw[o:o + n].decode("utf-8", errors="replace") for o, n in sorted(set(spans)))
            text = _osis_to_text(" ".join(verse_texts))
            text = re.sub(r" +([,.;:!?])", r"\1", text)
            if len(text) > 200:
                yield f"{testament}/{block:03d}", text
