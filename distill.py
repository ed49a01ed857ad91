"""Distill a softmax-attention teacher into a hybrid student.

Stage 1 (attention alignment): each student mixer learns to reproduce its teacher layer on the
teacher's own input latent (MSE). Two modes:
  rotation  one layer at a time (layer-wise rotation): capture the teacher latent entering layer i,
            train only student layer i for STEPS_PER_LAYER steps, validate, checkpoint, move on.
            Latents come from a bounded cache that is pushed one teacher layer further per layer
            (hybrid/capture.py), so the whole rotation costs one teacher forward over the cache.
  all       every mixer at once on one teacher forward per batch, losses averaged (RADLADS stage 1).
Stage 2 (full-model KL): temperature^2 * KL(teacher || student) on next-token logits, chunked
over tokens so B*T*V logits never exist, all student parameters trainable (LR_MIXER for mixer
parameters), optional CE term, optional untied embeddings. Any per-layer SPEC; softmax layers
keep the teacher's weights, linear layers start from a stage-1 checkpoint (INIT).

Launch:
  python distill.py --stage=1 --smoke=True                       # CPU smoke, seconds
  python distill.py --stage=1                                    # 1 GPU, rotation over all layers
  python distill.py --stage=2 --init=runs/stage1 --spec="gdn;softmax=3,11,19,27"
  torchrun --standalone --nproc_per_node=8 distill.py --stage=2 ...
  torchrun ... distill.py --stage=2 --parallel=fsdp --shard_teacher=True ...  # 7B/8B teachers (README: which fit)
Reads models/<teacher>/ and data/<name>/*.bin (prepare.py); writes RUN_DIR/{config.json,
log.txt, metrics.jsonl, summary.json, ckpt/step_*.pt, ckpt/final.pt} (a rotation's step_k.pt holds only the
k-th trained layer's parameters; README says what a run needs on disk). Re-running the same command
continues the run (RESUME=auto); a run dir holding another run's checkpoints is refused, not mixed with.
Log line: step 00120/02000 | layer 3/30 | loss 0.012345 | lr 1.0e-03 | dt 812ms | tok/s 1.23M | mem 41.2GB
(dt: wall time per step since the previous line, which waited for the GPU; evals and saves not counted)
"""

import ast
import json
import os
import time
from typing import NamedTuple

import torch

from hybrid.capture import LatentCache, attention_call, capture_all_layers, layer_call, rope_for
from hybrid.checkpoint import (DISTILL_UNCHANGING, atomic_torch_save, atomic_write_json, final_path, load_checkpoint,
                               load_state_strict, module_state, resume_point, save_checkpoint, save_partial)
from hybrid.common import (Pace, Progress, RunLogger, autocast_dtype, barrier, cleanup_dist, env_info, format_tokens,
                           init_dist, interrupt_message, is_master, print0, rng_state, run_script, seed_all,
                           set_rng_state, val_label)
from hybrid.config import check_choice, config_dict
from hybrid.fastpath import compile_layers, compile_report, write_profile
from hybrid.losses import layer_mse
from hybrid.model.spec import check_options
from hybrid.optim import (TimedCosine, adamw, capped_warmup, cosine_lr, grad_accum_steps, load_optimizer, optimizer_step,
                          set_lr)
from hybrid.parallel import (all_mean, average_gradients, broadcast_parameters, describe, full_state, gathered,
                             local_optimizer_state, past_limit, shard_teacher, synced_seconds, wrap)
from hybrid.plots import plot_run
from hybrid.repeats import RepeatSpans
from hybrid.shards import ShardLoader, check_tokenizer, val_batches
from hybrid.stage2 import KLStudent, accumulate_kl, held_out_kl, stage2_param_groups
from hybrid.student import Artifact, rebuild_student, seed_from
from hybrid.surgery import mixer_parameters, read_spec, spec_file
from hybrid.teacher import check_positions, load_teacher, resolve_teacher

