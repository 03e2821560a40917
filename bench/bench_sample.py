"""Sampling speed of the 2B DiT at 93x704x1280 (latent 24x88x160): ours vs diffusers in the same run.

    python bench/bench_sample.py                 # one H100 (~6 min)
    python bench/bench_sample.py --smoke         # tiny shapes on the CPU: checks that the script runs

1. One guided denoising step, g = 7. Ours: sample.py's velocity, one forward of the cond and uncond branches
   batched (B = 2). Diffusers: CosmosTransformer3DModel called twice, cond then uncond, as
   Cosmos2_5_PredictBasePipeline does. Same random weights (carried by our key map), bf16, each with its default
   attention (ours: the preset's attention_backend, printed; diffusers: SDPA with PyTorch's own backend order).
   Seconds are the median of --reps calls after a warm-up.
2. A whole 35-step video with ours: flow UniPC over the DiT, then the Wan VAE decode (random weights). Diffusers'
   video is not run; its row is 35 x its guided step.
Peak GiB is torch.cuda.max_memory_allocated during the measured calls, with only the measured model on the GPU.
Prints a table last, naming the card.
"""

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import bind_oracles  # noqa: E402  (the peer and our code each get their own `kernels`)

bind_oracles()
import sample  # noqa: E402
from convert import dit_to_diffusers  # noqa: E402
from model import DIT_PRESETS, Attention, DiT, WanVAE, WanVAEConfig  # noqa: E402


