"""Token shards: the llm.c `.bin` format, a manifest, and a memmap loader (rank-strided, resumable).

Layout of a data set written by prepare.py:

    data/<name>/train_000000.bin, train_000001.bin, ..., val_000000.bin, manifest.json

A shard is a header of 256 int32 (`[0]` magic 20240520, `[1]` version, `[2]` n_tokens) followed by
the tokens: version 1 = uint16 (vocab <= 65536, NanoGPT/llm.c compatible), version 2 = uint32 (Llama-3,
Qwen). The version is chosen from the vocab size; ids that do not fit raise, never wrap silently.
manifest.json records the tokenizer (name, vocab size, EOS id, vocab fingerprint), the dtype, the
sources, and per shard its n_tokens and sha256. A loader checks every shard's bytes against that
sha256 before it reads them; verified.json remembers which files were hashed, so a start rehashes
only new or changed files.
"""

import bisect
import hashlib
import json
import os

import numpy as np
import torch

MAGIC = 20240520
HEADER_INTS = 256
DTYPES = {1: np.uint16, 2: np.uint32}
FIX = "re-run `python prepare.py` with the same settings to rebuild it"


def version_for_vocab(vocab_size: int) -> int:
    """1 (uint16) when every id fits in 16 bits, else 2 (uint32)."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size}: expected 1..2**32")
    return 1 if vocab_size <= 2**16 else 2


def write_shard(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens (1-D ints, each < vocab_size) as a shard, atomically (path.tmp, then rename)."""
    version = version_for_vocab(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{path}: token ids span [{int(tokens.min())}, {int(tokens.max())}], outside the "
                         f"vocab [0, {vocab_size}); wrong vocab_size or tokenizer")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, version, tokens.size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(DTYPES[version]).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str) -> dict:
    """-> {"magic", "version", "n_tokens", "dtype"}; ValueError naming the file for anything but a whole shard."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such shard; {FIX}")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_INTS * 4}-byte header; "
                         f"truncated or not a shard, {FIX}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    magic, version, n_tokens = (int(x) for x in header[:3])
    if magic != MAGIC:
        raise ValueError(f"{path}: magic {magic}, expected {MAGIC}; not a shard or corrupted, {FIX}")
    if version not in DTYPES:
        raise ValueError(f"{path}: header version {version}, expected one of {sorted(DTYPES)}; "
                         f"written by another tool? {FIX}")
    dtype = np.dtype(DTYPES[version])
    expected = HEADER_INTS * 4 + n_tokens * dtype.itemsize
    if size != expected:
        raise ValueError(f"{path}: {size} bytes but the header says {n_tokens} tokens of {dtype.name} "
                         f"({expected} bytes); truncated or partly written, {FIX}")
    return {"magic": magic, "version": version, "n_tokens": n_tokens, "dtype": dtype.name}


def read_tokens(path: str) -> np.memmap:
    """The tokens of a shard as a read-only memmap (header checked first)."""
    h = read_header(path)
    return np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_INTS * 4, shape=(h["n_tokens"],))


def split_tokens(data_dir: str, split: str = "val") -> np.ndarray:
    """Every token of a split's shards, in manifest order, as one int64 array (e.g. a recall haystack)."""
    files = [s["file"] for s in load_manifest(data_dir)["shards"] if s["split"] == split]
    if not files:
        raise ValueError(f"{data_dir}/manifest.json lists no {split!r} shards; re-run prepare.py")
    return np.concatenate([np.asarray(read_tokens(os.path.join(data_dir, f)), dtype=np.int64) for f in files])


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: no prepared data set in {data_dir}/; "
                                f"run `python prepare.py` first (or pass the right data dir)")
    with open(path) as f:
        manifest = json.load(f)
    for key in ("vocab_size", "dtype", "shards"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}; written by an older prepare.py? {FIX}")
    return manifest


VERIFIED = "verified.json"  # per data dir: shards whose bytes were hashed and matched the manifest