# -----------------------------------------------------------------------------
# What to distill
STAGE = 1                       # 1: attention alignment (MSE per layer) | 2: full-model logit KL
TEACHER = "embedded"            # HF id | local HF dir | .gguf | "embedded" (SmolLM2-135M-Instruct)
DATA_DIR = "data/debian"        # shards from prepare.py
SPEC = "gdn"                    # per-layer mixers: "gdn" | "gdn;softmax=3,7" | "gdn,gdn,softmax,..." | a selection.json
                                # (its chosen spec) | selection.json:<method> (that method's top-K, e.g. :uniform;
                                # :ga_s2@12 its top 12)
MIXER_OPTIONS = "{}"            # mixer keyword options (dict literal): conv_size (gdn), gate_rank (gla), window (swa)
INIT = ""                       # stage 2: stage-1 checkpoint or run dir seeding the mixers ("" = fresh from teacher)
RUN_DIR = "runs/distill"        # config.json, log.txt, metrics.jsonl, stage1.png / stage2.png, ckpt/
# Stage 1
STAGE1_MODE = "rotation"        # "rotation": one layer at a time | "all": all layers at once
LAYERS = "all"                  # stage-1 layers: "all" (every non-softmax layer) or "0,4,8"
STEPS_PER_LAYER = 200           # rotation: optimizer steps per layer
STAGE1_STEPS = 2000             # all-layers mode: optimizer steps
TARGET = "layer"                # MSE on "layer" outputs or on "attn" outputs (RADLADS)
TRAIN_MLP = False               # stage 1 trains the mixer only (False) or the whole decoder layer (True)
LATENT_CACHE_TOKENS = 2**22     # rotation: tokens of teacher latents kept per rank (bf16: 2*C bytes each)
# Stage 2
STAGE2_STEPS = 2000             # optimizer steps
TEMPERATURE = 1.0               # KL temperature (loss scaled by T^2)
CE_WEIGHT = 0.0                 # weight of next-token cross-entropy added to the KL
UNTIE_EMBEDDINGS = False        # give the student its own LM head during stage 2
LR_MIXER = 1e-3                 # stage 2 LR for mixer parameters (stage 1 uses LR for them)
REPEAT_ROWS = 0.0               # stage 2: share of training rows given long-range repeats of their spans (0 = none)
                                # (recall practice, hybrid/repeats.py; held-out rows stay plain text)
DATA_START = "auto"             # stage 2: train tokens to skip first: a count, or "auto": where the stage-2 run that
                                # --init names stopped reading (distill.sh's T=4096 part reads on, not the same text again)
KL_CHUNK_TOKENS = 4096          # tokens per chunk of the logit KL (memory ~ 3 * chunk * vocab floats)
TIME_LIMIT_S = 0                # stage 2 ends after the step in which this many seconds have passed (0 = none),
                                # with the eval, checkpoint and final.pt of a planned end (for a lease); its LR schedule
                                # is fitted to the steps that fit, at the pace of its first 10 steps, so it ends annealed
