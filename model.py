"""The networks of Cosmos-Predict2.5, written from scratch and readable top to bottom.

1. DiT: the video2world diffusion transformer (the reference's MinimalV1LVGDiT over MiniTrainDIT).
   Parameter names equal the official checkpoint keys with the `net.` prefix removed.
2. WanVAE: the Wan2.1 causal video VAE (the reference's "tokenizer"); keys equal `tokenizer.pth`.
3. TextEncoder: the Qwen2.5 language model of Cosmos-Reason1-7B -> [B, 512, 100352] embeddings.
4. Checkpoint files, and the one strict key check every loader uses.

Numerics of the DiT follow the reference's "wan fp32 strategy": the timestep embedding, every adaLN modulation, the
final layer and q/k around RoPE run in fp32; everything else runs in the parameter dtype (bf16 in training).
"""

import contextlib
import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import kernels  # this repository's Triton kernels; each submodule loads where it runs (Triton is heavy)

if Path(kernels.__file__).resolve().parent != Path(__file__).resolve().parent / "kernels":
    raise ImportError(f"'kernels' is {kernels.__file__}, not {Path(__file__).parent / 'kernels'}: another package of "
                      "that name (PyPI's `kernels`, which transformers imports) was imported first. Load transformers "
                      "through tests/oracles.py's bind_oracles() before this file (see the README).")

# ----------------------------------------------------------------------------------------------------------------
# 1. DiT
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    # field names follow the official net kwargs (cosmos_predict2/.../configs/video2world/defaults/net.py)
    max_img_h: int = 240
    max_img_w: int = 240
    max_frames: int = 128
    in_channels: int = 16  # latent channels; the condition mask and the padding mask are added on top
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    concat_padding_mask: bool = True
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024
    use_crossattn_projection: bool = True
    crossattn_proj_in_channels: int = 100352  # 28 Qwen2.5-7B layers x 3584
    adaln_lora_dim: int = 256
    rope_h_extrapolation_ratio: float = 3.0
    rope_w_extrapolation_ratio: float = 3.0
    rope_t_extrapolation_ratio: float = 1.0
    # ours, not the reference's: "triton" = kernels/attention.py on CUDA (SDPA elsewhere; BENCHMARKS.md compares
    # them); "sdpa" = PyTorch SDPA, cuDNN first on CUDA
    attention_backend: str = "triton"

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads


DIT_PRESETS = {
    "cosmos_2b": DiTConfig(),
    "cosmos_14b": DiTConfig(model_channels=5120, num_blocks=36, num_heads=40),
    # small enough to train on a CPU; head dim 64 so the Triton kernels cover it too
    "tiny": DiTConfig(model_channels=128, num_blocks=4, num_heads=2, adaln_lora_dim=32, crossattn_emb_channels=128,
                      crossattn_proj_in_channels=256, max_img_h=64, max_img_w=64, max_frames=32),
}

DIT_BOOKKEEPING_KEYS = ("accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration",
                        "accum_train_in_hours")
DIT_ROPE_BUFFER_KEYS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range")


