"""One LoRA training step of the 2B (and 14B) DiT at real video shapes: ours vs diffusers + PEFT, same run.

    python bench/bench_train_step.py                 # on one H100: 2B at 93x704x1280 and 93x432x768, 14B fit check
    python bench/bench_train_step.py --smoke         # tiny shapes on the CPU: checks the script runs

Ours is train.py's step (cached latents and text embeddings in, AdamW + EMA out): FSDP2 on one rank, bf16 base,
fp32 LoRA, selective activation checkpointing, our Triton attention and fused LoRA. The peer is diffusers'
CosmosTransformer3DModel with the Cosmos-2.5 config, PEFT LoRA r32 on the same 280 linears (fp32 adapters),
gradient checkpointing, torch AdamW. Random weights: speed does not depend on them.
"""

import argparse
import gc
import math
import os
import statistics
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from model import DIT_PRESETS  # noqa: E402

PEAK_TFLOPS = 780.0  # measured bf16 matmul on our H100 (spec/anchors.md E)


def step_flops(cfg, T, H, W, text_len=512):
    """Model FLOPs of one LoRA step: forward + backward without the frozen weights' gradients (no dW) and without
    recomputation. Attention fwd 4*S^2*D per layer (bwd 2.5x), linears 2*S*params (bwd 1x: dX only)."""
    S = T * (H // 2) * (W // 2)
    D, L = cfg.model_channels, cfg.num_blocks
    mlp = int(D * cfg.mlp_ratio)
    linear_params = L * (4 * D * D + 2 * D * D + 2 * D * cfg.crossattn_emb_channels + 2 * D * mlp)
    attn_fwd = L * (4 * S * S * D + 4 * S * text_len * D)
    linear_fwd = 2 * S * linear_params + 2 * text_len * cfg.crossattn_proj_in_channels * cfg.crossattn_emb_channels
    return 2 * linear_fwd + 3.5 * attn_fwd


def timed(fn, warmup, repeat, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def ours(preset, shape, device, warmup, repeat, checkpointing, backend):
    """train.py's model and step."""
    train.dit_preset, train.dtype, train.attention_backend = preset, "bfloat16", backend
    train.activation_checkpointing = checkpointing
    train.base_checkpoint, train.use_lora, train.seed = "", True, 0
    reset_memory(device)
    model = train.shard_model(train.build_model(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    ema = [p.detach().clone().float() for p in trainable]
    cfg = DIT_PRESETS[preset]
    T, H, W = shape
    latents = torch.randn(1, 16, T, H, W, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, cfg.crossattn_proj_in_channels, device=device, dtype=torch.bfloat16)
    generators = [torch.Generator(device).manual_seed(0)]
    reset_memory(device)  # the fp32 random init is not part of a step

    def step():
        per_sample, _ = train.flow_matching_loss(model, latents, text, generators)
        per_sample.mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.1, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in trainable], 0.01)

    seconds = timed(step, warmup, repeat, device)
    memory = peak_gib(device)
    del model, optimizer, ema, trainable
    return seconds, memory


def torchvision_shim():
    functional = types.SimpleNamespace(
        resize=lambda t, size, interpolation=None: F.interpolate(t, size=size, mode="nearest"))
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def diffusers_peft(preset, shape, device, warmup, repeat):
    """diffusers' Cosmos transformer + PEFT LoRA r32, gradient checkpointing, AdamW; loss like ours."""
    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import CosmosTransformer3DModel
    from peft import LoraConfig

    tc.transforms = torchvision_shim()
    cfg = DIT_PRESETS[preset]
    reset_memory(device)
    with torch.device(device):
        net = CosmosTransformer3DModel(
            in_channels=17, out_channels=16, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            num_layers=cfg.num_blocks, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240),
            patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
            use_crossattn_projection=True, crossattn_proj_in_channels=cfg.crossattn_proj_in_channels,
            encoder_hidden_states_channels=1024).to(torch.bfloat16)
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights=True, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    trainable = [p for p in net.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    net.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    T, H, W = shape
    x0 = torch.randn(1, 16, T, H, W, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, cfg.crossattn_proj_in_channels, device=device, dtype=torch.bfloat16)
    cond_mask = torch.zeros(1, 1, T, H, W, device=device, dtype=torch.bfloat16)
    padding_mask = torch.zeros(1, 1, 8 * H, 8 * W, device=device, dtype=torch.bfloat16)
    reset_memory(device)

    def step():
        sigma = torch.rand(1, device=device)
        noise = torch.randn_like(x0)
        x_t = (sigma * noise + (1 - sigma) * x0).to(torch.bfloat16)
        v = net(x_t, sigma.to(torch.bfloat16), text, condition_mask=cond_mask, padding_mask=padding_mask,
                return_dict=False)[0]
        F.mse_loss(v.float(), (noise - x0).float()).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = timed(step, warmup, repeat, device)
        memory = peak_gib(device)
    except torch.OutOfMemoryError:
        seconds, memory = float("nan"), peak_gib(device)
    del net, optimizer, trainable
    return seconds, memory


@torch.no_grad()
def check_attention_backends(device, shape):
    """The DiT with our Triton attention equals the DiT with SDPA to bf16 rounding (same weights and inputs)."""
    train.dit_preset, train.dtype, train.attention_backend = "cosmos_2b", "bfloat16", "triton"
    train.use_lora, train.base_checkpoint, train.seed = True, "", 0
    reset_memory(device)
    model = train.build_model(device)
    T, H, W = shape
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, 16, T, H, W, device=device, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 100352, device=device, generator=g, dtype=torch.bfloat16)
    sigma = torch.full((1,), 0.7, device=device)
    outs = {}
    for backend in ("triton", "sdpa"):
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        outs[backend] = model(x, sigma, text)
    ref = model.float()(x.float(), sigma, text.float())  # fp32 SDPA reference
    err = {b: ((o - ref).norm() / ref.norm()).item() for b, o in outs.items()}
    del model
    return err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script runs)")
    parser.add_argument("--skip_14b", action="store_true")
    parser.add_argument("--backends", default="sdpa,triton", help="attention backends of our 2B rows")
    parser.add_argument("--skip_peer", action="store_true", help="re-runs on a machine where the peer was just timed")
    args = parser.parse_args()
    rank, world, device = train.init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.smoke:
        cases = [("tiny", (3, 4, 4), "selective", "sdpa")]
        peer_cases = [("tiny", (3, 4, 4))]
        warmup, repeat = 1, 2
    else:
        cases = [("cosmos_2b", shape, "selective", backend) for shape in ((24, 88, 160), (24, 54, 96))
                 for backend in args.backends.split(",")]
        peer_cases = [("cosmos_2b", (24, 88, 160)), ("cosmos_2b", (24, 54, 96))]
        warmup, repeat = 1, 3
        if not args.skip_14b:
            cases.append(("cosmos_14b", (24, 88, 160), "full", "triton"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if not args.smoke:
        err = check_attention_backends(device, (24, 54, 96))
        print(f"2B forward at 24x54x96, relative error vs fp32: triton {err['triton']:.2e}, sdpa {err['sdpa']:.2e}",
              flush=True)
    rows = []
    peer = {}
    for preset, shape in [] if args.skip_peer else peer_cases:
        peer[(preset, shape)] = diffusers_peft(preset, shape, device, warmup, repeat)
        print(f"diffusers+PEFT {preset} {shape}: {peer[(preset, shape)][0]:.3f} s, {peer[(preset, shape)][1]:.1f} GiB",
              flush=True)
    for preset, shape, ckpt, backend in cases:
        try:
            seconds, memory = ours(preset, shape, device, warmup, 1 if preset == "cosmos_14b" else repeat, ckpt,
                                   backend)
        except torch.OutOfMemoryError:
            seconds, memory = float("nan"), peak_gib(device)
        print(f"ours {preset} {shape} {ckpt} {backend}: {seconds:.3f} s, {memory:.1f} GiB", flush=True)
        rows.append((preset, shape, ckpt, backend, seconds, memory))

    print(f"\nLoRA r32 training step, batch 1, {card}, torch {torch.__version__}")
    print(f"| model | latent TxHxW | tokens | ours (ckpt, attention) | ours s | ours GiB | MFU | diffusers+PEFT s | "
          f"GiB | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, shape, ckpt, backend, seconds, memory in rows:
        T, H, W = shape
        cfg = DIT_PRESETS[preset]
        mfu = step_flops(cfg, T, H, W) / seconds / 1e12 / PEAK_TFLOPS if seconds == seconds else float("nan")
        p_s, p_mem = peer.get((preset, shape), (float("nan"), float("nan")))
        print(f"| {preset} | {T}x{H}x{W} | {T * H * W // 4:,} | {ckpt}, {backend} | {seconds:.2f} | {memory:.1f} | "
              f"{mfu:.0%} | {p_s:.2f} | {p_mem:.1f} | {p_s / seconds:.2f}x |")


if __name__ == "__main__":
    main()
