"""CPU-seconds of the units distill.sh's CPU budget is made of, on a SmolLM2-135M-shaped random model.

OMP_NUM_THREADS=1 python -m experiments.cpu_costs
CPU time of this process (user + system), not wall time: it stays meaningful on a shared machine,
and an idle 2-core machine runs each unit in roughly its CPU-seconds / 1.6 of wall time. Multiply by
the counts in distill.sh (30 layers x STEPS_PER_LAYER, STAGE2_STEPS, selection steps, recall
prompts) to budget a smoke run. Measured here (2026-12-02, shared 2-core machine, --repeats=1):
stage-1 layer step 512 tok 0.22, stage-2 step 512 tok 8.1 / 256 tok 4.6, selection step 128 tok
2.6, teacher forward 512 tok 1.1, generate 2 x 512 + 16 tokens 3.9 (teacher) / 5.1 (GDN hybrid,
torch reference).
"""

import contextlib
import resource

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid.capture import LatentCache, layer_call
from hybrid.common import run_script
from hybrid.stage2 import KLStudent, accumulate_kl
from hybrid.surgery import build_student

# -----------------------------------------------------------------------------
REPEATS = 3                     # timed repetitions of each unit (after one untimed)
NEW_TOKENS = 16                 # generated tokens per recall-like prompt
# -----------------------------------------------------------------------------


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> float:
    fn()
    t0 = cpu_seconds()
    for _ in range(REPEATS):
        fn()
    return (cpu_seconds() - t0) / REPEATS


def batch(B: int, T: int):
    x = torch.randint(0, 49152, (B, T + 1))
    return x[:, :-1], x[:, 1:]


class RandomBatches:
    def __init__(self, B: int, T: int):
        self.B, self.T = B, T

    def next_batch(self):
        return batch(self.B, self.T)


def main():
    import export
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True,
                      max_position_embeddings=8192)
    teacher = LlamaForCausalLM(cfg).eval()
    spec = ["gdn"] * 14 + ["softmax"] + ["gdn"] * 14 + ["softmax"]
    student = build_student(teacher, spec).requires_grad_(True).train()
    model, cpu, rows = KLStudent(student, 1.0, 0.0, 4096), torch.device("cpu"), []
    for B, T, what in ((4, 128, "stage-2 step, 512 tokens"), (2, 128, "stage-2 step, 256 tokens"),
                       (2, 64, "selection step, 128 tokens")):
        rows.append((what, timed(lambda: accumulate_kl(model, teacher, RandomBatches(B, T), 1, cpu,
                                                       contextlib.nullcontext()))))
    with torch.no_grad():
        rows.append(("teacher forward, 512 tokens", timed(lambda: teacher.model(input_ids=batch(4, 128)[0]))))
    cache = LatentCache(teacher, [batch(4, 128)[0]], cpu)
    cache.advance_to(0)

    def layer_step():
        out = layer_call(student.model.layers[0], cache.latents[0], cache.pe, cache.pos)
        ((out - cache.targets(0, "layer")) ** 2).mean().backward()
    rows.append(("stage-1 layer step, 512 tokens", timed(layer_step)))
    hybrid = export.hybrid_model(student, spec, {}).eval()
    for name, m in (("teacher", teacher), ("hybrid", hybrid)):
        ids = torch.randint(1, 49152, (2, 512))
        with torch.no_grad():
            rows.append((f"{name} generate 2 x 512 + {NEW_TOKENS}", timed(lambda: m.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False))))
    print(f"{'unit':<36} {'cpu-s':>7}")
    for what, s in rows:
        print(f"{what:<36} {s:>7.2f}")


if __name__ == "__main__":
    run_script(globals(), main)
