"""Benchmark the linear-attention kernels: fla vs the torch chunked reference vs softmax SDPA.

For each op (gdn, gla, rwkv7) and each sequence length, with B*T fixed, it times the forward
and forward+backward of fla's chunk kernel, of our torch chunked reference (hybrid/op_*.py) and
of causal softmax attention (F.scaled_dot_product_attention) on the same B, H, D; then the
norm-relative error of fla against the float64 reference in bf16 and fp32 (output, final state,
every input gradient); one GDN forward at B=8, T=4096 through the raw fla op; when
hybrid/mixers.py is there, one GDN mixer module forward against the raw op on the same shape; and
the fla #640 table: GDN fwd+bwd at K=64 with fla's blocks and with op_gdn's workarounds.
Timings: CUDA events, warm-up excluded, median of REPS.

Launch (1 GPU, fla installed):  python bench_kernels.py
CPU smoke run (no fla; torch paths only):
    python bench_kernels.py --device=cpu --tokens=512 --seq_lens=128,256 --reps=1 --big_batch=1 --big_seq_len=256
    (--sections=errors,speed --ops=rwkv7 picks tables and ops)
Writes OUT_FILE (markdown, the same tables it prints). Sample line:
    | gdn | 8192 | 4 | 1.10 | 3.52 | 60.1 | 190.2 | 0.95 | 2.81 |
"""

import statistics
import time

import torch
import torch.nn.functional as F

from hybrid.checkpoint import atomic_write_bytes
from hybrid.common import run_script
from hybrid.config import config_dict, dumps
from hybrid.model.op_gdn import gdn, gdn_chunked
from hybrid.model.op_gla import gla, gla_chunked
from hybrid.model.op_rwkv7 import rwkv7, rwkv7_chunked

# -----------------------------------------------------------------------------
# Shapes (SmolLM2-135M: 9 heads of 64)
DEVICE = "cuda"                 # "cuda" | "cpu" (smoke test: torch paths only)
TOKENS = 32768                  # B*T, fixed across sequence lengths
SEQ_LENS = (2048, 8192, 32768)  # T values; B = TOKENS // T
HEADS = 9                       # H
HEAD_DIM = 64                   # D = K = V
OPS = "gdn,gla,rwkv7"            # comma-separated subset
# Measurement
REPS = 10                       # timed repetitions (median) for fla and SDPA
REF_REPS = 3                    # timed repetitions for the torch reference (slow)
WARMUP = 2                      # untimed calls first (Triton compile + autotune)
REF_MAX_TOKENS_PER_SEQ = 32768  # skip the torch reference above this T
ERR_SEQ_LEN = 2048              # T for the fla-vs-reference error table (B = 1, with an initial state)
SECTIONS = "speed,errors,big,mixer,kpad"  # which tables, comma-separated, in this order (+ "gdn_train")
# "big": GDN forward at BIG_BATCH x BIG_SEQ_LEN (raw fla op, dispatcher, SDPA);
# "mixer": a GDN mixer module vs the raw op on that shape (needs hybrid/mixers.py)
# "kpad": GDN fwd+bwd at K=64, fla's own blocks (fla #640) vs op_gdn's workarounds, at KPAD_BATCH x KPAD_SEQ_LEN
BIG_BATCH = 8                   # B for "big" and "mixer"
BIG_SEQ_LEN = 4096              # T for "big" and "mixer"
KPAD_BATCH = 16                 # B for "kpad" (a stage-2 micro-batch of distill.py's default)
KPAD_SEQ_LEN = 2048             # T for "kpad"
# "gdn_train": op_gdn_train's kernels alone (ms, the bytes they must move vs the copy bandwidth), and a compiled GDN
# mixer's forward + backward with them off and on, at TRAIN_BATCH x TRAIN_SEQ_LEN (a stage-2 micro-batch), bf16
TRAIN_BATCH = 32                # B for "gdn_train"
TRAIN_SEQ_LEN = 2048            # T for "gdn_train"
OUT_FILE = "runs/bench_kernels.md"  # markdown tables, written atomically
SEED = 0
# -----------------------------------------------------------------------------

REFERENCE = {"gdn": gdn_chunked, "gla": gla_chunked, "rwkv7": rwkv7_chunked}
DISPATCH = {"gdn": gdn, "gla": gla, "rwkv7": rwkv7}
lines: list[str] = []


