#!/usr/bin/env bash
# The speed measurements that need no teacher and no data (random weights in the SmolLM2-135M shape),
# for one lease: `PLAN=speed bash experiments/lease.sh start 540`, then `poll` calls (only the fla
# wheels carried). Parts in order of what they decide, each capped, each writing runs/speed/<part>.txt:
#   engine         bench.py at 16K B32, norm_linear off and on (fused engines only): picks the setting of
#                  the full table (issue 12)
#   bench          the full table (2K/16K/32K x B1/B32/max, teacher eager/engine, hybrid, and the "unfused"
#                  baselines), a decode profile at 16K B32 and a batch-1 prefill profile at 16K
#   gpu_tests      the GPU tests of the engine's kernels and the training fast paths (`pytest -m gpu -v`:
#                  a line per test, so that a cap keeps what passed)
#   gdn_kernels    op_gdn_train's kernels alone against their bytes, their block sizes, and a compiled GDN mixer
#                  with them off and on
#   train_ab       the fast path in one process with GDN_TRAIN_KERNELS off and on (op_gdn_train's Triton kernels for
#                  GDN's inputs and output norm), same init and batches: stage 2 at micro-batch 32 and 64 (tokens/s,
#                  peak memory, losses; micro 64 only where the GPU has > 100 GB), the step by phase with kernel kinds
#                  and top kernels, GA-S2 candidates on shared teacher targets at micro-batch 64 with their steps and
#                  scoring as CUDA graphs off and on (graphs.py), stage-1 rotation at 64 (issue 11)
#   train_kl       stage 2 with the logit KL in chunks of 16384 tokens instead of 4096 (micro 32, kernels off)
#   train          stage-1 rotation, eager and fast
#   train_eager    stage 2's eager reference at micro-batch 16 beside the fast path with the kernels at 64, in one
#                  process: the side-by-side table of issue 11 (same init and batches, losses beside tokens/s)
#   gas2_shared    train_ab's GA-S2 candidates (kernels off) in two processes sharing the GPU at once: their summed
#                  tokens/s against train_ab's one process (select_layers.py's launch-bound steps)
#   gpu_tests_fla  fla's ops vs the torch references (tests/test_ops.py): last, as fla's JIT of each op on a
#                  fresh machine took ~5 minutes for the first one (2026-12-02)
# DEADLINE_S (s from the start, 0 = none): a part that would start with under its cap left is skipped.
# PARTS (default "gpu_tests train_ab train_kl train_eager gpu_tests_fla": issue 11's open training parts
# and the GPU tests, ~25 min on a fresh machine; gas2_shared, train and gdn_kernels were measured on 2026-12-06; the inference
# parts closed with issue 12): the parts to run, e.g.
# PARTS="engine bench" for the inference table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=runs/speed
DEADLINE_S=${DEADLINE_S:-0}
PARTS=${PARTS:-gpu_tests train_ab train_kl train_eager gpu_tests_fla}
export PYTHONUNBUFFERED=1  # a part cut by its cap keeps what it printed
mkdir -p $OUT_DIR
T0=$(date +%s)
part() {  # part NAME CAP_S COMMAND...: run it capped, unless the deadline is too close
  local name=$1 cap=$2; shift 2
  [[ " $PARTS " == *" ${name%%_compile_*} "* ]] || return 0  # engine_compile_X_... is part "engine"
  local left=$(( DEADLINE_S - ($(date +%s) - T0) ))
  if [ "$DEADLINE_S" -gt 0 ] && [ "$left" -lt "$cap" ]; then
    echo "== $name: skipped ($left s left, cap $cap s)" | tee $OUT_DIR/$name.txt; return 0
  fi
  echo "== $name | elapsed $(( $(date +%s) - T0 ))s | cap ${cap}s: $*"
  timeout "$cap" "$@" 2>&1 | grep -v "it/s\]" > $OUT_DIR/$name.txt
  echo "== $name: rc ${PIPESTATUS[0]} after $(( $(date +%s) - T0 ))s"
  tail -30 $OUT_DIR/$name.txt
}
for nl in False True; do  # compile=True measured slower than the Triton kernels (results.md, run 3)
  part engine_compile_False_norm_linear_$nl 120 $PY bench.py --random=True --norm_linear=$nl --contexts=[16384] \
    --batches=[32] --eager=False --unfused_baseline=False --repeats=3 --out_dir=$OUT_DIR/engine_compile_False_norm_linear_$nl
