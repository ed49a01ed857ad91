"""Benchmark distillation throughput: the eager reference path and the fast path side by side.

A random teacher of the SmolLM2-135M shape (LlamaConfig below; speed does not depend on the
weights) and random token batches, through the library's own training code:
  stage2   accumulate_kl + KLStudent + clip + fused AdamW per SPEC at T=STAGE2_SEQ_LEN: eager reference vs fast
           (compile_layers on student and teacher, compiled fused KL chunk) at FAST_MICRO_BATCHES; same init
           and batches, losses side by side; compile seconds = first step minus a steady one.
  phases   one stage-2 step split by CUDA events (teacher fwd, student fwd, KL, backward, optimizer)
           and torch.profiler kernel time by kind, eager vs fast; top kernels to OUT_DIR/profile_*.txt.
  stage1   a rotation step as distill.py's (LatentCache target + student layer + layer_mse + AdamW).
  gas2     GA-S2 candidates as select_layers (build, train, score twice): eager = rebuilt from the CPU teacher, a
           teacher forward per micro-step; fast = on the device, TeacherTargets + compiled layers (+ CUDA graphs:
           GAS2_GRAPHS); ETA of 30 candidates x GAS2_TOKENS; a steady candidate's steps profiled (wall vs GPU).
MFU counts matmul FLOPs (see flops_per_token) against PEAK_TFLOPS; copy bandwidth is measured.
Launch (1 GPU, fla installed): python bench_train.py --out_dir=runs/bench_train [--sections=stage2,phases]; CPU
smoke: --device=cpu --smoke=True. Writes OUT_DIR/bench_train.md (the tables) and OUT_DIR/profile_*.txt.
"""

import copy
import os
import re
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import copy_bandwidth
from hybrid.capture import LatentCache, layer_call
from hybrid.common import run_script
from hybrid.config import config_dict, dumps
from hybrid.fastpath import compile_layers
from hybrid.graphs import candidate_calls
from hybrid.losses import chunked_distill_loss, layer_mse
from hybrid.model.spec import parse_spec
from hybrid.model import mixers
from hybrid.optim import adamw, optimizer_step
from hybrid.selection import SpecSwitcher
from hybrid.shards import RandomBatches
from hybrid.stage2 import KLStudent, TeacherTargets, accumulate_kl, held_out_kl, stage2_param_groups, teacher_hidden
from hybrid.stage2 import teacher_targets
from hybrid.surgery import build_student

# -----------------------------------------------------------------------------
# Model (SmolLM2-135M)
LAYERS = 30                     # decoder layers
HIDDEN = 576                    # model width
HEADS = 9                       # query heads (head_dim = HIDDEN // HEADS)
KV_HEADS = 3                    # key/value heads (GQA)
INTERMEDIATE = 1536             # MLP width
VOCAB = 49152                   # vocabulary size
# What to run
DEVICE = "cuda"                 # "cuda" | "cpu" (smoke only)
SECTIONS = "copy,stage2,phases,stage1,gas2"  # comma list, run in this order (fla #640's kpad: bench_kernels.py)
SPECS = ("gdn", "gdn;softmax=0,4,8,12,16,20,24,28")  # all-GDN and a 25% (8 of 30) softmax hybrid
PATHS = "eager,fast"            # which paths each section times ("fast" alone skips the baselines)
GDN_TRAIN_KERNELS = "cuda"      # the fast path's mixers.GDN_TRAIN_KERNELS ("cuda": op_gdn_train's kernels in the GDN
                                # layers); a comma list, e.g. "off,cuda", times each side by side (eager: always "off")
