"""Triton kernels, each with a plain-PyTorch reference beside it: fused flash attention (attention.py; on Hopper its
forward and backward are the Gluon kernels in attention_hopper.py) and fused LoRA linear (lora.py)."""

LORA_MAX_RANK = 64  # the largest rank lora.py's kernel serves; here, so that ../lora.py can read it without Triton
