"""Triton kernels, each with a plain-PyTorch reference beside it: fused flash attention (attention.py) and
fused LoRA linear (lora.py)."""
