"""One decoder layer of the static engine (engine.py): what runs where, decided once per layer
(LayerPlan, plan_layers), and the layer itself for a prompt or a decode step (run_layer).

The teacher's own attention runs here from its q/k/v/o projections (+ q/k norms): RoPE, the KV
write and attention over the slots, eagerly or through op_decode's kernels. A mixer runs its own
`mix()` (prompt or step) or, on GPU, its fused step `decode_inplace` / prompt pass `prefill_fused`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .op_decode import attend_cache, attend_cache_split, hf_rms_norm_eps, rms_norm, rope_kv_step, silu_mul
from .op_norm_linear import norm_linear as norm_linear_kernel
from .packed import pack_attention, pack_mlp, packed_mlp

SOFTMAX = "softmax"


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """How the engine runs one decoder layer.
    kind: the mixer's name, or "softmax" (the teacher's attention);
    fused: the mixer's fused step `decode_inplace` (its prompt: `prefill_fused`, where it has one)
        instead of mix();
    attn_pack, mlp_pack: the layer's projections of one input as one matmul (PackedLinear) or None;
    norm_eps: the two RMSNorms' eps, to run them (+ the residual add, the previous layer's MLP output
        left pending) and a softmax layer's decode RoPE + KV write and split-KV attention as
        op_decode's kernels; None: the model's own modules;
    norm_linear: at decode, the input norm and the packed projection after it as one kernel
        (op_norm_linear); swiglu: the MLP's norm with gate/up and SiLU(gate) * up too;
    silu: a packed SiLU MLP's SiLU(gate) * up as op_decode.silu_mul."""
    kind: str
    fused: bool = False
    attn_pack: nn.Module | None = None
    mlp_pack: nn.Module | None = None
    norm_eps: tuple | None = None
    norm_linear: bool = False
    swiglu: bool = False
    silu: bool = False


