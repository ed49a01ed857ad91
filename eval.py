"""Evaluate hybrids against their teacher: held-out KL / perplexity / top-1 agreement, and
in-context recall (RULER-style needles, variable tracking, MQAR) at several lengths.

Every model sees identical samples: the recall suite is generated once from the teacher's
tokenizer with fixed seeds, the haystack taken from the val shards (the embedded corpus by
default), and frozen to OUT_DIR/recall_suite.jsonl (reused when it exists; pass SUITE to share
one between runs). Scores are RULER's (fraction of expected strings found in the greedy output;
MQAR: next-token accuracy at the value positions); retention at a length = the student's mean score over
tasks / the teacher's.

Launch:
  python eval.py --models=teacher,runs/hybrid/export                 # 1 GPU (or CPU, slowly)
  python eval.py --models=gdn=runs/a/export,ga_s2=runs/c/ckpt/final.pt --out_dir=runs/eval
  python eval.py --models=<export> --smoke=True                      # CPU smoke: short lengths, few samples
MODELS: comma list of `teacher`, export folders (export.py) or distill checkpoints (.pt / run dir),
each optionally `name=path`. Writes OUT_DIR/{eval.json, eval.md, recall.png, recall_suite.jsonl}.
Runs on other days or machines pair up when they scored the same inputs (same data, val tokens, suite):
  python eval.py --join=runs/a/eval/eval.json,runs/b/eval/eval.json --out_dir=runs/ab   # no model is run
Line: ga_s2          | kl 0.1234 | ppl 12.34 (teacher 11.90) | top1 0.812 | recall 0.654
"""

import json
import math
import os
import time

import torch

from hybrid.checkpoint import atomic_write_bytes, atomic_write_json
from hybrid.common import Progress, print0, run_script, seed_all, val_label
from hybrid.config import check_choice
from hybrid.plots import plot_recall
from hybrid.stage2 import held_out_kl
from hybrid.recall_score import length_retention, read_suite, run_recall
from hybrid.recall_tasks import TASKS, build_suite, write_suite
from hybrid.shards import split_tokens, val_batches
from hybrid.student import is_export, load_student

# -----------------------------------------------------------------------------
MODELS = "teacher"              # comma list: teacher | export dir | checkpoint, each optionally name=path
TEACHER = "embedded"            # the reference every model is compared with
DATA_DIR = "data/debian"        # val shards: intrinsic metrics and the recall haystack
OUT_DIR = "runs/eval"
# Intrinsic
SEQ_LEN = 2048                  # tokens per row
MICRO_BATCH = 4                 # rows per batch
EVAL_BATCHES = 16               # val batches (SEQ_LEN * MICRO_BATCH tokens each)
# Recall
RECALL = True
RECALL_TASKS = ",".join(TASKS)  # any subset of passkey,niah_single,niah_uuid,niah_multikey,niah_multivalue,vt,mqar
RECALL_LENGTHS = [1024, 2048, 4096, 8000]  # prompt tokens; a length is dropped unless prompt + answer fit the
                                           # teacher's max context (8000 + 112 fit SmolLM2's 8192; 8192 would not)
RECALL_SAMPLES = 20             # samples per task and length
RECALL_BATCH = 8                # prompts per generate() call (left-padded)
ENGINE = "auto"                 # recall decoding: "auto" = the static engine on GPU (hybrid/model/engine.py, CUDA
                                # graphs; generate()'s greedy tokens up to bf16 rounding), generate() on CPU | "on" |
                                # "off" = generate() always
SUITE = ""                      # frozen suite jsonl; "" = OUT_DIR/recall_suite.jsonl (built once)
CHAT = False                    # wrap prompts in the chat template (plain text compares teacher and student fairly)
DTYPE = "bfloat16"              # model dtype on GPU (CPU always float32)
SEED = 1337
SMOKE = False                   # CPU smoke: 256/512-token recall, 2 samples, 2 val batches of 256
JOIN = ""                       # comma list of eval.json files: one table of all their models with every paired test,
                                # to OUT_DIR (a name in several files becomes name@<its folder>); no model is run
# -----------------------------------------------------------------------------


