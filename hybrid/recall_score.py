"""In-context recall suite, part 2: run a model on a frozen suite and score it.

Generation tasks: greedy decoding (model.generate, no sampling), scored as RULER's
string_match_all: the fraction of expected strings found (case-insensitive) in the generated
text, averaged over samples. MQAR: one forward pass, no decoding; the fraction of queries whose
argmax next token at position p - 1 equals the value token at p. Scores are in [0, 1].

Beside each score, a sample whose answer is one string (passkey, niah_single, niah_uuid,
niah_multikey) or an MQAR one gets `nll`: the answer's mean negative log-likelihood per token,
teacher-forced after the prompt (" " + answer), in nats. It moves long before greedy decoding finds
a needle, so short runs that all score 0 can still be compared on recall.
"""

import json
import math
import os
import warnings

import torch

from .recall_tasks import tokenizer_fingerprint


def read_suite(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"recall suite {path} does not exist; build it with build_suite + write_suite "
                                f"(eval.py does this on first use)")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e}); delete the file and rebuild the suite") from None
            need = ("task", "length", "index") + (("input_ids", "answer_positions") if r.get("task") == "mqar"
                                                  else ("prompt", "answers", "max_new_tokens"))
            missing = [k for k in need if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: record lacks {missing}; delete the file and rebuild the suite")
            records.append(r)
    return records


def score_generation(answers: list[str], generated: str) -> float:
    """Fraction of `answers` that occur in `generated` (case-insensitive substring match)."""
    text = generated.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


@torch.no_grad()
def logits_at(model, input_ids: torch.Tensor, positions: list[list[int]]) -> list[torch.Tensor]:
    """The logits at positions[b] for each row of input_ids (B, T) -> B tensors (len(positions[b]), V).

    Asks the model for logits at the union of the positions only (`logits_to_keep` as a 1-D index
    tensor, so B * T * V logits are never built); a model that ignores it returns (B, T, V).
    """
    B, T = input_ids.shape
    keep = sorted({p for row in positions for p in row})
    out = model(input_ids=input_ids, logits_to_keep=torch.tensor(keep, device=input_ids.device), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[1] == len(keep):
        index = {p: i for i, p in enumerate(keep)}
    elif logits.shape[1] == T:
        index = {p: p for p in keep}
    else:
        raise ValueError(f"recall: the model returned logits of shape {tuple(logits.shape)} for {T} tokens and "
                         f"{len(keep)} kept positions; expected (B, {len(keep)}, V) or (B, {T}, V)")
    return [logits[b, [index[p] for p in row]] for b, row in enumerate(positions)]


def target_nll(logits: list[torch.Tensor], input_ids: torch.Tensor, targets: list[list[int]]) -> list[float]:
    """Mean NLL per token (nats) of input_ids[b, p] for p in targets[b], from logits_at's rows at p - 1."""
    return [-torch.log_softmax(row.float(), -1).gather(-1, input_ids[b, tg][:, None]).mean().item()
            for b, (row, tg) in enumerate(zip(logits, targets))]


def answer_nll(model, rows: list[list[int]], targets: list[list[int]], pad: int, device) -> list[float]:
    """Teacher-forced mean NLL per token (nats) of row[p] for p in targets[b], for each row of token
    ids. Rows are right-padded into one batch (causal: a real token never sees the pads after it, so
    no mask is needed); only the logits at the positions before the targets are built."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long, device=device)
    return target_nll(logits_at(model, ids, [[p - 1 for p in tg] for tg in targets]), ids, targets)


class Engines:
    """Greedy generation through the static engine (hybrid/model/engine.py: fixed-size caches, a CUDA
    graph per decode step on GPU) instead of model.generate(); one engine is kept and reused while the
    batch size matches and its slots fit the request without exceeding it by more than 2x (decode
    attends over every slot). A new one gets a quarter more slots than its first request needs, so the
    other tasks at that prompt length (longer prompts or answers by a few percent) reuse it."""

    def __init__(self):
        self.engine, self.failed = None, False

    @staticmethod
    def eos_of(model, tokenizer) -> int | None:
        """The one EOS id generation stops at, or None when the model stops at several (generate() then)."""
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        ids = sorted(set(eos)) if isinstance(eos, (list, tuple)) else [eos]
        return ids[0] if len(ids) == 1 else None

    def generate(self, model, ids, mask, max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
        from hybrid.model.engine import StaticEngine
        need = ids.shape[1] + max_new_tokens
        e = self.engine
        if e is None or e.batch != ids.shape[0] or not need <= e.max_len <= 2 * need + 64:
            self.engine = None  # free the old buffers first
            self.engine = e = StaticEngine(model, ids.shape[0], need + need // 4)
        return e.generate(ids, mask, max_new_tokens, eos_token_id=eos, pad_token_id=pad)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, device,
                   engines: Engines | None = None) -> list[str]:
    """Greedy decoding of a batch of prompts, left-padded with an attention mask -> the new text only
    (through `engines` when given and the model stops at one EOS id, else model.generate())."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, T - len(e):] = torch.tensor(e)
        mask[b, T - len(e):] = 1
    eos = Engines.eos_of(model, tokenizer) if engines is not None and not engines.failed else None
    out = None
    if eos is not None:
        try:
            out = engines.generate(model, ids.to(device), mask.to(device), max_new_tokens, eos, pad)
        except (RuntimeError, ValueError) as e:  # an eval on a leased GPU must not be lost to a fast path:
            engines.failed, engines.engine = True, None  # say so loudly and finish through generate()
            warnings.warn(f"recall: the static engine failed ({type(e).__name__}: {str(e)[:300]}); this model's "
                          "remaining prompts decode through generate()")
    if out is None:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.batch_decode(out[:, T:].cpu(), skip_special_tokens=True)


def run_recall(model, tokenizer, tasks_jsonl, device="cpu", batch_size: int = 1, log=None,
               engine: bool = False) -> dict:
    """Score `model` on a frozen suite (a jsonl path or the records) -> results dict:

    {"scores": {task: {length: mean}}, "task_mean": {task: mean over lengths}, "overall": mean of
    task means, "n": {task: {length: count}}, "samples": [{task, length, index, score, output}]}.
    Lengths are strings (JSON keys). `log(line)` gets one line per (task, length) when given.
    engine=True: the generation tasks decode through the static engine (generate()'s greedy tokens,
    tested in float64; on GPU one CUDA graph per decode step); MQAR always scores one forward's logits.
    """
    records = read_suite(tasks_jsonl) if isinstance(tasks_jsonl, str) else list(tasks_jsonl)
    sha = tokenizer_fingerprint(tokenizer)
    other = {r.get("tokenizer_sha") for r in records} - {sha, None}
    if other:
        where = tasks_jsonl if isinstance(tasks_jsonl, str) else "(records)"
        raise ValueError(f"recall suite {where} was built with another tokenizer (fingerprint {sorted(other)}, "
                         f"this one {sha}); rebuild the suite with this model's tokenizer")
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["length"]), []).append(r)
    was_training = model.training
    model.eval()
    samples, engines = [], Engines() if engine else None
    # every task at one length, then the next length: one engine per length instead of one per task and length
    # (each new engine allocates its caches and captures its decode step again)
    for (task, length), group in sorted(groups.items(), key=lambda item: item[0][1]):
        scores = []
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            if task == "mqar":
                ids = torch.tensor([r["input_ids"] for r in batch], dtype=torch.long, device=device)
                positions = [r["answer_positions"] for r in batch]
                logits = logits_at(model, ids, [[p - 1 for p in pos] for pos in positions])  # p - 1 predicts p
                preds = [row.argmax(-1).cpu() for row in logits]
                outputs = [p.tolist() for p in preds]
                scores += [(p == ids[b, pos].cpu()).float().mean().item()
                           for b, (p, pos) in enumerate(zip(preds, positions))]
                nll = target_nll(logits, ids, positions)  # the same forward's logits
            else:
                outputs = generate_batch(model, tokenizer, [r["prompt"] for r in batch],
                                         max(r["max_new_tokens"] for r in batch), device, engines)
                scores += [score_generation(r["answers"], text) for r, text in zip(batch, outputs)]
                nll = prompt_answer_nll(model, tokenizer, batch, device)
            samples += [{"task": task, "length": length, "index": r["index"], "score": sc, "output": out,
                         **({} if n is None else {"nll": n})}
                        for r, sc, out, n in zip(batch, scores[-len(batch):], outputs, nll)]
        if log is not None:
            nlls = [x["nll"] for x in samples[-len(scores):] if "nll" in x]
            log(f"recall {task:16s} len {length:6d} | n {len(scores):3d} | score {sum(scores) / len(scores):.3f}"
                + (f" | answer nll {sum(nlls) / len(nlls):.3f}" if nlls else ""))
    model.train(was_training)
    return summarize(samples)


