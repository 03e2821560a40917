"""sample.py end to end, CPU, tiny random networks.

1. Against diffusers' Cosmos2_5_PredictBasePipeline (the oracle): the same DiT and VAE weights carried by our key
   maps, the same initial noise and text embeddings; the final latents and the decoded video agree for
   Text2World, Image2World and Video2World, with and without guidance.
2. The command line on real (tiny) checkpoint files: `python sample.py` for text, --image, --video and a JSON
   batch; the same batch under torchrun on 2 processes gives the same videos; bad input is a one-line error
   before any heavy work; the text encoder is freed before the DiT reaches the device.
"""

import json
import os
import re
import socket
import subprocess
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
from prep_data import read_video, video_info, write_video
from test_dit import diffusers_twin as dit_twin, randomize, small_config
from test_vae import SMALL, diffusers_twin as vae_twin, random_vae

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
H, W, NUM_FRAMES, STEPS = 32, 48, 9, 8  # 3 latent frames of 4x6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# 1. Against diffusers' pipeline
# ----------------------------------------------------------------------------------------------------------------


class NoGuardrail:
    """The pipeline refuses to run without a safety checker (cosmos_guardrail, not installed here); prompts are
    not given to it (embeddings are), so this stand-in only has to exist."""

    def to(self, device):
        return self

    def check_text_safety(self, prompt):
        return True


@pytest.fixture(scope="module")
def twins():
    """Our tiny DiT and VAE, their diffusers twins, and the pipeline around the twins."""
    from diffusers import Cosmos2_5_PredictBasePipeline, UniPCMultistepScheduler
    from model import DiT

    torch.manual_seed(0)
    cfg = small_config()
    net = DiT(cfg).eval()
    randomize(net, seed=1)
    vae = random_vae(SMALL)
    their_net, their_vae = dit_twin(cfg, net), vae_twin(vae)

    # The pipeline's denoising step gives the network the exact sigma; the reference (and sample.py) give it the
    # truncated integer timestep / 1000 (spec/fidelity_notes.md 2). Tell diffusers' network what ours is told, so
    # that everything else can be compared exactly.
    sigmas, net_sigmas = sample.flow_schedule(STEPS, 5.0)
    told = {float(s): float(n) for s, n in zip(sigmas[:-1], net_sigmas)}
    their_forward = their_net.forward

    def forward(hidden_states, timestep, *args, **kwargs):
        timestep = torch.tensor([told[float(t)] for t in timestep.flatten()]).view(timestep.shape)
        return their_forward(hidden_states, timestep, *args, **kwargs)

    their_net.forward = forward

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                        predict_x0=True, solver_type="bh2", lower_order_final=True,
                                        use_flow_sigmas=True, flow_shift=5.0, final_sigmas_type="zero")
    # the pipeline asks for N steps; let it space them like the reference, over the training grid's
    # [0, float32(0.999)] (diffusers' default spaces them over [0, 0.999] in float64: 1e-8 apart)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None: set_timesteps(
        sigmas=np.linspace(float(np.float32(0.999)), 0.0, n + 1)[:-1], device=device)
    pipe = Cosmos2_5_PredictBasePipeline(text_encoder=None, tokenizer=None, transformer=their_net, vae=their_vae,
                                         scheduler=scheduler, safety_checker=NoGuardrail())
    pipe.set_progress_bar_config(disable=True)
    return net, vae, pipe, sigmas


