"""train.py on the CPU: the objective, learning, exact resume, crash-safe checkpoints, and two gloo ranks."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from convert import read_dcp
from prep_data import build_cache, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


class PoolVAE(torch.nn.Module):
    """A stand-in encoder with the Wan VAE's shape behaviour (frame 0 alone, then 4 frames per latent frame,
    8x8 spatial); the training tests need latents, not a real VAE (that one is tested in test_vae.py)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 16)

    def encode(self, video):
        video = torch.cat([video[:, :, :1].repeat(1, 1, 4, 1, 1), video], dim=2)
        pooled = torch.nn.functional.avg_pool3d(video, (4, 8, 8))
        return 3 * self.proj(pooled.movedim(1, -1)).movedim(-1, 1)


class HashTextEncoder:
    """Deterministic random embeddings per caption, [1, 8, 256] (the tiny DiT's projection input)."""

    def encode(self, captions):
        g = torch.Generator().manual_seed(sum(map(ord, captions[0])))
        return torch.randn(1, 8, 256, generator=g)


def stand_in_cache(root, num_frames):
    """Two synthetic 32x32 robot clips cached with the stand-in encoders; returns the cache folder."""
    write_synthetic_dataset(root / "robot", num_videos=2, num_frames=num_frames, size=(32, 32))
    return build_cache(root / "robot", PoolVAE(), HashTextEncoder(), "pool", "hash", num_frames=num_frames,
                       video_size=(32, 32)).parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return stand_in_cache(tmp_path_factory.mktemp("data"), num_frames=17)


def train_args(out, cache_dir, *overrides):
    return ["dit_preset='tiny'", "dtype='float32'", f"cache_dir='{cache_dir}'", f"out_dir='{out}'", "num_workers=0",
            "wandb=False", "val_iter=0", "logging_iter=2", "lr=1e-3", "warmup_steps=0", "grad_clip=1.0", *overrides]


def run_train(out, cache_dir, *overrides, nproc=1, check=True, script="train.py", env=()):
    """train.py (or a script from `wrapped`) in one process, or on `nproc` torchrun processes."""
    python = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    result = subprocess.run(python + [script] + train_args(out, cache_dir, *overrides), cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **dict(env)),
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def wrapped(tmp_path, patch):
    """A script that runs `patch` (code changing the module `train`) and then train.main: a run held, signalled or
    watched at a given step, also under torchrun."""
    path = tmp_path / "wrapped_train.py"
    path.write_text("import os, signal, sys, time\nfrom pathlib import Path\nsys.path.insert(0, os.getcwd())\n"
                    f"import train\n{patch}\ntrain.main(sys.argv[1:])\n")
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(out, step, name="run"):
    return Path(out) / name / "checkpoints" / f"iter_{step:09d}"


# ------------------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------------------


def test_sigma_distribution_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    sigma = torch.stack([train.sample_sigma(g) for _ in range(50_000)]).numpy()
    q = np.quantile(sigma, [0.05, 0.25, 0.5, 0.75, 0.95])
    assert np.allclose(q, [0.49, 0.72, 0.83, 0.91, 0.96], atol=0.01), q
    assert abs(sigma.mean() - 0.795) < 0.005
    grid = 5 * (np.arange(1, 1001) / 1000) / (1 + 4 * (np.arange(1, 1001) / 1000))
    assert np.isin(np.round(sigma, 5), np.round(grid.astype(np.float32), 5)).all()  # on the 1,000-step grid