def prompt_answer_nll(model, tokenizer, batch: list[dict], device) -> list[float | None]:
    """answer_nll of " " + the answer after each generation prompt; None where a record expects several
    answers (any order would do, so no one continuation is the answer)."""
    one = [r for r in batch if len(r["answers"]) == 1]
    if not one:
        return [None] * len(batch)
    enc = [(tokenizer.encode(r["prompt"], add_special_tokens=False),
            tokenizer.encode(" " + r["answers"][0], add_special_tokens=False)) for r in one]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = iter(answer_nll(model, [p + a for p, a in enc], [list(range(len(p), len(p) + len(a))) for p, a in enc],
                          pad, device))
    return [next(nll) if len(r["answers"]) == 1 else None for r in batch]


def summarize(samples: list[dict]) -> dict:
    """Per-sample scores -> the results dict of run_recall (+ "nll": {task: {length: mean}} of the
    samples that have one)."""
    groups: dict = {}
    nll: dict = {}
    for s in samples:
        groups.setdefault(s["task"], {}).setdefault(str(s["length"]), []).append(s["score"])
        if s.get("nll") is not None:
            nll.setdefault(s["task"], {}).setdefault(str(s["length"]), []).append(s["nll"])
    scores = {t: {L: sum(v) / len(v) for L, v in by_len.items()} for t, by_len in groups.items()}
    task_mean = {t: sum(v.values()) / len(v) for t, v in scores.items()}
    return {"scores": scores, "task_mean": task_mean,
            "overall": sum(task_mean.values()) / len(task_mean) if task_mean else float("nan"),
            "nll": {t: {L: sum(v) / len(v) for L, v in by_len.items()} for t, by_len in nll.items()},
            "n": {t: {L: len(v) for L, v in by_len.items()} for t, by_len in groups.items()}, "samples": samples}