def emit(line: str = "") -> None:
    """Print a line and keep it for OUT_FILE (rewritten after every section, so a crash keeps the rest)."""
    print(line, flush=True)
    lines.append(line)


def flush_file() -> None:
    atomic_write_bytes(OUT_FILE, ("\n".join(lines) + "\n").encode())


def make_inputs(op: str, B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str,
                state: bool = False, seed: int = SEED) -> dict:
    """Inputs in the ranges the mixers produce: unit-norm GDN q/k, sigmoid beta, Mamba-style decays."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    if op == "gdn":
        x = dict(q=F.normalize(rnd(B, T, H, D), dim=-1), k=F.normalize(rnd(B, T, H, D), dim=-1), v=rnd(B, T, H, D),
                 g=F.logsigmoid(rnd(B, T, H) + 2.0), beta=torch.sigmoid(rnd(B, T, H)))
    elif op == "gla":
        x = dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D), g=F.logsigmoid(rnd(B, T, H, D)) / 16)
    else:
        kk = F.normalize(rnd(B, T, H, D), dim=-1)
        x = dict(r=rnd(B, T, H, D), w=-0.6065 * torch.sigmoid(rnd(B, T, H, D)), k=rnd(B, T, H, D) * D ** -0.5,
                 v=rnd(B, T, H, D), a=-kk, b=kk * torch.sigmoid(rnd(B, T, H, D)))
    x = {n: t.to(dtype) for n, t in x.items()}
    if state:
        x["initial_state"] = rnd(B, H, D, D) * 0.1
    return x


def timed(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() over reps calls after warmup untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_and_bwd_ms(fn, inputs: dict, reps: int) -> tuple[str, str]:
    """(forward ms, forward+backward ms) of fn(**inputs)[0]; grads flow to every input.
    A backward that raises (fla's GDN on Hopper with Triton < 3.7.1) reports its reason instead."""
    with torch.no_grad():
        t_fwd = timed(lambda: fn(**inputs), reps, WARMUP)
    leaves = {n: t.detach().requires_grad_(True) for n, t in inputs.items()}

    def step():
        for t in leaves.values():
            t.grad = None
        out = fn(**leaves)[0]
        out.backward(torch.ones_like(out))

    try:
        return f"{t_fwd:.2f}", f"{timed(step, reps, WARMUP):.2f}"
    except RuntimeError as e:
        reason = "refused (fla #640: Hopper, Triton < 3.7.1)" if "3.7.1" in str(e) else "err"
        emit(f"<!-- backward: {str(e).splitlines()[0][:160]} -->")
        return f"{t_fwd:.2f}", reason


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor]:
    return (F.scaled_dot_product_attention(q, k, v, is_causal=True),)


def try_ms(what: str, fn, *args) -> tuple[str, str]:
    """Run a timing, turning OOM/missing kernels into a table note instead of a crash."""
    try:
        return fn(*args)
    except (torch.cuda.OutOfMemoryError, ImportError, RuntimeError, ValueError) as e:
        emit(f"<!-- {what}: {type(e).__name__}: {str(e).splitlines()[0][:160]} -->")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        return "err", "err"


