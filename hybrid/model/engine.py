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
from torch import nn

from .engine_layer import SOFTMAX, plan_layers, run_layer


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
        pack = p.device.type == "cuda" if pack is None else pack
        self.plans = plan_layers(self.layers, self.kinds, fused, compile, pack, norm_linear)
        max_len = -(-max_len // SLOT_ALIGN) * SLOT_ALIGN
        # the class's function, not the bound method: an attribute holding self would make a reference
        # cycle, and a dropped engine's buffers would wait for the garbage collector
        self.compiled_layer = torch.compile(run_layer) if compile else None
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

    def _layers(self, x: torch.Tensor, pe, pad: torch.Tensor | None, rows: slice | None) -> torch.Tensor:
        run = self.compiled_layer if rows is None and self.compiled_layer is not None else run_layer
        pending = None  # the last MLP output, when its layer left the residual add to the next norm
        for plan, layer, buf in zip(self.plans, self.layers, self.buffers):
            x, pending = run(plan, layer, buf, x, pe, pad, rows, self.slot, self.bias, pending)
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
        for pack in (p for plan in self.plans for p in (plan.attn_pack, plan.mlp_pack) if p is not None):
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
