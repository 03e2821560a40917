"""Triton kernels, each with a plain-PyTorch reference beside it: fused flash attention (attention.py; on Hopper its
forward is the Gluon kernel in attention_hopper.py) and fused LoRA linear (lora.py)."""