# Optimization
SEQ_LEN = 512                   # tokens per row
MICRO_BATCH = 16                # rows per rank per micro-step
TOTAL_BATCH_TOKENS = 2**15      # tokens per optimizer step, all ranks
LR = 1e-3                       # stage 1 LR; stage 2 LR for non-mixer parameters is LR / 10
MIN_LR_FRAC = 0.1               # cosine floor as a fraction of the LR
WARMUP_STEPS = 20               # linear warm-up steps, capped at 10% of a run (a layer in rotation)
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
# Evaluation, logging, checkpoints
EVAL_EVERY = 200                # optimizer steps (stage 2); stage 1 validates after each layer
EVAL_BATCHES = 8                # val batches of MICRO_BATCH x SEQ_LEN per rank
LOG_EVERY = 10
SAVE_EVERY = 500                # stage 2 steps; stage 1 saves after every layer
KEEP_CHECKPOINTS = 2
RESUME = "auto"                 # "auto": continue RUN_DIR's run if it has one | "" : start fresh | a checkpoint path
# Several GPUs (torchrun)
PARALLEL = "ddp"                # stage 2: "ddp" (whole student per rank) | "fsdp" (FSDP2: student sharded per block)
SHARD_TEACHER = False           # fsdp: shard the frozen teacher's blocks too (True) or keep it whole per rank
SEED = 1337
COMPILE = True                  # torch.compile each decoder layer of student and teacher (GPU only; hybrid/fastpath.py)
PROFILE = False                 # stage 2: profile 5 steps after a 3-step warm-up, print + save the top ops
SMOKE = False                   # tiny budget on CPU: a few steps per stage, small batches
# -----------------------------------------------------------------------------
# the settings that cannot change what a run computes are hybrid.checkpoint.DISTILL_UNCHANGING: a checkpoint written
# with any other setting different is refused on resume (select_layers.py keys its results by the rest of its --init's)


def smoke_settings(g: dict) -> None:
    g.update(SEQ_LEN=64, MICRO_BATCH=2, TOTAL_BATCH_TOKENS=128, STEPS_PER_LAYER=3, STAGE1_STEPS=3, STAGE2_STEPS=3,
             EVAL_BATCHES=1, LOG_EVERY=1, EVAL_EVERY=2, SAVE_EVERY=2, WARMUP_STEPS=1, LATENT_CACHE_TOKENS=512)


def check_settings() -> dict:
    """What a user can get wrong in the settings, checked before anything is loaded or written (a
    missing --resume path is resume_point's to name); -> --mixer_options as a dict every key of which
    some mixer takes."""
    check_choice("stage", STAGE, (1, 2))
    check_choice("stage1_mode", STAGE1_MODE, ("rotation", "all"))
    check_choice("target", TARGET, ("layer", "attn"))
    check_choice("parallel", PARALLEL, ("ddp", "fsdp"))
    if PARALLEL == "fsdp" and STAGE == 1:
        raise ValueError("--parallel=fsdp shards stage 2's student; stage 1 trains mixers only (a layer at a time "
                         "in rotation), which fit every rank: drop --parallel for stage 1")
    if SHARD_TEACHER and PARALLEL != "fsdp":
        raise ValueError("--shard_teacher=True needs --parallel=fsdp")
    if not 0.0 <= REPEAT_ROWS <= 1.0 or (REPEAT_ROWS and STAGE != 2):
        raise ValueError(f"--repeat_rows={REPEAT_ROWS}: a share of stage 2's rows, between 0 and 1 (stage 2 only)")
    if not (DATA_START == "auto" or str(DATA_START).isdigit()):
        raise ValueError(f"--data_start={DATA_START}: a number of train tokens to skip, or \"auto\" (where an --init "
                         "stage-2 run stopped reading)")
    for name, path, fix in (("spec", spec_file(SPEC)[0], "run select_layers.py first"),
                            ("init", INIT, "run stage 1 first")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"--{name}={path}: no such file or folder; {fix}")
    try:
        options = ast.literal_eval(MIXER_OPTIONS)
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, dict):
        raise ValueError(f"--mixer_options={MIXER_OPTIONS}: expected a dict literal, e.g. \"{{'window': 512}}\"")
    return check_options(options)


def stage1_layers(spec: list[str]) -> list[int]:
    linear = [i for i, m in enumerate(spec) if m != "softmax"]
    if LAYERS == "all":
        return linear
    wanted = [int(x) for x in str(LAYERS).split(",")]
    bad = [i for i in wanted if i not in linear]
    if bad:
        raise ValueError(f"--layers={LAYERS}: layers {bad} are softmax or out of range in the spec {spec}")
    return wanted


