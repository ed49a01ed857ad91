"""Retrieval heads: which of the teacher's attention heads copy from the context (a recall-aware selector).

In-context recall needs heads that, at a key, attend to what followed the same key earlier and copy it
(induction heads, Olsson et al. 2022; "retrieval heads", Wu et al., arXiv 2404.15574). A layer that holds
such a head and becomes linear must redo that lookup from a fixed-size state. This module scores every
teacher head on MQAR prompts (recall_mqar.py: the pairs, a haystack window, the keys again): at each
repeated key, does the head's strongest attention land on the value it must copy? A head's score is
that hit rate over all answer positions; a layer's is its best head's.

select_layers.py's "retrieval" method ranks layers by it (no training, one teacher forward per prompt),
and "ga_s2_retrieval" keeps every layer whose best head scores >= RETRIEVAL_KEEP, then fills up to K
in GA-S2's order. The attention rows are computed here from the layer's own q/k projections and RoPE,
so the teacher may run under any attention implementation (and compiled).
"""

import random

import numpy as np
import torch
from torch import nn

from .capture import embed, layer_call, rope_for
from .model.engine_layer import attention_qkv
from .model.mixer_base import apply_rope
from .recall_mqar import MQAR_PAIRS, mqar_sample, word_tokens


def mqar_prompts(tokenizer, hay: np.ndarray, n: int, length: int, seed: int) -> list[dict]:
    """n MQAR records of `length` tokens (haystack windows from `hay`), the same for a seed. Keys and values
    are whole-word tokens, or any non-special token where the vocabulary has too few words (tiny test ones)."""
    rng, words = random.Random(seed), word_tokens(tokenizer)
    if len(words) < 4 * MQAR_PAIRS:
        special = set(tokenizer.all_special_ids)
        words = [t for t in sorted(tokenizer.get_vocab().values()) if t not in special]
    return [mqar_sample(tokenizer, hay, length, rng, words) for _ in range(n)]


def copy_pairs(ids: list[int], positions: list[int]) -> list[tuple[int, int]]:
    """(query, source) for each answer position p of an MQAR record: the query is the key at p - 1,
    the source the value's first occurrence (in the pairs; MQAR's words occur nowhere else)."""
    first = {}
    for j, t in enumerate(ids):
        first.setdefault(t, j)
    return [(p - 1, first[ids[p]]) for p in positions if first[ids[p]] < p - 1]


@torch.no_grad()
def attention_argmax(model: nn.Module, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """ids (B, T), query (B, P) positions -> (L, B, P, H): the key position each head of each layer attends
    to most at each query (causal), from the layer's own q/k projections and RoPE, layer by layer."""
    out = []
    future = torch.arange(ids.shape[1], device=ids.device)[None, None, :] > query[..., None]  # (B, P, T)
    hidden = embed(model, ids)
    pe, pos = rope_for(model, hidden)
    for layer in model.model.layers:
        q, k, _ = attention_qkv(layer.self_attn, layer.input_layernorm(hidden), None)
        q, k = apply_rope(q, pe, "retrieval"), apply_rope(k, pe, "retrieval")  # (B, T, H, D), (B, T, Hkv, D)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        q = q.gather(1, query[..., None, None].expand(-1, -1, *q.shape[2:]))  # (B, P, H, D)
        logits = torch.einsum("bphd,bthd->bpht", q.float(), k.float())
        out.append(logits.masked_fill(future[:, :, None, :], float("-inf")).argmax(-1))
        hidden = layer_call(layer, hidden, pe, pos)
    return torch.stack(out)


def head_copy_scores(model: nn.Module, records: list[dict], device: torch.device, batch: int = 4,
                     autocast=None) -> tuple[torch.Tensor, int]:
    """-> ((L, H) hit rate: the share of answer positions where the head's attention argmax at the key is
    the value to copy, the number of answer positions). `records`: MQAR records of one length (so the same
    number of pairs); `model`: a HF decoder, run on `batch` records at a time."""
    hits, count = 0.0, 0
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        pairs = [copy_pairs(r["input_ids"], r["answer_positions"]) for r in chunk]
        if not pairs[0] or len({len(ps) for ps in pairs}) != 1:
            raise ValueError("retrieval: expected MQAR records of one length, each with its answer positions "
                             f"(recall_mqar.py); got {[len(ps) for ps in pairs]} usable positions")
        ids = torch.tensor([r["input_ids"] for r in chunk], device=device)
        query = torch.tensor([[q for q, _ in ps] for ps in pairs], device=device)  # (B, P)
        source = torch.tensor([[s for _, s in ps] for ps in pairs], device=device)
        # eager even where the layers are compiled: a new shape or call would compile them again for one forward
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False), \
                torch.compiler.set_stance("force_eager"):
            best = attention_argmax(model, ids, query)
        hits = hits + (best == source[None, ..., None]).double().sum((1, 2)).cpu()  # (L, H)
        count += query.numel()
    if count == 0:
        raise ValueError("retrieval: no records to score; pass MQAR records (recall_mqar.py)")
    return (hits / count).float(), count


def previous_token_rates(model: nn.Module, ids: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """-> (L, H): the share of query positions (every `stride`-th from 32) at which the head's attention argmax
    is the position just before: the previous-token heads an induction (copy) head reads its key's
    predecessor from, usually in a layer below it."""
    query = torch.arange(32, ids.shape[1], stride, device=ids.device).repeat(ids.shape[0], 1)  # (B, P)
    with torch.compiler.set_stance("force_eager"):  # (attention_argmax runs without grad)
        best = attention_argmax(model, ids, query)  # (L, B, P, H)
    return (best == (query - 1)[None, ..., None]).float().mean((1, 2)).cpu()


def layer_scores(head_scores: torch.Tensor, layers: list[int]) -> dict[int, float]:
    """{layer: its best head's hit rate} for the candidate layers."""
    return {l: float(head_scores[l].max()) for l in layers}


def keep_then_fill(scores: dict[int, float], keep_at: float, ranking: list[int]) -> list[int]:
    """Every layer scoring >= keep_at (best first), then the rest in `ranking`'s order: a full ranking."""
    kept = sorted((l for l, s in scores.items() if s >= keep_at), key=lambda l: -scores[l])
    return kept + [l for l in ranking if l not in kept]
