"""Which of the teacher's heads does in-context recall need, and does general text notice them? (issue 13)

    python -m experiments.ablate_heads                         # SmolLM2-135M on CPU: ~18 min on 2 cores
    python -m experiments.ablate_heads --ablations="copy:2;layers:5,21"

First the teacher's copy heads are scored as select_layers.py's `retrieval` method scores them
(hybrid/retrieval.py: MQAR prompts from the val text), and its previous-token heads (the copy heads' partners:
attention argmax on the token just before) are printed. Then, for each ablation, some heads' outputs are
zeroed (their columns of o_proj) and two things are measured against the intact teacher:
  MQAR accuracy  the teacher-forced value at each repeated key (as eval.py scores MQAR), on prompts of
                 another seed than the ones the heads were scored on;
  held-out KL    KL(teacher || ablated) on val text: what GA-S2 ranks layers by; and the same on those val
                 rows with long-range repeats of their own spans (hybrid/repeats.py, as --repeat_rows trains
                 on), where a teacher copies: what a GA-S2 scored on such rows would rank by.
An ablation is `copy:N` (the N best copy heads), `layers:a,b` (every head of those layers), `heads:l.h,l.h`
or `random:N` (N heads drawn from layers whose best copy head scores < 0.1, seeded). A recall-aware
selection matters when a few heads carry recall and cost general text little: then GA-S2's KL does not
see them and a hybrid that makes their layers linear loses recall. Prints a markdown table; writes
OUT (JSON) when set.
"""

import random

import torch

from hybrid.checkpoint import atomic_write_json
from hybrid.common import run_script
from hybrid.recall_score import run_recall
from hybrid.repeats import repeated_batches
from hybrid.retrieval import head_copy_scores, mqar_prompts, previous_token_rates
from hybrid.shards import split_tokens, val_batches
from hybrid.stage2 import held_out_kl, teacher_targets
from hybrid.teacher import load_teacher

TEACHER = "models/SmolLM2-135M-Instruct.Q4_1"  # an HF folder (prepare.py puts the teacher here)
DATA_DIR = "data/debian"        # val shards: the MQAR haystack and the KL's text
PROMPTS = 16                    # MQAR prompts for the scores, and as many (another seed) for the accuracy
LENGTH = 1024                   # tokens per MQAR prompt
EVAL_BATCHES = 4                # val batches of 4 x LENGTH tokens for the KL
ABLATIONS = "copy:1;copy:2;copy:3;random:3;layers:17,18;layers:17,18,23;layers:5,21;layers:1,2,3"
SEED = 1337
OUT = ""                        # a JSON path for the table, "" = print only


def parse(ablation: str, scores: torch.Tensor, rng: random.Random) -> list[tuple[int, int]]:
    """An ablation string -> its (layer, head) pairs."""
    kind, _, arg = ablation.partition(":")
    L, H = scores.shape
    if kind == "copy" and arg.isdigit():
        order = scores.flatten().argsort(descending=True)[:int(arg)].tolist()
        return [(i // H, i % H) for i in order]
    if kind == "layers" and arg:
        return [(int(l), h) for l in arg.split(",") for h in range(H)]
    if kind == "heads" and arg:
        return [tuple(int(v) for v in lh.split(".")) for lh in arg.split(",")]
    if kind == "random" and arg.isdigit():
        pool = [(l, h) for l in range(L) if scores[l].max() < 0.1 for h in range(H)]
        return rng.sample(pool, int(arg))
    raise ValueError(f"--ablations: {ablation!r}; expected copy:N, layers:a,b, heads:l.h,l.h or random:N")


def zero_heads(model, heads: list[tuple[int, int]]) -> list:
    """Zero the o_proj columns of `heads`; -> what restore() puts back."""
    saved = []
    for l, h in heads:
        attn = model.model.layers[l].self_attn
        cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        saved.append((attn.o_proj.weight, cols, attn.o_proj.weight[:, cols].clone()))
        attn.o_proj.weight.data[:, cols] = 0
    return saved


def restore(saved: list) -> None:
    for w, cols, old in saved:
        w.data[:, cols] = old


def main() -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_teacher(TEACHER, dtype=torch.float32, device=device)
    model.eval()
    hay = split_tokens(DATA_DIR, "val")
    scores, n = head_copy_scores(model, mqar_prompts(tokenizer, hay, PROMPTS, LENGTH, SEED), device)
    top = scores.flatten().argsort(descending=True)[:6].tolist()
    H = scores.shape[1]
    print(f"copy heads (layer.head hit rate, {n} repeated keys): "
          + ", ".join(f"{i // H}.{i % H} {float(scores.flatten()[i]):.3f}" for i in top))
    test = [{**r, "index": i} for i, r in enumerate(mqar_prompts(tokenizer, hay, PROMPTS, LENGTH, SEED + 1))]  # unscored
    val = val_batches(DATA_DIR, 4, LENGTH, EVAL_BATCHES)
    prev = previous_token_rates(model, val[0][0].to(device)).flatten()  # the copy heads' partners, on plain text
    print("previous-token heads (layer.head rate): "
          + ", ".join(f"{i // H}.{i % H} {float(prev[i]):.2f}" for i in prev.argsort(descending=True)[:6].tolist()))
    h_val = teacher_targets(model, val, device)
    rep = repeated_batches(val, 1.0, SEED)  # every row of every val batch given repeats (hybrid/repeats.py)
    h_rep = teacher_targets(model, rep, device)
    off = torch.autocast(device.type, enabled=False)
    rows, rng = [], random.Random(SEED)
    print("| ablation | heads | MQAR accuracy | held-out KL | KL on rows with repeats |\n| --- | --- | --- | --- | --- |")
    for ablation in ["none"] + [a for a in ABLATIONS.split(";") if a]:
        heads = [] if ablation == "none" else parse(ablation, scores, rng)
        saved = zero_heads(model, heads)
        acc = run_recall(model, tokenizer, test, device, batch_size=4)["overall"]  # as eval.py scores MQAR
        kl = held_out_kl(model, model, val, device, off, h_teacher=h_val)["val_kl"]
        kl_rep = held_out_kl(model, model, rep, device, off, h_teacher=h_rep)["val_kl"]
        restore(saved)
        rows.append({"ablation": ablation, "heads": [f"{l}.{h}" for l, h in heads], "mqar": acc, "val_kl": kl,
                     "repeats_kl": kl_rep})
        shown = ", ".join(rows[-1]["heads"]) if len(heads) <= 4 else f"{len(heads)} heads"
        print(f"| {ablation} | {shown} | {acc:.3f} | {kl:.4f} | {kl_rep:.4f} |", flush=True)
    if OUT:
        atomic_write_json(OUT, {"rows": rows, "head_hit_rate": scores.tolist(), "settings": {
            "teacher": TEACHER, "prompts": PROMPTS, "length": LENGTH, "eval_batches": EVAL_BATCHES, "seed": SEED}})
        print(f"wrote {OUT}")
    return rows


if __name__ == "__main__":
    run_script(globals(), main)