# Stage 2
STAGE2_SEQ_LEN = 2048           # tokens per row
BASE_MICRO_BATCH = 16           # the eager baseline's micro-batch (distill.py's default)
FAST_MICRO_BATCHES = (16, 32)   # micro-batches tried on the fast path
STAGE2_STEP_TOKENS = 2**16      # tokens per optimizer step (grad accumulation derived)
STEPS = 5                       # timed optimizer steps per configuration
WARMUP = 2                      # untimed steps first (the first one compiles)
KL_CHUNK_TOKENS = 4096          # tokens per chunk of the logit KL
# Stage 1 (rotation)
STAGE1_SEQ_LEN = 512            # tokens per row
STAGE1_MICRO_BATCHES = (16, 64)  # eager baseline at the first; fast at each
STAGE1_STEP_TOKENS = 2**16      # tokens per optimizer step
STAGE1_LAYER = 5                # the layer trained (GDN)
STAGE1_TOKENS_PER_LAYER = 96 * 2**16  # 6.3M, the budget
# GA-S2
GAS2_SEQ_LEN = 512              # tokens per row (select_layers.py's SEQ_LEN)
GAS2_MICRO_BATCHES = (16, 64)   # eager baseline at the first; fast at each
GAS2_STEP_TOKENS = 2**15        # select_layers.py's TOTAL_BATCH_TOKENS
GAS2_TOKENS = 16 * 2**15        # tokens per candidate (0.52M)
GAS2_CANDIDATES = 4             # candidates timed per path (ETA scales to 30)
GAS2_GRAPHS = "off,on"          # comma list of "off" | "on": the fast path's steps and scoring as CUDA graphs (graphs.py)
# Hardware
PEAK_TFLOPS = 790.0             # H200 dense bf16 matmul, measured
OUT_DIR = "runs/bench_train"    # bench_train.md and profile_*.txt go here
PROFILE = True                  # phases: also the torch.profiler kernel tables
SMOKE = False                   # tiny model and batches on CPU
SEED = 0                        # model init and random batches
# -----------------------------------------------------------------------------

lines: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    lines.append(line)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "bench_train.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def marker(device):
    """A CUDA event recorded now (GPU time), or the host clock on CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def elapsed_ms(a, b) -> float:
    return (b - a) * 1e3 if isinstance(a, float) else a.elapsed_time(b)


def make_teacher(device):
    cfg = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, intermediate_size=INTERMEDIATE,
                      vocab_size=VOCAB, rope_theta=1e5, tie_word_embeddings=True, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    cpu = LlamaForCausalLM(cfg).eval()  # fp32 on CPU: students are built from it, as in distill.py
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return cpu, dtype


def device_teacher(cpu_teacher, device, dtype, fast: bool):
    t = copy.deepcopy(cpu_teacher).to(device=device, dtype=dtype).eval().requires_grad_(False)
    if fast:
        compile_layers(t)
    return t


def flops_per_token(spec: list[str], T: int, part: str = "stage2") -> float:
    """Matmul FLOPs per token. Per layer forward: 2 * (q, k, v, o, MLP weights); softmax attention
    2*T*H*D (causal QK^T and PV); GDN's extra projections (beta, decay, gate) and its chunk kernel
    counted as 16*H*D^2 (an estimate of the WY chunk form). Backward = 2x forward. Stage 2: teacher
    forward + student forward/backward + the KL's 4 LM-head matmuls (teacher, student, 2 grads)."""
    D = HIDDEN // HEADS
    dense = 2 * (2 * HIDDEN * HEADS * D + 2 * HIDDEN * KV_HEADS * D + 3 * HIDDEN * INTERMEDIATE)
    softmax = dense + 2 * T * HEADS * D
    gdn = dense + 2 * (2 * HIDDEN * HEADS + HIDDEN * HEADS * D) + 16 * HEADS * D * D
    student = sum(softmax if m == "softmax" else gdn for m in spec)
    if part == "stage1":  # teacher layer forward (target) + one student layer forward + backward
        return softmax + 3 * gdn
    return LAYERS * softmax + 3 * student + 8 * VOCAB * HIDDEN


def configs(base_micro: int, fast_micros):
    """(label, fast, micro-batch) to time: the eager baseline at base_micro, then the fast path at each of fast_micros
    for each GDN_TRAIN_KERNELS setting, which is set in mixers as its configurations come up."""
    paths = [p.strip() for p in PATHS.split(",")]
    kernels, default = [k.strip() for k in GDN_TRAIN_KERNELS.split(",")], mixers.GDN_TRAIN_KERNELS
    todo = [("eager", False, base_micro, "off")] * ("eager" in paths)
    todo += [("fast" if k == "off" else "fast kernels", True, m, k) for k in kernels for m in fast_micros] * ("fast" in paths)
    for label, fast, micro, k in todo:
        mixers.GDN_TRAIN_KERNELS = k
        yield label, fast, micro
    mixers.GDN_TRAIN_KERNELS = default


def ratio(tps: float, base: float | None) -> str:
    return "-" if base is None else f"{tps / base:.2f}x"


