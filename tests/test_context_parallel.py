"""Context parallelism (one video over several processes, Ulysses all-to-all over the heads) on the CPU with gloo.

1. The DiT on 2 and 4 processes equals the DiT on one: outputs, input gradients and LoRA/base parameter gradients
   (with selective activation checkpointing on, as train.py runs it), and a guided sampling loop, also with
   guidance parallelism (the two passes on two halves of the processes).
2. sample.py under torchrun on 2 processes writes the same clip as on one, from one process.
3. train.py with context_parallel_size=2 gives the same losses, gradient norms and adapters as one process.
"""

import functools
import os
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import sample
from lora import inject_lora
from model import DIT_PRESETS, DiT, WanVAE, WanVAEConfig
from prep_data import read_video
from test_train import logged_losses, run_train, stand_in_cache, validation_models  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# 4 heads so that 2 and 4 ranks both split them; 4 latent frames of 4x6 latents = 4 frames of 2x3 tokens
CFG = replace(DIT_PRESETS["tiny"], model_channels=64, num_heads=4, num_blocks=2, adaln_lora_dim=16,
              crossattn_emb_channels=32, crossattn_proj_in_channels=48)
B, T, H, W = 2, 4, 4, 6


def free_port():
    with socket.socket() as s:  # torchrun's --master_port=0 hangs: pick a free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_net():
    """A random LoRA DiT, every weight non-zero (the adaLN up-projections and LoRA B start at zero otherwise)."""
    torch.manual_seed(0)
    net = DiT(CFG)
    inject_lora(net, rank=4, alpha=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
    return net


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, T, H, W, generator=g)
    sigma = torch.rand(B, T, generator=g)  # per-frame sigmas: the local frames must take their own
    text = torch.randn(B, 5, CFG.crossattn_proj_in_channels, generator=g)
    mask = torch.zeros(B, 1, T, H, W)
    mask[:, :, :1] = 1  # one conditioning frame
    padding = (torch.rand(B, 1, H, W, generator=g) > 0.7).float()
    return x, sigma, text, mask, padding


def loss_weights(rank):
    """Each rank weighs the output differently, so the test sees whether every rank's loss reaches every frame."""
    return torch.randn(B, 16, T, H, W, generator=torch.Generator().manual_seed(100 + rank))


def forward_backward(net, weights):
    """Output, input gradient and parameter gradients of sum_w <out, w> (each w one rank's loss)."""
    x, sigma, text, mask, padding = inputs()
    x.requires_grad_(True)
    net.zero_grad(set_to_none=True)
    out = net(x, sigma, text, condition_mask=mask, padding_mask=padding)
    sum((out * w).sum() for w in weights).backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def sample_latents(net, cfg_group=None):
    """A guided Image2World-style loop (flow UniPC, 3 steps), as sample.generate runs it."""
    noise = sample.initial_noise(7, (1, 16, T, H, W))
    cond = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(2))
    text = torch.randn(2, 5, CFG.crossattn_proj_in_channels, generator=torch.Generator().manual_seed(3))
    velocity = sample.make_velocity_fn(net, noise, cond, 1, text[:1], text[1:], guidance=3.0, cfg_group=cfg_group)
    return sample.unipc_sample(velocity, noise, *sample.flow_schedule(3, 5.0))


