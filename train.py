"""LoRA (or full) post-training of the Cosmos-Predict2.5 DiT with rectified flow.

    python train.py configs/demo.py                                      # one process (CPU: gloo)
    torchrun --nproc_per_node=8 train.py configs/nemo_lora.py [key=value ...]

The defaults below are the reference LoRA recipe; a config file of plain assignments overrides them and
`key=value` arguments override the file. One script for 1..N processes: FSDP2 `fully_shard` per block, bf16
compute with fp32 LoRA master weights, AdamW, power EMA, DCP checkpoints that resume on any number of ranks.
"""

import ast
import atexit
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import sample
from lora import inject_lora, mark_only_lora_trainable
from model import DIT_PRESETS, DiT, WanVAE, check_offload, file_fingerprint
from prep_data import CachedDataset, CachedSampler, DataError, VideoDataset, encode_video, read_manifest

# ----------------------------------------------------------------------------------------------------------------
# Config: defaults (the reference recipe `predict2_lora_training_2b_cosmos_nemo_assets`), overridden by a file,
# then by key=value arguments.
# ----------------------------------------------------------------------------------------------------------------
_not_settings = set(globals())  # the imports above
name = "run"
out_dir = "outputs"
# model
dit_preset = "cosmos_2b"
base_checkpoint = ""  # official *_ema_bf16.pt (or model.pt); "" = random init (benchmarks only)
dtype = "bfloat16"  # compute dtype of the frozen base, or "float32"; LoRA master weights and AdamW state stay fp32
attention_backend = "triton"  # "triton" (kernels/attention.py on CUDA, SDPA elsewhere) or "sdpa" (cuDNN first)
activation_checkpointing = "selective"  # "none" | "full" | "selective" (keeps attention outputs)
offload_block_inputs = False  # checkpointed block inputs in pinned CPU memory (the 14B at 93x704x1280 on one GPU)
# data
dataset_dir = "datasets/cosmos_nemo_assets"
cache_dir = ""  # a `prep_data.py cache` folder (it sets num_frames, video_size, dataset_dir); "" = encode online
vae_checkpoint = ""  # tokenizer.pth, for online encoding and validation videos
text_encoder = ""  # Cosmos-Reason1 folder, for online encoding and validation prompts
num_frames = 93
video_size = (704, 1280)
batch_size = 1  # per rank (per context-parallel group when context_parallel_size > 1)
context_parallel_size = 1  # ranks sharing each video (its latent frames split over them); the reference's LoRA uses 1
num_workers = 4
caption_dropout = 0.2  # whole text embedding zeroed with this probability
# LoRA
use_lora = True
lora_rank = 32
lora_alpha = 32
lora_target_modules = "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"
# rectified flow with conditioning frames
shift = 5.0
min_num_conditional_frames = 0
max_num_conditional_frames = 2
conditional_frames_probs = {0: 0.333, 1: 0.333, 2: 0.334}
# optimisation: AdamW, LambdaLinear warm-up schedule (multiplier on lr), grad clip, power EMA
lr = 2 ** -14.5
weight_decay = 1e-3
betas = (0.9, 0.999)
eps = 1e-8
warmup_steps = 2000
f_start = 1e-6
f_max = 0.5
f_min = 0.2
cycle_length = 100_000
grad_clip = 0.1  # the gradient's global norm is clipped to this; 0 = no clipping
ema_rate = 0.1
max_iter = 1000
# logging and checkpoints
logging_iter = 100
save_iter = 200
keep_last = 3  # checkpoints kept (older ones lose their training state); 0 keeps every one
resume = ""  # a checkpoint folder to start from; by default the run's latest checkpoint, if any
seed = 0
preempt_signal = "SIGTERM"  # on it (any rank): finish the step, save a checkpoint, exit (the same command resumes)
wandb = True
wandb_project = "cosmos-lora"
# validation samples (all ranks take part; needs vae_checkpoint and text_encoder)
val_iter = 200
val_prompts = ["A video of sks teal robot."]
val_num_frames = 29
val_steps = 35
val_guidance = 7.0

CONFIG_KEYS = [k for k in globals() if k not in _not_settings and not k.startswith("_")]