class RecordingModel(torch.nn.Module):
    """Returns a fixed random 'prediction' and records what the objective fed it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, text, condition_mask=None):
        self.calls.append((x.clone(), sigma.clone(), text.clone(), condition_mask.clone()))
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def test_conditioning_frames_carry_the_clean_latent_and_no_loss():
    x0 = torch.randn(64, 16, 4, 2, 2)
    text = torch.randn(64, 3, 8)
    model = RecordingModel()
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    per_sample, n_cond = train.flow_matching_loss(model, x0, text, generators)
    x_t, sigma, text_in, mask = model.calls[0]
    assert set(n_cond.tolist()) == {0, 1, 2}
    eps = torch.empty_like(x0)
    for b in range(64):
        # each sample's generator draws u ~ sigmoid(N(0,1)) for its sigma (shift 5 on the 1,000-step grid), then
        # its noise
        g = torch.Generator().manual_seed(b)
        base = (1000 - min(int(torch.sigmoid(torch.randn((), generator=g)) * 1000), 999)) / 1000
        assert sigma[b].item() == pytest.approx(5 * base / (1 + 4 * base), rel=1e-6)
        eps[b] = torch.randn(x0.shape[1:], generator=g)
        n = int(n_cond[b])
        assert (mask[b, 0, :n] == 1).all() and (mask[b, 0, n:] == 0).all()
        assert torch.equal(x_t[b, :, :n], x0[b, :, :n])  # clean latents on the conditioning frames
        assert torch.allclose(x_t[b, :, n:], sigma[b] * eps[b, :, n:] + (1 - sigma[b]) * x0[b, :, n:], atol=1e-6)
    # the loss ignores whatever the network says on conditioning frames
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    target = eps - x0
    for b in range(64):
        n = int(n_cond[b])
        frames = x0.shape[2]
        expected = ((pred[b, :, n:] - target[b, :, n:]) ** 2).sum() / (x0[b].numel())
        assert torch.allclose(per_sample[b], expected, rtol=1e-4), b
    # caption dropout zeroes whole embeddings, about 20% of them
    dropped = (text_in.abs().sum(dim=(1, 2)) == 0).float().mean()
    assert 0.05 < dropped < 0.4


def test_lr_schedule_and_ema_match_the_reference():
    assert train.lr_multiplier(0) == pytest.approx(1e-6)
    assert train.lr_multiplier(1000) == pytest.approx(1e-6 + (0.5 - 1e-6) / 2)
    assert train.lr_multiplier(2000) == pytest.approx(0.5)
    assert train.lr_multiplier(51000) == pytest.approx(0.2 + 0.3 * 49000 / 98000)
    assert train.ema_beta(0) == 0.0
    assert train.ema_beta(10) == pytest.approx(0.469, abs=1e-3)
    assert train.ema_beta(100) == pytest.approx(0.924, abs=1e-3)
    assert train.ema_beta(1000) == pytest.approx(0.992, abs=1e-3)


def test_config_rejects_unknown_keys_wrong_types_and_values(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("lora_rank = 4\nlora_rnk = 4\n")
    for args, message in (
            (["lora_rnk=4"], "unknown config key 'lora_rnk' (on the command line)"),
            ([str(config)], f"unknown config key 'lora_rnk' (in {config})"),
            (["lora_rank='x'"], "config key 'lora_rank' (on the command line) must be int, got 'x'"),
            (["dtype=bf16"], "config key 'dtype' (on the command line) must be one of 'bfloat16', 'float32', got "),
            (["dit_preset=2b"], "must be one of 'cosmos_2b', 'cosmos_14b', 'tiny', got '2b'"),
            (["activation_checkpointing=selctive"], "must be one of 'none', 'full', 'selective', got 'selctive'"),
            (["attention_backend=flash"], "must be one of 'triton', 'sdpa', got 'flash'"),
            ([str(tmp_path / "none.py")], f"config file {tmp_path / 'none.py'} does not exist")):
        result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    # --help after a config file prints the settings and trains nothing
    result = subprocess.run([sys.executable, "train.py", "configs/demo.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert "activation_checkpointing = 'selective'" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------------------


def held_out_loss(cache_dir, lora=None):
    """Mean denoising loss of the tiny base (+ adapter) on the cached clips with fixed noise, written out here
    (x_t = sigma eps + (1 - sigma) x0, target eps - x0, no conditioning frames) rather than train.py's."""
    from lora import inject_lora, load_lora_state_dict
    from model import DIT_PRESETS, DiT
    from prep_data import CachedDataset

    torch.manual_seed(0)  # train.py's random base for seed 0
    model = DiT(DIT_PRESETS["tiny"])
    if lora is not None:
        inject_lora(model, rank=32, alpha=32)
        load_lora_state_dict(model, lora)
    data = CachedDataset(cache_dir)
    losses = []
    with torch.no_grad():
        for i in range(len(data)):
            x0, text = data[i]["latents"][None].float(), data[i]["text_emb"][None].float()
            no_condition = torch.zeros_like(x0[:, :1])
            for k in range(8):
                g = torch.Generator().manual_seed(k)
                sigma, eps = torch.rand(1, generator=g) * 0.9 + 0.05, torch.randn(x0.shape, generator=g)
                v = model(sigma * eps + (1 - sigma) * x0, sigma, text, condition_mask=no_condition)
                losses.append(((v - (eps - x0)) ** 2).mean().item())
    return float(np.mean(losses))


def test_loss_falls_and_only_lora_changes(cache, tmp_path):
    run_train(tmp_path, cache, "max_iter=40", "save_iter=40", "caption_dropout=0.0")
    ema = read_dcp(ckpt(tmp_path, 40), "ema")
    model_sd = read_dcp(ckpt(tmp_path, 40), "model")
    assert set(model_sd) == set(ema) and all(".lora_" in k for k in model_sd)  # nothing else is trainable
    before, after = held_out_loss(cache), held_out_loss(cache, model_sd)
    assert after < 0.8 * before, (before, after)