def plan_layers(layers: nn.ModuleList, kinds: list[str], fused: bool, compile: bool, pack: bool,
                norm_linear: bool) -> list[LayerPlan]:
    """The engine's options (StaticEngine's docstring) -> one LayerPlan per layer, each option on only
    where that layer can take it."""
    plans = []
    for layer, kind in zip(layers, kinds):
        attn = layer.self_attn
        on = fused and hasattr(attn, "decode_inplace") and attn.fused_decode_supported()
        eps = (hf_rms_norm_eps(layer.input_layernorm), hf_rms_norm_eps(layer.post_attention_layernorm))
        eps = eps if fused and not compile and None not in eps else None  # both HF RMSNorms: the kernel repeats them
        # a mixer's own projections are packed only for its fused step
        attn_pack = pack_attention(attn, kind) if pack and (kind == SOFTMAX or on) else None
        mlp_pack = pack_mlp(layer.mlp) if pack else None
        silu = (eps is not None and mlp_pack is not None and mlp_pack.bias is None
                and type(layer.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"))
        # norm_linear is opt-in: on the H200 its kernel took ~10 us, as long as the kernels it replaces
        linear = norm_linear and eps is not None
        plans.append(LayerPlan(kind, on, attn_pack, mlp_pack, eps, linear, linear and silu, silu))
    return plans


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_qkv(attn: nn.Module, x: torch.Tensor, pack: nn.Module | None,
                 qkv: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """The teacher attention's q (B, T, H, D), k, v (B, T, Hkv, D): projections (one packed matmul if
    pack; given as qkv when norm_linear computed them), q/k norms."""
    B, T, _ = x.shape
    if qkv is None:
        qkv = pack(x) if pack is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    q, k, v = (t.view(B, T, -1, attn.head_dim) for t in qkv)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def attend_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  valid: torch.Tensor | None) -> torch.Tensor:
    """Causal attention over the prompt alone (the cache starts empty). valid (B, T) marks real
    tokens (None: no padding); a pad query row keeps itself so it never is empty."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = (causal & valid[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def run_layer(plan: LayerPlan, layer: nn.Module, buf: dict, x: torch.Tensor, pe, pad: torch.Tensor | None,
              rows: slice | None, slot: torch.Tensor, bias: torch.Tensor, pending: torch.Tensor | None = None):
    """One decoder layer as `plan` says. rows=None: a decode step of the whole batch against the
    buffers `buf` (slot: the next KV slot, bias: the (B, slots) additive mask); rows=slice: a prompt
    for those rows from an empty cache, its states written to their buffer rows. -> (x, pending):
    with plan.norm_eps the MLP's output is not added here but returned as `pending`, which the next
    layer adds inside its input norm's kernel (one kernel less per layer); without, (x + it, None)."""
    attn, eps, attn_pack, mlp_pack = layer.self_attn, plan.norm_eps, plan.attn_pack, plan.mlp_pack
    proj = None  # the packed projections' outputs, when the input norm's kernel computed them too
    if eps is None:
        h = layer.input_layernorm(x if pending is None else x + pending)
    elif rows is None and attn_pack is not None and plan.norm_linear:  # decode: norm + packed projection, one kernel
        x, h, y = norm_linear_kernel(x, layer.input_layernorm.weight, eps[0], attn_pack.weight, attn_pack.bias,
                                     residual=pending)
        proj = attn_pack.outputs(y)
    elif pending is None:
        h = rms_norm(x, layer.input_layernorm.weight, eps[0])
    else:
        x, h = rms_norm(x, layer.input_layernorm.weight, eps[0], residual=pending)
    if plan.kind == SOFTMAX:
        a = _softmax_attention(attn, buf, h, pe, pad, rows, slot, bias, attn_pack, proj, kernels=eps is not None)
    elif rows is None and plan.fused:
        if proj is None and attn_pack is not None:
            proj = attn_pack(h)
        a = attn.decode_inplace(h, buf, proj)  # buffers updated in place
    else:
        if rows is not None and plan.fused and hasattr(attn, "prefill_fused"):  # a prompt through its fused kernels
            a, state = attn.prefill_fused(h, pad)
        else:
            a, state = attn.mix(h, pe, None if rows is not None else buf, pad, output_state=True)
        for name, t in state.items():
            (buf[name] if rows is None else buf[name][rows]).copy_(t)
    if eps is None:
        x = x + a
        out = packed_mlp(layer.mlp, mlp_pack, layer.post_attention_layernorm(x))
    elif rows is None and plan.swiglu:  # decode: norm, gate/up and SiLU(gate) * up in one kernel
        x, _, act = norm_linear_kernel(x, layer.post_attention_layernorm.weight, eps[1], mlp_pack.weight,
                                       residual=a, swiglu=True)
        out = layer.mlp.down_proj(act)
    else:
        x, h = rms_norm(x, layer.post_attention_layernorm.weight, eps[1], residual=a)
        out = layer.mlp.down_proj(silu_mul(*mlp_pack(h))) if plan.silu else packed_mlp(layer.mlp, mlp_pack, h)
    return (x + out, None) if eps is None else (x, out)


def _softmax_attention(attn: nn.Module, buf: dict, h: torch.Tensor, pe, pad: torch.Tensor | None,
                       rows: slice | None, slot: torch.Tensor, bias: torch.Tensor, pack: nn.Module | None,
                       proj: tuple | None, kernels: bool) -> torch.Tensor:
    """The teacher's attention of one layer: a prompt (rows) writes its K/V into the buffers and attends
    over itself; a decode step writes at `slot` and attends over every slot (kernels: RoPE + KV write as
    one kernel, then split-KV attention that skips the slots after the current one)."""
    q, k, v = attention_qkv(attn, h, pack, proj)  # (B, T, heads, D)
    if rows is None and kernels:
        q = rope_kv_step(*(t.flatten(1) for t in (q, k, v)), *(t.to(q.dtype) for t in pe), buf["k"], buf["v"], slot)
        o = attend_cache_split(q, buf["k"], buf["v"], attn.scaling, bias, slot)
    else:
        cos, sin = (t.unsqueeze(1).to(q.dtype) for t in pe)
        q, k, v = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        if rows is None:
            buf["k"].index_copy_(2, slot, k)
            buf["v"].index_copy_(2, slot, v)
            o = attend_cache(q, buf["k"], buf["v"], attn.scaling, bias)
        else:
            buf["k"][rows, :, :k.shape[2]].copy_(k)
            buf["v"][rows, :, :v.shape[2]].copy_(v)
            o = attend_prompt(q, k, v, attn.scaling, pad)
    return attn.o_proj(o.transpose(1, 2).reshape(*h.shape[:2], -1))
