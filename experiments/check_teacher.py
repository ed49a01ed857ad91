"""Check that the normalised teacher in models/ is the GGUF teacher: same logits.

python -m experiments.check_teacher --gguf=/path/SmolLM2-135M-Instruct.Q4_1.gguf --teacher=models/SmolLM2-135M-Instruct.Q4_1
models/ holds bf16 safetensors, so the GGUF load (dequantised fp32) is rounded to bf16 for the exact
comparison; the max difference to the unrounded fp32 load is printed too.
"""

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybrid.common import run_script

GGUF = ""
TEACHER = "models/SmolLM2-135M-Instruct.Q4_1"
PROMPT = "The capital of France is Paris. The capital of Germany is"


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    m = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32)
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)], device=device)
    with torch.no_grad():
        g32 = g.to(device)(ids).logits
        for p in g.parameters():  # parameters only: rounding the RoPE inv_freq buffer would change the model
            p.data = p.data.to(torch.bfloat16).to(torch.float32)
        gb = g(ids).logits
        mb = m.to(device)(ids).logits
    print(f"models/ vs GGUF rounded to bf16: max |dlogit| = {(mb - gb).abs().max().item():.3e} (exact: {torch.equal(mb, gb)})")
    print(f"models/ vs GGUF fp32 dequant:    max |dlogit| = {(mb - g32).abs().max().item():.3e}")
    print("greedy next token:", repr(tok.decode(mb[0, -1].argmax())), "| GGUF:", repr(tok.decode(g32[0, -1].argmax())))


if __name__ == "__main__":
    run_script(globals(), main)