def test_resume_is_exact(cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, cache, "max_iter=4", "save_iter=2")
    run_train(resumed, cache, "max_iter=2", "save_iter=2")
    run_train(resumed, cache, "max_iter=4", "save_iter=2")
    for section in ("model", "ema"):
        a, b = read_dcp(ckpt(straight, 4), section), read_dcp(ckpt(resumed, 4), section)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (section, k)


def logged(stdout, key):
    return [float(line.split(f" {key} ")[1].split(",")[0]) for line in stdout.splitlines() if line.startswith("iter ")]


def test_checkpoints_are_never_written_over_and_rotation_keeps_exports(cache, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    first = run_train(tmp_path, cache, "max_iter=2", "save_iter=2")
    (ckpt(tmp_path, 2) / "model_ema_bf16.pt").write_bytes(b"an export")  # as convert.py writes into the folder
    # resumed with another lr: it takes effect (the optimizer state would bring back the old one) and is announced
    second = run_train(tmp_path, cache, "max_iter=6", "save_iter=2", "keep_last=2", "lr=2e-3")
    assert "with changed settings: lr 0.001 -> 0.002" in second.stdout
    assert logged(second.stdout, "lr")[-1] == pytest.approx(2 * logged(first.stdout, "lr")[-1], rel=1e-3)
    # rotation removed iter 2's training state only: the export and its folder stay
    assert f"kept {ckpt(tmp_path, 2)} without its training state: it holds model_ema_bf16.pt" in second.stdout
    assert sorted(p.name for p in ckpt(tmp_path, 2).iterdir()) == ["meta.json", "model_ema_bf16.pt"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_000000002", "iter_000000004", "iter_000000006",
                                                             "latest_checkpoint.txt"]
    # going on from iteration 4 would write over iteration 6: refused, and the run folder is left as it was
    config_before = (tmp_path / "run" / "config.json").read_text()
    refused = run_train(tmp_path, cache, f"resume='{ckpt(tmp_path, 4)}'", "max_iter=8", "save_iter=2", check=False)
    assert refused.returncode != 0
    assert f"{checkpoints} already has iter_000000006, after iteration 4 where this run starts" in refused.stderr
    assert (tmp_path / "run" / "config.json").read_text() == config_before
    assert (ckpt(tmp_path, 6) / ".metadata").is_file()
    # stopped between a checkpoint's rename and latest_checkpoint.txt's update: the newest complete one is resumed
    (checkpoints / "latest_checkpoint.txt").write_text("iter_000000004\n")
    assert f"resumed from {ckpt(tmp_path, 6)} at iteration 6" in run_train(tmp_path, cache, "max_iter=6").stdout
    # into a new run it goes on
    branched = run_train(tmp_path, cache, f"resume='{ckpt(tmp_path, 4)}'", "name='branch'", "max_iter=6",
                         "save_iter=2")
    assert "iteration 4" in branched.stdout and (ckpt(tmp_path, 6, "branch") / ".metadata").is_file()
    # the adapter's scale cannot change under a resumed run; keep_last below 0 means nothing
    refused = run_train(tmp_path, cache, "lora_alpha=8", "max_iter=8", check=False)
    assert "was made with lora_alpha=32, this run has 8" in refused.stderr
    refused = run_train(tmp_path, cache, "keep_last=-1", check=False)
    assert "config key 'keep_last' (on the command line) must be >= 0, got -1" in refused.stderr


KILL_IN_SAVE = """
import os, signal, sys
import train
real_save = train.dcp.save
def save_then_die(state, checkpoint_id):
    if checkpoint_id.endswith("iter_000000004.partial"):
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)  # half of the files, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(state, checkpoint_id=checkpoint_id)
train.dcp.save = save_then_die
train.main(sys.argv[1:])
"""


def test_kill_during_save_keeps_latest_on_the_previous_checkpoint(cache, tmp_path):
    args = ["dit_preset='tiny'", "dtype='float32'", f"cache_dir='{cache}'", f"out_dir='{tmp_path}'",
            "num_workers=0", "wandb=False", "val_iter=0", "max_iter=6", "save_iter=2"]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest_checkpoint.txt").read_text().strip() == "iter_000000002"
    assert (checkpoints / "iter_000000004.partial").exists() and not ckpt(tmp_path, 4).exists()
    result = run_train(tmp_path, cache, "max_iter=6", "save_iter=2")
    assert "resumed from" in result.stdout and "iteration 2" in result.stdout
    assert (checkpoints / "latest_checkpoint.txt").read_text().strip() == "iter_000000006"


def logged_losses(stdout):
    return [float(line.split("loss ")[1].split(",")[0]) for line in stdout.splitlines() if line.startswith("iter ")]


def test_two_ranks_equal_one_rank_with_the_same_global_batch_and_resume_on_one(cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Adam's first steps move an element by about lr whatever its gradient's size, so with eps=1e-8 a gradient near
    # zero whose sign flips under another reduction order moves its element 2 lr the other way (seen on one CI
    # machine). eps=1e-6 bounds that gain at lr/eps = 1e3: the reduction-order difference stays near 1e-7.
    common = ("max_iter=3", "save_iter=3", "logging_iter=1", "eps=1e-6")
    one_rank = run_train(one, cache, *common, "batch_size=2")
    two_ranks = run_train(two, cache, *common, "batch_size=1", nproc=2)
    assert np.allclose(logged_losses(one_rank.stdout), logged_losses(two_ranks.stdout), rtol=1e-5)
    a, b = read_dcp(ckpt(one, 3), "model"), read_dcp(ckpt(two, 3), "model")
    for k in a:  # 5e-5 is 2% of three updates of lr 1e-3
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-5), k
    # a checkpoint written by two ranks resumes on one
    result = run_train(two, cache, "max_iter=4", "save_iter=4", "batch_size=1", "logging_iter=1", "keep_last=1")
    assert "iteration 3" in result.stdout
    assert sorted(p.name for p in (two / "run" / "checkpoints").iterdir()) == ["iter_000000004",
                                                                               "latest_checkpoint.txt"]


def test_the_cache_sets_the_data_settings_and_other_values_are_refused(cache, tmp_path):
    run_train(tmp_path, cache, "max_iter=1")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["num_frames"], config["video_size"], config["dataset_dir"]) == (17, [32, 32],
                                                                                  str(cache.resolve().parent.parent))
    for setting, message in (("num_frames=93", "num_frames=93 (the cache has 17)"),
                             ("video_size=(64, 64)", "video_size=(64, 64) (the cache has (32, 32))"),
                             (f"dataset_dir='{tmp_path}'", f"dataset_dir={tmp_path} (the cache has")):
        result = run_train(tmp_path / "other", cache, setting, check=False)
        assert result.returncode != 0 and f"cache_dir {cache} does not match this config: {message}" in result.stderr
        assert not (tmp_path / "other").exists()


