"""In-context recall suite: MQAR (Zoology, arXiv 2312.04927), the next-token task of recall_tasks.py.

Key-value pairs of single-token words, a haystack window, then the same pairs in another order: the
model must predict each value right after its key (one forward pass, argmax at each value position,
no decoding). Keys and values never occur elsewhere in the prompt.
"""

import random

import numpy as np

MQAR_PAIRS = 32       # key-value pairs (fewer when the length is too short for them)


def word_tokens(tokenizer) -> list[int]:
    """Token ids that are whole lowercase words (3+ letters) which " word" encodes to alone: MQAR's keys/values."""
    vocab = sorted(tokenizer.get_vocab().values())
    words = [(t, s.strip()) for t, s in zip(vocab, tokenizer.batch_decode([[t] for t in vocab]))]
    words = [(t, w) for t, w in words if len(w) >= 3 and w.isalpha() and w.isascii() and w.islower()]
    encoded = tokenizer([" " + w for _, w in words], add_special_tokens=False)["input_ids"] if words else []
    return [t for (t, _), ids in zip(words, encoded) if ids == [t]]


def mqar_sample(tokenizer, hay: np.ndarray, length: int, rng: random.Random, words: list[int]) -> dict:
    """One MQAR record of exactly `length` tokens: the pairs, a haystack window, the pairs again in
    another order; answer_positions index each repeated value (its key is the token before it)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    head = enc("Memorize the following pairs of words; each key word is followed by its value word.\n")
    mid = enc("\n\nNow the same pairs again, in another order:\n")
    sep = enc(",")
    per_pair = 2 + len(sep)
    n_pairs = min(MQAR_PAIRS, (length - len(head) - len(mid)) // (4 * per_pair))
    if n_pairs < 1:
        raise ValueError(f"mqar: length {length} is too short for even one pair; use longer lengths")
    newline = enc("\n")
    filler_len = length - len(head) - len(mid) - len(newline) - 2 * n_pairs * per_pair
    start = rng.randrange(0, len(hay) - filler_len)
    filler = hay[start:start + filler_len].tolist()
    used = set(filler) | set(head) | set(mid) | set(sep) | set(newline)
    pool = [t for t in words if t not in used]  # a key or value never occurs elsewhere in the prompt
    if len(pool) < 2 * n_pairs:
        raise ValueError(f"mqar: the tokenizer has {len(pool)} single-token words absent from the haystack window, "
                         f"need {2 * n_pairs}; lower MQAR_PAIRS or use a larger vocabulary")
    chosen = rng.sample(pool, 2 * n_pairs)
    keys, values = chosen[:n_pairs], chosen[n_pairs:]
    ids = head[:]
    for kt, vt in zip(keys, values):
        ids += [kt, vt] + sep
    ids += newline + filler + mid
    order = list(range(n_pairs))
    rng.shuffle(order)
    positions = []
    for i in order:
        ids += [keys[i]]
        positions.append(len(ids))
        ids += [values[i]] + sep
    assert len(ids) == length, (len(ids), length)
    return {"task": "mqar", "length": length, "depth": 0.0, "input_ids": ids, "answer_positions": positions,
            "n_tokens": length}