def bench_speed(have_fla: bool) -> None:
    emit(f"## Speed: ms per call, B*T = {TOKENS}, H = {HEADS}, D = {HEAD_DIM}, bf16 inputs")
    emit()
    emit("| op | T | B | fla fwd | fla fwd+bwd | torch chunked fwd | torch chunked fwd+bwd | SDPA fwd | SDPA fwd+bwd |")
    emit("|---|---|---|---|---|---|---|---|---|")
    sdpa_ms = {}
    for T in SEQ_LENS:
        B = max(1, TOKENS // T)
        qkv = {n: torch.randn(B, HEADS, T, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) for n in "qkv"}
        sdpa_ms[T] = try_ms(f"sdpa T={T}", fwd_and_bwd_ms, sdpa, qkv, REPS)
        del qkv
    for op in OPS.split(","):
        for T in SEQ_LENS:
            B = max(1, TOKENS // T)
            x = make_inputs(op, B, T, HEADS, HEAD_DIM, torch.bfloat16, DEVICE)
            fla_ms = ("n/a", "n/a")
            if have_fla:
                fla_ms = try_ms(f"fla {op} T={T}", fwd_and_bwd_ms,
                                lambda **kw: DISPATCH[op](**kw, impl="fla"), x, REPS)
            ref_ms = ("skipped", "skipped")
            if T <= REF_MAX_TOKENS_PER_SEQ:
                ref_ms = try_ms(f"torch {op} T={T}", fwd_and_bwd_ms, REFERENCE[op], x, REF_REPS)
            emit(f"| {op} | {T} | {B} | {fla_ms[0]} | {fla_ms[1]} | {ref_ms[0]} | {ref_ms[1]} | "
                 f"{sdpa_ms[T][0]} | {sdpa_ms[T][1]} |")
            del x
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            flush_file()
    emit()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def outputs_and_grads(fn, inputs: dict, **kw) -> dict:
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    o, S = fn(**leaves, output_final_state=True, **kw)
    gen = torch.Generator(device=o.device).manual_seed(SEED + 1)
    do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen, device=o.device).to(S.dtype)
    ((o.float() * do.float()).sum() + (S.float() * dS.float()).sum()).backward()
    return {"o": o.detach(), "state": S.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def bench_errors() -> None:
    emit(f"## fla vs float64 torch reference: norm-relative error, B = 1, T = {ERR_SEQ_LEN}, H = {HEADS}, "
         f"D = {HEAD_DIM}, with an initial state")
    emit()
    emit("| op | dtype | o | final state | worst input grad | all grads | finite |")
    emit("|---|---|---|---|---|---|---|")
    for op in OPS.split(","):
        for dtype in (torch.bfloat16, torch.float32):
            try:
                x = make_inputs(op, 1, ERR_SEQ_LEN, HEADS, HEAD_DIM, dtype, DEVICE, state=True)
                ref = outputs_and_grads(REFERENCE[op], {n: t.double() for n, t in x.items()})
                try:
                    got = outputs_and_grads(DISPATCH[op], x, impl="fla")
                except RuntimeError as e:  # fla's GDN backward on Hopper with Triton < 3.7.1: forward only
                    with torch.no_grad():
                        o, S = DISPATCH[op](**x, output_final_state=True, impl="fla")
                    emit(f"<!-- {op} backward: {str(e).splitlines()[0][:160]} -->")
                    got = {"o": o, "state": S, **{f"d{n}": torch.full_like(ref[f"d{n}"], float("nan")) for n in x}}
                errs = {n: rel_err(got[n], ref[n]) for n in ref}  # NaN for grads fla refused
                grads = {n: e for n, e in errs.items() if n.startswith("d")}
                worst = max(grads, key=lambda n: grads[n] if grads[n] == grads[n] else -1.0)
                checked = [t for n, t in got.items() if not n.startswith("d") or errs[n] == errs[n]]
                finite = all(torch.isfinite(t).all().item() for t in checked)
                emit(f"| {op} | {str(dtype).replace('torch.', '')} | {errs['o']:.1e} | {errs['state']:.1e} | "
                     f"{worst} {grads[worst]:.1e} | " + ", ".join(f"{n} {e:.0e}" for n, e in grads.items())
                     + f" | {finite} |")
            except (torch.cuda.OutOfMemoryError, ImportError, RuntimeError, ValueError) as e:
                emit(f"| {op} | {dtype} | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | |")
            flush_file()
    emit()


def bench_big_shape(have_fla: bool) -> None:
    B, T = BIG_BATCH, BIG_SEQ_LEN
    emit(f"## GDN forward at B = {B}, T = {T}, H = {HEADS}, D = {HEAD_DIM}, bf16 (ms)")
    emit()
    x = make_inputs("gdn", B, T, HEADS, HEAD_DIM, torch.bfloat16, DEVICE)
    rows = []
    if have_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        with torch.no_grad():
            rows.append(("fla chunk_gated_delta_rule (raw)",
                         timed(lambda: chunk_gated_delta_rule(*(x[n] for n in ("q", "k", "v", "g", "beta"))),
                               REPS, WARMUP)))
            rows.append(("hybrid.model.op_gdn.gdn (dispatcher -> fla)", timed(lambda: gdn(**x), REPS, WARMUP)))
    qkv = {n: torch.randn(B, HEADS, T, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) for n in "qkv"}
    with torch.no_grad():
        rows.append(("SDPA causal (same B, H, T, D)", timed(lambda: sdpa(**qkv), REPS, WARMUP)))
    emit("| path | fwd ms |")
    emit("|---|---|")
    for name, ms in rows:
        emit(f"| {name} | {ms:.3f} |")
    emit()
    flush_file()


def bench_mixer(have_fla: bool) -> None:
    """One GDN mixer module (projections, conv, norms, gate, o_proj + the op) vs the raw op alone."""
    emit("## GDN mixer module vs raw op, forward, bf16 (SmolLM2-135M attention shape)")
    emit()
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        from hybrid.model.mixers import MIXERS, build_mixer
        if "gdn" not in MIXERS:
            raise ImportError(f"hybrid.model.mixers.MIXERS has no 'gdn' (has {sorted(MIXERS)})")
    except ImportError as e:
        emit(f"skipped: {e}")
        emit()
        return
    B, T = BIG_BATCH, BIG_SEQ_LEN
    cfg = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=3,
                      head_dim=HEAD_DIM, intermediate_size=1536, num_hidden_layers=1, vocab_size=256,
                      rope_theta=100000.0, max_position_embeddings=T)
    mixer = build_mixer("gdn", LlamaAttention(cfg, layer_idx=0), cfg, 0).to(DEVICE, torch.bfloat16)
    mixer.requires_grad_(False)
    hidden = torch.randn(B, T, cfg.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    pos = torch.arange(T, device=DEVICE)[None].expand(B, T)
    pe = LlamaRotaryEmbedding(cfg).to(DEVICE)(hidden, pos)
    x = make_inputs("gdn", B, T, HEADS, HEAD_DIM, torch.bfloat16, DEVICE)
    x["g"], x["beta"] = x["g"].float(), x["beta"].float()  # the mixer passes fp32 gates, as fla's own layer does
    with torch.no_grad():
        mixer_ms = timed(lambda: mixer(hidden, position_embeddings=pe), REPS, WARMUP)
        op_ms = timed(lambda: gdn(**x), REPS, WARMUP)
    emit(f"mixer impl = {getattr(mixer, 'impl', '?')}, fla available = {have_fla}, B = {B}, T = {T}")
    emit()
    emit("| mixer fwd ms | raw op fwd ms | overhead (mixer - op) / op | op share of mixer |")
    emit("|---|---|---|---|")
    emit(f"| {mixer_ms:.3f} | {op_ms:.3f} | {100 * (mixer_ms - op_ms) / op_ms:.0f}% | {100 * op_ms / mixer_ms:.0f}% |")
    emit()
    flush_file()


def bench_kpad(have_fla: bool) -> None:
    """fla's GDN fwd+bwd at K=64 as fla picks its blocks (fla #640) and under op_gdn's three workarounds,
    each with its gradient error against the fp32 chunked reference (a wrong row shows it)."""
    if not have_fla:
        return
    emit("## GDN kernel at K=64: fla #640 workarounds (pad to K=128, narrow dqkwg blocks, checked) vs none")
    emit()
    from hybrid.model import op_gdn
    from hybrid.model.op_common import fla_module, relative_errors
    chunk_fn = fla_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
    chunk, chunk_o = fla_module("fla.ops.gated_delta_rule.chunk"), fla_module("fla.ops.common.chunk_o")
    op_gdn._guard_dqkwg()
    guarded, original = chunk.chunk_bwd_dqkwg, chunk.chunk_bwd_dqkwg.original
    B, T, H, D = KPAD_BATCH, KPAD_SEQ_LEN, HEADS, HEAD_DIM
    g0 = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16, generator=g0) for _ in range(3))
    q, k = (F.normalize(t, dim=-1) for t in (q, k))
    g = -torch.rand(B, T, H, device=DEVICE, generator=g0) * 0.1
    beta = torch.rand(B, T, H, device=DEVICE, generator=g0).to(torch.bfloat16)
    do = torch.randn(B, T, H, D, device=DEVICE, generator=g0)
    leaves = [t.requires_grad_(True) for t in (q, k, v, g, beta)]

    def grads(fn):
        for t in leaves:
            t.grad = None
        (fn(*leaves)[0].float() * do).sum().backward()
        return [t.grad.float() for t in leaves]

    ref = grads(lambda *x: op_gdn.gdn_chunked(*(t.float() for t in x)))
    paths = (("fla's blocks (K=64, BK=64)", original, chunk_fn, None),
             ("pad: K=128 everywhere", original, op_gdn.gdn, "pad"),
             ("narrow: dqkwg at BK=32", guarded, op_gdn.gdn, "narrow"),
             ("checked: BK=64 checked once vs BK=32", guarded, op_gdn.gdn, "checked"))
    emit("| path | fwd+bwd ms | x fla's blocks | max rel err dq, dk, dv, dg, dbeta |")
    emit("|---|---|---|---|")
    base, saved = None, (chunk.chunk_bwd_dqkwg, chunk_o.TRITON_ABOVE_3_7_1, op_gdn.HOPPER_WORKAROUND)
    try:
        for label, dqkwg, fn, workaround in paths:
            chunk.chunk_bwd_dqkwg, op_gdn.HOPPER_WORKAROUND = dqkwg, workaround or saved[2]
            chunk_o.TRITON_ABOVE_3_7_1 = True  # fla's guard lifted (the first row is the bug it guards against)
            errs = relative_errors(zip("qkvgb", grads(fn), ref)).values()
            ms = timed(lambda: grads(fn), REPS, WARMUP)
            base = base or ms
            emit(f"| {label} | {ms:.2f} | {ms / base:.2f}x | {', '.join(f'{e:.1e}' for e in errs)} |")
    finally:
        chunk.chunk_bwd_dqkwg, chunk_o.TRITON_ABOVE_3_7_1, op_gdn.HOPPER_WORKAROUND = saved
    emit()
    flush_file()


