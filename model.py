"""The networks of Cosmos-Predict2.5, written from scratch and readable top to bottom.

1. DiT: the video2world diffusion transformer (the reference's MinimalV1LVGDiT over MiniTrainDIT).
   Parameter names equal the official checkpoint keys with the `net.` prefix removed.

Numerics follow the reference's "wan fp32 strategy": the timestep embedding, every adaLN modulation, the final
layer and q/k around RoPE run in fp32; everything else runs in the parameter dtype (bf16 in training).
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    # ours, not the reference's: "triton" uses kernels/attention.py on CUDA (SDPA elsewhere), "sdpa" always SDPA
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


class Patchify(nn.Module):
    """[B,C,T,H,W] -> [B,T',H',W',C*pt*p*p], flattened channel-major: feature index = c*pt*p*p + r*p*p + m*p + n."""

    def __init__(self, patch_spatial, patch_temporal):
        super().__init__()
        self.p, self.pt = patch_spatial, patch_temporal

    def forward(self, x):
        B, C, T, H, W = x.shape
        p, pt = self.p, self.pt
        x = x.reshape(B, C, T // pt, pt, H // p, p, W // p, p)  # [B,C,T',pt,H',p,W',p]
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)  # [B,T',H',W',C*pt*p*p]


class PatchEmbed(nn.Module):
    def __init__(self, patch_spatial, patch_temporal, in_channels, out_channels):
        super().__init__()
        patch_dim = in_channels * patch_spatial * patch_spatial * patch_temporal
        self.proj = nn.Sequential(Patchify(patch_spatial, patch_temporal), nn.Linear(patch_dim, out_channels, bias=False))

    def forward(self, x):
        return self.proj(x)


class VideoRopePosition3DEmb(nn.Module):
    """3D rotary embedding: head dim split into t/h/w parts (44/42/42 for D=128), NTK-scaled bases.

    The exponent ranges and positions are persistent buffers because the released checkpoints store them
    bf16-rounded and the reference network uses what it loads (fidelity note 1).
    """

    def __init__(self, head_dim, len_h, len_w, len_t, h_extrapolation_ratio, w_extrapolation_ratio,
                 t_extrapolation_ratio):
        super().__init__()
        dim_h = head_dim // 6 * 2
        dim_t = head_dim - 2 * dim_h
        self.register_buffer("seq", torch.arange(max(len_h, len_w, len_t), dtype=torch.float32))
        self.register_buffer("dim_spatial_range", torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h)
        self.register_buffer("dim_temporal_range", torch.arange(0, dim_t, 2)[: dim_t // 2].float() / dim_t)
        self.max_h, self.max_w, self.max_t = len_h, len_w, len_t
        self.h_theta = 10000.0 * h_extrapolation_ratio ** (dim_h / (dim_h - 2))
        self.w_theta = 10000.0 * w_extrapolation_ratio ** (dim_h / (dim_h - 2))
        self.t_theta = 10000.0 * t_extrapolation_ratio ** (dim_t / (dim_t - 2))

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


def apply_rope(x_B_L_H_D, cos_L_D, sin_L_D):
    """Rotate-half RoPE, computed in fp32 (the reference upcasts q and k before rotating)."""
    x = x_B_L_H_D.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x * cos_L_D[None, :, None, :] + rotated * sin_L_D[None, :, None, :]
    return out.to(x_B_L_H_D.dtype)


def attention(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D, backend="triton"):
    """Non-causal multi-head attention on [B,S,H,D] tensors; the one place the DiT's attention runs."""
    if backend == "triton" and q_B_S_H_D.is_cuda:
        from kernels.attention import flash_attention

        return flash_attention(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D)
    if backend not in ("triton", "sdpa"):
        raise ValueError(f"attention_backend must be 'triton' or 'sdpa', got {backend!r}")
    out_B_H_S_D = F.scaled_dot_product_attention(
        q_B_S_H_D.transpose(1, 2), k_B_S_H_D.transpose(1, 2), v_B_S_H_D.transpose(1, 2))
    return out_B_H_S_D.transpose(1, 2)


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

    def forward(self, x_B_L_D, context_B_M_C=None, rope_cos_sin=None):
        context = x_B_L_D if context_B_M_C is None else context_B_M_C
        q = self.q_proj(x_B_L_D).unflatten(-1, (self.num_heads, self.head_dim))  # [B,L,H,Dh]
        k = self.k_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # [B,M,H,Dh]
        v = self.v_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # [B,M,H,Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.is_selfattn:
            q, k = apply_rope(q, *rope_cos_sin), apply_rope(k, *rope_cos_sin)
        out = attention(q, k, v, self.backend)  # [B,L,H,Dh]
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


def modulate(x_B_T_HW_D, shift_B_T_D, scale_B_T_D):
    """LayerNorm (no affine) then x*(1+scale)+shift, per frame, in the activation dtype."""
    x = F.layer_norm(x_B_T_HW_D, (x_B_T_HW_D.shape[-1],), eps=1e-6)
    return x * (1 + scale_B_T_D[:, :, None]) + shift_B_T_D[:, :, None]


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
        dtype = x_B_T_HW_D.dtype
        mods = []
        for adaln in (self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn, self.adaln_modulation_mlp):
            shift_scale_gate = (adaln(t_emb_B_T_D) + adaln_lora_B_T_3D).to(dtype)  # fp32 math, then [B,Tt,3D]
            mods.append(shift_scale_gate.chunk(3, dim=-1))
        (shift_sa, scale_sa, gate_sa), (shift_ca, scale_ca, gate_ca), (shift_mlp, scale_mlp, gate_mlp) = mods

        h = modulate(x_B_T_HW_D, shift_sa, scale_sa).reshape(B, T * HW, D)  # [B,L,D]
        h = self.self_attn(h, None, rope_cos_sin).reshape(B, T, HW, D)  # [B,T,HW,D]
        x_B_T_HW_D = x_B_T_HW_D + gate_sa[:, :, None] * h

        h = modulate(x_B_T_HW_D, shift_ca, scale_ca).reshape(B, T * HW, D)  # [B,L,D]
        h = self.cross_attn(h, crossattn_emb_B_M_D).reshape(B, T, HW, D)  # [B,T,HW,D]
        x_B_T_HW_D = x_B_T_HW_D + gate_ca[:, :, None] * h

        h = self.mlp(modulate(x_B_T_HW_D, shift_mlp, scale_mlp))  # [B,T,HW,D]
        return x_B_T_HW_D + gate_mlp[:, :, None] * h


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
        self.pos_embedder = VideoRopePosition3DEmb(
            cfg.head_dim, len_h=cfg.max_img_h // cfg.patch_spatial, len_w=cfg.max_img_w // cfg.patch_spatial,
            len_t=cfg.max_frames // cfg.patch_temporal, h_extrapolation_ratio=cfg.rope_h_extrapolation_ratio,
            w_extrapolation_ratio=cfg.rope_w_extrapolation_ratio, t_extrapolation_ratio=cfg.rope_t_extrapolation_ratio)
        self.t_embedder = nn.Sequential(Timesteps(D), TimestepEmbedding(D))
        self.t_embedding_norm = RMSNorm(D)
        if cfg.use_crossattn_projection:
            self.crossattn_proj = nn.Sequential(
                nn.Linear(cfg.crossattn_proj_in_channels, cfg.crossattn_emb_channels, bias=True), nn.GELU())
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_blocks)])
        self.final_layer = FinalLayer(cfg)
        # bookkeeping buffers of the reference (kept so that our state dict has exactly the official keys)
        for name in DIT_BOOKKEEPING_KEYS:
            dtype = torch.float32 if name == "accum_train_in_hours" else torch.int64
            self.register_buffer(name, torch.zeros((), dtype=dtype))
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The reference's init: trunc-normal(+-3 std) with std = 1/sqrt(fan_in); adaLN up-projections zero."""
        if self.x_embedder.proj[1].weight.is_meta:
            return

        def trunc_normal(w, fan_in):
            std = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

        for module in [self.x_embedder.proj[1], *self.t_embedder[1].children(), self.final_layer.linear]:
            trunc_normal(module.weight, module.in_features)
        for block in self.blocks:
            for attn in (block.self_attn, block.cross_attn):
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj):
                    trunc_normal(lin.weight, lin.in_features)
            trunc_normal(block.mlp.layer1.weight, block.mlp.layer1.in_features)
            trunc_normal(block.mlp.layer2.weight, block.mlp.layer2.in_features)
        for block in self.blocks:
            for adaln in (block.adaln_modulation_self_attn, block.adaln_modulation_cross_attn, block.adaln_modulation_mlp):
                trunc_normal(adaln[1].weight, adaln[1].in_features)
                nn.init.zeros_(adaln[2].weight)  # every block starts as the identity
        trunc_normal(self.final_layer.adaln_modulation[1].weight, self.final_layer.adaln_modulation[1].in_features)
        nn.init.zeros_(self.final_layer.adaln_modulation[2].weight)

    def forward(self, x, sigma, crossattn_emb, condition_mask=None, padding_mask=None):
        """x [B,16,T,H,W] noisy latents; sigma [B] or [B,T] in [0,1]; crossattn_emb [B,M,100352] (or [B,M,1024]
        without projection); condition_mask [B,1,T,H,W] (1 on conditioning frames); padding_mask [B,1,H',W'].
        Returns the velocity prediction [B,16,T,H,W] in fp32."""
        cfg = self.cfg
        B, C, T, H, W = x.shape
        p, pt = cfg.patch_spatial, cfg.patch_temporal
        if C != cfg.in_channels:
            raise ValueError(f"DiT expects {cfg.in_channels} latent channels, got x of shape {tuple(x.shape)}")
        if H % p or W % p or T % pt:
            raise ValueError(f"latent T,H,W = {T},{H},{W} must be divisible by the patch size (t {pt}, h/w {p})")
        dtype = self.x_embedder.proj[1].weight.dtype
        if condition_mask is None:
            condition_mask = x.new_zeros(B, 1, T, H, W)
        inputs = [x, condition_mask.to(x.dtype)]
        if cfg.concat_padding_mask:
            if padding_mask is None:
                padding_mask = x.new_zeros(B, 1, H, W)
            padding_mask = F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")  # [B,1,H,W]
            inputs.append(padding_mask[:, :, None].expand(B, 1, T, H, W))
        x_B_C_T_H_W = torch.cat(inputs, dim=1).to(dtype)  # [B,18,T,H,W]

        x_B_T_H_W_D = self.x_embedder(x_B_C_T_H_W)  # [B,T',H',W',D]
        _, Tp, Hp, Wp, D = x_B_T_H_W_D.shape
        x_B_T_HW_D = x_B_T_H_W_D.reshape(B, Tp, Hp * Wp, D)
        rope_cos_sin = self.pos_embedder(Tp, Hp, Wp)  # 2 x [L,Dh] fp32

        if cfg.use_crossattn_projection:
            crossattn_emb = self.crossattn_proj(crossattn_emb.to(dtype))  # [B,M,1024]
        crossattn_emb = crossattn_emb.to(dtype)

        sigma_B_T = sigma.reshape(B, -1)  # [B,1] or [B,T]
        if sigma_B_T.shape[1] not in (1, Tp):
            raise ValueError(f"sigma must have shape [B] or [B,T] with T={Tp}, got {tuple(sigma.shape)}")
        emb_B_T_D = self.t_embedder[0](sigma_B_T)  # [B,Tt,D] fp32
        adaln_lora_B_T_3D = self.t_embedder[1](emb_B_T_D)  # [B,Tt,3D] fp32
        t_emb_B_T_D = self.t_embedding_norm(emb_B_T_D)  # [B,Tt,D] fp32

        for block in self.blocks:
            x_B_T_HW_D = block(x_B_T_HW_D, t_emb_B_T_D, adaln_lora_B_T_3D, crossattn_emb, rope_cos_sin)

        out = self.final_layer(x_B_T_HW_D, t_emb_B_T_D, adaln_lora_B_T_3D)  # [B,T',H'W',p*p*pt*C] fp32
        # unpatchify: the feature axis is ordered (p_h, p_w, p_t, C), channel fastest
        out = out.reshape(B, Tp, Hp, Wp, p, p, pt, cfg.out_channels)
        out = out.permute(0, 7, 1, 6, 2, 4, 3, 5)  # [B,C,T',pt,H',p,W',p]
        return out.reshape(B, cfg.out_channels, Tp * pt, Hp * p, Wp * p)  # [B,16,T,H,W]

    # ---------------------------------------------------------------------------------------------------------
    # Loading official checkpoints
    # ---------------------------------------------------------------------------------------------------------

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
        are used) and this model's LoRA adapters (a base checkpoint has none). Anything else missing, unexpected
        or mis-shaped raises, naming the keys. Works on a meta-device model (tensors are assigned)."""
        cfg = self.cfg
        rope = VideoRopePosition3DEmb(
            cfg.head_dim, len_h=cfg.max_img_h // cfg.patch_spatial, len_w=cfg.max_img_w // cfg.patch_spatial,
            len_t=cfg.max_frames // cfg.patch_temporal, h_extrapolation_ratio=cfg.rope_h_extrapolation_ratio,
            w_extrapolation_ratio=cfg.rope_w_extrapolation_ratio, t_extrapolation_ratio=cfg.rope_t_extrapolation_ratio)
        defaults = {f"pos_embedder.{k}": v for k, v in rope.state_dict().items()}
        defaults.update({k: torch.zeros((), dtype=torch.float32 if k == "accum_train_in_hours" else torch.int64)
                         for k in DIT_BOOKKEEPING_KEYS})
        load_strict(self, state_dict, source, defaults)


def load_checkpoint_file(path, prefix=None):
    """Read a torch checkpoint memory-mapped (no second copy in RAM). With `prefix`, keep the keys under it
    (prefix removed) and fail if there are none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if prefix is None:
        return obj
    state_dict = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    if not state_dict:
        sample = ", ".join(list(obj)[:5])
        raise ValueError(f"{path} has no keys under prefix {prefix!r} (first keys: {sample})")
    return state_dict