def _file_id(path: str) -> list[int]:
    """What changes when a file is rewritten or edited: size, inode, mtime, ctime (ns)."""
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _read_verified(data_dir: str) -> dict:
    try:
        with open(os.path.join(data_dir, VERIFIED)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: everything gets hashed once more


def record_verified(data_dir: str, files: dict[str, str]) -> None:
    """Remember that each file (name -> sha256) was hashed just now, keyed by its file id, so the next
    start skips rehashing it. Best effort: a read-only data dir just means hashing at every start."""
    stamps = _read_verified(data_dir)
    for name, sha in files.items():
        stamps[name] = {"sha256": sha, "file_id": _file_id(os.path.join(data_dir, name))}
    tmp = os.path.join(data_dir, f"{VERIFIED}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(stamps, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(data_dir, VERIFIED))
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_shards(data_dir: str, split: str | None = None, full: bool = False) -> list[str]:
    """Check every shard of the manifest (one split or all) exists with the recorded header and size;
    full=True also checks its bytes against the manifest's sha256. A shard hashed before and unchanged
    since (same size, inode, mtime, ctime: data_dir/verified.json) is not hashed again; delete that file
    to force a rehash. Returns the paths; raises ValueError naming the file."""
    manifest = load_manifest(data_dir)
    entries = [e for e in manifest["shards"] if split is None or e["split"] == split]
    if split is not None and not entries:
        splits = sorted({e["split"] for e in manifest["shards"]})
        raise ValueError(f"{data_dir}/manifest.json lists no {split!r} shards (splits: {splits}); {FIX}")
    paths = []
    stamps = _read_verified(data_dir) if full else {}
    hashed = {}
    for e in entries:
        path = os.path.join(data_dir, e["file"])
        h = read_header(path)
        if h["n_tokens"] != e["n_tokens"] or h["dtype"] != manifest["dtype"]:
            raise ValueError(f"{path}: header says {h['n_tokens']} tokens of {h['dtype']}, manifest.json says "
                             f"{e['n_tokens']} of {manifest['dtype']}; shard and manifest disagree, {FIX}")
        stamp = stamps.get(e["file"], {})
        if full and (stamp.get("sha256") != e["sha256"] or stamp.get("file_id") != _file_id(path)):
            if sha256_file(path) != e["sha256"]:
                raise ValueError(f"{path}: sha256 differs from manifest.json; the file changed after it was "
                                 f"written, {FIX}")
            hashed[e["file"]] = e["sha256"]
        paths.append(path)
    if hashed:
        record_verified(data_dir, hashed)
    return paths


class ShardLoader:
    """Contiguous (B, T) batches from the shards of one split, rank-strided, deterministic, endless.

    Each shard holds windows of B*T+1 tokens at offsets 0, B*T, 2*B*T, ... (neighbours share one token,
    as in llm.c; a window never crosses a shard). Windows are numbered globally over the shards in
    order; rank r reads windows r, r + world_size, r + 2*world_size, ... and wraps around after the last,
    so the ranks together read exactly the sequence a single process reads. No RNG is involved.
    """

    def __init__(self, data_dir: str, split: str, B: int, T: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        if B <= 0 or T <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"ShardLoader: bad B={B}, T={T}, rank={rank}, world_size={world_size}")
        self.data_dir, self.split, self.B, self.T = data_dir, split, B, T
        self.rank, self.world_size = rank, world_size
        self.manifest = load_manifest(data_dir)
        if vocab_size is not None and self.manifest["vocab_size"] > vocab_size:
            raise ValueError(f"{data_dir}/manifest.json: tokens from a vocab of {self.manifest['vocab_size']}, "
                             f"but the model has {vocab_size} embeddings; shards made with another tokenizer, "
                             f"re-run `python prepare.py --teacher=<this model>`")
        self.paths = verify_shards(data_dir, split, full=True)  # hashed once, then cached in verified.json
        self.n_windows = [(read_header(p)["n_tokens"] - 1) // (B * T) for p in self.paths]
        self.total = sum(self.n_windows)
        if self.total == 0:
            n = sum(read_header(p)["n_tokens"] for p in self.paths)
            raise ValueError(f"{data_dir}: split {split!r} has {n} tokens but one batch needs B*T+1 = "
                             f"{B * T + 1} in one shard; lower B or T, or prepare more data")
        self.starts = np.cumsum([0] + self.n_windows[:-1]).tolist()
        self.step = 0  # batches this rank has returned
        self._open = (None, None)

    def _tokens(self, shard: int) -> np.memmap:
        if self._open[0] != shard:  # keep one memmap open: shards are read in order
            self._open = (shard, read_tokens(self.paths[shard]))
        return self._open[1]

    def window(self, index: int) -> np.ndarray:
        """Global window `index` (mod the number of windows) as B*T+1 int64 tokens."""
        index %= self.total
        shard = bisect.bisect_right(self.starts, index) - 1
        off = (index - self.starts[shard]) * self.B * self.T
        return np.asarray(self._tokens(shard)[off:off + self.B * self.T + 1], dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x, y: int64 CPU tensors (B, T); y is x shifted by one token."""
        buf = torch.from_numpy(self.window(self.step * self.world_size + self.rank))
        self.step += 1
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def seek(self, tokens: int) -> None:
        """Start at the first whole window at or after train token `tokens` (modulo the split), e.g. where a
        loader with another B, T stopped (its state's windows_read * B * T): the text after it comes next."""
        windows = -(-tokens // (self.B * self.T))
        self.step = -(-windows // self.world_size)

    def state_dict(self) -> dict:
        return {"split": self.split, "B": self.B, "T": self.T, "world_size": self.world_size,
                "windows_read": self.step * self.world_size, "total": self.total}

    def load_state_dict(self, d: dict) -> None:
        """Resume where a loader with the same B, T stopped; a new world_size resumes at the same
        global position (rounded down to a whole round of ranks)."""
        if (d["split"], d["B"], d["T"], d["total"]) != (self.split, self.B, self.T, self.total):
            raise ValueError(f"loader state is for split={d['split']!r} B={d['B']} T={d['T']} with {d['total']} "
                             f"windows, this loader has split={self.split!r} B={self.B} T={self.T} with "
                             f"{self.total}; resume with the same data and batch shape")
        self.step = d["windows_read"] // self.world_size


def val_batches(data_dir: str, B: int, T: int, n_batches: int, rank: int = 0,
                world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches of the "val" split for this rank, the same every call. Never repeats a
    window: with fewer windows, every rank gets the same smaller count (so collectives stay matched)."""
    loader = ShardLoader(data_dir, "val", B, T, rank, world_size)
    n = min(n_batches, loader.total // world_size)
    if n == 0:
        raise ValueError(f"{data_dir}: val split has {loader.total} windows of B*T+1 = {B * T + 1} tokens, "
                         f"fewer than world_size={world_size}; lower B or T, or prepare more val data")
    return [loader.next_batch() for _ in range(n)]


def tokenizer_info(tokenizer) -> dict:
    """What identifies a tokenizer's ids: name, vocab size, EOS id and a sha256 of its vocab."""
    vocab = tokenizer.get_vocab()
    vocab_size = max(len(tokenizer), max(vocab.values()) + 1)
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return {"tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            "vocab_size": vocab_size, "eos_id": tokenizer.eos_token_id,
            "tokenizer_sha256": hashlib.sha256(blob).hexdigest()}


def check_tokenizer(manifest: dict, tokenizer, data_dir: str) -> None:
    """ValueError when the shards in data_dir were tokenized by another tokenizer than `tokenizer`."""
    mine = tokenizer_info(tokenizer)
    for key in ("vocab_size", "eos_id", "tokenizer_sha256"):
        if manifest.get(key) != mine[key]:
            raise ValueError(f"{data_dir}/manifest.json: shards were made with tokenizer "
                             f"{manifest.get('tokenizer')!r} ({key}={manifest.get(key)!r}), but the model's "
                             f"tokenizer {mine['tokenizer']!r} has {key}={mine[key]!r}; re-run "
                             f"`python prepare.py --teacher=<this teacher> --out_dir=<new dir>`")


class RandomBatches:
    """ShardLoader's interface on random tokens (benchmarks, tests): next_batch() -> int64 CPU (x, y)
    of shape (B, T), cycling through n fixed batches drawn from `seed`."""

    def __init__(self, B: int, T: int, vocab: int, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = [torch.randint(0, vocab, (B, T + 1), generator=g) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        buf = self.data[self.i % len(self.data)]
        self.i += 1
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
