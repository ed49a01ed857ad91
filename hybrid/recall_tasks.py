"""In-context recall suite, part 1: build the samples and freeze them to jsonl.

RULER-style tasks (arXiv 2404.06654) plus MQAR (Zoology, arXiv 2312.04927), generated from a
given tokenizer and haystack text with fixed seeds, so that teacher and student see identical
samples. The same seed, tokenizer and haystack give a byte-identical jsonl file.

Generation tasks (answered by greedy decoding, scored by string match in recall_score.py):
  passkey          one number hidden in the haystack
  niah_single      one "special magic number" for a key
  niah_uuid        the same with a uuid-like value
  niah_multikey    four needles with different keys and values; one key is asked for
  niah_multivalue  four values of one key; all must be recalled
  vt               variable tracking: VAR A = 12345, VAR B = VAR A, ... plus a distractor chain;
                   the answer is every variable that holds the asked value
Next-token task (one forward pass, no decoding; its samples: recall_mqar.py):
  mqar             key-value word pairs, haystack, then the pairs again in another order;
                   accuracy of the argmax next token at each value position

A generation record: {task, length, index, depth, prompt, answers, max_new_tokens, n_tokens,
tokenizer_sha}. An mqar record has input_ids and answer_positions instead of prompt and answers
(the logits at position p - 1 must predict input_ids[p]). Every answer string occurs exactly
once in its prompt, and distractor values never equal the answer.
"""

import hashlib
import json
import random

import numpy as np

from .checkpoint import atomic_write_bytes
from .recall_mqar import mqar_sample, word_tokens

TASKS = ("passkey", "niah_single", "niah_uuid", "niah_multikey", "niah_multivalue", "vt", "mqar")
LENGTHS = (1024, 2048, 4096, 8000)
MAX_NEW_TOKENS = {"passkey": 16, "niah_single": 24, "niah_uuid": 48, "niah_multikey": 24,
                  "niah_multivalue": 80, "vt": 48}
N_DISTRACTORS = 3     # niah_multikey: needles besides the asked one
N_VALUES = 4          # niah_multivalue: values of the one key
VT_HOPS = 4           # vt: a chain of VT_HOPS + 1 variables (and a distractor chain as long)
_ADJ = ("quiet", "bright", "hollow", "ancient", "silver", "rapid", "gentle", "frozen", "hidden", "golden",
        "narrow", "crimson", "distant", "humble", "lively", "wooden", "bitter", "clever", "dusty", "feral")