def load_strict(model, state_dict, source, defaults=None):
    """Copy `state_dict` into `model`, failing loudly on missing, unexpected or mis-shaped keys. Keys in
    `defaults` may be missing (their default value is used); so may LoRA adapter keys, which keep the model's
    own values. A model on the meta device gets the tensors assigned (no copy)."""
    defaults = defaults or {}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and k not in defaults and ".lora_" not in k]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        lines = [f"cannot load {source} into {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                lines.append(f"  {len(keys)} {title} key(s):\n    {shown}")
        raise KeyError("\n".join(lines))
    full = dict(state_dict)
    for k, v in own.items():
        if k not in full:
            if k in defaults:
                full[k] = defaults[k]
            elif v.is_meta:
                raise KeyError(f"cannot load {source}: {k} is absent and the model, built on the meta device, has "
                               f"no value for it (inject LoRA after loading the base weights)")
            else:
                full[k] = v
    model.load_state_dict(full, strict=True, assign=any(t.is_meta for t in own.values()))


def infer_dit_config(state_dict, source="state dict"):
    """Pick the preset whose shapes match the checkpoint (2B or 14B; tiny for the demo)."""
    for name, cfg in DIT_PRESETS.items():
        D = cfg.model_channels
        w = state_dict.get("x_embedder.proj.1.weight")
        n_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        if w is not None and w.shape[0] == D and n_blocks == cfg.num_blocks:
            proj = state_dict.get("crossattn_proj.0.weight")
            if proj is not None and proj.shape[1] != cfg.crossattn_proj_in_channels:
                cfg = replace(cfg, crossattn_proj_in_channels=proj.shape[1])
            return cfg
    raise ValueError(f"{source}: shapes match no DiT preset ({', '.join(DIT_PRESETS)}); pass cfg explicitly")

