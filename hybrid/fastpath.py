"""The GPU fast path of training: regional compile of decoder layers. (The other half, the teacher
targets the GA-S2 candidates share, is hybrid/stage2.py's TeacherTargets.)

    compile_layers(student); compile_layers(teacher)        # each decoder layer, in place

Regional compile: torch.compile of every decoder layer instead of the whole model. The layers of
one kind share their code, so dynamo compiles one graph per kind of layer (GDN, softmax; grad on
or off) and reuses it for the others: seconds instead of the ~160 s of a whole-model compile,
which traces all 30 layers and breaks its graph at every fla kernel. Inside a layer, inductor
fuses the elementwise work around the kernels (conv, SiLU, L2 norm, GQA expansion, fp32 gates,
gated RMSNorm, residuals, the MLP's SiLU-mul); the fla kernels themselves run eagerly between
the fused graphs (mixers.py marks them `torch.compiler.disable`). write_profile: where a profiled
step's time went (distill.py --profile=True).
"""

import os

import torch
from torch import nn

from .common import is_master, print0
from .surgery import decoder_layers


def compile_layers(model: nn.Module, device: torch.device | str | None = None) -> int:
    """torch.compile each decoder layer of `model` in place (state-dict keys unchanged), on CUDA
    only: on CPU a compile costs more than it saves. -> the number of layers compiled (0 on CPU)."""
    layers = decoder_layers(model)
    if device is None:
        device = next(model.parameters()).device
    if torch.device(device).type != "cuda":
        return 0
    # one compiled graph per kind of layer and grad mode (teacher, student, eval) must fit the cache
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def compile_report() -> str:
    """One line on what torch.compile has done in this process: graphs compiled, and inductor's FX-graph
    cache and AOT autograd's cache hits and misses (a slow first step with misses is compiling; one with
    hits is waiting on something else, e.g. kernels' JIT or autotuning)."""
    from torch._dynamo.utils import counters
    n = lambda group, name: counters[group][name]  # noqa: E731  (a Counter: 0 when absent)
    return (f"compile: {n('stats', 'unique_graphs')} graphs | FX graph cache {n('inductor', 'fxgraph_cache_hit')} hit, "
            f"{n('inductor', 'fxgraph_cache_miss')} miss | AOT autograd cache {n('aot_autograd', 'autograd_cache_hit')} "
            f"hit, {n('aot_autograd', 'autograd_cache_miss')} miss")


def write_profile(prof, run_dir: str) -> None:
    """A torch.profiler run's top ops, by device time (GPU) or CPU time, to stdout and run_dir/profile.txt."""
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    print0(table)
    if is_master():
        with open(os.path.join(run_dir, "profile.txt"), "w") as f:
            f.write(table)
