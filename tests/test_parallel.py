"""hybrid/parallel.py on one process (the 2-process FSDP2 runs are in test_train.py and
test_distill.py) and the computed memory table against a real parameter count and the one
measured peak."""

import pytest
import torch

from hybrid.parallel import (decoder_params, full_state, gathered, local_optimizer_state, memory_table, no_sync,
                             stage2_memory_gb, wrap)


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_params_counts_a_real_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    assert decoder_params(3, 64, 96, 100, 4, 2, tied) == sum(p.numel() for p in model.parameters())


def test_memory_estimate_parts():
    shape = (30, 576, 1536, 49152, 9, 3, True)  # SmolLM2-135M
    r = stage2_memory_gb(*shape, tokens=16 * 2048)
    assert r["total"] == pytest.approx(57.7, abs=2.0)  # the measured H100 peak the activation factor came from
    assert r["student"] == pytest.approx(16 * r["params_B"]) and r["teacher"] == pytest.approx(2 * r["params_B"])
    f = stage2_memory_gb(*shape, tokens=16 * 2048, world_size=8, mode="fsdp", shard_teacher=True)
    assert f["student"] < r["student"] / 8 + 0.1 and f["teacher"] == pytest.approx(r["teacher"] / 8)
    assert f["activations"] == r["activations"] and f["logits"] == r["logits"]
    big = stage2_memory_gb(32, 4096, 14336, 128256, 32, 8, False, tokens=512)  # Llama-3.1-8B, one row
    assert big["params_B"] == pytest.approx(8.03, abs=0.01) and big["total"] > 141  # DDP never fits
    assert "| Llama-3.1-8B | - | - |" in memory_table()


def test_one_process_is_plain_training():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert wrap(model, model, "fsdp", torch.device("cpu")) is model
    with no_sync(model), gathered(model):
        pass
    state, optim = full_state(model, opt)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert optim["state"].keys() == opt.state_dict()["state"].keys()
    assert local_optimizer_state(opt, optim) is optim
    with pytest.raises(ValueError, match="--parallel='zero3'"):
        wrap(model, model, "zero3", torch.device("cpu"))


@pytest.mark.parametrize("settings, message", [
    (dict(STAGE=1, PARALLEL="fsdp"), "stage 1 trains mixers only"),
    (dict(STAGE=2, SHARD_TEACHER=True), "needs --parallel=fsdp"),
    (dict(STAGE=2, PARALLEL="zero3"), "parallel"),
])
def test_distill_refuses_what_fsdp_does_not_cover(settings, message, monkeypatch):
    import distill
    for name, value in {"STAGE": 2, "PARALLEL": "ddp", "SHARD_TEACHER": False, "COMPILE": False, "SPEC": "gdn",
                        "INIT": "", **settings}.items():
        monkeypatch.setattr(distill, name, value)
    with pytest.raises(ValueError, match=message):
        distill.check_settings()


def test_processes_share_gpus_only_where_allowed():
    from hybrid.common import gpu_for_rank
    assert gpu_for_rank(1, 2, 2, share_gpus=False) == (1, "nccl")  # one GPU per process
    assert gpu_for_rank(1, 2, 8, share_gpus=True) == (1, "nccl")   # allowed, not needed
    # two processes on one GPU: both on GPU 0, and gloo (nccl refuses two ranks on one GPU)
    assert [gpu_for_rank(r, 2, 1, share_gpus=True) for r in range(2)] == [(0, "gloo"), (0, "gloo")]
    assert [gpu_for_rank(r, 4, 2, share_gpus=True)[0] for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="--nproc_per_node=1"):
        gpu_for_rank(1, 2, 1, share_gpus=False)