class Fp32Linear(nn.Linear):
    """A Linear that always computes in fp32 (the reference wraps these layers in an fp32 autocast region)."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def fused_on_cuda(fn):
    """`fn` compiled by torch.compile for 16-bit CUDA inputs (the blocks' activations), eager otherwise. Compiled, an
    elementwise function is one kernel that reads its inputs and writes its output once, where eager runs a pass
    over the activations per op. The fp32 calls (once a forward) stay eager: torch.compile keeps at most eight graph
    variants a function and runs the rest eager with a warning. Graph breaks are caught by tests/test_dit.py
    (fullgraph=True would raise mid-run)."""
    compiled = functools.cache(lambda: torch.compile(fn))  # made at the first CUDA call: importing Inductor is slow

    @functools.wraps(fn)
    def run(x, *args):
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            return compiled()(x, *args)
        return fn(x, *args)

    return run


@fused_on_cuda
def rms_norm_fp32(x, weight, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, normalising in fp32 (Transformer Engine's RMSNorm numerics)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm_fp32(x, self.weight, self.eps)


class PatchEmbed(nn.Module):
    """Cut [B,C,T,H,W] into pt x p x p patches, flattened channel-major (feature c*pt*p*p + r*p*p + m*p + n), and
    project each to D."""

    def __init__(self, patch_spatial, patch_temporal, in_channels, out_channels):
        super().__init__()
        self.p, self.pt = patch_spatial, patch_temporal
        patch_dim = in_channels * patch_spatial * patch_spatial * patch_temporal
        # index 0 holds the reference's parameter-free Rearrange (done in forward), so the Linear keeps its key
        self.proj = nn.Sequential(nn.Identity(), nn.Linear(patch_dim, out_channels, bias=False))

    def forward(self, x_B_C_T_H_W):
        B, C, T, H, W = x_B_C_T_H_W.shape
        p, pt = self.p, self.pt
        x = x_B_C_T_H_W.reshape(B, C, T // pt, pt, H // p, p, W // p, p)  # [B,C,T',pt,H',p,W',p]
        return self.proj(x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4))  # [B,T',H',W',D]


class VideoRopePosition3DEmb(nn.Module):
    """3D rotary embedding: head dim split into t/h/w parts (44/42/42 for D=128), NTK-scaled bases. The exponent
    ranges and positions are persistent buffers because the released checkpoints store them bf16-rounded and the
    reference network uses what it loads."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim_h = cfg.head_dim // 6 * 2
        dim_t = cfg.head_dim - 2 * dim_h
        self.max_h, self.max_w = cfg.max_img_h // cfg.patch_spatial, cfg.max_img_w // cfg.patch_spatial
        self.max_t = cfg.max_frames // cfg.patch_temporal
        self.register_buffer("seq", torch.arange(max(self.max_h, self.max_w, self.max_t), dtype=torch.float32))
        self.register_buffer("dim_spatial_range", torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h)
        self.register_buffer("dim_temporal_range", torch.arange(0, dim_t, 2)[: dim_t // 2].float() / dim_t)
        self.h_theta = 10000.0 * cfg.rope_h_extrapolation_ratio ** (dim_h / (dim_h - 2))
        self.w_theta = 10000.0 * cfg.rope_w_extrapolation_ratio ** (dim_h / (dim_h - 2))
        self.t_theta = 10000.0 * cfg.rope_t_extrapolation_ratio ** (dim_t / (dim_t - 2))

    def forward(self, T, H, W):
        """Returns (cos, sin), each [T*H*W, head_dim] in fp32, token order (t, h, w) row-major."""
        if T > self.max_t or H > self.max_h or W > self.max_w:
            raise ValueError(f"latent grid (T={T}, H={H}, W={W}) in patches exceeds the RoPE table "
                             f"(max_t={self.max_t}, max_h={self.max_h}, max_w={self.max_w})")
        seq = self.seq.float()
        freqs_h = 1.0 / self.h_theta ** self.dim_spatial_range.float()  # [dim_h/2]
        freqs_w = 1.0 / self.w_theta ** self.dim_spatial_range.float()  # [dim_h/2]
        freqs_t = 1.0 / self.t_theta ** self.dim_temporal_range.float()  # [dim_t/2]
        angles_t = torch.outer(seq[:T], freqs_t)[:, None, None, :].expand(T, H, W, -1)
        angles_h = torch.outer(seq[:H], freqs_h)[None, :, None, :].expand(T, H, W, -1)
        angles_w = torch.outer(seq[:W], freqs_w)[None, None, :, :].expand(T, H, W, -1)
        half = torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(T * H * W, -1)  # [L, D/2]
        angles = torch.cat([half, half], dim=-1)  # [L, D]
        return angles.cos(), angles.sin()


@fused_on_cuda
def apply_rope(x_B_L_H_D, cos_L_D, sin_L_D):
    """Rotate-half RoPE, computed in fp32 (the reference upcasts q and k before rotating)."""
    x = x_B_L_H_D.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x * cos_L_D[None, :, None, :] + rotated * sin_L_D[None, :, None, :]
    return out.to(x_B_L_H_D.dtype)


SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


def attention(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D, backend="triton"):
    """Non-causal multi-head attention on [B,S,H,D] tensors; the one place the DiT's attention runs."""
    if backend not in ("triton", "sdpa"):
        raise ValueError(f"attention_backend must be 'triton' or 'sdpa', got {backend!r}")
    if backend == "triton" and q_B_S_H_D.is_cuda:
        from kernels.attention import flash_attention  # Triton loads only where its kernels run

        return flash_attention(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D)
    with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        out_B_H_S_D = F.scaled_dot_product_attention(
            q_B_S_H_D.transpose(1, 2), k_B_S_H_D.transpose(1, 2), v_B_S_H_D.transpose(1, 2))
    return out_B_H_S_D.transpose(1, 2)


def keep_attention_context():
    """Selective activation checkpointing: keep the outputs of the attention ops, recompute the rest. Recomputing
    attention in the backward would cost as much as its forward, most of the DiT's FLOPs at long sequences."""
    ops = {torch.ops.aten._scaled_dot_product_flash_attention.default,
           torch.ops.aten._scaled_dot_product_cudnn_attention.default,
           torch.ops.aten._scaled_dot_product_efficient_attention.default}
    if torch.cuda.is_available():
        import kernels.attention  # registers torch.ops.cosmos_kernels

        ops.add(torch.ops.cosmos_kernels.flash_attn_fwd.default)

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def check_offload(activation_checkpointing, offload_block_inputs, device):
    """Block-input offload moves what activation checkpointing keeps, between a GPU and pinned host memory."""
    if offload_block_inputs and activation_checkpointing == "none":
        raise ValueError("offload_block_inputs=True moves the block inputs that activation checkpointing keeps: set "
                         "activation_checkpointing='full' or 'selective' (got 'none')")
    if offload_block_inputs and torch.device(device).type != "cuda":
        raise ValueError(f"offload_block_inputs=True copies block inputs between the GPU and pinned host memory: it "
                         f"needs a CUDA device (got {device})")


class BlockInputOffload:
    """Keeps the block inputs that activation checkpointing saves in pinned CPU memory instead of on the GPU.

    Under checkpointing the block inputs are most of what a step holds. Forward: each input is copied to the host on
    a side stream, overlapping the next blocks. Backward: blocks are recomputed last to first; handing block i its
    input also starts copying block i-1's back, so that copy overlaps block i's backward. Only the tensor set as
    `block_input` is moved; the other saved inputs (timestep embedding, RoPE table, text) are shared by all blocks.
    Use as `with offload.hooks():`; the hooks refer to this object but not the other way round, so the host copies
    are freed with the graph (a reference cycle would keep them, pinned, until the garbage collector ran)."""

    class Saved:
        def __init__(self, host, index):
            self.host, self.index = host, index
            self.device = None  # the copy back, while it is prefetched

    def __init__(self, stream):
        self.stream = stream  # the side stream of the copies (one a device, reused: see offload_stream)
        self.block_input = None  # set before each checkpointed block
        self.saved = []  # in forward order

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        if t is not self.block_input:
            return t
        self.saved.append(self.Saved(self.to_host(t), len(self.saved)))
        return self.saved[-1]

    def unpack(self, saved):
        if not isinstance(saved, self.Saved):
            return saved
        self.prefetch(saved)
        t, saved.device = saved.device, None
        self.wait_for_copy(t)
        if saved.index > 0:
            self.prefetch(self.saved[saved.index - 1])
        return t

    def prefetch(self, saved):
        if saved.device is None:
            saved.device = self.to_device(saved.host)

    # the CUDA side: copies on the side stream, ordered against the compute stream

    def to_host(self, t):
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before it is copied
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy is done
        return host

    def to_device(self, host):
        with torch.cuda.stream(self.stream):  # queued after the copy to the host, on the same stream
            return host.to(self.stream.device, non_blocking=True)

    def wait_for_copy(self, t):
        torch.cuda.current_stream(t.device).wait_stream(self.stream)
        t.record_stream(torch.cuda.current_stream(t.device))  # allocated on the side stream, used on this one


@functools.cache
def offload_stream(device):
    """One side stream a device for BlockInputOffload, created once: memory the copies allocate stays cached on it
    from step to step, and it is never one of the pooled streams that NCCL may also be using."""
    return torch.cuda.Stream(device=device)


# Context parallelism (Ulysses): the ranks of a group each hold a contiguous share of a video's latent frames.
# Everything per token runs on the local frames; self-attention swaps the split for a moment: an all-to-all gives
# every rank the whole sequence for 1/cp of the heads, attention runs, and a second all-to-all swaps back.


def all_to_all(x, group, scatter_dim, gather_dim):
    """Cut x into cp chunks along scatter_dim, send chunk j to rank j, join what arrives along gather_dim in rank
    order: [B, L/cp, H, D] -> [B, L, H/cp, D] with (scatter 2, gather 1), and back with (1, 2)."""
    send = torch.stack(x.chunk(dist.get_world_size(group), dim=scatter_dim))  # [cp, ...] contiguous
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """all_to_all with autograd: the gradient goes back the way it came (scatter and gather dims swapped)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def local_frames(x, dim, group):
    """This rank's share of x along its frame axis `dim`: rank r of cp holds frames [r T/cp, (r+1) T/cp)."""
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]


class GatherFrames(torch.autograd.Function):
    """[B,C,T/cp,H,W] on each rank -> the whole [B,C,T,H,W] on every rank. Backward: every rank's copy of the
    output may feed its own loss, so a rank's frames get the sum of all ranks' gradients (all-reduce, then its
    share). Each rank's loss thus counts once, as in data parallel: with the same loss on the cp ranks of a group,
    their summed parameter gradients are cp times that loss's gradient, which FSDP's mean over all ranks expects."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(chunks, x.contiguous(), group=group)
        return torch.cat(chunks, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return local_frames(grad, 2, ctx.group), None


class Attention(nn.Module):
    """Self-attention (context_dim None, with RoPE) or cross-attention; per-head RMSNorm on q and k."""

    def __init__(self, query_dim, context_dim, num_heads, backend):
        super().__init__()
        self.is_selfattn = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads, self.head_dim, self.backend = num_heads, query_dim // num_heads, backend
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.k_norm = RMSNorm(self.head_dim)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.output_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.cp_group = None  # self-attention under context parallelism (DiT.enable_context_parallel)

    def forward(self, x_B_L_D, context_B_M_C=None, rope_cos_sin=None):
        context = x_B_L_D if context_B_M_C is None else context_B_M_C
        q = self.q_proj(x_B_L_D).unflatten(-1, (self.num_heads, self.head_dim))  # [B,L,H,Dh]
        k = self.k_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # [B,M,H,Dh]
        v = self.v_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # [B,M,H,Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.is_selfattn:
            q, k = apply_rope(q, *rope_cos_sin), apply_rope(k, *rope_cos_sin)
        if self.cp_group is None:
            out = attention(q, k, v, self.backend)  # [B,L,H,Dh]
        else:  # L is this rank's share of the tokens: gather the sequence, split the heads, attend, swap back
            qkv = AllToAll.apply(torch.stack([q, k, v]), self.cp_group, 3, 2)  # [3,B,L*cp,H/cp,Dh]
            out = attention(*qkv.unbind(0), self.backend)  # [B,L*cp,H/cp,Dh]
            out = AllToAll.apply(out, self.cp_group, 1, 2)  # [B,L,H,Dh]
        return self.output_proj(out.flatten(2))  # [B,L,D]


class MLP(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden_dim, bias=False)
        self.layer2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))  # exact (erf) GELU


def adaln_modulation(dim, adaln_lora_dim, n_chunks):
    """SiLU -> down to the adaLN-LoRA bottleneck -> up to n_chunks*dim, all in fp32."""
    return nn.Sequential(nn.SiLU(), Fp32Linear(dim, adaln_lora_dim, bias=False),
                         Fp32Linear(adaln_lora_dim, n_chunks * dim, bias=False))


@fused_on_cuda
def modulate(x_B_T_HW_D, shift_B_T_D, scale_B_T_D):
    """LayerNorm (no affine) then x*(1+scale)+shift, per frame, in the activation dtype."""
    x = F.layer_norm(x_B_T_HW_D, (x_B_T_HW_D.shape[-1],), eps=1e-6)
    return x * (1 + scale_B_T_D[:, :, None]) + shift_B_T_D[:, :, None]


@fused_on_cuda
def gated_residual(x_B_T_HW_D, gate_B_T_D, h_B_T_HW_D):
    return x_B_T_HW_D + gate_B_T_D[:, :, None] * h_B_T_HW_D


class Block(nn.Module):
    """x += gate * SelfAttn(mod(x)); x += gate * CrossAttn(mod(x), text); x += gate * MLP(mod(x))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.model_channels
        self.self_attn = Attention(D, None, cfg.num_heads, cfg.attention_backend)
        self.cross_attn = Attention(D, cfg.crossattn_emb_channels, cfg.num_heads, cfg.attention_backend)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio))
        self.adaln_modulation_self_attn = adaln_modulation(D, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_modulation(D, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_modulation(D, cfg.adaln_lora_dim, 3)

    def forward(self, x_B_T_HW_D, t_emb_B_T_D, adaln_lora_B_T_3D, crossattn_emb_B_M_D, rope_cos_sin):
        B, T, HW, D = x_B_T_HW_D.shape
        mods = []
        for adaln in (self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn, self.adaln_modulation_mlp):
            shift_scale_gate = (adaln(t_emb_B_T_D) + adaln_lora_B_T_3D).to(x_B_T_HW_D.dtype)  # fp32 math; [B,T,3D]
            mods.append(shift_scale_gate.chunk(3, dim=-1))
        (shift_sa, scale_sa, gate_sa), (shift_ca, scale_ca, gate_ca), (shift_mlp, scale_mlp, gate_mlp) = mods

        h = modulate(x_B_T_HW_D, shift_sa, scale_sa).reshape(B, T * HW, D)  # [B,L,D]
        h = self.self_attn(h, None, rope_cos_sin).reshape(B, T, HW, D)  # [B,T,HW,D]
        x_B_T_HW_D = gated_residual(x_B_T_HW_D, gate_sa, h)

        h = modulate(x_B_T_HW_D, shift_ca, scale_ca).reshape(B, T * HW, D)  # [B,L,D]
        h = self.cross_attn(h, crossattn_emb_B_M_D).reshape(B, T, HW, D)  # [B,T,HW,D]
        x_B_T_HW_D = gated_residual(x_B_T_HW_D, gate_ca, h)

        h = self.mlp(modulate(x_B_T_HW_D, shift_mlp, scale_mlp))  # [B,T,HW,D]
        return gated_residual(x_B_T_HW_D, gate_mlp, h)


class Timesteps(nn.Module):
    """Sinusoidal embedding of sigma, cos first, in fp32."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, sigma_B_T):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma_B_T.device) / half)
        angles = sigma_B_T.float()[..., None] * freqs  # [B,T,half]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)  # [B,T,dim]


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoid giving the adaLN-LoRA term shared by every modulator (3*D wide)."""

    def __init__(self, dim):
        super().__init__()
        self.linear_1 = Fp32Linear(dim, dim, bias=False)
        self.linear_2 = Fp32Linear(dim, 3 * dim, bias=False)

    def forward(self, emb_B_T_D):
        return self.linear_2(F.silu(self.linear_1(emb_B_T_D)))  # [B,T,3D]


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch pixels; the whole layer runs in fp32."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.model_channels
        self.linear = Fp32Linear(D, cfg.patch_spatial ** 2 * cfg.patch_temporal * cfg.out_channels, bias=False)
        self.adaln_modulation = adaln_modulation(D, cfg.adaln_lora_dim, 2)

    def forward(self, x_B_T_HW_D, t_emb_B_T_D, adaln_lora_B_T_3D):
        D = x_B_T_HW_D.shape[-1]
        shift, scale = (self.adaln_modulation(t_emb_B_T_D) + adaln_lora_B_T_3D[..., : 2 * D]).chunk(2, dim=-1)
        return self.linear(modulate(x_B_T_HW_D.float(), shift, scale))  # [B,T,HW,p*p*pt*C_out] fp32


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(f"model_channels {cfg.model_channels} not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        D = cfg.model_channels
        # the latent, the condition-mask channel, then (optionally) the padding-mask channel
        patch_in_channels = cfg.in_channels + 1 + int(cfg.concat_padding_mask)
        self.x_embedder = PatchEmbed(cfg.patch_spatial, cfg.patch_temporal, patch_in_channels, D)
        self.pos_embedder = VideoRopePosition3DEmb(cfg)
        self.t_embedder = nn.Sequential(Timesteps(D), TimestepEmbedding(D))
        self.t_embedding_norm = RMSNorm(D)
        if cfg.use_crossattn_projection:
            self.crossattn_proj = nn.Sequential(
                nn.Linear(cfg.crossattn_proj_in_channels, cfg.crossattn_emb_channels, bias=True), nn.GELU())
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_blocks)])
        self.final_layer = FinalLayer(cfg)
        for name, value in dit_bookkeeping_buffers().items():  # the reference's, so that the keys are the official ones
            self.register_buffer(name, value)
        self.activation_checkpointing = "none"  # "none" | "full" | "selective" (set by train.py)
        self.offload_block_inputs = False  # keep checkpointed block inputs in pinned CPU memory (CUDA only)
        self.cp_group = None  # context parallelism (enable_context_parallel)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The reference's init: trunc-normal(+-3 std) with std = 1/sqrt(fan_in); adaLN up-projections zero."""
        if self.x_embedder.proj[1].weight.is_meta:
            return
        linears = [self.x_embedder.proj[1], *self.t_embedder[1].children(), self.final_layer.linear]
        for block in self.blocks:
            for attn in (block.self_attn, block.cross_attn):
                linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj]
            linears += [block.mlp.layer1, block.mlp.layer2]
        adalns = [m for b in self.blocks
                  for m in (b.adaln_modulation_self_attn, b.adaln_modulation_cross_attn, b.adaln_modulation_mlp)]
        adalns.append(self.final_layer.adaln_modulation)
        for lin in linears + [adaln[1] for adaln in adalns]:
            std = 1.0 / math.sqrt(lin.in_features)
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
        for adaln in adalns:
            nn.init.zeros_(adaln[2].weight)  # every block starts as the identity, the final layer unmodulated

    def forward(self, x, sigma, crossattn_emb, condition_mask=None, padding_mask=None):
        """x [B,16,T,H,W] noisy latents; sigma [B] or [B,T] in [0,1]; crossattn_emb [B,M,100352] (or [B,M,1024]
        without projection); condition_mask [B,1,T,H,W] (1 on conditioning frames); padding_mask [B,1,H',W'].
        Returns the velocity prediction [B,16,T,H,W] in fp32. Under context parallelism every rank of the group
        passes the same whole inputs and gets the whole output."""
        x_B_C_T_H_W, sigma_B_T = self.prepare_inputs(x, sigma, condition_mask, padding_mask)  # [B,18,T,H,W], [B,1|T']
        p, pt = self.cfg.patch_spatial, self.cfg.patch_temporal
        T, H, W = x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p  # the grid of patches, T' x H' x W'
        rope_cos_sin = self.pos_embedder(T, H, W)  # 2 x [L,Dh] fp32, L = T'H'W' tokens, frame-major
        if self.cp_group is not None:  # this rank's frames: [B,18,T/cp,H,W], [B,1|T'/cp], 2 x [L/cp,Dh]
            x_B_C_T_H_W, sigma_B_T, rope_cos_sin = self.local_share(x_B_C_T_H_W, sigma_B_T, rope_cos_sin)
        x_B_T_HW_D = self.x_embedder(x_B_C_T_H_W).flatten(2, 3)  # [B,T',H'W',D] (T'/cp under context parallelism)
        if self.cfg.use_crossattn_projection:  # [B,M,100352] -> [B,M,1024]
            crossattn_emb = self.crossattn_proj(crossattn_emb.to(x_B_T_HW_D.dtype))
        crossattn_emb_B_M_D = crossattn_emb.to(x_B_T_HW_D.dtype)  # [B,M,1024]

        emb_B_T_D = self.t_embedder[0](sigma_B_T)  # [B,Tt,D] fp32, Tt = 1 or T'
        adaln_lora_B_T_3D = self.t_embedder[1](emb_B_T_D)  # [B,Tt,3D] fp32
        t_emb_B_T_D = self.t_embedding_norm(emb_B_T_D)  # [B,Tt,D] fp32
        x_B_T_HW_D = self.run_blocks(x_B_T_HW_D, t_emb_B_T_D, adaln_lora_B_T_3D, crossattn_emb_B_M_D,
                                     rope_cos_sin)  # [B,T',H'W',D]

        out = self.final_layer(x_B_T_HW_D, t_emb_B_T_D, adaln_lora_B_T_3D)  # [B,T',H'W',p*p*pt*16] fp32
        out = self.unpatchify(out, H, W)  # [B,16,T,H,W] (T/cp frames under context parallelism)
        return out if self.cp_group is None else GatherFrames.apply(out, self.cp_group)  # [B,16,T,H,W]

    def prepare_inputs(self, x, sigma, condition_mask, padding_mask):
        """Checks the shapes; returns the latents with the mask channels, in the weights' dtype, and sigma [B,1|T']."""
        cfg = self.cfg
        B, C, T, H, W = x.shape
        p, pt = cfg.patch_spatial, cfg.patch_temporal
        if C != cfg.in_channels:
            raise ValueError(f"DiT expects {cfg.in_channels} latent channels, got x of shape {tuple(x.shape)}")
        if H % p or W % p or T % pt:
            raise ValueError(f"latent T,H,W = {T},{H},{W} must be divisible by the patch size (t {pt}, h/w {p})")
        sigma_B_T = sigma.reshape(B, -1)  # [B,1] or [B,T']
        if sigma_B_T.shape[1] not in (1, T // pt):
            raise ValueError(f"sigma must have shape [B] or [B,T] with T={T // pt}, got {tuple(sigma.shape)}")
        if condition_mask is None:
            condition_mask = x.new_zeros(B, 1, T, H, W)
        inputs = [x, condition_mask.to(x.dtype)]
        if cfg.concat_padding_mask:
            if padding_mask is None:
                padding_mask = x.new_zeros(B, 1, H, W)
            padding_mask = F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")  # [B,1,H,W]
            inputs.append(padding_mask[:, :, None].expand(B, 1, T, H, W))
        return torch.cat(inputs, dim=1).to(self.x_embedder.proj[1].weight.dtype), sigma_B_T  # [B,18,T,H,W]

    def local_share(self, x_B_C_T_H_W, sigma_B_T, rope_cos_sin):
        """Context parallelism: this rank's frames of the input, of the RoPE rows and of per-frame sigmas."""
        cp, T = dist.get_world_size(self.cp_group), x_B_C_T_H_W.shape[2] // self.cfg.patch_temporal
        if T % cp:
            raise ValueError(f"context parallelism splits the {T} latent frames (T' = T / patch_temporal) "
                             f"over {cp} ranks: T' must be a multiple of {cp}")
        x_B_C_T_H_W = local_frames(x_B_C_T_H_W, 2, self.cp_group)  # [B,18,T/cp,H,W]
        rope_cos_sin = [local_frames(t, 0, self.cp_group) for t in rope_cos_sin]  # 2 x [L/cp,Dh]
        if sigma_B_T.shape[1] > 1:
            sigma_B_T = local_frames(sigma_B_T, 1, self.cp_group)  # [B,T/cp]
        return x_B_C_T_H_W, sigma_B_T, rope_cos_sin

    def run_blocks(self, x_B_T_HW_D, *block_args):
        """The blocks in order, under activation checkpointing when training with it: each block keeps only its input
        (in pinned host memory with offload_block_inputs) and, when selective, its attention outputs."""
        check_offload(self.activation_checkpointing, self.offload_block_inputs, x_B_T_HW_D.device)
        if self.activation_checkpointing == "none" or not torch.is_grad_enabled():
            for block in self.blocks:
                x_B_T_HW_D = block(x_B_T_HW_D, *block_args)
            return x_B_T_HW_D
        selective = {"context_fn": keep_attention_context} if self.activation_checkpointing == "selective" else {}
        offload = BlockInputOffload(offload_stream(x_B_T_HW_D.device)) if self.offload_block_inputs else None
        with offload.hooks() if offload else contextlib.nullcontext():
            try:
                for block in self.blocks:
                    if offload:
                        offload.block_input = x_B_T_HW_D
                    x_B_T_HW_D = checkpoint(block, x_B_T_HW_D, *block_args, use_reentrant=False, **selective)
            finally:  # the hooks live on in the graph: they must not hold an input (that would be a reference cycle)
                if offload:
                    offload.block_input = None
        return x_B_T_HW_D

    def unpatchify(self, out_B_T_HW_F, H, W):
        """[B,T',H'W',p*p*pt*C] -> [B,C,T'pt,H'p,W'p]; the feature axis is ordered (p_h, p_w, p_t, C), C fastest."""
        p, pt, C = self.cfg.patch_spatial, self.cfg.patch_temporal, self.cfg.out_channels
        B, T = out_B_T_HW_F.shape[:2]
        out = out_B_T_HW_F.reshape(B, T, H, W, p, p, pt, C)  # [B,T',H',W',p,p,pt,C]
        out = out.permute(0, 7, 1, 6, 2, 4, 3, 5)  # [B,C,T',pt,H',p,W',p]
        return out.reshape(B, C, T * pt, H * p, W * p)  # [B,C,T,H,W]

    def enable_context_parallel(self, group):
        """Spread every video over the ranks of the process group `group` (None: back to one rank). The ranks must
        call forward together with the same whole inputs; each keeps its contiguous share of the latent frames
        (T' / cp), self-attention runs through all-to-alls over the heads, and every rank returns the whole output
        (GatherFrames). Needs num_heads % cp == 0 here and T' % cp == 0 in forward."""
        if group is not None:
            cp = dist.get_world_size(group)
            if self.cfg.num_heads % cp:
                raise ValueError(f"context parallelism splits the attention heads: {self.cfg.num_heads} heads do not "
                                 f"divide over {cp} ranks (context_parallel_size must divide {self.cfg.num_heads})")
        self.cp_group = group
        for block in self.blocks:
            block.self_attn.cp_group = group

    @classmethod
    def from_pretrained(cls, path, cfg=None, prefix="net.", device="cpu", dtype=torch.bfloat16):
        """Build a DiT and load an official-layout checkpoint strictly. The preset is inferred from the
        checkpoint's shapes unless `cfg` is given."""
        state_dict = load_checkpoint_file(path, prefix)
        cfg = cfg or infer_dit_config(state_dict, path)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_official_state_dict(state_dict, source=path)
        return model.to(device=device, dtype=dtype)

    def load_official_state_dict(self, state_dict, source="state dict"):
        """Strict load of official keys (without the `net.` prefix). The bookkeeping `accum_*` buffers may be
        absent (zeros), so may the RoPE buffers (computed; released files carry them bf16-rounded and then those
        are used) and this model's LoRA adapters (a base checkpoint has none: they keep their values). A meta-device
        model gets the tensors assigned (no copy)."""
        defaults = {f"pos_embedder.{k}": v for k, v in VideoRopePosition3DEmb(self.cfg).state_dict().items()}
        defaults |= dit_bookkeeping_buffers()
        own = self.state_dict()
        adapters = {k: v for k, v in own.items() if ".lora_" in k}
        check_keys(state_dict, own, f"cannot load {source} into DiT", optional=defaults.keys() | adapters.keys())
        kept = {k: v for k, v in adapters.items() if k not in state_dict}
        for k, v in kept.items():
            if v.is_meta:
                raise KeyError(f"cannot load {source}: {k} is absent and the model, built on the meta device, "
                               f"has no value for it (inject LoRA after loading the base weights)")
        self.load_state_dict(defaults | kept | state_dict, strict=True, assign=any(t.is_meta for t in own.values()))


def file_fingerprint(path):
    """Cheap identity of a large file (a multi-GB base checkpoint, a video): size plus hashes of its first and last
    MiB."""
    path = Path(path)
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(path.stat().st_size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def dit_bookkeeping_buffers():
    """The reference's training counters, zero: part of the official keys, unused here."""
    return {k: torch.zeros((), dtype=torch.float32 if k == "accum_train_in_hours" else torch.int64)
            for k in DIT_BOOKKEEPING_KEYS}


def load_checkpoint_file(path, prefix=None):
    """A DiT checkpoint's state dict; with `prefix` ("net." or "net_ema."), the keys under it with the prefix
    removed (an error if there are none)."""
    obj = read_tensor_file(path)
    if prefix is None:
        return obj
    state_dict = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    if not state_dict:
        sample = ", ".join(list(obj)[:5])
        raise ValueError(f"{path} has no keys under prefix {prefix!r} (first keys: {sample})")
    others = sorted({k.split(".")[0] + "." for k in obj if not k.startswith(prefix)})
    if others:  # convert.py's model.pt: regular weights under `net.`, EMA weights under `net_ema.`
        print(f"{path}: taking the weights under {prefix!r}, not those under {', '.join(map(repr, others))} "
              f"(the EMA weights of a training run are under 'net_ema.'; model_ema_*.pt holds them alone)")
    return state_dict


def infer_dit_config(state_dict, source="state dict"):
    """Pick the preset whose shapes match the checkpoint (2B or 14B; tiny for the demo)."""
    w = state_dict.get("x_embedder.proj.1.weight")
    n_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    for cfg in DIT_PRESETS.values():
        if w is not None and w.shape[0] == cfg.model_channels and n_blocks == cfg.num_blocks:
            proj = state_dict.get("crossattn_proj.0.weight")
            if proj is not None and proj.shape[1] != cfg.crossattn_proj_in_channels:
                cfg = replace(cfg, crossattn_proj_in_channels=proj.shape[1])
            return cfg
    if state_dict and all(".lora_" in k for k in state_dict):
        raise ValueError(f"{source} holds LoRA adapter weights alone, no DiT: use it with --lora on a base "
                         f"checkpoint (sample.py --ckpt BASE --lora {source})")
    raise ValueError(f"{source}: shapes match no DiT preset ({', '.join(DIT_PRESETS)}): not a Cosmos-Predict2.5 DiT")


# ----------------------------------------------------------------------------------------------------------------
# 2. WanVAE
#
# The Wan2.1 video VAE (the Cosmos-Predict2.5 "tokenizer"): causal 3D convolutions, 4x8x8 compression, 16 latent
# channels; state-dict keys equal the released `tokenizer.pth` (= Wan2.1_VAE.pth) keys with no prefix.
#
# Time is causal everywhere: every 3D conv pads only in front, so latent frame t depends on pixel frames <= 4t. That
# lets encode and decode run in temporal chunks, each conv carrying its last two input frames over to the next chunk
# (the "feature cache"); the chunked result equals the one-shot result. Frame 0 is special: it is encoded alone and is
# not downsampled in time, so T pixel frames (T = 1 + 4k) give 1 + k latent frames.
# ----------------------------------------------------------------------------------------------------------------
# Per-channel statistics of the raw latent (mu); encode returns (mu - mean) / std.
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class WanVAEConfig:
    dim: int = 96                                   # channels of the first stage
    z_dim: int = 16                                 # latent channels
    dim_mult: tuple = (1, 2, 4, 4)                  # stage widths in units of dim
    num_res_blocks: int = 2                         # residual blocks per encoder stage (decoder: one more)
    temperal_downsample: tuple = (False, True, True)  # (sic, Wan's spelling) which stage transitions halve time

    def __post_init__(self):
        self.dim_mult, self.temperal_downsample = tuple(self.dim_mult), tuple(self.temperal_downsample)
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"WanVAEConfig: temperal_downsample {self.temperal_downsample} needs one entry per stage "
                             f"transition, i.e. {len(self.dim_mult) - 1} for dim_mult {self.dim_mult}")
        if self.z_dim != len(WAN_LATENT_MEAN):
            raise ValueError(f"WanVAEConfig: z_dim={self.z_dim}, but the latent normalisation constants have "
                             f"{len(WAN_LATENT_MEAN)} channels")

    @property
    def temporal_factor(self):  # pixel frames per latent frame (after frame 0)
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self):
        return 2 ** (len(self.dim_mult) - 1)


