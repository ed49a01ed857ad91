"""Student mixers (hybrid/mixers.py): teacher init, GQA head mapping, stateful decode, padding.

Tiny random teachers of each supported family, float64 so that equalities are tight.
"""

import types

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from hybrid.model.mixer_base import pad_mask_from_attention
from hybrid.model.mixers import MIXERS, build_mixer

LINEAR = ["gdn", "gla", "rwkv7"]
ALL = LINEAR + ["swa"]
FAMILIES = ["llama_gqa", "llama3_mha", "qwen2_bias", "qwen3_qknorm", "mistral_mqa"]
D_MODEL, VOCAB = 64, 97


def tiny_teacher(family: str, n_layers: int = 2, dtype=torch.float64, attn_impl: str = "sdpa"):
    """A random tiny HF causal LM of the given family, eval mode, frozen."""
    torch.manual_seed(0)
    common = dict(hidden_size=D_MODEL, intermediate_size=96, num_hidden_layers=n_layers, num_attention_heads=4,
                  vocab_size=VOCAB, max_position_embeddings=128)
    if family == "llama_gqa":  # GQA, tied embeddings, linear rope scaling
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0}))
    elif family == "llama3_mha":  # MHA, untied, llama3 rope scaling
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}))
    elif family == "qwen2_bias":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2))
    elif family == "qwen3_qknorm":  # q/k RMSNorm, head_dim 24 != 64 / 4
        model = Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=24))
    elif family == "mistral_mqa":  # one kv head
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=1, sliding_window=None))
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn_impl
    with torch.no_grad():  # random norms/biases, so that carrying them over is actually tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval().requires_grad_(False)


def rope(teacher, positions: torch.Tensor):
    """(cos, sin) for positions (B, T), as the teacher's decoder hands them to self_attn."""
    dummy = torch.zeros(1, dtype=next(teacher.parameters()).dtype)
    return teacher.model.rotary_emb(dummy, positions)


def make_mixer(name: str, family: str = "llama_gqa", layer: int = 1, seed: int = 1, perturb: bool = True, **opts):
    teacher = tiny_teacher(family)
    torch.manual_seed(seed)
    mixer = build_mixer(name, teacher.model.layers[layer].self_attn, teacher.config, layer, **opts)
    if perturb:  # move off the special init values (identity conv, zero LoRAs) so every path matters
        with torch.no_grad():
            for p in mixer.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return teacher, mixer


def slice_pe(pe, a: int, b: int):
    return tuple(t[:, a:b] for t in pe)


def states_close(s1: dict, s2: dict, atol: float = 1e-9) -> None:
    assert s1.keys() == s2.keys()
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], atol=atol, rtol=0, msg=f"state {key}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ALL)
def test_forward_and_grads_reach_new_params(name, family):
    teacher, mixer = make_mixer(name, family, perturb=False)
    B, T = 2, 9
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    y, extra = mixer(x, position_embeddings=rope(teacher, torch.arange(T).expand(B, T)))
    assert y.shape == (B, T, D_MODEL) and extra is None and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    # RADLADS' zero-init LoRAs (w1, a1 = 0) give their second factors no gradient at step 0
    zero_at_init = {"w2", "a2"} if name == "rwkv7" else set()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname not in zero_at_init:
            assert p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3_qknorm"])
@pytest.mark.parametrize("name", ALL)
def test_decode_and_split_prefill_match_full_forward(name, family):
    opts = {"window": 4} if name == "swa" else {}
    teacher, mixer = make_mixer(name, family, **opts)
    B, T, T1 = 2, 11, 4
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    pe = rope(teacher, torch.arange(T).expand(B, T))
    with torch.no_grad():
        y_full, s_full = mixer.mix(x, pe)
        ys, state = [], None
        y, state = mixer.mix(x[:, :T1], slice_pe(pe, 0, T1))
        ys.append(y)
        for t in range(T1, T):  # one token at a time with the state
            y, state = mixer.mix(x[:, t:t + 1], slice_pe(pe, t, t + 1), state)
            ys.append(y)
        torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-9, rtol=0)
        states_close(state, s_full)
        y_a, s_a = mixer.mix(x[:, :6], slice_pe(pe, 0, 6))
        y_b, s_b = mixer.mix(x[:, 6:], slice_pe(pe, 6, T), s_a)
        torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_full, atol=1e-9, rtol=0)
        states_close(s_b, s_full)


