"""export.py and the exported HF model: round trip, cached decoding, left padding, loading without the repo."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import export
from hybrid.checkpoint import atomic_torch_save
from hybrid.student import load_export
from hybrid.surgery import build_student
from hybrid.teacher import load_teacher
from tests.conftest import make_teacher_dir, tiny_tokenizer

SPEC = ["softmax", "gdn", "gla", "rwkv7", "swa"]  # softmax + every mixer, one layer each
OPTIONS = {"window": 4}  # swa window shorter than the prompts, so the window is exercised while decoding


def write_checkpoint(path: str, teacher_dir: str, spec: list[str], options: dict | None = None) -> str:
    """A student checkpoint without training: the teacher-initialised mixers, with the gates nudged
    off their init so a wrong weight mapping cannot hide behind default values."""
    teacher, _ = load_teacher(teacher_dir)
    torch.manual_seed(1)
    student = build_student(teacher, spec, **(options or {}))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".self_attn." in name:
                p.add_(0.02 * torch.randn_like(p))
    config = {"teacher": teacher_dir, "hybrid_spec": spec, "untied": False, "mixer_options": options or {}}
    atomic_torch_save({"model": student.state_dict(), "config": config, "step": 0}, path)
    return path


def run_export(monkeypatch, checkpoint: str, out_dir: str, **kw) -> dict:
    for name, value in {"CHECKPOINT": checkpoint, "OUT_DIR": out_dir, "DTYPE": "float32", "TEACHER": "",
                        "GENERATE_TOKENS": 6, **kw}.items():
        assert hasattr(export, name), name
        monkeypatch.setattr(export, name, value)
    return export.main()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teacher = make_teacher_dir(str(root / "teacher"), layers=len(SPEC), seed=3)
    ckpt = write_checkpoint(str(root / "student.pt"), teacher, SPEC, OPTIONS)
    mp = pytest.MonkeyPatch()
    result = run_export(mp, ckpt, str(root / "out"))
    mp.undo()
    model, tokenizer = load_export(str(root / "out"))
    return {"root": root, "teacher": teacher, "ckpt": ckpt, "out": str(root / "out"), "result": result,
            "model": model, "tokenizer": tokenizer}


def test_export_folder_and_round_trip(exported):
    out = exported["out"]
    files = set(os.listdir(out))
    shipped = {f for f in os.listdir(os.path.join("hybrid", "model")) if f.endswith(".py") and f != "__init__.py"}
    assert shipped == {"modeling_hybrid.py", "spec.py", "mixers.py", "mixer_base.py", "op_common.py", "op_gdn.py",
                       "op_gdn_step.py", "op_gdn_prefill.py", "op_gdn_train.py", "op_gla.py", "op_rwkv7.py", "op_decode.py", "op_norm_linear.py",
                       "engine.py", "engine_layer.py", "mixer_swa.py",
                       "packed.py"}  # hybrid/model/ is exactly what an export ships
    assert shipped | {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files, files
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "hybrid" and cfg["teacher_model_type"] == "llama"
    assert cfg["hybrid_spec"] == SPEC and cfg["hybrid_options"] == OPTIONS and "layer_types" not in cfg
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid.HybridForCausalLM"
    for name in shipped:  # copied verbatim: one source of truth
        assert open(os.path.join(out, name)).read() == open(os.path.join("hybrid", "model", name)).read()
    assert exported["result"]["max_abs_diff"] < 1e-4
    model = exported["model"]
    names = [getattr(layer.self_attn, "mixer_name", "softmax") for layer in model.model.layers]
    assert names == SPEC
    # the export holds the checkpoint's weights, not a fresh init
    state = torch.load(exported["ckpt"], weights_only=False)["model"]
    own = model.state_dict()
    for key in ("model.layers.1.self_attn.A_log", "model.layers.3.self_attn.w0", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(own[key], state[key])


def test_bf16_export_matches_rounded_student(exported, tmp_path, monkeypatch):
    result = run_export(monkeypatch, exported["ckpt"], str(tmp_path / "bf16"), DTYPE="bfloat16", GENERATE_TOKENS=0)
    assert result["max_abs_diff"] < 1e-4
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.2.self_attn.gk_up.weight").dtype == torch.bfloat16


@torch.no_grad()
def test_cached_decoding_equals_uncached_forward(exported):
    model = exported["model"]
    torch.manual_seed(0)
    x = torch.randint(1, 256, (2, 13))
    full = model(x, use_cache=False).logits
    cache = model.new_cache()
    steps = [model(x[:, :8], past_key_values=cache, use_cache=True).logits]  # prefill through the chunked path
    for t in range(8, 13):  # then one token at a time through the recurrent path
        steps.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert set(cache.mixer_states) == {1, 2, 3, 4}
    assert cache.mixer_states[4]["k"].shape[1] == OPTIONS["window"] - 1  # swa keeps only its window
    assert cache.get_seq_length() == 13


@torch.no_grad()
def test_generate_greedy_equals_uncached_argmax(exported):
    model = exported["model"]
    x = torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=7, do_sample=False)
    want = export.greedy_uncached(model, x, 7)[:, :got.shape[1]]
    assert torch.equal(got, want), (got, want)


@torch.no_grad()
def test_left_padded_batch_generation_equals_per_sample(exported):
    model = exported["model"]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (11, 6, 3)]
    pad = 255
    T = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((T - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, **kw)[:, T:]
    for i, p in enumerate(prompts):
        single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[:, len(p):]
        assert torch.equal(batch[i], single[0]), (i, batch[i], single[0])
    # and the logits of the padded prefill equal the unpadded ones at the real tokens
    padded = model(ids, attention_mask=mask, use_cache=False).logits
    for i, p in enumerate(prompts):
        torch.testing.assert_close(padded[i, T - len(p):], model(p[None], use_cache=False).logits[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sampling_and_beams_run_with_the_hybrid_cache(exported):
    """Sampling expands the batch (num_return_sequences), beams reorder it: both go through the
    HybridCache's batch_repeat_interleave / reorder_cache on the mixer states."""
    model = exported["model"]
    x = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    sampled = model.generate(x, do_sample=True, top_k=1, num_return_sequences=2, **kw)  # top_k=1: greedy
    greedy = model.generate(x, do_sample=False, **kw)
    assert torch.equal(sampled, greedy.repeat_interleave(2, dim=0))
    kw.update(max_new_tokens=5, num_beams=3, do_sample=False)  # beams get reordered: mixer states must follow
    beams = model.generate(x, **kw)
    assert beams.shape == (2, 10) and torch.equal(beams[:, :5], x)
    assert torch.equal(beams, model.generate(x, use_cache=False, **kw))


