#!/usr/bin/env bash
# The whole pipeline on one machine: prepare -> stage 1 -> layer selection -> stage 2 -> export -> eval.
# Usage: ./distill.sh [--name=value ...]     overrides go to both distill.py stages (e.g. --seq_len=1024)
#   NPROC=8 ./distill.sh                     processes per stage (default: number of GPUs, else 1)
#   TEACHER=HuggingFaceTB/SmolLM2-135M DATA=fineweb-edu RUN=runs/smollm2 K=8 ./distill.sh
# With no GPU it runs a CPU-sized budget of every stage (minutes, for trying the tool, not for a
# useful model) and says so; on GPUs the budgets are real (stage 1 ~100M tokens at 512, stage 2
# ~200M tokens at 2048 for SmolLM2-135M; see README).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
TEACHER=${TEACHER:-embedded}
DATA=${DATA:-debian}
DATA_DIR=data/$DATA
RUN=${RUN:-runs/hybrid}
MIXER=${MIXER:-gdn}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
launch() { $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"; }
if [ "$GPUS" -eq 0 ]; then
  echo "distill.sh: no GPU found: running a CPU-sized budget of every stage (a smoke run, not a useful model)"
  PREP=(--debian_packages=small)  # the six small Debian sources (8.7M tokens, ~2.5 min), not all ~79M
  [ "$DATA" = debian ] && DATA_DIR=data/debian_small
  S1=(--seq_len=128 --micro_batch=4 --total_batch_tokens=512 --steps_per_layer=20 --eval_batches=2 --log_every=5)
  SEL=(--smoke=True)
  S2=(--seq_len=128 --micro_batch=4 --total_batch_tokens=512 --stage2_steps=40 --eval_every=20 --eval_batches=2 --log_every=5)
  EVAL=(--smoke=True)
else
  PREP=()
  S1=(--seq_len=512 --micro_batch=32 --total_batch_tokens=65536 --stage1_mode=all --stage1_steps=1500)    # ~100M tokens
  SEL=()
  S2=(--seq_len=2048 --micro_batch=8 --total_batch_tokens=131072 --stage2_steps=1500)                     # ~200M tokens
  EVAL=()
fi
$PY prepare.py --teacher="$TEACHER" --dataset="$DATA" --out_dir="$DATA_DIR" "${PREP[@]}"
launch distill.py --stage=1 --teacher="$TEACHER" --data_dir="$DATA_DIR" --spec="$MIXER" --run_dir="$RUN/stage1" "${S1[@]}" "$@"
launch select_layers.py --init="$RUN/stage1" --data_dir="$DATA_DIR" --run_dir="$RUN/select" "${SEL[@]}"
launch distill.py --stage=2 --teacher="$TEACHER" --data_dir="$DATA_DIR" --init="$RUN/stage1" \
  --spec="$RUN/select/selection.json" --run_dir="$RUN/stage2" "${S2[@]}" "$@"
$PY export.py --checkpoint="$RUN/stage2" --out_dir="$RUN/export"
$PY eval.py --teacher="$TEACHER" --models="teacher,hybrid=$RUN/export" --data_dir="$DATA_DIR" --out_dir="$RUN/eval" "${EVAL[@]}"
echo "distill.sh: done. Hybrid model: $RUN/export (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)); report: $RUN/eval"
