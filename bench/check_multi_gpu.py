"""FSDP2 + NCCL check on 2 GPUs: the same global batch gives the same loss curve on 1 and 2 GPUs, and a
checkpoint written by 2 GPUs resumes on 1. The 2B preset with random weights on a small cached synthetic dataset.

    python bench/check_multi_gpu.py            # needs 2 GPUs (nvidia-h100-x2)
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from prep_data import build_cache, write_synthetic_dataset  # noqa: E402


class PoolVAE(torch.nn.Module):
    """Stand-in encoder with the Wan VAE's shapes (frame 0 alone, 4 frames per latent frame, 8x8 space)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 16)

    def encode(self, video):
        video = torch.cat([video[:, :, :1].repeat(1, 1, 4, 1, 1), video], dim=2)
        pooled = torch.nn.functional.avg_pool3d(video, (4, 8, 8))
        return 3 * self.proj(pooled.movedim(1, -1)).movedim(-1, 1)


class HashTextEncoder:
    def __init__(self, width):
        self.width = width

    def encode(self, captions):
        g = torch.Generator().manual_seed(sum(map(ord, captions[0])))
        return torch.randn(1, 16, self.width, generator=g)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(preset, nproc, out, cache, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "train.py", f"dit_preset='{preset}'", f"cache_dir='{cache}'", f"out_dir='{out}'", "num_workers=0",
           "wandb=False", "val_iter=0", "logging_iter=1", "lr=1e-4", "warmup_steps=0", *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="4"))
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result.stdout


def logged(stdout, key):
    return [float(m.group(1)) for m in re.finditer(rf"^iter \d+:.*?\b{key} ([\d.e+-]+)", stdout, re.M)]


def main():
    import argparse

    from model import DIT_PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cosmos_2b", help="tiny: a quick check of this script on CPUs (gloo)")
    preset = parser.parse_args().preset
    root = Path(tempfile.mkdtemp())
    write_synthetic_dataset(root / "data", num_videos=4, num_frames=17, size=(128, 128))
    cache = build_cache(root / "data", PoolVAE(), HashTextEncoder(DIT_PRESETS[preset].crossattn_proj_in_channels), "pool", "hash", num_frames=17,
                        video_size=(128, 128)).parent
    one = train(preset, 1, root / "one", cache, "batch_size=2", "max_iter=6", "save_iter=6")
    two = train(preset, 2, root / "two", cache, "batch_size=1", "max_iter=6", "save_iter=6")
    resumed = train(preset, 1, root / "two", cache, "batch_size=2", "max_iter=8", "save_iter=8")
    loss_one, loss_two = logged(one, "loss"), logged(two, "loss")
    rel = max(abs(a - b) / abs(a) for a, b in zip(loss_one, loss_two))
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nFSDP2, {preset} (random weights), latent 5x16x16, global batch 2, {card}, "
          f"torch {torch.__version__}")
    print("| step | 1 GPU x batch 2 | 2 GPUs x batch 1 |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(zip(loss_one, loss_two)):
        print(f"| {i + 1} | {a:.5f} | {b:.5f} |")
    memory = [logged(out, "max_memory_gib") or [float("nan")] for out in (one, two)]
    print(f"max relative loss difference: {rel:.2e}; peak GiB 1 GPU {memory[0][-1]:.1f}, "
          f"2 GPUs {memory[1][-1]:.1f} (rank 0)")
    print("2-GPU checkpoint resumed on 1 GPU:", "resumed from" in resumed and "iteration 6" in resumed,
          "| losses after resume:", logged(resumed, "loss"))


if __name__ == "__main__":
    main()
