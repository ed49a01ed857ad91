"""The shipped model: exactly the files export.py copies into an export folder.

modeling_hybrid (HF config, model class, HybridCache), engine (static caches + CUDA-graph decode:
model.fast_generate), spec (spec parsing and the one layer-stack
builder), mixers + mixer_base (the student mixers), op_common + op_gdn/op_gla/op_rwkv7 (kernels:
recurrent reference, chunked torch, fla dispatch). These files import only torch, transformers
(modeling_hybrid alone) and each other, relatively: an export loads without this repo installed.
Nothing is imported here, so `import hybrid.model.mixers` does not pull in transformers.
"""
