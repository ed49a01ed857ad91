"""Next-token training of a decoder LM (teacher or hybrid student) with torchrun DDP and exact resume.

What it does: cross-entropy on the next token over the token shards of `prepare.py`, AdamW with
linear warmup and cosine decay to MIN_LR, gradient accumulation derived from a global batch
given in tokens, periodic validation loss, and self-describing checkpoints that resume
bit-exactly on CPU (model, optimizer, loader position, RNG and step all restored).

The model is one of:
  - MODEL (teacher spec, see hybrid/teacher.py) with INIT="pretrained": continue pretraining;
  - MODEL with INIT="scratch": random weights from the same config (a baseline);
  - CHECKPOINT=<distill.py or train.py checkpoint, .pt or run dir>: the hybrid student is rebuilt
    from the checkpoint's `config` ("teacher" + "hybrid_spec") and its weights loaded.
Stage 3 of RADLADS (optional long-context fine-tune) is this script on a hybrid checkpoint with a
longer SEQ_LEN:  python train.py --checkpoint=runs/distill --seq_len=8192 --micro_batch=1 ...

Launch (from the repo root):
  CPU smoke (the 135M teacher: about a minute per step on 2 busy cores): python prepare.py --smoke=True, then
              python train.py --data_dir=data/debian_smoke --seq_len=128 \
                  --micro_batch=2 --total_batch_tokens=512 --max_steps=5 --eval_batches=2 --run_dir=runs/smoke
  1 GPU:      python train.py --checkpoint=runs/distill --run_dir=runs/stage3
  8 GPUs:     torchrun --standalone --nproc_per_node=8 train.py --checkpoint=runs/distill
              (add --parallel=fsdp to shard weights, grads and AdamW state per decoder block: FSDP2)
Resume a killed run: the same command again (--resume=auto is the default; it refuses a run dir whose
checkpoints were written with other settings), or --resume=<checkpoint .pt>.

Reads:  DATA_DIR/{train,val}_*.bin + manifest.json; the teacher dir (models/<name>/); CHECKPOINT.
Writes: RUN_DIR/config.json (resolved config, environment, parameter counts), log.txt,
        metrics.jsonl, ckpt/step_000500.pt = {model, optim, step, loader, config, rng}.
Log line:
  step 00120/02000 | loss 3.123456 | norm 0.8123 | lr 1.0e-03 | dt 812ms | tok/s 1.23M | mem 41.2GB
"""

import os
import resource
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from hybrid import checkpoint, common
from hybrid.config import config_dict
from hybrid.optim import adamw, cosine_lr, grad_accum_steps, load_optimizer, optimizer_step, set_lr
from hybrid.parallel import all_mean, describe, full_state, local_optimizer_state, no_sync, wrap
from hybrid.student import Artifact, rebuild_student

# -----------------------------------------------------------------------------
# Model
MODEL = "embedded"              # teacher spec: "embedded" | HF id | local HF dir | .gguf file
INIT = "pretrained"             # "pretrained" (MODEL's weights) | "scratch" (random init from MODEL's config)
CHECKPOINT = ""                 # "" or a distill/train checkpoint (.pt or run dir) to fine-tune; overrides MODEL
# Data
DATA_DIR = "data/debian"        # shards + manifest.json written by prepare.py
SEQ_LEN = 1024                  # tokens per row; raise it for the stage-3 long-context fine-tune
MICRO_BATCH = 8                 # rows per rank per micro-step
TOTAL_BATCH_TOKENS = 2**17      # tokens per optimizer step, all ranks; grad accumulation is derived
# Optimization
LR = 3e-4                       # peak learning rate
MIN_LR = 3e-5                   # end of the cosine decay
WARMUP_STEPS = 100              # optimizer steps of linear warmup
MAX_STEPS = 1000                # optimizer steps in the run
WEIGHT_DECAY = 0.1              # AdamW, on matrices only (not norms, biases)
GRAD_CLIP = 1.0                 # max global grad norm; 0 = off
# Evaluation, logging, checkpoints
EVAL_EVERY = 250                # optimizer steps between val losses (and one at the end)
EVAL_BATCHES = 32               # val micro-batches over all ranks (split between them); 0 = no validation
LOG_EVERY = 10                  # optimizer steps between log lines (.item() syncs only here)
SAVE_EVERY = 500                # optimizer steps between checkpoints (and one at the end)
KEEP_CHECKPOINTS = 3            # newest checkpoints kept in RUN_DIR/ckpt; 0 = all
RUN_DIR = "runs/train"          # config.json, log.txt, metrics.jsonl, ckpt/
RESUME = "auto"                 # "auto": continue RUN_DIR's run if it has one | "" : start fresh | a .pt
# System
SEED = 1337                     # same on every rank, set before building modules
COMPILE = False                 # torch.compile the model (worth it on GPU; slow to start on CPU)
PARALLEL = "ddp"                # "ddp" (whole model per rank) | "fsdp" (FSDP2: sharded per decoder block)
DTYPE = "auto"                  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
# -----------------------------------------------------------------------------
# settings that cannot change what a run computes: a checkpoint written with any other setting
# different is refused on resume (hybrid.checkpoint.resume_point)
_UNCHANGING = ("RUN_DIR", "RESUME", "LOG_EVERY", "SAVE_EVERY", "KEEP_CHECKPOINTS", "EVAL_EVERY", "COMPILE",
              "PARALLEL")  # fsdp and ddp write the same checkpoints: switching modes resumes