def test_missing_base_checkpoint_fails_before_work(cache, tmp_path):
    result = run_train(tmp_path, cache, "base_checkpoint='/nonexistent/base.pt'", "max_iter=1", check=False)
    assert result.returncode != 0 and "/nonexistent/base.pt" in result.stderr


def test_offload_without_checkpointing_or_cuda_fails_before_work(cache, tmp_path):
    for checkpointing, message in (("none", "set activation_checkpointing='full' or 'selective' (got 'none')"),
                                   ("selective", "needs a CUDA device (got cpu)")):
        result = run_train(tmp_path, cache, "offload_block_inputs=True", f"activation_checkpointing='{checkpointing}'",
                           "max_iter=1", check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()


NAN_AT_THIRD_STEP = """
import sys
import train
real_loss, calls = train.flow_matching_loss, []
def loss_that_breaks(*args):
    per_sample, n_cond = real_loss(*args)
    calls.append(1)
    return (per_sample * float("nan") if len(calls) == 3 else per_sample), n_cond
train.flow_matching_loss = loss_that_breaks
train.main(sys.argv[1:])
"""


def test_non_finite_loss_stops_the_run_naming_the_step_and_resume_works(cache, tmp_path):
    args = ["dit_preset='tiny'", "dtype='float32'", f"cache_dir='{cache}'", f"out_dir='{tmp_path}'",
            "num_workers=0", "wandb=False", "val_iter=0", "max_iter=4", "save_iter=2"]
    broken = subprocess.run([sys.executable, "-c", NAN_AT_THIRD_STEP, *args], cwd=REPO, capture_output=True, text=True)
    assert broken.returncode != 0 and "non-finite loss (nan)" in broken.stderr and "iteration 2" in broken.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpoint.txt").read_text().strip() == "iter_000000002"
    result = run_train(tmp_path, cache, "max_iter=4", "save_iter=2")
    assert "iteration 2" in result.stdout and ckpt(tmp_path, 4).exists()


@pytest.fixture(scope="module")
def validation_models(tmp_path_factory):
    """A tiny Wan VAE file and a tiny Qwen2.5-VL text-encoder folder whose 4 layers x 64 = 256 features fit the
    tiny DiT."""
    import transformers

    from model import WanVAE, WanVAEConfig
    from test_text_encoder import write_tiny_qwen_tokenizer

    root = tmp_path_factory.mktemp("validation_models")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, rms_norm_eps=1e-6, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]))
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(root / "text_encoder")
    write_tiny_qwen_tokenizer(root / "text_encoder")
    torch.save(WanVAE(WanVAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)).state_dict(),
               root / "tokenizer.pth")
    return root


