"""Static-cache generation: every cache buffer allocated once, the decode step a CUDA graph.

    engine = StaticEngine(model, batch=32, max_len=16384 + 64)
    out = engine.generate(ids, attention_mask, max_new_tokens=64)    # (B, T + 64), greedy
    out = model.fast_generate(ids, attention_mask, max_new_tokens=64)  # the same, engine kept on the model

`model` is a HybridForCausalLM (any spec) or the teacher's own HF causal LM (every layer softmax,
the same code path: equal engineering for the comparison). Layers whose `self_attn` has `mix` are
mixers; the others are the teacher's attention, run here from its q/k/v/o projections (+ q/k norms).

Buffers: KV (B, Hkv, max_len, D) per softmax layer, `mixer.cache_shapes` per mixer layer (recurrent
state, conv state, the swa window), one (B, max_len) additive slot mask (0 / -inf), and the next slot and the
next RoPE position as tensors. Prefill runs the prompt in one pass per block of rows (fla chunk
kernels / SDPA; logits for the last position only) and copies each layer's state into its buffer.
A decode step embeds the token in `self.token`, writes K/V at `slot` with index_copy_, runs
each mixer's own `mix()` on its buffers and copy_s the new state back (or, on GPU, its fused
`decode_inplace` kernel, which updates the buffers itself), then advances slot and
position in place: no host sync, no data-dependent Python, stable addresses, so on CUDA the step
is captured once as a torch.cuda.CUDAGraph (after two eager warm-up steps that let Triton
autotune) and replayed. Left padding: pads are masked out of the softmax slots and kept out of the
mixer states (pad_mask), and RoPE positions count real tokens only, as the eager model does.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .op_decode import attend_cache, attend_cache_split, hf_rms_norm_eps, rms_norm, rope_kv_step, silu_mul
from .op_norm_linear import norm_linear
from .packed import pack_attention, pack_mlp, packed_mlp

SOFTMAX = "softmax"


def layer_kinds(model: nn.Module) -> list[str]:
    """Per decoder layer: the mixer's name, or "softmax" for the teacher's own attention."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers[i].self_attn; the static "
                         "engine runs Llama, Mistral, Qwen2 and Qwen3 style decoders")
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "teacher_model_type", getattr(cfg, "model_type", ""))
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])) or (
            family == "mistral" and getattr(cfg, "sliding_window", None)):
        raise ValueError(f"{type(model).__name__}: the teacher uses sliding-window attention layers, which the static "
                         "engine does not implement; use model.generate()")
    return [getattr(layer.self_attn, "mixer_name", SOFTMAX) if hasattr(layer.self_attn, "mix") else SOFTMAX
            for layer in layers]


def kv_heads(attn: nn.Module) -> tuple[int, int, int]:
    """(q heads, kv heads, head_dim) of an HF attention module."""
    D = attn.head_dim
    return attn.q_proj.out_features // D, attn.k_proj.out_features // D, D


