"""One guided sampling step (or, with --video, a whole 35-step video) of the 2B DiT at 93x704x1280 on 1 GPU and
spread over all GPUs of the machine (context parallel, and guidance parallel), in one run; the outputs are compared
with the 1-GPU result.

    torchrun --nproc_per_node=2 bench/bench_context_parallel.py          # on nvidia-h100-x2 (or 4 on -x4)
    torchrun --nproc_per_node=2 bench/bench_context_parallel.py --video --layouts guidance
    torchrun --nproc_per_node=2 bench/bench_context_parallel.py --smoke  # tiny shapes on CPUs (gloo)
"""

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
import train  # noqa: E402
from model import DIT_PRESETS, DiT  # noqa: E402


def timed(fn, device, repeat=2, warmup=None):
    (warmup or fn)()  # cuDNN and NCCL set up; a whole video is warmed up by one step
    times = []
    for _ in range(repeat):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = __import__("time").perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(__import__("time").perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--video", action="store_true", help="time whole videos (UniPC, 35 steps, no VAE decode)")
    parser.add_argument("--layouts", default="context,guidance", help="the multi-GPU layouts to time")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"context", "guidance"}:
        raise SystemExit(f"--layouts {args.layouts}: expected a comma-separated subset of context,guidance")
    rank, world, device = train.init_distributed()
    if "guidance" in layouts and world % 2:
        raise SystemExit(f"--layouts guidance splits the ranks into a conditional and an unconditional half: it needs "
                         f"an even number of processes (got {world}); use --layouts context")
    preset, shape = ("tiny", (4, 4, 4)) if args.smoke else ("cosmos_2b", (24, 88, 160))
    cfg = dataclasses.replace(DIT_PRESETS[preset], num_heads=4) if args.smoke else DIT_PRESETS[preset]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)  # the same random weights on every rank
    with torch.device(device):
        net = DiT(cfg).to(dtype).eval()
    T, H, W = shape
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, T, H, W, generator=g).to(device)
    cond = torch.randn(1, 16, T, H, W, generator=g).to(device)
    text = torch.randn(1, 512, cfg.crossattn_proj_in_channels, generator=g).to(device, dtype)
    neg = torch.randn(text.shape, generator=g).to(device, dtype)

    def guided_step(cfg_group=None):
        velocity = sample.make_velocity_fn(net, noise, cond, 1, text, neg, 7.0, cfg_group=cfg_group)
        with torch.no_grad():
            return velocity(noise, 0.9)

    sigmas, net_sigmas = sample.flow_schedule(35, 5.0)

    def video(cfg_group=None):
        velocity = sample.make_velocity_fn(net, noise, cond, 1, text, neg, 7.0, cfg_group=cfg_group)
        with torch.no_grad():
            return sample.unipc_sample(velocity, noise, sigmas, net_sigmas)

    run, repeat = (video, 1) if args.video else (guided_step, 2)

    rows = []
    # every rank alone (rank 0's is the 1-GPU row)
    seconds, reference = timed(run, device, repeat, guided_step)
    rows.append(("1 GPU, cond+uncond batched", 1, seconds, 0.0))
    if rank == 0:
        print(f"1 GPU: {seconds:.3f} s", flush=True)
    if "context" in layouts:
        net.enable_context_parallel(dist.group.WORLD)
        seconds, out = timed(run, device, repeat, guided_step)
        rows.append((f"context parallel over {world}", world, seconds,
                     ((out - reference).norm() / reference.norm()).item()))
        net.enable_context_parallel(None)
    if "guidance" in layouts:  # the first half of the ranks runs the conditional pass, the second the other
        n = world // 2  # each half splits the video over its n GPUs
        halves = [dist.new_group(list(range(start, start + n))) for start in (0, n)] if n > 1 else [None, None]
        pairs = [dist.new_group([i, n + i]) for i in range(n)]
        net.enable_context_parallel(halves[rank // n])
        seconds, out = timed(lambda: run(pairs[rank % n]), device, repeat, lambda: guided_step(pairs[rank % n]))
        net.enable_context_parallel(None)
        name = "guidance parallel (cond | uncond)" + (f" x context parallel {n}" if n > 1 else "")
        rows.append((name, world, seconds, ((out - reference).norm() / reference.norm()).item()))
    if rank == 0:
        card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        what = "whole video (35 UniPC steps, no VAE decode)" if args.video else "guided step"
        print(f"\n{what}, g=7, image2world, {preset}, latent {T}x{H}x{W}, {card} x {world}, "
              f"torch {torch.__version__}")
        print(f"| layout | GPUs | s/{'video' if args.video else 'step'} | speed-up | rel. L2 vs 1 GPU |")
        print("|---|---|---|---|---|")
        for name, gpus, s, err in rows:
            print(f"| {name} | {gpus} | {s:.3f} | {rows[0][2] / s:.2f}x | {err:.1e} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