# A feature cache maps each causal layer to what it carries into the next chunk: a CausalConv3d its last input
# frames, a temporal Resample its last frame (down) or a "first frame done" flag (up). A fresh dict per call.
VAEFeatureCache = dict


class CausalConv3d(nn.Conv3d):
    """Conv3d with all temporal padding (2 * p_t frames) in front. With a cache, the padding is the previous
    chunk's last input frames instead of zeros, which makes chunked processing equal to one-shot processing."""

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))  # cuDNN pads H, W
        self.causal_pad = 2 * pt

    def forward(self, x_B_C_T_H_W, cache: VAEFeatureCache | None = None, norm=None):
        """conv(x), or conv(SiLU(norm(x))) when `norm` is given."""
        if self.causal_pad == 0:
            return super().forward(x_B_C_T_H_W if norm is None else norm(x_B_C_T_H_W, silu=True))
        return self.conv(self.pad(x_B_C_T_H_W, cache, norm))

    def conv(self, x_pad_B_C_pT_H_W):
        return super().forward(x_pad_B_C_pT_H_W)

    def pad(self, x_B_C_T_H_W, cache: VAEFeatureCache | None = None, norm=None):
        """[B,C,T,H,W] -> [B,C,p+T,H,W]: the causal context, then x (or SiLU(norm(x))). The frames are written once,
        straight into the padded buffer: no separate normalised tensor and no concatenation copy."""
        p = self.causal_pad
        B, C, T, H, W = x_B_C_T_H_W.shape
        x_pad_B_C_pT_H_W = x_B_C_T_H_W.new_empty(B, C, p + T, H, W)
        prev_B_C_p_H_W = cache.get(self) if cache is not None else None
        if prev_B_C_p_H_W is None:
            x_pad_B_C_pT_H_W[:, :, :p].zero_()  # first chunk: zeros before frame 0
        else:
            x_pad_B_C_pT_H_W[:, :, :p] = prev_B_C_p_H_W  # the previous chunk's last p input frames
        if norm is None:
            x_pad_B_C_pT_H_W[:, :, p:] = x_B_C_T_H_W
        else:
            norm(x_B_C_T_H_W, silu=True, out=x_pad_B_C_pT_H_W[:, :, p:])
        if cache is not None:
            cache[self] = x_pad_B_C_pT_H_W[:, :, -p:].clone()  # a copy, so the buffer can be freed
        return x_pad_B_C_pT_H_W


class VAERMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and a learned per-channel gain (no bias, no eps
    beyond F.normalize's 1e-12). gamma is [C,1,1,1], or [C,1,1] in the attention block (`images=True`)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.scale = dim ** 0.5

    def forward(self, x_B_C_T_H_W, silu=False, out=None):
        gain_C_1_1_1 = self.gamma.view(-1, 1, 1, 1) * self.scale
        if torch.is_grad_enabled():  # training (assets/demo/pretrain_vae.py): no in-place writes for autograd
            y = F.normalize(x_B_C_T_H_W, dim=1) * gain_C_1_1_1
            y = F.silu(y) if silu else y
            return y if out is None else out.copy_(y)
        norm_B_1_T_H_W = torch.linalg.vector_norm(x_B_C_T_H_W, dim=1, keepdim=True).clamp_min_(1e-12)
        y = torch.div(x_B_C_T_H_W, norm_B_1_T_H_W, out=out).mul_(gain_C_1_1_1)
        return F.silu(y, inplace=True) if silu else y


class VAEResidualBlock(nn.Module):
    """norm, SiLU, conv3x3x3, norm, SiLU, conv3x3x3, plus a shortcut (1x1x1 conv when the width changes).
    In Wan `residual` is a Sequential [norm, SiLU, conv, norm, SiLU, dropout(0), conv]; only indices 0, 2, 3 and 6
    hold weights, so a ModuleDict with those names gives the checkpoint's keys."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.residual = nn.ModuleDict({
            "0": VAERMSNorm(in_dim), "2": CausalConv3d(in_dim, out_dim, 3, padding=1),
            "3": VAERMSNorm(out_dim), "6": CausalConv3d(out_dim, out_dim, 3, padding=1),
        })
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x_B_C_T_H_W, cache: VAEFeatureCache):
        r = self.residual
        h = r["2"](x_B_C_T_H_W, cache, norm=r["0"])  # [B,out,T,H,W]
        h = r["6"].pad(h, cache, norm=r["3"])  # [B,out,2+T,H,W]; rebinding h frees [B,out,T,H,W] before the conv
        h = r["6"].conv(h)  # [B,out,T,H,W]
        return h.add_(x_B_C_T_H_W if self.shortcut is None else self.shortcut(x_B_C_T_H_W))


class VAEAttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (no mixing across time)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = VAERMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)  # 1x1 convs in the checkpoint, applied here as linear layers
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x_B_C_T_H_W, cache=None):  # attention is per frame: nothing to carry across chunks
        B, C, T, H, W = x_B_C_T_H_W.shape
        h_BT_L_C = self.norm(x_B_C_T_H_W).permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)  # tokens per frame
        qkv_BT_L_3C = F.linear(h_BT_L_C, self.to_qkv.weight.view(3 * C, C), self.to_qkv.bias)
        q, k, v = qkv_BT_L_3C.unsqueeze(1).chunk(3, dim=-1)  # each [BT,1,L,C]
        o_BT_L_C = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o_BT_L_C = F.linear(o_BT_L_C, self.proj.weight.view(C, C), self.proj.bias)
        return x_B_C_T_H_W + o_BT_L_C.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)


class VAEResample(nn.Module):
    """2x spatial down/upsampling (a 3x3 conv per frame), with 2x in time as well for the *3d modes.
    downsample: pad right/bottom by one, stride-2 conv. upsample: nearest 2x, conv to dim // 2 channels.
    The temporal part is causal and skips the first chunk, so frame 0 keeps its own latent frame:
      downsample3d: a stride-2 (3,1,1) conv over [previous chunk's last frame, this chunk], T -> T/2;
      upsample3d: a causal (3,1,1) conv to 2*dim channels, read as two consecutive frames, T -> 2T.
    The per-frame conv is stored as Conv2d at index 1 of Wan's Sequential (index 0 was the parameter-free pad or
    upsample), so it lives in a ModuleDict under "1" to keep the key `resample.1.weight`."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode in ("downsample2d", "downsample3d"):
            self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim, 3, stride=2)})
        elif mode in ("upsample2d", "upsample3d"):
            self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim // 2, 3, padding=1)})
        else:
            raise ValueError(f"VAEResample: unknown mode {mode!r}")
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def spatial_conv(self, x_B_C_T_H_W):
        # the per-frame 2D conv as a (1,3,3) 3D conv: no reshuffling of frames into the batch
        conv = self.resample["1"]
        return F.conv3d(x_B_C_T_H_W, conv.weight.unsqueeze(2), conv.bias,
                        stride=(1, *conv.stride), padding=(0, *conv.padding))

    def forward(self, x_B_C_T_H_W, cache: VAEFeatureCache):
        if self.mode.startswith("down"):
            x = self.spatial_conv(F.pad(x_B_C_T_H_W, (0, 1, 0, 1)))  # [B,C,T,H/2,W/2]
            if self.mode == "downsample3d":
                prev_B_C_1_h_w = cache.get(self)
                cache[self] = x[:, :, -1:].clone()
                if prev_B_C_1_h_w is not None:
                    x = self.time_conv(torch.cat([prev_B_C_1_h_w, x], dim=2))  # [B,C,T/2,H/2,W/2]
            return x
        B, C, T, H, W = x_B_C_T_H_W.shape
        x_B_C_T_n_H_W = x_B_C_T_H_W.unsqueeze(3)  # n = 1 output frame per input frame
        if self.mode == "upsample3d":
            if self in cache:  # later latent frames: the first C output channels give frame 2t, the next C 2t+1
                x = self.time_conv(x_B_C_T_H_W, cache)  # [B,2C,T,H,W]
                x_B_C_T_n_H_W = x.view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5)  # n = 2
            else:  # the first latent frame stays one frame; the time conv's history starts after it
                cache[self] = True
        # nearest 2x in H and W by broadcasting, fused with the frame interleave into a single copy
        n = x_B_C_T_n_H_W.shape[3]
        x = x_B_C_T_n_H_W[:, :, :, :, :, None, :, None].expand(B, C, T, n, H, 2, W, 2)
        return self.spatial_conv(x.reshape(B, C, T * n, 2 * H, 2 * W))  # [B,C/2,nT,2H,2W]