def build_model(source: dict | None, master: bool) -> tuple[torch.nn.Module, object, Artifact]:
    """-> (model in fp32 on CPU, tokenizer, artifact).

    `source` is a checkpoint (resume or CHECKPOINT) whose config fixes the artifact (teacher dir,
    per-layer mixer spec, untied embeddings); its weights are loaded strictly. Without one, MODEL
    and INIT decide (a plain decoder: hybrid_spec None).
    """
    from hybrid.teacher import load_teacher, resolve_teacher
    if source is not None:
        art = Artifact.from_config(source.get("config"), "checkpoint")
    else:
        # rank 0 converts/downloads the teacher once; the others find it ready after the barrier
        teacher_dir = resolve_teacher(MODEL) if master else None
        common.barrier()
        art = Artifact(teacher=teacher_dir or resolve_teacher(MODEL), hybrid_spec=None)
    model, tokenizer = load_teacher(art.teacher, dtype=torch.float32)
    if source is None and INIT == "scratch":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    model = rebuild_student(art, model)
    if source is not None:
        checkpoint.load_state_strict(model, source["model"])
    model.requires_grad_(True)  # load_teacher freezes the teacher; here every weight trains
    return model.train(), tokenizer, art


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only, not on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], LR, WEIGHT_DECAY, device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, device: torch.device, amp) -> float:
    """Mean next-token loss over this rank's val batches, averaged over ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    model.train()
    return all_mean(total / len(batches)).item()


def memory_gb(device: torch.device) -> float:
    """Peak memory: GPU allocated on CUDA, peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def main() -> None:
    from hybrid.shards import ShardLoader, check_tokenizer, val_batches
    cfg = config_dict(globals())
    rank, local_rank, world_size, device = common.init_dist()
    master = rank == 0

    # ---- settings checked before any work ----
    if INIT not in ("pretrained", "scratch"):
        raise ValueError(f"--init={INIT!r}: expected 'pretrained' or 'scratch'")
    if DTYPE not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype={DTYPE!r}: expected 'auto', 'bf16' or 'fp32'")
    if PARALLEL not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel={PARALLEL!r}: expected 'ddp' or 'fsdp'")
    if COMPILE and PARALLEL == "fsdp":
        raise ValueError("--compile=True with --parallel=fsdp is untested here; drop --compile or use --parallel=ddp")
    grad_accum = grad_accum_steps(TOTAL_BATCH_TOKENS, MICRO_BATCH, SEQ_LEN, world_size)  # ValueError if not whole
    dtype = {"auto": common.autocast_dtype(device), "bf16": torch.bfloat16, "fp32": torch.float32}[DTYPE]
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- model: fresh, fine-tuned from CHECKPOINT, or resumed ----
    common.seed_all(SEED)
    settings = {**cfg, "world_size": world_size, "grad_accum": grad_accum}
    resume_from, resume = checkpoint.resume_point(RUN_DIR, RESUME, settings, _UNCHANGING)
    if resume is not None and resume["step"] >= MAX_STEPS:
        common.print0(f"{RUN_DIR} is a finished run with these settings ({resume_from}, step {resume['step']}); "
                      "nothing to do (pass a new --run_dir to run again)")
        common.cleanup_dist()
        return
    # a resume checkpoint wins over CHECKPOINT: it already holds the teacher, spec and trained weights
    source = resume if resume is not None or not CHECKPOINT else checkpoint.load_checkpoint(CHECKPOINT)
    model, tokenizer, artifact = build_model(source, master)
    del source
    model.to(device)
    raw_model = model  # unwrapped and uncompiled: what checkpoints store (no module./_orig_mod. prefixes)
    spec = artifact.hybrid_spec
    run_config = artifact.to_config(settings)

    # ---- data ----
    loader = ShardLoader(DATA_DIR, "train", MICRO_BATCH, SEQ_LEN, rank=rank, world_size=world_size,
                         vocab_size=model.config.vocab_size)
    if tokenizer is not None:
        check_tokenizer(loader.manifest, tokenizer, DATA_DIR)
    # the same val windows for any world size: the first EVAL_BATCHES of the val split, split over ranks
    n_val = EVAL_BATCHES // world_size if EVAL_BATCHES > 0 else 0
    if EVAL_BATCHES > 0 and n_val == 0:
        raise ValueError(f"EVAL_BATCHES={EVAL_BATCHES} < world_size={world_size}: every rank needs one val "
                         f"batch; raise --eval_batches or pass --eval_batches=0")
    val = val_batches(DATA_DIR, MICRO_BATCH, SEQ_LEN, n_val, rank=rank, world_size=world_size) if n_val else []

    # ---- wrap (FSDP2 before the optimizer: it swaps the parameters for shards) and resume ----
    if PARALLEL == "fsdp":
        model = wrap(model, model, PARALLEL, device)
    optim = make_optimizer(raw_model, device)
    start_step = 0
    if resume is not None:
        load_optimizer(optim, local_optimizer_state(optim, resume["optim"]))
        loader.load_state_dict(resume["loader"])
        common.set_rng_state(resume["rng"])
        start_step = resume["step"]
        del resume
    if COMPILE:
        model = torch.compile(model)
    if PARALLEL == "ddp":
        model = wrap(model, raw_model, PARALLEL, device)

    # ---- startup report ----
    n_total = sum(p.numel() for p in raw_model.parameters())
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    env = common.env_info(device, world_size, dtype)
    logger = common.RunLogger(RUN_DIR, enabled=master)
    if master:
        checkpoint.atomic_write_json(os.path.join(RUN_DIR, "config.json"),
                                     {"config": run_config, "env": env,
                                      "params": {"trainable": n_train, "total": n_total}})
    common.print0(f"config and environment: {os.path.join(RUN_DIR, 'config.json')}")
    common.print0(f"env: {env}")
    common.print0(f"dtype: {env['dtype']} (--dtype={DTYPE}; auto = bf16 autocast on GPU, fp32 on CPU where bf16 is slow)")
    common.print0(describe(model, PARALLEL))
    common.print0(f"params: {n_train:,} trainable / {n_total:,} total | spec: {spec or 'plain ' + type(raw_model).__name__}")
    common.print0(f"batch: {TOTAL_BATCH_TOKENS:,} tokens/step = {MICRO_BATCH} rows x {SEQ_LEN} tokens x "
                  f"{world_size} ranks x {grad_accum} micro-steps | val: {len(val) * world_size} batches")
    common.print0(f"resuming {resume_from} at step {start_step}: same settings as this command" if resume_from
                  else f"starting at step {start_step}")

    # ---- training loop ----
    t_last, steps_since = time.time(), 0
    for step in range(start_step, MAX_STEPS):
        last = step == MAX_STEPS - 1
        if val and step % EVAL_EVERY == 0:
            val_loss = evaluate(raw_model, val, device, amp)
            logger.log(f"step {step:05d}/{MAX_STEPS:05d} | val_loss {val_loss:.6f}", {"step": step, "val_loss": val_loss})
            t_last = time.time()  # keep eval time out of dt and tok/s

        scale = cosine_lr(step, MAX_STEPS, WARMUP_STEPS, 1.0, MIN_LR / LR)
        set_lr(optim, scale)
        lr = LR * scale
        loss_accum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # under DDP/FSDP2, reduce gradients only on the last micro-step
            with nullcontext() if micro == grad_accum - 1 else no_sync(model):
                with amp:
                    logits = model(input_ids=x, use_cache=False).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / grad_accum
                loss.backward()
            loss_accum += loss.detach()
            del logits, loss
        norm = optimizer_step(optim, raw_model.parameters(), GRAD_CLIP)
        steps_since += 1

        if step % LOG_EVERY == 0 or last:
            loss_val = all_mean(loss_accum).item()  # sync point: only on log steps
            dt = (time.time() - t_last) / steps_since
            tok_s = TOTAL_BATCH_TOKENS / dt
            mem = memory_gb(device)
            logger.log(f"step {step:05d}/{MAX_STEPS:05d} | loss {loss_val:.6f} | norm {norm.item():.4f} | lr {lr:.1e}"
                       f" | dt {dt * 1000:.0f}ms | tok/s {common.format_tokens(tok_s)} | mem {mem:.1f}GB",
                       {"step": step, "loss": loss_val, "norm": norm.item(), "lr": lr, "dt_ms": dt * 1000,
                        "tok_per_s": tok_s, "mem_gb": mem})
            t_last, steps_since = time.time(), 0

        if (step + 1) % SAVE_EVERY == 0 or last:
            model_state, optim_state = full_state(raw_model, optim)  # whole tensors under fsdp too (all ranks gather)
            if master:
                state = {"model": model_state, "optim": optim_state, "step": step + 1,
                         "loader": loader.state_dict(), "config": run_config, "rng": common.rng_state()}
                path = checkpoint.save_checkpoint(RUN_DIR, step + 1, state, keep=KEEP_CHECKPOINTS)
                common.print0(f"saved {path}")
            common.barrier()  # nobody reads a checkpoint before rank 0 has renamed it into place
            t_last = time.time()

    if val and start_step < MAX_STEPS:
        val_loss = evaluate(raw_model, val, device, amp)
        logger.log(f"step {MAX_STEPS:05d}/{MAX_STEPS:05d} | val_loss {val_loss:.6f}",
                   {"step": MAX_STEPS, "val_loss": val_loss})
    common.cleanup_dist()


if __name__ == "__main__":
    common.run_script(globals(), main, lambda: common.interrupt_message(
        RUN_DIR, "run the same command again (--resume=auto, the default, continues from there)"))