@pytest.mark.parametrize("name", LINEAR)
def test_impl_override_recurrent_equals_chunked(name):
    teacher, mixer = make_mixer(name)
    x = torch.randn(2, 70, D_MODEL, dtype=torch.float64)  # more than one 64-token chunk
    pe = rope(teacher, torch.arange(70).expand(2, 70))
    with torch.no_grad():
        mixer.impl = "recurrent"
        y_rec, s_rec = mixer.mix(x, pe)
        mixer.impl = "chunked"
        y_chk, s_chk = mixer.mix(x, pe)
    torch.testing.assert_close(y_chk, y_rec, atol=1e-9, rtol=0)
    states_close(s_chk, s_rec)


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias"])
@pytest.mark.parametrize("name", ALL)
def test_left_padding_matches_unpadded(name, family):
    opts = {"window": 5} if name == "swa" else {}
    teacher, mixer = make_mixer(name, family, **opts)
    T, P = 8, 3
    x0, x1 = torch.randn(T, D_MODEL, dtype=torch.float64), torch.randn(T + P, D_MODEL, dtype=torch.float64)
    z = torch.randn(2, 1, D_MODEL, dtype=torch.float64)  # one more token after the prompt
    x_pad = torch.stack([torch.cat([100 * torch.randn(P, D_MODEL, dtype=torch.float64), x0]), x1])
    pad_mask = torch.ones(2, T + P, dtype=torch.bool)
    pad_mask[0, :P] = False
    pos = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)  # HF generate's position ids
    with torch.no_grad():
        y_pad, s_pad = mixer.mix(x_pad, rope(teacher, pos), None, pad_mask)
        y_next, _ = mixer.mix(z, rope(teacher, pos[:, -1:] + 1), s_pad)
        for row, xr, n in ((0, x0, T), (1, x1, T + P)):
            y_ref, s_ref = mixer.mix(xr[None], rope(teacher, torch.arange(n)[None]))
            torch.testing.assert_close(y_pad[row, -n:], y_ref[0], atol=1e-9, rtol=0)
            y_next_ref, _ = mixer.mix(z[row:row + 1], rope(teacher, torch.tensor([[n]])), s_ref)
            torch.testing.assert_close(y_next[row], y_next_ref[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_gqa_each_head_reads_its_own_kv_head(name):
    teacher = tiny_teacher("llama_gqa")  # 4 q heads, 2 kv heads: q heads 2, 3 read kv head 1
    attn = teacher.model.layers[0].self_attn
    D = attn.head_dim
    torch.manual_seed(3)
    mixer_a = build_mixer(name, attn, teacher.config, 0)
    assert mixer_a.k_proj.out_features == 2 * D and mixer_a.v_proj.out_features == 2 * D  # kept narrow
    with torch.no_grad():  # change only teacher kv head 1
        attn.k_proj.weight[D:2 * D] += torch.randn(D, D_MODEL, dtype=torch.float64)
        attn.v_proj.weight[D:2 * D] += torch.randn(D, D_MODEL, dtype=torch.float64)
    torch.manual_seed(3)
    mixer_b = build_mixer(name, attn, teacher.config, 0)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    pe = rope(teacher, torch.arange(7).expand(2, 7))
    heads = []
    for mixer in (mixer_a, mixer_b):  # per-head outputs = the input of o_proj
        hook = mixer.o_proj.register_forward_pre_hook(lambda m, args: heads.append(args[0].view(2, 7, 4, D)))
        with torch.no_grad():
            mixer.mix(x, pe)
        hook.remove()
    changed = [not torch.allclose(heads[0][:, :, h], heads[1][:, :, h], atol=1e-12, rtol=0) for h in range(4)]
    assert changed == [False, False, True, True]


@pytest.mark.parametrize("family", ["qwen2_bias", "qwen3_qknorm", "llama_gqa"])
@pytest.mark.parametrize("name", ALL)
def test_projections_carry_biases_and_qk_norms(name, family):
    teacher, mixer = make_mixer(name, family, perturb=False)
    attn = teacher.model.layers[1].self_attn
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    shape = (2, 5, -1, attn.head_dim)
    q_t, k_t, v_t = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):
        q_t, k_t = attn.q_norm(q_t), attn.k_norm(k_t)
    assert (mixer.q_norm is not None) == hasattr(attn, "q_norm")
    assert (mixer.q_proj.bias is not None) == (attn.q_proj.bias is not None)
    with torch.no_grad():
        q, k, v = mixer.project(x)
    assert torch.equal(q, q_t) and torch.equal(k, k_t) and torch.equal(v, v_t)


@pytest.mark.parametrize("family", ["qwen2_bias", "qwen3_qknorm"])
def test_packed_projection_equals_separate_linears(family):
    """project(x, *extra): q/k/v and the extra projections as one matmul on concatenated weights (q/k/v
    biases, zero ones for the extras) == each nn.Linear alone, values and weight/bias/input grads."""
    _, mixer = make_mixer("gdn", family)
    extra = (mixer.a_proj, mixer.b_proj, mixer.g_proj)
    assert all(type(lin) is torch.nn.Linear for lin in (mixer.q_proj, mixer.k_proj, mixer.v_proj, *extra))  # packable
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for packed in (True, False):
        mixer.zero_grad()
        x.grad = None
        if packed:
            got = mixer.project(x, *extra)
        else:  # the reference: project() alone, then each extra linear by its own forward
            got = (*mixer.project(x), *(lin(x) for lin in extra))
        sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in got).backward()
        outs.append(got)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in mixer.parameters() if p.grad is not None])
    assert len(outs[0]) == 6 and [t.shape for t in outs[0]] == [t.shape for t in outs[1]]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(grads[0]) == len(grads[1]) > 6
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_swa_with_a_wide_window_is_the_teacher_attention(family):
    teacher, mixer = make_mixer("swa", family, perturb=False, window=64)
    attn = teacher.model.layers[1].self_attn
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    pe = rope(teacher, torch.arange(12).expand(2, 12))
    with torch.no_grad():
        y_teacher, _ = attn(x, position_embeddings=pe, attention_mask=None)
        y, _ = mixer(x, position_embeddings=pe)
    torch.testing.assert_close(y, y_teacher, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_hf_forward_reads_and_writes_cache_mixer_states(name):
    teacher, mixer = make_mixer(name, "qwen3_qknorm")
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    pe = rope(teacher, torch.arange(9)[None])
    cache = types.SimpleNamespace(mixer_states={})
    with torch.no_grad():
        y_full, _ = mixer(x, position_embeddings=pe)
        y1, _ = mixer(x[:, :5], position_embeddings=slice_pe(pe, 0, 5), past_key_values=cache)
        assert set(cache.mixer_states) == {mixer.layer_idx}
        y2, _ = mixer(x[:, 5:], position_embeddings=slice_pe(pe, 5, 9), past_key_values=cache)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-9, rtol=0)


