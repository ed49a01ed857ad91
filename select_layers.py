"""Choose which layers of a hybrid stay softmax: KL-guided layer selection (GA-S2) with baselines.

GA-S2 ("Distilling to Hybrid Attention Models via KL-Guided Layer Selection", ICLR 2026): from a
stage-1 checkpoint (every layer a linear mixer, `distill.py --stage=1`), for each candidate layer l
build the student with only l restored to the teacher's softmax attention (the weights
hybrid.student.seed_from gives, as `distill.py --stage=2 --init` does), run CANDIDATE_TOKENS of
stage-2 KL distillation on the same data order for every candidate, and score l by the held-out
KL(teacher || student): lower = l is worth more as softmax. Rank, keep the top K. Measured against
it on the same machinery:
  zero_shot  held-out KL of the same candidates with no training
  early      GA-S2 stopped at EARLY_FRAC of its budget (same LR schedule; free when ga_s2 runs)
  halving    successive halving: all candidates on a small budget, the better half on twice that,
             ... (restarts from stage 1 each round), total <= HALVING_FRAC of GA-S2's tokens
  uniform    every L/K-th layer
  mse        stage-1 replaceability: per-layer MSE of the stage-1 mixer on held-out teacher latents,
             normalised by the mean square of the teacher's attention output there
  ablation   held-out KL with only layer l linear (everything else softmax): higher = keep l
  greedy     from all-softmax, repeatedly make linear the layer whose loss hurts held-out KL least
             (zero-shot, O(L^2) evaluations); the layers left last are kept
  retrieval  the teacher's copy heads (hybrid/retrieval.py): a layer scores its best head's hit rate on
             MQAR prompts from the val text (no training, one teacher forward)
  ga_s2_retrieval  every layer whose best head copies >= RETRIEVAL_KEEP, then GA-S2's order (needs its runs)
  zero_shot_retrieval  the same layers, then zero-shot's order: no candidate training (zero-shot tied GA-S2 on
             KL and recall at equal stage-2 budgets, docs/results.md)
Every method reports tokens spent and the Jaccard of its top-K with GA-S2's, for each K in KS, and
the zero-shot KL of the hybrid its top-K gives (`set_kl`). Every KL is scored on the same val rows;
with VAL_REPEATS > 0 a share of them repeat spans of their own text far apart, where the teacher copies
(plain text barely asks for copying, so a plain KL ranks the layers of the copy heads low).

Candidates go round-robin over the ranks of one torchrun job (each rank trains whole candidates, no
DDP); each finished job is saved to RUN_DIR/candidates/<job>.json and skipped when rerun.

Launch:
  python select_layers.py --init=runs/s1 --smoke=True            # CPU smoke
  python select_layers.py --init=runs/s1/ckpt/final.pt           # 1 GPU
  torchrun --standalone --nproc_per_node=8 select_layers.py --init=runs/s1 --run_dir=runs/select
  torchrun --standalone --nproc_per_node=2 select_layers.py ...   # on 1 GPU: two processes share it
(More processes than GPUs share them, gloo between ranks: a candidate's small steps leave one
process's GPU idle between launches.)
Reads the stage-1 checkpoint, models/<teacher>/ and DATA_DIR shards; writes RUN_DIR/{config.json,
log.txt, metrics.jsonl, candidates/*.json, selection.json, selection.png}. Then:
  python distill.py --stage=2 --init=runs/s1 --spec=runs/select/selection.json
Log line: ga_s2 layer 07 | step 00064/00128 | loss 0.123456 | lr 1.0e-03 | dt 212ms | tok/s 154.20k
"""

import functools
import json
import os
import time

import torch

from hybrid.checkpoint import atomic_write_json, init_key, load_checkpoint, load_state_strict, result_settings
from hybrid.common import (Pace, RunLogger, autocast_dtype, barrier, cleanup_dist, env_info, format_tokens, init_dist,
                           interrupt_message, is_master, print0, run_script, seed_all)
from hybrid.config import config_dict
from hybrid.fastpath import compile_layers
from hybrid.graphs import candidate_calls
from hybrid.model.spec import with_softmax
from hybrid.optim import adamw, cosine_lr, grad_accum_steps, set_lr
from hybrid.repeats import repeated_batches
from hybrid.selection import (SpecSwitcher, halving_ranking, halving_schedule, jaccard, parse_candidates, plot_selection,
                              rank_layers, run_jobs, spec_id, stage1_mse, top_k, uniform_layers)
