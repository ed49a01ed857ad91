#!/usr/bin/env bash
# distill.sh's GPU budget on a leased H200 (the device tool): the teacher and the shards arrive in
# pieces of <= 64 MiB per call, the run is detached so it outlives a call, and every call packs what
# exists so far into $OUT (logs, JSON, PNG; never checkpoints). Run from the repo root there.
#   here, once:  bash ../shared/device/stage_teacher.sh      (.device/wheels, t1, t2)
#                bash experiments/lease.sh pack_data          (.device/data: data/debian as one .tar.xz;
#                                                             the GGUF's md5 beside its second half)
#   call 0, carry [.device/wheels, .device/cache]: bash experiments/lease.sh cache   (when .device/cache exists:
#           an earlier lease's compile caches, ~55 MB, too large to ride beside t1, t2 or the data; they save a
#           fresh machine most of the ~4 min it spends in fla's JIT and the per-layer compiles)
#   call 1, carry [.device/wheels, .device/t1]:    bash experiments/lease.sh teacher1
#           (also starts, detached, the GPU test of the fla #640 workaround; if it fails, the run's
#           copy of the code pads instead: op_gdn.HOPPER_WORKAROUND = "pad")
#   call 2, carry [.device/wheels, .device/t2]:    bash experiments/lease.sh teacher2
#   call 3, carry [.device/wheels, .device/data]:  DEADLINE_S=<s> bash experiments/lease.sh start 540
#           (DEADLINE_S: the lease's budget_left_s at this call minus ~90 s for the last pack; distill.sh
#           then cuts stage 2 to end in time, skipping the 4096 part if it must)
#   calls 4..:   carry [.device/wheels]:           bash experiments/lease.sh poll 560
#   at the end:  bash experiments/lease.sh pack_cache   (save its *_cache.tgz.part* in .device/cache/ here;
#                a poll that sees the run ended packs them too; when it says inductor's cache was left out, one more
#                call, pack_cache inductor, and its parts go to .device/cache_inductor/ here (the older inductor parts
#                in .device/cache/ deleted): the next lease carries that folder in a cache call of its own,
#                [.device/wheels, .device/cache_inductor], the two too large for one call's 64 MiB)
#   with minutes left: bash experiments/lease.sh gpu_tests | bench_compile
# Each call within 30 s of the last (the machine is given back when idle). If a call's reply is lost,
# ask `status` before polling: a poll that lands on a fresh machine finds no run and costs a start.
# ARGS="--name=value ..." go to distill.sh (every distill.py run), e.g. a shorter run; SELECT_NPROC=2: two
# selection processes on the GPU; SOFTMAX=0.4: the share of softmax layers; SELECT=ga_s2: the method whose
# set stage 2 trains; SELECT_ARGS="--val_repeats=0.5": more settings of its selection (all distill.sh's).
# PLAN=compare runs experiments/compare.sh instead (stage 1 + stage 2 of each of ARMS at STEPS x 131k
# tokens + one eval; ~22 min for 3 arms; SELECT_TOKENS=4194304 ARMS="": stage 1 + a selection at 4M tokens
# per GA-S2 candidate with the cheap selectors beside it, ~18 min; SEL_ARGS: more settings of that
# selection, e.g. "--val_repeats=0.5"; SEL_REUSE=docs/runs/<lease>/candidates: a cut selection's finished jobs,
# committed, reused so that it ends in this lease; DEADLINE_S: the arms that would not end in time are skipped, the
# eval runs).
# PLAN=speed runs experiments/speed.sh (GPU tests + inference and training benches on random weights):
# no teacher, no data, so `start` is the first call, carrying only .device/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
P=/root/p                                   # the run's own copy of the code (calls re-sync the repo root)
GGUF=/root/teacher/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-/tmp/out}
fla() {  # the carried fla wheels onto the path (the device has no fla and no internet)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl 2>&1 | tail -2 || true
}
pack() {  # small results only, into $OUT
  [ -d $P/runs ] || return 0
  tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' -C $P runs run.out 2>/dev/null || true
}
restore_cache() {  # an earlier lease's compile caches (pack_cache's parts), those this call carried, each once a machine
  # (a warm machine keeps an earlier call's carried files, and unpacking them again would take a call's seconds)
  for f in .device/cache/triton_cache.tgz .device/cache/inductor_cache.tgz .device/cache_inductor/inductor_cache.tgz; do
    local mark=/tmp/restored_$(echo $f | tr / _)
    if [ ! -f $mark ] && ls $f.part* > /dev/null 2>&1; then cat $f.part* | tar xzf - -C / && touch $mark && echo "restored $f"; fi
  done
}
pack_cache() {  # Triton's kernels + autotune results and inductor's compiled graphs, for the next lease to carry
  # (a fresh machine spends ~4 min of a lease on them: 155 s in stage 1's first layer, ~35 s per process).
  # A call brings back at most 8 files of <= 16 MiB, 64 MiB in all: each archive in 15 MB parts, the
  # inductor cache only when both fit beside the results ($1 = inductor: it alone)
  # Triton loads a cached kernel from its json + cubin (+ launcher .so); its IR files (llir, ttir, ttgir, ptx, source:
  # ~80% of either cache) stay behind: 51 -> 17 MB (Triton's) and 34 -> 20 MB (inductor's) on 2026-12-06
  local ir=(--exclude='*.llir' --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.ptx' --exclude='*.source')
  tar czf /tmp/triton_cache.tgz "${ir[@]}" -C / root/.triton/cache 2>/dev/null || true
  tar czf /tmp/inductor_cache.tgz "${ir[@]}" -C / tmp/torchinductor_root 2>/dev/null || true
  local t=$(stat -c %s /tmp/triton_cache.tgz 2>/dev/null || echo 0) i=$(stat -c %s /tmp/inductor_cache.tgz 2>/dev/null || echo 0)
  [ "${1:-both}" != inductor ] || t=0  # this call: inductor's alone
  if [ "$t" -gt 0 ] && [ "$t" -lt 60000000 ]; then split -b 15000000 -d -a 1 /tmp/triton_cache.tgz "$OUT/triton_cache.tgz.part"; else t=0; fi
  if [ "$i" -gt 0 ] && [ $(( t + i )) -lt 60000000 ] && [ $(( (t + 14999999) / 15000000 + (i + 14999999) / 15000000 )) -le 7 ]; then
    split -b 15000000 -d -a 1 /tmp/inductor_cache.tgz "$OUT/inductor_cache.tgz.part"
  elif [ "$i" -gt 0 ] && [ "${1:-both}" = inductor ]; then
    echo "inductor's cache ($(( i / 1000000 )) MB) left out: more than a call brings back"
  elif [ "$i" -gt 0 ]; then  # (2026-12-06: Triton's 24 MB + inductor's more than 36)
    echo "inductor's cache ($(( i / 1000000 )) MB) left out: bring it back in a call of its own, bash experiments/lease.sh pack_cache inductor"
  fi
  ls -la "$OUT"
}
fla640_check() {  # detached, while the teacher and data arrive: the GPU test of op_gdn's default fla #640
  # workaround ("checked"), which also warms fla's JIT; the run waits for it and falls back to "pad" if it failed
  fla
  rm -rf /root/fla640 && mkdir -p /root/fla640 && cp -r hybrid tests pyproject.toml /root/fla640/
  (cd /root/fla640 && setsid nohup bash -c 'PYTHONPATH=/tmp/site:${PYTHONPATH:-} TRITON_CACHE_AUTOTUNING=1 timeout 400 \
    python3 -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfE \
    "tests/test_ops.py::test_fla_gdn_fp32_gates_with_bf16_qkv[checked]" > ../fla640.txt 2>&1; echo "rc=$?" >> ../fla640.txt' \
    > /dev/null 2>&1 < /dev/null &)
  echo "fla #640 check started (/root/fla640.txt)"
}
wait_done() {  # up to $1 s, or until the run has ended
  local t=0
  while [ ! -f $P/DONE ] && [ "$t" -lt "$1" ]; do sleep 10; t=$((t + 10)); done
  grep -E "^== |done in|stopped|Error|error:" $P/run.out | tail -20 || true
  tail -5 $P/run.out
  [ -f $P/DONE ] && echo "RUN ENDED: $(cat $P/DONE)"
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
}
case "${1:-}" in
pack_data)
  mkdir -p .device/data
  tar cf - data/debian | xz -T2 -6 > .device/data/debian.tar.xz.tmp && mv .device/data/debian.tar.xz.tmp .device/data/debian.tar.xz
  [ -s .device/teacher.gguf.md5 ] && cp .device/teacher.gguf.md5 .device/t2/  # teacher2 checks the joined GGUF
  ls -la .device/data
  ;;
