"""Pretrain the demo's tiny Wan-architecture VAE on shapes-world clips (assets/demo/README.md has the commands we ran
and their timings: about 9 minutes on an H100, then 20 on a 2-core CPU).

    python prep_data.py demo --kind shapes --out datasets/shapes --num_videos 512
    python assets/demo/pretrain_vae.py --dataset datasets/shapes --out assets/demo/vae.safetensors

The network is model.py's `WanVAE` with narrow stages (`--dim 16` instead of the released 96): the same layers, the
same 4x8x8 compression to 16 latent channels and the same keys as the released `tokenizer.pth`, 2.6 M parameters
instead of 127 M. It is trained as a VAE in two stages: first on single frames (the frame-0 path, where the spatial
compression is learnt at a seventeenth of the cost per sample), then on whole 17-frame clips, where the temporal
compression is learnt. Whole clips, because the causal convolutions see the entire past: a VAE trained on shorter
windows degrades on the later frames of longer clips. `--crop` below 64 trains on random crops instead of whole
frames (it is fully convolutional), which is cheaper on a CPU.

Half of the crops get their hues rotated by a random angle (around the gray axis of RGB space), so the VAE learns
to reproduce colours the shapes world never draws, such as the robot's teal: the VAE stands in for a general
video compressor; it is the DiT that must never have seen the teal robot.

Loss = L1 + MSE reconstruction + `kl` x KL(q(z|x) || N(0, I)), where z is the *normalised* latent
(mu - WAN_LATENT_MEAN) / WAN_LATENT_STD that `WanVAE.encode` returns. The KL term keeps those normalised latents near
unit scale, which the DiT's noise schedule assumes; the script prints their measured mean and std at the end.

Initialisation matters at this size: with PyTorch's default conv init each plain convolution on the VAE's main
path (stem, resamples, shortcuts, heads: about 15 of them) shrinks the signal about 2x, the decoder's output starts
out independent of its input, and training sits on a plateau for thousands of steps (it cannot even learn flat
colours). He-normal weights and zero biases keep the signal's scale, and it learns from the first steps.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).absolute().parents[2]))  # the repository root, for model.py and friends
from model import WAN_LATENT_MEAN, WAN_LATENT_STD, WanVAE, WanVAEConfig  # noqa: E402
from prep_data import frames_to_tensor, list_videos, read_video  # noqa: E402


def encode_train(vae, video_B_3_T_H_W):
    """(mu, logvar) of the normalised latent, with gradients: frame 0 alone, then the rest as one chunk,
    as WanVAE.encode chunks clips of up to 17 frames (the feature cache carries the causal context)."""
    cache = {}
    chunks = [video_B_3_T_H_W[:, :, :1]] + ([video_B_3_T_H_W[:, :, 1:]] if video_B_3_T_H_W.shape[2] > 1 else [])
    h = torch.cat([vae.encoder(chunk, cache) for chunk in chunks], dim=2)
    mu, logvar = vae.conv1(h).chunk(2, dim=1)  # raw latent statistics [B,16,t,h,w]
    mean = torch.tensor(WAN_LATENT_MEAN, device=mu.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN_LATENT_STD, device=mu.device).view(1, -1, 1, 1, 1)
    return (mu - mean) / std, logvar - 2 * std.log()


def decode_train(vae, z_B_16_t_h_w):
    """WanVAE.decode with gradients (normalised latent -> pixels)."""
    mean = torch.tensor(WAN_LATENT_MEAN, device=z_B_16_t_h_w.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN_LATENT_STD, device=z_B_16_t_h_w.device).view(1, -1, 1, 1, 1)
    return vae.decode_frames(vae.conv2(z_B_16_t_h_w * std + mean))


def hue_rotation(angle):
    """3x3 matrix rotating RGB vectors by `angle` around the gray axis (1,1,1): hues turn, grays stay gray."""
    k = np.ones(3) / math.sqrt(3)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])  # cross product with k
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K  # Rodrigues' formula


def random_batch(clips, rng, batch, frames, crop):
    """uint8 clips [N,T,H,W,3] -> [B,3,frames,crop,crop] in [-1,1]: a random clip, window and crop each, and
    for half of them a random hue rotation."""
    N, T, H, W, _ = clips.shape
    out = []
    for _ in range(batch):
        i, t = rng.integers(N), rng.integers(T - frames + 1)
        y, x = rng.integers(H - crop + 1), rng.integers(W - crop + 1)
        window = clips[i, t:t + frames, y:y + crop, x:x + crop]
        if rng.random() < 0.5:
            rotated = window.astype(np.float32) @ hue_rotation(rng.uniform(0, 2 * math.pi)).T.astype(np.float32)
            window = np.clip(np.rint(rotated), 0, 255).astype(np.uint8)
        out.append(window)
    return torch.stack([frames_to_tensor(c) for c in out])


@torch.no_grad()
def evaluate(vae, clips):
    """PSNR of the inference path (WanVAE.encode -> decode) on whole clips, and the normalised latents' stats."""
    vae.eval()
    video = torch.stack([frames_to_tensor(c) for c in clips]).to(vae.conv1.weight.device)  # [N,3,T,H,W]
    z = torch.cat([vae.encode(v[None]) for v in video])
    recon = torch.cat([vae.decode(zi[None]) for zi in z]).clamp(-1, 1)
    mse = ((recon - video) / 2).square().mean().item()  # in [0,1] pixel units
    vae.train()
    return 10 * math.log10(1 / mse), z.mean().item(), z.std().item(), z.std(dim=(0, 2, 3, 4)).cpu()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a shapes-world dataset (prep_data.py demo --kind shapes)")
    p.add_argument("--out", required=True, help="output .safetensors (must not exist)")
    p.add_argument("--image_steps", type=int, default=3000, help="stage 1: steps on single frames")
    p.add_argument("--clip_steps", type=int, default=3000, help="stage 2: steps on windows of --frames frames")
    p.add_argument("--frames", type=int, default=17, help="frames per stage-2 window, 1 + 4k")
    p.add_argument("--batch", type=int, default=64, help="crops per stage-1 step")
    p.add_argument("--clip_batch", type=int, default=16, help="crops per stage-2 step")
    p.add_argument("--crop", type=int, default=64, help="square crop size, a multiple of 8")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-3, help="weight of the KL term")
    p.add_argument("--held_out", type=int, default=16, help="clips kept out of training, for the final PSNR")
    p.add_argument("--dim", type=int, default=16, help="width of the first stage (the released VAE: 96)")
    p.add_argument("--save_every", type=int, default=0, help="also write <out>_step<N>.safetensors every N steps")
    p.add_argument("--init", help="start from these weights (a --save_every file) instead of He init")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another --out")
    earlier = sorted(out.parent.glob(f"{out.stem}_step*{out.suffix}")) if args.save_every else []
    if earlier:
        raise SystemExit(f"{earlier[0]} exists (an earlier run's --save_every file); move it away or choose "
                         f"another --out")

    videos = list_videos(args.dataset)
    clips = np.stack([read_video(v)[0] for v in videos])  # [N,T,H,W,3] uint8, a few MB
    train_clips, held_out = clips[args.held_out:], clips[:args.held_out]
    print(f"{len(train_clips)} training clips, {len(held_out)} held out, each {clips.shape[1:4]}")

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = WanVAEConfig(dim=args.dim, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                          temperal_downsample=(False, True, True))
    vae = WanVAE(config)
    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):  # He init: see the module docstring
            torch.nn.init.normal_(m.weight, std=math.sqrt(2 / m.weight[0].numel()))
            torch.nn.init.zeros_(m.bias)
    if args.init:
        vae.load_state_dict(load_file(args.init), strict=True)
    vae.to(device)
    print(f"WanVAE {config}: {sum(p.numel() for p in vae.parameters()):,} parameters, on {device}")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    steps = args.image_steps + args.clip_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 100-step warm-up, then cosine to 10% over both stages
        optimizer, lambda s: min(1, (s + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))

    t0 = time.time()
    for step in range(1, steps + 1):
        frames, batch = (1, args.batch) if step <= args.image_steps else (args.frames, args.clip_batch)
        x = random_batch(train_clips, rng, batch, frames, args.crop).to(device)  # [B,3,frames,crop,crop]
        mu, logvar = encode_train(vae, x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # the reparameterised sample
        recon = decode_train(vae, z)
        rec = (recon - x).abs().mean() + (recon - x).square().mean()
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
        loss = rec + args.kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step} ({frames} frame{'s' if frames > 1 else ''}): reconstruction {rec.item():.4f}, "
                  f"kl {kl.item():.3f}, latent std {mu.std().item():.2f}, {time.time() - t0:.0f} s", flush=True)
        if args.save_every and step % args.save_every == 0 and step < steps:
            save(vae, out.with_name(f"{out.stem}_step{step}{out.suffix}"), {"args": json.dumps(vars(args))})

    psnr, z_mean, z_std, z_std_per_channel = evaluate(vae, held_out)
    print(f"held-out clips through WanVAE.encode/decode: PSNR {psnr:.1f} dB; normalised latents mean {z_mean:.2f}, "
          f"std {z_std:.2f} (per channel {', '.join(f'{s:.2f}' for s in z_std_per_channel)})")
    save(vae, out, {"args": json.dumps(vars(args)), "held_out_psnr_db": f"{psnr:.2f}",
                    "latent_mean": f"{z_mean:.3f}", "latent_std": f"{z_std:.3f}"})
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


def save(vae, path, metadata):
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(vae.cfg.__dict__), **metadata}
    save_file({k: v.cpu().contiguous() for k, v in vae.state_dict().items()}, path, metadata=metadata)


if __name__ == "__main__":
    main()