_NOUN = ("harbor", "lantern", "meadow", "falcon", "compass", "orchard", "glacier", "violin", "canyon", "beacon",
         "thimble", "quarry", "saddle", "pebble", "turbine", "cobweb", "garnet", "kettle", "walrus", "zephyr")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary: a suite is only valid for the tokenizer that built it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def haystack_ids(tokenizer, haystack) -> np.ndarray:
    """Documents (list of str) or token ids (1-D array, e.g. a val shard) -> (N,) int64 ids.

    Documents are joined with a blank line; in token ids, special tokens (EOS between documents)
    are replaced by the ids of a blank line, so no special token lands inside a prompt.
    """
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    if isinstance(haystack, (list, tuple)) and all(isinstance(d, str) for d in haystack):
        out = []
        for doc in haystack:
            out.extend(tokenizer.encode(doc, add_special_tokens=False) + sep)
        return np.asarray(out, dtype=np.int64)
    ids = np.asarray(haystack, dtype=np.int64).ravel()
    special = np.isin(ids, np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    if not special.any():
        return ids
    pieces, start = [], 0
    for i in np.flatnonzero(special):
        pieces += [ids[start:i], np.asarray(sep, dtype=np.int64)]
        start = i + 1
    pieces.append(ids[start:])
    return np.concatenate(pieces)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _distinct(draw, n: int) -> list[str]:
    """n distinct draws (so a distractor never equals the answer)."""
    out = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _needles(task: str, rng: random.Random, depth: float) -> dict:
    """The task's text: needles [(depth, sentence)], question, answers, checks [(string, count)]."""
    num = lambda: _number(rng, 7)
    if task == "passkey":
        v = _number(rng, 5)
        return dict(intro="A pass key is hidden somewhere in the long text below. Find it and remember it.",
                    needles=[(depth, f"The pass key is {v}. Remember it.")], answers=[v],
                    question="What is the pass key?", prefix="The pass key is")
    if task in ("niah_single", "niah_uuid", "niah_multikey", "niah_multivalue"):
        kind = "uuid" if task == "niah_uuid" else "number"
        draw = (lambda: _uuid(rng)) if kind == "uuid" else num
        keys = _distinct(lambda: _key(rng), 1 + (N_DISTRACTORS if task == "niah_multikey" else 0))
        n_val = N_VALUES if task == "niah_multivalue" else len(keys)
        values = _distinct(draw, n_val)
        if task == "niah_multivalue":
            keys = keys * n_val
        depths = [depth] + [rng.random() for _ in values[1:]]
        needles = [(d, f"One of the special magic {kind}s for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
        answers = values if task == "niah_multivalue" else values[:1]
        many = task == "niah_multivalue"
        what = f"special magic {kind}{'s' if many else ''} for {keys[0]} mentioned in the text above"
        return dict(intro=f"Some special magic {kind}s are hidden in the following text. Memorize them; "
                          f"I will ask you about them afterwards.",
                    needles=needles, answers=answers, question=f"What {'are all the' if many else 'is the'} {what}?",
                    prefix=f"The {what} {'are' if many else 'is'}")
    if task == "vt":
        value, other = _distinct(num, 2)
        names = _distinct(lambda: _var(rng), 2 * (VT_HOPS + 1))
        chains = [names[:VT_HOPS + 1], names[VT_HOPS + 1:]]
        n = VT_HOPS + 1
        statements = [[f"VAR {c[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in zip(c, c[1:])]
                      for c, v in zip(chains, (value, other))]
        first = set(rng.sample(range(2 * n), n))  # interleave the two chains, each kept in order
        ordered = [statements[0 if i in first else 1].pop(0) for i in range(2 * n)]
        depths = sorted(rng.random() for _ in ordered)
        return dict(intro="Memorize and track the chains of variable assignments hidden in the following text.",
                    needles=list(zip(depths, ordered)), answers=chains[0],
                    question=f"Find all variables that are assigned the value {value} in the text above.",
                    prefix=f"Answer: following the chains of variable assignments in the text above, "
                           f"{len(chains[0])} variables are assigned the value {value}; they are:",
                    checks=[(f"= {value}.", 1), (f"= {other}.", 1)] + [(f"VAR {x} =", 1) for x in names]
                    + [(x, 1 if x in (chains[0][-1], chains[1][-1]) else 2) for x in names])  # assigned, then read
    raise ValueError(f"unknown recall task {task!r}; expected one of {', '.join(TASKS)}")


def _format(tokenizer, intro: str, context: str, question: str, prefix: str, chat: bool) -> str:
    if not chat:
        return f"{intro}\n\n{context}\n\n{question} {prefix}"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat_template; build the suite with chat=False")
    user = f"{intro}\n\n{context}\n\n{question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return text + prefix


def sentence_ends(tokenizer) -> np.ndarray:
    """(V,) bool over token ids: the token's text ends a sentence or a line (a needle may follow it)."""
    vocab = tokenizer.get_vocab()
    texts = tokenizer.batch_decode([[i] for i in range(max(vocab.values()) + 1)])
    return np.array([t.rstrip(" ").endswith((".", "!", "?", "\n")) for t in texts], dtype=bool)


def _snap(p: int, ok: np.ndarray, back: int = 48) -> int:
    """The nearest sentence boundary at or before token p (within `back` tokens), else p."""
    for q in range(p, max(p - back, 0) - 1, -1):
        if ok[q]:
            return q
    return p


def _generation_sample(tokenizer, hay: np.ndarray, task: str, length: int, depth: float,
                       rng: random.Random, chat: bool, tol: int, ends: np.ndarray) -> dict:
    start = rng.randrange(0, len(hay) - length)
    window = hay[start:start + length]
    ok = np.concatenate([[True], ends[window[:-1]]])  # ok[i]: a needle may go before token i
    n_tok = lambda s: len(tokenizer.encode(s, add_special_tokens=False))
    for _attempt in range(20):  # redraw values that happen to occur in the haystack
        spec = _needles(task, rng, depth)
        needles = sorted(spec["needles"], key=lambda x: x[0])
        overhead = n_tok(_format(tokenizer, spec["intro"], " ".join(s for _, s in needles),
                                 spec["question"], spec["prefix"], chat))
        k = length - overhead
        for _fit in range(8):  # k = filler tokens; converge on the prompt's measured length
            if k <= 0 or k > length:
                raise ValueError(f"recall {task}: cannot fit a {length}-token prompt (needles and question take "
                                 f"{overhead} tokens); use longer lengths")
            cuts = sorted(_snap(min(int(d * k), k), ok) for d, _ in needles)
            parts, a = [], 0
            for c, (_, sentence) in zip(cuts, needles):
                parts += [tokenizer.decode(window[a:c].tolist()).strip(), sentence]
                a = c
            parts.append(tokenizer.decode(window[a:k].tolist()).strip())
            prompt = _format(tokenizer, spec["intro"], " ".join(p for p in parts if p),
                             spec["question"], spec["prefix"], chat)
            n = n_tok(prompt)
            if abs(length - n) <= tol:
                break
            k += length - n
        else:
            raise ValueError(f"recall {task}: prompt length {n} did not converge to {length}±{tol}")
        checks = spec.get("checks") or [(ans, 1) for ans in spec["answers"]]
        if all(prompt.count(s) == c for s, c in checks):
            return {"task": task, "length": length, "depth": round(needles[0][0] if task == "vt" else depth, 4),
                    "prompt": prompt, "answers": spec["answers"], "max_new_tokens": MAX_NEW_TOKENS[task],
                    "n_tokens": n}
    raise ValueError(f"recall {task}: could not draw values absent from the haystack in 20 tries")


def prompt_tolerance(length: int) -> int:
    """How far a generation prompt's token count may miss its nominal length."""
    return min(32, max(8, length // 50))


def room_needed(length: int, tasks) -> int:
    """Tokens a sample may need past `length`: the prompt's tolerance plus the longest answer generated
    (MQAR scores one forward of exactly `length` tokens). A model asked beyond its max context answers
    at positions it never trained on, which would count against it, not against the task."""
    new = [MAX_NEW_TOKENS[t] for t in tasks if t in MAX_NEW_TOKENS]
    return prompt_tolerance(length) + max(new) if new else 0


def build_suite(tokenizer, haystack, lengths=LENGTHS, n_samples: int = 20, tasks=TASKS, seed: int = 0,
                max_context: int | None = None, chat: bool = False) -> list[dict]:
    """Build every (task, length, index) sample; deterministic in (seed, tokenizer, haystack).

    haystack: documents (list of str), or 1-D token ids such as a val shard (`shards.read_tokens`).
    Lengths whose samples could run past max_context (e.g. the teacher's max_position_embeddings) with
    their answer are dropped (room_needed). The asked needle's depth runs evenly over 0..1 across the
    samples (vt: statements at random depths).
    chat=True wraps the prompt in the tokenizer's chat template (default plain text, so teacher and
    student see the same tokens).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown recall tasks {unknown}; expected some of {', '.join(TASKS)}")
    fit = [L for L in lengths if max_context is None or L + room_needed(L, tasks) <= max_context]
    if not fit:
        raise ValueError(f"no recall length fits max_context={max_context} with room for the answer "
                         f"({room_needed(min(lengths), tasks)}+ tokens after the prompt); pass shorter lengths")
    lengths = fit
    hay = haystack_ids(tokenizer, haystack)
    if len(hay) < 2 * max(lengths):
        raise ValueError(f"recall haystack has {len(hay)} tokens, need at least {2 * max(lengths)} "
                         f"(twice the longest length {max(lengths)}); pass more text")
    sha = tokenizer_fingerprint(tokenizer)
    words = word_tokens(tokenizer) if "mqar" in tasks else []
    ends = sentence_ends(tokenizer)
    records = []
    for task in tasks:
        for length in lengths:
            tol = prompt_tolerance(length)
            for i in range(n_samples):
                rng = random.Random(f"{seed}:{task}:{length}:{i}")
                depth = 0.5 if n_samples == 1 else i / (n_samples - 1)
                if task == "mqar":
                    rec = mqar_sample(tokenizer, hay, length, rng, words)
                else:
                    rec = _generation_sample(tokenizer, hay, task, length, depth, rng, chat, tol, ends)
                records.append({**rec, "index": i, "tokenizer_sha": sha})
    return records


def write_suite(path: str, records: list[dict]) -> None:
    """One sample per line, keys sorted: the file is byte-identical for identical records."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_bytes(path, text.encode())
