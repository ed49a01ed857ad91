"""Speed of a hybrid export against its teacher: prefill, TTFT, decode, memory.

Both models run on the same GPU in the same process, through their own `generate()` with their
own caches (the teacher: HF's KV cache; the hybrid: KV for softmax layers, recurrent state for
linear layers), greedy, with a fixed number of new tokens (min_new_tokens = max_new_tokens).
  TTFT       = time of generate(max_new_tokens=1) (prefill + the first token)
  prefill    = B * context / TTFT tokens/s
  decode     = B * (NEW_TOKENS - 1) / (t(NEW_TOKENS) - TTFT) tokens/s
  memory     = peak allocated during generate minus the weights, per sequence
  roofline   = bytes a decode step must read (weights + KV / state) / COPY_BANDWIDTH, and the
               fraction of it the measured step time reaches (COPY_BANDWIDTH measured here).
Warm-up runs are excluded; each figure is the median of REPEATS runs.

Launch (1 GPU): python bench.py --hybrid=runs/hybrid/export
CPU smoke:      python bench.py --hybrid=<export> --contexts=[64] --batches=[1] --new_tokens=4
Writes OUT_DIR/bench.json, bench.md, bench.png.
Line: ctx  8192 | B 32 | teacher decode 1.23k tok/s | hybrid decode 5.67k tok/s | x4.61
"""

import os
import statistics
import time

import torch

from hybrid.checkpoint import atomic_write_bytes, atomic_write_json
from hybrid.common import run_script

# -----------------------------------------------------------------------------
TEACHER = "embedded"            # teacher spec (resolved like prepare.py) or HF dir
HYBRID = "runs/hybrid/export"   # export folder from export.py
CONTEXTS = [2048, 8192, 16384, 32768]  # prompt tokens
BATCHES = [1, 8, 32]            # sequences per generate call
NEW_TOKENS = 128                # generated tokens per sequence (fixed: min_new_tokens too)
REPEATS = 3                     # timed runs per cell (median)
DTYPE = "bfloat16"              # model dtype on GPU ("float32" on CPU)
OUT_DIR = "runs/bench"
# -----------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def timed_generate(model, ids, new_tokens: int) -> float:
    sync()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    sync()
    return time.perf_counter() - t0


def state_bytes(model, B: int, ctx: int) -> int:
    """Bytes of cache a decode step reads at context ctx: KV for softmax layers, state for linear."""
    cfg = model.config
    spec = getattr(cfg, "hybrid_spec", None) or ["softmax"] * cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_key_value_heads * head_dim * 2  # k and v, bf16
    total = 0
    for mixer in spec:
        if mixer == "softmax":
            total += kv * ctx * B
        elif mixer == "swa":
            total += kv * min(ctx, (getattr(cfg, "hybrid_options", None) or {}).get("window", 512)) * B
        else:  # recurrent state (B, H, K, V) fp32
            total += cfg.num_attention_heads * head_dim * head_dim * 4 * B
    return total


def bench_model(name, model, ctx, B, bw, device) -> dict:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, min(model.config.vocab_size, 10000), (B, ctx), device=device)
    try:
        timed_generate(model, ids, 2)  # warm-up (kernels, autotune, allocator)
        ttft = statistics.median(timed_generate(model, ids, 1) for _ in range(REPEATS))
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        total = statistics.median(timed_generate(model, ids, NEW_TOKENS) for _ in range(REPEATS))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"model": name, "context": ctx, "batch": B, "oom": True}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")  # not tracked on CPU
    step = (total - ttft) / max(1, NEW_TOKENS - 1)
    roof = (weights + state_bytes(model, B, ctx)) / bw
    return {"model": name, "context": ctx, "batch": B, "ttft_s": ttft, "prefill_tok_s": B * ctx / ttft,
            "decode_tok_s": B / step, "decode_step_ms": 1e3 * step, "mem_per_seq_gb": (peak - weights) / B / 2**30,
            "roofline_step_ms": 1e3 * roof, "roofline_fraction": roof / step}


def markdown(rows: list[dict]) -> str:
    lines = ["| context | batch | model | TTFT ms | prefill tok/s | decode tok/s | step ms | roofline ms (fraction) | mem/seq GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['context']} | {r['batch']} | {r['model']} | OOM | | | | | |")
            continue
        lines.append(f"| {r['context']} | {r['batch']} | {r['model']} | {1e3 * r['ttft_s']:.1f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.0f} | {r['decode_step_ms']:.2f} | {r['roofline_step_ms']:.2f} "
                     f"({r['roofline_fraction']:.0%}) | {r['mem_per_seq_gb']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 4), squeeze=False)
    for ax, B in zip(axes[0], BATCHES):
        for name in ("teacher", "hybrid"):
            pts = [(r["context"], r["decode_tok_s"]) for r in rows if r["model"] == name and r["batch"] == B and not r.get("oom")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", title=f"batch {B}", xlabel="context (tokens)", ylabel="decode tokens/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)


def main():
    from transformers import AutoModelForCausalLM

    from hybrid.teacher import resolve_teacher
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPE) if device.type == "cuda" else torch.float32
    if not os.path.isfile(os.path.join(HYBRID, "config.json")):
        raise FileNotFoundError(f"--hybrid={HYBRID}: no export there; run `python export.py` first")
    models = {"teacher": AutoModelForCausalLM.from_pretrained(resolve_teacher(TEACHER), dtype=dtype),
              "hybrid": AutoModelForCausalLM.from_pretrained(HYBRID, dtype=dtype, trust_remote_code=True)}
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} | copy bandwidth {bw / 1e12:.2f} TB/s | "
          f"both sides: eager HF generate(), SDPA softmax, greedy, {NEW_TOKENS} new tokens")
    rows = []
    for ctx in CONTEXTS:
        for B in BATCHES:
            pair = {}
            for name, model in models.items():
                model.to(device).eval()
                with torch.no_grad():
                    pair[name] = bench_model(name, model, ctx, B, bw, device)
                rows.append(pair[name])
            t, h = pair["teacher"], pair["hybrid"]
            if not t.get("oom") and not h.get("oom"):
                print(f"ctx {ctx:6d} | B {B:3d} | TTFT {1e3 * t['ttft_s']:.0f} vs {1e3 * h['ttft_s']:.0f} ms | "
                      f"teacher decode {t['decode_tok_s']:.0f} tok/s | hybrid decode {h['decode_tok_s']:.0f} tok/s | "
                      f"x{h['decode_tok_s'] / t['decode_tok_s']:.2f} | mem/seq {t['mem_per_seq_gb']:.3f} vs {h['mem_per_seq_gb']:.3f} GB")
            else:
                print(f"ctx {ctx:6d} | B {B:3d} | OOM: {[n for n, r in pair.items() if r.get('oom')]}")
    os.makedirs(OUT_DIR, exist_ok=True)
    atomic_write_json(os.path.join(OUT_DIR, "bench.json"), {"copy_bandwidth": bw, "new_tokens": NEW_TOKENS, "rows": rows})
    table = markdown(rows)
    atomic_write_bytes(os.path.join(OUT_DIR, "bench.md"), table.encode())
    plot(rows, os.path.join(OUT_DIR, "bench.png"))
    print(table)


if __name__ == "__main__":
    run_script(globals(), main)
