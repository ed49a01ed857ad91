"""HF surgery (hybrid/surgery.py): exact teacher reproduction, locality of a swap, trainable set,
spec parsing, padded batches through a hybrid, clear errors for unknown architectures."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hybrid.surgery import (build_student, decoder_layers, mixer_parameters, model_spec, parse_spec,
                            read_spec, swap_attention)
from hybrid.selection import SpecSwitcher
from test_mixers import FAMILIES, VOCAB, tiny_teacher


def ids(B: int = 2, T: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_softmax_student_reproduces_teacher_exactly(family):
    teacher = tiny_teacher(family)
    student = build_student(teacher, "softmax")
    with torch.no_grad():
        assert torch.equal(student(ids()).logits, teacher(ids()).logits)
    assert model_spec(student) == ["softmax", "softmax"] and student.config.hybrid_spec == ["softmax", "softmax"]
    assert mixer_parameters(student) == [] and not any(p.requires_grad for p in student.parameters())
    t_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not t_ptrs & {p.data_ptr() for p in student.parameters()}  # a copy, not shared weights


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3_qknorm"])
@pytest.mark.parametrize("name", ["gdn", "gla", "rwkv7", "swa"])
def test_swapping_layer_i_leaves_upstream_unchanged(name, family):
    teacher = tiny_teacher(family, n_layers=3)
    i = 1
    spec = ["softmax"] * 3
    spec[i] = name
    student = build_student(teacher, spec, window=3)  # window only reaches swa
    with torch.no_grad():
        hs_t = teacher(ids(), output_hidden_states=True).hidden_states
        hs_s = student(ids(), output_hidden_states=True).hidden_states
    for j in range(i + 1):  # embeddings .. the input of layer i
        assert torch.equal(hs_s[j], hs_t[j]), j
    assert not torch.allclose(hs_s[i + 1], hs_t[i + 1])
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    mixer_names = {f"model.layers.{i}.self_attn.{n}" for n, _ in decoder_layers(student)[i].self_attn.named_parameters()}
    assert trainable == mixer_names and len(trainable) >= 4
    assert {id(p) for p in mixer_parameters(student)} == {id(p) for p in decoder_layers(student)[i].self_attn.parameters()}
    assert model_spec(student) == spec and student.config.hybrid_spec == spec
    assert model_spec(teacher) == ["softmax"] * 3  # the teacher is untouched
    if name == "swa":
        assert decoder_layers(student)[i].self_attn.window == 3


def test_switching_back_to_teacher_attention_brings_back_teacher_logits():
    teacher = tiny_teacher("qwen2_bias")
    student = build_student(teacher, "gdn;rwkv7=1")
    assert model_spec(student) == ["gdn", "rwkv7"]
    switcher = SpecSwitcher(student, teacher, ["gdn", "rwkv7"])
    with torch.no_grad():
        assert not torch.allclose(student(ids()).logits, teacher(ids()).logits)
        old = decoder_layers(student)[0].self_attn
        switcher.set(["softmax", "rwkv7"])
        assert old.mixer_name == "gdn" and model_spec(student) == ["softmax", "rwkv7"]
        switcher.set(["softmax", "softmax"])
        assert torch.equal(student(ids()).logits, teacher(ids()).logits)
    assert student.config.hybrid_spec == ["softmax", "softmax"]
    gla = build_student(teacher, "gla")
    old = swap_attention(student, 1, decoder_layers(gla)[1].self_attn)
    assert model_spec(student) == ["softmax", "gla"] and type(old).__name__ == "Qwen2Attention"
    assert "hybrid_spec" in student.config.to_dict()


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_left_padded_batch_through_a_hybrid(attn_impl):
    """HF's own 4D masks (bool for sdpa, additive for eager) reach the mixers as a pad mask."""
    teacher = tiny_teacher("llama_gqa", n_layers=4, attn_impl=attn_impl)
    student = build_student(teacher, "gdn;softmax=1;rwkv7=2;gla=3")
    T, P = 7, 3
    x = ids(2, T + P)
    mask = torch.ones(2, T + P, dtype=torch.long)
    mask[0, :P] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = student(x, attention_mask=mask, position_ids=pos).logits
        row0 = student(x[:1, P:]).logits
        row1 = student(x[1:]).logits
    # HF's eager attention takes its softmax in float32 even for float64 models, so its own padded
    # and unpadded rows agree only to float32 rounding (~1e-9 on the teacher alone); a pad leaking
    # into a linear mixer's state moves these logits by ~0.5.
    atol = 1e-9 if attn_impl == "sdpa" else 1e-6
    torch.testing.assert_close(padded[0, P:], row0[0], atol=atol, rtol=0)
    torch.testing.assert_close(padded[1], row1[0], atol=atol, rtol=0)


def test_parse_spec_forms_and_errors():
    assert parse_spec("gdn", 3) == ["gdn"] * 3
    assert parse_spec("gdn, softmax, gla", 3) == ["gdn", "softmax", "gla"]
    assert parse_spec("gdn;softmax=0,2", 4) == ["softmax", "gdn", "softmax", "gdn"]
    assert parse_spec("gdn;softmax=3;swa=0", 4) == ["swa", "gdn", "gdn", "softmax"]
    assert parse_spec(["gla", "rwkv7"], 2) == ["gla", "rwkv7"]
    with pytest.raises(ValueError, match="unknown mixer name"):
        parse_spec("mamba", 2)
    with pytest.raises(ValueError, match="2 names for 3 layers"):
        parse_spec("gdn,softmax", 3)
    with pytest.raises(ValueError, match="out of range"):
        parse_spec("gdn;softmax=5", 4)
    with pytest.raises(ValueError, match="bad layer list"):
        parse_spec("gdn;softmax=x", 4)
    with pytest.raises(ValueError, match="one per layer"):
        parse_spec(["gdn"], 2)
    with pytest.raises(ValueError, match="layer 3 is named twice"):
        parse_spec("gdn;softmax=3,3", 4)
    with pytest.raises(ValueError, match="layer 1 is named twice"):
        parse_spec("gdn;softmax=1;swa=1", 4)


def test_a_mixer_option_no_mixer_takes_is_an_error():
    teacher = tiny_teacher("llama_gqa")
    with pytest.raises(ValueError, match=r"\['windw'\] are taken by no mixer.*swa: window"):
        build_student(teacher, "swa", windw=8)
    student = build_student(teacher, "gdn;swa=1", window=3, conv_size=2)  # each mixer takes its own options
    assert decoder_layers(student)[1].self_attn.window == 3 and decoder_layers(student)[0].self_attn.conv_size == 2


def test_unknown_architectures_give_a_clear_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: no decoder layers at model\.model\.layers.*supported: Llama"):
        build_student(gpt2, "gdn")

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"Toy: no decoder layers.*self_attn\.\{q,k,v,o\}_proj"):
        decoder_layers(Toy())


def test_read_spec_names_a_bad_selection_file(tmp_path):
    path = tmp_path / "selection.json"
    with pytest.raises(FileNotFoundError, match=r"selection\.json: no such file; run select_layers\.py"):
        read_spec(str(path), 4)
    path.write_text('{"methods": {}}')
    with pytest.raises(ValueError, match=r"no 'chosen_spec' in it"):
        read_spec(str(path), 4)
    path.write_text('{"chosen_spec": "gdn;softmax=1"}')
    assert read_spec(str(path), 4) == ["gdn", "softmax", "gdn", "gdn"]