@pytest.mark.parametrize("nproc", [1, 2])
def test_validation_videos_on_every_rank(cache, tmp_path, validation_models, nproc):
    """Validation samples with the EMA weights on all ranks (3 prompts over 2 ranks: one rank samples a spare
    copy and writes nothing, so FSDP's collectives stay in step) and writes one mp4 per prompt. Mid-run, training
    goes on from the trained weights: the run ends as one without validation does."""
    from prep_data import read_video

    run_train(tmp_path, cache, "max_iter=3", "save_iter=3", "val_iter=2", "val_num_frames=5", "val_steps=2",
              "video_size=(32, 32)", f"vae_checkpoint='{validation_models / 'tokenizer.pth'}'",
              f"text_encoder='{validation_models / 'text_encoder'}'",
              "val_prompts=['A video of sks teal robot.', 'A red circle.', 'A blue square.']", nproc=nproc)
    videos = sorted((tmp_path / "run" / "validation").glob("*.mp4"))
    assert [v.name for v in videos] == [f"iter_000000002_{i:02d}.mp4" for i in range(3)]
    frames, info = read_video(videos[0])
    assert frames.shape == (5, 32, 32, 3)
    if nproc == 1:
        run_train(tmp_path / "plain", cache, "max_iter=3", "save_iter=3")
        for section in ("model", "ema"):
            a, b = read_dcp(ckpt(tmp_path, 3), section), read_dcp(ckpt(tmp_path / "plain", 3), section)
            assert all(torch.equal(a[k], b[k]) for k in a), section


def test_nemo_lora_config_is_the_reference_recipe():
    saved = {k: getattr(train, k) for k in train.CONFIG_KEYS}
    try:
        c = train.load_config([str(REPO / "configs" / "nemo_lora.py"), "cache_dir=''"])  # no cache here to read
    finally:
        for k, v in saved.items():
            setattr(train, k, v)
    assert (c["dit_preset"], c["num_frames"], c["video_size"], c["batch_size"], c["num_workers"]) == (
        "cosmos_2b", 93, (704, 1280), 1, 4)
    assert (c["use_lora"], c["lora_rank"], c["lora_alpha"]) == (True, 32, 32)
    assert c["lora_target_modules"] == "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"
    assert c["conditional_frames_probs"] == {0: 0.333, 1: 0.333, 2: 0.334}
    assert (c["lr"], c["weight_decay"], c["betas"], c["eps"], c["grad_clip"]) == (2 ** -14.5, 1e-3, (0.9, 0.999),
                                                                                 1e-8, 0.1)
    assert (c["warmup_steps"], c["f_max"], c["f_min"], c["cycle_length"]) == (2000, 0.5, 0.2, 100_000)
    assert (c["max_iter"], c["save_iter"], c["ema_rate"], c["caption_dropout"], c["shift"]) == (1000, 200, 0.1, 0.2,
                                                                                                5.0)
    assert c["base_checkpoint"].endswith("d20b7120-df3e-4911-919d-db6e08bad31c_ema_bf16.pt")


def test_online_encoding_of_raw_videos(cache, tmp_path, validation_models):
    """Without a cache, clips are decoded and VAE-encoded every step and captions encoded once, like the reference."""
    dataset = cache.parents[1]  # <dataset>/cache/<tag> -> <dataset>
    result = run_train(tmp_path, "", "max_iter=2", "save_iter=2", f"dataset_dir='{dataset}'", "num_frames=17",
                       "video_size=(32, 32)", f"vae_checkpoint='{validation_models / 'tokenizer.pth'}'",
                       f"text_encoder='{validation_models / 'text_encoder'}'")
    assert "iter 2: loss" in result.stdout
    assert set(read_dcp(ckpt(tmp_path, 2), "model")) == set(read_dcp(ckpt(tmp_path, 2), "ema"))


