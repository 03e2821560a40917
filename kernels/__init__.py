"""Triton kernels, each with a plain-PyTorch reference beside it: fused flash attention (attention.py; on Hopper its
forward and backward are the Gluon kernels in attention_hopper.py) and fused LoRA linear (lora.py)."""