def timed(fn, device, reps=1, warmup=0):
    """(median seconds over `reps` calls after `warmup` calls, peak GiB over the measured calls, last output)."""
    for _ in range(warmup):
        out = fn()
        del out
    times = []
    reset_memory(device)
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def randomize(net):
    """Random weights everywhere, the adaLN up-projections too (zero at init, which would make every block the
    identity and the ours-vs-diffusers check below empty). Speed does not depend on the values."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))


def torchvision_shim():
    """diffusers' Cosmos transformer resizes the padding mask with torchvision, which the GPU machine lacks;
    its NEAREST tensor resize is torch's nearest interpolation."""
    functional = types.SimpleNamespace(
        resize=lambda t, size, interpolation=None: F.interpolate(t, size=size, mode="nearest"))
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def diffusers_twin(cfg, state_dict, device, dtype):
    """diffusers' CosmosTransformer3DModel with the Cosmos-Predict2.5 settings of `cfg`, holding our weights."""
    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import CosmosTransformer3DModel

    tc.transforms = torchvision_shim()
    with torch.device(device):
        net = CosmosTransformer3DModel(
            in_channels=cfg.in_channels + 1, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, num_layers=cfg.num_blocks, mlp_ratio=cfg.mlp_ratio,
            text_embed_dim=cfg.crossattn_emb_channels, adaln_lora_dim=cfg.adaln_lora_dim,
            max_size=(cfg.max_frames, cfg.max_img_h, cfg.max_img_w), patch_size=(1, 2, 2),
            rope_scale=(cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio,
                        cfg.rope_w_extrapolation_ratio),
            concat_padding_mask=True, extra_pos_embed_type=None, use_crossattn_projection=True,
            crossattn_proj_in_channels=cfg.crossattn_proj_in_channels,
            encoder_hidden_states_channels=cfg.crossattn_emb_channels).to(dtype)
    for name, module in net.named_modules():  # the official q/k RMSNorm eps (diffusers builds them with 1e-5)
        if name.endswith(("norm_q", "norm_k")):
            module.eps = 1e-6
    net.load_state_dict(dit_to_diffusers(state_dict), strict=True)
    return net.eval().requires_grad_(False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script runs)")
    parser.add_argument("--reps", type=int, default=2, help="timed guided steps per model, after one warm-up")
    parser.add_argument("--steps", type=int, default=35, help="sampler steps of the whole video")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--skip_decode", action="store_true", help="leave the VAE decode out of the video")
    parser.add_argument("--attention", choices=("sdpa", "triton"), default=None,
                        help="our attention backend (default: the preset's)")
    parser.add_argument("--also_attention", choices=("sdpa", "triton"), default=None,
                        help="also time our guided step with this attention backend (same weights, same run)")
    args = parser.parse_args()

    if args.smoke:
        device, dtype, preset = torch.device("cpu"), torch.float32, "tiny"
        (T, H, W), text_len, vae_cfg = (3, 4, 6), 16, WanVAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    else:
        device, dtype, preset = torch.device("cuda"), torch.bfloat16, "cosmos_2b"
        (T, H, W), text_len, vae_cfg = (24, 88, 160), 512, WanVAEConfig()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import diffusers

    cfg = DIT_PRESETS[preset]
    if args.attention:
        cfg = dataclasses.replace(cfg, attention_backend=args.attention)
    print(f"{card} | torch {torch.__version__} | diffusers {diffusers.__version__} | {preset}, our attention "
          f"{cfg.attention_backend} | latent {T}x{H}x{W} = {1 + 4 * (T - 1)}x{8 * H}x{8 * W} pixels, "
          f"{T * H * W // 4} tokens", flush=True)

    torch.manual_seed(0)
    with torch.device(device):
        ours = DiT(cfg)
    randomize(ours)
    ours = ours.to(dtype).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(1)
    noise = torch.randn(1, 16, T, H, W, device=device, generator=gen)
    x = torch.randn(1, 16, T, H, W, device=device, generator=gen)
    emb = torch.randn(1, text_len, cfg.crossattn_proj_in_channels, device=device, generator=gen).to(dtype)
    neg = torch.randn(1, text_len, cfg.crossattn_proj_in_channels, device=device, generator=gen).to(dtype)
    sigmas, net_sigmas = sample.flow_schedule(args.steps, 5.0)
    sigma = float(net_sigmas[args.steps // 2])
    rows = {}

    # 1a. ours: one guided step, cond and uncond in one forward
    velocity_fn = sample.make_velocity_fn(ours, noise, torch.zeros_like(noise), 0, emb, neg, args.guidance)
    with torch.no_grad():
        seconds, peak, v_ours = timed(lambda: velocity_fn(x, sigma), device, args.reps, warmup=1)
    rows["guided step (cond + uncond)"] = [seconds, peak]
    print(f"ours guided step: {seconds:.3f} s, {peak:.1f} GiB", flush=True)
    if args.also_attention:
        attentions = [m for m in ours.modules() if isinstance(m, Attention)]
        for m in attentions:
            m.backend = args.also_attention
        with torch.no_grad():
            seconds, peak, v_other = timed(lambda: velocity_fn(x, sigma), device, args.reps, warmup=1)
        for m in attentions:
            m.backend = cfg.attention_backend
        rows[f"guided step, attention {args.also_attention}"] = [seconds, peak]
        diff = ((v_other.float() - v_ours.float()).norm() / v_ours.float().norm()).item()
        print(f"ours guided step with attention {args.also_attention}: {seconds:.3f} s, {peak:.1f} GiB; velocity "
              f"differs from the {cfg.attention_backend} step's by {diff:.2e} (relative L2)", flush=True)

    # 2. ours: the whole video
    seconds, peak, latents = timed(lambda: sample.unipc_sample(velocity_fn, noise, sigmas, net_sigmas), device)
    rows[f"{args.steps}-step DiT sampling"] = [seconds, peak]
    print(f"ours {args.steps} steps: {seconds:.1f} s, {peak:.1f} GiB", flush=True)
    if not args.skip_decode:  # only the VAE on the GPU
        ours.to("cpu")
        with torch.device(device):
            vae = WanVAE(vae_cfg)
        vae = vae.to(dtype).eval()
        vae.decode(latents[:, :, :2])  # warm-up (cuDNN picks its algorithms)
        seconds, peak, video = timed(lambda: vae.decode(latents), device)
        rows["VAE decode"] = [seconds, peak]
        print(f"ours VAE decode: {seconds:.1f} s, {peak:.1f} GiB, video {tuple(video.shape)}", flush=True)
        del vae, video
        ours.to(device)
    state_dict = {k: v.cpu() for k, v in ours.state_dict().items()}
    del ours, velocity_fn, latents
    reset_memory(device)

    # 1b. diffusers: two forwards, as its pipeline, then the same guidance formula
    theirs = diffusers_twin(cfg, state_dict, device, dtype)
    del state_dict
    cond_mask = torch.zeros(1, 1, T, H, W, device=device, dtype=dtype)
    padding_mask = torch.zeros(1, 1, 8 * H, 8 * W, device=device, dtype=dtype)
    timestep = torch.full((1,), sigma, device=device)

    def their_step():
        kwargs = dict(hidden_states=x.to(dtype), condition_mask=cond_mask, timestep=timestep,
                      padding_mask=padding_mask, return_dict=False)
        v = theirs(encoder_hidden_states=emb, **kwargs)[0].float()
        v_neg = theirs(encoder_hidden_states=neg, **kwargs)[0].float()
        return v + args.guidance * (v - v_neg)

    with torch.no_grad():
        seconds, peak, v_theirs = timed(their_step, device, args.reps, warmup=1)
    print(f"diffusers guided step: {seconds:.3f} s, {peak:.1f} GiB", flush=True)
    rows["guided step (cond + uncond)"] += [seconds, peak]
    rows[f"{args.steps}-step DiT sampling"] += [args.steps * seconds, None]  # an estimate: not run
    agreement = ((v_ours.float() - v_theirs).norm() / v_theirs.norm()).item()

    print(f"\nCosmos-Predict2.5 {preset} sampling, {1 + 4 * (T - 1)}x{8 * H}x{8 * W}, guidance {args.guidance:g}, "
          f"{card}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}")
    print("| part | ours s | ours peak GiB | diffusers s | diffusers peak GiB | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, (s, p, *theirs_row) in rows.items():
        if theirs_row:
            ts, tp = theirs_row
            their_s, their_p = (f"{ts:.1f} ({args.steps} x step)", "-") if tp is None else (f"{ts:.3f}", f"{tp:.1f}")
            print(f"| {name} | {s:.3f} | {p:.1f} | {their_s} | {their_p} | {ts / s:.2f}x |")
        else:
            print(f"| {name} | {s:.3f} | {p:.1f} | - | - | - |")
    video_s = sum(r[0] for n, r in rows.items() if not n.startswith("guided step"))
    print(f"| whole video (DiT{'' if args.skip_decode else ' + VAE decode'}) | {video_s:.1f} | - | - | - | - |")
    print(f"guided velocity, ours vs diffusers: relative L2 difference {agreement:.2e} "
          f"({'bf16' if dtype == torch.bfloat16 else 'fp32'}; same weights, same inputs)")


if __name__ == "__main__":
    main()
