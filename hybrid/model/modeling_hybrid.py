"""A distilled hybrid as a Hugging Face model: the teacher's architecture with student mixers.

    model = AutoModelForCausalLM.from_pretrained("out/hybrid", trust_remote_code=True)
    model.generate(**tok(["a", "longer prompt"], return_tensors="pt", padding=True), max_new_tokens=32)

export.py copies this file into the export folder together with the files beside it that it imports
relatively (spec.py, mixers.py, mixer_base.py, the op_*.py kernels; transformers' remote-code loader
follows relative imports), so an export loads without this repo installed. It uses fla's kernels for CUDA tensors when fla is
installed and the torch reference otherwise (the mixers dispatch).

The model is the teacher's own causal-LM class (resolved from `teacher_model_type`, e.g. llama ->
LlamaForCausalLM), whose decoder and LM head are adopted as `model` / `lm_head` (so weight names are
the teacher's), with layer i's `self_attn` replaced through `spec.install_mixers` (the function surgery
uses too) wherever the spec does not say "softmax". config.json is the teacher's config plus `hybrid_spec` (one mixer
name per layer; not `layer_types`, which transformers reserves for its caches), `hybrid_options`
(keyword options of the mixers, e.g. {"window": 512}) and `teacher_model_type`.

Generation, two ways with the same tokens:
  model.generate(...)        HF's loop with a HybridCache: the teacher's KV cache layers for the
                             softmax layers and a `mixer_states` dict (recurrent state, conv state,
                             the swa window) for the others; greedy, sampling, beams; eager.
  model.fast_generate(...)   (or generate(..., cache_implementation="static")) the static engine
                             (engine.py): caches allocated once at fixed size, the decode step a
                             CUDA graph on GPU; greedy or sampling (temperature, top_k), no beams.
The 2D padding mask reaches every mixer as `pad_mask` (B, T), so left-padded pads never enter a state.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # transformers < 5.2x: a placeholder with the same contract (holds nothing)
    class DummyLayer:
        is_initialized, is_compileable, is_croppable, keys, values = True, True, True, None, None

        def __init__(self, **kwargs):
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            raise NotImplementedError("mixer layers keep their state in HybridCache.mixer_states, not in KV")

        def offload(self): ...
        def prefetch(self): ...
        def reset(self): ...
        def reorder_cache(self, beam_idx): ...
        def crop(self, max_length): ...
        def batch_repeat_interleave(self, repeats): ...
        def batch_select_indices(self, indices): ...

        def get_seq_length(self, *args, **kwargs):
            return 0

        def get_max_cache_shape(self, *args, **kwargs):
            return -1

        def get_mask_sizes(self, cache_position, *args, **kwargs):
            return cache_position.shape[0], 0
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .engine import StaticEngine, cache_bytes_per_sequence
from .spec import SOFTMAX, check_spec, install_mixers

HYBRID_FIELDS = ("hybrid_spec", "hybrid_options", "teacher_model_type")
NOT_TEACHER_FIELDS = HYBRID_FIELDS + ("model_type", "auto_map", "architectures", "transformers_version")


class HybridConfig(PretrainedConfig):
    """The teacher's config fields (flat, so tools that read e.g. max_position_embeddings see them)
    plus hybrid_spec, hybrid_options and teacher_model_type."""

    model_type = "hybrid"

    def __init__(self, hybrid_spec: list[str] | None = None, hybrid_options: dict | None = None,
                 teacher_model_type: str = "llama", **kwargs):
        self.hybrid_spec = list(hybrid_spec or [])
        self.hybrid_options = dict(hybrid_options or {})
        self.teacher_model_type = teacher_model_type
        super().__init__(**kwargs)

    @classmethod
    def from_teacher(cls, teacher_config: PretrainedConfig, spec: list[str], options: dict | None = None) -> "HybridConfig":
        fields = {k: v for k, v in teacher_config.to_dict().items() if k not in NOT_TEACHER_FIELDS}
        return cls(hybrid_spec=spec, hybrid_options=options, teacher_model_type=teacher_config.model_type, **fields)


def teacher_config(config: HybridConfig) -> PretrainedConfig:
    """The teacher's own config class rebuilt from the hybrid config's fields."""
    if config.teacher_model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json: teacher_model_type={config.teacher_model_type!r} is not a model type this "
                         f"transformers knows; expected e.g. 'llama', 'qwen2', 'qwen3', 'mistral'")
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_TEACHER_FIELDS}
    tcfg = CONFIG_MAPPING[config.teacher_model_type](**fields)
    tcfg._attn_implementation = config._attn_implementation
    return tcfg


class HybridCache(DynamicCache):
    """KV cache layers of the teacher for the softmax layers, DummyLayer placeholders for the mixer
    layers, whose states live in `mixer_states[layer_idx]` (the mixers read and overwrite them).
    `n_tokens` counts the tokens seen, for a model without any softmax layer (no KV to measure)."""

    def __init__(self, config: PretrainedConfig, spec: list[str]):
        super().__init__(config=config)  # the teacher's layer types (full or sliding attention)
        self.layers = [layer if name == SOFTMAX else DummyLayer() for layer, name in zip(self.layers, spec)]
        self.has_kv = SOFTMAX in spec
        self.mixer_states: dict[int, dict | None] = {}
        self.n_tokens = 0

    @property
    def is_compileable(self) -> bool:
        """False (the compiled, fixed-size path is the static engine, model.fast_generate): generate() auto-compiles the forward (CUDA graphs) for a cache whose layers are all
        compileable, which an all-linear spec's placeholders are; the mixer states in a plain dict
        are then overwritten between graph replays (seen on the H100: "To prevent overwriting,
        clone the tensor outside of torch.compile()")."""
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) if self.has_kv else self.n_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, layer_idx) if self.has_kv else (self.n_tokens + query_length, 0)

    def _map_states(self, fn) -> None:
        for i, state in self.mixer_states.items():
            if state is not None:
                self.mixer_states[i] = {k: fn(t) for k, t in state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.mixer_states.clear()
        self.n_tokens = 0

    @property
    def is_croppable(self) -> bool:
        return not self.mixer_states and super().is_croppable

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove and self.mixer_states:
            raise NotImplementedError("HybridCache.crop: recurrent mixer states cannot be rolled back, so assisted "
                                      "and contrastive decoding are not supported; use greedy, sampling or beams")
        super().crop(tokens_to_remove)


class HybridForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.teacher_config = tcfg = teacher_config(config)
        check_spec(config.hybrid_spec, tcfg.num_hidden_layers, "config.json: hybrid_spec")  # before any weights
        if type(tcfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(f"config.json: no causal-LM class for teacher_model_type={config.teacher_model_type!r}")
        teacher = MODEL_FOR_CAUSAL_LM_MAPPING[type(tcfg)](tcfg)
        self.model, self.lm_head = teacher.model, teacher.lm_head
        self._no_split_modules = teacher._no_split_modules  # device_map="auto" keeps decoder layers whole
        layers = getattr(self.model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "self_attn"):
            raise ValueError(f"{type(teacher).__name__}: no decoder layers at model.layers[i].self_attn; "
                             "supported: Llama, Mistral, Qwen2 and Qwen3 style decoders")
        install_mixers(layers, config.hybrid_spec, tcfg, config.hybrid_options)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def new_cache(self) -> HybridCache:
        return HybridCache(self.teacher_config, self.config.hybrid_spec)

    def cache_bytes_per_sequence(self, context: int, dtype: torch.dtype | None = None) -> int:
        """Generation cache bytes one sequence needs at `context` tokens (KV of the softmax layers
        plus each mixer's fixed-size state), what the static engine allocates per row."""
        return cache_bytes_per_sequence(self, context, dtype)

    @torch.no_grad()
    def fast_generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                      eos_token_id: int | None = None, pad_token_id: int | None = None,
                      **engine_options) -> torch.LongTensor:
        """generate() through the static engine: -> (B, T + max_new_tokens), prompt included. The
        engine (buffers + captured CUDA graph) is kept on the model and reused while the batch size
        matches, the length fits and engine_options (StaticEngine's compile, fused, pack, cuda_graph)
        are the same; `model.fast_engine = None` frees it."""
        B, T = input_ids.shape
        engine = getattr(self, "fast_engine", None)
        if engine is None or engine.batch != B or engine.max_len < T + max_new_tokens or \
                getattr(self, "fast_engine_options", {}) != engine_options:
            self.fast_engine = None  # free the old buffers before allocating new ones
            engine = self.fast_engine = StaticEngine(self, B, T + max_new_tokens, **engine_options)
            self.fast_engine_options = engine_options
        pad = self.generation_config.pad_token_id if pad_token_id is None else pad_token_id
        return engine.generate(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                               eos_token_id, 0 if pad is None else pad)

    def generate(self, *args, **kwargs):
        """HF generate(); cache_implementation="static" routes to fast_generate (greedy or sampling)."""
        if kwargs.get("cache_implementation") != "static":
            return super().generate(*args, **kwargs)
        kwargs.pop("cache_implementation")
        ids = args[0] if args else kwargs.pop("input_ids")
        allowed = {"attention_mask", "max_new_tokens", "do_sample", "temperature", "top_k", "eos_token_id",
                   "pad_token_id", "use_cache"}
        if set(kwargs) - allowed or kwargs.get("num_beams", 1) != 1:
            raise ValueError(f"generate(cache_implementation='static') takes {sorted(allowed)}; got "
                             f"{sorted(set(kwargs) - allowed)}: use generate() without it for beams and other modes")
        kwargs.pop("use_cache", None)
        eos = kwargs.get("eos_token_id", self.generation_config.eos_token_id)
        kwargs["eos_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos
        return self.fast_generate(ids, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """generate() would build a plain DynamicCache, which has no place for mixer states."""
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: a hybrid model "
                             "decodes with its own HybridCache only (leave cache_implementation unset)")
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.new_cache()
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T), attention_mask (B, past + T) with 0 at pads (left padding for batches)
        -> logits (B, T or logits_to_keep, V). A cache is created when use_cache and none is given."""
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if past_key_values is not None and not isinstance(past_key_values, HybridCache):
            raise ValueError(f"past_key_values is a {type(past_key_values).__name__}; a hybrid model needs the cache "
                             "from model.new_cache() (a plain KV cache has no place for the mixers' states)")
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
            kwargs.setdefault("pad_mask", attention_mask[:, -T:].bool())  # (B, T) True = real token
            if position_ids is None:  # count real tokens only, as generate() does: RoPE in rwkv7/swa is not shift-free
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if past_key_values is not None:
            past_key_values.n_tokens += T
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            kwargs.pop("pad_mask", None)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