from hybrid.retrieval import head_copy_scores, keep_then_fill, layer_scores, mqar_prompts
from hybrid.shards import ShardLoader, check_tokenizer, load_manifest, split_tokens, val_batches
from hybrid.stage2 import KLStudent, TeacherTargets, held_out_kl, stage2_param_groups, teacher_targets
from hybrid.student import Artifact, rebuild_student
from hybrid.surgery import SOFTMAX
from hybrid.teacher import load_teacher, resolve_teacher

# -----------------------------------------------------------------------------
# Inputs and outputs
INIT = "runs/stage1"            # stage-1 checkpoint (.pt) or its run dir (ckpt/final.pt)
TEACHER = ""                    # "" = the teacher named in the checkpoint's config
DATA_DIR = "data/debian"        # shards from prepare.py (train: candidate runs, val: scores)
RUN_DIR = "runs/select"
# What to measure
METHODS = ("ga_s2,zero_shot,halving,early,uniform,mse,greedy,ablation,retrieval,ga_s2_retrieval,"
           "zero_shot_retrieval")  # any subset
PRIMARY = "ga_s2"               # the method chosen_spec follows (the others are compared with GA-S2)
CANDIDATES = "all"              # layers that may become softmax: "all" (every linear layer), "spread:N" or "0,4,8"
KS = [4, 8]                     # numbers of softmax layers to report a choice (and Jaccard) for
FRACTION = 0.25                 # softmax fraction of all layers for chosen_spec (30 layers -> 8)
CANDIDATE_TOKENS = 2**22        # stage-2 tokens per GA-S2 candidate
EARLY_FRAC = 0.25               # early stopping: score after this fraction of CANDIDATE_TOKENS
HALVING_FRAC = 0.33             # successive halving: total tokens <= this fraction of GA-S2's
SET_TOKENS = 0                  # > 0: also train each method's top-K hybrid for this many tokens and score it
RETRIEVAL_PROMPTS = 32          # retrieval: MQAR prompts (32 pairs each) the teacher's heads are scored on
RETRIEVAL_LEN = 1024            # tokens per prompt (the pairs, then >= 700 tokens of val text, then the keys again)
RETRIEVAL_KEEP = 0.5            # *_retrieval: keep the layers whose best head copies at least this share
# Stage-2 optimisation of each candidate (as distill.py --stage=2, one process per candidate)
SEQ_LEN = 512                   # tokens per row
MICRO_BATCH = 16                # rows per micro-step
TOTAL_BATCH_TOKENS = 2**15      # tokens per optimizer step of one candidate
LR_MIXER = 1e-3                 # LR of mixer parameters
LR = 1e-3                       # everything else trains at LR / 10, as in distill.py
MIN_LR_FRAC = 0.1               # cosine floor as a fraction of the LR
WARMUP_STEPS = 10               # capped at a quarter of a run's steps
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
TEMPERATURE = 1.0               # training KL temperature (scores are always at temperature 1)
KL_CHUNK_TOKENS = 4096          # tokens per chunk of the logit KL
# Evaluation and logging
EVAL_BATCHES = 8                # held-out val batches of MICRO_BATCH x SEQ_LEN for every score
VAL_REPEATS = 0.0               # share of those rows given long-range repeats of their own spans (hybrid/repeats.py),
                                # so that every KL also weighs copying, which plain text barely asks for (1.0: all)
LOG_EVERY = 20                  # optimizer steps between log lines of a candidate run
SEED = 1337
COMPILE = True                  # torch.compile each decoder layer of teacher and candidates (GPU only)
GRAPHS = True                   # each candidate's optimizer step and held-out scoring as CUDA graphs (GPU only; a
                                # step of 32k tokens leaves the GPU idle ~36% while the host issues it: hybrid/graphs.py;
                                # 5.93 -> 4.68 s per candidate on an H100, 2026-12-06)
SMOKE = False                   # tiny budget on CPU
# -----------------------------------------------------------------------------
# settings that cannot change a stored job result (candidates/<job>.json); every other setting, and every
# result-changing setting of the --init run (INIT.<NAME>), is part of the key stored with each result, and a
# result with another key is an error, not a silent reuse
# (COMPILE: compiled layers change only float rounding, as in distill.py; GRAPHS replays the same kernels)
_UNCHANGING = ("RUN_DIR", "METHODS", "PRIMARY", "CANDIDATES", "KS", "FRACTION", "SET_TOKENS", "LOG_EVERY", "SMOKE",
               "COMPILE", "GRAPHS", "RETRIEVAL_PROMPTS", "RETRIEVAL_LEN", "RETRIEVAL_KEEP")