def run_pipeline(pipe, monkeypatch, noise, emb, neg, guidance, frames, n_cond):
    """(final latents, video [T,H,W,3] in [0,255] float) from diffusers."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict as pipeline_module
    from PIL import Image

    # the pipeline turns an image into a tensor with torchvision, which does not install beside CPU torch here
    to_tensor = lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # noqa: E731
    monkeypatch.setattr(pipeline_module, "torchvision", types.SimpleNamespace(
        transforms=types.SimpleNamespace(functional=types.SimpleNamespace(to_tensor=to_tensor))), raising=False)
    if n_cond == 1:
        inputs = dict(image=Image.fromarray(frames[-1]))
    elif n_cond == 2:  # a [1,3,T,H,W] tensor in [-1,1] is taken as is; the pipeline keeps its last 5 frames
        inputs = dict(video=torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1,
                      num_latent_conditional_frames=2)
    else:
        inputs = {}
    final = {}

    def keep_latents(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    video = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=H, width=W, num_frames=NUM_FRAMES,
                 num_inference_steps=STEPS, guidance_scale=guidance, latents=noise.clone(),
                 conditional_frame_timestep=-1,  # the pre-trained/LoRA models give conditioning frames no own t
                 output_type="pt", callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"],
                 **inputs).frames
    return final["latents"], video[0].permute(0, 2, 3, 1) * 255


@pytest.mark.parametrize("guidance", [0.0, 3.0])
@pytest.mark.parametrize("mode", ["text2world", "image2world", "video2world"])
def test_final_latents_equal_diffusers_pipeline(twins, monkeypatch, mode, guidance):
    net, vae, pipe, sigmas = twins
    n_cond = sample.MODE_NAMES.index(mode)
    g = torch.Generator().manual_seed(n_cond)
    emb, neg = torch.randn(1, 7, 72, generator=g), torch.randn(1, 7, 72, generator=g)
    frames = np.random.RandomState(n_cond).randint(0, 256, (7, H, W, 3), dtype=np.uint8)  # a 7-frame video
    s = sample.Sample("s", "", None, n_cond, "", 5, guidance, (H, W), NUM_FRAMES)
    cond_frames = frames[len(frames) - 1 - 4 * (n_cond - 1):] if n_cond else None  # what read_condition_frames gives
    video, latents = sample.generate(net, vae, s, cond_frames, emb, neg if guidance else None, CPU, STEPS, 5.0)

    noise = sample.initial_noise(5, latents.shape)
    # diffusers runs no unconditional pass when guidance <= 1, like our g = 0
    their_latents, their_video = run_pipeline(pipe, monkeypatch, noise, emb, neg, guidance if guidance else 1.0,
                                              frames, n_cond)
    assert torch.equal(pipe.scheduler.sigmas, sigmas)
    assert rel_err(latents, their_latents) <= 1e-4
    # ours truncates to uint8 like the reference; diffusers' video is float in [0,1]
    assert video.shape == their_video.shape == (NUM_FRAMES, H, W, 3)
    assert (video.float() - their_video).abs().max() <= 1.0 + 1e-3
    if n_cond:  # the conditioning frames end at the clean latent of the input pixels (up to (1 - sigma_0) x noise)
        clean = vae.encode(torch.from_numpy(cond_frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
        assert (latents[:, :, :n_cond] - clean).abs().max() < 1e-3 * noise.abs().max()
        assert rel_err(latents[:, :, n_cond:], noise[:, :, n_cond:]) > 0.1


# ----------------------------------------------------------------------------------------------------------------
# 2. The command line on tiny checkpoint files
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LoRA DiT checkpoint (official layout, bf16, under `net.`), a tiny Wan VAE .pth, a tiny Qwen2.5-VL
    text encoder folder, an adapter of another model size, an image, videos and a JSON batch."""
    import transformers

    from lora import inject_lora, lora_state_dict
    from model import DIT_PRESETS, DiT, WanVAE, WanVAEConfig
    from test_text_encoder import write_tiny_qwen_tokenizer

    root = tmp_path_factory.mktemp("sample_e2e")
    te = root / "text_encoder"
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, rms_norm_eps=1e-6, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]))
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(te)
    write_tiny_qwen_tokenizer(te)

    tiny = DIT_PRESETS["tiny"]
    net = DiT(type(tiny)(**{**tiny.__dict__, "crossattn_proj_in_channels": 2 * 32}))  # 2 text layers x 32
    inject_lora(net, rank=4, alpha=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    torch.save({"net." + k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net.state_dict().items()},
               root / "model_ema_bf16.pt")
    other = DiT(type(tiny)(**{**tiny.__dict__, "model_channels": 64}))
    inject_lora(other, rank=2, alpha=2)
    save_file({k: v.contiguous() for k, v in lora_state_dict(other).items()}, root / "other_size.safetensors")
    vae = WanVAE(WanVAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
    torch.save(vae.state_dict(), root / "tokenizer.pth")

    from PIL import Image

    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "in.png")
    write_video(root / "in.mp4", rng.randint(0, 256, (7, 40, 56, 3), dtype=np.uint8))
    write_video(root / "short.mp4", rng.randint(0, 256, (4, 40, 56, 3), dtype=np.uint8))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "p.txt").write_text("A video of sks teal robot.\n")
    (root / "batch.json").write_text(json.dumps({
        "inference_type": "image2world",
        "samples": {"a": {"prompt_path": "p.txt", "input_path": "in.png"},
                    "b": {"prompt": "A robot in a warehouse.", "input_path": "in.png"}},
        "seed": 3, "guidance": 2, "resolution": f"{H},{W}", "num_output_frames": NUM_FRAMES}))
    return root


