"""Tokenize a text corpus with the teacher's tokenizer into token shards (hybrid/shards.py format).

Sources (DATASET):
  "debian"       offline default: documentation and books from Debian packages, fetched with
                 `apt-get download` + `dpkg-deb -x` (no install) into data/_debian/ (hybrid/corpus.py)
  "fineweb-edu"  HuggingFaceFW/fineweb-edu (FINEWEB_SUBSET) streamed with `datasets` (online)
  <path>         a text file, a .jsonl file with a "text" field, or a folder of .txt/.md/.rst/.jsonl

Documents are joined with the tokenizer's EOS (tokenized with add_special_tokens=False). Every
round(1 / VAL_FRACTION)-th document of each source goes to the val split. Shards are written as
`*.tmp` and renamed; progress.json records finished shards, so a killed run resumes after the last
verified shard (without re-tokenizing what it holds), and a finished run is a no-op: its manifest and
shards are checked before any source is opened, so shards carried to an offline machine are reused there.

Launch (from the repo root):
  python prepare.py                                   # embedded teacher + Debian corpus -> data/debian/
  python prepare.py --smoke=True                      # a tiny set in seconds -> data/debian_smoke/
  python prepare.py --dataset=fineweb-edu --teacher=HuggingFaceTB/SmolLM2-135M --max_tokens=1000000000
  python prepare.py --dataset=path/to/texts --out_dir=data/mytexts

Reads the teacher (models/<name>/, created by hybrid/teacher.py on first use) and the source.
Writes OUT_DIR/{train,val}_000000.bin ..., OUT_DIR/manifest.json.
Log lines (tqdm, then one line per source and a total):
  debian:  17%|█▋        | 1.50M/9.02M [00:12<01:00, 124ktok/s, python3.11-doc]
  python3.11-doc           train    2.85M | val   18.84k
  data/debian/: train 78.74M tokens in 19 shards, val 1.57M in 1, uint16, vocab 49152, eos 2, 511.5s
"""

import hashlib
import itertools
import json
import os
import time

import numpy as np
from tqdm import tqdm

from hybrid.checkpoint import atomic_write_json
from hybrid.common import format_tokens, run_script
from hybrid.config import config_dict
from hybrid.corpus import DEBIAN_SMALL, DEBIAN_SOURCES, debian_documents, fineweb_documents, local_documents
from hybrid.shards import (load_manifest, record_verified, sha256_file, tokenizer_info, verify_shards,
                           version_for_vocab, write_shard)
from hybrid.teacher import load_tokenizer

# -----------------------------------------------------------------------------
# Tokenizer
TEACHER = "embedded"            # its tokenizer: "embedded" | HF id | local HF dir | .gguf file
MODELS_DIR = "models"           # where hybrid/teacher.py normalises teachers
# Data
DATASET = "debian"              # "debian" | "fineweb-edu" | path to a text file or folder
OUT_DIR = ""                    # "" = data/<dataset name>[_smoke]
DEBIAN_PACKAGES = ",".join(DEBIAN_SOURCES)  # comma-separated subset of hybrid/corpus.py DEBIAN_SOURCES, or
                                            # "small" = DEBIAN_SMALL (8.7M tokens in minutes, for CPU smoke runs)
DEBIAN_CACHE = "data/_debian"   # downloaded .deb files and their unpacked trees
FINEWEB_SUBSET = "sample-10BT"  # FineWeb-Edu config name
# Sizes
SHARD_TOKENS = 2**22            # tokens per shard (the last shard of a split may be shorter)
VAL_FRACTION = 0.02             # share of documents held out for val (every round(1/x)-th per source)
VAL_TOKENS = 2**21              # cap on val tokens (0 = no cap)
MAX_TOKENS = 0                  # cap on train tokens (0 = the whole source)
MAX_DOCS_PER_SOURCE = 0         # documents taken from each source (0 = all)
MAX_DOC_CHARS = 0               # truncate each document to this many characters (0 = no limit)
BATCH_DOCS = 64                 # documents per tokenizer call
SMOKE = False                   # tiny set in seconds: 4 docs of <= 6k chars per source, 4k-token shards,
                                # the "small" Debian packages unless --debian_packages is given
# -----------------------------------------------------------------------------

_SPLITS = ("train", "val")


