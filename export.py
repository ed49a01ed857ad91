"""Export a distilled student as a Hugging Face folder that loads anywhere with trust_remote_code.

Reads a distill/train checkpoint (a .pt file, or a run dir: its ckpt/final.pt, else its latest
checkpoint) whose config names the teacher folder and the per-layer hybrid spec, rebuilds the
student, and writes OUT_DIR/ with
  config.json            the teacher's config + hybrid_spec, hybrid_options, teacher_model_type,
                         model_type "hybrid" and auto_map (AutoConfig, AutoModelForCausalLM)
  model.safetensors      the student's weights in DTYPE, under the teacher's own names
  generation_config.json, tokenizer files (the teacher's)
  tokenizer/             the same tokenizer files alone: AutoTokenizer.from_pretrained(OUT_DIR + "/tokenizer")
                         loads it as the stock tokenizer it is, without trust_remote_code
  modeling_hybrid.py     the HF wrapper + HybridCache (hybrid/model/modeling_hybrid.py), and, copied
  mixers.py ...          verbatim, every file it imports relatively (mixers.py, mixer_base.py,
  op_*.py                op_gdn.py, ...): one source of truth for every mixer
then reloads the folder with AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
and checks its logits on a fixed prompt against the in-memory student (assert_close), and that
cached greedy decoding equals the uncached forward.

Launch (CPU is fine, it is one forward):
  python export.py --checkpoint=runs/distill --out_dir=out/hybrid
  python export.py --checkpoint=runs/distill/ckpt/step_000500.pt --dtype=float32
Use the export:
  AutoModelForCausalLM.from_pretrained("out/hybrid", trust_remote_code=True)
  lm_eval --model hf --model_args pretrained=out/hybrid,trust_remote_code=True ...  (docs/export.md)
Log line: check: logits max |diff| 2.4e-07 over 24 tokens (float32 reload vs student) | greedy 8 tokens cached == uncached
"""

import copy
import os
import shutil
import time

import torch

from hybrid.checkpoint import load_state_strict
from hybrid.common import run_script
from hybrid.student import EXPORT_TOKENIZER_DIR, load_export, load_student
from hybrid.surgery import decoder_layers, model_spec

# -----------------------------------------------------------------------------
# What to export
CHECKPOINT = "runs/distill"     # a .pt checkpoint, or a run dir (ckpt/final.pt, else the latest ckpt)
OUT_DIR = "out/hybrid"          # the export folder (replaced as a whole)
DTYPE = "bfloat16"              # weights in model.safetensors: "bfloat16" | "float32"
TEACHER = ""                    # "" = the teacher folder recorded in the checkpoint; else an HF folder of it
MODELS_DIR = "models"           # where teacher specs were normalised (teacher.py)
# Checks after writing
PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is"  # fixed prompt for the logits check
ATOL = 1e-4                     # assert_close tolerance on logits (float32 reload vs the DTYPE-rounded student)
GENERATE_TOKENS = 8             # greedy tokens whose cached decoding must equal the uncached forward (0 = skip)
# -----------------------------------------------------------------------------

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hybrid", "model", "modeling_hybrid.py")
_AUTO_MAP = {"AutoConfig": "modeling_hybrid.HybridConfig", "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM"}


def print_weight_map(student) -> None:
    """One line per decoder layer: its mixer and the tensors it exports (same names as the student)."""
    state = student.state_dict()
    for i, layer in enumerate(decoder_layers(student)):
        name = getattr(layer.self_attn, "mixer_name", "softmax")
        keys = [k for k in state if k.startswith(f"model.layers.{i}.self_attn.")]
        short = sorted({k.split(".self_attn.")[1].rsplit(".", 1)[0] for k in keys})
        n = sum(state[k].numel() for k in keys)
        print(f"layer {i:2d} {name:7s} model.layers.{i}.self_attn.{{{','.join(short)}}} "
              f"<- student (same names): {len(keys)} tensors, {n / 1e6:.3f}M")
    rest = [k for k in state if ".self_attn." not in k]
    tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    print(f"rest: {len(rest)} tensors (embeddings, MLPs, norms, lm_head{' tied to embeddings' if tied else ''}) "
          f"<- student (same names)")


def hybrid_model(student, spec: list[str], options: dict):
    """The HF HybridForCausalLM holding the student's weights (float32)."""
    from hybrid.model.modeling_hybrid import HybridConfig, HybridForCausalLM
    config = HybridConfig.from_teacher(student.config, spec, options)
    config.auto_map = dict(_AUTO_MAP)
    config.architectures = ["HybridForCausalLM"]
    model = HybridForCausalLM(config).eval()
    load_state_strict(model, student.state_dict(), "export model")
    model.generation_config = copy.deepcopy(student.generation_config)
    return model