cache)  # call 0: only the compile caches (restore_cache), before teacher1 starts fla's first kernels
  restore_cache
  ;;
teacher1)
  mkdir -p /root/teacher && cp .device/t1/* /root/teacher/ && ls -la /root/teacher
  restore_cache
  fla640_check
  ;;
teacher2)
  cat /root/teacher/teacher.gguf.part1 .device/t2/teacher.gguf.part2 > $GGUF
  rm /root/teacher/teacher.gguf.part1
  if [ -s .device/t2/teacher.gguf.md5 ]; then  # pack_data put it beside the second half
    echo "$(cut -d' ' -f1 .device/t2/teacher.gguf.md5)  $GGUF" | md5sum -c
  else
    md5sum $GGUF
  fi
  ;;
start)
  fla
  rm -rf $P && mkdir -p $P && cp -r $(ls -A | grep -v '^\.device$\|^\.git$\|^runs$\|^data$\|^models$') $P/
  if [ -f .device/data/debian.tar.xz ]; then mkdir -p $P/data && xz -dc .device/data/debian.tar.xz | tar xf - -C $P; fi
  restore_cache
  cd $P
  cat > run_lease.sh <<EOF
export PYTHONPATH=/tmp/site:\${PYTHONPATH:-}
export TRITON_CACHE_AUTOTUNING=1
T0=\$(date +%s)
if [ -f /root/fla640.txt ]; then  # teacher1's fla #640 check: wait for it; if it failed, the "pad" workaround
  while ! grep -q '^rc=' /root/fla640.txt && [ \$(( \$(date +%s) - T0 )) -lt 400 ]; do sleep 5; done
  tail -3 /root/fla640.txt
  grep -q '^rc=0' /root/fla640.txt || { echo "fla #640 check failed or unfinished: this run pads (op_gdn)"
    sed -i 's/^HOPPER_WORKAROUND = "checked"/HOPPER_WORKAROUND = "pad"/' hybrid/model/op_gdn.py; }
fi
DEADLINE_S=\$(( ${DEADLINE_S:-0} > 0 ? ${DEADLINE_S:-0} - (\$(date +%s) - T0) : 0 ))  # less the wait
$(case "${PLAN:-pipeline}" in
  compare) echo "TEACHER=$GGUF DEADLINE_S=\$DEADLINE_S ARMS='${ARMS-ga_s2 uniform all_gdn}' STEPS=${STEPS:-260} LIMIT=${LIMIT:-240} SAMPLES=${SAMPLES:-10} SELECT_TOKENS=${SELECT_TOKENS:-0} S1_STEPS=${S1_STEPS:-64} S1_ARGS='${S1_ARGS:-}' SEL_ARGS='${SEL_ARGS:-}' SEL_REUSE='${SEL_REUSE:-}' bash experiments/compare.sh" ;;
  speed) echo "DEADLINE_S=\$DEADLINE_S bash experiments/speed.sh" ;;
  *) echo "TEACHER=$GGUF DATA=debian PY=python3 RUN=runs/hybrid DEADLINE_S=\$DEADLINE_S SELECT_NPROC=${SELECT_NPROC:-1} SOFTMAX=${SOFTMAX:-0.25} ${SELECT:+SELECT=$SELECT }${SELECT_ARGS:+SELECT_ARGS='$SELECT_ARGS' }bash distill.sh ${ARGS:-}" ;;
esac)
echo "rc=\$? at \$(date +%T)" > DONE
EOF
  (setsid nohup bash run_lease.sh > run.out 2>&1 < /dev/null &)
  cd - > /dev/null
  wait_done "${2:-540}"; pack
  ;;
poll)  # once the run has ended, its compile caches come back too (pack_cache)
  wait_done "${2:-560}"; pack
  if [ -f $P/DONE ]; then pack_cache; fi
  ;;
pack_cache)  # [inductor]: only inductor's cache (when it did not fit beside Triton's)
  pack_cache "${2:-both}"
  ;;
bench_compile)  # issue 12's levers: compile off/on, packed projections off/on; each run: fused GDN decode and mix()
  fla
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} TRITON_CACHE_AUTOTUNING=1
  cd $P 2>/dev/null || true
  PARTS=engine bash experiments/speed.sh | tee "$OUT/bench_compile.txt"  # its "engine" part alone
  ;;
gpu_tests)  # the GPU-only tests (fast paths vs their references) on this machine, fla autotune cached
  fla; restore_cache  # (+ .device/cache when carried: a fresh machine skips fla's JIT)
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} TRITON_CACHE_AUTOTUNING=1
  cd $P 2>/dev/null || true
  # every test, not -x: the whole output with tracebacks into $OUT (a capped pytest prints no summary)
  timeout "${2:-500}" python3 -m pytest -m gpu -o addopts="" -v -rfE --tb=short ${TESTS:-tests/test_decode_kernels.py tests/test_engine.py tests/test_fastpath.py tests/test_losses.py tests/test_ops.py} > "$OUT/gpu_tests.txt" 2>&1
  grep -E "PASSED|FAILED|ERROR|Error|assert" "$OUT/gpu_tests.txt" | tail -30
  ;;
*)
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | cut -c3-; exit 2
  ;;
esac
