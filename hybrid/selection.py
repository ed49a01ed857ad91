"""Mechanism for select_layers.py: which layers of a hybrid should stay softmax.

    jobs = [(f"ga_s2_layer_{l:02d}", partial(train_and_score, l)) for l in candidates]
    results = run_jobs(jobs, "runs/select/candidates", key)   # spread over ranks, resumable
    ranking = rank_layers(scores, higher_is_better=False)    # best softmax layer first
    jaccard(top_k(ranking, 4), top_k(reference, 4))

Independent jobs (one candidate layer each) go round-robin over the ranks of a torchrun job with no
DDP; each finished job is written atomically to <out_dir>/<name>.json and is not rerun. Zero-shot
evaluations of many specs share one student whose layers hold both a stage-1 mixer and a copy of
the teacher attention (`SpecSwitcher`), so no module is copied per evaluation. The teacher's val
hidden states are computed once (`stage2.teacher_targets`) and reused by every evaluation.
"""

import copy
import hashlib
import json
import math
import os
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .capture import attention_call, capture_all_layers, layer_call, rope_for
from .checkpoint import atomic_write_json
from .common import Progress, print0, world
from .plots import pyplot, save_figure
from .surgery import SOFTMAX, decoder_layers, swap_attention


# ----------------------------------------------------------------------------- specs and rankings
def spec_id(spec: list[str]) -> str:
    """A short stable name for a spec (job file names)."""
    return hashlib.sha1(",".join(spec).encode()).hexdigest()[:12]


def rank_layers(scores: dict[int, float], higher_is_better: bool) -> list[int]:
    """Layers ordered best-as-softmax first; ties broken by the lower layer index."""
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scores, key=lambda l: (sign * scores[l], l))


def top_k(ranking: list[int], k: int) -> list[int]:
    return sorted(ranking[:k])


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def uniform_layers(candidates: list[int], k: int) -> list[int]:
    """Every len/k-th candidate: the centres of k equal blocks (30 layers, k=4 -> 3, 11, 18, 26)."""
    n = len(candidates)
    return sorted({candidates[min(n - 1, int((j + 0.5) * n / k))] for j in range(k)})


