"""Shared pieces of the student mixers: the teacher-initialised base class, norms, RoPE, conv.

Imports only torch (and packed.py, likewise): export.py copies this file with mixers.py and op_*.py
beside the exported modeling file. See hybrid/mixers.py for the mixers and docs/mixers.md for the protocol.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packed import padded_sizes


def up32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 -> fp32, fp64 stays fp64 so the tests can compare in double)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim (head_dim), one weight shared by all heads. `exact_fp32=True`
    repeats Llama/Qwen3's arithmetic (always fp32, weight applied after casting back), so a copied
    q_norm/k_norm gives bit-identical numbers; otherwise it computes in at least fp32 (fp64 stays)."""

    def __init__(self, dim: int, eps: float = 1e-6, exact_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.exact_fp32 = exact_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if self.exact_fp32 else up32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def gated_rms_norm(o: torch.Tensor, gate: torch.Tensor, norm: HeadRMSNorm) -> torch.Tensor:
    """o, gate: (B, T, H, D) -> norm(o) * silu(gate), fla's FusedRMSNormGated (swish) in torch."""
    return norm(o) * F.silu(gate)


def pad_mask_from_attention(attention_mask, B: int, T: int) -> torch.Tensor | None:
    """The (B, T) bool pad mask (True = real token) for the current tokens, from what an HF decoder
    hands its attention: a 2D mask (B, past + T), or a 4D mask (B or 1, 1, T, S) either bool
    (True = attend, sdpa) or additive float (0 = attend, eager). A left-pad query row attends to
    nothing, a real row at least to itself. Anything else (None, flex BlockMask) -> None."""
    if not torch.is_tensor(attention_mask):
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -T:].bool()
    if attention_mask.dim() == 4:
        rows = attention_mask[:, 0, -T:, :]
        ok = rows if rows.dtype == torch.bool else rows == 0
        return ok.any(-1).expand(B, T)
    return None


