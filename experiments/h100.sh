#!/usr/bin/env bash
# The first real runs on one H100 (the device tool), in phases that each fit one 10-minute call.
# Usage (on the GPU machine, from the repo root, with fla on PYTHONPATH):
#   bash experiments/h100.sh teacher GGUF   # normalise the GGUF teacher into models/, check logits
#   bash experiments/h100.sh train          # stage 1 (both modes), stage 2 all-GDN (profiled), train.py speed
#   bash experiments/h100.sh select         # GA-S2 + cheaper variants + baselines, then stage 2 for 3 hybrids
#   bash experiments/h100.sh final          # export, eval (KL, ppl, recall), bench
# Every phase appends its logs to $OUT/results.tgz-able files under runs/h100/.
set -euo pipefail
T=${T:-models/SmolLM2-135M-Instruct.Q4_1}
D=${D:-data/debian}
R=${R:-runs/h100}
X=""                      # SMOKE=1: the same flow with CPU-sized budgets (a dry run of this script)
[ -n "${SMOKE:-}" ] && X="--smoke=True"
OUT=${OUT:-/tmp/out}
PY=python3
mkdir -p "$R"
pack() { tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.safetensors' runs/h100 2>/dev/null || true; }
trap pack EXIT
case "$1" in
teacher)
  $PY -c "from hybrid.teacher import resolve_teacher; print(resolve_teacher('$2'))"
  $PY -m experiments.check_teacher --gguf="$2" --teacher="$T" | tee "$R/check_teacher.txt"
  ;;
train)
  S="--teacher=$T --data_dir=$D --eval_batches=16 --log_every=10"
  [ -n "$X" ] && TR="--seq_len=64 --micro_batch=2 --total_batch_tokens=128 --max_steps=3" || TR="--seq_len=2048 --micro_batch=16 --total_batch_tokens=65536 --max_steps=20"
  $PY train.py --model=$T --data_dir=$D $TR \
      --warmup_steps=5 --eval_every=20 --eval_batches=8 --log_every=5 --run_dir=$R/train 2>&1 | tail -8 | tee $R/train.out
  # stage 1, all layers at once: 96 steps x 64k tokens at T=512 (6.3M tokens, every layer sees all of them)
  $PY distill.py --stage=1 --stage1_mode=all $S --seq_len=512 --micro_batch=64 --total_batch_tokens=65536 \
      --stage1_steps=96 --lr=1e-3 --run_dir=$R/s1_all $X 2>&1 | tee $R/s1_all.out | grep -v "^step" || true
  pack
  # stage 2, all-GDN from the all-layers stage 1: 40 steps x 64k tokens at T=2048 (measured: 55k tok/s)
  $PY distill.py --stage=2 --init=$R/s1_all $S --spec=gdn --seq_len=2048 --micro_batch=16 --total_batch_tokens=65536 \
      --stage2_steps=40 --eval_every=40 --eval_batches=4 --log_every=5 --run_dir=$R/s2_gdn $X 2>&1 | tee $R/s2_gdn.out | tail -14
  pack
  # where the time goes: 8 steps, steps 3-7 profiled (bounded: profiling fla's autotuner can be slow)
  timeout 180 $PY distill.py --stage=2 --init=$R/s1_all $S --spec=gdn --seq_len=2048 --micro_batch=16 \
      --total_batch_tokens=65536 --stage2_steps=9 --eval_every=100 --save_every=100 --profile=True \
      --run_dir=$R/s2_profile $X 2>&1 | tail -40 || true
  pack
  # stage 1, rotation: the same tokens per layer (96 steps x 64k), one layer at a time from a latent cache
  $PY distill.py --stage=1 --stage1_mode=rotation $S --seq_len=512 --micro_batch=64 --total_batch_tokens=65536 \
      --steps_per_layer=96 --latent_cache_tokens=6291456 --lr=1e-3 --run_dir=$R/s1_rot $X 2>&1 | tee $R/s1_rot.out | grep -v "^step" || true
  pack
  ;;
select)
  $PY select_layers.py --init=$R/s1_all --data_dir=$D --methods=ga_s2,zero_shot,halving,early,uniform,mse,ablation \
      --candidate_tokens=524288 --seq_len=512 --micro_batch=64 --total_batch_tokens=65536 --eval_batches=8 \
      --run_dir=$R/select $X 2>&1 | tee $R/select.out | grep -v "step 0" || true
  pack
  S="--teacher=$T --data_dir=$D --init=$R/s1_all --seq_len=2048 --micro_batch=16 --total_batch_tokens=65536 --stage2_steps=40 --eval_every=40 --eval_batches=4"  # same budget as s2_gdn
  $PY distill.py --stage=2 $S --spec=$R/select/selection.json --run_dir=$R/s2_gas2 $X 2>&1 | tail -4 | tee $R/s2_gas2.out
  U=$($PY -c "import json; s=json.load(open('$R/select/selection.json')); print(','.join(map(str, s['methods']['uniform']['top'][str(s['k_fraction'])])))")
  $PY distill.py --stage=2 $S --spec="gdn;softmax=$U" \
      --run_dir=$R/s2_uniform $X 2>&1 | tail -4 | tee $R/s2_uniform.out
  ;;
final)
  for m in gdn gas2 uniform; do $PY export.py --checkpoint=$R/s2_$m --out_dir=$R/export_$m 2>&1 | tail -3; done
  $PY eval.py --teacher=$T --data_dir=$D --models=teacher,all_gdn=$R/export_gdn,uniform25=$R/export_uniform,ga_s2_25=$R/export_gas2 \
      --recall_samples=10 --eval_batches=16 --out_dir=$R/eval $X 2>&1 | tee $R/eval.out | tail -40
  pack
  B="--contexts=[2048,8192,16384] --batches=[1,8,32] --new_tokens=64"
  [ -n "$X" ] && B="--contexts=[64] --batches=[2] --new_tokens=4"
  $PY bench.py --teacher=$T --hybrid=$R/export_gas2 $B \
      --repeats=2 --out_dir=$R/bench 2>&1 | tee $R/bench.out | tail -30
  ;;
esac