def setting_ranges():
    """{key: (test, what the value must be)}, built when checked: some bounds depend on other settings."""
    def one_of(*options):
        return (lambda v: v in options), f"one of {', '.join(map(repr, options))}"

    def probabilities(v):
        if not all(isinstance(k, int) and low <= k <= high for k in v):
            return False
        return all(isinstance(p, (int, float)) and p >= 0 for p in v.values()) and abs(sum(v.values()) - 1) <= 1e-6

    latent_frames = 1 + (num_frames - 1) // 4
    most_cond = min(2, latent_frames - 1) if latent_frames > 1 else 2  # an image (one latent frame) gets none
    low, high = min_num_conditional_frames, max_num_conditional_frames
    rows = [  # (keys, test, what the value must be)
        ("batch_size context_parallel_size lora_rank logging_iter save_iter val_steps", lambda v: v >= 1, ">= 1"),
        ("num_workers warmup_steps max_iter keep_last seed val_iter", lambda v: v >= 0, ">= 0"),
        ("weight_decay f_start f_min val_guidance", lambda v: v >= 0, ">= 0"),
        ("lora_alpha shift lr eps f_max", lambda v: v > 0, "> 0"),
        ("num_frames val_num_frames", lambda v: v >= 1 and (v - 1) % 4 == 0,
         "1 + 4k (the VAE compresses 4 frames into one: 93, 29, 17...)"),
        ("name", lambda v: v != "", "a folder name"),
        ("out_dir", lambda v: v != "", "a folder"),
        ("dit_preset", *one_of(*DIT_PRESETS)),
        ("dtype", *one_of("bfloat16", "float32")),
        ("attention_backend", *one_of("triton", "sdpa")),
        ("activation_checkpointing", *one_of("none", "full", "selective")),
        ("preempt_signal", *one_of("SIGTERM", "SIGUSR1")),
        ("video_size", lambda v: len(v) == 2 and all(isinstance(x, int) and x > 0 and x % 16 == 0 for x in v),
         "(H, W), multiples of 16 (the VAE's 8x and the DiT's 2x2 patches)"),
        ("caption_dropout", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("min_num_conditional_frames", lambda v: 0 <= v <= high, f"in [0, max_num_conditional_frames={high}]"),
        # the modes text2world, image2world, video2world; and a clip must keep a frame to generate
        ("max_num_conditional_frames", lambda v: 0 <= v <= most_cond,
         f"in [0, {most_cond}] (0-2 frames, fewer than the {latent_frames} latent frames of "
         f"num_frames={num_frames})"),
        ("conditional_frames_probs", probabilities, f"{{frames: probability}} for frames in [{low}, {high}] "
         f"(min/max_num_conditional_frames), the probabilities >= 0 and summing to 1"),
        ("betas", lambda v: len(v) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in v),
         "two numbers in [0, 1)"),
        ("cycle_length", lambda v: v > warmup_steps, f"> warmup_steps ({warmup_steps})"),
        ("grad_clip", lambda v: v >= 0, ">= 0 (the largest gradient norm; 0 = no clipping)"),
        # the power EMA's relative width: larger ones have no exponent gamma > -1 (Karras et al. 2024, eq. 3)
        ("ema_rate", lambda v: 0 < v <= 0.3, "in (0, 0.3]"),
        ("val_prompts", lambda v: all(isinstance(p, str) and p for p in v), "a list of prompts (non-empty strings)"),
    ]
    return {key: (test, words) for keys, test, words in rows for key in keys.split()}