def bench_gdn_train(have_fla: bool) -> None:
    """op_gdn_train's kernels forward + backward alone, against the bytes each tensor they read or write
    holds (a lower bound on their traffic) at the measured copy bandwidth; then a compiled GDN mixer's
    mix() forward + backward with mixers.GDN_TRAIN_KERNELS "off" (inductor's graphs) and "cuda"."""
    if not have_fla:
        return
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from hybrid.model import mixers
    from hybrid.model.op_gdn_train import gdn_train_inputs, gdn_train_norm, packed_layout
    B, T, H, HKV, D = TRAIN_BATCH, TRAIN_SEQ_LEN, HEADS, 3, HEAD_DIM
    emit(f"## GDN's training elementwise work: op_gdn_train vs compiled torch, B={B} T={T}, {H} heads ({HKV} kv) of {D}")
    emit()
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=HKV, head_dim=D,
                      intermediate_size=1536, num_hidden_layers=1, vocab_size=256, max_position_embeddings=T)
    mixer = mixers.build_mixer("gdn", LlamaAttention(cfg, layer_idx=0), cfg, 0).to(DEVICE, torch.bfloat16)
    x = torch.randn(B, T, H * D, device=DEVICE, dtype=torch.bfloat16)
    P = mixer.project_packed(x, mixer.a_proj, mixer.b_proj, mixer.g_proj)[0].detach().requires_grad_(True)
    w = [mixer.conv_weight, mixer.A_log, mixer.dt_bias]
    outs = gdn_train_inputs(P, *w, H, HKV, D)
    grads = [torch.randn_like(t) for t in outs]
    o = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(B, T, H * D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(gate)
    n_in = sum(packed_layout(H, HKV, D)[:5])  # the conv channels and the gates' columns
    tok = 2 * B * T  # bytes per bf16 element per column
    leaves = [P, o, gate, *mixer.parameters()]

    def fresh(fn):  # no gradient accumulation kernels in the timings
        for t in leaves:
            t.grad = None
        return fn()

    io = {  # (fn, bytes of every tensor it must read or write, once each); fwd + bwd: backward reads the
        # inputs' columns, q/k/v/gate's gradients and the gates' (fp32), writes dP
        "inputs fwd": (lambda: gdn_train_inputs(P, *w, H, HKV, D), tok * (n_in + 5 * H * D + 4 * H)),
        "inputs fwd+bwd": (lambda: torch.autograd.backward(gdn_train_inputs(P, *w, H, HKV, D), grads),
                           tok * (n_in + 5 * H * D + 4 * H) + tok * (n_in + 4 * H * D + 4 * H + P.shape[-1])),
        "norm fwd+bwd": (lambda: gdn_train_norm(o, gate, mixer.o_norm.weight, mixer.o_norm.eps).backward(dy),
                         tok * 3 * H * D + tok * 5 * H * D)}
    from bench import copy_bandwidth
    bw = copy_bandwidth(torch.device(DEVICE))
    emit(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    emit()
    emit("| kernels | ms | GB moved (lower bound) | fraction of copy bandwidth |")
    emit("|---|---|---|---|")
    for name, (fn, nbytes) in io.items():
        ms = timed(lambda: fresh(fn), REPS, WARMUP)
        emit(f"| {name} | {ms:.3f} | {nbytes / 1e9:.3f} | {100 * nbytes / (ms / 1e3) / bw:.0f}% |")
    emit()
    # tokens per program, one kernel's at a time (the defaults: op_gdn_prefill.BLOCK_T, op_gdn_train's dicts)
    from hybrid.model import op_gdn_prefill, op_gdn_train
    emit("| block size tried (tokens per program) | inputs fwd+bwd ms |")
    emit("|---|---|")
    fwd_bwd = io["inputs fwd+bwd"][0]
    for label, table, key, sizes in (("forward (op_gdn_prefill.BLOCK_T)", vars(op_gdn_prefill), "BLOCK_T", (16, 32, 64)),
                                     ("backward, gradient pass (op_gdn_train.BLOCK_T)", op_gdn_train.BLOCK_T, D, (16, 32)),
                                     ("backward, conv pass (op_gdn_train.CONV_BLOCK_T)", op_gdn_train.CONV_BLOCK_T, D,
                                      (16, 32, 64))):
        default = table[key]
        for size in sizes:
            table[key] = size
            ms = timed(lambda: fresh(fwd_bwd), REPS, WARMUP)
            emit(f"| {label} = {size}{' (default)' if size == default else ''} | {ms:.3f} |")
        table[key] = default
    emit()
    mix = torch.compile(mixer.mix, dynamic=False)
    dmix = torch.randn_like(x)
    emit("| compiled mix() fwd+bwd (projections, fla's chunk kernel, o_proj included) | ms |")
    emit("|---|---|")
    default = mixers.GDN_TRAIN_KERNELS
    for mode in ("off", "cuda"):
        mixers.GDN_TRAIN_KERNELS = mode
        xx = x.detach().requires_grad_(True)
        ms = timed(lambda: fresh(lambda: mix(xx, None, None, None, output_state=False)[0].backward(dmix)), REPS,
                   WARMUP + 1)
        emit(f"| GDN_TRAIN_KERNELS={mode} | {ms:.3f} |")
    mixers.GDN_TRAIN_KERNELS = default
    emit()
    flush_file()


def main() -> None:
    torch.manual_seed(SEED)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE='cuda' but no CUDA device; run on a GPU or pass --device=cpu (smoke test)")
    have_fla = False
    if DEVICE == "cuda":
        try:
            import fla  # noqa: F401
            have_fla = True
        except ImportError as e:
            print(f"fla not importable ({e}); timing the torch paths only")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    emit("# Linear-attention kernel benchmark")
    emit()
    fla_version = getattr(__import__("fla"), "__version__", "?") if have_fla else "absent"
    emit(f"device {name}, torch {torch.__version__}, fla {fla_version}; "
         f"median of {REPS} (torch reference: {REF_REPS}) after {WARMUP} warm-up calls")
    emit()
    emit("```")
    emit(dumps(config_dict(globals())))
    emit("```")
    emit()
    flush_file()
    sections = {"speed": lambda: bench_speed(have_fla), "errors": bench_errors if have_fla else (lambda: None),
                "big": lambda: bench_big_shape(have_fla), "mixer": lambda: bench_mixer(have_fla),
                "kpad": lambda: bench_kpad(have_fla), "gdn_train": lambda: bench_gdn_train(have_fla)}
    for name in SECTIONS.split(","):
        if name not in sections:
            raise ValueError(f"--sections: unknown {name!r}; expected some of {tuple(sections)}")
        sections[name]()
    print(f"wrote {OUT_FILE}")


if __name__ == "__main__":
    run_script(globals(), main)