def test_pad_mask_from_hf_masks():
    B, T = 2, 4
    mask2d = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    want = mask2d.bool()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bool4d = (causal[None] & want[:, None, :])[:, None]  # (B, 1, T, T), sdpa style
    float4d = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~bool4d, torch.finfo(torch.float64).min)
    assert torch.equal(pad_mask_from_attention(mask2d, B, T), want)
    assert torch.equal(pad_mask_from_attention(bool4d, B, T), want)
    assert torch.equal(pad_mask_from_attention(float4d, B, T), want)
    assert torch.equal(pad_mask_from_attention(causal[None, None].expand(1, 1, T, T), B, T), torch.ones(B, T, dtype=torch.bool))
    assert pad_mask_from_attention(None, B, T) is None


def test_bad_inputs_give_clear_errors():
    teacher = tiny_teacher("llama_gqa")
    attn = teacher.model.layers[0].self_attn
    with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
        build_mixer("mamba", attn, teacher.config, 0)
    with pytest.raises(ValueError, match="q_proj"):
        build_mixer("gdn", torch.nn.Linear(4, 4), teacher.config, 0)
    _, mixer = make_mixer("rwkv7")
    with pytest.raises(ValueError, match="position_embeddings"):
        mixer.mix(torch.randn(1, 3, D_MODEL, dtype=torch.float64))
    assert set(MIXERS) == {"gdn", "gla", "rwkv7", "swa"}