def parse_models(spec: str) -> list[tuple[str, str]]:
    out = []
    for item in [s for s in spec.split(",") if s]:
        name, _, path = item.rpartition("=")
        path = path.strip()
        name = name or ("teacher" if path == "teacher" else os.path.basename(os.path.normpath(path)) or path)
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--models={spec}: duplicate names {names}; name them as name=path")
    return out


def load_model(path: str, teacher, dtype: torch.dtype, device: torch.device):
    """teacher | an export folder | a distill checkpoint -> a causal LM with .model and .lm_head."""
    if path == "teacher":
        return teacher
    if is_export(path):  # loaded in the eval dtype, as shipped
        return load_student(path, device=device, dtype=dtype)[0]
    if os.path.isfile(path) or os.path.isdir(os.path.join(path, "ckpt")):
        return load_student(path)[0].to(device=device, dtype=dtype).eval()
    raise FileNotFoundError(f"model {path!r}: not 'teacher', an export folder (config.json) or a distill checkpoint "
                            f"(.pt or a run dir with ckpt/); run export.py or distill.py first")


def recall_suite(tokenizer, max_context: int) -> str:
    path = SUITE or os.path.join(OUT_DIR, "recall_suite.jsonl")
    if os.path.exists(path):
        print0(f"recall suite: reusing {path}")
        return path
    hay = split_tokens(DATA_DIR, "val")
    tasks = [t for t in RECALL_TASKS.split(",") if t]
    records = build_suite(tokenizer, hay, lengths=RECALL_LENGTHS, n_samples=RECALL_SAMPLES, tasks=tasks, seed=SEED,
                          max_context=max_context, chat=CHAT)
    write_suite(path, records)
    print0(f"recall suite: {len(records)} samples ({', '.join(tasks)}) at {sorted({r['length'] for r in records})} "
           f"tokens -> {path}")
    return path


def mean_at(by_task: dict, L: int) -> float | None:
    """The mean over tasks of {task: {length: value}} at length L (None where no task has one)."""
    vals = [t[str(L)] for t in by_task.values() if t.get(str(L)) is not None]
    return sum(vals) / len(vals) if vals else None