def test_online_encoding_equals_the_cache(tmp_path, validation_models, monkeypatch):
    """train.py's online encoding gives the cache's latents for the same clip, and both are the VAE's encoding of
    the frames cast to its dtype and scaled to [-1, 1] (the reference's uint8.to(bf16) / 127.5 - 1)."""
    from model import WanVAE
    from prep_data import CachedDataset, VideoDataset, read_video

    write_synthetic_dataset(tmp_path / "robot", num_videos=1, num_frames=17, size=(32, 32))
    vae_path = validation_models / "tokenizer.pth"
    vae = WanVAE.from_pretrained(vae_path)  # bf16, as train.py loads it
    cached = CachedDataset(build_cache(tmp_path / "robot", vae, HashTextEncoder(), "wan", "hash", num_frames=17,
                                       video_size=(32, 32)).parent)[0]["latents"]
    monkeypatch.setattr(train, "vae_checkpoint", str(vae_path))
    monkeypatch.setattr(train, "text_encoder", str(validation_models / "text_encoder"))
    dataset = VideoDataset(tmp_path / "robot", num_frames=17, video_size=(32, 32))  # 17 frames: the whole video
    online = train.online_encoder(dataset, torch.device("cpu"))(torch.utils.data.default_collate([dataset[0]]))["latents"][0]
    assert torch.equal(online.to(torch.bfloat16), cached)
    frames, _ = read_video(dataset.videos[0])
    with torch.no_grad():
        by_hand = vae.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(torch.bfloat16) / 127.5 - 1)[0]
    assert torch.equal(online, by_hand)


def karras_beta(step, rel_width=0.1):
    """The power EMA's weight on the previous average (Karras et al. 2024): (1 - 1/(t+1))^(gamma+1), where gamma
    gives the relative width rel_width^2 = (gamma+1) / ((gamma+2)^2 (gamma+3)); found here by bisection."""
    low, high = 0.0, 100.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > rel_width ** 2 else (low, mid)
    return (1 - 1 / (step + 1)) ** (low + 1)


def test_ema_is_the_power_ema_of_the_trained_weights(cache, tmp_path):
    run_train(tmp_path, cache, "max_iter=3", "save_iter=1", "keep_last=0", "ema_rate=0.25")
    weights = [read_dcp(ckpt(tmp_path, s), "model") for s in (1, 2, 3)]
    emas = [read_dcp(ckpt(tmp_path, s), "ema") for s in (1, 2, 3)]
    assert 0.3 < karras_beta(1, 0.25) < karras_beta(2, 0.25) < 0.6  # a wide EMA: weights that tell the steps apart
    for k in weights[0]:
        expected = weights[0][k].double()  # the first step's weight on the previous average is 0
        assert torch.equal(emas[0][k], weights[0][k]), k
        for s in (1, 2):
            expected = karras_beta(s, 0.25) * expected + (1 - karras_beta(s, 0.25)) * weights[s][k].double()
            assert torch.allclose(emas[s][k].double(), expected, rtol=1e-5, atol=1e-8), (k, s)
        assert not torch.allclose(emas[2][k], weights[2][k]) or not weights[2][k].any()


HOLD_FIRST_STEP = """
real_loss = train.flow_matching_loss
def loss_once_released(*args):
    while not Path(os.environ["RELEASE"]).exists():
        time.sleep(0.1)
    return real_loss(*args)
train.flow_matching_loss = loss_once_released
"""


def test_a_run_folder_has_one_writer(cache, tmp_path):
    """A second run on a run folder in use is refused at once, naming the first (host and pid), which goes on
    untouched; the lock goes at exit, and one left by a process gone from this host is taken over."""
    run_dir, lock = tmp_path / "run", tmp_path / "run" / "train.lock"
    first = subprocess.Popen([sys.executable, wrapped(tmp_path, HOLD_FIRST_STEP),
                              *train_args(tmp_path, cache, "max_iter=2", "save_iter=1")], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=dict(os.environ, OMP_NUM_THREADS="1", RELEASE=str(tmp_path / "release")))
    try:
        for _ in range(1200):  # the first run holds the folder once it wrote config.json
            if (run_dir / "config.json").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        second = run_train(tmp_path, cache, "max_iter=4", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert (f"{run_dir} is in use by another train.py run (host and pid: {socket.gethostname()} {first.pid}, "
                f"in {lock})") in second.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "train.lock"]
    finally:
        (tmp_path / "release").touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert (ckpt(tmp_path, 2) / ".metadata").is_file() and not lock.exists()
    # a lock whose process has ended on this host is stale
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {gone.stdout.strip()}\n")
    result = run_train(tmp_path, cache, "max_iter=3")
    assert f"{lock}: its run (pid {gone.stdout.strip()}) is gone; taking the run folder over" in result.stdout
    assert (ckpt(tmp_path, 3) / ".metadata").is_file() and not lock.exists()
    # one from another host cannot be checked from here
    lock.write_text("elsewhere 123\n")
    refused = run_train(tmp_path, cache, "max_iter=4", check=False)
    assert "is in use by another train.py run (host and pid: elsewhere 123" in refused.stderr
    assert lock.read_text() == "elsewhere 123\n" and not ckpt(tmp_path, 4).exists()


SIGNAL_IN_THIRD_STEP = """
real_loss, calls = train.flow_matching_loss, []
def loss_then_signal(*args):
    calls.append(1)
    if len(calls) == 3 and os.environ.get("RANK", "0") == os.environ["SIGNAL_RANK"]:
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return real_loss(*args)
train.flow_matching_loss = loss_then_signal
"""