def load_config(argv):
    """Apply a config file and key=value arguments to the settings above, then the cache's data settings, and check
    every setting; each error names where the value was set."""
    defaults = {k: globals()[k] for k in CONFIG_KEYS}
    overrides = {}  # key -> (value, where it was set)
    if argv and "=" not in argv[0]:
        path, argv = argv[0], argv[1:]
        try:
            overrides.update({k: (v, f"in {path}") for k, v in sample.read_config_file(path).items()})
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep:
            raise SystemExit(f"argument {arg!r} is not key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word is a string
        overrides[key] = (value, "on the command line")
    for key, (value, where) in overrides.items():
        if key not in defaults:
            raise SystemExit(f"unknown config key {key!r} ({where}); known keys: {', '.join(sorted(defaults))}")
        want = type(defaults[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is tuple and isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise SystemExit(f"config key {key!r} ({where}) must be {want.__name__}, got {value!r} "
                             f"({type(value).__name__})")
        globals()[key] = value
    if cache_dir:
        take_data_settings_from_cache(overrides)
    ranges = setting_ranges()
    for key in CONFIG_KEYS:
        if key in ranges and not ranges[key][0](globals()[key]):
            where = overrides.get(key, (None, "the default"))[1]
            raise SystemExit(f"config key {key!r} ({where}) must be {ranges[key][1]}, got {globals()[key]!r}")
    return {k: globals()[k] for k in CONFIG_KEYS}


def take_data_settings_from_cache(overrides):
    """The cache is the data: num_frames, video_size and dataset_dir come from its manifest. Set to other values they
    are an error, as the run would record other data than it trains on."""
    global num_frames, video_size, dataset_dir
    manifest = Path(cache_dir) / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"cache_dir {cache_dir} has no manifest.json (run `prep_data.py cache` first)")
    try:
        made = read_manifest(manifest)
    except DataError as e:
        raise SystemExit(str(e)) from None
    found = {"num_frames": made["num_frames"], "video_size": tuple(made["video_size"]),
             "dataset_dir": Path(made["dataset"])}
    now = {"num_frames": num_frames, "video_size": video_size, "dataset_dir": Path(dataset_dir).resolve()}
    differ = [f"{k}={now[k]!s} (the cache has {found[k]!s})" for k in found if k in overrides and found[k] != now[k]]
    if differ:
        raise SystemExit(f"cache_dir {cache_dir} does not match this config: {'; '.join(differ)}. Leave them out or "
                         f"set them as the cache was made, or point cache_dir to a cache made with them")
    num_frames, video_size, dataset_dir = found["num_frames"], found["video_size"], str(found["dataset_dir"])


# ----------------------------------------------------------------------------------------------------------------
# The objective (reference: rectified flow, logit-normal sigma on the 1,000-step grid, frame-replace conditioning)
# ----------------------------------------------------------------------------------------------------------------


def sample_sigma(generator):
    """u ~ sigmoid(N(0,1)), snapped to the 1,000-step training grid, then shifted: sigma = s*b / (1 + (s-1)*b)."""
    u = torch.sigmoid(torch.randn((), generator=generator, device=generator.device))
    idx = (u * 1000).long().clamp(max=999)
    base = (1000 - idx).double() / 1000
    return (shift * base / (1 + (shift - 1) * base)).float()


def sample_num_conditional_frames(latent_frames, generator):
    """How many leading latent frames are given clean: 0 (text2world), 1 (image2world), 2 (video2world)."""
    choices = sorted(conditional_frames_probs)  # within [min, max]_num_conditional_frames (setting_ranges)
    probs = torch.tensor([float(conditional_frames_probs[n]) for n in choices], device=generator.device)
    pick = torch.multinomial(probs, 1, generator=generator)[0]
    n_cond = torch.tensor(choices, device=generator.device)[pick]
    return n_cond if latent_frames > 1 else torch.zeros_like(n_cond)  # an image gets no conditioning frame


def flow_matching_loss(model, x0, text_emb, generators):
    """x_t = sigma*eps + (1-sigma)*x0 on the generated frames, x0 on the conditioning frames (flagged in the mask
    channel); the network predicts v = eps - x0, and its output on conditioning frames is replaced by the target.
    Each sample draws its randomness from its own generator, so it is treated the same on any rank and batch.
    Returns the mean squared error per sample [B] and the number of conditioning frames [B]."""
    B, C, T, H, W = x0.shape
    device = x0.device
    x0 = x0.float()
    sigma = torch.stack([sample_sigma(g) for g in generators])  # [B]
    eps_noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=device) for g in generators])
    n_cond = torch.stack([sample_num_conditional_frames(T, g) for g in generators])  # [B]
    keep_text = torch.stack([torch.rand((), generator=g, device=device) >= caption_dropout for g in generators])
    cond_mask = (torch.arange(T, device=device)[None, :] < n_cond[:, None]).float()  # [B,T]
    cond_mask = cond_mask[:, None, :, None, None].expand(B, 1, T, H, W)  # [B,1,T,H,W]
    s = sigma[:, None, None, None, None]
    x_t = s * eps_noise + (1 - s) * x0
    x_t = cond_mask * x0 + (1 - cond_mask) * x_t
    text_emb = text_emb * keep_text[:, None, None].to(text_emb.dtype)
    target = eps_noise - x0
    v_pred = model(x_t, sigma, text_emb, condition_mask=cond_mask).float()  # [B,C,T,H,W]
    v_pred = cond_mask * target + (1 - cond_mask) * v_pred
    return ((v_pred - target) ** 2).mean(dim=(1, 2, 3, 4)), n_cond


