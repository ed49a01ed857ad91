#!/usr/bin/env bash
# Issue 13's comparison at equal budgets, from a layer selection made earlier (a committed selection.json,
# so no lease spends its minutes selecting again): stage 1 once, then stage 2 of each arm with the same
# tokens and settings, an export of each, and one eval of the teacher and every arm.
# Usage (repo root; on the device through `PLAN=compare bash experiments/lease.sh start`):
#   TEACHER=<gguf|HF dir|embedded> ARMS="ga_s2 uniform all_gdn" bash experiments/compare.sh
# An arm is a method of SELECTION (its top-K layers softmax, K = the selection's 25% of layers; method@K:
# its top K, e.g. ga_s2@12), all_gdn (no softmax layer) or softmax=<layers> (e.g. softmax=1,2,3,17,18,20,23,24:
# a set no selection method made, such as one chosen by hand), optionally followed by distill.py settings
# joined with "+", which makes the lever study of the same issue (one change per arm, same tokens):
#   ARMS="ga_s2 ga_s2+--lr_mixer=3e-3 ga_s2+--ce_weight=0.5 ga_s2+--temperature=2 ga_s2+--untie_embeddings=True
#         ga_s2+--seq_len=4096+--micro_batch=16 ga_s2@12" STEPS=80 SAMPLES=5 bash experiments/compare.sh
# SELECT_TOKENS=4194304: select layers here first (select_layers.py: GA-S2 at that many tokens per candidate,
# the cheap selectors and baselines beside it; their Jaccards with GA-S2 are in its selection.json) and
# train the arms from that selection; with ARMS="" only stage 1 and the selection run. At 4M: 126M tokens
# of GA-S2 candidates + 41M of successive halving, in 65k-token steps: on an H100 (2026-12-06) stage 1 took 82 s,
# GA-S2's 30 candidates 614 s (243k tokens/s) and halving's 59 jobs 291 s: ~17 min after the start call.
# SEL_REUSE=docs/runs/<lease>/candidates: an earlier, cut lease's finished selection jobs (select/candidates/*.json,
# committed), reused instead of trained again, so a selection longer than one lease spans two (their stage 1s are
# separate runs of the same seed and data: bit-identical between two 2026-12-06 leases with the compile caches
# carried, within 0.21% per layer in a lease without them; docs/results.md, "GA-S2 at 4M tokens per candidate").
# Jobs are reused only if stored with the same key, which includes the stage-1 run's settings (docs/selection.md):
# the jobs committed before that (docs/runs/select_4m_2026-12-06*) are refused.
# SEL_ARGS="--val_repeats=0.5": more select_layers.py settings for that selection (there: GA-S2 scored on val rows
# with long-range repeats, where the teacher copies; ARMS="ga_s2" then trains its top K).
# S1_STEPS=256: a 4x stage-1 budget, the lever the arms cannot vary (they share one stage 1): compare its arms
# with a lease's at the default (same data, val tokens and recall prompts). S1_ARGS="--target=attn": more
# distill.py settings for that stage 1 (e.g. RADLADS' attention-output target, or --train_mlp=True).
# DEADLINE_S=<s> (a lease): an arm starts only if it can end, at its LIMIT plus ~60 s of load, final eval and
# export, with ~25 s per model left for the eval; the arms that cannot are skipped (never cut: the arms keep
# equal tokens) and the eval still runs on those that were trained.
# SMOKE=1: CPU-sized budgets (a dry run of this script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TEACHER=${TEACHER:-embedded}
D=${D:-data/debian}
R=${R:-runs/compare}
SELECTION=${SELECTION:-docs/runs/h200_lease_2026-12-02/selection.json}  # GA-S2 at 0.52M tokens per candidate
ARMS=${ARMS-"ga_s2 uniform all_gdn"}  # set but empty: no arms
STEPS=${STEPS:-260}    # stage-2 steps per arm, 131,072 tokens each (260: 34M tokens, ~200 s at ~175k tokens/s)
LIMIT=${LIMIT:-240}    # wall-clock cap of each arm's stage 2 (s); the arms' token counts are in their summaries
S1_STEPS=${S1_STEPS:-64}  # stage-1 rotation steps per layer of 65,536 tokens (64: 4.2M tokens, distill.sh's GPU budget)
S1=(--seq_len=512 --micro_batch=64 --total_batch_tokens=65536 --steps_per_layer="$S1_STEPS")
S2=(--seq_len=2048 --micro_batch=32 --total_batch_tokens=131072 --stage2_steps="$STEPS" --eval_every="$STEPS"
    --time_limit_s="$LIMIT")
