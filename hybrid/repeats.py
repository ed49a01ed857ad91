"""Stage-2 rows with long-range exact repeats: practice for in-context recall.

A softmax teacher predicts the second occurrence of a span almost perfectly once its first tokens
are in (induction: find the earlier occurrence, copy what followed it). A linear layer has to carry
that span in its fixed-size state, and this is the ability a hybrid loses first: its recall is 10-24%
of the teacher's after 63M stage-2 tokens of plain text (docs/results.md). Plain documentation text
repeats itself, but rarely exactly and rarely far apart, so the KL has little to say about it.

RepeatSpans wraps a loader. In a fraction of the rows it copies spans of the row to later places in
the same row, at distances up to the row's length, until about COVER of the row is a copy. The
teacher's targets come from the edited rows as usual, so the student is taught where the teacher
copies. The spans are the row's own text, and no prompt template is involved: the recall suite's
tasks (passkey, needles, variable tracking, MQAR with their own wording, on held-out text) do not
appear in training. Held-out KL is measured on plain validation rows; repeated_batches edits held-out
rows the same way for a score that weighs copying (select_layers.py's VAL_REPEATS).

The edits depend only on (seed, rank, the wrapped loader's batch index), so a resumed run sees the same
batches: state_dict() and load_state_dict() are the wrapped loader's (a ShardLoader's).
"""

import numpy as np
import torch

MIN_SPAN, MAX_SPAN = 16, 128  # tokens per copied span
COVER = 0.25                  # share of an edited row that copies cover


class RepeatSpans:
    def __init__(self, loader, fraction: float, seed: int):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"RepeatSpans: fraction {fraction} of rows; expected a number in [0, 1]")
        self.loader, self.fraction, self.seed = loader, fraction, seed

    def __getattr__(self, name):  # everything else is the wrapped loader's (state_dict, manifest, B, T, ...)
        return getattr(self.loader, name)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.loader.rank, self.loader.step])
        x, y = self.loader.next_batch()
        return with_repeats(x, y, np.flatnonzero(rng.random(x.shape[0]) < self.fraction), rng)


def with_repeats(x: torch.Tensor, y: torch.Tensor, rows, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a batch with `rows` given long-range repeats of their own spans (repeat_spans, in row order);
    copies when any row changes (x and y may be views of one window: rows share boundary tokens)."""
    if len(rows):
        x, y = x.clone(), y.clone()
    for i in rows:
        row = torch.cat([x[i], y[i, -1:]])  # the row's T + 1 tokens
        repeat_spans(row, rng)
        x[i], y[i] = row[:-1], row[1:]
    return x, y


def repeated_batches(batches, fraction: float, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out (x, y) batches with `fraction` of their rows given repeats: scoring on text where a teacher
    copies. The same (batches, fraction, seed) give the same rows and spans (rows and spans are drawn from
    two streams: at fraction 1 the spans are those of with_repeats(x, y, every row, default_rng(seed)))."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"repeated_batches: fraction {fraction} of rows; expected a number in [0, 1]")
    pick, spans = np.random.default_rng([seed, 1]), np.random.default_rng(seed)
    return [with_repeats(x, y, np.flatnonzero(pick.random(x.shape[0]) < fraction), spans) for x, y in batches]


def repeat_spans(row: torch.Tensor, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Copy spans of `row` (1-D, in place) to later places in it until copies cover COVER of it;
    -> [(source, destination, length)] in order (a later copy may overwrite part of an earlier one).
    Rows shorter than 4 * MIN_SPAN are left alone."""
    n, copies, covered = row.numel(), [], 0
    while n >= 4 * MIN_SPAN and covered < COVER * n:
        s = int(rng.integers(MIN_SPAN, min(MAX_SPAN, n // 4) + 1))
        src = int(rng.integers(0, n - 2 * s + 1))
        dst = int(rng.integers(src + s, n - s + 1))  # after the source ends: no overlap
        row[dst:dst + s] = row[src:src + s].clone()
        copies.append((src, dst, s))
        covered += s
    return copies
