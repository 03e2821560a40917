"""The embedded default (assets/demo): the shipped tiny models match their checksums and load strictly, and a short
LoRA run on the shipped base learns the "sks teal robot" it has never seen: the denoising loss on held-out robot
clips falls, and its samples show the robot's colour where the base shows none. CPU, fixed seeds, the real shipped
weights."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import convert_checkpoint
from model import DIT_PRESETS, DiT, TextEncoder, WanVAE
from prep_data import (TEAL, CachedDataset, build_cache, frames_to_tensor, read_video, shapes_clip, weights_id,
                       write_synthetic_dataset)
from sample import DEFAULT_NEGATIVE_PROMPT, Sample, generate, load_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "demo"
SHIPPED = ["dit.safetensors", "vae.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
           "text_encoder/tokenizer.json", "text_encoder/tokenizer_config.json"]
PROMPT = "A video of sks teal robot."
# Margins measured on the shipped assets (assets/demo/README.md); retrained assets must still clear them.
MIN_VAE_PSNR_DB = 22.0  # a shapes-world clip through WanVAE.encode -> decode (measured 24.3 dB)
LORA_STEPS = 300  # configs/demo.py runs 400; fewer keep the test short
MIN_LOSS_DROP = 0.10  # held-out denoising loss after <= (1 - this) x before (measured: 17.8% lower)
GUIDANCE = 0.0  # as demo.sh samples (no classifier-free guidance: see demo.sh)
# robot-coloured pixels, as a fraction of all pixels, after minus before: in Text2World samples (measured 0.000 ->
# 0.072: the base draws none), and in Image2World samples from a held-out robot frame (measured 0.017 -> 0.085: the
# base dissolves the robot into its background, the adapted model keeps it)
MIN_T2W_GAIN = 0.03
MIN_I2W_GAIN = 0.03


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_files_match_their_recorded_checksums():
    recorded = dict(reversed(line.split()) for line in (ASSETS / "SHA256SUMS").read_text().splitlines() if line)
    assert sorted(recorded) == sorted(SHIPPED)
    for name, digest in recorded.items():
        assert sha256(ASSETS / name) == digest, f"{name} differs from SHA256SUMS"
    assert sum((ASSETS / name).stat().st_size for name in SHIPPED) <= 20 * 2**20


@pytest.fixture(scope="module")
def shipped():
    """The three shipped models, loaded strictly by the loaders the pipeline uses, in fp32."""
    dit = DiT.from_pretrained(ASSETS / "dit.safetensors", dtype=torch.float32).eval()
    vae = WanVAE.from_pretrained(ASSETS / "vae.safetensors", dtype=torch.float32)
    text_encoder = TextEncoder.from_pretrained(ASSETS / "text_encoder", device="cpu", dtype=torch.float32)
    return dit, vae, text_encoder


def test_shipped_models_are_the_demo_architectures_and_fit_together(shipped):
    dit, vae, text_encoder = shipped
    assert dit.cfg == DIT_PRESETS["tiny"]
    assert (vae.cfg.z_dim, vae.cfg.temporal_factor, vae.cfg.spatial_factor) == (16, 4, 8)
    emb = text_encoder.encode([PROMPT, "A red circle moves left on a gray background."])
    assert emb.shape == (2, 512, dit.cfg.crossattn_proj_in_channels)
    assert not torch.allclose(emb[0], emb[1])  # different captions, different features

    # a shapes-world clip the VAE never saw (another seed) survives the round trip; the DiT runs on its latents
    frames, _ = shapes_clip(np.random.default_rng(1234), 17, (64, 64))
    video = frames_to_tensor(frames)[None]  # [1,3,17,64,64]
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 5, 8, 8)
    assert 0.5 < latents.std().item() < 2.0  # normalised latents near unit scale, as the noise schedule assumes
    mse = ((vae.decode(latents).clamp(-1, 1) - video) / 2).square().mean().item()
    print(f"VAE round trip of a shapes-world clip: PSNR {10 * np.log10(1 / mse):.1f} dB")
    assert 10 * np.log10(1 / mse) > MIN_VAE_PSNR_DB
    with torch.no_grad():
        v = dit(latents, torch.tensor([0.5]), emb[:1])
    assert v.shape == latents.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("damage", ["missing", "unexpected", "mis-shaped"])
def test_shipped_weights_are_refused_when_altered(tmp_path, damage):
    for name, load in [("dit.safetensors", lambda p: DiT.from_pretrained(p, dtype=torch.float32)),
                       ("vae.safetensors", lambda p: WanVAE.from_pretrained(p, dtype=torch.float32))]:
        tensors = load_file(ASSETS / name)
        key = sorted(k for k in tensors if k.endswith("weight"))[0]
        if damage == "missing":
            del tensors[key]
        elif damage == "unexpected":
            tensors[key.replace("weight", "extra")] = tensors[key].clone()
        else:
            tensors[key] = tensors[key][:1].contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / name)
        with pytest.raises((KeyError, ValueError), match=key.removeprefix("net.").split(".")[0]):
            load(tmp_path / name)


def test_vae_pretraining_script_saves_resumes_and_keeps_files(tmp_path):
    """assets/demo/pretrain_vae.py at toy size: --save_every files load strictly, --init starts from one exactly
    (with lr 0 the weights come out unchanged), and earlier runs' files are never written over."""
    write_synthetic_dataset(tmp_path / "shapes", kind="shapes", num_videos=4, num_frames=17, size=(64, 64))

    def pretrain(out, *args):
        return subprocess.run([sys.executable, str(ASSETS / "pretrain_vae.py"), "--dataset", str(tmp_path / "shapes"),
                               "--out", str(tmp_path / out), "--dim", "4", "--held_out", "2", "--batch", "2",
                               "--clip_batch", "1", "--crop", "32", "--image_steps", "1", *args],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))

    run = pretrain("vae.safetensors", "--clip_steps", "1", "--save_every", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    step1 = WanVAE.from_pretrained(tmp_path / "vae_step1.safetensors", dtype=torch.float32)
    final = WanVAE.from_pretrained(tmp_path / "vae.safetensors", dtype=torch.float32)
    assert step1.cfg.dim == final.cfg.dim == 4
    assert any(not torch.equal(a, b) for a, b in zip(step1.state_dict().values(), final.state_dict().values()))

    resumed = pretrain("resumed.safetensors", "--image_steps", "0", "--clip_steps", "1", "--lr", "0",
                       "--init", str(tmp_path / "vae_step1.safetensors"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_weights = load_file(tmp_path / "resumed.safetensors")
    assert resumed_weights.keys() == step1.state_dict().keys()
    for name, weight in step1.state_dict().items():
        assert torch.equal(resumed_weights[name], weight), name

    assert "vae.safetensors exists" in pretrain("vae.safetensors", "--clip_steps", "1").stderr
    (tmp_path / "vae.safetensors").unlink()
    refused = pretrain("vae.safetensors", "--clip_steps", "1", "--save_every", "1")
    assert refused.returncode != 0 and "vae_step1.safetensors exists" in refused.stderr


# ------------------------------------------------------------------------------------------------------------
# Learning: a shortened configs/demo.py run on the shipped base
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def robot_data(tmp_path_factory, shipped):
    """The demo's 16 training clips (as demo.sh draws them) and 4 held-out clips from another seed, cached with the
    shipped VAE and text encoder."""
    _, vae, text_encoder = shipped
    root = tmp_path_factory.mktemp("demo")
    write_synthetic_dataset(root / "robot", kind="robot", num_videos=16, seed=0)
    write_synthetic_dataset(root / "held_out", kind="robot", num_videos=4, seed=1)
    ids = (weights_id(ASSETS / "vae.safetensors"), weights_id(ASSETS / "text_encoder"))
    caches = {name: build_cache(root / name, vae, text_encoder, *ids, num_frames=17, video_size=(64, 64)).parent
              for name in ("robot", "held_out")}
    return root, caches


def held_out_loss(net, cache_dir):
    """The flow-matching loss on every held-out clip at fixed noise levels and fixed noise, Text2World."""
    data = CachedDataset(cache_dir)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for i in range(len(data)):
            x0 = data[i]["latents"].float()[None]
            text = data[i]["text_emb"].float()[None]
            for sigma in (0.2, 0.4, 0.6, 0.8):
                eps = torch.randn(x0.shape, generator=generator)
                x_t = sigma * eps + (1 - sigma) * x0
                v = net(x_t, torch.tensor([sigma]), text)
                losses.append((v - (eps - x0)).square().mean().item())
    return float(np.mean(losses))


def to_frames(video_3_T_H_W):
    """[3,T,H,W] in about [-1,1] -> uint8 [T,H,W,3], clamped and rounded."""
    return ((video_3_T_H_W.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def robot_colour(vae, clips):
    """The colour the robot's teal body has after the VAE round trip (the tiny VAE renders it slightly darker): the
    mean reconstructed colour of the pixels that are teal in the clips."""
    recon = np.concatenate([to_frames(vae.decode(vae.encode(frames_to_tensor(c)[None]))[0]) for c in clips])
    teal = np.linalg.norm(np.concatenate(clips).astype(np.float32) - np.asarray(TEAL, np.float32), axis=-1) < 10
    return recon[teal].astype(np.float32).mean(axis=0)


def colour_fraction(video_T_H_W_3, colour, radius=50):
    """Fraction of pixels within `radius` (RGB distance, 0..255) of `colour`."""
    return float((np.linalg.norm(video_T_H_W_3.astype(np.float32) - colour, axis=-1) < radius).mean())


def robot_pixels(net, vae, text_encoder, colour, first_frame):
    """Robot-coloured pixel fractions of demo.sh's samples (same prompt, guidance, shift, seed): Text2World
    (seeds 0 and 1) and Image2World from the first frame of a held-out clip (the generated frames only)."""
    emb = text_encoder.encode([PROMPT, DEFAULT_NEGATIVE_PROMPT])
    text2world = []
    for seed in (0, 1):
        s = Sample("t2w", PROMPT, None, 0, DEFAULT_NEGATIVE_PROMPT, seed, GUIDANCE, (64, 64), 17)
        video, _ = generate(net, vae, s, None, emb[:1], emb[1:], torch.device("cpu"), steps=35, shift=1.0)
        text2world.append(colour_fraction(video.numpy(), colour))
    s = Sample("i2w", PROMPT, None, 1, DEFAULT_NEGATIVE_PROMPT, 0, GUIDANCE, (64, 64), 17)
    video, _ = generate(net, vae, s, first_frame, emb[:1], emb[1:], torch.device("cpu"), steps=35, shift=1.0)
    return float(np.mean(text2world)), colour_fraction(video.numpy()[1:], colour)


def test_a_short_lora_run_learns_the_teal_robot(robot_data, shipped, tmp_path):
    root, caches = robot_data
    base, vae, text_encoder = shipped
    train_clips = [read_video(p)[0] for p in sorted((root / "robot" / "videos").glob("*.mp4"))]
    colour = robot_colour(vae, train_clips)
    assert colour_fraction(np.concatenate(train_clips), np.asarray(TEAL, np.float32)) > 0.05  # the concept, drawn

    args = [sys.executable, "train.py", "configs/demo.py", f"out_dir='{tmp_path}'", f"cache_dir='{caches['robot']}'",
            f"dataset_dir='{root / 'robot'}'", f"max_iter={LORA_STEPS}", f"save_iter={LORA_STEPS}",
            f"cycle_length={LORA_STEPS}"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    files = convert_checkpoint(tmp_path / "demo_lora" / "checkpoints" / f"iter_{LORA_STEPS:09d}")
    adapted = load_dit(ASSETS / "dit.safetensors", [(files["lora_ema_bf16.safetensors"], 1.0)]).float()

    before, after = held_out_loss(base, caches["held_out"]), held_out_loss(adapted, caches["held_out"])
    print(f"held-out denoising loss: {before:.4f} before, {after:.4f} after ({1 - after / before:.1%} lower)")
    assert after <= (1 - MIN_LOSS_DROP) * before

    first_frame = read_video(root / "held_out" / "videos" / "robot_000.mp4", 0, 1)[0]
    t2w_before, i2w_before = robot_pixels(base, vae, text_encoder, colour, first_frame)
    t2w_after, i2w_after = robot_pixels(adapted, vae, text_encoder, colour, first_frame)
    print(f"robot-coloured pixels (within 50 of {colour.round()}): Text2World {t2w_before:.3f} before, "
          f"{t2w_after:.3f} after; Image2World {i2w_before:.3f} before, {i2w_after:.3f} after")
    assert t2w_after >= t2w_before + MIN_T2W_GAIN
    assert i2w_after >= i2w_before + MIN_I2W_GAIN