DEADLINE_S=${DEADLINE_S:-0}  # > 0: skip the arms that would not end within this many seconds of the start
SAMPLES=${SAMPLES:-10}  # recall samples per task and length in the eval (5 for a many-arm lever study)
SELECT_TOKENS=${SELECT_TOKENS:-0}  # > 0: a selection of this run (tokens per GA-S2 candidate), used by the arms
SEL=(--methods=ga_s2,zero_shot,early,halving,uniform,mse,retrieval,ga_s2_retrieval,zero_shot_retrieval --candidate_tokens="$SELECT_TOKENS" --seq_len=512
     --micro_batch=128 --total_batch_tokens=65536)
EVAL=(--seq_len=2048 --micro_batch=8 --eval_batches=8 --recall_samples="$SAMPLES" --recall_batch=16)
if [ -n "${SMOKE:-}" ]; then
  S1=(--smoke=True)
  S2=(--smoke=True)
  EVAL=(--smoke=True)
  SEL=(--smoke=True)
fi
T0=$(date +%s)
phase() { echo; echo "== $1 | elapsed $(( $(date +%s) - T0 ))s =="; }
phase "stage 1 (rotation)"
read -r -a S1_EXTRA <<< "${S1_ARGS:-}"
$PY distill.py --stage=1 --teacher="$TEACHER" --data_dir="$D" --spec=gdn --run_dir="$R/stage1" "${S1[@]}" \
  ${S1_EXTRA[@]+"${S1_EXTRA[@]}"}
if [ "$SELECT_TOKENS" -gt 0 ]; then
  phase "layer selection, $SELECT_TOKENS tokens per GA-S2 candidate"
  read -r -a SEL_EXTRA <<< "${SEL_ARGS:-}"
  if [ -n "${SEL_REUSE:-}" ]; then
    mkdir -p "$R/select/candidates" && cp "$SEL_REUSE"/*.json "$R/select/candidates/"
    echo "reusing $(ls "$SEL_REUSE"/*.json | wc -l) finished selection jobs from $SEL_REUSE"
  fi
  $PY select_layers.py --init="$R/stage1" --data_dir="$D" --run_dir="$R/select" "${SEL[@]}" ${SEL_EXTRA[@]+"${SEL_EXTRA[@]}"}
  SELECTION="$R/select/selection.json"
fi
MODELS="teacher"
n_models=1
for arm in $ARMS; do
  if [ "$DEADLINE_S" -gt 0 ]; then  # this arm (LIMIT + ~60 s) and then the eval (~25 s per model, itself too)
    need=$(( LIMIT + 60 + 25 * (n_models + 2) )) left=$(( DEADLINE_S - ($(date +%s) - T0) ))
    if [ "$need" -gt "$left" ]; then
      echo "compare.sh: DEADLINE_S=$DEADLINE_S leaves ${left}s; arm $arm needs ~${need}s with the eval: skipping it" \
        "and the arms after it" >&2
      break
    fi
  fi
  method=${arm%%+*}
  extra=()
  [ "$arm" != "$method" ] && IFS=+ read -r -a extra <<< "${arm#*+}"
  name=$(echo "$arm" | tr -c 'A-Za-z0-9_.=\n-' '_' | sed 's/__*/_/g; s/=/-/g')  # a folder and eval name
  spec="$SELECTION:$method"
  [ "$method" = all_gdn ] && spec=gdn
  [ "${method%%=*}" = softmax ] && spec="gdn;$method"  # softmax=1,2,17: those layers, whatever the selection says
  phase "stage 2, arm $arm (--spec=$spec ${extra[*]:-})"
  $PY distill.py --stage=2 --teacher="$TEACHER" --data_dir="$D" --init="$R/stage1" --spec="$spec" \
    --run_dir="$R/s2_$name" "${S2[@]}" ${extra[@]+"${extra[@]}"}
  if grep -q '"stopped_at_step"' "$R/s2_$name/summary.json" 2>/dev/null; then  # equal budgets no longer hold
    echo "compare.sh: arm $arm was cut by LIMIT=${LIMIT}s before STEPS=$STEPS: its tokens differ (its summary.json)" >&2
  fi
  $PY export.py --checkpoint="$R/s2_$name" --out_dir="$R/export_$name"
  MODELS="$MODELS,$name=$R/export_$name"
  n_models=$(( n_models + 1 ))
done
[ "$n_models" -gt 1 ] || { phase "done (no arms)"; exit 0; }
phase "eval ($MODELS)"
$PY eval.py --teacher="$TEACHER" --models="$MODELS" --data_dir="$D" --out_dir="$R/eval" "${EVAL[@]}"
phase "done"