def code_files() -> list[str]:
    """modeling_hybrid.py and every file it imports relatively, found as transformers' loader finds them."""
    from transformers.dynamic_module_utils import get_relative_import_files
    return [_MODELING_FILE] + sorted(get_relative_import_files(_MODELING_FILE))


def write_export(model, tokenizer, out_dir: str, dtype: torch.dtype) -> None:
    """Write the folder as out_dir.tmp, then swap it into place (a crash never leaves half a folder)."""
    tmp, old = out_dir.rstrip("/") + ".tmp", out_dir.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model = copy.deepcopy(model).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tokenizer.save_pretrained(os.path.join(tmp, EXPORT_TOKENIZER_DIR))
    for path in code_files():
        shutil.copy(path, os.path.join(tmp, os.path.basename(path)))
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def prompt_ids(tokenizer, prompt: str, vocab_size: int) -> torch.Tensor:
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(ids) < 4:  # a toy tokenizer may map the prompt to almost nothing
        ids = list(range(1, min(vocab_size, 25)))
    return torch.tensor([ids])


@torch.no_grad()
def greedy_uncached(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference for cached decoding: re-run the whole sequence for every new token."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@torch.no_grad()
def verify(out_dir: str, student, dtype: torch.dtype, ids: torch.Tensor, atol: float, n_generate: int) -> dict:
    """Reload the folder and compare with the student whose weights went through the same dtype."""
    reloaded, _ = load_export(out_dir, dtype=torch.float32)
    reference = copy.deepcopy(student).eval()
    for p in reference.parameters():  # parameters only: .to(dtype) would also round RoPE's inv_freq buffer
        p.data = p.data.to(dtype).float()
    want, got = reference(ids, use_cache=False).logits, reloaded(ids, use_cache=False).logits
    diff = (want - got).abs().max().item()
    torch.testing.assert_close(got, want, atol=atol, rtol=atol,
                               msg=lambda m: f"{out_dir}: reloaded logits differ from the student's: {m}")
    result = {"max_abs_diff": diff, "n_tokens": ids.shape[1]}
    line = f"check: logits max |diff| {diff:.1e} over {ids.shape[1]} tokens (float32 reload vs student)"
    if n_generate:
        cached = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_generate, do_sample=False)
        uncached = greedy_uncached(reloaded, ids, n_generate)[:, :cached.shape[1]]  # generate stops at EOS
        if not torch.equal(cached, uncached):
            raise AssertionError(f"{out_dir}: cached greedy decoding {cached[0, ids.shape[1]:].tolist()} differs from "
                                 f"the uncached forward {uncached[0, ids.shape[1]:].tolist()}")
        result["generated"] = cached[0, ids.shape[1]:].tolist()
        line += f" | greedy {len(result['generated'])} tokens cached == uncached"
    print(line)
    return result


def main() -> dict:
    t0 = time.time()
    if DTYPE not in _DTYPES:
        raise ValueError(f"--dtype={DTYPE}: expected one of {sorted(_DTYPES)}")
    print(f"export: {CHECKPOINT} -> {OUT_DIR} ({DTYPE} weights)")
    student, tokenizer, art = load_student(CHECKPOINT, teacher=TEACHER, models_dir=MODELS_DIR)
    spec, options = model_spec(student), art.mixer_options
    print(f"student: {','.join(spec)} | {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params"
          f"{' | options ' + str(options) if options else ''}")
    print_weight_map(student)
    model = hybrid_model(student, spec, options)
    write_export(model, tokenizer, OUT_DIR, _DTYPES[DTYPE])
    files = sorted(os.listdir(OUT_DIR))
    print(f"wrote {OUT_DIR}/ ({', '.join(files)})")
    result = verify(OUT_DIR, student, _DTYPES[DTYPE], prompt_ids(tokenizer, PROMPT, student.config.vocab_size),
                    ATOL, GENERATE_TOKENS)
    print(f"done in {time.time() - t0:.1f}s; load with AutoModelForCausalLM.from_pretrained({OUT_DIR!r}, "
          f"trust_remote_code=True) and AutoTokenizer.from_pretrained({os.path.join(OUT_DIR, EXPORT_TOKENIZER_DIR)!r})")
    return {"out_dir": OUT_DIR, "spec": spec, "files": files, **result}


if __name__ == "__main__":
    run_script(globals(), main)