def cache_bytes_per_sequence(model: nn.Module, context: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of generation cache one sequence needs at `context` tokens: K and V of every softmax
    layer (grows with context) plus each mixer's own fixed-size state (mixer.cache_bytes)."""
    dtype = dtype or next(model.parameters()).dtype
    total = 0
    for layer, kind in zip(model.model.layers, layer_kinds(model)):
        if kind == SOFTMAX:
            _, hkv, D = kv_heads(layer.self_attn)
            total += 2 * hkv * D * context * torch.empty((), dtype=dtype).element_size()
        else:
            total += layer.self_attn.cache_bytes(dtype)
    return total


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _projections(attn: nn.Module, x: torch.Tensor, pack: nn.Module | None,
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


SLOT_ALIGN = 64  # max_len rounded up to this: a 16484-slot buffer decoded at half the speed of a 16400-slot one


class StaticEngine:
    """Fixed-size caches for `batch` sequences of up to `max_len` tokens (rounded up to SLOT_ALIGN),
    and the decode step (a CUDA graph on CUDA unless cuda_graph=False). compile=True also runs
    each decode layer through torch.compile (fuses the small elementwise kernels of the mixers and
    norms; compiled once per layer kind and shape, reused by every layer of that kind). fused (default:
    GPU, not float64): a mixer's fused step (`decode_inplace`, GDN's op_gdn_step) instead of mix(),
    and its fused prompt pass where it has one (`prefill_fused`, GDN's op_gdn_prefill),
    and without compile each RMSNorm (+ residual add), a softmax layer's RoPE + KV write, and its
    attention over the cache (split-KV) as Triton kernels (op_decode). pack (default: GPU): the
    projections of one input as one matmul (packed.py). norm_linear (opt-in, with fused and pack): each
    decode norm and the packed projection after it as one kernel (op_norm_linear)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, cuda_graph: bool | None = None,
                 compile: bool = False, fused: bool | None = None, pack: bool | None = None,
                 norm_linear: bool = False):
        self.model, self.kinds = model, layer_kinds(model)
        self.layers = model.model.layers
        p = next(model.parameters())
        if fused is None:  # the mixers' fused decode kernels (Triton): the default on GPU
            fused = p.device.type == "cuda" and p.dtype != torch.float64
        self.fused = [fused and hasattr(layer.self_attn, "decode_inplace") and layer.self_attn.fused_decode_supported()
                      for layer in self.layers]
        # (input norm eps, post-attention norm eps) where both are HF RMSNorms the Triton kernel repeats
        eps = [(hf_rms_norm_eps(layer.input_layernorm), hf_rms_norm_eps(layer.post_attention_layernorm))
               for layer in self.layers]
        self.norm_eps = [e if fused and not compile and None not in e else None for e in eps]
        pack = p.device.type == "cuda" if pack is None else pack
        # (attention pack, mlp pack) per layer; a mixer's own projections are packed only for its fused step
        self.packs = [(pack_attention(layer.self_attn, kind) if kind == SOFTMAX or on else None, pack_mlp(layer.mlp))
                      if pack else (None, None) for layer, kind, on in zip(self.layers, self.kinds, self.fused)]
        # norm_linear (opt-in: on the H200 its kernel took ~10 us, as long as the kernels it replaces): a
        # decode step runs each norm with the packed projection after it as one kernel, the post-attention
        # one with gate/up and SiLU(gate) * up where the MLP is a packed SiLU one (op_norm_linear)
        self.norm_linear = [norm_linear and eps is not None for eps in self.norm_eps]
        # with the norm kernels, a packed SiLU MLP's SiLU(gate) * up is one kernel (op_decode.silu_mul)
        self.silu_mlp = [eps is not None and mlp is not None and mlp.bias is None and type(layer.mlp.act_fn).__name__
                         in ("SiLU", "SiLUActivation") for layer, eps, (_, mlp) in zip(self.layers, self.norm_eps, self.packs)]
        self.swiglu = [a and b for a, b in zip(self.norm_linear, self.silu_mlp)]
        max_len = -(-max_len // SLOT_ALIGN) * SLOT_ALIGN
        # the class's function, not the bound method: an attribute holding self would make a reference
        # cycle, and a dropped engine's buffers would wait for the garbage collector
        self.compiled_layer = torch.compile(StaticEngine._layer) if compile else None
        self.batch, self.max_len, self.device, self.dtype = batch, max_len, p.device, p.dtype
        zeros = lambda shape, dt: torch.zeros(shape, dtype=dt, device=p.device)  # noqa: E731
        self.buffers: list[dict[str, torch.Tensor]] = []
        for layer, kind in zip(self.layers, self.kinds):
            if kind == SOFTMAX:
                _, hkv, D = kv_heads(layer.self_attn)
                self.buffers.append({n: zeros((batch, hkv, max_len, D), p.dtype) for n in ("k", "v")})
            else:
                self.buffers.append({n: zeros(s, dt) for n, (s, dt) in layer.self_attn.cache_shapes(batch, p.dtype).items()})
        self.bias = zeros((batch, max_len), p.dtype)  # 0 where a slot holds a real token, -inf elsewhere
        self.slot = zeros((1,), torch.long)  # next KV slot (shared: prompts are left-padded to one length)
        self.pos = zeros((batch, 1), torch.long)  # next RoPE position of each sequence
        self.token = zeros((batch, 1), torch.long)
        self.cuda_graph = p.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph, self.logits, self.warm_steps = None, None, 0

    def cache_nbytes(self) -> int:
        """Bytes of the per-layer buffers as allocated (KV + mixer states), for checking the count."""
        return sum(t.numel() * t.element_size() for b in self.buffers for t in b.values())

    def _layer(self, layer: nn.Module, kind: str, buf: dict, x: torch.Tensor, pe, pad: torch.Tensor | None,
               rows: slice | None, fused: bool, attn_pack: nn.Module | None, mlp_pack: nn.Module | None,
               norm_eps: tuple | None = None, pending: torch.Tensor | None = None, linear: bool = False,
               swiglu: bool = False, silu: bool = False):
        """One decoder layer; rows=None: a decode step of the whole batch against the buffers;
        rows=slice: a prompt for those rows from an empty cache, states written to their buffer rows.
        fused: decode_inplace (prompt: prefill_fused, where the mixer has it) instead of mix(); attn_pack,
        mlp_pack: PackedLinear or None; norm_eps:
        the two RMSNorms' eps, to run them and a softmax layer's decode RoPE through op_decode; linear: at
        decode, the input norm with the packed projection after it as norm_linear (swiglu: the MLP's
        norm with gate/up too); silu: a packed SiLU MLP's SiLU(gate) * up as op_decode.silu_mul. -> (x,
        pending): with norm_eps the MLP's output is not added here but returned as `pending`, which the
        next layer adds inside its input norm's kernel (one kernel less per layer); without, (x + it, None)."""
        attn = layer.self_attn
        proj = None  # the packed projections' outputs, when the input norm's kernel computed them too
        if norm_eps is None:
            h = layer.input_layernorm(x if pending is None else x + pending)
        elif rows is None and attn_pack is not None and linear:  # decode: norm + packed projection, one kernel
            x, h, y = norm_linear(x, layer.input_layernorm.weight, norm_eps[0], attn_pack.weight, attn_pack.bias,
                                  residual=pending)
            proj = y.split(attn_pack.sizes, dim=-1)
        elif pending is None:
            h = rms_norm(x, layer.input_layernorm.weight, norm_eps[0])
        else:
            x, h = rms_norm(x, layer.input_layernorm.weight, norm_eps[0], residual=pending)
        if kind == SOFTMAX:
            q, k, v = _projections(attn, h, attn_pack, proj)  # (B, T, heads, D)
            if rows is None and norm_eps is not None:  # RoPE on q and k, k and v into the buffers: one kernel
                q = rope_kv_step(*(t.flatten(1) for t in (q, k, v)), *(t.to(q.dtype) for t in pe), buf["k"], buf["v"],
                                 self.slot)
            else:
                cos, sin = (t.unsqueeze(1).to(q.dtype) for t in pe)
                q, k, v = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
                if rows is None:
                    buf["k"].index_copy_(2, self.slot, k)
                    buf["v"].index_copy_(2, self.slot, v)
            if rows is None and norm_eps is not None:  # split-KV kernels, slots after the current one skipped
                o = attend_cache_split(q, buf["k"], buf["v"], attn.scaling, self.bias, self.slot)
            elif rows is None:
                o = attend_cache(q, buf["k"], buf["v"], attn.scaling, self.bias)
            else:
                buf["k"][rows, :, :k.shape[2]].copy_(k)
                buf["v"][rows, :, :v.shape[2]].copy_(v)
                o = attend_prompt(q, k, v, attn.scaling, pad)
            a = attn.o_proj(o.transpose(1, 2).reshape(*h.shape[:2], -1))
        elif rows is None and fused:
            if proj is None and attn_pack is not None:
                proj = attn_pack(h)
            a = attn.decode_inplace(h, buf, proj)  # buffers updated in place
        else:
            if rows is not None and fused and hasattr(attn, "prefill_fused"):  # a prompt through its fused kernels
                a, state = attn.prefill_fused(h, pad)
            else:
                a, state = attn.mix(h, pe, None if rows is not None else buf, pad, output_state=True)
            for name, t in state.items():
                (buf[name] if rows is None else buf[name][rows]).copy_(t)
        if norm_eps is None:
            x = x + a
            out = packed_mlp(layer.mlp, mlp_pack, layer.post_attention_layernorm(x))
        elif rows is None and swiglu:  # decode: norm, gate/up and SiLU(gate) * up in one kernel
            x, _, act = norm_linear(x, layer.post_attention_layernorm.weight, norm_eps[1], mlp_pack.weight,
                                    residual=a, swiglu=True)
            out = layer.mlp.down_proj(act)
        else:
            x, h = rms_norm(x, layer.post_attention_layernorm.weight, norm_eps[1], residual=a)
            out = layer.mlp.down_proj(silu_mul(*mlp_pack(h))) if silu else packed_mlp(layer.mlp, mlp_pack, h)
        return (x + out, None) if norm_eps is None else (x, out)

    def _layers(self, x: torch.Tensor, pe, pad: torch.Tensor | None, rows: slice | None) -> torch.Tensor:
        compiled = self.compiled_layer if rows is None else None
        pending = None  # the last MLP output, when its layer left the residual add to the next norm
        for i, (layer, kind, buf) in enumerate(zip(self.layers, self.kinds, self.buffers)):
            if compiled is not None:  # (no norm_eps under compile: nothing pending)
                x, pending = compiled(self, layer, kind, buf, x, pe, pad, rows, self.fused[i], *self.packs[i])
            else:
                x, pending = self._layer(layer, kind, buf, x, pe, pad, rows, self.fused[i], *self.packs[i],
                                         self.norm_eps[i], pending, self.norm_linear[i], self.swiglu[i],
                                         self.silu_mlp[i])
        x = x[:, -1] if pending is None else x[:, -1] + pending[:, -1]
        return self.model.lm_head(self.model.model.norm(x))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rows_per_pass: int | None = None) -> torch.Tensor:
        """ids (B, T), left-padded with attention_mask 0 at pads -> next-token logits (B, V). Starts
        a new generation (the buffers are overwritten); rows_per_pass bounds activation memory."""
        B, T = ids.shape
        if B != self.batch or T >= self.max_len:
            raise ValueError(f"prefill: ids {tuple(ids.shape)} do not fit this engine (batch {self.batch}, max_len "
                             f"{self.max_len}: the prompt plus at least one new token); build one with StaticEngine("
                             f"model, batch={B}, max_len={T}+max_new_tokens)")
        for pack in (p for packs in self.packs for p in packs if p is not None):
            pack.refresh()  # weights changed since the engine was built (in place: a captured graph stays valid)
        pad = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool().to(ids.device)
        pos = torch.arange(T, device=ids.device).expand(B, T) if pad is None else (pad.long().cumsum(-1) - 1).clamp(min=0)
        self.bias.fill_(float("-inf"))
        self.bias[:, :T] = 0.0 if pad is None else torch.where(pad, 0.0, float("-inf"))
        self.slot.fill_(T)
        self.pos.copy_(pos[:, -1:] + 1)
        step = rows_per_pass or B
        logits = []
        for b in range(0, B, step):
            rows = slice(b, min(b + step, B))
            x = self.model.model.embed_tokens(ids[rows])
            pe = self.model.model.rotary_emb(x, pos[rows])
            logits.append(self._layers(x, pe, None if pad is None else pad[rows], rows))
        return torch.cat(logits)

    def _step(self) -> torch.Tensor:
        self.bias.index_fill_(1, self.slot, 0.0)
        x = self.model.model.embed_tokens(self.token)
        logits = self._layers(x, self.model.model.rotary_emb(x, self.pos), None, None)
        self.slot.add_(1)
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> next-token logits (B, V). On CUDA the returned tensor is the graph's output
        buffer: the next call overwrites it."""
        self.token.copy_(token.view(self.batch, 1))
        if not self.cuda_graph:
            return self._step()
        if self.graph is None and self.warm_steps < 2:  # real steps, eager on a side stream: Triton autotunes here
            self.warm_steps += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._step()
            torch.cuda.current_stream().wait_stream(stream)
            return logits
        if self.graph is None:  # capture records without running; the replay below runs the step
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, eos_token_id: int | None = None,
                 pad_token_id: int = 0, rows_per_pass: int | None = None) -> torch.Tensor:
        """-> (B, T + max_new_tokens): the prompt and the new tokens (pad_token_id after a row's EOS;
        stops early once every row has ended)."""
        if ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"generate: {ids.shape[1]} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        logits = self.prefill(ids, attention_mask, rows_per_pass)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = []
        for i in range(max_new_tokens):
            if do_sample:
                scores = logits.float() / temperature
                if top_k:
                    kth = scores.topk(top_k, dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                token = torch.multinomial(scores.softmax(-1), 1)[:, 0]
            else:
                token = logits.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad_token_id), token)
                done = done | (token == eos_token_id)
            new.append(token)
            if i + 1 == max_new_tokens or (eos_token_id is not None and i % 16 == 15 and bool(done.all())):
                break
            logits = self.decode(token)
        return torch.cat([ids, torch.stack(new, 1)], 1)