def peak_gib(device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"


def fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def stage2_setup(cpu_teacher, spec, device, fast: bool):
    torch.manual_seed(SEED + 1)  # same mixer init for eager and fast
    student = build_student(cpu_teacher, spec).to(device).train().requires_grad_(True)
    opt = adamw(stage2_param_groups(student, 1e-4, 1e-5), 1e-4, 0.0, device)
    if fast:
        compile_layers(student)
    model = KLStudent(student, 1.0, 0.0, KL_CHUNK_TOKENS, fused=None if fast else False)
    return student, opt, model


def stage2_step(model, student, teacher, loader, opt, accum, device, autocast):
    loss = accumulate_kl(model, teacher, loader, accum, device, autocast)
    optimizer_step(opt, student.parameters(), 1.0)
    return loss


def run_stage2(cpu_teacher, teachers, device, autocast):
    emit("\n## stage 2 (accumulate_kl + clip + AdamW), tokens/s\n")
    emit("| section | spec | path | micro | T | tok/s | x eager | MFU | compile s | peak GiB | losses (first steps) |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|")
    T = STAGE2_SEQ_LEN
    results = {}
    for spec_str in SPECS:
        spec = parse_spec(spec_str, LAYERS)
        name = "all-gdn" if "softmax" not in spec else f"{spec.count('softmax')}/{LAYERS} softmax"
        base = None
        for label, fast, micro in configs(BASE_MICRO_BATCH, FAST_MICRO_BATCHES):
            accum = max(1, STAGE2_STEP_TOKENS // (micro * T))
            loader = RandomBatches(micro, T, VOCAB, seed=SEED)
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                student, opt, model = stage2_setup(cpu_teacher, spec, device, fast)
                teacher = teachers[fast]
                losses, times = [], []
                for step in range(WARMUP + STEPS):
                    sync(device)
                    t0 = time.time()
                    loss = stage2_step(model, student, teacher, loader, opt, accum, device, autocast)
                    losses.append(float(loss))
                    sync(device)
                    times.append(time.time() - t0)
                dt = sorted(times[WARMUP:])[len(times[WARMUP:]) // 2]
                tps = micro * T * accum / dt
                base = tps if not fast else base
                compile_s = times[0] - dt
                mfu = tps * flops_per_token(spec, T) / (PEAK_TFLOPS * 1e12)
                emit(f"| stage2 | {name} | {label} | {micro} | {T} | {fmt(tps)} | "
                     f"{ratio(tps, base)} | {100 * mfu:.1f}% | {compile_s:.1f} | {peak_gib(device)} | "
                     f"{' '.join(f'{x:.4f}' for x in losses[:4])} |")
                results[(spec_str, fast, micro)] = tps
                del student, opt, model
            except torch.cuda.OutOfMemoryError:
                emit(f"| stage2 | {name} | {label} | {micro} | {T} | OOM | | | | | |")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


KERNEL_KINDS = (  # first match wins; kernel-name substrings, lower case
    ("inductor fused (triton_*)", ("triton_",)),
    ("matmul (cuBLAS)", ("gemm", "cutlass", "nvjet", "xmma", "gemv", "cublas", "matmul")),
    ("softmax attention (SDPA)", ("flash", "fmha", "attention", "efficient")),
    ("optimizer", ("adam", "multi_tensor")),
    ("GDN inputs and output norm (op_gdn_train, op_gdn_prefill)", ("gdn_train_", "inputs_kernel", "norm_kernel")),
    ("GDN kernels (fla)", ("chunk", "wy", "tril", "cumsum", "kkt", "w_u", "dhu", "l2norm", "delta")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("conv (cuDNN)", ("conv", "cudnn")),
    ("eager reductions/softmax", ("reduce", "softmax", "norm")),
    ("eager elementwise", ("elementwise", "vectorized", "unrolled", "index", "cat")))


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in n for k in keys)), "other")


def profile_table(prof, label: str, steps: int, tokens: int):
    """Group the profiled kernels by kind; write the top kernels to OUT_DIR/profile_<label>.txt."""
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(e, "self_device_time_total", None)
        t = e.self_cuda_time_total if t is None else t
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + t
    total = sum(kinds.values())
    emit(f"\n{label}: GPU kernel time per step {total / steps / 1e3:.1f} ms ({fmt(tokens / (total / steps / 1e6))} "
         "tok/s if the GPU never idled)\n")
    emit("| kernel kind | ms/step | share |\n|---|---|---|")
    for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        emit(f"| {k} | {t / steps / 1e3:.2f} | {100 * t / max(total, 1e-9):.1f}% |")
    with open(os.path.join(OUT_DIR, "profile_" + re.sub(r"[^A-Za-z0-9_.-]", "", label.replace(" ", "_")) + ".txt"),
              "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80))


def run_phases(cpu_teacher, teachers, device, autocast):
    """One stage-2 step split by CUDA events, and the profiler's kernel kinds, eager vs fast."""
    emit("\n## stage 2 step phases (ms per optimizer step, GPU time between CUDA events)\n")
    emit("| spec | path | teacher fwd | student fwd | KL (loss+grads) | backward | optimizer | total | wall |\n"
         "|---|---|---|---|---|---|---|---|---|")
    T, micro = STAGE2_SEQ_LEN, BASE_MICRO_BATCH
    accum = max(1, STAGE2_STEP_TOKENS // (micro * T))
    profs = []
    for spec_str in SPECS:
        spec = parse_spec(spec_str, LAYERS)
        name = "all-gdn" if "softmax" not in spec else f"{spec.count('softmax')}/{LAYERS} softmax"
        for label, fast, _ in configs(micro, [micro]):
            student, opt, _ = stage2_setup(cpu_teacher, spec, device, fast)
            teacher, w_t = teachers[fast], teachers[fast].lm_head.weight
            loader = RandomBatches(micro, T, VOCAB, seed=SEED)

            def step(events=None):
                ev = (lambda: events.append(marker(device))) if events is not None else (lambda: None)
                for _ in range(accum):
                    x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
                    ev()
                    h_t = teacher_hidden(teacher, x)
                    ev()
                    with autocast:
                        h_s = student.model(input_ids=x, use_cache=False).last_hidden_state.to(h_t.dtype)
                        ev()
                        loss, _ = chunked_distill_loss(h_s, student.lm_head.weight, h_t, w_t, targets=y,
                                                       chunk_tokens=KL_CHUNK_TOKENS, fused=None if fast else False)
                        ev()
                        (loss / accum).backward()
                    ev()
                optimizer_step(opt, student.parameters(), 1.0)
                ev()

            for _ in range(WARMUP):
                step()
            sync(device)
            sums, t0 = [0.0] * 5, time.time()
            for _ in range(STEPS):
                events = []
                step(events)
                sync(device)
                for m in range(accum):
                    e = events[m * 5:(m + 1) * 5] + ([events[-1]] if m == accum - 1 else [])
                    for p in range(4):
                        sums[p] += elapsed_ms(e[p], e[p + 1])
                sums[4] += elapsed_ms(events[accum * 5 - 1], events[-1])
            wall = (time.time() - t0) * 1e3 / STEPS
            ms = [s / STEPS for s in sums]
            emit(f"| {name} | {label} | " + " | ".join(f"{m:.1f}" for m in ms) +
                 f" | {sum(ms):.1f} | {wall:.1f} |")
            if PROFILE and device.type == "cuda":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(2):
                        step()
                    sync(device)
                profs.append((f"{name} {label}", prof))
            del student, opt
            torch.cuda.empty_cache() if device.type == "cuda" else None
    for label, prof in profs:
        profile_table(prof, label, 2, micro * T * accum)


def run_stage1(cpu_teacher, teachers, device, autocast):
    emit("\n## stage 1 rotation step (LatentCache target + student layer + layer_mse + AdamW), one GDN layer\n")
    emit("| path | micro | T | tok/s | x eager | MFU | compile s | ETA 30 layers x 6.3M |\n"
         "|---|---|---|---|---|---|---|---|")
    T, layer, base = STAGE1_SEQ_LEN, STAGE1_LAYER, None
    spec = parse_spec("gdn", LAYERS)
    for label, fast, micro in configs(STAGE1_MICRO_BATCHES[0], STAGE1_MICRO_BATCHES):
        accum = max(1, STAGE1_STEP_TOKENS // (micro * T))
        loader = RandomBatches(micro, T, VOCAB, n=4, seed=SEED)
        torch.manual_seed(SEED + 1)
        student = build_student(cpu_teacher, spec).to(device).train()
        if fast:
            compile_layers(student)
        cache = LatentCache(teachers[fast], [loader.next_batch()[0] for _ in range(4)], device)
        cache.advance_to(layer)
        block = student.model.layers[layer]
        params = list(block.self_attn.parameters())
        opt = adamw([{"params": params}], 1e-3, 0.0, device)
        times = []
        for step in range(WARMUP + STEPS):
            sync(device)
            t0 = time.time()
            for micro_i in range(accum):
                idx = micro_i % len(cache)
                target = cache.targets(idx)
                with autocast:
                    out = layer_call(block, cache.latents[idx], cache.pe, cache.pos)
                (layer_mse(out, target) / accum).backward()
            optimizer_step(opt, params, 1.0)
            sync(device)
            times.append(time.time() - t0)
        dt = sorted(times[WARMUP:])[len(times[WARMUP:]) // 2]
        tps = micro * T * accum / dt
        base = tps if not fast else base
        mfu = tps * flops_per_token(spec, T, "stage1") / (PEAK_TFLOPS * 1e12)
        eta = 30 * STAGE1_TOKENS_PER_LAYER / tps
        emit(f"| {label} | {micro} | {T} | {fmt(tps)} | {ratio(tps, base)} | {100 * mfu:.1f}% | "
             f"{times[0] - dt:.1f} | {eta:.0f} s |")
        del student, opt, cache
        torch.cuda.empty_cache() if device.type == "cuda" else None


def run_gas2(cpu_teacher, teachers, device, autocast):
    emit("\n## GA-S2 candidates (build + train GAS2_TOKENS + 2 held-out KLs on 8 val batches each, as select_layers)\n")
    emit("| path | micro | T | s/candidate (first, rest) | of which: build, first step, other steps, 2 scores "
         "(rest) | tok/s (train) | steady ms/step (steps 3+) | tok/s (steps 3+) | ETA 30 candidates | teacher cache |\n"
         "|---|---|---|---|---|---|---|---|---|---|")
    T, base_layers = GAS2_SEQ_LEN, parse_spec("gdn", LAYERS)
    steps = GAS2_TOKENS // GAS2_STEP_TOKENS
    profs = []
    graph_modes = [g.strip() == "on" for g in GAS2_GRAPHS.split(",")]
    for label0, fast, micro in configs(GAS2_MICRO_BATCHES[0], GAS2_MICRO_BATCHES):
        for graphs in graph_modes if fast else [False]:
            label = label0 + " graphs" * graphs
            accum = max(1, GAS2_STEP_TOKENS // (micro * T))
            teacher = teachers[fast]
            targets = TeacherTargets(teacher, RandomBatches(micro, T, VOCAB, n=64, seed=SEED), device) if fast else None
            val = [RandomBatches(micro, T, VOCAB, n=1, seed=SEED + 1 + i).next_batch() for i in range(8)]
            h_val = teacher_targets(teacher, val, device)  # 8 val batches
            secs, parts = [], []  # parts: per candidate (build, first step, other steps, scores) s
            # fast: select_layers' candidates, copies of a resident student on the device; eager: rebuilt from the CPU
            switcher = SpecSwitcher(build_student(cpu_teacher, base_layers).to(device).eval(), cpu_teacher,
                                    base_layers) if fast else None
            for c in range(GAS2_CANDIDATES):
                sync(device)
                t0 = time.time()
                spec = list(base_layers)
                spec[c * 7 % LAYERS] = "softmax"
                torch.manual_seed(SEED)
                student = switcher.copy(spec) if fast else \
                    build_student(cpu_teacher, spec).to(device).train().requires_grad_(True)
                opt = adamw(stage2_param_groups(student, 1e-3, 1e-4), 1e-3, 0.0, device)
                if fast:
                    compile_layers(student)
                model = KLStudent(student, 1.0, 0.0, KL_CHUNK_TOKENS, fused=None if fast else False)
                loader = RandomBatches(micro, T, VOCAB, n=64, seed=SEED)
                # fast: select_layers' step (graphs.kl_step), replayed as a CUDA graph after two plain steps when graphs
                graphed, stats = candidate_calls(model, student, teacher, opt, 1.0, device, autocast, KL_CHUNK_TOKENS,
                                                 enabled=graphs)

                def one_step(step):
                    if targets is not None:
                        return graphed(*[t for i in range(accum) for t in targets[step * accum + i]])
                    return stage2_step(model, student, teacher, loader, opt, accum, device, autocast)  # eager

                sync(device)
                t1 = time.time()
                stamps = {-1: t1}  # after steps 0, 2 (graphs: two plain calls, then the capture) and the last
                for step in range(steps):
                    loss = one_step(step)
                    if step in (0, 2, steps - 1):
                        float(loss)
                        sync(device)
                        stamps[step] = time.time()
                k = 2 if steps > 3 else 0  # steady: the steps after the third (after the first for a short smoke run)
                steady = (stamps[steps - 1] - stamps[k]) / max(1, steps - 1 - k)
                if PROFILE and device.type == "cuda" and c == 1:  # a steady candidate's steps: GPU-bound or not?
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for step in range(3):
                            one_step(step)
                        sync(device)
                    profs.append((f"gas2 {label} (wall {1e3 * steady:.1f} ms/step, steps 3+)",
                                  prof, accum * micro * T))
                for _ in range(2):  # select_layers scores GA-S2's candidates at the early-stopping step and at the end
                    held_out_kl(student, teacher, val, device, autocast, KL_CHUNK_TOKENS, h_teacher=h_val,
                                stats_fn=stats)
                sync(device)
                secs.append(time.time() - t0)
                parts.append((t1 - t0, stamps[0] - t1, stamps[steps - 1] - stamps[0], time.time() - stamps[steps - 1], steady))
                del student, opt, model, graphed, stats
            del switcher
            rest = sum(secs[1:]) / max(1, len(secs) - 1)
            rest_parts = [sum(p[i] for p in parts[1:]) / max(1, len(parts) - 1) for i in range(5)]
            tps = GAS2_TOKENS / (rest_parts[1] + rest_parts[2])  # all steps of a candidate after the first
            tps_steady = GAS2_TOKENS / steps / max(rest_parts[4], 1e-9)
            cache = f"{targets.kept_bytes / 2**20:.0f} MiB" if targets is not None else "-"
            emit(f"| {label} | {micro} | {T} | {secs[0]:.1f}, {rest:.2f} | " +
                 ", ".join(f"{x:.2f}" for x in rest_parts[:4]) +
                 f" | {fmt(tps)} | {1e3 * rest_parts[4]:.1f} | {fmt(tps_steady)} | {secs[0] + 29 * rest:.0f} s | {cache} |")
            torch.cuda.empty_cache() if device.type == "cuda" else None
    for name, prof, tokens in profs:
        profile_table(prof, name, 3, tokens)


def run_copy(device):
    bw = copy_bandwidth(device)
    emit(f"\ncopy bandwidth: {bw / 1e12:.2f} TB/s (read + write); bf16 peak used for MFU: {PEAK_TFLOPS} TFLOP/s")


def smoke_settings(g: dict) -> None:
    g.update(LAYERS=4, HIDDEN=64, HEADS=4, KV_HEADS=2, INTERMEDIATE=128, VOCAB=256, STAGE2_SEQ_LEN=32,
             BASE_MICRO_BATCH=2, FAST_MICRO_BATCHES=(2,), STAGE2_STEP_TOKENS=128, STAGE1_SEQ_LEN=32,
             STAGE1_MICRO_BATCHES=(2,), STAGE1_STEP_TOKENS=64, STAGE1_LAYER=1, GAS2_SEQ_LEN=32,
             GAS2_MICRO_BATCHES=(2,), GAS2_STEP_TOKENS=64, GAS2_TOKENS=128, GAS2_CANDIDATES=2, STEPS=2, WARMUP=1,
             KL_CHUNK_TOKENS=16, SPECS=("gdn", "gdn;softmax=1"))


def main():
    if SMOKE:
        smoke_settings(globals())
    device = torch.device(DEVICE)
    emit("# bench_train\n")
    emit("```\n" + dumps(config_dict(globals())) + "\n```")
    if device.type == "cuda":
        emit(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = True
    cpu_teacher, dtype = make_teacher(device)
    teachers = {fast: device_teacher(cpu_teacher, device, dtype, fast) for fast in (False, True)}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    runs = {"stage2": run_stage2, "phases": run_phases, "stage1": run_stage1, "gas2": run_gas2}
    for section in [s.strip() for s in SECTIONS.split(",") if s.strip()]:
        t0 = time.time()
        if section in runs:
            runs[section](cpu_teacher, teachers, device, autocast)
        elif section == "copy" and device.type == "cuda":
            run_copy(device)
        print(f"[{section}: {time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    run_script(globals(), main)
