"""train.py on the CPU: the objective, learning, exact resume, crash-safe checkpoints, and two gloo ranks."""

import json
import os
import socket
import subprocess
import sys
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


def run_train(out, cache_dir, *overrides, nproc=1, check=True):
    args = ["dit_preset='tiny'", "dtype='float32'", f"cache_dir='{cache_dir}'", f"out_dir='{out}'",
            "num_workers=0", "wandb=False", "val_iter=0", "logging_iter=2", "lr=1e-3", "warmup_steps=0",
            "grad_clip=1.0", *overrides]
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


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
    for b in range(64):
        n = int(n_cond[b])
        assert (mask[b, 0, :n] == 1).all() and (mask[b, 0, n:] == 0).all()
        assert torch.equal(x_t[b, :, :n], x0[b, :, :n])  # clean latents on the conditioning frames
        assert not torch.allclose(x_t[b, :, n:], x0[b, :, n:])
    # the loss ignores whatever the network says on conditioning frames
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    eps = (x_t - (1 - sigma[:, None, None, None, None]) * x0) / sigma[:, None, None, None, None]
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
            (["attention_backend=flash"], "must be one of 'triton', 'sdpa', got 'flash'")):
        result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    # --help after a config file prints the settings and trains nothing
    result = subprocess.run([sys.executable, "train.py", "configs/demo.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert "activation_checkpointing = 'selective'" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------------------


def held_out_loss(cache_dir, lora=None):
    """Mean denoising loss of the tiny base (+ adapter) on the cached clips with fixed noise."""
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
            item = data[i]
            for k in range(8):
                per_sample, _ = train.flow_matching_loss(model, item["latents"][None].float(),
                                                         item["text_emb"][None].float(),
                                                         [torch.Generator().manual_seed(k)])
                losses.append(per_sample.item())
    return float(np.mean(losses))


def test_loss_falls_and_only_lora_changes(cache, tmp_path):
    run_train(tmp_path, cache, "max_iter=40", "save_iter=40", "caption_dropout=0.0")
    ema = read_dcp(ckpt(tmp_path, 40), "ema")
    model_sd = read_dcp(ckpt(tmp_path, 40), "model")
    assert set(model_sd) == set(ema) and all(".lora_" in k for k in model_sd)  # nothing else is trainable
    train.caption_dropout = 0.0
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
    copy and writes nothing, so FSDP's collectives stay in step) and writes one mp4 per prompt."""
    from prep_data import read_video

    run_train(tmp_path, cache, "max_iter=2", "save_iter=2", "val_iter=2", "val_num_frames=5", "val_steps=2",
              "video_size=(32, 32)", f"vae_checkpoint='{validation_models / 'tokenizer.pth'}'",
              f"text_encoder='{validation_models / 'text_encoder'}'",
              "val_prompts=['A video of sks teal robot.', 'A red circle.', 'A blue square.']", nproc=nproc)
    videos = sorted((tmp_path / "run" / "validation").glob("*.mp4"))
    assert [v.name for v in videos] == [f"iter_000000002_{i:02d}.mp4" for i in range(3)]
    frames, info = read_video(videos[0])
    assert frames.shape == (5, 32, 32, 3)


def test_nemo_lora_config_is_the_reference_recipe():
    saved = {k: getattr(train, k) for k in train.CONFIG_KEYS}
    try:
        c = train.load_config([str(REPO / "configs" / "nemo_lora.py"), "cache_dir=''"])  # its cache is not here
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
