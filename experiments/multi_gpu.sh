#!/usr/bin/env bash
# Issue 16 on one host with 2 GPUs (device kind nvidia-h200-x2; NVLink multicast left off): stage 2
# on 1 vs 2 GPUs (DDP, FSDP2, FSDP2 + sharded teacher), GA-S2 on 1 vs 2 GPUs, then a table.
# Needs what `bash experiments/h100.sh train` leaves: models/<teacher>, data/debian, runs/h100/s1_all.
# Usage (GPU machine, repo root, fla on PYTHONPATH):
#   bash experiments/multi_gpu.sh stage2    # ~4 x 1-2 min
#   bash experiments/multi_gpu.sh select    # ~5 + 3 min (GA-S2 only, 30 candidates x 0.52M tokens)
#   bash experiments/multi_gpu.sh table     # tok/s, loss agreement, wall times from the runs' metrics
set -euo pipefail
T=${T:-models/SmolLM2-135M-Instruct.Q4_1}
D=${D:-data/debian}
R=${R:-runs/h100}
M=${M:-runs/multi}
PY=python3
TR="$PY -m torch.distributed.run --standalone --nproc_per_node=2"
mkdir -p "$M"
case "$1" in
stage2)
  # the same global batch (65536 tokens/step) everywhere: 1 GPU accumulates 2 micro-steps, 2 GPUs 1 each
  S="--teacher=$T --data_dir=$D --init=$R/s1_all --spec=gdn --seq_len=2048 --micro_batch=16 --total_batch_tokens=65536
     --stage2_steps=40 --eval_every=40 --eval_batches=4 --save_every=1000 --log_every=1"
  $PY distill.py --stage=2 $S --run_dir=$M/s2_1gpu 2>&1 | tail -3
  $TR distill.py --stage=2 $S --run_dir=$M/s2_2gpu_ddp 2>&1 | tail -3
  $TR distill.py --stage=2 $S --parallel=fsdp --run_dir=$M/s2_2gpu_fsdp 2>&1 | tail -3
  $TR distill.py --stage=2 $S --parallel=fsdp --shard_teacher=True --run_dir=$M/s2_2gpu_fsdp_teacher 2>&1 | tail -3
  ;;
select)
  S="--init=$R/s1_all --data_dir=$D --methods=ga_s2 --candidate_tokens=524288 --seq_len=512 --micro_batch=64
     --total_batch_tokens=65536 --eval_batches=8"
  $PY select_layers.py $S --run_dir=$M/select_1gpu 2>&1 | tail -3
  $TR select_layers.py $S --run_dir=$M/select_2gpu 2>&1 | tail -3
  ;;
table)
  $PY - "$M" <<'PY'
import json, os, sys
m = sys.argv[1]
def rows(run):
    with open(os.path.join(m, run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
base = {r["step"]: r["loss"] for r in rows("s2_1gpu") if "loss" in r}
one = None
for run in ("s2_1gpu", "s2_2gpu_ddp", "s2_2gpu_fsdp", "s2_2gpu_fsdp_teacher"):
    if not os.path.exists(os.path.join(m, run, "metrics.jsonl")):
        continue
    r = [x for x in rows(run) if "loss" in x]
    steady = [x["tok_per_s"] for x in r if x["step"] >= min(5, len(r) - 1)]  # after fla's autotuning
    tok = sum(steady) / len(steady)
    one = one or tok
    diff = max(abs(x["loss"] - base[x["step"]]) / abs(base[x["step"]]) for x in r)
    print(f"{run:22s} tok/s {tok / 1e3:7.1f}k  x{tok / one:.2f}  max rel loss diff vs 1 GPU {diff:.1e}")
walls = {}
for run in ("select_1gpu", "select_2gpu"):
    if os.path.exists(os.path.join(m, run, "metrics.jsonl")):
        walls[run] = [x["seconds"] for x in rows(run) if x.get("method") == "ga_s2"][-1]
        print(f"{run:22s} GA-S2 wall {walls[run]:.0f}s  x{walls['select_1gpu'] / walls[run]:.2f}")
PY
  ;;
esac
