"""Pieces shared by the kernel references (op_gdn, op_gla, op_rwkv7).

Imports only torch and the stdlib: export.py copies it, with the op files, beside the exported
modeling file.
"""

import os
import warnings

import torch
import torch.nn.functional as F

IMPLS = ("auto", "recurrent", "chunked", "fla")
_warned_no_fla: set[str] = set()


def fla_module(name: str):
    """An fla module, imported now (lazily: fla needs triton and a GPU). Through __import__, not an
    import statement, so transformers' remote-code loader does not make fla a requirement of an export.
    Triton keeps fla's autotune results in its on-disk cache (TRITON_CACHE_AUTOTUNING, unless the user set
    it): every later process of a pipeline skips the ~minute of benchmarking a fresh machine spends per
    kernel family. The results are keyed by the kernel's source and tuning key, as Triton's own cache is."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    module = __import__(name)
    for part in name.split(".")[1:]:
        module = getattr(module, part)
    return module


def relative_errors(pairs) -> dict[str, float]:
    """pairs: (name, got, want) -> {name: largest |got - want| / largest |want|} in fp32: how a fast path
    is compared with its reference (op_decode.check_agrees, op_gdn's fla #640 check)."""
    return {n: float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)) for n, a, b in pairs}


def lazy_kernels(module_globals: dict, define):
    """-> kernels(): an op file's jitted Triton kernels, {name: kernel} from define(triton) on the first
    call, the same dict after. Triton comes through __import__, not an import statement, which
    transformers' remote-code check would make a requirement of every export. triton.language goes
    into the file's globals as `tl` first: Triton's JIT looks up the names its kernels use there."""
    cache = {}

    def kernels() -> dict:
        if not cache:
            triton = __import__("triton.language")  # the package, its language submodule loaded
            module_globals["tl"] = triton.language
            cache.update(define(triton))
        return cache
    return kernels


def fla_kernels(op: str, x: torch.Tensor, impl: str, load) -> tuple | None:
    """The fla kernels `load()` (no arguments) returns when they should run, else None (use the torch forms).

    impl "auto": fla for CUDA/ROCm tensors when it imports (one warning per op when it does not);
    "fla": fla or an error (CPU tensors, or fla missing). "recurrent"/"chunked" never get here.
    """
    if impl != "fla" and not x.is_cuda:
        return None
    if not x.is_cuda:
        raise ValueError(f"{op}: impl='fla' needs CUDA/ROCm tensors (fla's Triton kernels do not run on CPU); "
                         "use impl='auto' or 'chunked'")
    try:
        return load()
    except ImportError as e:
        if impl == "fla":
            raise ImportError(f"{op}: impl='fla' needs flash-linear-attention; "
                              "pip install flash-linear-attention==0.6.0 fla-core==0.6.0 packaging") from e
        if op not in _warned_no_fla:
            warnings.warn(f"fla not importable ({e}); using the torch chunked {op} on GPU (slow)")
            _warned_no_fla.add(op)
        return None


def pick_kernel(op: str, x: torch.Tensor, impl: str, module: str, chunk_name: str,
                recurrent_name: str) -> str | tuple:
    """The one kernel dispatcher of the op files: -> "recurrent" | "chunked" (the torch forms) or
    fla's (chunk_fn, fused_recurrent_fn) from fla's `module`.

    impl "recurrent" | "chunked" force a torch form; "auto" picks fla for CUDA/ROCm tensors when it
    imports, else the recurrent loop for a single token (x: (B, T, ...), T == 1) and the chunked
    form otherwise; "fla" forces fla (CUDA tensors and flash-linear-attention required)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r}; expected one of {IMPLS}")
    if impl in ("recurrent", "chunked"):
        return impl
    kernels = fla_kernels(op, x, impl, lambda: (getattr(fla_module(module), chunk_name),
                                                getattr(fla_module(module), recurrent_name)))
    if kernels is None:
        return "recurrent" if x.shape[1] == 1 else "chunked"
    return kernels


def needs_grad(*xs: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (tests), everything else computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pair_scores(x: torch.Tensor, y: torch.Tensor, Gx: torch.Tensor, Gy: torch.Tensor,
                 strict: bool) -> torch.Tensor:
    """sum_d x_id y_jd exp(Gx_id - Gy_jd) for j <= i (j < i if strict), 0 elsewhere.

    x, y, Gx, Gy: (B, H, n, C, K) -> (B, H, n, C, C); Gx_i - Gy_j <= 0 on every kept pair. Rows go
    in blocks of 16: pairs inside a block use the exact pairwise decay (a (16, 16, K) tensor), pairs
    with earlier keys j < s factor through the decay at key s-1 as a matmul,
    (x_i exp(Gx_i - Gy_{s-1})) . (y_j exp(Gy_{s-1} - Gy_j)), where both exponents are <= 0: no
    overflow, unlike the textbook x exp(G) . y exp(-G).
    """
    C = x.shape[3]
    idx = torch.arange(C, device=x.device)
    blocks = []
    for s in range(0, C, 16):
        e = min(s + 16, C)
        keep = idx[s:e, None] > idx[None, s:e] if strict else idx[s:e, None] >= idx[None, s:e]
        diff = Gx[:, :, :, s:e, None, :] - Gy[:, :, :, None, s:e, :]  # (B, H, n, e-s, e-s, K)
        decay = diff.masked_fill(~keep[..., None], float("-inf")).exp()
        parts = [(x[:, :, :, s:e, None, :] * y[:, :, :, None, s:e, :] * decay).sum(-1)]
        if s > 0:
            ref = Gy[:, :, :, s - 1:s]  # (B, H, n, 1, K)
            xs = x[:, :, :, s:e] * (Gx[:, :, :, s:e] - ref).exp()  # (B, H, n, e-s, K)
            ys = y[:, :, :, :s] * (ref - Gy[:, :, :, :s]).exp()  # (B, H, n, s, K)
            left = xs @ ys.transpose(-1, -2)
            parts.insert(0, left)
        blocks.append(F.pad(torch.cat(parts, dim=-1), (0, C - e)))
    return torch.cat(blocks, dim=3)


def to_chunks(x: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, n, chunk, ...) in `dtype`, T zero-padded to n = ceil(T / chunk) chunks
    (the chunked forms pad with zeros that leave the state untouched)."""
    B, T, H = x.shape[:3]
    n = max(1, -(-T // chunk))
    x = x.to(dtype)
    if n * chunk > T:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, n * chunk - T))
    return x.transpose(1, 2).reshape(B, H, n, chunk, *x.shape[3:])


def check_shapes(op: str, keys: dict[str, torch.Tensor], v: torch.Tensor, initial_state: torch.Tensor | None) -> None:
    """The inputs of a per-channel-decay op (gla, rwkv7): every tensor in `keys` (B, T, H, K), v (B, T, H, V),
    initial_state (B, H, K, V) as fla lays them out; a ValueError naming the op and every shape otherwise."""
    first = next(iter(keys.values()))
    if first.dim() != 4 or any(x.shape != first.shape for x in keys.values()) or v.dim() != 4 \
            or v.shape[:3] != first.shape[:3]:
        got = ", ".join(f"{name} {tuple(x.shape)}" for name, x in {**keys, "v": v}.items())
        raise ValueError(f"{op}: expected {', '.join(keys)} (B, T, H, K) and v (B, T, H, V); got {got}")
    B, T, H, K = first.shape
    V = v.shape[3]
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"{op}: expected initial_state of shape {(B, H, K, V)} ([B, H, K, V] like fla); "
                         f"got {tuple(initial_state.shape)}")
