"""Student token mixers that replace a teacher's `self_attn`, each initialised from it.

    mixer = build_mixer("gdn", teacher_layer.self_attn, teacher.config, layer_idx=3)
    y, _ = mixer(hidden_states, position_embeddings=(cos, sin))      # drop-in for HF self_attn
    y, state = mixer.mix(x, position_embeddings, state, pad_mask)     # tensor API, stateful decode

Every mixer copies the teacher's q/k/v/o projections (biases included) and its per-head q/k
RMSNorms (Qwen3), keeps k/v narrow under GQA and expands them per head block at run time
(q head h reads kv head h // (H // Hkv), like HF's repeat_kv), and adds its own gates. Equations,
init choices and the state/cache protocol: docs/mixers.md.

This file imports only torch, mixer_base.py and the op_* kernels: export.py copies those files
beside the exported modeling file, so none of them may import the rest of the package.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mixer_base import HeadRMSNorm, TeacherInitMixer, apply_rope, causal_conv, gated_rms_norm, up32, zero_pads
from .op_gdn import gdn
from . import op_gdn_prefill
from .op_decode import check_agrees
from .op_gdn_prefill import gated_rms_norm_prefill, gdn_prefill_inputs
from .op_gdn_step import check_once, gdn_step, supported as gdn_step_supported
from .op_gdn_train import gdn_train_inputs, gdn_train_norm
from .op_gla import gla
from .op_rwkv7 import rwkv7
from .mixer_swa import SlidingWindowMixer

# The kernels' dispatchers (fla's Triton kernels on GPU) stay outside torch.compile: a compiled
# decoder layer (hybrid/fastpath.py) fuses the elementwise work around them and calls them eagerly.
# Traced, their lazy fla imports and fla's own autotuned kernels break or bloat the graph.
gdn, gla, rwkv7 = (torch.compiler.disable(f) for f in (gdn, gla, rwkv7))
gdn_train_inputs, gdn_train_norm = (torch.compiler.disable(f) for f in (gdn_train_inputs, gdn_train_norm))
# GDN's inputs through op_gdn_train's Triton kernels (forward and backward) for whole rows from an empty state:
# "off" | "cuda" (CUDA tensors) | "always" (also the CPU interpreter's, for the tests). On GPU by default since their
# GPU test passed (2026-12-06): stage 2 3-4% less GPU time per step, stage-1 rotation 8-28% faster (docs/results.md).
GDN_TRAIN_KERNELS = "cuda"


class GatedDeltaNetMixer(TeacherInitMixer):
    """GatedDeltaNet: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(D),
    q/k = L2norm(SiLU(.)), beta = sigmoid(W_b x), g = -exp(A_log) softplus(W_a x + dt_bias),
    y = o_proj(RMSNorm(o) * SiLU(W_g x)). Optional short causal conv on q/k/v, identity at init."""

    mixer_name = "gdn"

    def __init__(self, teacher_attn: nn.Module, config, layer_idx: int, conv_size: int = 4):
        super().__init__(teacher_attn, config, layer_idx)
        H, D, C = self.n_heads, self.head_dim, self.hidden_size
        self.conv_size = conv_size
        if conv_size > 1:
            self.conv_weight = nn.Parameter(torch.zeros((H + 2 * self.n_kv_heads) * D, conv_size))
            with torch.no_grad():
                self.conv_weight[:, -1] = 1.0  # identity: the teacher's q/k/v pass through unchanged
        self.b_proj = nn.Linear(C, H, bias=False)
        self.a_proj = nn.Linear(C, H, bias=False)
        self.g_proj = nn.Linear(C, H * D, bias=False)
        self.o_norm = HeadRMSNorm(D, self.eps)
        # Mamba-2 init: A ~ U(1, 16), dt ~ logU(1e-3, 1e-1) through softplus -> decays from ~0.999 to ~0.2
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def cache_shapes(self, batch: int, dtype: torch.dtype) -> dict:
        shapes = super().cache_shapes(batch, dtype)  # S
        if self.conv_size > 1:
            shapes["conv"] = ((batch, self.conv_size - 1, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim), dtype)
        return shapes

    def mix(self, x: torch.Tensor, position_embeddings=None, state: dict | None = None,
            pad_mask: torch.Tensor | None = None, output_state: bool = True) -> tuple[torch.Tensor, dict | None]:
        """x (B, T, C) -> y (B, T, C), state {"S": (B, H, D, D) fp32, "conv": (B, W-1, Cqkv)}."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self._train_kernels(x, state, pad_mask, output_state):
            P, _ = self.project_packed(x, self.a_proj, self.b_proj, self.g_proj)
            q, k, v, beta, g, gate = gdn_train_inputs(P, self.conv_weight if self.conv_size > 1 else None, self.A_log,
                                                      self.dt_bias, H, Hkv, D)
            o, _ = gdn(q, k, v, g, beta, output_final_state=False, impl=self.impl)
            return self.o_proj(gdn_train_norm(o, gate, self.o_norm.weight, self.o_norm.eps)), None
        x = zero_pads(x, pad_mask)
        q, k, v, a, b, gate = self.project(x, self.a_proj, self.b_proj, self.g_proj)  # one matmul
        m = None if pad_mask is None else pad_mask.to(x.dtype)[..., None, None]  # (B, T, 1, 1)
        new_state = {}
        if self.conv_size > 1:
            qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # (B, T, (H + 2 Hkv) D)
            if m is not None:
                qkv = qkv * m[..., 0]  # pads contribute nothing to later tokens' conv windows
            qkv, new_state["conv"] = causal_conv(qkv, self.conv_weight, None if state is None else state["conv"])
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        # q/k in v's dtype, as the kernel takes them (under autocast F.normalize returns fp32): cast here,
        # where a compiled layer fuses it into the norm and the GQA expansion moves half the bytes
        q = F.normalize(F.silu(q), dim=-1).to(v.dtype)
        k = F.normalize(F.silu(k), dim=-1).to(v.dtype)
        k, v = self.expand_kv(k), self.expand_kv(v)
        beta = torch.sigmoid(up32(b))  # (B, T, H)
        g = -up32(self.A_log).exp() * F.softplus(up32(a) + up32(self.dt_bias))
        if m is not None:  # beta = 0, g = 0, k = 0 at pads: the state passes through unchanged
            beta, g, k = beta * m[..., 0], g * m[..., 0], k * m
        # beta and g in (at least) fp32, beside bf16 q/k/v under autocast: fla accepts both
        o, S = gdn(q, k, v, g, beta, initial_state=None if state is None else state["S"],
                   output_final_state=output_state, impl=self.impl)
        o = gated_rms_norm(o, gate.view(B, T, H, D), self.o_norm)
        new_state["S"] = S
        return self.o_proj(o.reshape(B, T, H * D)), (new_state if output_state else None)

    def _train_kernels(self, x, state, pad_mask, output_state: bool) -> bool:
        """Whether mix() takes op_gdn_train's kernels: GDN_TRAIN_KERNELS allows them for x, and the call is a
        training forward's (whole rows, no state in or out) of a layer they cover (packed projections,
        no q/k norms, head_dim a power of two >= 16)."""
        on = GDN_TRAIN_KERNELS == "always" or (GDN_TRAIN_KERNELS == "cuda" and x.is_cuda)
        return (on and state is None and pad_mask is None and not output_state and self.q_norm is None
                and self.k_norm is None and self.packable(self.a_proj, self.b_proj, self.g_proj)
                and self.head_dim >= 16 and not self.head_dim & (self.head_dim - 1))

    def fused_decode_supported(self) -> bool:
        """Whether decode_inplace (op_gdn_step's Triton kernels) can run this layer's shapes."""
        return gdn_step_supported(self.head_dim) and self.n_heads % self.n_kv_heads == 0

    def decode_linears(self) -> list[nn.Linear]:
        """The projections of decode_inplace's input, in the order of its `proj` argument."""
        return [self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj]

    @torch.no_grad()
    def prefill_fused(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """A prompt from an empty state, as mix(x, None, None, pad_mask) -> (y, state), with the
        elementwise work around the chunk kernel in op_gdn_prefill's two Triton kernels: the static
        engine's prefill where its fused decode runs (the same shapes: fused_decode_supported). The
        first call per device and dtype also runs mix() and raises if they disagree (check_agrees)."""
        y, state = self._prefill_fused(x, pad_mask)
        key = (x.device, x.dtype)
        if key not in op_gdn_prefill.CHECKED:
            want_y, want = self.mix(x, None, None, pad_mask)
            real = (slice(None),) if pad_mask is None else (pad_mask,)  # outputs at pads are never read
            check_agrees(f"the fused GDN prefill kernels (op_gdn_prefill) disagree with mix() on {x.device} {x.dtype}",
                         [("output", y[real], want_y[real])] + [(n, state[n], want[n]) for n in want])
            op_gdn_prefill.CHECKED.add(key)
        return y, state

    def _prefill_fused(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        x = zero_pads(x, pad_mask)
        q, k, v, a, b, gate = self.project(x, self.a_proj, self.b_proj, self.g_proj)
        state = {}
        if self.conv_size > 1:  # the window a decode continues from: the last W - 1 (masked) inputs
            W = self.conv_size
            tail = torch.cat([t[:, max(0, T - W + 1):].flatten(2) for t in (q, k, v)], dim=-1)
            if pad_mask is not None:
                tail = tail * pad_mask[:, max(0, T - W + 1):, None].to(tail.dtype)
            state["conv"] = F.pad(tail, (0, 0, W - 1 - tail.shape[1], 0))
        q, k, v, beta, g = gdn_prefill_inputs(q, k, v, a, b, self.conv_weight if self.conv_size > 1 else None,
                                              self.A_log, self.dt_bias, pad_mask, self.head_dim)
        o, state["S"] = gdn(q, k, v, g, beta, output_final_state=True, impl=self.impl)
        return self.o_proj(gated_rms_norm_prefill(o, gate, self.o_norm.weight, self.o_norm.eps)), state

    @torch.compiler.disable  # a compiled engine layer calls the Triton kernel eagerly between its graphs
    def decode_inplace(self, x: torch.Tensor, state: dict, proj: tuple | None = None) -> torch.Tensor:
        """One decode token, x (B, 1, C) -> y (B, 1, C), as mix(x, state=state) with state["S"] and
        state["conv"] updated in place: the static engine's fused step (no padding at decode). proj:
        the outputs of decode_linears() for x, e.g. from one packed matmul (computed here if None).
        The first call on a device and dtype checks the kernel against mix() (op_gdn_step.check_once)."""
        check_once(x, state, lambda s: self.decode_inplace(x, s), lambda s: self.mix(x, None, s))
        B = x.shape[0]
        q, k, v, a, b, g = (t.reshape(B, -1) for t in (proj or (lin(x) for lin in self.decode_linears())))
        if self.q_norm is not None:  # Qwen3's per-head norms, as project() applies them
            q = self.q_norm(q.view(B, self.n_heads, -1)).reshape(B, -1)
            k = self.k_norm(k.view(B, self.n_kv_heads, -1)).reshape(B, -1)
        o = gdn_step(q, k, v, a, b, g, state.get("conv"), self.conv_weight if self.conv_size > 1 else None, state["S"],
                     self.A_log, self.dt_bias, self.o_norm.weight, self.o_norm.eps)
        return self.o_proj(o).view(B, 1, -1)


class GLAMixer(TeacherInitMixer):
    """Gated linear attention: S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(D),
    log alpha_t = logsigmoid(W_up W_down x + b) / 16 (low-rank forget gate with fla's normaliser),
    y = o_proj(RMSNorm(o) * SiLU(W_g x)). q/k as the teacher's (no feature map, as fla's default)."""

    mixer_name = "gla"

    def __init__(self, teacher_attn: nn.Module, config, layer_idx: int, gate_rank: int = 16,
                 gate_normalizer: float = 16.0):
        super().__init__(teacher_attn, config, layer_idx)
        H, D, C = self.n_heads, self.head_dim, self.hidden_size
        self.gate_normalizer = gate_normalizer
        self.gk_down = nn.Linear(C, gate_rank, bias=False)
        self.gk_up = nn.Linear(gate_rank, H * D, bias=True)
        nn.init.xavier_uniform_(self.gk_down.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.gk_up.weight, gain=2 ** -2.5)
        nn.init.zeros_(self.gk_up.bias)  # alpha ~ exp(logsigmoid(0) / 16) ~ 0.958 per token at init
        self.g_proj = nn.Linear(C, H * D, bias=False)
        self.o_norm = HeadRMSNorm(D, self.eps)

    def mix(self, x: torch.Tensor, position_embeddings=None, state: dict | None = None,
            pad_mask: torch.Tensor | None = None, output_state: bool = True) -> tuple[torch.Tensor, dict | None]:
        """x (B, T, C) -> y (B, T, C), state {"S": (B, H, D, D) fp32}."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        x = zero_pads(x, pad_mask)
        q, k, v, gate = self.project(x, self.g_proj)  # one matmul
        k, v = self.expand_kv(k), self.expand_kv(v)
        gk = F.logsigmoid(up32(self.gk_up(self.gk_down(x)))).view(B, T, H, D) / self.gate_normalizer
        if pad_mask is not None:  # k = 0 and no decay at pads
            m = pad_mask.to(x.dtype)[..., None, None]
            k, gk = k * m, gk * m
        o, S = gla(q, k, v, gk, initial_state=None if state is None else state["S"],
                   output_final_state=output_state, impl=self.impl)
        o = gated_rms_norm(o, gate.view(B, T, H, D), self.o_norm)
        return self.o_proj(o.reshape(B, T, H * D)), ({"S": S} if output_state else None)


def _lora_rank(C: int, exponent: float, multiplier: float) -> int:
    """RWKV-7's LoRA sizes: a multiple of 32 growing like C**exponent."""
    return max(1, round(C ** exponent * multiplier / 32)) * 32


class RWKV7Mixer(TeacherInitMixer):
    """RAD-RWKV7 (RADLADS, arXiv 2505.03005): RWKV-7's DPLR state update with the teacher's r/k/v/o,
    RoPE on r/k, no token shift, no bonus, no group norm (output scaled by D**-0.5 instead):
        S_t = (diag(w_t) - kk_t (kk_t * a_t)^T) S_{t-1} + k~_t v_t^T,   o_t = S_t^T r_t / sqrt(D)
        w_t = exp(-e^-0.5 sigmoid(w0 + tanh(x W1) W2)),  a_t = sigmoid(a0 + x A1 A2)
        kk_t = L2norm(k_t * k_k),  k~_t = k_t (1 + (a_t - 1) k_a),  y = o_proj(o * (sigmoid(x G1) G2))."""

    mixer_name = "rwkv7"

    def __init__(self, teacher_attn: nn.Module, config, layer_idx: int):
        super().__init__(teacher_attn, config, layer_idx)
        H, D, C = self.n_heads, self.head_dim, self.hidden_size
        n_layers = int(getattr(config, "num_hidden_layers", 1) or 1)
        r_decay, r_gate = _lora_rank(C, 0.5, 1.8), _lora_rank(C, 0.8, 0.6)
        depth = layer_idx / max(n_layers - 1, 1)  # 0 (first layer) .. 1 (last)
        n = torch.arange(H * D, dtype=torch.float32) / max(H * D - 1, 1)
        # per-channel decay speeds from RWKV-7: w from ~0.999 (slow channels) to ~0.9 (fast), + 0.5 as RADLADS
        self.w0 = nn.Parameter((-7.0 + 5.0 * n ** (0.85 + depth ** 0.5) + 0.5).view(H, D))
        self.w1 = nn.Parameter(torch.zeros(C, r_decay))
        self.w2 = nn.Parameter(nn.init.orthogonal_(torch.empty(r_decay, H * D), gain=0.1))
        self.a0 = nn.Parameter(torch.zeros(H, D))  # in-context learning rate a = 0.5 at init
        self.a1 = nn.Parameter(torch.zeros(C, r_decay))
        self.a2 = nn.Parameter(nn.init.orthogonal_(torch.empty(r_decay, H * D), gain=0.1))
        self.g1 = nn.Parameter(torch.zeros(C, r_gate))
        # RADLADS' gate init: g = sigmoid(0) G2 ~ +-0.03, so the layer starts near "attention removed".
        # A gate of 1 was measured far worse: without group norm the un-normalised state read-out is
        # several times the teacher's output (SmolLM2-135M, one layer swapped: KL 8.5 vs 0.06).
        self.g2 = nn.Parameter(nn.init.orthogonal_(torch.empty(r_gate, H * D), gain=0.1))
        self.k_k = nn.Parameter(torch.full((H, D), 0.85))
        self.k_a = nn.Parameter(torch.ones(H, D))

    def mix(self, x: torch.Tensor, position_embeddings=None, state: dict | None = None,
            pad_mask: torch.Tensor | None = None, output_state: bool = True) -> tuple[torch.Tensor, dict | None]:
        """x (B, T, C), position_embeddings (cos, sin) (B or 1, T, D) -> y (B, T, C), state {"S": (B, H, D, D) fp32}."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        x = zero_pads(x, pad_mask)
        r, k, v = self.project(x)
        r = apply_rope(r, position_embeddings, f"rwkv7 mixer (layer {self.layer_idx})")
        k = apply_rope(k, position_embeddings, f"rwkv7 mixer (layer {self.layer_idx})")
        k, v = self.expand_kv(k), self.expand_kv(v)
        xf = up32(x)
        w0, w1, w2, a0, a1, a2, g1, g2 = (up32(p) for p in (self.w0, self.w1, self.w2, self.a0, self.a1, self.a2,
                                                            self.g1, self.g2))
        w = -math.exp(-0.5) * torch.sigmoid(w0 + (torch.tanh(xf @ w1) @ w2).view(B, T, H, D))  # log decay
        a = torch.sigmoid(a0 + ((xf @ a1) @ a2).view(B, T, H, D))  # in-context learning rate
        gate = (torch.sigmoid(xf @ g1) @ g2).view(B, T, H, D)
        kk = F.normalize(up32(k) * up32(self.k_k), dim=-1)
        k = (up32(k) * (1 + (a - 1) * up32(self.k_a))).to(v.dtype)
        if pad_mask is not None:  # k = 0, w = 0 (no decay), a = 0 (b = 0): identity transition at pads
            m = pad_mask.to(xf.dtype)[..., None, None]
            k, w, a = k * m.to(k.dtype), w * m, a * m
        o, S = rwkv7(r, w.to(v.dtype), k, v, (-kk).to(v.dtype), (kk * a).to(v.dtype), scale=D ** -0.5,
                     initial_state=None if state is None else state["S"], output_final_state=output_state,
                     impl=self.impl)
        o = o * gate.to(o.dtype)
        return self.o_proj(o.reshape(B, T, H * D)), ({"S": S} if output_state else None)


MIXERS: dict[str, type[nn.Module]] = {
    "gdn": GatedDeltaNetMixer, "gla": GLAMixer, "rwkv7": RWKV7Mixer, "swa": SlidingWindowMixer}


def build_mixer(name: str, teacher_attn: nn.Module, config, layer_idx: int, **options) -> nn.Module:
    """A `name` mixer initialised from `teacher_attn` (an HF attention with q/k/v/o_proj), on the
    teacher's device and dtype. options go to the mixer (gdn: conv_size; gla: gate_rank,
    gate_normalizer; swa: window)."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; expected one of {sorted(MIXERS)} (or 'softmax', "
                         "the teacher's own attention, which surgery keeps)")
    weight = teacher_attn.q_proj.weight if isinstance(getattr(teacher_attn, "q_proj", None), nn.Linear) else None
    mixer = MIXERS[name](teacher_attn, config, layer_idx, **options)
    return mixer if weight is None else mixer.to(device=weight.device, dtype=weight.dtype)