def test_loads_without_the_repo(exported, tmp_path):
    """A copy of the folder, a fresh interpreter in it, no repo on sys.path: same logits."""
    copy_dir = tmp_path / "copy"
    shutil.copytree(exported["out"], copy_dir)
    x = torch.arange(1, 17)[None]
    want = exported["model"](x, use_cache=False).logits
    script = (
        "import importlib.util, sys, torch\n"
        "assert importlib.util.find_spec('hybrid') is None and 'export' not in sys.modules, sys.path\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('.', trust_remote_code=True, dtype=torch.float32).eval()\n"
        "assert not any(n == 'hybrid' or n.startswith('hybrid.') for n in sys.modules), 'repo package imported'\n"
        "x = torch.arange(1, 17)[None]\n"
        "with torch.no_grad():\n"
        "    torch.save({'logits': m(x, use_cache=False).logits,\n"
        "                'gen': m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False),\n"
        "                'fast': m.fast_generate(x, max_new_tokens=4)},\n"
        "               'out.pt')\n"
        "print(type(m).__module__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=copy_dir, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers_modules" in proc.stdout
    got = torch.load(copy_dir / "out.pt")
    torch.testing.assert_close(got["logits"], want, atol=1e-5, rtol=1e-5)
    ref = exported["model"].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert torch.equal(got["gen"], ref)
    assert torch.equal(got["fast"], ref)  # the static engine ships in the export too


def test_all_linear_qwen3_teacher(tmp_path, monkeypatch):
    """A Qwen3 teacher (q/k RMSNorm, no softmax layer left): the cache counts tokens itself."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
                      eos_token_id=0, tie_word_embeddings=False)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "qwen3")
    tiny_tokenizer().save_pretrained(tmp_path / "qwen3")
    ckpt = write_checkpoint(str(tmp_path / "q.pt"), str(tmp_path / "qwen3"), ["rwkv7", "gdn"])
    result = run_export(monkeypatch, ckpt, str(tmp_path / "out"))
    assert result["max_abs_diff"] < 1e-4
    model, _ = load_export(str(tmp_path / "out"))
    x = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = model.new_cache()
        steps = [model(x[:, :6], past_key_values=cache).logits]
        steps += [model(x[:, t:t + 1], past_key_values=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 10
    # generate() must not auto-compile (CUDA graphs) around mixer states kept in a plain dict
    assert not cache.is_compileable and all(layer.is_compileable for layer in cache.layers)


def test_mistaken_loads_give_clear_errors(exported, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_export(monkeypatch, str(tmp_path / "nope.pt"), str(tmp_path / "o1"))
    bad = str(tmp_path / "bad.pt")
    atomic_torch_save({"model": {}, "config": {"teacher": exported["teacher"]}}, bad)
    with pytest.raises(ValueError, match="hybrid_spec"):
        run_export(monkeypatch, bad, str(tmp_path / "o2"))
    moved = str(tmp_path / "moved.pt")
    state = torch.load(exported["ckpt"], weights_only=False)
    state["config"]["teacher"] = str(tmp_path / "gone")
    atomic_torch_save(state, moved)
    with pytest.raises(FileNotFoundError, match="--teacher="):
        run_export(monkeypatch, moved, str(tmp_path / "o3"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_export(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    shutil.copytree(exported["out"], broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_export(str(broken))
    cfg = json.load(open(broken / "config.json"))
    from hybrid.model.modeling_hybrid import HybridConfig, HybridForCausalLM
    with pytest.raises(ValueError, match="hybrid_spec has 2 names"):
        HybridForCausalLM(HybridConfig(**{**cfg, "hybrid_spec": ["gdn", "softmax"]}))
    with pytest.raises(ValueError, match="unknown mixer"):
        HybridForCausalLM(HybridConfig(**{**cfg, "hybrid_spec": ["mamba"] * len(SPEC)}))
    with pytest.raises(ValueError, match="model.new_cache"):
        from transformers import DynamicCache
        exported["model"](torch.ones(1, 3, dtype=torch.long), past_key_values=DynamicCache())


def test_export_files_demand_no_optional_packages(exported):
    """transformers refuses a Hub model whose files import packages the user lacks; fla must stay optional."""
    from transformers.dynamic_module_utils import get_imports
    out = exported["out"]
    files = [f for f in os.listdir(out) if f.endswith(".py")]
    assert "op_gdn.py" in files and "mixers.py" in files
    for f in files:
        assert set(get_imports(os.path.join(out, f))) <= {"torch", "transformers", "math", "os", "warnings", "inspect",
                                                          "dataclasses"}, f