class VAEEncoder(nn.Module):
    """pixels [B,3,T,H,W] -> [B,2*z_dim,t,H/8,W/8] (mu and log-variance), one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(VAEResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(VAEResample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        self.middle = nn.ModuleList([VAEResidualBlock(dims[-1], dims[-1]), VAEAttentionBlock(dims[-1]),
                                     VAEResidualBlock(dims[-1], dims[-1])])
        self.head = nn.ModuleDict({"0": VAERMSNorm(dims[-1]),  # Wan's Sequential [norm, SiLU, conv]
                                   "2": CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)})

    def forward(self, x_B_3_T_H_W, cache: VAEFeatureCache):
        x = self.conv1(x_B_3_T_H_W, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head["2"](x, cache, norm=self.head["0"])


class VAEDecoder(nn.Module):
    """latent [B,z_dim,t,h,w] -> pixels [B,3,T,8h,8w]; called with one latent frame at a time."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([VAEResidualBlock(dims[0], dims[0]), VAEAttentionBlock(dims[0]),
                                     VAEResidualBlock(dims[0], dims[0])])
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsample conv halved the width
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(VAEResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(VAEResample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.ModuleDict({"0": VAERMSNorm(dims[-1]), "2": CausalConv3d(dims[-1], 3, 3, padding=1)})

    def forward(self, z_B_C_t_h_w, cache: VAEFeatureCache):
        x = self.conv1(z_B_C_t_h_w, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head["2"](x, cache, norm=self.head["0"])


def _vae_tile_starts(n, size):
    """Starts of tiles of `size` covering 0..n, a quarter tile of overlap or more, the last one ending at n."""
    stride = size - size // 4
    return [*range(0, n - size, stride), n - size]


def _vae_blend_ramp(start, size, n, sf, device):
    """Pixel weights of a tile along one axis: ramps up from a neighbour on each side over the nominal overlap."""
    d = torch.arange(sf * size, device=device) + 0.5
    ramp = sf * (size // 4)
    w = torch.ones(sf * size, device=device)
    if start > 0:
        w = torch.minimum(w, d / ramp)
    if start + size < n:
        w = torch.minimum(w, d.flip(0) / ramp)
    return w


class WanVAE(nn.Module):
    """Encode [-1,1] videos to normalised latents and back. Computes in the dtype of its weights (bf16 in Cosmos);
    frozen here, so encode/decode run without autograd."""

    def __init__(self, cfg: WanVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or WanVAEConfig()
        self.encoder = VAEEncoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # -> (mu, log-variance)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # latent -> decoder input
        self.decoder = VAEDecoder(cfg)

    def latent_stats(self, dtype, device):
        # Like Cosmos: mean and std held in the compute dtype, and 1/std taken in that dtype.
        mean = torch.tensor(WAN_LATENT_MEAN, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(WAN_LATENT_STD, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
        return mean, inv_std

    @torch.no_grad()
    def encode(self, video_B_3_T_H_W, temporal_window=4):
        """video [B,3,T,H,W] in [-1,1], T = 1 + 4k -> normalised latents [B,16,1+k,H/8,W/8] in the weights' dtype.
        Frame 0 is encoded alone, then windows of `temporal_window` frames (a multiple of 4) and a shorter last
        window; memory depends on the window, not on T. The causal cache makes every window give the same latents,
        so the window only trades memory for speed (Cosmos's configs set 16, Wan 4: BENCHMARKS.md)."""
        cfg, (B, C, T, H, W) = self.cfg, video_B_3_T_H_W.shape
        tf, sf = cfg.temporal_factor, cfg.spatial_factor
        if C != 3 or (T - 1) % tf or H % sf or W % sf:
            raise ValueError(f"WanVAE.encode: expected a video [B,3,1+{tf}k,H,W] with H, W multiples of {sf}, "
                             f"got shape {list(video_B_3_T_H_W.shape)}")
        if temporal_window <= 0 or temporal_window % tf:
            raise ValueError(f"WanVAE.encode: temporal_window must be a positive multiple of {tf}, "
                             f"got {temporal_window}")
        weight = self.conv1.weight
        mu_B_z_t_h_w = torch.empty(B, cfg.z_dim, 1 + (T - 1) // tf, H // sf, W // sf,
                                   dtype=weight.dtype, device=weight.device)
        cache = {}
        starts = [0, *range(1, T, temporal_window)]
        ends = [*starts[1:], T]
        for start, end in zip(starts, ends):
            h = self.encoder(video_B_3_T_H_W[:, :, start:end].to(weight.dtype), cache)  # [B,2z,n,h,w]
            t0 = 0 if start == 0 else 1 + (start - 1) // tf
            # log-variance is never used (deterministic encode), so only the mu half of conv1 runs
            mu_B_z_t_h_w[:, :, t0:t0 + h.shape[2]] = F.conv3d(h, weight[:cfg.z_dim], self.conv1.bias[:cfg.z_dim])
        mean, inv_std = self.latent_stats(weight.dtype, weight.device)
        return mu_B_z_t_h_w.sub_(mean).mul_(inv_std)

    @torch.no_grad()
    def decode(self, latents_B_16_t_h_w, tile_hw=None):
        """normalised latents [B,16,t,h,w] -> video [B,3,1+4(t-1),8h,8w], about [-1,1] (not clamped, like Cosmos),
        in the weights' dtype. One latent frame at a time: frame 0 gives 1 pixel frame, every later one 4.
        tile_hw=(th, tw): decode overlapping tiles of at most th x tw latent pixels instead (see decode_tiled)."""
        cfg, (B, C, t, h, w) = self.cfg, latents_B_16_t_h_w.shape
        if C != cfg.z_dim or t < 1:
            raise ValueError(f"WanVAE.decode: expected latents [B,{cfg.z_dim},t,h,w], "
                             f"got {list(latents_B_16_t_h_w.shape)}")
        weight = self.conv2.weight
        mean, inv_std = self.latent_stats(weight.dtype, weight.device)
        z = self.conv2(latents_B_16_t_h_w.to(weight.dtype) / inv_std + mean)  # raw latent -> decoder input
        return self.decode_frames(z) if tile_hw is None else self.decode_tiled(z, tile_hw)

    def decode_frames(self, z_B_C_t_h_w):
        """decoder input [B,16,t,h,w] -> video, one latent frame at a time with the feature cache."""
        (B, _, t, h, w), tf, sf = z_B_C_t_h_w.shape, self.cfg.temporal_factor, self.cfg.spatial_factor
        video_B_3_T_H_W = z_B_C_t_h_w.new_empty(B, 3, 1 + tf * (t - 1), sf * h, sf * w)
        cache = {}
        for i in range(t):
            frames = self.decoder(z_B_C_t_h_w[:, :, i:i + 1], cache)  # [B,3,1 or 4,H,W]
            t0 = 0 if i == 0 else 1 + tf * (i - 1)
            video_B_3_T_H_W[:, :, t0:t0 + frames.shape[2]] = frames
        return video_B_3_T_H_W

    def decode_tiled(self, z_B_C_t_h_w, tile_hw):
        """Bounded memory for large frames: decode overlapping spatial tiles (neighbours overlap by a quarter tile)
        and blend them with linear ramps across the overlaps. Each tile's attention sees only that tile, so the
        result is close to the untiled decode, not equal to it."""
        (B, _, t, h, w), sf = z_B_C_t_h_w.shape, self.cfg.spatial_factor
        if min(tile_hw) < 4:
            raise ValueError(f"WanVAE.decode: tile_hw must be at least 4 x 4 latent pixels, got {tile_hw}")
        th, tw = min(tile_hw[0], h), min(tile_hw[1], w)
        out = torch.zeros(B, 3, 1 + self.cfg.temporal_factor * (t - 1), sf * h, sf * w,
                          dtype=torch.float32, device=z_B_C_t_h_w.device)
        weight_sum_H_W = torch.zeros(sf * h, sf * w, device=z_B_C_t_h_w.device)
        for y in _vae_tile_starts(h, th):
            for x in _vae_tile_starts(w, tw):
                weight_H_W = (_vae_blend_ramp(y, th, h, sf, z_B_C_t_h_w.device)[:, None] *
                              _vae_blend_ramp(x, tw, w, sf, z_B_C_t_h_w.device)[None, :])
                tile = self.decode_frames(z_B_C_t_h_w[:, :, :, y:y + th, x:x + tw])  # [B,3,T,sf*th,sf*tw]
                out[..., sf * y:sf * (y + th), sf * x:sf * (x + tw)] += tile.float() * weight_H_W
                weight_sum_H_W[sf * y:sf * (y + th), sf * x:sf * (x + tw)] += weight_H_W
        return (out / weight_sum_H_W).to(z_B_C_t_h_w.dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.bfloat16, cfg: WanVAEConfig | None = None):
        """Strictly load `tokenizer.pth` (= Wan2.1_VAE.pth, or a .safetensors): a flat state dict, no key prefix."""
        state_dict = read_tensor_file(path, "Wan VAE checkpoint")
        cfg = cfg or wan_vae_config(state_dict, path)
        with torch.device("meta"):
            model = cls(cfg)
        check_keys(state_dict, model.state_dict(), f"Wan VAE checkpoint {path} does not match the Wan2.1 VAE",
                   ValueError)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()


def wan_vae_config(state_dict, source):
    """The WanVAEConfig of a VAE file, read from its shapes: Wan2.1's own, or a smaller one (tests)."""
    sd = state_dict
    try:
        dim = sd["encoder.conv1.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples."))
        resamples = [i for i in range(layers) if f"encoder.downsamples.{i}.resample.1.weight" in sd]
        # each stage: num_res_blocks residual blocks, then a resample (but the last); its width is its blocks' width
        stage_ends = [i - 1 for i in resamples] + [layers - 1]
        cfg = WanVAEConfig(dim=dim, z_dim=sd["conv2.weight"].shape[0], num_res_blocks=resamples[0],
                           dim_mult=[sd[f"encoder.downsamples.{i}.residual.6.weight"].shape[0] // dim
                                     for i in stage_ends],
                           temperal_downsample=[f"encoder.downsamples.{i}.time_conv.weight" in sd for i in resamples])
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{source} is not a Wan2.1 VAE checkpoint ({type(e).__name__}: {e})") from None
    if (cfg.temporal_factor, cfg.spatial_factor) != (4, 8):
        raise ValueError(f"{source}: a VAE compressing {cfg.temporal_factor}x{cfg.spatial_factor}x"
                         f"{cfg.spatial_factor}, not the 4x8x8 the Cosmos DiT works with")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# 3. TextEncoder
#
# The language model of Cosmos-Reason1-7B (a Qwen2.5-VL-7B fine-tune), text path only. A caption becomes a chat
# (fixed system prompt, caption as the user turn), 512 token ids (right-padded with the tokenizer's pad id, or
# truncated with a warning), and a pass through the 28 decoder layers without attention mask. The output of every
# layer (the last one after the final RMSNorm) is standardised per token and the 28 results are concatenated:
# [B, 512, 28 * 3584 = 100352], the DiT's cross-attention input before its `crossattn_proj`. `prep_data.py cache`
# runs it once per unique caption, so training never holds the encoder.
# ----------------------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
QWEN2_MODEL_TYPES = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen2_vl_text", "qwen2_5_vl_text")
# Where Hugging Face checkpoints keep the language model: the original Qwen release, transformers 4.4x saves and
# 5.x default saves use `model.` (vision tower `visual.`); 4.52-4.57 saves (transformers#38489) and 5.x with
# save_original_format=False use `model.language_model.`; LLaVA-style exports use `language_model.model.` or
# `language_model.`; a bare text model has no prefix.
QWEN_LM_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.", "")
QWEN_LM_SUBMODULES = ("embed_tokens.", "layers.", "norm.")


@dataclass
class TextEncoderConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6

    @classmethod
    def from_hf_config(cls, path: Path) -> "TextEncoderConfig":
        """Reads a Hugging Face config.json of the Qwen2 family (flat, or with the language model in text_config)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text encoder config not found: {path}")
        raw = json.loads(path.read_text())
        text = raw.get("text_config")
        model_types = {"model_type": raw.get("model_type")}
        if text is not None and "model_type" in text:
            model_types["text_config.model_type"] = text["model_type"]
        for where, model_type in model_types.items():
            if model_type not in QWEN2_MODEL_TYPES:
                raise ValueError(f"{path}: {where} is {model_type!r}, not a Qwen2-family decoder {QWEN2_MODEL_TYPES}")
        sections = [s for s in (text, raw) if s is not None]  # text_config wins, as in transformers 5.x

        def field(*names, default=None):
            for section in sections:
                for name in names:
                    if section.get(name) is not None:
                        return section[name]
            if default is None:
                raise KeyError(f"{path}: field {names[0]!r} missing (looked in text_config and at the top level)")
            return default

        rope = field("rope_parameters", "rope_scaling", default={})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):  # text-only M-RoPE is plain 1D RoPE; scaled variants are not
            raise ValueError(f"{path}: rope type {rope_type!r} not supported, expected 'default' or 'mrope'")
        if field("hidden_act") != "silu":
            raise ValueError(f"{path}: hidden_act {field('hidden_act')!r} not supported, expected 'silu'")
        if field("use_sliding_window", default=False):
            raise ValueError(f"{path}: use_sliding_window=true is not supported")
        return cls(vocab_size=field("vocab_size"), hidden_size=field("hidden_size"),
                   intermediate_size=field("intermediate_size"), num_layers=field("num_hidden_layers"),
                   num_heads=field("num_attention_heads"), num_kv_heads=field("num_key_value_heads"),
                   rms_norm_eps=field("rms_norm_eps"), rope_theta=rope.get("rope_theta") or field("rope_theta"))


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation: the Qwen2.5-VL chat template for one system and one user text turn, no generation prompt


def qwen_chat_text(caption: str) -> str:
    return f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{caption}<|im_end|>\n"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, pad_id: int, max_length: int = 512):
        self.tokenizer, self.pad_id, self.max_length = tokenizer, pad_id, max_length

    @classmethod
    def from_folder(cls, folder: Path, max_length: int = 512) -> "TextTokenizer":
        """tokenizer.json for the vocabulary; tokenizer_config.json for the pad token (the reference's pad_token_id)."""
        folder = Path(folder)
        tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
        for p in (tok_path, cfg_path):
            if not p.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        tokenizer = Tokenizer.from_file(str(tok_path))
        for special in ("<|im_start|>", "<|im_end|>"):
            if tokenizer.token_to_id(special) is None:
                raise ValueError(f"{tok_path}: special token {special} missing, not a Qwen2 tokenizer")
        pad = json.loads(cfg_path.read_text()).get("pad_token")
        pad = pad["content"] if isinstance(pad, dict) else pad
        if pad is None or tokenizer.token_to_id(pad) is None:
            raise ValueError(f"{cfg_path}: pad_token {pad!r} missing or not in the vocabulary of {tok_path}")
        return cls(tokenizer, tokenizer.token_to_id(pad), max_length)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Chat-templated ids, right-padded with pad_id or truncated to max_length: [B, max_length] int64."""
        ids_B_L = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch([qwen_chat_text(c) for c in captions])):
            if len(enc.ids) > self.max_length:
                warnings.warn(f"caption {i} truncated from {len(enc.ids)} to {self.max_length} tokens: "
                              f"{captions[i][:100]!r}{'...' if len(captions[i]) > 100 else ''}")
            ids = enc.ids[: self.max_length]
            ids_B_L[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return ids_B_L


# ----------------------------------------------------------------------------------------------------------------
# The Qwen2.5 decoder


class QwenRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as Qwen2 does)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def qwen_rope(seq_len: int, head_dim: int, theta: float, device, dtype):
    """cos, sin [L, head_dim] for positions 0..L-1 (angles in fp32, then cast like Qwen2).
    Text-only M-RoPE gives all three sections the same position, so it equals this 1D RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_L_half = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    angles_L_D = torch.cat([angles_L_half, angles_L_half], dim=-1)
    return angles_L_D.cos().to(dtype), angles_L_D.sin().to(dtype)


def apply_qwen_rope(x_B_H_L_D, cos_L_D, sin_L_D):
    x1, x2 = x_B_H_L_D.chunk(2, dim=-1)  # rotate-half pairs dims i and i + D/2
    return x_B_H_L_D * cos_L_D + torch.cat([-x2, x1], dim=-1) * sin_L_D


class QwenAttention(nn.Module):
    """Causal grouped-query attention; q/k/v projections carry biases, the output projection does not."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_B_L_D, cos_L_Dh, sin_L_Dh):
        B, L, _ = x_B_L_D.shape
        q_B_H_L_Dh = self.q_proj(x_B_L_D).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k_B_K_L_Dh = self.k_proj(x_B_L_D).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_B_K_L_Dh = self.v_proj(x_B_L_D).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_B_H_L_Dh = apply_qwen_rope(q_B_H_L_Dh, cos_L_Dh, sin_L_Dh)
        k_B_K_L_Dh = apply_qwen_rope(k_B_K_L_Dh, cos_L_Dh, sin_L_Dh)
        o_B_H_L_Dh = F.scaled_dot_product_attention(q_B_H_L_Dh, k_B_K_L_Dh, v_B_K_L_Dh, is_causal=True, enable_gqa=True)
        return self.o_proj(o_B_H_L_Dh.transpose(1, 2).reshape(B, L, -1))


class QwenMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x_B_L_D):
        return self.down_proj(F.silu(self.gate_proj(x_B_L_D)) * self.up_proj(x_B_L_D))  # SwiGLU


class QwenDecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.input_layernorm = QwenRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = QwenAttention(cfg)
        self.post_attention_layernorm = QwenRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = QwenMLP(cfg)

    def forward(self, x_B_L_D, cos_L_Dh, sin_L_Dh):
        x_B_L_D = x_B_L_D + self.self_attn(self.input_layernorm(x_B_L_D), cos_L_Dh, sin_L_Dh)
        return x_B_L_D + self.mlp(self.post_attention_layernorm(x_B_L_D))


def qwen_standardize(h_B_L_D):
    """Per token (h - mean) / (std + 1e-8), unbiased std, in the hidden states' dtype (as the reference)."""
    return (h_B_L_D - h_B_L_D.mean(dim=-1, keepdim=True)) / (h_B_L_D.std(dim=-1, keepdim=True) + 1e-8)


class TextEncoder(nn.Module):
    """Parameter names equal the Hugging Face Qwen2 language-model names without their prefix."""

    def __init__(self, cfg: TextEncoderConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"hidden {cfg.hidden_size}, heads {cfg.num_heads}, kv heads {cfg.num_kv_heads} "
                             "must divide: hidden by heads and heads by kv heads")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(QwenDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = QwenRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def hidden_states(self, input_ids_B_L) -> list[torch.Tensor]:
        """The N layer outputs [B, L, D], the last one after the final norm (HF hidden_states[1:])."""
        x_B_L_D = self.embed_tokens(input_ids_B_L)
        cos_L_Dh, sin_L_Dh = qwen_rope(input_ids_B_L.shape[1], self.cfg.hidden_size // self.cfg.num_heads,
                                       self.cfg.rope_theta, x_B_L_D.device, x_B_L_D.dtype)
        out = []
        for layer in self.layers:
            x_B_L_D = layer(x_B_L_D, cos_L_Dh, sin_L_Dh)
            out.append(x_B_L_D)
        out[-1] = self.norm(x_B_L_D)
        return out

    def forward(self, input_ids_B_L):
        """[B, L] token ids -> [B, L, N * D] standardised layer outputs, concatenated in layer order."""
        return torch.cat([qwen_standardize(h) for h in self.hidden_states(input_ids_B_L)], dim=-1)

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Captions -> [B, max_length, N * D] embeddings on the encoder's device and dtype."""
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"encode expects a non-empty list of strings, got {captions!r:.200}")
        if self.tokenizer is None:
            raise RuntimeError("TextEncoder has no tokenizer: build it with TextEncoder.from_pretrained(folder)")
        return self(self.tokenizer(captions).to(self.embed_tokens.weight.device))

    @classmethod
    def from_pretrained(cls, folder, device="cuda", dtype=torch.bfloat16, max_length: int = 512) -> "TextEncoder":
        """A Hugging Face Qwen2.5-VL / Qwen2 folder: config.json, *.safetensors (+ index), tokenizer files."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {folder}")
        cfg = TextEncoderConfig.from_hf_config(folder / "config.json")
        tokenizer = TextTokenizer.from_folder(folder, max_length)
        if tokenizer.tokenizer.get_vocab_size() > cfg.vocab_size:
            raise ValueError(f"{folder}: tokenizer has {tokenizer.tokenizer.get_vocab_size()} tokens, "
                             f"more than the embedding's vocab_size {cfg.vocab_size}")
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        model = model.to(dtype).to_empty(device=device)  # uninitialised: every tensor is filled by the load below
        load_qwen_weights(model, folder)
        return model.eval().requires_grad_(False)


def load_qwen_weights(model: TextEncoder, folder: Path):
    """Strictly fills model from the folder's safetensors, one tensor at a time, ignoring all but the LM."""
    index_path, single_path = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index_path.is_file() and single_path.is_file():
        raise ValueError(f"{folder}: both {index_path.name} and {single_path.name} exist, remove one")
    if index_path.is_file():
        source, key_to_file = index_path, json.loads(index_path.read_text())["weight_map"]
    elif single_path.is_file():
        with safe_open(single_path, framework="pt") as f:
            source, key_to_file = single_path, dict.fromkeys(f.keys(), single_path.name)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors.index.json or model.safetensors")

    prefixes = [p for p in QWEN_LM_PREFIXES if p + "embed_tokens.weight" in key_to_file]
    if len(prefixes) != 1:
        raise KeyError(f"{source}: expected exactly one language-model embedding among "
                       f"{[p + 'embed_tokens.weight' for p in QWEN_LM_PREFIXES]}, found {prefixes}")
    prefix = prefixes[0]
    params = model.state_dict()
    expected = {prefix + name: p for name, p in params.items()}
    found = dict.fromkeys(k for k in key_to_file if k.startswith(tuple(prefix + s for s in QWEN_LM_SUBMODULES)))
    check_keys(found, expected, f"{source}: language-model tensors for a {model.cfg.num_layers}-layer config")

    by_file: dict[str, list[str]] = {}
    for key in sorted(expected):
        by_file.setdefault(key_to_file[key], []).append(key)
    for name in by_file:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"shard {folder / name} listed in {source} does not exist")
    for name, keys in by_file.items():
        with safe_open(folder / name, framework="pt") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise KeyError(f"tensor {key} not in shard {folder / name} (where {source.name} puts it)")
                param = params[key[len(prefix):]]
                tensor = f.get_tensor(key)
                if tensor.shape != param.shape:
                    raise ValueError(f"tensor {key} in {folder / name} has shape {list(tensor.shape)}, "
                                     f"expected {list(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor)


# ----------------------------------------------------------------------------------------------------------------
# 4. Checkpoint files and the strict key check
# ----------------------------------------------------------------------------------------------------------------


def read_tensor_file(path, what="checkpoint"):
    """A flat dict of tensors from a torch file (memory-mapped: no second copy in RAM) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} is not a PyTorch checkpoint that torch.load(weights_only=True, mmap=True) "
                         f"or safetensors can read: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} {path}: expected a flat dict of tensors, got {type(obj).__name__}")
    return obj


def check_keys(found, expected, source, error=KeyError, optional=()):
    """The strict key check of every loader: raises `error`, starting with `source`, naming the missing, unexpected
    and mis-shaped keys of `found` against `expected`. Both map keys to tensors or shapes; a found value of None (a
    shape not read yet) is not compared. Keys in `optional` may be missing."""
    problems = {
        "missing": [k for k in expected if k not in found and k not in optional],
        "unexpected": [k for k in found if k not in expected],
        "mis-shaped": [f"{k}: file {_shape(found[k])}, expected {_shape(expected[k])}" for k in found
                       if k in expected and found[k] is not None and _shape(found[k]) != _shape(expected[k])],
    }
    report = [f"{title} keys ({len(keys)}): {keys[:20]}" + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")
              for title, keys in problems.items() if keys]
    if report:
        raise error(f"{source}: " + "; ".join(report))


def _shape(v):
    """A tensor's shape, or a shape, as a tuple."""
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