def layer_params(student, i: int) -> list:
    """The parameters stage 1 trains for layer i (made trainable here: build_student leaves only mixers so)."""
    block = student.model.layers[i]
    params = list(block.parameters()) if TRAIN_MLP else list(block.self_attn.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def log_line(step, total, loss, lr, dt, tokens, extra=""):
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return (f"step {step:05d}/{total:05d}{extra} | loss {loss:.6f} | lr {lr:.1e} | dt {dt * 1000:.0f}ms | "
            f"tok/s {format_tokens(tokens / max(dt, 1e-9))} | mem {mem:.1f}GB")


class Run(NamedTuple):
    """What every stage reads about this process and run (read-only)."""
    device: torch.device
    world_size: int
    accum: int                      # micro-steps per optimizer step
    autocast: object                # bf16 autocast on GPU, a no-op on CPU
    log: RunLogger
    config: dict                    # the checkpoint `config`: artifact fields + settings


def stage1_rotation(run: Run, teacher, student, spec: list[str], loader, val, ckpt) -> dict:
    """Layer-wise rotation over the stage-1 layers; -> {"val_mse": {layer: held-out MSE}}."""
    layers, call = stage1_layers(spec), (layer_call if TARGET == "layer" else attention_call)
    done = ckpt["layers_done"] if ckpt else []
    val_mse = dict(ckpt.get("val_mse", {})) if ckpt else {}
    B, T = MICRO_BATCH, SEQ_LEN
    n_cache = max(1, min(STEPS_PER_LAYER * run.accum, LATENT_CACHE_TOKENS // (B * T)))
    if ckpt:  # the cache is rebuilt from the same batches: the loader state saved before filling it
        loader.load_state_dict(ckpt["cache_loader"])
    cache_loader_state = loader.state_dict()
    t0 = time.time()
    cache = LatentCache(teacher, [loader.next_batch()[0] for _ in range(n_cache)], run.device)
    vcache = LatentCache(teacher, [x for x, _ in val], run.device)
    print0(f"latent cache: {n_cache} batches x {B}x{T} tokens per rank ({n_cache * B * T * cache.latents[0].shape[-1] * cache.latents[0].element_size() / 2**20:.0f} MiB), "
           f"{STEPS_PER_LAYER * run.accum} micro-steps per layer ({STEPS_PER_LAYER * run.accum / n_cache:.1f} passes over the cache)")
    step_tokens = B * T * run.accum * run.world_size
    warmup = capped_warmup(WARMUP_STEPS, STEPS_PER_LAYER)
    prog = Progress(len(layers) * STEPS_PER_LAYER, "stage 1 rotation", "layer-step", start=len(done) * STEPS_PER_LAYER)
    for n, i in enumerate(layers):
        if i in done:
            continue
        cache.advance_to(i)
        vcache.advance_to(i)
        block = student.model.layers[i]
        params = layer_params(student, i)
        broadcast_parameters(params)
        opt = adamw([{"params": params}], LR, WEIGHT_DECAY, run.device)
        t_layer, pace = time.time(), Pace()
        for step in range(STEPS_PER_LAYER):
            scale = cosine_lr(step, STEPS_PER_LAYER, warmup, 1.0, MIN_LR_FRAC)
            set_lr(opt, scale)
            loss_sum = torch.zeros((), device=run.device)
            for micro in range(run.accum):
                idx = (step * run.accum + micro) % len(cache)
                target = cache.targets(idx, TARGET)
                with run.autocast:
                    out = call(block, cache.latents[idx], cache.pe, cache.pos)
                loss = layer_mse(out, target) / run.accum
                loss.backward()
                loss_sum += loss.detach()
            average_gradients(params)
            optimizer_step(opt, params, GRAD_CLIP)
            if step % LOG_EVERY == 0 or step == STEPS_PER_LAYER - 1:
                loss_v = all_mean(loss_sum).item()
                run.log.log(log_line(step, STEPS_PER_LAYER, loss_v, LR * scale, pace.lap(step + 1), step_tokens,
                                     f" | layer {i}/{len(spec)}") + " | " + prog.line(n * STEPS_PER_LAYER + step + 1),
                            {"stage": 1, "layer": i, "step": step, "loss": loss_v, "lr": LR * scale})
        with torch.no_grad(), run.autocast:
            vloss = sum(layer_mse(call(block, vcache.latents[j], vcache.pe, vcache.pos), vcache.targets(j, TARGET))
                        for j in range(len(vcache))) / len(vcache)
        vloss = all_mean(vloss).item()
        done = done + [i]
        val_mse[str(i)] = vloss
        run.log.log(f"layer {i} done ({n + 1}/{len(layers)}) | val mse {vloss:.6f} | {time.time() - t_layer:.1f}s",
                    {"stage": 1, "layer": i, "val_mse": vloss, "layer_seconds": time.time() - t_layer})
        if is_master():  # only what this layer changed: a resume rebuilds the rest from the teacher and seed
            prefix = f"model.layers.{i}." + ("" if TRAIN_MLP else "self_attn.")
            save_partial(RUN_DIR, len(done), module_state(student, prefix), {
                "optim": None, "config": run.config, "rng": rng_state(), "layers_done": done,
                "cache_loader": cache_loader_state, "val_mse": val_mse})
        barrier()
    print0(f"stage 1 rotation: {len(layers)} layers in {time.time() - t0:.1f}s")
    return {"val_mse": val_mse}


def stage1_all(run: Run, teacher, student, spec: list[str], loader, val, ckpt) -> dict:
    """Every stage-1 layer at once on one teacher forward per batch; -> {"val_mse": {"mean": MSE}}."""
    layers = stage1_layers(spec)
    call = layer_call if TARGET == "layer" else attention_call
    params = [p for i in layers for p in layer_params(student, i)]
    broadcast_parameters(params)
    opt = adamw([{"params": params}], LR, WEIGHT_DECAY, run.device)
    start = 0
    if ckpt:
        load_optimizer(opt, ckpt["optim"])
        loader.load_state_dict(ckpt["loader"])
        start = ckpt["step"]
    step_tokens = MICRO_BATCH * SEQ_LEN * run.accum * run.world_size
    warmup = capped_warmup(WARMUP_STEPS, STAGE1_STEPS)
    prog = Progress(STAGE1_STEPS, "stage 1 all layers", start=start)

    def mean_loss(x):
        caps = capture_all_layers(teacher, x.to(run.device), layers, TARGET)
        pe, pos = rope_for(teacher, caps[layers[0]][0])
        with run.autocast:
            return sum(layer_mse(call(student.model.layers[i], caps[i][0], pe, pos), caps[i][1]) for i in layers) / len(layers)

    pace = Pace(start)
    for step in range(start, STAGE1_STEPS):
        scale = cosine_lr(step, STAGE1_STEPS, warmup, 1.0, MIN_LR_FRAC)
        set_lr(opt, scale)
        loss_sum = torch.zeros((), device=run.device)
        for _ in range(run.accum):
            loss = mean_loss(loader.next_batch()[0]) / run.accum
            loss.backward()
            loss_sum += loss.detach()
        average_gradients(params)
        optimizer_step(opt, params, GRAD_CLIP)
        if step % LOG_EVERY == 0 or step == STAGE1_STEPS - 1:
            loss_v = all_mean(loss_sum).item()
            run.log.log(log_line(step, STAGE1_STEPS, loss_v, LR * scale, pace.lap(step + 1), step_tokens, " | all layers")
                        + " | " + prog.line(step + 1),
                        {"stage": 1, "step": step, "loss": loss_v, "lr": LR * scale})
        if (step + 1) % SAVE_EVERY == 0 or step == STAGE1_STEPS - 1:
            save(run, student, opt, {"loader": loader.state_dict()}, step=step + 1)
            pace.reset(step + 1)
    with torch.no_grad():
        vloss = all_mean(sum(mean_loss(x) for x, _ in val) / len(val)).item()
    run.log.log(f"stage 1 all layers | val mse {vloss:.6f} (mean over layers)", {"stage": 1, "val_mse": vloss})
    return {"val_mse": {"mean": vloss}}


def stage2(run: Run, teacher, student, loader, val, ckpt) -> dict:
    """Full-model KL distillation; -> the last held-out metrics (val_kl, val_ppl, teacher_ppl, top1_agreement)."""
    student.requires_grad_(True)  # every student parameter trains in stage 2
    model = wrap(KLStudent(student, TEMPERATURE, CE_WEIGHT, KL_CHUNK_TOKENS), student, PARALLEL, run.device)
    print0(describe(model, PARALLEL))
    opt = adamw(stage2_param_groups(student, LR_MIXER, LR / 10), LR_MIXER, WEIGHT_DECAY, run.device)
    start, metrics = 0, {}
    if ckpt:
        load_optimizer(opt, local_optimizer_state(opt, ckpt["optim"]))
        loader.load_state_dict(ckpt["loader"])
        start, metrics = ckpt["step"], ckpt.get("val_metrics", {})
    step_tokens = MICRO_BATCH * SEQ_LEN * run.accum * run.world_size
    sched = TimedCosine(STAGE2_STEPS, capped_warmup(WARMUP_STEPS, STAGE2_STEPS), MIN_LR_FRAC, TIME_LIMIT_S, start)
    prog = Progress(STAGE2_STEPS, "stage 2", start=start)
    prof, t_start, pace = None, time.time(), Pace(start)
    for step in range(start, STAGE2_STEPS):
        if PROFILE and step == start + 3:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                          ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            prof.__enter__()
        if prof is not None and step == start + 8:
            prof.__exit__(None, None, None)
            write_profile(prof, RUN_DIR)
            prof = None
        scale = sched.scale(step)
        set_lr(opt, scale)
        loss_sum = accumulate_kl(model, teacher, loader, run.accum, run.device, run.autocast)
        optimizer_step(opt, student.parameters(), GRAD_CLIP)
        if sched.wants_time(step) and (note := sched.observe(step, synced_seconds(t_start, run.device))):
            run.log.log(note)
            prog.total = sched.total  # (the ETA's)
        out_of_time = TIME_LIMIT_S > 0 and past_limit(t_start, TIME_LIMIT_S, run.device)
        last = step == sched.total - 1 or out_of_time
        if step % LOG_EVERY == 0 or last:
            loss_v, dt = all_mean(loss_sum).item(), pace.lap(step + 1)  # (.item() synced)
            run.log.log(log_line(step, STAGE2_STEPS, loss_v, LR_MIXER * scale, dt, step_tokens)
                        + " | " + prog.line(step + 1),
                        {"stage": 2, "step": step, "loss": loss_v, "lr": LR_MIXER * scale,
                         "train_tokens": (step + 1) * step_tokens, "tok_per_s": step_tokens / dt})
        if step == start and COMPILE and run.device.type == "cuda":  # why a first step is slow (results.md)
            run.log.log(f"first step {time.time() - t_start:.1f} s | " + compile_report())
        if last and (out_of_time or step + 1 < STAGE2_STEPS):
            metrics["stopped_at_step"] = step + 1
            why = "reached" if out_of_time else "planned: the LR schedule fitted to it ends"
            run.log.log(f"stage 2: --time_limit_s={TIME_LIMIT_S} {why} after step {step + 1} of {STAGE2_STEPS} "
                        f"({(step + 1 - start) * step_tokens / 1e6:.1f}M tokens in this process); ending here",
                        {"stage": 2, "step": step, "stopped_at_step": step + 1})
        if (step + 1) % EVAL_EVERY == 0 or last:
            with gathered(model):
                r = held_out_kl(student, teacher, val, run.device, run.autocast, KL_CHUNK_TOKENS, reduce=True)
            metrics = {**metrics, **{k: r[k] for k in ("val_kl", "val_ppl", "teacher_ppl", "top1_agreement")}}
            run.log.log(f"step {step:05d} | val kl {metrics['val_kl']:.4f} | ppl {metrics['val_ppl']:.2f} "
                        f"(teacher {metrics['teacher_ppl']:.2f}) | {val_label(val, run.world_size)}",
                        {"stage": 2, "step": step, "train_tokens": (step + 1) * step_tokens, **metrics})
            pace.reset(step + 1)  # (synced) the log's pace is of training steps only
        if (step + 1) % SAVE_EVERY == 0 or last:
            save(run, student, opt, {"loader": loader.state_dict(), "val_metrics": metrics}, step=step + 1)
            pace.reset(step + 1)
        if last:
            break
    return metrics


def save(run: Run, student, opt, extra: dict, step: int) -> None:
    model_state, optim_state = full_state(student, opt)  # whole tensors under fsdp too (every rank gathers)
    if is_master():
        state = {"model": model_state, "optim": optim_state, "step": step,
                 "config": run.config, "rng": rng_state(), **extra}
        save_checkpoint(RUN_DIR, step, state, keep=KEEP_CHECKPOINTS)
    barrier()


def data_start(source: dict | None, source_art) -> int:
    """DATA_START as a token count: "auto" takes the data position saved with a stage-2 --init (0 for others)."""
    if DATA_START != "auto":
        return int(DATA_START)
    state = (source or {}).get("loader") if INIT and source_art is not None and source_art.stage == 2 else None
    return state["windows_read"] * state["B"] * state["T"] if state else 0


def main() -> dict:
    if SMOKE:
        smoke_settings(globals())
    options = check_settings()
    cfg = config_dict(globals())
    resume, ckpt = resume_point(RUN_DIR, RESUME, cfg, DISTILL_UNCHANGING)
    if resume is not None and os.path.abspath(resume) == os.path.abspath(final_path(RUN_DIR)):
        summary_path = os.path.join(RUN_DIR, "summary.json")  # written just before final.pt
        print0(f"{RUN_DIR} is a finished run with these settings ({resume}); nothing to do, {summary_path} keeps "
               "its metrics (pass a new --run_dir to run again)")
        if not os.path.exists(summary_path):
            return {}
        with open(summary_path) as f:
            return json.load(f)
    rank, local_rank, world_size, device = init_dist()
    dtype = autocast_dtype(device)
    seed_all(SEED)
    teacher_dir = resolve_teacher(TEACHER) if is_master() else None
    barrier()
    teacher_dir = teacher_dir or resolve_teacher(TEACHER)
    check_positions(teacher_dir, SEQ_LEN)
    teacher, tokenizer = load_teacher(teacher_dir, dtype=torch.float32, device="cpu")
    loader = ShardLoader(DATA_DIR, "train", MICRO_BATCH, SEQ_LEN, rank, world_size, vocab_size=teacher.config.vocab_size)
    check_tokenizer(loader.manifest, tokenizer, DATA_DIR)
    if REPEAT_ROWS:
        loader = RepeatSpans(loader, REPEAT_ROWS, SEED)
    val = val_batches(DATA_DIR, MICRO_BATCH, SEQ_LEN, EVAL_BATCHES, rank, world_size)
    spec = read_spec(SPEC, teacher.config.num_hidden_layers)
    source = ckpt if ckpt is not None else (load_checkpoint(INIT) if INIT else None)  # the run resumed, or the seed
    source_art = Artifact.from_config(source.get("config"), resume or INIT) if source else None
    # a student built from a checkpoint keeps its mixer shapes; MIXER_OPTIONS may add to them
    art = Artifact(teacher=teacher_dir, hybrid_spec=spec,
                   mixer_options={**(source_art.mixer_options if source_art else {}), **options},
                   untied=STAGE == 2 and UNTIE_EMBEDDINGS,
                   target=source_art.target if STAGE == 2 and source_art else TARGET,
                   stage=STAGE, stage1_mode=STAGE1_MODE if STAGE == 1 else None)
    student = rebuild_student(art, teacher)  # a rotation's partial checkpoint lands on it: untrained layers stay
    if ckpt is not None:
        load_state_strict(student, ckpt["model"], f"student ({resume})", partial=ckpt.get("partial", False))
        set_rng_state(ckpt["rng"])
        print0(f"resuming {resume} (step {ckpt['step']}): same settings as this command")
    elif INIT:
        if not source_art.hybrid_spec:
            raise ValueError(f"--init={INIT}: a plain model (train.py on a teacher), not a student; pass a "
                             "distill.py checkpoint or run dir")
        seeded = seed_from(student, source["model"], source_art.hybrid_spec, spec)
        print0(f"seeded layers {seeded} from {INIT}")
    if STAGE == 2 and ckpt is None and (skip := data_start(source, source_art)):
        loader.seek(skip)
        split = loader.total * loader.B * loader.T
        print0(f"data: stage 2 starts at train token {skip:,} (--data_start): {skip / split:.2f} passes into the "
               f"{split:,}-token train split")
    del source
    student.to(device).train()
    teacher.to(device=device, dtype=dtype)  # frozen, bf16 on GPU, replicated on every rank unless SHARD_TEACHER
    if COMPILE and PARALLEL == "fsdp":
        print0("--compile: off under --parallel=fsdp (per-layer compile of sharded blocks is untested here)")
    elif COMPILE:  # in place: state-dict keys stay free of _orig_mod.
        compile_layers(student)
        compile_layers(teacher)
    if SHARD_TEACHER:
        print0(shard_teacher(teacher, device))
    accum = grad_accum_steps(TOTAL_BATCH_TOKENS, MICRO_BATCH, SEQ_LEN, world_size)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    run = Run(device, world_size, accum, autocast, RunLogger(RUN_DIR, is_master()), art.to_config(cfg))
    info = env_info(device, world_size, dtype)
    n_train = sum(p.numel() for p in mixer_parameters(student))
    n_total = sum(p.numel() for p in student.parameters())
    print0(f"config and environment: {os.path.join(RUN_DIR, 'config.json')}")
    print0(f"spec: {','.join(spec)} | accum {accum} | mixer params {n_train / 1e6:.2f}M of {n_total / 1e6:.1f}M | "
           f"dtype {info['dtype']} ({'bf16 autocast on GPU' if dtype != torch.float32 else 'fp32 on CPU'})")
    if is_master():
        atomic_write_json(os.path.join(RUN_DIR, "config.json"), {**run.config, "env": info})
    t0 = time.time()
    if STAGE == 1:
        stage = stage1_rotation if STAGE1_MODE == "rotation" else stage1_all
        metrics = stage(run, teacher, student, spec, loader, val, ckpt)
    else:
        metrics = stage2(run, teacher, student, loader, val, ckpt)
    summary = {"stage": STAGE, "seconds": time.time() - t0, "val_mse": {}, **metrics}
    final_state, _ = full_state(student, None)
    if is_master():
        atomic_write_json(os.path.join(RUN_DIR, "summary.json"), summary)
        where = {"loader": loader.state_dict()} if STAGE == 2 else {}  # a later part's --data_start=auto reads on
        atomic_torch_save({"model": final_state, "config": run.config, "step": 0, **where}, final_path(RUN_DIR))
        plot_run(RUN_DIR)
    barrier()
    print0(f"done in {time.time() - t0:.1f}s; final student: {final_path(RUN_DIR)}")
    cleanup_dist()
    return summary


if __name__ == "__main__":
    run_script(globals(), main, lambda: interrupt_message(
        RUN_DIR, "run the same command again (--resume=auto, the default, continues from there)"))