def sample_generators(first, rank, world_size, device):
    """One generator per sample of this (data-parallel) rank's batch, seeded by the sample's place in the global
    stream, dealt round-robin from `first`: a resumed step is exact, a global batch the same on any number of ranks,
    and the ranks of a context-parallel group draw the same."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + first + rank + k * world_size)
            for k in range(batch_size)]


def lr_multiplier(step):
    """The reference's LambdaLinear schedule: linear warm-up f_start -> f_max, then linear decay to f_min."""
    if step < warmup_steps:
        return f_start + (f_max - f_start) * step / warmup_steps
    return f_min + (f_max - f_min) * max(cycle_length - step, 0) / (cycle_length - warmup_steps)


def ema_beta(step):
    """Power EMA (Karras et al. 2024): beta = (1 - 1/(step+1))^(gamma+1), where gamma is the largest real root of
    x^3 + 7x^2 + (16 - s^-2)x + (12 - s^-2) for the relative width s = ema_rate."""
    if step < 1:
        return 0.0
    roots = np.roots([1.0, 7.0, 16 - ema_rate ** -2, 12 - ema_rate ** -2])
    gamma = max(r.real for r in roots if abs(r.imag) < 1e-9)
    return (1 - 1 / (step + 1)) ** (gamma + 1)


# ----------------------------------------------------------------------------------------------------------------
# Setup: processes, inputs, model, data
# ----------------------------------------------------------------------------------------------------------------