def zero_pads(x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C) with pad positions set to 0. HF's softmax layers can leave NaN/garbage in pad rows
    (a fully masked query row); a select, unlike a multiply by 0, keeps it out of every state."""
    return x if pad_mask is None else torch.where(pad_mask[..., None].bool(), x, torch.zeros((), dtype=x.dtype))


def _copy_linear(src: nn.Linear) -> nn.Linear:
    dst = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                    device=src.weight.device, dtype=src.weight.dtype)
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst


def _copy_head_norm(src: nn.Module | None, head_dim: int, where: str) -> HeadRMSNorm | None:
    if src is None:
        return None
    weight = getattr(src, "weight", None)
    if weight is None or tuple(weight.shape) != (head_dim,):
        raise ValueError(f"{where}: expected a per-head RMSNorm with weight of shape ({head_dim},) "
                         f"(Qwen3 style), found {type(src).__name__} with weight "
                         f"{None if weight is None else tuple(weight.shape)}; this family is not supported")
    eps = getattr(src, "variance_epsilon", getattr(src, "eps", 1e-6))
    dst = HeadRMSNorm(head_dim, eps, exact_fp32=True).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dst.weight.copy_(weight)
    return dst


class TeacherInitMixer(nn.Module):
    """Common part: the teacher's q/k/v/o (+ q/k norms), GQA bookkeeping and the HF-facing forward.

    Subclasses set `mixer_name` and implement `mix(x, position_embeddings, state, pad_mask,
    output_state)`. `impl` ("auto" | "recurrent" | "chunked" | "fla") is handed to the kernels."""

    mixer_name = "base"

    def __init__(self, teacher_attn: nn.Module, config, layer_idx: int):
        super().__init__()
        where = f"layer {layer_idx} {type(teacher_attn).__name__}"
        missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                   if not isinstance(getattr(teacher_attn, p, None), nn.Linear)]
        if missing:
            raise ValueError(f"{where}: no nn.Linear {', '.join(missing)}; expected self_attn.{{q,k,v,o}}_proj "
                             "as in Llama/Qwen2/Qwen3/Mistral attention")
        D = getattr(teacher_attn, "head_dim", None) or getattr(config, "head_dim", None) \
            or config.hidden_size // config.num_attention_heads
        self.head_dim = int(D)
        self.n_heads = teacher_attn.q_proj.out_features // self.head_dim
        self.n_kv_heads = teacher_attn.k_proj.out_features // self.head_dim
        if self.n_heads % self.n_kv_heads or teacher_attn.v_proj.out_features != self.n_kv_heads * D:
            raise ValueError(f"{where}: q has {self.n_heads} heads, k/v {self.n_kv_heads} heads of {D}; "
                             "expected a whole number of q heads per kv head")
        self.hidden_size = teacher_attn.q_proj.in_features
        self.layer_idx = layer_idx
        self.scaling = float(getattr(teacher_attn, "scaling", D ** -0.5))
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6) or 1e-6)
        self.impl = "auto"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, _copy_linear(getattr(teacher_attn, name)))
        self.q_norm = _copy_head_norm(getattr(teacher_attn, "q_norm", None), self.head_dim, where + " q_norm")
        self.k_norm = _copy_head_norm(getattr(teacher_attn, "k_norm", None), self.head_dim, where + " k_norm")

    def project(self, x: torch.Tensor, *extra: nn.Linear) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> q (B, T, H, D), k and v (B, T, Hkv, D): the teacher's projections with
        biases and q/k norms, before RoPE and before any feature map; then each of `extra` (more
        projections of x, e.g. a mixer's gates) as (B, T, out). With extra, plain nn.Linears all, they
        run as one matmul (project_packed) and the outputs are its column slices."""
        B, T, _ = x.shape
        linears = (self.q_proj, self.k_proj, self.v_proj, *extra)
        if self.packable(*extra):
            packed, split = self.project_packed(x, *extra)
            outs = packed.split(split, dim=-1)[:len(linears)]
        else:
            outs = [lin(x) for lin in linears]
        q = outs[0].view(B, T, self.n_heads, self.head_dim)
        k = outs[1].view(B, T, self.n_kv_heads, self.head_dim)
        v = outs[2].view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return (q, k, v, *outs[3:])

    def packable(self, *extra: nn.Linear) -> bool:
        """Whether project(x, *extra) runs as one matmul: extra given, and every projection a plain nn.Linear."""
        return bool(extra) and all(type(lin) is nn.Linear for lin in (self.q_proj, self.k_proj, self.v_proj, *extra))

    def project_packed(self, x: torch.Tensor, *extra: nn.Linear) -> tuple[torch.Tensor, list[int]]:
        """x (B, T, C) -> (P, split): q, k, v and `extra`'s projections of x as one matmul on their
        concatenated weights, P (B, T, sum(split)) before the q/k norms, and its column counts (the last
        one: zero rows padding them to a multiple of 64). The small gate projections are slow GEMMs
        alone, one launch replaces several, and 1554 rows (a SmolLM2 GDN layer) ran a cutlass fallback on
        the H200; each output column is the same dot product."""
        linears = (self.q_proj, self.k_proj, self.v_proj, *extra)
        sizes = [lin.out_features for lin in linears]
        split = padded_sizes(sizes)
        pad = sum(split) - sum(sizes)
        weight = F.pad(torch.cat([lin.weight for lin in linears]), (0, 0, 0, pad))
        bias = None if all(lin.bias is None for lin in linears) else F.pad(torch.cat(
            [lin.bias if lin.bias is not None else lin.weight.new_zeros(n) for lin, n in zip(linears, sizes)]), (0, pad))
        return F.linear(x, weight, bias), split

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, Hkv, D) -> (B, T, H, D); q head h reads kv head h // (H // Hkv)."""
        rep = self.n_heads // self.n_kv_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
        """HF `self_attn` signature. Pad mask: kwargs["pad_mask"] (B, T) if given, else derived from
        attention_mask. State: past_key_values.mixer_states[layer_idx] when the cache has a
        `mixer_states` dict (read, then overwritten with the new state); otherwise stateless."""
        B, T, _ = hidden_states.shape
        pad_mask = kwargs.get("pad_mask")
        if pad_mask is None:
            pad_mask = pad_mask_from_attention(attention_mask, B, T)
        states = getattr(past_key_values, "mixer_states", None)
        state = states.get(self.layer_idx) if states is not None else None
        y, new_state = self.mix(hidden_states, position_embeddings, state, pad_mask,
                                output_state=states is not None)
        if states is not None:
            states[self.layer_idx] = new_state
        return y, None

    def cache_shapes(self, batch: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The decode state mix() returns, {name: (shape, dtype)} for `batch` sequences of a model in
        `dtype`: fixed size whatever the context, so a static cache can preallocate it and copy_ each
        step's new state into it (engine.py); a test checks it against mix(). This default is the linear
        mixers' matrix state S (B, H, D, D) in at least fp32; mixers with more state extend or replace it."""
        return {"S": ((batch, self.n_heads, self.head_dim, self.head_dim), torch.promote_types(dtype, torch.float32))}

    def cache_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of decode state per sequence (the same at every context length)."""
        return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
                   for shape, dt in self.cache_shapes(1, dtype).values())

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, impl={self.impl}")


def causal_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv. x (B, T, C), weight (C, W), state (B, W-1, C) = the previous inputs
    (zeros at the start). -> y (B, T, C), new state (B, W-1, C)."""
    B, T, C = x.shape
    W = weight.shape[1]
    prev = x.new_zeros(B, W - 1, C) if state is None else state.to(x.dtype)
    xp = torch.cat([prev, x], dim=1)  # (B, T + W - 1, C)
    if torch.compiler.is_compiling():  # a sum of W shifted products fuses with its neighbours into one kernel
        w = weight.to(x.dtype)
        y = sum(xp[:, j:j + T] * w[:, j] for j in range(W))
    elif x.is_cuda:  # cuDNN depthwise conv: the unfold below moves W times the activations through memory
        y = F.conv1d(xp.transpose(1, 2), weight.to(x.dtype)[:, None, :], groups=C).transpose(1, 2)
    else:  # windows (B, T, C, W) times taps: exact in any dtype (CPU's grouped conv1d is very slow in fp64)
        y = (xp.unfold(1, W, 1) * weight.to(x.dtype)).sum(-1)
    return y, xp[:, xp.shape[1] - (W - 1):]


def apply_rope(x: torch.Tensor, position_embeddings, where: str) -> torch.Tensor:
    """x (B, T, H, D) rotated by the teacher's (cos, sin), each (B or 1, T, D), as HF's
    apply_rotary_pos_emb (rotate_half convention; cos/sin already carry any rope scaling)."""
    if position_embeddings is None:
        raise ValueError(f"{where} needs position_embeddings=(cos, sin) from the teacher's rotary embedding "
                         "(model.model.rotary_emb(x, position_ids)); got None")
    cos, sin = (t.unsqueeze(2).to(x.dtype) for t in position_embeddings)  # (B, T, 1, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