def source_names(dataset: str) -> list[str]:
    """The names of the sources open_sources(dataset) reads, in its order, without fetching anything."""
    if dataset == "debian":
        small = DEBIAN_PACKAGES == "small" or (SMOKE and DEBIAN_PACKAGES == ",".join(DEBIAN_SOURCES))
        names = [p.strip() for p in (DEBIAN_SMALL if small else DEBIAN_PACKAGES.split(",")) if p.strip()]
        for pkg in names:
            if pkg not in DEBIAN_SOURCES:
                raise ValueError(f"--debian_packages: unknown package {pkg!r}; known: {', '.join(DEBIAN_SOURCES)}")
        return names
    if dataset == "fineweb-edu":
        return ["fineweb-edu"]
    return [os.path.basename(dataset.rstrip("/"))]


def open_sources(dataset: str) -> list[tuple[str, dict, object]]:
    """-> [(source name, provenance, document iterator)] in a fixed order."""
    if dataset == "debian":
        return [(pkg, *debian_documents(pkg, DEBIAN_CACHE)) for pkg in source_names(dataset)]
    if dataset == "fineweb-edu":
        return [("fineweb-edu", {"hf_dataset": "HuggingFaceFW/fineweb-edu", "subset": FINEWEB_SUBSET},
                 fineweb_documents(FINEWEB_SUBSET))]
    return [(os.path.basename(dataset.rstrip("/")), {"path": os.path.abspath(dataset)}, local_documents(dataset))]


class SplitWriter:
    """Accumulates the tokens of one split and writes a shard each SHARD_TOKENS tokens.

    `end` of a shard = (document index, tokens of that document already written), the point where
    a resumed run picks up this split without tokenizing the documents before it.
    """

    def __init__(self, out_dir: str, split: str, vocab_size: int, shard_tokens: int, cap: int, shards: list):
        self.out_dir, self.split, self.vocab_size = out_dir, split, vocab_size
        self.shard_tokens, self.cap = shard_tokens, cap
        self.shards = shards  # finished entries (from progress.json when resuming)
        self.written = sum(e["n_tokens"] for e in shards)
        self.cursor = tuple(shards[-1]["end"]) if shards else (0, 0)
        self.buf, self.n_buf, self.src = [], 0, {}  # pending tokens; source -> [tokens, docs, bytes]

    @property
    def full(self) -> bool:
        return self.cap > 0 and self.written + self.n_buf >= self.cap

    def add(self, doc: int, tokens: np.ndarray, source: str, n_bytes: int, on_shard) -> None:
        """Append a document's tokens, skipping what finished shards already hold."""
        if doc < self.cursor[0] or self.full:
            return
        pos = self.cursor[1] if doc == self.cursor[0] else 0
        if pos == 0:  # the document starts in this shard
            counts = self.src.setdefault(source, [0, 0, 0])
            counts[1] += 1
            counts[2] += n_bytes
        while pos < len(tokens) and not self.full:
            room = self.shard_tokens - self.n_buf
            if self.cap > 0:
                room = min(room, self.cap - self.written - self.n_buf)
            piece = tokens[pos:pos + room]
            self.buf.append(piece)
            self.n_buf += len(piece)
            self.src.setdefault(source, [0, 0, 0])[0] += len(piece)
            pos += len(piece)
            if self.n_buf == self.shard_tokens:
                self.flush((doc, pos), on_shard)

    def flush(self, end: tuple[int, int], on_shard) -> None:
        if self.n_buf == 0:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        path = os.path.join(self.out_dir, name)
        write_shard(path, np.concatenate(self.buf), self.vocab_size)
        sha = sha256_file(path)
        record_verified(self.out_dir, {name: sha})  # hashed just now: the first training start skips it
        self.shards.append({"file": name, "split": self.split, "n_tokens": self.n_buf, "sha256": sha,
                            "end": list(end), "sources": self.src})
        self.written += self.n_buf
        self.buf, self.n_buf, self.src = [], 0, {}
        on_shard()


def resume_shards(out_dir: str, progress: dict) -> dict:
    """Finished shards of a killed run that still verify, per split (a bad one drops it and later ones)."""
    keep = {s: [] for s in _SPLITS}
    for split in _SPLITS:
        for e in [e for e in progress["shards"] if e["split"] == split]:
            path = os.path.join(out_dir, e["file"])
            try:
                ok = os.path.exists(path) and sha256_file(path) == e["sha256"]
            except OSError:
                ok = False
            if not ok:
                print(f"resume: {path} missing or changed; rewriting it and the {split} shards after it")
                break
            keep[split].append(e)
    return keep