def worker(rank, cp, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cp))
    dist.init_process_group = functools.partial(dist.init_process_group, timeout=timedelta(seconds=120))  # no hang
    # sample.py's groups for guidance parallelism: each half of the processes runs one pass, split over the half
    half_group, cfg_group = sample.context_parallel_groups(cp, True, rank, cp, torch.device("cpu"))
    try:
        group = dist.new_group(list(range(cp)))
        net = build_net()
        net.enable_context_parallel(group)
        net.activation_checkpointing = "selective"
        out, x_grad, grads = forward_backward(net, [loss_weights(rank)])
        if cp == 4:  # what cannot be split fails loudly
            with pytest.raises(ValueError, match="6 heads do not divide over 4 ranks"):
                DiT(replace(CFG, num_heads=6, model_channels=96)).enable_context_parallel(group)
            x, sigma, text, _, _ = inputs()
            with pytest.raises(ValueError, match="splits the 2 latent frames .* over 4 ranks"):
                net(x[:, :, :2], sigma[:, 0], text)
        with torch.no_grad():
            latents = sample_latents(net.eval())
            net.enable_context_parallel(half_group)  # None for 2 processes: one process per pass
            cfg_latents = sample_latents(net, cfg_group)
        torch.save({"out": out, "x_grad": x_grad, "grads": grads, "latents": latents, "cfg_latents": cfg_latents},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cp", [2, 4])
def test_dit_forward_backward_and_sampling_equal_one_process(cp, tmp_path):
    mp.spawn(worker, args=(cp, free_port(), str(tmp_path)), nprocs=cp, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(cp)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = build_net()
        out, x_grad, grads = forward_backward(net, [loss_weights(r) for r in range(cp)])  # all ranks' losses
        with torch.no_grad():
            latents = sample_latents(net.eval())
    finally:
        torch.set_num_threads(threads)

    for r, res in enumerate(results):  # every rank returns the whole output and samples the whole clip
        assert rel_err(res["out"], out) <= 1e-5, r
        assert rel_err(res["latents"], latents) <= 1e-5, r
        assert rel_err(res["cfg_latents"], latents) <= 1e-5, r
    # a rank's input gradient lives on its own frames; together they are the one-process gradient
    for r, res in enumerate(results):
        others = [f for f in range(T) if f // (T // cp) != r]
        assert (res["x_grad"][:, :, others] == 0).all()
    assert rel_err(sum(res["x_grad"] for res in results), x_grad) <= 1e-5
    # parameter gradients: each rank holds its frames' share; FSDP's reduction sums them. A sum of per-rank shares
    # cancels more than one pass does (2.7e-6 at worst here, on crossattn_proj's bias): 3e-5 leaves room for other CPUs
    assert set(results[0]["grads"]) == set(grads) and any(".lora_B." in n for n in grads)
    for name, grad in grads.items():
        assert rel_err(sum(res["grads"][name] for res in results), grad) <= 3e-5, name


# ----------------------------------------------------------------------------------------------------------------
# sample.py on the command line
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny DiT checkpoint (the tiny preset: 2 heads), a tiny Wan VAE, cached prompt embeddings, an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cp_sample")
    torch.manual_seed(0)
    net = DiT(replace(DIT_PRESETS["tiny"], crossattn_proj_in_channels=24))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    torch.save({"net." + k: v for k, v in net.state_dict().items()}, root / "model.pt")
    torch.save(WanVAE(WanVAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)).state_dict(), root / "vae.pth")
    g = torch.Generator().manual_seed(0)
    save_file({"prompt": torch.randn(6, 24, generator=g), "negative_prompt": torch.randn(6, 24, generator=g)},
              root / "embeds.safetensors")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "in.png")
    return root


def run_sample(files, out, nproc=1, extra=()):
    args = [str(REPO / "sample.py"), "--ckpt", str(files / "model.pt"), "--vae", str(files / "vae.pth"),
            "--prompt_embeds", str(files / "embeds.safetensors"), "--image", str(files / "in.png"), "-o", str(out),
            "--save_latents", "--resolution", "32,48", "--num_frames", "13", "--steps", "3", "--guidance", "3",
            *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                                                    f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process_latents(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_one") / "one.mp4"
    run_sample(files, out)
    return load_file(out.with_suffix(".safetensors"))["latents"]


@pytest.mark.parametrize("extra", [[], ["--cfg_parallel"]], ids=["context_parallel", "cfg_parallel"])
def test_sample_cli_one_video_on_two_processes_equals_one(files, one_process_latents, tmp_path, extra):
    """One sample on two processes: shared by context parallelism (the default), or one guidance pass each."""
    two = run_sample(files, tmp_path / "two" / "two.mp4", nproc=2, extra=extra)
    assert "[rank 0]" in two.stdout and "[rank 1]" not in two.stdout, two.stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["two.mp4", "two.safetensors"]
    a, b = one_process_latents, load_file(tmp_path / "two" / "two.safetensors")["latents"]
    assert a.shape == (1, 16, 4, 4, 6) and rel_err(b, a) <= 1e-5
    # the video is decoded from these latents by the same VAE on one process (not compared pixel by pixel: the
    # mp4 writer is not deterministic for the strided frames sample.py hands it, on one process as on two)
    video = read_video(tmp_path / "two" / "two.mp4")[0]
    assert video.shape == (13, 32, 48, 3) and video.std() > 1


@pytest.mark.parametrize("extra", [[], ["--cfg_parallel"]], ids=["context_parallel", "cfg_parallel"])
def test_sample_cli_long_video_on_two_processes_equals_one(files, tmp_path, extra):
    """A long video's chunks (93 frames each) split over two processes as a video does."""
    long = ["--num_frames", "97", "--steps", "1"]
    latents = []
    for nproc in (1, 2):
        run_sample(files, tmp_path / f"{nproc}.mp4", nproc=nproc, extra=long + extra * (nproc - 1))
        latents.append(load_file(tmp_path / f"{nproc}.safetensors")["latents"])
    assert latents[0].shape == (2, 16, 24, 4, 6)
    assert rel_err(latents[1], latents[0]) <= 1e-5


def test_default_context_parallel_size():
    assert sample.default_context_parallel_size(1, 1) == 1
    assert sample.default_context_parallel_size(1, 8) == 8  # one video: all processes share it
    assert sample.default_context_parallel_size(3, 2) == 2  # 3 over 2 would leave one process idle for a sample
    assert sample.default_context_parallel_size(16, 8) == 1  # two samples per process, no communication


def test_sample_cli_rejects_splits_that_do_not_divide(files, tmp_path, monkeypatch):
    """Checked before any process group or heavy work: the split of processes, heads and latent frames."""
    monkeypatch.setattr(sample, "context_parallel_groups", lambda *a: pytest.fail("reached the process group"))
    args = ["--ckpt", str(files / "model.pt"), "--vae", str(files / "vae.pth"), "--prompt_embeds",
            str(files / "embeds.safetensors"), "-o", str(tmp_path / "x.mp4"), "--resolution", "32,48"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--context_parallel_size 3 must divide the number of processes"):
        sample.main(args + ["--num_frames", "13", "--context_parallel_size", "3"])
    with pytest.raises(ValueError, match="splits the DiT's 2 attention heads"):  # default: all 4 on one video
        sample.main(args + ["--num_frames", "13"])
    with pytest.raises(ValueError, match="9 frames make 3 latent frames"):
        sample.main(args + ["--num_frames", "9", "--context_parallel_size", "2"])
    with pytest.raises(ValueError, match="--cfg_parallel .* needs an even --context_parallel_size and guidance > 0"):
        sample.main(args + ["--num_frames", "13", "--cfg_parallel", "--guidance", "0"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--cfg_parallel .* needs an even number of them .*got 1"):
        sample.main(args + ["--num_frames", "13", "--cfg_parallel"])


# ----------------------------------------------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Clips of 13 frames: 4 latent frames, which split over 2 ranks."""
    return stand_in_cache(tmp_path_factory.mktemp("cp_data"), num_frames=13)


def logged_grad_norms(stdout):
    return [float(line.split("grad_norm ")[1].split(",")[0]) for line in stdout.splitlines() if line.startswith("iter ")]


@pytest.mark.parametrize("nproc", [2, 4])
def test_train_context_parallel_equals_one_process(cache, tmp_path, nproc, request):
    """context_parallel_size=2 on 2 processes (1 sample per step) and on 4 (2 groups: 2 samples per step) against
    one process with the same global batch and seed: the same losses, and the same gradient norms before clipping
    (Adam would hide a gradient off by a constant factor; the norm does not), hence the same adapters. On 2
    processes validation videos are sampled too: the group samples each prompt together and writes it once."""
    from convert import read_dcp

    common = ["max_iter=3", "save_iter=3", "logging_iter=1", "caption_dropout=0.0", "eps=1e-6"]
    if nproc == 2:
        models = request.getfixturevalue("validation_models")
        common += ["val_iter=3", "val_num_frames=5", "val_steps=2", "video_size=(32, 32)",
                   f"vae_checkpoint='{models / 'tokenizer.pth'}'", f"text_encoder='{models / 'text_encoder'}'",
                   "val_prompts=['A video of sks teal robot.', 'A red circle.', 'A blue square.']"]
    one = run_train(tmp_path / "one", cache, *common, f"batch_size={nproc // 2}")
    cp = run_train(tmp_path / "cp", cache, *common, "batch_size=1", "context_parallel_size=2", nproc=nproc)
    assert len(logged_losses(one.stdout)) == 3
    assert np.allclose(logged_losses(one.stdout), logged_losses(cp.stdout), rtol=1e-5)
    assert np.allclose(logged_grad_norms(one.stdout), logged_grad_norms(cp.stdout), rtol=1e-5)
    a = read_dcp(tmp_path / "one" / "run" / "checkpoints" / "iter_000000003", "model")
    b = read_dcp(tmp_path / "cp" / "run" / "checkpoints" / "iter_000000003", "model")
    for k in a:  # eps=1e-6 above: see test_train.py
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-5), k
    if nproc == 2:
        videos = sorted(p.name for p in (tmp_path / "cp" / "run" / "validation").iterdir())
        assert videos == [f"iter_000000003_{i:02d}.mp4" for i in range(3)]
        assert read_video(tmp_path / "cp" / "run" / "validation" / videos[0])[0].shape == (5, 32, 32, 3)
