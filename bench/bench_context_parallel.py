"""One guided sampling step of the 2B DiT at 93x704x1280 on 1 GPU and spread over all GPUs of the machine
(context parallel, and guidance parallel on 2), in one run; the outputs are compared with the 1-GPU step.

    torchrun --nproc_per_node=2 bench/bench_context_parallel.py          # on nvidia-h100-x2 (or 4 on -x4)
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


def timed(fn, device, repeat=2):
    fn()  # warm-up
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
    args = parser.parse_args()
    rank, world, device = train.init_distributed()
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

    rows = []
    seconds, reference = timed(guided_step, device)  # every rank alone (rank 0's figure is the 1-GPU row)
    rows.append(("1 GPU, cond+uncond batched", 1, seconds, 0.0))
    net.enable_context_parallel(dist.group.WORLD)
    seconds, out = timed(guided_step, device)
    rows.append((f"context parallel over {world}", world, seconds, ((out - reference).norm() / reference.norm()).item()))
    net.enable_context_parallel(None)
    if world % 2 == 0:  # guidance parallel: the first half runs the conditional pass, the second the unconditional
        n = world // 2  # each half splits the video over its n GPUs
        halves = [dist.new_group(list(range(start, start + n))) for start in (0, n)] if n > 1 else [None, None]
        pairs = [dist.new_group([i, n + i]) for i in range(n)]
        net.enable_context_parallel(halves[rank // n])
        seconds, out = timed(lambda: guided_step(pairs[rank % n]), device)
        net.enable_context_parallel(None)
        name = "guidance parallel (cond | uncond)" + (f" x context parallel {n}" if n > 1 else "")
        rows.append((name, world, seconds, ((out - reference).norm() / reference.norm()).item()))
    if rank == 0:
        card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(f"\nguided step (g=7, image2world), {preset}, latent {T}x{H}x{W}, {card} x {world}, "
              f"torch {torch.__version__}")
        print("| layout | GPUs | s/step | speed-up | rel. L2 vs 1 GPU |")
        print("|---|---|---|---|---|")
        for name, gpus, s, err in rows:
            print(f"| {name} | {gpus} | {s:.3f} | {rows[0][2] / s:.2f}x | {err:.1e} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