def existing_manifest(out_dir: str, settings: dict, names: list[str], progress_path: str) -> dict | None:
    """What out_dir already holds, checked before any source is opened (so a machine without the network
    or apt reuses shards carried to it): the manifest of a finished data set made with these settings
    from these sources whose every shard verifies (nothing to do), or None. A damaged one (a shard
    changed or missing) becomes progress.json, so that this run rebuilds it from the first bad shard of
    each split; an unreadable manifest is rebuilt; other settings are refused. The sources' provenance
    (package versions, hashes) is not re-read."""
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        manifest = load_manifest(out_dir)
    except ValueError as e:  # unreadable JSON or missing keys: rebuild everything
        print(f"{path}: unreadable ({str(e).split(';')[0][:120]}); rebuilding {out_dir}/")
        os.remove(path)
        return None
    made = {k: v for k, v in manifest.get("settings", {}).items() if k != "sources"}
    made_names = [s["name"] for s in manifest.get("sources", [])]
    if json.dumps(made, sort_keys=True) != json.dumps(settings, sort_keys=True) or made_names != names:
        differ = sorted(k for k in set(made) | set(settings) if json.dumps(made.get(k)) != json.dumps(settings.get(k)))
        differ += ["sources"] if made_names != names else []
        raise ValueError(f"{out_dir}/ holds shards made with other settings (fingerprint "
                         f"{manifest.get('fingerprint')}; differs in {', '.join(differ)}); pass --out_dir=<new dir> "
                         "or delete it")
    try:
        verify_shards(out_dir, full=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"{str(e).split(';')[0]}: rebuilding the shards of {out_dir}/ from the first bad one")
        atomic_write_json(progress_path, manifest)  # the manifest lists what a resume keeps (those that verify)
        os.remove(path)
        return None
    print(f"{out_dir}/ is complete and verified ({format_tokens(manifest['splits']['train']['n_tokens'])} train "
          f"tokens from {len(names)} sources, made with these settings); nothing to do, no source opened")
    return manifest