@pytest.mark.parametrize("name", ALL)
def test_bf16_teacher_gives_bf16_mixer(name):
    teacher = tiny_teacher("qwen3_qknorm", dtype=torch.bfloat16)
    mixer = build_mixer(name, teacher.model.layers[0].self_attn, teacher.config, 0)
    assert {p.dtype for p in mixer.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 6, D_MODEL, dtype=torch.bfloat16)
    y, state = mixer.mix(x, rope(teacher, torch.arange(6).expand(2, 6)))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    if name != "swa":
        assert state["S"].dtype == torch.float32  # recurrent states stay fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_causal_conv_cuda_matches_cpu():
    from hybrid.model.mixer_base import causal_conv
    x, w, st = torch.randn(2, 37, 24), torch.randn(24, 4), torch.randn(2, 3, 24)
    y_cpu, s_cpu = causal_conv(x, w, st)
    y_gpu, s_gpu = causal_conv(x.cuda(), w.cuda(), st.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)


@pytest.mark.parametrize("name", ALL)
def test_prompts_from_one_token_to_past_the_window(name):
    """Prompt lengths 1..window+2, then 3 decode steps: cached == uncached, alone and left-padded
    beside a longer row (swa once kept a wrapped slice of a prompt shorter than its window)."""
    window = 5
    teacher, mixer = make_mixer(name, window=window) if name == "swa" else make_mixer(name)
    n_max, extra = window + 2, 3
    x = torch.randn(2, n_max + extra, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        for n in range(1, n_max + 1):
            pe = rope(teacher, torch.arange(n + extra)[None])
            y_full, _ = mixer.mix(x[:1, :n + extra], pe)
            y, state = mixer.mix(x[:1, :n], slice_pe(pe, 0, n))
            ys = [y]
            for t in range(n, n + extra):
                y, state = mixer.mix(x[:1, t:t + 1], slice_pe(pe, t, t + 1), state)
                ys.append(y)
            torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-9, rtol=0, msg=f"prompt {n}")
            # row 0: the n-token prompt left-padded to n_max; row 1: an n_max-token prompt
            xp = torch.stack([torch.cat([100 * torch.randn(n_max - n, D_MODEL, dtype=torch.float64), x[0, :n]]),
                              x[1, :n_max]])
            pad_mask = torch.ones(2, n_max, dtype=torch.bool)
            pad_mask[0, :n_max - n] = False
            pos = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
            y, state = mixer.mix(xp, rope(teacher, pos), None, pad_mask)
            torch.testing.assert_close(y[0, n_max - n:], y_full[0, :n], atol=1e-9, rtol=0, msg=f"padded prompt {n}")
            for t in range(extra):
                step = torch.stack([x[0, n + t], x[1, n_max + t]])[:, None]
                y, state = mixer.mix(step, rope(teacher, pos[:, -1:] + 1 + t), state)
                torch.testing.assert_close(y[0, 0], y_full[0, n + t], atol=1e-9, rtol=0, msg=f"padded {n} step {t}")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cache_shapes_are_what_mix_returns(name, dtype):
    """The static engine preallocates cache_shapes and copy_s mix()'s state into it each step."""
    teacher, mixer = make_mixer(name, window=6) if name == "swa" else make_mixer(name)
    mixer = mixer.to(dtype)
    for T in (1, 3, 9):  # shorter and longer than the swa window and the conv width
        x = torch.randn(2, T, D_MODEL, dtype=dtype)
        with torch.no_grad():
            _, state = mixer.mix(x, rope(teacher, torch.arange(T).expand(2, T)))
        want = mixer.cache_shapes(2, dtype)
        assert {k: (tuple(t.shape), t.dtype) for k, t in state.items()} == want, T
    assert mixer.cache_bytes(dtype) == sum(t.numel() * t.element_size() for t in state.values()) // 2
