"""hybrid: distill a softmax-attention decoder LM into a linear/softmax hybrid.

The library does nothing at import time; scripts at the repo root import its modules.
"""
