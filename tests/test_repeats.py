"""hybrid/repeats.py: stage 2's rows with long-range repeats (exact copies, determinism, resume)."""

import numpy as np
import pytest
import torch

from hybrid import repeats
from hybrid.repeats import RepeatSpans, repeat_spans, repeated_batches, with_repeats
from hybrid.shards import ShardLoader
from tests.test_shards import make_dataset


def test_spans_are_exact_later_copies_covering_a_quarter():
    n = 1000
    row = torch.arange(n)
    copies = repeat_spans(row, np.random.default_rng(3))
    assert sum(s for _, _, s in copies) >= repeats.COVER * n and len(copies) >= 2
    for src, dst, s in copies:
        assert repeats.MIN_SPAN <= s <= repeats.MAX_SPAN and src + s <= dst and dst + s <= n
    src, dst, s = copies[-1]  # the last copy is intact
    assert torch.equal(row[dst:dst + s], row[src:src + s])
    fresh = torch.arange(n)  # replaying the copies on the original row gives the same row
    for src, dst, s in copies:
        fresh[dst:dst + s] = fresh[src:src + s].clone()
    assert torch.equal(fresh, row) and not torch.equal(row, torch.arange(n))
    short = torch.arange(4 * repeats.MIN_SPAN - 1)
    assert repeat_spans(short, np.random.default_rng(0)) == [] and torch.equal(short, torch.arange(short.numel()))


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path, {"train": [8 * 4 * 256 + 1], "val": [300]})


def test_rows_edited_at_the_given_share_deterministically(data):
    plain = ShardLoader(data, "train", 4, 256)
    same = RepeatSpans(ShardLoader(data, "train", 4, 256), 0.0, seed=1)
    half, again = (RepeatSpans(ShardLoader(data, "train", 4, 256), 0.5, seed=1) for _ in range(2))
    edited = 0
    for _ in range(8):
        x, y = plain.next_batch()
        x0, y0 = same.next_batch()
        xh, yh = half.next_batch()
        xa, ya = again.next_batch()
        assert torch.equal(x0, x) and torch.equal(y0, y)  # share 0: the plain batches
        assert torch.equal(xh, xa) and torch.equal(yh, ya)  # same seed and batch index: same edits
        assert torch.equal(xh[:, 1:], yh[:, :-1])  # y is still x shifted by one
        changed = (xh != x).any(1) | (yh != y).any(1)
        edited += int(changed.sum())
        assert set(xh[changed].flatten().tolist()) <= set(torch.cat([x, y], 1)[changed].flatten().tolist())
        assert torch.equal(xh[~changed], x[~changed])
    assert 8 <= edited <= 24, edited  # 32 rows at a share of 0.5
    one, two = (RepeatSpans(ShardLoader(data, "train", 4, 256), 1.0, seed=s) for s in (1, 2))
    assert not torch.equal(one.next_batch()[0], two.next_batch()[0])  # another seed, other edits


def test_resume_sees_the_same_batches(data):
    a = RepeatSpans(ShardLoader(data, "train", 4, 256), 1.0, seed=5)
    for _ in range(3):
        a.next_batch()
    b = RepeatSpans(ShardLoader(data, "train", 4, 256), 1.0, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.manifest is a.loader.manifest and a.T == 256  # the rest is the wrapped loader's
    with pytest.raises(ValueError, match="fraction 1.5 of rows"):
        RepeatSpans(a.loader, 1.5, seed=0)


def test_repeated_val_batches(data):
    """repeated_batches: held-out batches with a share of rows edited, the same every call; share 1 edits every
    row with the spans of one stream (as experiments/ablate_heads.py scored them)."""
    loader = ShardLoader(data, "train", 4, 256)
    val = [loader.next_batch() for _ in range(4)]
    for (x, y), (x0, y0) in zip(val, repeated_batches(val, 0.0, seed=3)):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    every = repeated_batches(val, 1.0, seed=3)
    rng = np.random.default_rng(3)
    for (x, y), (xe, ye) in zip(val, every):
        xr, yr = with_repeats(x, y, range(4), rng)
        assert torch.equal(xe, xr) and torch.equal(ye, yr) and (xe != x).any(1).all()
        assert torch.equal(xe[:, 1:], ye[:, :-1])
    half, again = repeated_batches(val, 0.5, seed=3), repeated_batches(val, 0.5, seed=3)
    changed = [(xh != x).any(1) for (x, _), (xh, _) in zip(val, half)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(half, again))  # deterministic
    assert 2 <= int(sum(c.sum() for c in changed)) <= 14  # 16 rows at a share of 0.5
    assert all(torch.equal(xh[~c], x[~c]) for (x, _), (xh, _), c in zip(val, half, changed))
    with pytest.raises(ValueError, match="fraction -0.1 of rows"):
        repeated_batches(val, -0.1, seed=0)