def markdown(results: dict) -> str:
    names = list(results)
    lines = ["| model | KL(teacher‖model) | ppl | top-1 agreement | recall (mean) |", "| --- | --- | --- | --- | --- |"]
    for n in names:
        r = results[n]
        rec = r.get("recall", {}).get("overall", float("nan"))
        lines.append(f"| {n} | {r['val_kl']:.4f} | {r['val_ppl']:.2f} | {r['top1_agreement']:.3f} | {rec:.3f} |")
    if any("recall" in results[n] for n in names):
        teacher = results.get("teacher", {}).get("recall")
        lengths = sorted({int(L) for n in names for t in results[n].get("recall", {}).get("scores", {}).values() for L in t})
        lines += ["", "Recall by length (mean over tasks; in brackets retention, that mean / the teacher's):",
                  "",
                  "| model | " + " | ".join(str(L) for L in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
        for n in names:
            rec = results[n].get("recall")
            if not rec:
                continue
            ret = length_retention(rec, teacher) if teacher and n != "teacher" else {}
            cells = []
            for L in lengths:
                m, r = mean_at(rec["scores"], L), ret.get(str(L))
                cells.append(("-" if m is None else f"{m:.3f}") + ("" if r is None else f" ({r:.2f})"))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "Recall by task (mean over lengths):", "", "| model | " + " | ".join(TASKS) + " |",
                  "| --- |" + " --- |" * len(TASKS)]
        for n in names:
            tm = results[n].get("recall", {}).get("task_mean", {})
            lines.append(f"| {n} | " + " | ".join(f"{tm[t]:.3f}" if t in tm else "-" for t in TASKS) + " |")
        lines += ["", "Answer NLL by length (teacher-forced after the prompt, nats per answer token, mean over the "
                  "single-answer tasks and MQAR; lower is better, and it moves before greedy answers do):", "",
                  "| model | " + " | ".join(str(L) for L in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
        for n in names:
            nll = [mean_at(results[n].get("recall", {}).get("nll", {}), L) for L in lengths]
            lines.append(f"| {n} | " + " | ".join("-" if m is None else f"{m:.3f}" for m in nll) + " |")
    return "\n".join(lines + paired(results)) + "\n"


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven if either side were as likely
    to win each pair (ties left out)."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def per_prompt(result: dict, field: str) -> dict:
    """{(task, length, index): the recall sample's `field`} for the samples that have it."""
    return {(r["task"], r["length"], r["index"]): r[field] for r in result.get("recall", {}).get("samples", [])
            if r.get(field) is not None}


def paired(results: dict) -> list[str]:
    """Every two models besides the teacher, paired on the same inputs: how many val batches each has
    the lower KL on, and how many recall prompts each scores higher on, with the sign test's p (is a
    difference in the means more than the sample?)."""
    names = [n for n in results if n != "teacher"]
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = results[a], results[b]
            ka, kb = ra.get("val_kl_per_batch") or [], rb.get("val_kl_per_batch") or []
            kl = (sum(x < y for x, y in zip(ka, kb)), sum(x > y for x, y in zip(ka, kb)))
            sa, sb = per_prompt(ra, "score"), per_prompt(rb, "score")
            both = sa.keys() & sb.keys()
            rec = (sum(sa[k] > sb[k] for k in both), sum(sa[k] < sb[k] for k in both))
            na, nb = per_prompt(ra, "nll"), per_prompt(rb, "nll")
            pair = na.keys() & nb.keys()
            nll = (sum(na[k] < nb[k] for k in pair), sum(na[k] > nb[k] for k in pair))
            count = lambda c, n: f"{c[0]} / {c[1]} of {n} (p {sign_test(*c):.2f}) |" if n else "- |"  # noqa: E731
            lines.append(f"| {a} vs {b} | " + count(kl, len(ka)) + " " + count(rec, len(both)) + " "
                         + count(nll, len(pair)))
    if not lines:
        return []
    return ["", "Paired on the same inputs (A / B: val batches with the lower KL, recall prompts with the higher "
            "score, answers with the lower NLL; two-sided sign test p, ties left out):", "",
            "| A vs B | KL | recall | answer NLL |", "| --- | --- | --- | --- |"] + lines


def alike(a: dict, b: dict, field: str) -> int:
    """The recall prompts on which two models' results have the same `field` (score, output)."""
    x, y = per_prompt(a, field), per_prompt(b, field)
    return sum(x[k] == y[k] for k in x.keys() & y.keys())


def join_results(paths: list[str]) -> tuple[dict, dict, list[str]]:
    """eval.json files of separate runs -> (meta, results, notes): the first teacher, then every other model. They
    must have scored the same inputs; the notes say how many recall prompts each teacher answered alike (the same
    greedy output), which is what pairing prompts across runs rests on."""
    runs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--join: {path} is not a file; pass the eval.json files that eval.py wrote")
        with open(path) as f:
            run = json.load(f)
        if not isinstance(run, dict) or not {"meta", "results"} <= set(run):
            raise ValueError(f"--join: {path} is not an eval.json of eval.py (no meta and results)")
        runs.append((path, run))
    if len(runs) < 2:
        raise ValueError(f"--join={','.join(paths)}: name two or more eval.json files")
    (first, run0), same = runs[0], ("data_dir", "val_tokens", "recall_lengths", "recall_samples")
    for path, run in runs[1:]:
        diff = [f"{k} {run['meta'].get(k)!r} vs {run0['meta'].get(k)!r}" for k in same
                if run["meta"].get(k) != run0["meta"].get(k)]
        if diff:
            raise ValueError(f"--join: {path} scored other inputs than {first} ({'; '.join(diff)}): only runs on the "
                             f"same val tokens and recall suite pair up")
    names = [n for _, run in runs for n in run["results"] if n != "teacher"]
    results, notes = {}, []
    teachers = [(p, run["results"]["teacher"]) for p, run in runs if "teacher" in run["results"]]
    if teachers:
        results["teacher"] = teachers[0][1]
    for path, run in runs:
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        for n, r in run["results"].items():
            name = n if n == "teacher" or names.count(n) == 1 else f"{n}@{folder}"
            if n != "teacher" and name in results:
                raise ValueError(f"--join: two models named {name}; give the files folders of their own")
            results.setdefault(name, r)
    for path, teacher in teachers[1:]:
        ref_path, ref = teachers[0]
        notes.append(f"teacher of {path} against {ref_path}'s (the reference): the same score on "
                     f"{alike(teacher, ref, 'score')} of {len(per_prompt(ref, 'score'))} recall prompts, the same "
                     f"greedy output on {alike(teacher, ref, 'output')}; perplexity {teacher['val_ppl']:.4f} vs "
                     f"{ref['val_ppl']:.4f}")
    return {**run0["meta"], "joined": paths}, results, notes


def write_results(meta: dict, results: dict, head: list[str] = ()) -> str:
    """OUT_DIR/eval.json, eval.md (the `head` lines, then the tables) and recall.png -> eval.md's text."""
    os.makedirs(OUT_DIR, exist_ok=True)
    atomic_write_json(os.path.join(OUT_DIR, "eval.json"), {"meta": meta, "results": results})
    table = "".join(f"{line}\n" for line in head) + markdown(results)
    atomic_write_bytes(os.path.join(OUT_DIR, "eval.md"), table.encode())
    if any("recall" in r for r in results.values()):
        plot_recall(os.path.join(OUT_DIR, "recall.png"), results)
    return table


def join():
    meta, results, notes = join_results([p for p in JOIN.split(",") if p])
    print0(write_results(meta, results, notes) + f"-> {OUT_DIR}/eval.md")


def main():
    if JOIN:
        return join()
    global SEQ_LEN, MICRO_BATCH, EVAL_BATCHES, RECALL_LENGTHS, RECALL_SAMPLES
    if SMOKE:
        SEQ_LEN, MICRO_BATCH, EVAL_BATCHES, RECALL_LENGTHS, RECALL_SAMPLES = 256, 1, 2, [256, 512], 2
    check_choice("engine", ENGINE, ("auto", "on", "off"))
    from hybrid.teacher import load_teacher
    seed_all(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPE) if device.type == "cuda" else torch.float32
    use_engine = ENGINE == "on" or (ENGINE == "auto" and device.type == "cuda")
    teacher, tokenizer = load_teacher(TEACHER, dtype=dtype, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    val = val_batches(DATA_DIR, MICRO_BATCH, SEQ_LEN, EVAL_BATCHES)
    max_context = getattr(teacher.config, "max_position_embeddings", None)
    suite = recall_suite(tokenizer, max_context) if RECALL else None
    results, models = {}, parse_models(MODELS)
    records = read_suite(suite) if suite else []  # read once, scored by every model
    groups = len({(r["task"], r["length"]) for r in records})
    prog = Progress(len(models) * (groups + 1), "eval", unit="task")  # each model: the KL pass + its recall tasks
    for name, path in models:
        t0 = time.time()
        model = load_model(path, teacher, dtype, device)
        r = {"path": path, **held_out_kl(model, teacher, val, device, autocast)}
        print0(f"{name:14s} | kl {r['val_kl']:.4f} | {val_label(val)} | {prog.line(prog.done + 1)}")
        if suite:
            r["recall"] = run_recall(model, tokenizer, records, device, batch_size=RECALL_BATCH,
                                     log=lambda line, n=name: print0(f"{n:14s} | {line} | {prog.line(prog.done + 1)}"),
                                     engine=use_engine)
        r["seconds"] = time.time() - t0
        results[name] = r
        print0(f"{name:14s} | kl {r['val_kl']:.4f} | ppl {r['val_ppl']:.2f} (teacher {r['teacher_ppl']:.2f}) | "
               f"top1 {r['top1_agreement']:.3f} | recall {r.get('recall', {}).get('overall', float('nan')):.3f} | "
               f"{r['seconds']:.0f}s")
        if model is not teacher:
            del model
    meta = {"teacher": TEACHER, "data_dir": DATA_DIR, "val_tokens": len(val) * MICRO_BATCH * SEQ_LEN, "suite": suite,
            "recall_lengths": RECALL_LENGTHS, "recall_samples": RECALL_SAMPLES, "dtype": str(dtype),
            "recall_decoding": "engine" if use_engine else "generate"}
    print0(f"{val_label(val)}\n" + write_results(meta, results))


if __name__ == "__main__":
    run_script(globals(), main)