def main() -> dict:
    shard_tokens, max_docs, max_chars, val_fraction = SHARD_TOKENS, MAX_DOCS_PER_SOURCE, MAX_DOC_CHARS, VAL_FRACTION
    if SMOKE:
        shard_tokens, max_docs, max_chars, val_fraction = 2**12, 4, 6000, max(VAL_FRACTION, 0.25)
    name = {"debian": "debian", "fineweb-edu": "fineweb_edu"}.get(DATASET, os.path.basename(DATASET.rstrip("/")))
    out_dir = OUT_DIR or os.path.join("data", name + ("_smoke" if SMOKE else ""))
    t0 = time.time()

    tokenizer = load_tokenizer(TEACHER, MODELS_DIR)
    tok = tokenizer_info(tokenizer)
    if tok["eos_id"] is None:
        raise ValueError(f"tokenizer {tok['tokenizer']} has no EOS token; documents are joined with EOS")
    version = version_for_vocab(tok["vocab_size"])
    dtype = np.dtype(np.uint16 if version == 1 else np.uint32)
    ignore = ("OUT_DIR", "BATCH_DOCS", "MODELS_DIR", "DEBIAN_CACHE", "TEACHER")  # do not change the tokens
    settings = {k: v for k, v in config_dict(globals()).items() if k not in ignore}
    settings.update(SHARD_TOKENS=shard_tokens, MAX_DOCS_PER_SOURCE=max_docs, MAX_DOC_CHARS=max_chars,
                    VAL_FRACTION=val_fraction, tokenizer_sha256=tok["tokenizer_sha256"])
    progress_path = os.path.join(out_dir, "progress.json")
    manifest = existing_manifest(out_dir, settings, source_names(DATASET), progress_path)
    if manifest is not None:
        return manifest
    sources = open_sources(DATASET)
    settings["sources"] = [[n, info] for n, info, _ in sources]
    fingerprint = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:16]
    shards = {s: [] for s in _SPLITS}
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        if progress.get("fingerprint") == fingerprint:
            shards = resume_shards(out_dir, progress)
            print(f"resume: {sum(map(len, shards.values()))} finished shards kept")
        else:
            print(f"{progress_path}: from other settings, starting over")
    os.makedirs(out_dir, exist_ok=True)
    caps = {"train": MAX_TOKENS, "val": VAL_TOKENS}
    writers = {s: SplitWriter(out_dir, s, tok["vocab_size"], shard_tokens, caps[s], shards[s]) for s in _SPLITS}
    head = {"dataset": DATASET, **tok, "dtype": dtype.name, "shard_version": version, "fingerprint": fingerprint,
            "settings": settings}

    def save_progress():
        atomic_write_json(progress_path, {**head, "shards": writers["train"].shards + writers["val"].shards})

    if DATASET != "fineweb-edu":  # offline sources fit in memory: their size gives the progress bar an ETA
        sources = [(n, info, list(itertools.islice(docs, max_docs or None))) for n, info, docs in sources]
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    eos = np.array([tok["eos_id"]], dtype=np.int64)
    total_chars = sum(min(len(t), max_chars or len(t)) for _, _, docs in sources if isinstance(docs, list)
                      for _, t in docs)
    pbar = tqdm(desc=name, unit="tok", unit_scale=True, total=MAX_TOKENS or None, smoothing=0.1)
    chars_done, batch = 0, []

    def drain():
        nonlocal chars_done
        ids = tokenizer([t for _, _, _, t in batch], add_special_tokens=False)["input_ids"] if batch else []
        for (i, split, src, text), doc_ids in zip(batch, ids):
            tokens = np.concatenate([np.asarray(doc_ids, dtype=np.int64), eos])
            writers[split].add(i, tokens, src, len(text.encode("utf-8")), save_progress)
            chars_done += len(text)
            pbar.update(len(tokens))
        if total_chars and not MAX_TOKENS and chars_done:  # estimated total tokens, for the ETA
            pbar.total = max(pbar.n, int(pbar.n * total_chars / chars_done))
        batch.clear()

    n_doc = 0  # global document index: the resume cursor
    for src, _, docs in sources:
        pbar.set_postfix_str(src)
        for k, (_, text) in enumerate(docs):
            text = text[:max_chars] if max_chars else text
            if (max_docs and k >= max_docs) or writers["train"].full:
                break
            split = "val" if every and k % every == every // 2 else "train"
            w = writers[split]
            if n_doc >= w.cursor[0] and not w.full:  # documents before the cursor are in finished shards
                batch.append((n_doc, split, src, text))
            else:
                chars_done += len(text)
            n_doc += 1
            if len(batch) == BATCH_DOCS:
                drain()
        drain()
    pbar.close()
    for s in _SPLITS:
        writers[s].flush((n_doc, 0), save_progress)
    if not writers["val"].shards:
        raise ValueError(f"{DATASET}: no val documents (VAL_FRACTION={val_fraction}, {n_doc} documents); "
                         f"raise --val_fraction or add documents")

    all_shards = writers["train"].shards + writers["val"].shards
    per_source = {n: {"train_tokens": 0, "val_tokens": 0, "docs": 0, "bytes": 0} for n, _, _ in sources}
    for e in all_shards:
        for n, (count, docs, n_bytes) in e["sources"].items():
            per_source[n][f"{e['split']}_tokens"] += count
            per_source[n]["docs"] += docs
            per_source[n]["bytes"] += n_bytes
    manifest = {**head, "sources": [{"name": n, **info, **per_source[n]} for n, info, _ in sources],
                "splits": {s: {"n_tokens": writers[s].written, "n_shards": len(writers[s].shards)} for s in _SPLITS},
                "shards": all_shards, "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
    os.remove(progress_path)
    for n, _, _ in sources:
        p = per_source[n]
        print(f"{n:24s} train {format_tokens(p['train_tokens']):>8s} | val {format_tokens(p['val_tokens']):>8s}")
    print(f"{out_dir}/: train {format_tokens(writers['train'].written)} tokens in {len(writers['train'].shards)} "
          f"shards, val {format_tokens(writers['val'].written)} in {len(writers['val'].shards)}, {dtype.name}, "
          f"vocab {tok['vocab_size']}, eos {tok['eos_id']}, {time.time() - t0:.1f}s")
    return manifest


if __name__ == "__main__":
    run_script(globals(), main)
