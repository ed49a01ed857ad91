"""Shard format, manifest checks, the loader (determinism, rank striding, resume), tokenizer check."""

import json
import os

import numpy as np
import pytest
import torch

from hybrid.checkpoint import atomic_write_json
from hybrid.shards import (HEADER_INTS, MAGIC, ShardLoader, check_tokenizer, load_manifest, read_header,
                           read_tokens, sha256_file, tokenizer_info, val_batches, verify_shards, write_shard)


class FakeTokenizer:
    """The parts of a HF tokenizer the shard code uses."""

    def __init__(self, vocab_size: int, eos: int = 0, name: str = "fake"):
        self.vocab = {f"t{i}": i for i in range(vocab_size)}
        self.eos_token_id, self.name_or_path = eos, name

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def make_dataset(root, splits=None, vocab_size=4096, tokenizer=None):
    """Shards of consecutive ids (so windows are easy to check) plus a manifest like prepare.py's."""
    splits = splits or {"train": [500, 300, 701], "val": [300]}
    tokenizer = tokenizer or FakeTokenizer(vocab_size)
    shards, start = [], 0
    for split, sizes in splits.items():
        for i, n in enumerate(sizes):
            name = f"{split}_{i:06d}.bin"
            write_shard(os.path.join(root, name), (np.arange(start, start + n) % vocab_size), vocab_size)
            start += n
            sha = sha256_file(os.path.join(root, name))
            shards.append({"file": name, "split": split, "n_tokens": n, "sha256": sha})
    info = tokenizer_info(tokenizer)
    dtype = "uint16" if info["vocab_size"] <= 2**16 else "uint32"
    atomic_write_json(os.path.join(root, "manifest.json"), {**info, "dtype": dtype, "shards": shards})
    return str(root)


@pytest.mark.parametrize("vocab_size,version,dtype", [(50000, 1, np.uint16), (2**16, 1, np.uint16),
                                                       (2**16 + 1, 2, np.uint32), (151_936, 2, np.uint32)])
def test_roundtrip(tmp_path, vocab_size, version, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=1234)
    tokens[:2] = (0, vocab_size - 1)  # both ends of the range survive
    path = str(tmp_path / "a.bin")
    write_shard(path, tokens, vocab_size)
    h = read_header(path)
    assert (h["magic"], h["version"], h["n_tokens"], h["dtype"]) == (MAGIC, version, 1234, np.dtype(dtype).name)
    back = read_tokens(path)
    assert back.dtype == dtype and np.array_equal(np.asarray(back, dtype=np.int64), tokens)
    assert os.path.getsize(path) == HEADER_INTS * 4 + 1234 * np.dtype(dtype).itemsize
    assert not os.path.exists(path + ".tmp")


def test_large_vocab_tokenizer_gives_v2_shards(tmp_path):
    tok = FakeTokenizer(70000)
    root = make_dataset(tmp_path, {"train": [100], "val": [50]}, vocab_size=tokenizer_info(tok)["vocab_size"],
                        tokenizer=tok)
    assert read_header(os.path.join(root, "train_000000.bin"))["version"] == 2
    assert load_manifest(root)["dtype"] == "uint32"


@pytest.mark.parametrize("bad", [65536, -1])
def test_ids_outside_the_vocab_raise(tmp_path, bad):
    with pytest.raises(ValueError, match="outside the vocab"):
        write_shard(str(tmp_path / "x.bin"), np.array([1, bad, 3]), 65536)
    with pytest.raises(ValueError, match="outside the vocab"):  # never a silent overflow, in either version
        write_shard(str(tmp_path / "y.bin"), np.array([2**32 - 1 + 1]), 2**32)
    assert not os.path.exists(tmp_path / "x.bin")