def init_distributed():
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is a world of one, whose in-process store needs no
    port (two runs started at once cannot collide). NCCL on GPU, gloo on CPU."""
    alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **alone)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **alone)
    return dist.get_rank(), dist.get_world_size(), device


def on_all_ranks(step, *args):
    """Run a setup step on every rank. Where it fails (SystemExit) on any, rank 0 prints each distinct message once and
    every rank exits with code 1: no message per rank, and no rank left waiting for the others."""
    try:
        result, message = step(*args), None
    except SystemExit as e:
        result, message = None, str(e.code)
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    messages = list(dict.fromkeys(m for m in messages if m is not None))
    if messages:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, once a rank exits: every rank exits with code 1
        rank = dist.get_rank()
        dist.destroy_process_group()  # gloo's threads, left to the exit, can abort it
        raise SystemExit("\n".join(messages) if rank == 0 else 1)
    return result


def context_parallel_group(rank, world_size):
    """Ranks [g*cp, (g+1)*cp) (one node's GPUs) share the samples of group g; FSDP still shards over all ranks."""
    cp = context_parallel_size
    if world_size % cp:
        raise SystemExit(f"context_parallel_size={cp} must divide the number of processes ({world_size})")
    if cp == 1:
        return None
    groups = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(world_size // cp)]
    return groups[rank // cp]


def check_inputs(rank, device):
    """Before the run folder is touched: the base checkpoint fits the DiT and the LoRA targets (on the meta device,
    its weights unread) and the data is readable. Returns the dataset."""
    if base_checkpoint and not Path(base_checkpoint).is_file():
        raise SystemExit(f"base_checkpoint {base_checkpoint} does not exist")
    try:
        check_offload(activation_checkpointing, offload_block_inputs, device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not cache_dir and not (vae_checkpoint and text_encoder):
        raise SystemExit("online encoding needs vae_checkpoint and text_encoder (or set cache_dir)")
    build_model(torch.device("meta"))
    try:
        if cache_dir:
            return CachedDataset(cache_dir)
        return VideoDataset(dataset_dir, num_frames, video_size, seed=seed + rank)
    except DataError as e:
        raise SystemExit(f"{'cache_dir' if cache_dir else 'dataset_dir'}: {e}") from None


def build_model(device):
    """The DiT with base weights loaded strictly (before LoRA is injected), LoRA in fp32, everything else frozen."""
    cfg = dataclasses.replace(DIT_PRESETS[dit_preset], attention_backend=attention_backend)
    torch.manual_seed(seed)  # the random base, and LoRA's A (on any base)
    if base_checkpoint:
        try:
            model = DiT.from_pretrained(base_checkpoint, cfg=cfg, device=device, dtype=torch.float32)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"base_checkpoint {base_checkpoint}: {e.args[0]}") from None
    else:
        with torch.device(device):
            model = DiT(cfg)
    model.activation_checkpointing = activation_checkpointing
    model.offload_block_inputs = offload_block_inputs
    if not use_lora:
        return model.requires_grad_(True)  # full fine-tuning: fp32 master weights, bf16 compute through FSDP
    model.to(getattr(torch, dtype))
    try:
        inject_lora(model, lora_target_modules, rank=lora_rank, alpha=lora_alpha, dtype=torch.float32)
    except ValueError as e:
        raise SystemExit(f"config key 'lora_target_modules': {e}") from None
    mark_only_lora_trainable(model)
    return model


def shard_model(model):
    """FSDP2: every block, then the root. Parameters are gathered in the compute dtype, gradients reduced in fp32."""
    # cast_forward_inputs=False: the timestep embedding, the adaLN-LoRA term and the RoPE table enter each block in
    # fp32 on purpose (the reference's fp32 strategy); FSDP must not round them to bf16
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32, cast_forward_inputs=False)
    for i, block in enumerate(model.blocks):
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def build_data(dataset, rank, world_size, device, start_position):
    """Endless batches of (latents [B,16,T,H,W], text embeddings [B,L,D]) from the cache or encoded online."""
    sampler = CachedSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    sampler.position = start_position
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                                         persistent_workers=num_workers > 0)
    batches = loader if cache_dir else map(online_encoder(dataset, device), loader)
    for batch in batches:
        yield batch["latents"].to(device, non_blocking=True), batch["text_emb"].to(device, non_blocking=True)


def seed_worker(worker_id):
    """Each loader worker draws its own clip windows (VideoDataset keeps a numpy generator)."""
    info = torch.utils.data.get_worker_info()
    if hasattr(info.dataset, "rng"):
        info.dataset.rng = np.random.default_rng([seed, dist.get_rank() // context_parallel_size, worker_id])


def online_encoder(dataset, device):
    """The reference's online path: the VAE encodes every clip; captions are encoded once up front (the frozen
    encoder is deterministic, so this equals encoding them every step)."""
    text = {c: e[0] for c, e in sample.encode_prompts(dataset.captions, text_encoder, device).items()}
    vae = WanVAE.from_pretrained(vae_checkpoint, device=device)  # bf16 on any device, as the reference encodes

    def encode(batch):
        return {"latents": encode_video(vae, batch["video"].movedim(1, -1)),  # uint8 [B,3,T,H,W] -> [B,T,H,W,3]
                "text_emb": torch.stack([text[c] for c in batch["caption"]])}

    return encode


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: DCP, written to a temporary folder, renamed when complete, and only then named in
# latest_checkpoint.txt (replaced atomically). The frozen base is stored as its path and fingerprint (meta.json).
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_state(model, optimizer, scheduler, ema, step):
    """The trained parameters only (no frozen base, no buffers), their EMA, optimizer, schedule and iteration."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": {k: v for k, v in weights.items() if k in trained}, "ema": dict(ema),
            "optim": get_optimizer_state_dict(model, optimizer), "scheduler": scheduler.state_dict(),
            "trainer": {"iteration": step}}


def save_checkpoint(run_dir, model, optimizer, scheduler, ema, step, position, rank, meta):
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"iter_{step:09d}"
    partial = ckpt_root / f"iter_{step:09d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dcp.save(checkpoint_state(model, optimizer, scheduler, ema, step), checkpoint_id=str(partial))
    dist.barrier()
    if rank == 0:
        (partial / "meta.json").write_text(json.dumps({**meta, "iteration": step, "samples": position}, indent=2))
        os.rename(partial, final)  # checked free at the start (claim_run_dir); fails if not
        latest_tmp = ckpt_root / "latest_checkpoint.txt.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, ckpt_root / "latest_checkpoint.txt")
        if keep_last:
            for old in sorted(p for p in checkpoint_folders(run_dir).values() if is_complete(p))[:-keep_last]:
                remove_training_state(old)
    dist.barrier()
    return final


def remove_training_state(path):
    """Files written into an old checkpoint folder since (convert.py's exports) stay, with the meta.json that
    describes them (sample.py reads the adapter's alpha from it)."""
    for f in [path / ".metadata", *path.glob("*.distcp")]:
        f.unlink()
    kept = sorted(f.name for f in path.iterdir() if f.name != "meta.json")
    if kept:
        print(f"kept {path} without its training state: it holds {', '.join(kept)}")
    else:
        (path / "meta.json").unlink()
        path.rmdir()


def checkpoint_folders(run_dir):
    return {int(p.name[5:]): p for p in (run_dir / "checkpoints").glob("iter_?????????")}


def is_complete(path):
    """save_checkpoint renames a folder to iter_<N> only once the DCP files and meta.json are all written."""
    return (path / ".metadata").is_file() and (path / "meta.json").is_file()


def claim_run_dir(run_dir, meta, rank):
    """Rank 0 locks the run folder, writes config.json and picks the checkpoint to resume (None: a fresh run):
    resume=<folder>, else the newest complete one (latest_checkpoint.txt lags a stop between a rename and its
    update). Checked before any heavy work: its adapter is this run's, and going on writes over no checkpoint."""
    if rank != 0:
        return None
    lock_run_dir(run_dir)
    if resume and not is_complete(Path(resume)):
        raise SystemExit(f"resume={resume}: not a checkpoint folder train.py wrote (no .metadata or meta.json)")
    complete = [p for _, p in sorted(checkpoint_folders(run_dir).items()) if is_complete(p)]
    path = Path(resume) if resume else (complete[-1] if complete else None)
    start = 0
    if path is not None:
        saved = json.loads((path / "meta.json").read_text())
        for key in ("dit_preset", "base_fingerprint", "use_lora", "lora_rank", "lora_alpha", "lora_target_modules"):
            if saved.get(key) != meta[key]:
                raise SystemExit(f"checkpoint {path} was made with {key}={saved.get(key)!r}, this run has "
                                 f"{meta[key]!r}")
        start = saved["iteration"]
    later = sorted(p.name for it, p in checkpoint_folders(run_dir).items() if it > start)
    if later:
        raise SystemExit(f"{run_dir / 'checkpoints'} already has {', '.join(later)}, after iteration {start} where "
                         f"this run starts: going on would write over them. Resume into a new run (name=...), "
                         f"or move them away")
    print(json.dumps(meta["config"], indent=2, default=str))
    (run_dir / "config.json").write_text(json.dumps(meta["config"], indent=2, default=str))
    return path


def lock_run_dir(run_dir):
    """One run writes a run folder: its lock, made atomically and removed at exit, names the holder's host and pid;
    one whose process is gone from this host is taken over, any other refuses this run."""
    lock, host = run_dir / "train.lock", socket.gethostname()
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        holder = lock.read_text().split()
        if len(holder) == 2 and holder[0] == host and holder[1].isdigit() and not is_alive(int(holder[1])):
            print(f"{lock}: its run (pid {holder[1]}) is gone; taking the run folder over")
            lock.unlink()
            return lock_run_dir(run_dir)
        raise SystemExit(f"{run_dir} is in use by another train.py run (host and pid: {' '.join(holder)}, in {lock}). "
                         f"Wait for it to end or stop it; if it is gone (killed on another host), delete {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(f"{host} {os.getpid()}\n")

    def release():
        lock.unlink(missing_ok=True)
        if made and not any(run_dir.iterdir()):  # refused before it wrote anything: leave no empty folder
            run_dir.rmdir()

    atexit.register(release)


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def load_checkpoint(path, model, optimizer, scheduler, ema, meta):
    """-> (iteration, samples drawn). Settings a resumed run changes (the lr after a divergence, say) take effect, and
    each change is printed."""
    saved_meta = json.loads((path / "meta.json").read_text())
    state = checkpoint_state(model, optimizer, scheduler, ema, 0)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    step = state["trainer"]["iteration"]
    # The optimizer's hyperparameters come back from the checkpoint; this run's config decides them
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(initial_lr=lr, lr=lr * lr_multiplier(step), betas=betas, eps=eps, weight_decay=weight_decay)
    saved, now = saved_meta["config"], json.loads(json.dumps(meta["config"]))  # tuples and int keys as saved
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k in saved and saved[k] != now[k] and k not in ("max_iter", "resume")]
    changed += [f"{k} {saved_meta[k]} -> {meta[k]}" for k in ("world_size", "global_batch") if saved_meta[k] != meta[k]]
    if dist.get_rank() == 0:
        if changed:
            print(f"resuming {path} with changed settings: {'; '.join(changed)} (the data goes on from sample "
                  f"{saved_meta['samples']} of the stream, as it would have)")
        print(f"resumed from {path} at iteration {step}")
    return step, saved_meta["samples"]


# ----------------------------------------------------------------------------------------------------------------
# Validation: a few short clips sampled with the EMA weights, by every rank (no rank-0-only collectives)
# ----------------------------------------------------------------------------------------------------------------


def load_validation(device):
    """The prompts' embeddings and the VAE, before the DiT: the 7B text encoder never shares the GPU with training."""
    if not val_iter:
        return None
    if not (vae_checkpoint and text_encoder and val_prompts):
        if dist.get_rank() == 0:
            print("validation skipped: set vae_checkpoint, text_encoder and val_prompts to sample validation videos")
        return None
    texts = list(val_prompts) + ([sample.DEFAULT_NEGATIVE_PROMPT] if val_guidance else [])
    return sample.encode_prompts(texts, text_encoder, device), sample.load_vae(vae_checkpoint, device)


def validate(validation, model, ema, step, run_dir, rank, world_size, device):
    """Every rank samples ceil(n / groups) clips with the EMA weights: FSDP needs the same forwards on all ranks, so
    a rank past the end of the list samples a spare one and writes nothing; a context-parallel group's first writes."""
    embeddings, vae = validation
    group, n_groups = rank // context_parallel_size, world_size // context_parallel_size
    writes = rank % context_parallel_size == 0
    per_rank = -(-len(val_prompts) // n_groups)
    swap_ema(model, ema)
    try:
        for k in range(per_rank):
            i = group + k * n_groups
            path = run_dir / "validation" / f"iter_{step:09d}_{i:02d}.mp4" if i < len(val_prompts) and writes else None
            sample.generate_to_file(
                model, path, vae, embeddings[val_prompts[i % len(val_prompts)]],
                embeddings.get(sample.DEFAULT_NEGATIVE_PROMPT), num_frames=val_num_frames, resolution=video_size,
                steps=val_steps, guidance=val_guidance, seed=seed + i, device=device)
    finally:
        swap_ema(model, ema)
    dist.barrier()


@torch.no_grad()
def swap_ema(model, ema):
    for module in model.modules():  # a forward without backward leaves FSDP modules gathered; shard them first
        if isinstance(module, FSDPModule):
            module.reshard()
    params = dict(model.named_parameters())
    for key, shadow in ema.items():
        weight = params[key].detach().clone()
        params[key].copy_(shadow)
        shadow.copy_(weight)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("settings (override in a config file or as key=value), with their valid values:")
        ranges = setting_ranges()
        for key in CONFIG_KEYS:
            print(f"  {key} = {globals()[key]!r}" + (f"  # {ranges[key][1]}" if key in ranges else ""))
        return
    rank, world_size, device = init_distributed()
    config = on_all_ranks(load_config, argv)
    cp_group = on_all_ranks(context_parallel_group, rank, world_size)
    dp_rank, dp_size = rank // context_parallel_size, world_size // context_parallel_size
    run_dir = Path(out_dir) / name
    dataset = on_all_ranks(check_inputs, dp_rank, device)
    meta = {"dit_preset": dit_preset,
            "base_checkpoint": str(Path(base_checkpoint).resolve()) if base_checkpoint else "",
            "base_fingerprint": file_fingerprint(base_checkpoint) if base_checkpoint else f"random:{seed}",
            "use_lora": use_lora, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
            "lora_target_modules": lora_target_modules, "world_size": world_size,
            "global_batch": batch_size * dp_size, "config": config}
    resume_from = [on_all_ranks(claim_run_dir, run_dir, meta, rank)]
    dist.broadcast_object_list(resume_from, src=0)  # rank 0's choice, for every rank
    resume_from = resume_from[0]
    signalled = []  # preempt_signal, once received: stop after this step
    signal.signal(getattr(signal, preempt_signal), lambda signum, frame: signalled.append(signum))

    validation = load_validation(device)
    model = build_model(device)
    model.enable_context_parallel(cp_group)  # each rank's loss counts once: FSDP's mean over all ranks stays right
    model = shard_model(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
    ema = {n: p.detach().clone().float() for n, p in trainable.items()}

    step, position = 0, 0  # position: samples drawn from the global stream, by all ranks together
    if resume_from is not None:
        step, position = load_checkpoint(resume_from, model, optimizer, scheduler, ema, meta)
    if step >= max_iter and rank == 0:
        print(f"iteration {step} has reached max_iter={max_iter}: nothing to train (raise max_iter to go on)")

    data = build_data(dataset, dp_rank, dp_size, device, start_position=position)
    run = None
    if wandb and rank == 0:
        import wandb as wandb_lib  # optional, and heavy to import
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run = wandb_lib.init(project=wandb_project, name=name, config=config, dir=str(run_dir), mode=mode,
                             resume="allow")
    bar = tqdm(total=max_iter, initial=step, disable=rank != 0, dynamic_ncols=True)
    # per mode: the sum of the per-sample losses and the number of samples since the last log
    window = torch.zeros(2, len(sample.MODE_NAMES), device=device, dtype=torch.float64)
    logged_step, logged_time = step, time.perf_counter()
    preempted = False
    while step < max_iter and not preempted:
        latents, text_emb = next(data)
        per_sample, n_cond = flow_matching_loss(model, latents, text_emb,
                                                sample_generators(position, dp_rank, dp_size, device))
        loss = per_sample.mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip or math.inf, foreach=True)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise SystemExit(f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at iteration "
                             f"{step}; nothing was applied. Resume from the latest checkpoint, perhaps with a lower lr")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            weights = [p.detach().float() for p in trainable.values()]
            torch._foreach_lerp_(list(ema.values()), weights, 1 - ema_beta(step))
        step += 1
        position += batch_size * dp_size
        stop = torch.tensor(float(bool(signalled)), device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops after the same step if any was signalled
        preempted = bool(stop.item())

        window[0].index_add_(0, n_cond, per_sample.detach().double())
        window[1].index_add_(0, n_cond, torch.ones_like(per_sample, dtype=torch.float64))
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        grad=f"{grad_norm.item():.3f}", mem=f"{mem:.1f}G")  # rank 0's (the others' bar is off)
        bar.update(1)
        if step % logging_iter == 0 or step == max_iter:
            now = time.perf_counter()
            elapsed, steps = now - logged_time, step - logged_step
            dist.all_reduce(window)
            sums, counts = window.tolist()
            log = {"loss": sum(sums) / sum(counts)}
            log.update({f"loss/{sample.MODE_NAMES[n]}": s / c for n, (s, c) in enumerate(zip(sums, counts)) if c})
            log.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), sec_per_iter=elapsed / steps,
                       samples_per_sec=sum(counts) / context_parallel_size / elapsed)  # each group counted cp times
            if device.type == "cuda":
                log["max_memory_gib"] = mem
            if rank == 0:
                bar.write(f"iter {step}: " + ", ".join(f"{k} {v:.6g}" for k, v in log.items()))
            if run is not None:
                run.log(log, step=step)
            window.zero_()
            logged_step, logged_time = step, now
        if step % save_iter == 0 or step == max_iter or preempted:
            path = save_checkpoint(run_dir, model, optimizer, scheduler, ema, step, position, rank, meta)
            if rank == 0:
                bar.write(f"saved {path}")
        if validation is not None and step % val_iter == 0 and not preempted:
            validate(validation, model, ema, step, run_dir, rank, world_size, device)
    bar.close()
    if run is not None:
        run.finish()
    dist.destroy_process_group()
    if preempted and step < max_iter:
        if rank == 0:
            print(f"{preempt_signal}: stopped after iteration {step} and saved it; the same command resumes from it",
                  file=sys.stderr)
        raise SystemExit(128 + getattr(signal, preempt_signal))  # the shell's code for a process ended by it


if __name__ == "__main__":
    main(sys.argv[1:])