def test_preemption_saves_the_step_on_every_rank_and_the_same_command_resumes(cache, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ("max_iter=5", "save_iter=100", "batch_size=1")
    run_train(straight, cache, *common, nproc=2)
    # rank 1 alone is sent SIGTERM during its third step: both ranks finish it, save it and stop
    result = run_train(stopped, cache, *common, nproc=2, check=False, script=wrapped(tmp_path, SIGNAL_IN_THIRD_STEP),
                       env={"SIGNAL": "SIGTERM", "SIGNAL_RANK": "1"})
    assert result.returncode != 0
    assert result.stderr.count("SIGTERM: stopped after iteration 3 and saved it; the same command resumes") == 1
    assert (stopped / "run" / "checkpoints" / "latest_checkpoint.txt").read_text().strip() == "iter_000000003"
    assert not ckpt(stopped, 5).exists() and not (stopped / "run" / "train.lock").exists()
    resumed = run_train(stopped, cache, *common, nproc=2)
    assert f"resumed from {ckpt(stopped, 3)} at iteration 3" in resumed.stdout
    for section in ("model", "ema"):
        a, b = read_dcp(ckpt(straight, 5), section), read_dcp(ckpt(stopped, 5), section)
        assert all(torch.equal(a[k], b[k]) for k in a), section
    # SIGUSR1 where the config names it (SLURM's --signal=USR1@<seconds>); the exit code is 128 + the signal's
    result = run_train(tmp_path / "usr1", cache, "max_iter=5", "preempt_signal='SIGUSR1'", check=False,
                       script=wrapped(tmp_path, SIGNAL_IN_THIRD_STEP), env={"SIGNAL": "SIGUSR1", "SIGNAL_RANK": "0"})
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr
    assert "SIGUSR1: stopped after iteration 3" in result.stderr and (ckpt(tmp_path / "usr1", 3) / ".metadata").is_file()


def test_two_nodes_train_and_resume_on_one_node(cache, tmp_path):
    """Two torchrun "nodes" on this host (one process each, one c10d rendezvous endpoint) train with checkpoints;
    the run goes on on one node and ends as a one-node run of the same global batch does."""
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    common = ("save_iter=2", "logging_iter=1", "eps=1e-6")  # eps: see the two-ranks test
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=two_nodes", "--local_addr=127.0.0.1", "train.py",
                               *train_args(two, cache, "max_iter=2", "batch_size=1", *common)],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    resumed = run_train(two, cache, "max_iter=4", "batch_size=2", *common)
    assert "iteration 2" in resumed.stdout and "world_size 2 -> 1" in resumed.stdout
    straight = run_train(one, cache, "max_iter=4", "batch_size=2", *common)
    assert np.allclose(logged_losses(straight.stdout)[2:], logged_losses(resumed.stdout), rtol=1e-5)
    a, b = read_dcp(ckpt(one, 4), "model"), read_dcp(ckpt(two, 4), "model")
    for k in a:  # as in the two-ranks test: reduction order only
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-5), k


RECORD_SAMPLES = """
real_loss = train.flow_matching_loss
def recording_loss(model, x0, text_emb, generators):
    for x, g in zip(x0, generators):
        print(f"sample seed {g.initial_seed()} latents {x.double().sum().item():.6f}", flush=True)
    return real_loss(model, x0, text_emb, generators)
train.flow_matching_loss = recording_loss
"""


def test_resume_on_another_world_size_keeps_the_data_order(cache, tmp_path):
    """Two processes then one, same per-process batch: the global batch halves, and the run goes on with exactly
    the samples (clip and noise) a continuous run draws next."""
    def seen(result):
        return [line for line in result.stdout.splitlines() if line.startswith("sample ")]

    run_train(tmp_path, cache, "max_iter=2", "save_iter=2", "batch_size=1", nproc=2)  # samples 0-3
    resumed = run_train(tmp_path, cache, "max_iter=4", "batch_size=1", script=wrapped(tmp_path, RECORD_SAMPLES))
    assert "world_size 2 -> 1; global_batch 2 -> 1 (the data goes on from sample 4 of the stream" in resumed.stdout
    continuous = run_train(tmp_path / "continuous", cache, "max_iter=6", "batch_size=1",
                           script=wrapped(tmp_path, RECORD_SAMPLES))
    assert len(seen(resumed)) == 2 and seen(resumed) == seen(continuous)[4:]
    assert json.loads((ckpt(tmp_path, 4) / "meta.json").read_text())["samples"] == 6