def test_truncated_shard_names_file_and_fix(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    write_shard(path, np.arange(100), 1000)
    with open(path, "r+b") as f:
        f.truncate(HEADER_INTS * 4 + 150)
    with pytest.raises(ValueError, match=r"train_000000\.bin.*truncated.*prepare\.py"):
        read_header(path)
    with open(path, "r+b") as f:
        f.truncate(100)  # not even a header
    with pytest.raises(ValueError, match=r"train_000000\.bin.*header.*prepare\.py"):
        read_tokens(path)


def test_wrong_magic_names_file_and_fix(tmp_path):
    path = str(tmp_path / "val_000000.bin")
    write_shard(path, np.arange(10), 1000)
    with open(path, "r+b") as f:
        f.write(np.int32(1234).tobytes())
    with pytest.raises(ValueError, match=r"val_000000\.bin: magic 1234, expected 20240520.*prepare\.py"):
        read_header(path)


def test_manifest_mismatch_and_sha256(tmp_path):
    root = make_dataset(tmp_path)
    verify_shards(root, full=True)
    path = os.path.join(root, "train_000001.bin")
    tokens = np.asarray(read_tokens(path)).copy()
    tokens[5] += 1
    write_shard(path, tokens, 4096)  # same size, different bytes: only the hash sees it
    verify_shards(root)  # the cheap check passes
    with pytest.raises(ValueError, match=r"train_000001\.bin: sha256 differs.*prepare\.py"):
        verify_shards(root, full=True)
    write_shard(path, tokens[:-1], 4096)  # a whole shard, but not the one the manifest describes
    with pytest.raises(ValueError, match=r"train_000001\.bin.*manifest.json says 300.*prepare\.py"):
        ShardLoader(root, "train", 2, 8)


def test_missing_manifest_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json.*prepare.py"):
        ShardLoader(str(tmp_path), "train", 2, 8)
    root = make_dataset(tmp_path, {"train": [100]})
    with pytest.raises(ValueError, match="no 'val' shards"):
        ShardLoader(root, "val", 2, 8)
    with pytest.raises(ValueError, match="B\\*T\\+1"):
        ShardLoader(root, "train", 8, 64)


def test_other_tokenizer_is_rejected(tmp_path):
    tok = FakeTokenizer(4096, eos=0, name="teacher-a")
    root = make_dataset(tmp_path, tokenizer=tok)
    check_tokenizer(load_manifest(root), FakeTokenizer(4096, eos=0, name="copy-of-a"), root)  # same ids: fine
    other = FakeTokenizer(4096, eos=0, name="teacher-b")
    other.vocab["t1"], other.vocab["t2"] = 2, 1  # same size and EOS, different ids
    with pytest.raises(ValueError, match=r"manifest\.json: shards were made with tokenizer 'teacher-a'.*"
                                         r"tokenizer_sha256.*prepare\.py"):
        check_tokenizer(load_manifest(root), other, root)
    with pytest.raises(ValueError, match="eos_id"):
        check_tokenizer(load_manifest(root), FakeTokenizer(4096, eos=7), root)
    with pytest.raises(ValueError, match="another tokenizer"):
        ShardLoader(root, "train", 2, 8, vocab_size=500)


def test_loader_windows_and_determinism(tmp_path):
    root = make_dataset(tmp_path)
    B, T = 2, 16
    a, b = ShardLoader(root, "train", B, T), ShardLoader(root, "train", B, T)
    # windows per shard: (500-1)//32=15, (300-1)//32=9, (701-1)//32=21
    assert a.total == 15 + 9 + 21
    for step in range(2 * a.total + 3):  # wraps around twice
        x, y = a.next_batch()
        x2, y2 = b.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one, across rows
        assert torch.all(y.flatten() - x.flatten() == 1)  # ids are consecutive: contiguous, in one shard
    loader = ShardLoader(root, "train", B, T)
    firsts = [int(loader.next_batch()[0][0, 0]) for _ in range(loader.total)]
    assert firsts[:2] == [0, 32] and firsts[15] == 500 and firsts[24] == 800  # shard order, offsets k*B*T


def test_rank_striding(tmp_path):
    root = make_dataset(tmp_path)
    B, T, n = 1, 8, 40
    single = ShardLoader(root, "train", B, T)
    seq = [single.next_batch()[0] for _ in range(2 * n)]
    ranks = [ShardLoader(root, "train", B, T, rank=r, world_size=2) for r in range(2)]
    got = [[ranks[r].next_batch()[0] for _ in range(n)] for r in range(2)]
    assert all(torch.equal(got[0][i], seq[2 * i]) and torch.equal(got[1][i], seq[2 * i + 1]) for i in range(n))
    starts = [{int(x[0, 0]) for x in got[r][:ranks[0].total // 2]} for r in range(2)]
    assert not starts[0] & starts[1]  # within one pass the ranks read disjoint windows


def test_exact_resume(tmp_path):
    root = make_dataset(tmp_path)
    ref = ShardLoader(root, "train", 2, 8, rank=1, world_size=3)
    expected = [ref.next_batch() for _ in range(30)]
    first = ShardLoader(root, "train", 2, 8, rank=1, world_size=3)
    for _ in range(11):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round-trip
    resumed = ShardLoader(root, "train", 2, 8, rank=1, world_size=3)
    resumed.load_state_dict(state)
    for x, y in expected[11:]:
        x2, y2 = resumed.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="same data and batch shape"):
        ShardLoader(root, "train", 4, 8).load_state_dict(state)


def test_val_batches(tmp_path):
    root = make_dataset(tmp_path, {"train": [100], "val": [300]})
    v = val_batches(root, 2, 16, 100)
    assert len(v) == (300 - 1) // 32  # capped at the windows there are, never repeated
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v, val_batches(root, 2, 16, 100)))
    v0, v1 = (val_batches(root, 2, 16, 100, rank=r, world_size=2) for r in range(2))
    assert len(v0) == len(v1) == 4  # the same count on every rank
    assert torch.equal(v1[0][0], v[1][0])


def test_loader_checks_shard_bytes_and_caches_the_check(tmp_path, monkeypatch):
    import hybrid.shards as shards
    root = make_dataset(tmp_path)
    path = os.path.join(root, "train_000001.bin")
    with open(path, "r+b") as f:  # one flipped byte, same size: headers and sizes still agree
        f.seek(HEADER_INTS * 4 + 11)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match=r"train_000001\.bin: sha256 differs.*prepare\.py"):
        ShardLoader(root, "train", 2, 8)
    with pytest.raises(ValueError, match=r"val_000000\.bin: sha256 differs"):
        vpath = os.path.join(root, "val_000000.bin")
        with open(vpath, "r+b") as f:
            f.seek(HEADER_INTS * 4)
            f.write(b"\xff\xff")
        val_batches(root, 2, 8, 1)

    root = make_dataset(tmp_path / "good")
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    ShardLoader(root, "train", 2, 8)
    assert len(calls) == 3 and os.path.exists(os.path.join(root, shards.VERIFIED))
    calls.clear()
    ShardLoader(root, "train", 2, 8)
    val_batches(root, 2, 8, 1)
    assert len(calls) == 1  # the train shards are not hashed again; val is hashed once
    path = os.path.join(root, "train_000002.bin")
    with open(path, "r+b") as f:
        f.seek(HEADER_INTS * 4 + 2)
        f.write(b"\x07\x00")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edit a second later
    calls.clear()
    with pytest.raises(ValueError, match=r"train_000002\.bin: sha256 differs"):
        ShardLoader(root, "train", 2, 8)
    assert calls == [path]  # only the changed file was hashed
