"""Teacher latents for stage 1: what enters and leaves each decoder layer, and a bounded cache.

Stage 1 trains student layer i on the teacher's own input to layer i. Re-running the teacher's
layers 0..i for every step of every layer costs (L+1)/2 teacher forwards per step on average.
`LatentCache` instead keeps the inputs of one layer for a fixed set of batches (bounded by
LATENT_CACHE_TOKENS) and advances them through teacher layer i once when the rotation moves on
to layer i+1: the whole rotation then costs one teacher forward over the cached tokens.
"""

import torch
from torch import nn


def causal_mask(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """None where the layer's attention is causal without a mask (HF's sdpa and flash attention); for HF's
    eager attention, which applies only the mask it is given, an additive (1, 1, T, T) causal mask."""
    if getattr(getattr(layer.self_attn, "config", None), "_attn_implementation", None) != "eager":
        return None
    T = hidden.shape[1]
    return torch.full((T, T), float("-inf"), device=hidden.device, dtype=hidden.dtype).triu(1)[None, None]


def layer_call(layer: nn.Module, hidden: torch.Tensor, position_embeddings, position_ids) -> torch.Tensor:
    """One HF decoder layer on (B, T, C) hidden states, causal, no cache; -> (B, T, C)."""
    out = layer(hidden, attention_mask=causal_mask(layer, hidden), position_ids=position_ids,
                position_embeddings=position_embeddings, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def attention_call(layer: nn.Module, hidden: torch.Tensor, position_embeddings, position_ids) -> torch.Tensor:
    """The attention half of a decoder layer, input_layernorm then self_attn, causal; -> (B, T, C)."""
    out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=causal_mask(layer, hidden),
                          position_ids=position_ids, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def rope_for(model: nn.Module, hidden: torch.Tensor) -> tuple:
    """-> (position_embeddings, position_ids) for positions 0..T-1 of a (B, T, C) batch."""
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    return model.model.rotary_emb(hidden, position_ids=position_ids), position_ids


@torch.no_grad()
def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(input_ids)


@torch.no_grad()
def capture_all_layers(model: nn.Module, input_ids: torch.Tensor, layers: list[int], target: str = "layer") -> dict:
    """One teacher forward; -> {i: (input of layer i, target output)} for i in layers.

    target "layer": the decoder layer's output; "attn": its attention output (on the normed input).
    Stops after the last requested layer, so the rest of the stack and the LM head never run.
    """
    hidden = embed(model, input_ids)
    pe, pos = rope_for(model, hidden)
    wanted, out = set(layers), {}
    for i, layer in enumerate(model.model.layers[:max(layers) + 1]):
        nxt = layer_call(layer, hidden, pe, pos)
        if i in wanted:
            out[i] = (hidden, nxt if target == "layer" else attention_call(layer, hidden, pe, pos))
        hidden = nxt
    return out


class LatentCache:
    """Teacher inputs of one layer for a fixed list of batches; `advance` moves them one layer on.

    batches: list of (B, T) input ids. Latents are kept in the teacher's dtype on `device`.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: list[torch.Tensor], device: torch.device):
        self.model, self.layer = model, 0
        self.latents = [embed(model, x.to(device)) for x in batches]
        self.pe, self.pos = rope_for(model, self.latents[0])

    @torch.no_grad()
    def advance_to(self, layer: int) -> None:
        """Run teacher layers self.layer .. layer-1 over every cached batch."""
        while self.layer < layer:
            block = self.model.model.layers[self.layer]
            self.latents = [layer_call(block, h, self.pe, self.pos) for h in self.latents]
            self.layer += 1

    @torch.no_grad()
    def targets(self, index: int, target: str = "layer") -> torch.Tensor:
        """Teacher output of the current layer for cached batch `index` (recomputed: one layer's cost)."""
        block = self.model.model.layers[self.layer]
        call = layer_call if target == "layer" else attention_call
        return call(block, self.latents[index], self.pe, self.pos)

    def __len__(self) -> int:
        return len(self.latents)