def score_pairs(student_scores: dict, teacher_scores: dict):
    """(task, length, student score, teacher score) for every cell both have (results dicts or their "scores")."""
    s = student_scores.get("scores", student_scores)
    for task, by_len in teacher_scores.get("scores", teacher_scores).items():
        for L, ts in by_len.items():
            if s.get(task, {}).get(L) is not None:
                yield task, L, s[task][L], ts


def retention(student_scores: dict, teacher_scores: dict) -> dict:
    """Student / teacher score per task and length; None where the teacher scored 0. A cell's ratio is noise where
    the teacher's score is near 0 (MQAR at 8K: 0.009 / 0.003 = 3.0): to sum up a length, use length_retention."""
    out = {}
    for task, L, ss, ts in score_pairs(student_scores, teacher_scores):
        out.setdefault(task, {})[L] = ss / ts if ts > 0 and not math.isnan(ts) else None
    return out


def length_retention(student_scores: dict, teacher_scores: dict) -> dict:
    """{length: the student's mean score over tasks / the teacher's over the same tasks}, None where the teacher's is 0:
    the share of the teacher's recall kept at each length. A mean of per-task ratios would let a task that the teacher
    all but fails count as 300% kept (one right key in 100 against a third of one)."""
    sums = {}
    for _, L, ss, ts in score_pairs(student_scores, teacher_scores):
        if not math.isnan(ts):
            a, b = sums.get(L, (0.0, 0.0))
            sums[L] = (a + ss, b + ts)
    return {L: a / b if b > 0 else None for L, (a, b) in sums.items()}