done
best=$($PY - <<'EOF'
import glob, json
rows = []
for f in glob.glob("runs/speed/engine_*/bench.json"):
    r = json.load(open(f))
    tok = [x["decode_tok_s"] for x in r["rows"] if x["model"] == "hybrid engine" and x["batch"] == 32 and "decode_tok_s" in x]
    if tok:
        rows.append((tok[0], r["compile"], r.get("norm_linear", False)))
print(f"--compile={max(rows)[1]} --norm_linear={max(rows)[2]}" if rows else "")
EOF
)
echo "fastest engine settings: ${best:-none measured}"
part bench 330 $PY bench.py --random=True --repeats=2 --prefill_repeat_tokens=131072 --profile=[16384,32] \
  --profile_prefill=[16384] $best \
  --out_dir=$OUT_DIR/bench
part gpu_tests 300 bash -c "for f in tests/test_gdn_train.py tests/test_graphs.py tests/test_fastpath.py tests/test_losses.py \
  tests/test_mixers.py tests/test_engine.py tests/test_decode_kernels.py; do $PY -m pytest -m gpu -o addopts= -v -rfE \
  --tb=short \$f; done"  # a file at a time: a failure's traceback is printed before the cap can cut the rest
part gdn_kernels 200 $PY bench_kernels.py --sections=gdn_train --out_file=$OUT_DIR/gdn_kernels.md  # op_gdn_train alone
MICROS=[32,64]  # micro-batch 64 at T=2048 peaks at 95-112 GiB: an H100's 80 GiB takes 32 only
[ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)" -gt 100000 ] 2>/dev/null || MICROS=[32]
part train_ab 540 $PY bench_train.py --sections=stage2,phases,gas2,stage1 --paths=fast --base_micro_batch=32 \
  --fast_micro_batches=$MICROS --gas2_micro_batches=[64] --stage1_micro_batches=[64] --gdn_train_kernels=off,cuda \
  --out_dir=$OUT_DIR/train_ab  # the fast path with GDN's inputs and norm as compiled torch vs op_gdn_train's kernels
part train_kl 200 $PY bench_train.py --sections=stage2,phases --paths=fast --base_micro_batch=32 --fast_micro_batches=[32] \
  --kl_chunk_tokens=16384 --out_dir=$OUT_DIR/train_kl  # the KL in 4x larger chunks: a quarter of the per-chunk LM-head
  # grad accumulations (~7 ms per step at 4096 on the H100), ~4 GB more peak; against train_ab's micro-32 rows
part train_eager 240 $PY bench_train.py --sections=stage2 --fast_micro_batches=[${MICROS: -3:2}] --gdn_train_kernels=cuda \
  --out_dir=$OUT_DIR/train_eager  # the eager reference beside the fastest path, one process (issue 11's table)
part gas2_shared 240 bash -c "for i in 0 1; do $PY bench_train.py --sections=gas2 --paths=fast --gas2_micro_batches=[64] \
  --out_dir=$OUT_DIR/gas2_shared_\$i & done; wait"  # two processes on the GPU at once (select_layers.py under torchrun --nproc_per_node=2 on one GPU)
part train 200 $PY bench_train.py --sections=stage1 --out_dir=$OUT_DIR/train
part gpu_tests_fla 300 $PY -m pytest -m gpu -o addopts="" -v -rfE tests/test_ops.py  # fla's JIT: ~5 min on a fresh machine
echo "== speed plan done after $(( $(date +%s) - T0 ))s"