def parse_candidates(text: str, linear: list[int]) -> list[int]:
    """--candidates -> sorted layer indices: "all" (every linear layer), "spread:N" (N linear layers
    spread evenly over depth, as uniform_layers, or all of them if fewer: a cheap first pass) or a
    comma list "0,4,8"."""
    text = str(text).strip()
    if text == "all":
        return list(linear)
    if text.startswith("spread:"):
        n = text[len("spread:"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--candidates={text}: N in spread:N must be a positive integer")
        return uniform_layers(linear, min(int(n), len(linear)))
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--candidates={text}: expected 'all', 'spread:N' or layer indices like '0,4,8'") from None


def halving_schedule(n: int, full_steps: int, budget_frac: float) -> list[tuple[int, int]]:
    """Successive halving: [(n_candidates, steps)] per round, n halving (rounded up) and steps
    doubling each round until 2 are left, the first round's steps chosen so that the total is at
    most budget_frac * n * full_steps (a full GA-S2 run). Raises if that leaves < 1 step."""
    counts = [n]
    while counts[-1] > 2:
        counts.append(math.ceil(counts[-1] / 2))
    weight = sum(c * 2 ** r for r, c in enumerate(counts))
    first = int(budget_frac * n * full_steps // weight)
    if first < 1:
        raise ValueError(f"successive halving: {budget_frac:.2f} of {n} x {full_steps} steps is less than one step "
                         f"per candidate in round 0 of {len(counts)}; raise CANDIDATE_TOKENS or HALVING_FRAC")
    return [(c, first * 2 ** r) for r, c in enumerate(counts)]


def halving_ranking(rounds: list[dict[int, float]]) -> list[int]:
    """rounds[r] = {layer: score (lower better)} of round r. Later survivors rank first; within a
    round, by score."""
    order, placed = [], set()
    for scores in reversed(rounds):
        for layer in rank_layers(scores, higher_is_better=False):
            if layer not in placed:
                order.append(layer)
                placed.add(layer)
    return order


# ----------------------------------------------------------------------------- distributed, resumable jobs
def run_jobs(jobs: list[tuple[str, Callable[[], dict]]], out_dir: str, key: dict) -> dict[str, dict]:
    """Run independent jobs round-robin over ranks (no DDP); -> {name: result} on every rank.

    Rank 0 loads the results already in <out_dir>/<name>.json and broadcasts them; the rest are
    dealt round-robin, each rank writes its own result files atomically (a crash loses at most the
    running jobs), and all_gather_object brings every result to every rank. `key` (the settings a
    result depends on) is stored in each file; a file with another key is an error, not a reuse.
    """
    rank, world_size = world()
    done = {}
    if rank == 0:
        for name, _ in jobs:
            path = os.path.join(out_dir, name + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    result = json.load(f)
                if result.get("key") != key:
                    diff = sorted(k for k in set(key) | set(result.get("key", {}))
                                  if key.get(k) != result.get("key", {}).get(k))
                    raise ValueError(f"{path}: computed with other settings ({diff}); use a new --run_dir or "
                                     f"delete {out_dir}/ to recompute")
                done[name] = result
    if world_size > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    # one run per name: the same job listed twice (two methods choosing the same set) would otherwise
    # go to two ranks, which then race to rename the same .tmp file
    pending = list({name: (name, fn) for name, fn in jobs if name not in done}.values())
    mine, share = {}, pending[rank::world_size]
    prog = Progress(len(share), f"selection, {len(jobs)} jobs ({len(jobs) - len(pending)} reused)", unit="job")
    for n, (name, fn) in enumerate(share):
        t0 = time.time()
        result = {**fn(), "job": name, "seconds": time.time() - t0, "rank": rank, "key": key}
        atomic_write_json(os.path.join(out_dir, name + ".json"), result)
        mine[name] = result
        if result["seconds"] >= 2 or n + 1 == len(share):  # quick zero-shot jobs would flood the log
            print0(f"job {name} done | {result['seconds']:.1f}s | rank 0: {n + 1}/{len(share)} jobs | {prog.line(n + 1)}")
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            done.update(part)
    else:
        done.update(mine)
    return {name: done[name] for name, _ in jobs}


# ----------------------------------------------------------------------------- evaluation
class SpecSwitcher:
    """One stage-1 student whose layers can each run the stage-1 mixer or the teacher's attention.

    set(spec) swaps self_attn modules in place: zero-shot scores of hundreds of specs (greedy
    removal is O(L^2)) without copying a model per spec."""

    def __init__(self, student: nn.Module, teacher: nn.Module, base_spec: list[str]):
        self.student, self.base = student, list(base_spec)
        ref = next(student.parameters())
        self.mixers = [layer.self_attn for layer in decoder_layers(student)]
        self.attn = [copy.deepcopy(layer.self_attn).to(device=ref.device, dtype=ref.dtype)
                     for layer in decoder_layers(teacher)]

    def set(self, spec: list[str]) -> nn.Module:
        for i, (name, base) in enumerate(zip(spec, self.base)):
            if name not in (SOFTMAX, base):
                raise ValueError(f"layer {i}: spec asks for {name!r}; only 'softmax' or the stage-1 mixer {base!r}")
            module = self.attn[i] if name == SOFTMAX else self.mixers[i]
            if decoder_layers(self.student)[i].self_attn is not module:
                swap_attention(self.student, i, module)
        return self.student

    def copy(self, spec: list[str]) -> nn.Module:
        """A trainable student with `spec`, copied where the resident one lives (the GPU): the weights
        rebuild_student + seed_from give from the stage-1 checkpoint (tested), without a CPU copy of the
        teacher and a 0.6 GB transfer per GA-S2 candidate."""
        return copy.deepcopy(self.set(spec)).requires_grad_(True).train()


@torch.no_grad()
def stage1_mse(teacher: nn.Module, student: nn.Module, batches: list, layers: list[int], target: str,
               device: torch.device, autocast) -> dict[int, dict]:
    """Per layer: MSE of student layer i on the teacher's input to layer i against the teacher's
    output ("layer" or "attn", as stage 1 trained it), raw and normalised by the mean square of the
    teacher's attention output at that layer (1.0 ~ as bad as deleting the attention).
    -> {layer: {"mse", "nmse"}}, averaged over batches."""
    sums = {i: [0.0, 0.0] for i in layers}
    call = layer_call if target == "layer" else attention_call
    for x, _ in batches:
        caps = capture_all_layers(teacher, x.to(device), layers, target)
        pe, pos = rope_for(teacher, caps[layers[0]][0])
        for i in layers:
            h_in, want = caps[i]
            attn_out = want if target == "attn" else attention_call(decoder_layers(teacher)[i], h_in, pe, pos)
            with autocast:
                got = call(decoder_layers(student)[i], h_in.to(next(student.parameters()).dtype), pe, pos)
            sums[i][0] += float((got.float() - want.float()).pow(2).mean())
            sums[i][1] += float(attn_out.float().pow(2).mean())
    n = len(batches)
    return {i: {"mse": s / n, "nmse": s / max(a, 1e-30)} for i, (s, a) in sums.items()}


# ----------------------------------------------------------------------------- plot
# the y-axis of each method's panel: what its score measures
SCORE_LABELS = {"ga_s2": "held-out KL\nafter training", "early": "held-out KL\n(early stop)",
                "halving": "held-out KL\n(round 0)", "zero_shot": "held-out KL\n(no training)",
                "ablation": "held-out KL\n(only l linear)", "mse": "stage-1 MSE\n(normalised)",
                "greedy": "removal order\n(0 = made linear first)"}


def plot_selection(path: str, methods: dict, n_layers: int, chosen: dict[str, list[int]]) -> None:
    """One bar panel per method with per-layer scores (`methods[m]["scores"]` keyed by str(layer),
    `methods[m]["direction"]`); the layers in chosen[m] are drawn in a second colour. Written
    atomically (path.tmp.png, then rename)."""
    plt = pyplot()
    scored = [m for m, r in methods.items() if r.get("scores")]
    if not scored:
        return
    fig, axes = plt.subplots(len(scored), 1, figsize=(max(6.0, 0.3 * n_layers + 2), 2.2 * len(scored)), squeeze=False)
    for ax, m in zip(axes[:, 0], scored):
        scores, spread = methods[m]["scores"], methods[m].get("spread") or {}
        xs = sorted(int(k) for k in scores)
        colors = ["tab:red" if x in chosen.get(m, []) else "tab:blue" for x in xs]
        ax.bar(xs, [scores[str(x)] for x in xs], color=colors,
               yerr=[spread.get(str(x), 0.0) for x in xs] if spread else None)
        better = "lower" if methods[m]["direction"] == "lower" else "higher"
        ax.set_title(f"{m}: {better} = keep softmax; red = chosen", fontsize=9)
        lo = min(scores[str(x)] - spread.get(str(x), 0.0) for x in xs)
        hi = max(scores[str(x)] + spread.get(str(x), 0.0) for x in xs)
        if lo > 0 and hi - lo < 0.5 * hi:  # close scores (KLs of 2.1 to 2.2): zoom in so they differ visibly
            ax.set_ylim(max(0.0, lo - (hi - lo) - 0.01 * hi), hi + 0.3 * (hi - lo) + 0.01 * hi)
        label = SCORE_LABELS.get(m, "score")
        ax.set_ylabel(label + ("\n(nats/token)" if "KL" in label else ""), fontsize=8)
        ax.set_xticks(range(n_layers))
        ax.set_xlim(-0.6, n_layers - 0.4)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    save_figure(fig, path)
