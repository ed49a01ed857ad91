"""Inference speed and size of a hybrid against its teacher, with equal engineering on both sides.

Three ways to generate, same GPU, same process:
  teacher eager    the teacher's stock HF generate() (dynamic KV cache, eager), what a user runs today
  teacher engine   the teacher's own model through hybrid/model/engine.py (static KV cache, CUDA-graph step)
  hybrid engine    the hybrid through the same engine (KV for its softmax layers, fixed-size mixer states),
                   its GDN layers' decode token through fused Triton kernels (FUSED, the engine's GPU default:
                   op_gdn_step, and op_decode's norms, RoPE and split-KV attention on both sides);
                   both engines run the projections of one input as one matmul (PACK, the GPU default)
  hybrid unfused   the same engine with fused=False: the mixers' mix() (~45 small kernels per GDN layer),
                   HF's RMSNorm modules, eager RoPE and matmul + softmax attention over the cache; the
                   fused kernels' baseline, in the same cells (prefill timed once)
  teacher unfused  the teacher the same way (its layers have no mixer: norms, RoPE and attention)
Figures per (context, batch):
  TTFT, prefill    the prompt pass alone (logits for the last position + argmax), median of REPEATS
                   after one untimed pass (fla's JIT/autotune); one timed run and no untimed one when
                   batch x context > PREFILL_REPEAT_TOKENS; prefill tok/s = B * ctx / TTFT
  decode           DECODE_STEPS steps timed directly with CUDA events after a prefill (and two eager
                   warm-up steps + the graph capture), median over REPEATS windows; the eager teacher: a
                   LogitsProcessor marks each step inside generate(), median step interval
  cache bytes/seq  from the mixers' own count (cache_bytes_per_sequence), checked against the engine's
                   allocation; peak memory (max allocated during the cell, all included) separately
  roofline         bytes a step must move (weights + the cache at `ctx` + one rewrite of the mixer
                   states) / COPY bandwidth measured in this run; fraction = roofline time / step time
  max batch        the largest batch whose cache fits CACHE_BUDGET_GB at that context (per side)

Launch (1 GPU, no teacher staging): python bench.py --random=True
With an export:  python bench.py --hybrid=runs/hybrid/export --teacher=embedded
Writes OUT_DIR/bench.json and bench.md; prints a table and the targets of issue 12.
"""

import gc
import math
import os
import statistics
import time

import torch

from hybrid.checkpoint import atomic_write_bytes, atomic_write_json
from hybrid.common import run_script
from hybrid.model.engine import StaticEngine, cache_bytes_per_sequence, layer_kinds

# -----------------------------------------------------------------------------
RANDOM = False                  # random weights in RANDOM_SHAPE (speed needs no trained weights)
RANDOM_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=65536)  # SmolLM2-135M
RANDOM_SPEC = "gdn;softmax=1,5,9,13,16,20,24,28"  # 8 of 30 layers softmax, spread over depth
TEACHER = "embedded"            # without RANDOM: teacher spec (resolved like prepare.py) or HF dir
HYBRID = "runs/hybrid/export"   # without RANDOM: export folder from export.py
CONTEXTS = [2048, 16384, 32768]  # prompt tokens
BATCHES = [1, 32, "max"]        # "max": the largest batch within CACHE_BUDGET_GB, per side
CACHE_BUDGET_GB = 24.0          # cache budget (GB = 1e9 bytes) for the "max" batch
MAX_BATCH_CAP = 2048
DECODE_STEPS = 32               # steps per timed decode window
REPEATS = 3
PREFILL_REPEAT_TOKENS = 2**20   # prefills larger than this are timed once
PREFILL_TOKENS = 65536          # tokens per prefill pass (rows per pass = this // ctx): bounds activations
EAGER = True                    # also time the teacher's stock generate() (batches 1 and 32 only)
EAGER_STEPS = 8
COMPILE = False                 # engine decode layers through torch.compile (both sides)
FUSED = True                    # the engines' fused decode kernels (op_gdn_step, op_decode)
PACK = True                     # projections of one input as one matmul, both sides (hybrid/model/packed.py)
NORM_LINEAR = False             # each decode norm + the packed projection after it as one kernel (op_norm_linear.py)
UNFUSED_BASELINE = True         # also time both engines with fused=False ("... unfused"), same cells
PROFILE = []                    # e.g. [16384, 32]: also print where a decode step's GPU time goes there
PROFILE_PREFILL = []            # e.g. [16384]: also profile one batch-1 prefill there (wall vs GPU kernel time)
DTYPE = "bfloat16"              # on GPU; float32 on CPU
OUT_DIR = "runs/bench"
# -----------------------------------------------------------------------------