def weights(root):
    return ["--ckpt", str(root / "model_ema_bf16.pt"), "--vae", str(root / "tokenizer.pth"),
            "--text_encoder", str(root / "text_encoder")]


def small(steps=3):
    return ["--resolution", f"{H},{W}", "--num_frames", str(NUM_FRAMES), "--steps", str(steps)]


def run_cli(args, cwd=REPO, launcher=(sys.executable,)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*launcher, str(REPO / "sample.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def frames_of(path):
    info = video_info(path)
    assert (info.num_frames, info.height, info.width, round(info.fps)) == (NUM_FRAMES, H, W, 16)
    assert info.codec == "h264"
    return read_video(path)[0]


@pytest.mark.parametrize("mode", ["text", "image", "video"])
def test_cli_writes_the_video(files, tmp_path, mode):
    extra = {"text": [], "image": ["--image", str(files / "in.png")], "video": ["--video", str(files / "in.mp4")]}
    out = tmp_path / f"{mode}.mp4"
    result = run_cli(["--prompt", "A video of sks teal robot.", "-o", str(out), "--save_latents", "--seed", "4",
                      *extra[mode], *weights(files), *small()])
    assert result.returncode == 0, result.stderr
    assert f"{sample.MODE_NAMES[['text', 'image', 'video'].index(mode)]}, {NUM_FRAMES} frames" in result.stdout
    video = frames_of(out)
    assert video.shape == (NUM_FRAMES, H, W, 3) and video.std() > 1  # not a blank video
    assert load_file(out.with_suffix(".safetensors"))["latents"].shape == (1, 16, 3, H // 8, W // 8)
    # readable like the mp4 (safetensors' save_file alone makes its files 0600)
    assert out.with_suffix(".safetensors").stat().st_mode & 0o777 == out.stat().st_mode & 0o777 == 0o666 & ~umask()


def test_json_batch_is_the_same_on_one_and_two_processes(files, tmp_path):
    """One mp4 per sample; each sample's noise comes from its seed alone, so the split over processes does not
    change the latents (both runs single-threaded, so the arithmetic is the same)."""
    args = ["-i", str(files / "batch.json"), "--save_latents", *weights(files), "--steps", "3"]
    one = run_cli(args + ["-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    with socket.socket() as s:  # torchrun's --master_port=0 does not work: pick a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = run_cli(args + ["-o", str(tmp_path / "two")], launcher=(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={port}"))
    assert two.returncode == 0, two.stderr
    assert "[rank 0] a:" in two.stdout and "[rank 1] b:" in two.stdout

    for run in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == ["a.mp4", "a.safetensors", "b.mp4",
                                                                      "b.safetensors"]
    for name in ("a", "b"):
        latents_one = load_file(tmp_path / "one" / f"{name}.safetensors")["latents"]
        assert torch.equal(latents_one, load_file(tmp_path / "two" / f"{name}.safetensors")["latents"])
        # the decoded pixels are equal too, but x264's output for the same frames can differ between processes,
        # so the mp4s are compared by shape only
        assert frames_of(tmp_path / "one" / f"{name}.mp4").shape == frames_of(tmp_path / "two" / f"{name}.mp4").shape
    # the two samples share seed and input but not the prompt: the prompt reaches the generated frames
    a, b = (load_file(tmp_path / "one" / f"{n}.safetensors")["latents"] for n in ("a", "b"))
    assert rel_err(a[:, :, 1:], b[:, :, 1:]) > 1e-5


def test_cli_reads_the_references_sample_files(files, tmp_path):
    """The shapes of the reference's example files (one sample a .json: text2world with a prompt file, image2world
    with a .jpg, video2world with an .mp4) and a .jsonl of three samples, one bad: the others are written, each
    with its own settings, the bad one is reported, and the exit status says so."""
    from PIL import Image

    assets = tmp_path / "assets"
    assets.mkdir()
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 56, 3), dtype=np.uint8)).save(assets / "weld.jpg")
    (assets / "sand.mp4").write_bytes((files / "in.mp4").read_bytes())
    (assets / "snow.txt").write_text("A snowy stop light.\n")
    samples = {"t2w.json": {"inference_type": "text2world", "name": "snow", "prompt_path": "snow.txt"},
               "i2w.json": {"inference_type": "image2world", "name": "weld", "prompt": "A robot welds.",
                            "input_path": "weld.jpg", "seed": 0},
               "v2w.json": {"inference_type": "video2world", "name": "sand", "prompt": "Sand mining.",
                            "input_path": "sand.mp4", "guidance": 0}}
    for file, sample_fields in samples.items():
        (assets / file).write_text(json.dumps(sample_fields, indent=2))
    (assets / "more.jsonl").write_text("\n".join(json.dumps(line) for line in [
        {"inference_type": "text2world", "name": "a", "prompt": "A robot.", "num_steps": 1},
        {"inference_type": "image2world", "name": "b", "prompt": "A robot.", "input_path": "missing.jpg"},
        {"inference_type": "video2world", "name": "c", "prompt": "A robot.", "input_path": "sand.mp4"}]))
    inputs = [f"assets/{f}" for f in [*samples, "more.jsonl"]]  # relative to the working folder, and so their paths
    result = run_cli(["-i", *inputs, "-o", "out", "--save_latents", *weights(files), *small(steps=2)], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "skipped: assets/more.jsonl line 2: input file assets/missing.jpg does not exist" in result.stderr
    assert result.stderr.endswith("sample.py: 1 bad entry skipped (above)\n")
    for name, mode in [("snow", "text2world"), ("weld", "image2world"), ("sand", "video2world"), ("a", "text2world"),
                       ("c", "video2world")]:
        assert f"{name}: {mode}, {NUM_FRAMES} frames" in result.stdout
        assert frames_of(tmp_path / "out" / f"{name}.mp4").shape == (NUM_FRAMES, H, W, 3)
    assert not (tmp_path / "out" / "b.mp4").exists()
    assert "seed 0 -> out/weld.mp4" in result.stdout and "seed 1 -> out/snow.mp4" in result.stdout  # --seed 1
    # each sample's steps in its progress bar: num_steps 1 for a, --steps 2 for the others
    assert re.search(r"\ba: 100%\|[^|\r]*\| 1/1 ", result.stderr)
    assert re.search(r"\bc: 100%\|[^|\r]*\| 2/2 ", result.stderr)


def test_cli_long_video_in_autoregressive_chunks(files, tmp_path):
    """--num_frames beyond the model's 93: chunks of 77 frames at a stride of 76, each made at 93 frames with the
    next seed; the first is exactly the one-pass video of the same seed and input."""
    common = ["--prompt", "p", "--image", str(files / "in.png"), "--seed", "3", "--guidance", "0", "--save_latents",
              *weights(files), "--resolution", f"{H},{W}", "--steps", "1"]
    result = run_cli([*common, "--num_frames", "97", "-o", str(tmp_path / "long.mp4")])
    assert result.returncode == 0, result.stderr
    assert "long, chunk 1/2: 100%" in result.stderr and "long, chunk 2/2: 100%" in result.stderr
    info = video_info(tmp_path / "long.mp4")
    assert (info.num_frames, info.height, info.width) == (97, H, W)
    latents = load_file(tmp_path / "long.safetensors")["latents"]
    assert latents.shape == (2, 16, 24, H // 8, W // 8)
    assert run_cli([*common, "--num_frames", "93", "-o", str(tmp_path / "one.mp4")]).returncode == 0
    one = load_file(tmp_path / "one.safetensors")["latents"]
    assert torch.equal(latents[:1], one) and rel_err(latents[1:], one) > 0.1


@pytest.mark.parametrize("args,message", [
    (["--video", "short.mp4"], "short.mp4 has 4 frame(s); video2world needs at least 5"),
    (["--lora", "other_size.safetensors"], "other_size.safetensors: adapter 'lora0' does not fit the model"),
])
def test_cli_bad_input_is_one_line_without_traceback(files, args, message):
    result = run_cli(["--prompt", "p", "-o", "never.mp4", *args, *weights(files), *small()], cwd=files)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("sample.py: error: ") and message in result.stderr, result.stderr
    assert not (files / "never.mp4").exists()


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail loudly if the text encoder, the VAE or the DiT's device copy is reached, or sampling starts."""
    import model

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the input error was found")

    monkeypatch.setattr(model.TextEncoder, "from_pretrained", heavy)
    monkeypatch.setattr(model.WanVAE, "from_pretrained", heavy)
    monkeypatch.setattr(sample, "dit_to_device", heavy)
    monkeypatch.setattr(sample, "generate", heavy)


def test_bad_input_fails_before_heavy_work(files, tmp_path, no_heavy_work):
    def main(*args, weights_args=None):
        sample.main(["-o", str(tmp_path / "o.mp4"), *(weights_args or weights(files)), *small(), *args])

    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        main("--prompt", "p", "--image", str(files / "missing.png"))
    with pytest.raises(ValueError, match="broken.png: cannot decode the image"):
        main("--prompt", "p", "--image", str(files / "broken.png"))
    with pytest.raises(ValueError, match="short.mp4 has 4 frame.*video2world needs at least 5"):
        main("--prompt", "p", "--video", str(files / "short.mp4"))
    with pytest.raises(ValueError, match="--resolution: expected H and W positive multiples of 16 .*got 30,48"):
        main("--prompt", "p", "--resolution", "30,48")
    with pytest.raises(ValueError, match="other_size.safetensors.*mis-shaped.*another model size"):
        main("--prompt", "p", "--lora", str(files / "other_size.safetensors"))
    batch = tmp_path / "b.json"
    batch.write_text(json.dumps({"inference_type": "text2world", "samples": {"a": {"prompt": "p"}}, "num_steps": 3}))
    with pytest.raises(ValueError, match="unknown field.*num_steps.*known fields: inference_type"):
        sample.main(["-i", str(batch), "-o", str(tmp_path / "out"), *weights(files)])
    # the wrong files for a role
    with pytest.raises(ValueError, match="model_ema_bf16.pt is not a Wan2.1 VAE checkpoint"):
        main("--prompt", "p", weights_args=["--ckpt", str(files / "model_ema_bf16.pt"), "--vae",
                                            str(files / "model_ema_bf16.pt"), "--text_encoder",
                                            str(files / "text_encoder")])
    with pytest.raises(ValueError, match="tokenizer.pth has no keys under prefix 'net.'"):
        main("--prompt", "p", weights_args=["--ckpt", str(files / "tokenizer.pth"), "--vae",
                                            str(files / "tokenizer.pth"), "--text_encoder",
                                            str(files / "text_encoder")])
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt": torch.zeros(1, 8, 100352), "negative_prompt": torch.zeros(1, 8, 100352)}, embeds)
    with pytest.raises(ValueError, match="embeds.safetensors: embeddings of width .*prompt 100352, but the DiT's "
                                         "cross-attention takes 64"):
        main(weights_args=["--ckpt", str(files / "model_ema_bf16.pt"), "--vae", str(files / "tokenizer.pth"),
                           "--prompt_embeds", str(embeds)])


def test_adapter_of_another_base_is_refused_unless_forced(files, tmp_path, no_heavy_work):
    from lora import inject_lora, lora_state_dict
    from model import DIT_PRESETS, DiT

    net = DiT(DIT_PRESETS["tiny"])
    inject_lora(net, rank=2, alpha=2)
    adapter = tmp_path / "lora.safetensors"
    save_file({"net." + k: v.contiguous() for k, v in lora_state_dict(net).items()}, adapter,
              {"base_checkpoint": "/elsewhere/base.pt", "base_fingerprint": "0123456789abcdef"})
    args = ["--prompt", "p", "-o", str(tmp_path / "o.mp4"), "--lora", f"{adapter}:0.5", *weights(files), *small()]
    with pytest.raises(ValueError, match="trained on /elsewhere/base.pt .*pass --force"):
        sample.main(args)
    with pytest.raises(AssertionError, match="heavy work started"):  # forced, it goes on to the networks
        sample.main(args + ["--force"])


def test_keep_going_skips_an_input_that_does_not_decode(files, tmp_path, monkeypatch, capsys):
    lines = [{"inference_type": "image2world", "name": n, "prompt": "p", "input_path": str(files / f)}
             for n, f in [("good", "in.png"), ("bad", "broken.png")]]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = ["-i", str(tmp_path / "s.jsonl"), "-o", str(tmp_path / "out"), *weights(files), *small()]
    with pytest.raises(ValueError, match="broken.png: cannot decode the image"):
        sample.main(args + ["--no-keep_going"])

    def text_embeddings(samples, *args):  # where the heavy work would start
        raise AssertionError(f"generating {[s.name for s in samples]}")

    monkeypatch.setattr(sample, "text_embeddings", text_embeddings)
    with pytest.raises(AssertionError, match=r"generating \['good'\]"):
        sample.main(args)
    assert "sample.py: skipped: sample 'bad': " in capsys.readouterr().err


def test_text_encoder_is_freed_before_the_dit_reaches_the_device(files, tmp_path, monkeypatch):
    import model

    events, encoders = [], []
    from_pretrained, to_device = model.TextEncoder.from_pretrained, sample.dit_to_device

    def load_encoder(*args, **kwargs):
        encoder = from_pretrained(*args, **kwargs)
        encoders.append(weakref.ref(encoder))
        events.append("text encoder")
        return encoder

    def dit_to_device(*args, **kwargs):
        events.append("dit" if all(ref() is None for ref in encoders) else "dit while the text encoder lives")
        return to_device(*args, **kwargs)

    monkeypatch.setattr(model.TextEncoder, "from_pretrained", load_encoder)
    monkeypatch.setattr(sample, "dit_to_device", dit_to_device)
    out = tmp_path / "t.mp4"
    sample.main(["--prompt", "p", "-o", str(out), "--guidance", "0", *weights(files), *small(steps=1)])
    assert events == ["text encoder", "dit"]
    assert frames_of(out).shape == (NUM_FRAMES, H, W, 3)


def test_generate_to_file_with_networks_in_memory(files, tmp_path):
    """train.py's validation path: networks loaded once, embeddings computed once; path=None (a rank sampling a
    spare prompt to keep its FSDP peers company) gives the same video and writes nothing."""
    net = sample.dit_to_device(sample.load_dit(files / "model_ema_bf16.pt"), CPU)
    vae = sample.load_vae(files / "tokenizer.pth", CPU)
    emb = sample.encode_prompts(["p", sample.DEFAULT_NEGATIVE_PROMPT], files / "text_encoder", CPU)
    assert set(emb) == {"p", sample.DEFAULT_NEGATIVE_PROMPT} and emb["p"].shape == (1, 512, 64)
    kwargs = dict(num_frames=NUM_FRAMES, resolution=(H, W), steps=2, guidance=3.0, seed=2, device="cpu")
    out = tmp_path / "validation" / "iter_000000010_00.mp4"
    video = sample.generate_to_file(net, out, vae, emb["p"], emb[sample.DEFAULT_NEGATIVE_PROMPT], **kwargs)
    assert video.shape == (NUM_FRAMES, H, W, 3) and video.dtype == torch.uint8
    assert frames_of(out).shape == (NUM_FRAMES, H, W, 3)
    spare = sample.generate_to_file(net, None, vae, emb["p"], emb[sample.DEFAULT_NEGATIVE_PROMPT], **kwargs)
    assert torch.equal(spare, video) and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    with pytest.raises(ValueError, match="guidance > 0 needs neg_text_emb"):
        sample.generate_to_file(net, None, vae, emb["p"], None, **kwargs)