def smoke_settings(g: dict) -> None:
    g.update(SEQ_LEN=64, MICRO_BATCH=2, TOTAL_BATCH_TOKENS=128, CANDIDATE_TOKENS=128 * 8, EVAL_BATCHES=2, LOG_EVERY=4,
             CANDIDATES="spread:4", KS=[1, 2], FRACTION=0.07, WARMUP_STEPS=1,  # 30 layers: 2 chosen of 4
             RETRIEVAL_PROMPTS=2, RETRIEVAL_LEN=128)


def log_line(label, step, total, loss, lr, dt, tokens):
    return (f"{label} | step {step:05d}/{total:05d} | loss {loss:.6f} | lr {lr:.1e} | dt {dt * 1000:.0f}ms | "
            f"tok/s {format_tokens(tokens / max(dt, 1e-9))}")


def train_spec(ctx, spec: list[str], steps: int, schedule_steps: int, eval_at: list[int], label: str) -> dict:
    """Stage-2 KL distillation of one hybrid (spec) for `steps` optimizer steps of a cosine schedule
    over `schedule_steps`, from the stage-1 weights; held-out KL after each step in eval_at."""
    student = ctx["switcher"].copy(spec)
    seed_all(SEED)  # every candidate starts from the same RNG state
    if COMPILE:
        compile_layers(student)
    opt = adamw(stage2_param_groups(student, LR_MIXER, LR / 10), LR_MIXER, WEIGHT_DECAY, ctx["device"])
    model = KLStudent(student, TEMPERATURE, 0.0, KL_CHUNK_TOKENS)
    accum, device, teacher = ctx["accum"], ctx["device"], ctx["teacher"]
    on = GRAPHS and device.type == "cuda"
    train_step, stats = candidate_calls(model, student, teacher, opt, GRAD_CLIP, device, ctx["autocast"], KL_CHUNK_TOKENS,
                                        enabled=on)
    warmup = min(WARMUP_STEPS, schedule_steps // 4)
    evals, losses, pace = [], [], Pace()
    for step in range(steps):
        scale = cosine_lr(step, schedule_steps, warmup, 1.0, MIN_LR_FRAC)
        set_lr(opt, scale)
        # every candidate trains on the same batches: the teacher's states come from the shared cache
        loss_sum = train_step(*[t for i in range(accum) for t in ctx["targets"][step * accum + i]])
        if step % LOG_EVERY == 0 or step == steps - 1:
            losses.append((step, loss_sum.item()))
            print(log_line(label, step, steps, losses[-1][1], LR_MIXER * scale, pace.lap(step + 1),
                           TOTAL_BATCH_TOKENS), flush=True)
        if step + 1 in eval_at:
            evals.append({"step": step + 1, "train_tokens": (step + 1) * TOTAL_BATCH_TOKENS, **score(ctx, student, stats)})
            pace.reset(step + 1)
    return {"spec": spec, "steps": steps, "schedule_steps": schedule_steps, "train_tokens": steps * TOTAL_BATCH_TOKENS,
            "eval_tokens": len(evals) * ctx["eval_tokens"], "losses": losses, "evals": evals}


def score(ctx, student, stats=None) -> dict:
    """The held-out KL of one student on the shared val batches -> {"kl", "std", "per_batch"}; stats: its
    batch_stats as a CudaGraphed (a trained candidate's, scored twice)."""
    r = held_out_kl(student, ctx["teacher"], ctx["val"], ctx["device"], ctx["autocast"], KL_CHUNK_TOKENS,
                    h_teacher=ctx["h_val"], stats_fn=stats)
    return {"kl": r["val_kl"], "std": r["val_kl_std"], "per_batch": r["val_kl_per_batch"]}


def eval_spec(ctx, spec: list[str]) -> dict:
    """Zero-shot held-out KL of a spec (stage-1 mixers and teacher attention, no training)."""
    return {"spec": spec, "train_tokens": 0, "eval_tokens": ctx["eval_tokens"], **score(ctx, ctx["switcher"].set(spec))}


def eval_jobs(ctx, specs: list[list[str]]) -> list[dict]:
    """Zero-shot KL of each spec, spread over ranks; named by spec so every method shares them."""
    jobs = [(f"kl_{spec_id(s)}", functools.partial(eval_spec, ctx, s)) for s in specs]
    out = run_jobs(jobs, ctx["cand_dir"], ctx["key"])
    return [out[name] for name, _ in jobs]


def method_result(ctx, scores, spread, higher_is_better, jobs, extra=None, tops=None) -> dict:
    """The per-method block of selection.json (schema in docs/selection.md)."""
    ranking = rank_layers(scores, higher_is_better) if scores is not None else None
    tops = tops or {str(k): top_k(ranking, k) for k in ctx["ks"]}
    return {"scores": {str(l): v for l, v in scores.items()} if scores is not None else None,
            "spread": {str(l): v for l, v in spread.items()} if spread is not None else None,
            "direction": None if scores is None else ("higher" if higher_is_better else "lower"),
            "ranking": ranking, "ranks": {str(l): r + 1 for r, l in enumerate(ranking)} if ranking else None,
            "top": tops, "train_tokens": sum(j["train_tokens"] for j in jobs),
            "eval_tokens": sum(j["eval_tokens"] for j in jobs), "job_seconds": float(sum(j["seconds"] for j in jobs)),
            "n_jobs": len(jobs), "extra": extra or {}}


def run_ga_s2(ctx, methods):
    """GA-S2 and early stopping from the same candidate runs (or early alone, truncated runs)."""
    full, early, base = ctx["steps_full"], ctx["early_step"], ctx["stage1_spec"]
    name = "ga_s2" if "ga_s2" in methods else "early"
    steps, evals = (full, sorted({early, full})) if name == "ga_s2" else (early, [early])
    jobs = [(f"{name}_layer_{l:02d}", functools.partial(train_spec, ctx, with_softmax(base, [l]), steps, full, evals,
                                                          f"{name} layer {l:02d}")) for l in ctx["candidates"]]
    res = run_jobs(jobs, ctx["cand_dir"], ctx["key"])
    out = {}
    for m, at in (("ga_s2", full), ("early", early)):
        if m not in methods:
            continue
        picked = {l: next(e for e in res[n]["evals"] if e["step"] == at) for l, (n, _) in zip(ctx["candidates"], jobs)}
        # early reads GA-S2's runs: its seconds are those runs' seconds scaled to its steps (an estimate)
        jobs_m = [{**res[n], "train_tokens": at * TOTAL_BATCH_TOKENS, "eval_tokens": ctx["eval_tokens"],
                   "seconds": res[n]["seconds"] * at / res[n]["steps"]} for n, _ in jobs]
        out[m] = method_result(ctx, {l: e["kl"] for l, e in picked.items()}, {l: e["std"] for l, e in picked.items()},
                               False, jobs_m, {"steps": at, "tokens_per_candidate": at * TOTAL_BATCH_TOKENS})
    return out


def run_halving(ctx):
    schedule = halving_schedule(len(ctx["candidates"]), ctx["steps_full"], HALVING_FRAC)
    survivors, rounds, all_jobs = list(ctx["candidates"]), [], []
    for r, (n, steps) in enumerate(schedule):
        jobs = [(f"halving_s{steps}_layer_{l:02d}", functools.partial(
            train_spec, ctx, with_softmax(ctx["stage1_spec"], [l]), steps, steps, [steps], f"halving r{r} layer {l:02d}"))
            for l in survivors[:n]]
        res = run_jobs(jobs, ctx["cand_dir"], ctx["key"])
        rounds.append({l: res[name]["evals"][-1]["kl"] for l, (name, _) in zip(survivors, jobs)})
        all_jobs += list(res.values())
        survivors = rank_layers(rounds[-1], higher_is_better=False)
        print0(f"halving round {r}: {n} candidates x {steps} steps -> best {survivors[:4]}")
    first = {l: j["evals"][-1]["std"] for l, j in zip(ctx["candidates"], all_jobs)}
    ranking = halving_ranking(rounds)
    result = method_result(ctx, rounds[0], first, False, all_jobs,
                           {"rounds": [{"steps": s, "scores": {str(l): v for l, v in sc.items()}}
                                       for (_, s), sc in zip(schedule, rounds)],
                            "note": "scores/spread are round 0 (every candidate, same budget); ranking uses all rounds"},
                           {str(k): top_k(ranking, k) for k in ctx["ks"]})
    result["ranking"], result["ranks"] = ranking, {str(l): r + 1 for r, l in enumerate(ranking)}
    return result


def run_greedy(ctx, ablation_jobs):
    """From all-softmax, make linear one layer at a time, the one whose loss hurts KL least."""
    linear, remaining, path, jobs = [], list(ctx["candidates"]), [], list(ablation_jobs)
    while len(remaining) > 1:
        specs = [with_softmax(ctx["stage1_spec"], [i for i in remaining if i != l] + ctx["already_softmax"])
                 for l in remaining]
        res = eval_jobs(ctx, specs) if linear else ablation_jobs  # the first step is the ablation
        jobs += res if linear else []
        kls = {l: r["kl"] for l, r in zip(remaining, res)}
        drop = rank_layers(kls, higher_is_better=False)[0]
        linear.append(drop)
        remaining.remove(drop)
        path.append(kls[drop])
    order = linear + remaining  # removal order: the last one left is the most valuable as softmax
    return method_result(ctx, {l: float(i) for i, l in enumerate(order)}, None, True, jobs,
                         {"removal_order": order, "kl_after_removal": path,
                          "note": "score = removal step (higher = kept longer)"})


def run_mse(ctx):
    t0 = time.time()
    student = ctx["switcher"].set(ctx["stage1_spec"])
    m = stage1_mse(ctx["teacher"], student, ctx["val"], ctx["candidates"], ctx["target"], ctx["device"], ctx["autocast"])
    job = {"train_tokens": 0, "eval_tokens": ctx["eval_tokens"], "seconds": time.time() - t0}
    extra = {"raw_mse": {str(l): v["mse"] for l, v in m.items()}, "target": ctx["target"],
             "normalised_by": "mean square of the teacher's attention output at the layer"}
    summary = os.path.join(ctx["init_run_dir"], "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            extra["stage1_summary_val_mse"] = json.load(f).get("val_mse")
    return method_result(ctx, {l: v["nmse"] for l, v in m.items()}, None, True, [job], extra)


def run_zero_shot(ctx, methods):
    res = eval_jobs(ctx, [with_softmax(ctx["stage1_spec"], [l]) for l in ctx["candidates"]])
    return {"zero_shot": method_result(ctx, {l: r["kl"] for l, r in zip(ctx["candidates"], res)},
                                       {l: r["std"] for l, r in zip(ctx["candidates"], res)}, False, res)}


def run_uniform(ctx, methods):
    return {"uniform": method_result(ctx, None, None, False, [],
                                     tops={str(k): uniform_layers(ctx["candidates"], k) for k in ctx["ks"]})}


def run_ablation_greedy(ctx, methods):
    """Ablation (only layer l linear) and greedy removal, which starts from the ablation's evaluations."""
    cands = ctx["candidates"]
    res = eval_jobs(ctx, [with_softmax(ctx["stage1_spec"], [c for c in cands if c != l] + ctx["already_softmax"])
                          for l in cands])  # only l linear (non-candidates keep their stage-1 mixer)
    out = {}
    if "ablation" in methods:
        out["ablation"] = method_result(ctx, {l: r["kl"] for l, r in zip(cands, res)},
                                        {l: r["std"] for l, r in zip(cands, res)}, True, res)
    if "greedy" in methods:
        out["greedy"] = run_greedy(ctx, res)
    return out


def run_retrieval(ctx, methods):
    """retrieval: layers by their best head's copy hit rate; <fill>_retrieval: the layers at >= RETRIEVAL_KEEP,
    then <fill>'s ranking (GA-S2's or zero-shot's, whose jobs are read back from disk when that method ran first)."""
    t0 = time.time()
    records = mqar_prompts(ctx["tokenizer"], split_tokens(DATA_DIR, "val"), RETRIEVAL_PROMPTS, RETRIEVAL_LEN, SEED)
    heads, n = head_copy_scores(ctx["teacher"], records, ctx["device"], MICRO_BATCH, ctx["autocast"])
    scores = layer_scores(heads, ctx["candidates"])
    job = {"train_tokens": 0, "eval_tokens": len(records) * RETRIEVAL_LEN, "seconds": time.time() - t0}
    extra = {"head_hit_rate": [[round(float(x), 4) for x in row] for row in heads], "answer_positions": n,
             "prompts": f"{len(records)} MQAR x {RETRIEVAL_LEN} tokens from the val split"}
    out = {"retrieval": method_result(ctx, scores, None, True, [job], extra)} if "retrieval" in methods else {}
    for fill, label in (("ga_s2", "GA-S2"), ("zero_shot", "zero-shot")):
        name = f"{fill}_retrieval"
        if name not in methods:
            continue
        base = METHOD_RUNNERS[fill](ctx, [fill])[fill]
        order = keep_then_fill(scores, RETRIEVAL_KEEP, base["ranking"])
        kept = [l for l in order if scores[l] >= RETRIEVAL_KEEP]
        if len(kept) >= ctx["k_frac"]:
            print0(f"{name}: {len(kept)} layers have a head copying at >= RETRIEVAL_KEEP={RETRIEVAL_KEEP}, so its "
                   f"top {ctx['k_frac']} holds no layer of {label}'s; raise --retrieval_keep to leave room for them "
                   f"(docs/selection.md)")
        fill_job = {"train_tokens": base["train_tokens"], "eval_tokens": base["eval_tokens"],
                    "seconds": base["job_seconds"]}
        out[name] = method_result(
            ctx, {l: float(len(order) - i) for i, l in enumerate(order)}, None, True, [job, fill_job],
            {"kept": kept, "keep_at": RETRIEVAL_KEEP,
             "note": f"score = places from the end of the order (kept layers first, then {label}'s ranking)"})
    return out


# method name -> function(ctx, methods) -> {method: result}; one function may answer for several
# methods from the same jobs (ga_s2 + early, ablation + greedy)
METHOD_RUNNERS = {"ga_s2": run_ga_s2, "early": run_ga_s2, "zero_shot": run_zero_shot,
                  "halving": lambda ctx, methods: {"halving": run_halving(ctx)}, "uniform": run_uniform,
                  "mse": lambda ctx, methods: {"mse": run_mse(ctx)}, "ablation": run_ablation_greedy,
                  "greedy": run_ablation_greedy, "retrieval": run_retrieval, "ga_s2_retrieval": run_retrieval,
                  "zero_shot_retrieval": run_retrieval}


def check_methods() -> list[str]:
    methods = [m.strip() for m in METHODS.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_RUNNERS]
    if bad or PRIMARY not in methods:
        raise ValueError(f"--methods={METHODS}: unknown {bad} or PRIMARY={PRIMARY!r} missing; choose from "
                         f"{tuple(METHOD_RUNNERS)}")
    return methods


def setup(cfg: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Load the stage-1 student and the teacher, check the candidates -> the read-only context of every method."""
    ckpt = load_checkpoint(INIT)
    art = Artifact.from_config(ckpt.get("config"), INIT)
    if not art.hybrid_spec:
        raise ValueError(f"{INIT}: a plain model, not a student; pass a stage-1 checkpoint written by "
                         "`python distill.py --stage=1`")
    stage1_spec = list(art.hybrid_spec)
    teacher_dir = resolve_teacher(TEACHER or art.teacher) if is_master() else None
    barrier()  # rank 0 converts/downloads a teacher spec once; the others then find it
    teacher_dir = teacher_dir or resolve_teacher(TEACHER or art.teacher)
    art = art.replace(teacher=teacher_dir)
    teacher_ref, tokenizer = load_teacher(teacher_dir, dtype=torch.float32, device="cpu")
    check_tokenizer(load_manifest(DATA_DIR), tokenizer, DATA_DIR)
    n_layers = teacher_ref.config.num_hidden_layers
    linear = [i for i, m in enumerate(stage1_spec) if m != SOFTMAX]
    candidates = parse_candidates(CANDIDATES, linear)
    if not set(candidates) <= set(linear):
        raise ValueError(f"--candidates={CANDIDATES}: layers {sorted(set(candidates) - set(linear))} are softmax or "
                         f"out of range in the stage-1 spec of {INIT} ({n_layers} layers, linear: {linear})")
    ks = [k for k in KS if k <= len(candidates)]
    k_frac = min(len(candidates), max(1, round(FRACTION * n_layers)))
    if len(ks) != len(KS) or not candidates:
        raise ValueError(f"--ks={KS}: every K must be <= the {len(candidates)} candidate (non-softmax) layers of {INIT}")
    steps_full = CANDIDATE_TOKENS // TOTAL_BATCH_TOKENS
    if steps_full < 1:
        raise ValueError(f"CANDIDATE_TOKENS={CANDIDATE_TOKENS} < TOTAL_BATCH_TOKENS={TOTAL_BATCH_TOKENS}")
    # the reference teacher stays fp32 on CPU (students are built from it); the scoring one moves to device
    teacher = teacher_ref if device.type == "cpu" and dtype == torch.float32 else \
        load_teacher(teacher_dir, dtype=torch.float32, device="cpu")[0]
    teacher.to(device=device, dtype=dtype)
    if COMPILE:
        compile_layers(teacher)
    base = rebuild_student(art, teacher_ref)
    load_state_strict(base, ckpt["model"], f"stage-1 student ({INIT})")
    # every rank scores on the same val set (VAL_REPEATS of its rows with repeats)
    val = repeated_batches(val_batches(DATA_DIR, MICRO_BATCH, SEQ_LEN, EVAL_BATCHES), VAL_REPEATS, SEED)
    return dict(device=device, autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
                teacher=teacher, stage1_spec=stage1_spec, tokenizer=tokenizer,
                teacher_dir=teacher_dir, n_layers=n_layers, candidates=candidates,
                ks=ks + ([k_frac] if k_frac not in ks else []), k_frac=k_frac,
                already_softmax=[i for i, m in enumerate(stage1_spec) if m == SOFTMAX],
                switcher=SpecSwitcher(base.to(device).eval(), teacher_ref, stage1_spec),
                # every candidate trains on one data order (rank 0 of 1): the teacher runs once per batch for all
                targets=TeacherTargets(teacher, ShardLoader(DATA_DIR, "train", MICRO_BATCH, SEQ_LEN), device),
                val=val, h_val=teacher_targets(teacher, val, device), eval_tokens=len(val) * MICRO_BATCH * SEQ_LEN,
                accum=grad_accum_steps(TOTAL_BATCH_TOKENS, MICRO_BATCH, SEQ_LEN, 1), steps_full=steps_full,
                early_step=max(1, round(EARLY_FRAC * steps_full)), cand_dir=os.path.join(RUN_DIR, "candidates"),
                key={**result_settings(cfg, _UNCHANGING), **init_key(ckpt)},  # the --init's own settings too
                init_run_dir=INIT if os.path.isdir(INIT) else os.path.dirname(os.path.dirname(os.path.abspath(INIT))),
                target=art.target)


def run_methods(ctx, methods: list[str], log: RunLogger) -> tuple[dict, dict]:
    """-> ({method: result}, {method: wall seconds}), logging each method as it finishes."""
    results, wall = {}, {}
    for m in methods:
        if m in results:  # answered by an earlier method's runner (early with ga_s2, greedy with ablation)
            continue
        t0 = time.time()
        for name, r in METHOD_RUNNERS[m](ctx, methods).items():
            results[name], wall[name] = r, time.time() - t0
            log.log(f"method {name} | train tokens {format_tokens(r['train_tokens'])} | job seconds "
                    f"{r['job_seconds']:.1f} (wall {wall[name]:.1f}, incl. work shared with other methods) | "
                    f"top-{ctx['k_frac']} {r['top'][str(ctx['k_frac'])]} | ranking {r['ranking']}",
                    {"method": name, "seconds": wall[name], "train_tokens": r["train_tokens"], "scores": r["scores"],
                     "ranking": r["ranking"], "top": r["top"]})
    return results, wall


def score_sets(ctx, results: dict) -> None:
    """Add each method's set_kl (zero-shot KL of its top-K hybrid, one evaluation per distinct set) and,
    with SET_TOKENS > 0, set_trained_kl (after SET_TOKENS of stage 2)."""
    sets = {(m, k): with_softmax(ctx["stage1_spec"], r["top"][k]) for m, r in results.items() for k in r["top"]}
    for (m, k), r in zip(sets, eval_jobs(ctx, list(sets.values()))):
        results[m].setdefault("set_kl", {})[k] = r["kl"]
    if SET_TOKENS > 0:
        steps = max(1, SET_TOKENS // TOTAL_BATCH_TOKENS)
        jobs = [(f"set{steps}_{spec_id(s)}", functools.partial(train_spec, ctx, s, steps, steps, [steps],
                                                                 f"set {m} k{k}")) for (m, k), s in sets.items()]
        res = run_jobs(list(dict(jobs).items()), ctx["cand_dir"], ctx["key"])
        for ((m, k), _), (name, _) in zip(sets.items(), jobs):
            results[m].setdefault("set_trained_kl", {})[k] = res[name]["evals"][-1]["kl"]


def print_table(ctx, results: dict, chosen: list[int], ref: str) -> None:
    """The methods side by side; `ref`: the method their tokens (x ref) and Jaccards (J@K) are measured against."""
    k_frac, w = ctx["k_frac"], max(10, *map(len, results))
    print0(f"tokens and Jaccards against {ref}" + ("" if ref == "ga_s2" else " (the primary; GA-S2 did not run)"))
    print0(f"{'method':<{w}} {'train tok':>10} {'x ref':>8} {'job s':>8} {'wall s':>8} " +
           " ".join(f"{'J@' + k:>6} {'KL@' + k:>8}" for k in map(str, ctx["ks"])) + "  top-" + str(k_frac))
    for m, r in results.items():
        print0(f"{m:<{w}} {format_tokens(r['train_tokens']):>10} {r['token_ratio']:>8.3f} {r['job_seconds']:>8.1f} "
               f"{r['wall_seconds']:>8.1f} " +
               " ".join(f"{r['jaccard'][k]:>6.2f} {r['set_kl'][k]:>8.4f}" for k in map(str, ctx["ks"])) +
               f"  {r['top'][str(k_frac)]}")
    print0(f"chosen ({PRIMARY}, {k_frac} softmax): {chosen} -> {os.path.join(RUN_DIR, 'selection.json')}")


def main() -> dict:
    if SMOKE:
        smoke_settings(globals())
    methods = check_methods()
    rank, local_rank, world_size, device = init_dist(share_gpus=True)
    dtype = autocast_dtype(device)
    seed_all(SEED)
    cfg = config_dict(globals())
    ctx = setup(cfg, device, dtype)
    log, info = RunLogger(RUN_DIR, is_master()), env_info(device, world_size, dtype)
    print0(f"config and environment: {os.path.join(RUN_DIR, 'config.json')}")
    print0(f"{len(ctx['candidates'])} candidates of {ctx['n_layers']} layers over {world_size} rank(s) | GA-S2 "
           f"{ctx['steps_full']} steps x {TOTAL_BATCH_TOKENS} tokens ({format_tokens(CANDIDATE_TOKENS)}/candidate, "
           f"accum {ctx['accum']}) | val {len(ctx['val'])} x {MICRO_BATCH}x{SEQ_LEN}"
           f"{f' ({VAL_REPEATS:g} of rows with repeats)' if VAL_REPEATS else ''} | K {ctx['ks']} "
           f"(fraction {FRACTION} -> {ctx['k_frac']})")
    if is_master():
        atomic_write_json(os.path.join(RUN_DIR, "config.json"), {**cfg, "env": info, "stage1_spec": ctx["stage1_spec"]})
    t_all = time.time()
    results, wall = run_methods(ctx, methods, log)
    score_sets(ctx, results)
    primary = results[PRIMARY]
    ref_name = "ga_s2" if "ga_s2" in results else PRIMARY  # what the others are compared with: GA-S2, the method
    ref = results[ref_name]                                 # they approximate (the primary when it did not run)
    for m, r in results.items():
        r["jaccard"] = {k: jaccard(r["top"][k], ref["top"][k]) for k in r["top"]}
        r["wall_seconds"] = wall[m]
        r["token_ratio"] = r["train_tokens"] / max(1, ref["train_tokens"])
    chosen, k_frac = primary["top"][str(ctx["k_frac"])], ctx["k_frac"]
    selection = {"schema_version": 1, "init": INIT, "teacher": ctx["teacher_dir"], "n_layers": ctx["n_layers"],
                 "stage1_spec": ctx["stage1_spec"], "candidates": ctx["candidates"], "primary": PRIMARY,
                 "ks": ctx["ks"], "fraction": FRACTION, "k_fraction": k_frac, "chosen": chosen,
                 "chosen_spec": with_softmax(ctx["stage1_spec"], chosen), "methods": results, "settings": cfg,
                 "world_size": world_size, "wall_seconds": time.time() - t_all, "env": info}
    if is_master():
        atomic_write_json(os.path.join(RUN_DIR, "selection.json"), selection)
        plot_selection(os.path.join(RUN_DIR, "selection.png"), results, ctx["n_layers"],
                       {m: r["top"][str(k_frac)] for m, r in results.items()})
        print_table(ctx, results, chosen, ref_name)
    barrier()
    cleanup_dist()
    return selection


if __name__ == "__main__":
    run_script(globals(), main, lambda: interrupt_message(
        None, f"re-run the same command: finished jobs in {os.path.join(RUN_DIR, 'candidates')} are reused"))