class Clock:
    """CUDA events on GPU (no sync inside the timed region), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth in bytes/s (read + write of a 1 GiB buffer on GPU, 64 MiB on CPU)."""
    x = torch.empty(2**30 if device.type == "cuda" else 2**26, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    clock = Clock(device)
    for _ in range(3):
        y.copy_(x)
    start = clock.mark()
    for _ in range(10):
        y.copy_(x)
    return 2 * x.numel() * 10 / clock.seconds(start, clock.mark())


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(model) -> int:
    """Bytes of the mixers' fixed-size states per sequence (rewritten every decode step)."""
    return sum(layer.self_attn.cache_bytes(next(model.parameters()).dtype)
               for layer, kind in zip(model.model.layers, layer_kinds(model)) if kind != "softmax")


def max_batch(model, ctx: int) -> int:
    per_seq = cache_bytes_per_sequence(model, ctx + 1 + REPEATS * DECODE_STEPS + 3)
    return max(1, min(MAX_BATCH_CAP, int(CACHE_BUDGET_GB * 1e9 // per_seq)))


def figures(name, model, ctx, B, bw, ttft, step, peak) -> dict:
    roof = (weight_bytes(model) + B * (cache_bytes_per_sequence(model, ctx) + state_bytes(model))) / bw
    return {"model": name, "context": ctx, "batch": B, "ttft_s": ttft, "prefill_tok_s": B * ctx / ttft,
            "decode_step_ms": 1e3 * step, "decode_tok_s": B / step, "roofline_step_ms": 1e3 * roof,
            "roofline_fraction": roof / step, "cache_bytes_per_seq": cache_bytes_per_sequence(model, ctx),
            **({} if peak is None else {"peak_gb": peak / 1e9})}


def reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> float | None:
    """Max bytes allocated since reset_memory (weights, cache, activations); None on CPU (no allocator stats)."""
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


@torch.no_grad()
def bench_engine(name, model, ctx, B, bw, device, fused: bool = True, prefill_repeats: int = REPEATS) -> dict:
    clock = Clock(device)
    reset_memory(device)
    engine = StaticEngine(model, B, ctx + 1 + REPEATS * DECODE_STEPS + 3, compile=COMPILE,
                          fused=fused and device.type == "cuda", pack=PACK, norm_linear=NORM_LINEAR)
    want = B * cache_bytes_per_sequence(model, engine.max_len)
    if engine.cache_nbytes() != want:
        raise AssertionError(f"{name}: engine allocated {engine.cache_nbytes()} cache bytes, the mixers count {want}")
    ids = torch.randint(0, min(model.config.vocab_size, 10000), (B, ctx), device=device)
    rows = max(1, PREFILL_TOKENS // ctx)
    repeat = B * ctx <= PREFILL_REPEAT_TOKENS and prefill_repeats > 1
    if repeat:  # untimed: fla's JIT compile and autotune for this shape
        engine.prefill(ids, None, rows)
    ttfts = []
    for _ in range(prefill_repeats if repeat else 1):
        start = clock.mark()
        token = engine.prefill(ids, None, rows).argmax(-1)
        ttfts.append(clock.seconds(start, clock.mark()))
    for _ in range(3):  # two eager warm-up steps (autotune), then the graph capture
        token = engine.decode(token).argmax(-1)
    windows = []
    for _ in range(REPEATS):
        start = clock.mark()
        for _ in range(DECODE_STEPS):
            token = engine.decode(token).argmax(-1)
        windows.append(clock.seconds(start, clock.mark()) / DECODE_STEPS)
    row = figures(name, model, ctx, B, bw, statistics.median(ttfts), statistics.median(windows), peak_memory(device))
    row["cache_bytes_allocated"] = engine.cache_nbytes()
    row["fused_layers"] = sum(p.fused for p in engine.plans)
    return row


@torch.no_grad()
def bench_eager(name, model, ctx, B, bw, device) -> dict:
    """The stock generate(): each step's time from a LogitsProcessor that marks the clock."""
    from transformers import LogitsProcessor, LogitsProcessorList

    clock = Clock(device)

    class StepMarks(LogitsProcessor):
        def __init__(self):
            self.marks = []

        def __call__(self, input_ids, scores):
            self.marks.append(clock.mark())
            return scores

    reset_memory(device)
    ids = torch.randint(0, min(model.config.vocab_size, 10000), (B, ctx), device=device)
    marks = StepMarks()
    start = clock.mark()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=EAGER_STEPS + 1,
                   min_new_tokens=EAGER_STEPS + 1, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([marks]))
    steps = [clock.seconds(a, b) for a, b in zip(marks.marks, marks.marks[1:])]
    return figures(name, model, ctx, B, bw, clock.seconds(start, marks.marks[0]), statistics.median(steps),
                   peak_memory(device))


@torch.no_grad()
def profile_step(name, model, ctx, B, device, fused: bool) -> None:
    """GPU kernel time of eager engine decode steps (no graph: the profiler sees each kernel), by kernel."""
    from torch.profiler import ProfilerActivity, profile
    engine = StaticEngine(model, B, ctx + 16, cuda_graph=False, compile=COMPILE, fused=fused, pack=PACK,
                          norm_linear=NORM_LINEAR)
    token = engine.prefill(torch.randint(0, 10000, (B, ctx), device=device), None, max(1, PREFILL_TOKENS // ctx)).argmax(-1)
    for _ in range(2):
        token = engine.decode(token).argmax(-1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            token = engine.decode(token).argmax(-1)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"== {name} ctx {ctx} B {B}: {sum(e.self_device_time_total for e in events) / 4e3:.2f} ms of GPU kernels "
          f"per step, {sum(e.count for e in events) // 4} kernels")
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


def profile_prefill(name, model, ctx, device, fused: bool) -> None:
    """One batch-1 prefill after an untimed one: wall time against GPU kernel time (a wall far above
    the kernels means launch-bound: the host is the bottleneck), and the top ops by host time."""
    from torch.profiler import ProfilerActivity, profile
    engine = StaticEngine(model, 1, ctx + 16, cuda_graph=False, compile=COMPILE, fused=fused and device.type == "cuda",
                          pack=PACK, norm_linear=NORM_LINEAR)
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    engine.prefill(ids)
    sync()
    gpu = [ProfilerActivity.CUDA] if device.type == "cuda" else []
    with profile(activities=[ProfilerActivity.CPU, *gpu]) as prof:
        start = time.perf_counter()
        engine.prefill(ids)
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # the kernels' own events: an eager op's row also carries the time of the kernels it launched
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    print(f"== prefill {name} ctx {ctx} B 1: wall {1e3 * wall:.1f} ms, GPU kernels "
          f"{sum(e.self_device_time_total for e in kernels) / 1e3:.1f} ms ({sum(e.count for e in kernels)} kernels)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if kernels:  # and where the GPU time goes
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


def random_models(dtype, device):
    """The SmolLM2-135M shape with random weights: the teacher (Llama) and a hybrid of RANDOM_SPEC."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid.model.modeling_hybrid import HybridConfig, HybridForCausalLM
    from hybrid.model.spec import parse_spec
    cfg = LlamaConfig(**RANDOM_SHAPE)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg)
    hybrid = HybridForCausalLM(HybridConfig.from_teacher(cfg, parse_spec(RANDOM_SPEC, cfg.num_hidden_layers)))
    return teacher.to(device, dtype).eval(), hybrid.to(device, dtype).eval()


def loaded_models(dtype, device):
    from transformers import AutoModelForCausalLM

    from hybrid.teacher import resolve_teacher
    if not os.path.isfile(os.path.join(HYBRID, "config.json")):
        raise FileNotFoundError(f"--hybrid={HYBRID}: no export there; run `python export.py` first (or --random=True)")
    teacher = AutoModelForCausalLM.from_pretrained(resolve_teacher(TEACHER), dtype=dtype)
    hybrid = AutoModelForCausalLM.from_pretrained(HYBRID, dtype=dtype, trust_remote_code=True)
    return teacher.to(device).eval(), hybrid.to(device).eval()


def cell(fn, *args) -> dict:
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        name, _, ctx, B = args[:4]
        return {"model": name, "context": ctx, "batch": B, "oom": True}


def markdown(rows: list[dict]) -> str:
    lines = ["| context | batch | model | TTFT ms | prefill tok/s | decode tok/s | step ms | roofline ms (fraction) "
             "| cache MB/seq | peak GB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['context']} | {r['batch']} | {r['model']} | OOM | | | | | | |")
            continue
        lines.append(f"| {r['context']} | {r['batch']} | {r['model']} | {1e3 * r['ttft_s']:.1f} | {r['prefill_tok_s']:.0f} "
                     f"| {r['decode_tok_s']:.0f} | {r['decode_step_ms']:.2f} | {r['roofline_step_ms']:.2f} "
                     f"({r['roofline_fraction']:.0%}) | {r['cache_bytes_per_seq'] / 1e6:.1f} | {r.get('peak_gb', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict], max_batches: dict) -> list[str]:
    """Issue 12's targets, from the rows; one whose cells this run did not measure says so."""
    def get(model, ctx, B, key):  # B None: any batch (cache bytes per sequence do not depend on it)
        for r in rows:
            if r["model"] == model and r["context"] == ctx and B in (None, r["batch"]) and not r.get("oom"):
                return r[key]
        return float("nan")

    def line(text: str, value: float, shown: str, goal: str = "") -> str:
        return f"{text}: " + (shown.format(value) if math.isfinite(value) else "not measured in this run") + \
            (f" (target {goal})" if goal else "")

    def ratio(a: tuple, b: tuple, key: str) -> float:
        return get(*a, key) / get(*b, key)
    mid, long = 16384, 32768
    max_t, max_h = max_batches.get(("teacher engine", long)), max_batches.get(("hybrid engine", long))
    out = [line("hybrid / teacher-engine decode at 16K B32", ratio(("hybrid engine", mid, 32), ("teacher engine", mid, 32),
                                                                   "decode_tok_s"), "x{:.2f}", ">= 3.0"),
           line("roofline fraction at 16K B32, teacher engine", get("teacher engine", mid, 32, "roofline_fraction"),
                "{:.0%}", ">= 50%"),
           line("roofline fraction at 16K B32, hybrid engine", get("hybrid engine", mid, 32, "roofline_fraction"),
                "{:.0%}", ">= 50%"),
           line("cache bytes/seq at 16K, hybrid / teacher", ratio(("hybrid engine", mid, None), ("teacher engine", mid, None),
                                                                  "cache_bytes_per_seq"), "{:.1%}", "<= 30%"),
           line(f"max batch at 32K in {CACHE_BUDGET_GB:g} GB, hybrid / teacher ({max_h} / {max_t})",
                max_h / max_t if max_h and max_t else float("nan"), "x{:.2f}", ">= 3.5")]
    for ctx in (mid, long):
        out.append(line(f"prefill at {ctx // 1024}K B1: hybrid / teacher engine",
                        ratio(("hybrid engine", ctx, 1), ("teacher engine", ctx, 1), "prefill_tok_s"), "x{:.2f}", ">= 1"))
    for ctx in (mid, long):  # what a fixed cache budget serves: each side at its own largest batch
        mb = [max_batches.get((side, ctx)) for side in ("hybrid engine", "teacher engine")]
        out.append(line(f"decode at {ctx // 1024}K, each side's max batch ({mb[0]} / {mb[1]}): hybrid / teacher engine",
                        ratio(("hybrid engine", ctx, mb[0]), ("teacher engine", ctx, mb[1]), "decode_tok_s")
                        if all(mb) else float("nan"), "x{:.2f}"))
    for side in ("hybrid", "teacher"):
        out.append(line(f"fused kernels: {side} engine / {side} unfused decode at 16K B32",
                        ratio((f"{side} engine", mid, 32), (f"{side} unfused", mid, 32), "decode_tok_s"), "x{:.2f}"))
    out.append(line("teacher engine / teacher eager decode at 16K B32",
                    ratio(("teacher engine", mid, 32), ("teacher eager", mid, 32), "decode_tok_s"), "x{:.2f}", ">= 5"))
    return out


def main() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPE) if device.type == "cuda" else torch.float32
    teacher, hybrid = (random_models if RANDOM else loaded_models)(dtype, device)
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} | copy bandwidth {bw / 1e12:.2f} TB/s "
          f"| {'random weights' if RANDOM else 'loaded weights'} | compile {COMPILE} | fused {FUSED} | pack {PACK} | norm_linear {NORM_LINEAR} | hybrid {','.join(layer_kinds(hybrid))} | {dtype}")
    sides = {"teacher engine": teacher, "hybrid engine": hybrid}
    unfused = UNFUSED_BASELINE and FUSED and device.type == "cuda"
    if EAGER and device.type == "cuda":  # warm the eager path once (kernel selection) outside the timed cells
        teacher.generate(torch.ones(1, 16, dtype=torch.long, device=device), max_new_tokens=2, pad_token_id=0)
    rows, max_batches = [], {}
    for ctx in CONTEXTS:
        for batch in BATCHES:
            if EAGER and batch != "max":
                rows.append(cell(bench_eager, "teacher eager", teacher, ctx, batch, bw, device))
            for name, model in sides.items():
                B = max_batch(model, ctx) if batch == "max" else batch
                if batch == "max":
                    max_batches[(name, ctx)] = B
                rows.append(cell(bench_engine, name, model, ctx, B, bw, device, FUSED))
            for name, model in sides.items() if unfused else ():
                B = max_batches[(name, ctx)] if batch == "max" else batch
                rows.append(cell(bench_engine, name.replace("engine", "unfused"), model, ctx, B, bw, device, False, 1))
            for r in rows[-(len(sides) * (1 + unfused) + (EAGER and batch != "max")):]:
                print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()), flush=True)
    if PROFILE and device.type == "cuda":
        for name, model in sides.items():
            profile_step(name, model, *PROFILE, device, FUSED)
        if unfused:
            profile_step("hybrid unfused", hybrid, *PROFILE, device, False)
    for ctx in PROFILE_PREFILL:
        for name, model in sides.items():
            profile_prefill(name, model, ctx, device, FUSED)
    table = markdown(rows)
    lines = targets(rows, max_batches)
    print(table + "\n".join(lines))
    os.makedirs(OUT_DIR, exist_ok=True)
    result = {"copy_bandwidth": bw, "device": str(device), "random": RANDOM, "compile": COMPILE, "fused": FUSED, "pack": PACK,
              "norm_linear": NORM_LINEAR, "rows": rows, "targets": lines,
              "max_batch": {f"{n} @ {c}": b for (n, c), b in max_batches.items()}}
    atomic_write_json(os.path.join(OUT_DIR, "bench.json"), result)
    atomic_write_bytes(os.path.join(OUT_DIR, "bench.md"), (table + "\n" + "\n".join(f"- {t}" for t in lines) + "\n").encode())
    return result


if __name__ == "__main__":
    run_script(globals(), main)