def test_same_seed_same_run_on_a_base_checkpoint_and_grad_clip_0_is_no_clipping(cache, tmp_path):
    from model import DIT_PRESETS, DiT

    torch.manual_seed(1)
    base = tmp_path / "base.pt"
    torch.save({f"net.{k}": v for k, v in DiT(DIT_PRESETS["tiny"]).state_dict().items()}, base)
    runs = {name: run_train(tmp_path / name, cache, f"base_checkpoint='{base}'", "max_iter=1", "logging_iter=1", clip)
            for name, clip in (("a", "grad_clip=0"), ("b", "grad_clip=0"), ("unclipped", "grad_clip=1e9"))}
    assert logged(runs["a"].stdout, "grad_norm") == logged(runs["b"].stdout, "grad_norm")
    a, b, unclipped = (read_dcp(ckpt(tmp_path / name, 1), "model") for name in runs)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], unclipped[k]) for k in a)
    assert all(a[k].any() for k in a if ".lora_B." in k)  # it learns (clipping to 0 left B at 0)


def test_bad_inputs_are_one_message_and_leave_no_run_folder(cache, tmp_path, validation_models):
    truncated = tmp_path / "cache"
    shutil.copytree(cache, truncated)
    latent = sorted((truncated / "latents").iterdir())[0]
    latent.write_bytes(latent.read_bytes()[:-100])
    vae = validation_models / "tokenizer.pth"
    for overrides, message in (
            ((f"cache_dir='{truncated}'",), f"cache_dir: {latent}: unreadable cache file"),
            (("cache_dir=''", f"dataset_dir='{tmp_path}'", "vae_checkpoint='vae.pth'", "text_encoder='te'"),
             f"dataset_dir: {tmp_path}: no videos/ folder"),
            ((f"base_checkpoint='{vae}'",), f"base_checkpoint {vae}: {vae} has no keys under prefix 'net.'"),
            (("lr=-1",), "config key 'lr' (on the command line) must be > 0, got -1.0"),
            (("lora_target_modules=foo",), "config key 'lora_target_modules': lora targets ['foo'] match no Linear "
                                           "of DiT; a target is a Linear's name or a dotted suffix of it, e.g. ")):
        result = run_train(tmp_path / "out", cache, *overrides, check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, (
            overrides, result.stderr)
        assert not (tmp_path / "out").exists()
    # under torchrun the message comes once (rank 0) and every rank exits with the same code
    result = run_train(tmp_path / "out", cache, "lr=-1", nproc=2, check=False)
    assert result.stderr.count("config key 'lr' (on the command line) must be > 0") == 1, result.stderr
    assert "exitcode  : 1" in result.stderr and "exitcode  : -" not in result.stderr, result.stderr


def test_config_checks_every_setting_against_its_range():
    saved = {k: getattr(train, k) for k in train.CONFIG_KEYS}
    for args, message in (
            (["shift=0"], "config key 'shift' (on the command line) must be > 0, got 0.0"),
            (["caption_dropout=1.5"], "'caption_dropout' (on the command line) must be in [0, 1], got 1.5"),
            (["conditional_frames_probs={0: 0.3, 1: 0.2, 2: 0.2}"], "probabilities >= 0 and summing to 1, got {0: "),
            (["conditional_frames_probs={0: 1.5, 1: -0.5}"], "probabilities >= 0 and summing to 1, got {0: 1.5"),
            (["conditional_frames_probs={3: 1.0}"], "{frames: probability} for frames in [0, 2]"),
            (["max_num_conditional_frames=5"], "'max_num_conditional_frames' (on the command line) must be in [0, 2]"),
            (["num_frames=5", "conditional_frames_probs={0: 0.5, 1: 0.5}"],
             "'max_num_conditional_frames' (the default) must be in [0, 1] (0-2 frames, fewer than the 2 latent"),
            (["num_frames=20"], "'num_frames' (on the command line) must be 1 + 4k"),
            (["video_size=(60, 64)"], "must be (H, W), multiples of 16"),
            (["grad_clip=-1"], "'grad_clip' (on the command line) must be >= 0 (the largest gradient norm; 0 = no "),
            (["ema_rate=0.5"], "'ema_rate' (on the command line) must be in (0, 0.3], got 0.5"),
            (["warmup_steps=10", "cycle_length=10"], "'cycle_length' (on the command line) must be > warmup_steps"),
            (["betas=(0.9, 1.0)"], "'betas' (on the command line) must be two numbers in [0, 1)"),
            (["preempt_signal=SIGKILL"], "must be one of 'SIGTERM', 'SIGUSR1', got 'SIGKILL'")):
        try:
            with pytest.raises(SystemExit) as e:
                train.load_config(args)
        finally:
            for k, v in saved.items():
                setattr(train, k, v)
        assert message in str(e.value.code), (args, e.value.code)
