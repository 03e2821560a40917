"""Wan2.1 VAE on the GPU: ours (model.WanVAE) vs diffusers' AutoencoderKLWan with the same random weights (carried by
our key map), bf16, encode of a 93x704x1280 video and decode of its 24x88x160 latent. Seconds are the median of
--reps timed calls after --warmup (CUDA events); peak GiB is torch.cuda.max_memory_allocated during one call, with
only the measured model on the GPU (its weights and the input count). Prints a table last, naming the card.

    python bench/bench_vae.py [--reps 3] [--warmup 1] [--cudnn_benchmark]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
from oracles import bind_oracles  # noqa: E402  (the peer and our code each get their own `kernels`)

bind_oracles()
from model import WAN_LATENT_MEAN, WAN_LATENT_STD, WanVAE  # noqa: E402
from vae_keys import wan_vae_official_to_diffusers  # noqa: E402


def measure(fn, reps, warmup):
    """Median seconds and peak GiB of fn() over `reps` calls after `warmup`; returns the last output too."""
    times, peaks, out = [], [], None
    for i in range(warmup + reps):
        out = None  # free the previous output before the next call
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    return statistics.median(times), max(peaks), out


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--cudnn_benchmark", action="store_true", help="let cuDNN time its algorithms (both models)")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    dev, dtype = torch.device("cuda"), torch.bfloat16
    card = torch.cuda.get_device_name()
    print(f"{card} | torch {torch.__version__} | cuDNN {torch.backends.cudnn.version()} | "
          f"cudnn.benchmark={args.cudnn_benchmark}", flush=True)

    torch.manual_seed(0)
    ours = WanVAE().eval()
    ref = AutoencoderKLWan().eval()
    ref.load_state_dict(wan_vae_official_to_diffusers(ours.state_dict()), strict=True)
    ours, ref = ours.to(dtype), ref.to(dtype)
    mean = torch.tensor(WAN_LATENT_MEAN, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN_LATENT_STD, device=dev).view(1, -1, 1, 1, 1)

    def on_gpu(model):  # only the measured model is resident
        (ref if model is ours else ours).to("cpu")
        model.to(dev)
        torch.cuda.empty_cache()

    video = (torch.rand(1, 3, args.frames, args.height, args.width, device=dev) * 2 - 1).to(dtype)
    rows = []

    def row(name, fn):
        sec, gib, out = measure(fn, args.reps, args.warmup)
        rows.append((name, sec, gib))
        print(f"  {name:<44} {sec:7.3f} s {gib:7.2f} GiB", flush=True)
        return out

    on_gpu(ref)
    with torch.no_grad():
        ref_latents = row("diffusers encode (4-frame chunks)", lambda: ref.encode(video).latent_dist.mode())
    ref_latents = ((ref_latents.float() - mean) / std).to(dtype)  # normalised like ours
    on_gpu(ours)
    latents = row("ours encode, temporal_window=4 (default)", lambda: ours.encode(video))
    latents16 = row("ours encode, temporal_window=16 (Cosmos's)", lambda: ours.encode(video, temporal_window=16))
    print(f"  latents {list(latents.shape)}; rel. diff vs diffusers: window 4 {rel_err(latents, ref_latents):.2e}, "
          f"window 16 {rel_err(latents16, ref_latents):.2e}; finite: {bool(latents.isfinite().all())}", flush=True)
    del video, latents16

    raw = (latents.float() * std + mean).to(dtype)
    on_gpu(ref)
    with torch.no_grad():
        ref_video = row("diffusers decode (clamped to [-1,1])", lambda: ref.decode(raw).sample)
    ref_video = ref_video.cpu()
    on_gpu(ours)
    ours_video = row("ours decode (not clamped)", lambda: ours.decode(latents))
    print(f"  video {list(ours_video.shape)}; rel. diff vs diffusers (ours clamped): "
          f"{rel_err(ours_video.clamp(-1, 1).cpu(), ref_video):.2e}; finite: {bool(ours_video.isfinite().all())}",
          flush=True)
    del ours_video

    print(f"\nWan2.1 VAE, bf16, random weights, {args.frames}x{args.height}x{args.width} video <-> "
          f"{list(latents.shape[2:])} latent | {card} | cudnn.benchmark={args.cudnn_benchmark}")
    print(f"| {'what':<44} | {'seconds':>8} | {'peak GiB':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|")
    for name, sec, gib in rows:
        print(f"| {name:<44} | {sec:8.3f} | {gib:8.2f} |")


if __name__ == "__main__":
    main()
