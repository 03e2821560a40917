"""Sample videos from a Cosmos-Predict2.5 DiT: Text2World, Image2World and Video2World.

    python sample.py --ckpt model_ema_bf16.pt --vae tokenizer.pth --text_encoder Cosmos-Reason1-7B
                     --prompt "A video of sks teal robot." [--image in.png | --video in.mp4] -o out.mp4
    python sample.py -i a.json b.jsonl -o outputs/ --ckpt ...                # sample files, the reference's formats
    python sample.py --prompt "..." --num_frames 229 -o long.mp4 ...         # a long video, in autoregressive chunks
    torchrun --nproc_per_node=8 sample.py --prompt "..." -o out.mp4 ...      # one video over 8 GPUs
    torchrun --nproc_per_node=8 sample.py -i prompts.json -o outputs/ ...    # the samples spread over the GPUs

As the reference does it: the text encoder embeds the prompts and is freed; an input image, or the last 5 frames
of an input video, become 1 or 2 clean latent frames that stay fixed; from seeded Gaussian noise, flow UniPC
(35 steps, shift 5) integrates the rectified-flow ODE from sigma ~1 to 0, the DiT giving the velocity v = eps - x0
with classifier-free guidance; the VAE decodes the latents into an H.264 mp4 at 16 fps. Several processes share
a video by context parallelism (its latent frames split over them) or take whole samples, and --cfg_parallel
splits the two guidance passes between them; a seed gives the same video either way.
"""

import argparse
import gc
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from convert import check_adapter_base, parse_lora_arg, read_adapter
from lora import inject_lora, load_lora_state_dict, lora_modules, merge_lora, set_adapter_scale
from model import (DIT_PRESETS, DiT, TextEncoder, TextEncoderConfig, WanVAE, file_fingerprint, infer_dit_config,
                   load_checkpoint_file, read_tensor_file, wan_vae_config)
from prep_data import (dtype_for, frames_to_tensor, read_image, read_video, resize_frames, training_size, video_info,
                       write_safetensors, write_video)

# The reference's default negative prompt (cosmos_predict2/config.py), used by the unconditional CFG branch.
DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky movements, "
    "low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, fake elements, "
    "unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. Overall, the video is of "
    "poor quality."
)
DEFAULT_RESOLUTION = (704, 1280)  # H, W of the 720p models
DEFAULT_NUM_FRAMES = 93  # pixel frames = 24 latent frames: the model's length
NUM_TRAIN_TIMESTEPS = 1000
VAE_TIME_FACTOR, VAE_SPACE_FACTOR, LATENT_CHANNELS = 4, 8, 16
MODE_NAMES = ("text2world", "image2world", "video2world")  # index: the clean latent frames the mode conditions on
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# ----------------------------------------------------------------------------------------------------------------
# 1. The noise schedule
# ----------------------------------------------------------------------------------------------------------------


def flow_schedule(steps=35, shift=5.0):
    """The reference's inference schedule (FlowUniPCMultistepScheduler.set_timesteps).

    Returns `sigmas` [steps+1] float32, the solver's noise levels from ~1 down to exactly 0, and `net_sigmas`
    [steps] float32, the noise level the network is told at each step. The latter is the truncated integer timestep
    int(1000 * sigma) times the network's timestep scale 0.001, as in the reference (diffusers passes sigma itself).
    """
    # The 1,000-step training grid sigma = 1 - linspace(1, 1/1000, 1000), held in float32, spans [0, 0.999];
    # inference spaces its steps evenly over that span, then shifts them towards the noisy end.
    sigma_max, sigma_min = float(np.float32(1 - 1 / NUM_TRAIN_TIMESTEPS)), 0.0
    sig = np.linspace(sigma_max, sigma_min, steps + 1)[:-1]  # float64, like the reference
    sig = shift * sig / (1 + (shift - 1) * sig)
    timesteps = torch.from_numpy((sig * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    sigmas = torch.from_numpy(np.append(sig, 0.0).astype(np.float32))
    return sigmas, timesteps * 0.001  # int64 * python float -> float32, as the reference network computes it


# ----------------------------------------------------------------------------------------------------------------
# 2. Samplers: integrate dx/dsigma = v(x, sigma) from sigmas[0] to sigmas[-1] = 0
# ----------------------------------------------------------------------------------------------------------------
# velocity_fn(x_t, sigma_for_net) -> v, with x_t = (1 - sigma) x0 + sigma eps and v = eps - x0, so the network's
# estimate of the clean sample (its "data prediction") is x0 = x_t - sigma v.


def exp_step(x_s, x0, sigma_s, sigma_t):
    """The exponential-integrator step from sigma_s to sigma_t with a fixed data prediction x0 (= DDIM):
    x_t = alpha_t x0 + sigma_t eps_hat, eps_hat = (x_s - alpha_s x0) / sigma_s. Exact when x0 does not change."""
    alpha_s, alpha_t = 1 - sigma_s, 1 - sigma_t
    return (sigma_t / sigma_s) * x_s + (alpha_t - sigma_t * alpha_s / sigma_s) * x0


def unic_coefficients(h, r):
    """Weights (rho_prev, rho_new) of UniC-2 with B(h) = e^h - 1 ('bh2'): they solve [[1, 1], [r, 1]] rho = b
    with b_k from the phi-functions of -h, k = 1, 2 (UniPC, Zhao et al. 2023, Alg. 1)."""
    hh = -h  # data prediction integrates in -lambda
    phi1 = math.expm1(hh)
    b1 = (phi1 / hh - 1) / phi1
    b2 = 2 * ((phi1 / hh - 1) / hh - 0.5) / phi1
    rho_prev = (b1 - b2) / (1 - r)
    return rho_prev, b1 - rho_prev


@torch.no_grad()
def unipc_sample(velocity_fn, x_T, sigmas, net_sigmas, progress=None):
    """Flow-matching UniPC as the reference uses it: multistep, order 2, B(h) = e^h - 1, on the data prediction.

    At step i the network is evaluated at x_i; its data prediction m_i first corrects x_i (UniC, using the step
    that produced x_i) and then predicts x_{i+1} (UniP) from m_i and m_{i-1}. The order is 1 at the first step
    (no history) and at the last step (to sigma = 0, where the update returns m_i itself), 2 in between.
    `progress`: a progress bar's label (None: no bar)."""
    sig = [float(s) for s in sigmas]
    lam = [math.log((1 - s) / s) if 0 < s < 1 else None for s in sig]  # log-SNR log(alpha / sigma)
    N = len(sig) - 1
    x = x_T.float()
    x_prev = m_prev = m_prev2 = None  # x_{i-1} after correction, m_{i-1}, m_{i-2}
    order_prev = 0  # order of the predictor that produced x_i
    for i in tqdm(range(N), desc=progress, disable=not progress):
        m = x - sig[i] * velocity_fn(x, float(net_sigmas[i]))  # data prediction at x_i

        if i > 0:  # UniC: redo the step sigma_{i-1} -> sigma_i, now also using m_i
            if order_prev == 1:
                correction = 0.5 * (m - m_prev)
            else:
                h = lam[i] - lam[i - 1]
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_prev, rho_new = unic_coefficients(h, r)
                correction = rho_prev * (m_prev2 - m_prev) / r + rho_new * (m - m_prev)
            x = exp_step(x_prev, m_prev + correction, sig[i - 1], sig[i])

        order = min(2, i + 1, N - i)
        if order == 1:  # UniP-1 (DDIM)
            x_next = exp_step(x, m, sig[i], sig[i + 1])
        else:  # UniP-2: a finite difference of the last two data predictions, weight 1/2
            h = lam[i + 1] - lam[i]
            r = (lam[i - 1] - lam[i]) / h
            x_next = exp_step(x, m + 0.5 * (m_prev - m) / r, sig[i], sig[i + 1])

        x_prev, m_prev2, m_prev, order_prev = x, m_prev, m, order
        x = x_next
    return x


@torch.no_grad()
def euler_sample(velocity_fn, x_T, sigmas, net_sigmas, progress=None):
    """First-order Euler: x <- x + (sigma_{i+1} - sigma_i) v. Simple, but needs more steps than UniPC."""
    sig = [float(s) for s in sigmas]
    x = x_T.float()
    for i in tqdm(range(len(sig) - 1), desc=progress, disable=not progress):
        x = x + (sig[i + 1] - sig[i]) * velocity_fn(x, float(net_sigmas[i]))
    return x


SAMPLERS = {"unipc": unipc_sample, "euler": euler_sample}

# ----------------------------------------------------------------------------------------------------------------
# 3. The velocity: conditioning frames and classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------


def make_velocity_fn(net, noise, cond_latent, num_cond_frames, text_emb, neg_text_emb, guidance, cfg_group=None):
    """velocity_fn(x_t, sigma) for the samplers: the reference's Video2World denoiser (frame replacement).

    net(x, sigma, crossattn_emb, condition_mask) is the DiT; noise [B,16,T,H,W] is x_T; cond_latent [B,16,T,H,W]
    holds the clean latent in its first `num_cond_frames` frames. There the network sees the clean latent (and a
    mask channel of ones), and the velocity noise - cond_latent carries them along the straight line from x_T to
    the clean latent. Guidance v = v_cond + g (v_cond - v_uncond) runs both branches in one batched forward (g = 0:
    the conditional one alone), or with `cfg_group` (a pair of processes) one each, swapping their velocities."""
    B, _, T, H, W = noise.shape
    is_cond = (torch.arange(T, device=noise.device) < num_cond_frames).view(1, 1, T, 1, 1)  # [1,1,T,1,1]
    cond_mask = is_cond.to(noise.dtype).expand(B, 1, T, H, W)  # [B,1,T,H,W]
    cond_velocity = noise - cond_latent
    n_pass = 1 if guidance == 0 else 2
    crossattn_emb = text_emb if n_pass == 1 else torch.cat([text_emb, neg_text_emb])  # [n_pass*B,L,D]
    n_local = n_pass  # passes this process runs
    if cfg_group is not None:
        if n_pass == 1:
            raise ValueError("guidance parallelism needs guidance > 0: with g = 0 there is no second pass to share")
        crossattn_emb, n_local = crossattn_emb.chunk(2)[dist.get_rank(cfg_group)], 1  # [B,L,D]
    mask_in = cond_mask.repeat(n_local, 1, 1, 1, 1)

    def velocity_fn(x_t, sigma):
        x_in = torch.where(is_cond, cond_latent, x_t).repeat(n_local, 1, 1, 1, 1)  # [n_local*B,16,T,H,W]
        sigma_in = torch.full((n_local * B,), sigma, dtype=torch.float32, device=x_t.device)
        v = net(x_in, sigma_in, crossattn_emb, condition_mask=mask_in).float()
        if cfg_group is not None:  # swap velocities: both processes get [v_cond; v_uncond]
            both = [torch.empty_like(v), torch.empty_like(v)]
            dist.all_gather(both, v.contiguous(), group=cfg_group)
            v = torch.cat(both)  # [2B,16,T,H,W]
        if n_pass == 2:
            v_cond, v_uncond = v.chunk(2)
            v = v_cond + guidance * (v_cond - v_uncond)
        return torch.where(is_cond, cond_velocity, v)

    return velocity_fn


# ----------------------------------------------------------------------------------------------------------------
# 4. Generation: a sample, a long video in chunks, a validation video
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    name: str
    prompt: str
    input_path: Path | None  # image or video; None for Text2World
    num_cond_frames: int  # latent conditioning frames: 0, 1 or 2
    negative_prompt: str
    seed: int
    guidance: float
    resolution: tuple  # (H, W) in pixels
    num_frames: int  # pixel frames: 1 + 4k in one pass, any number in chunks
    steps: int = 35
    chunk_size: int | None = None  # frames per chunk of a long video (generate_chunks); None: one pass


def initial_noise(seed, shape):
    """The reference's x_T: numpy's RandomState stream on the host in float32, so a seed means the same noise on
    any device and any number of processes."""
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


@torch.no_grad()
def generate(net, vae, sample, condition_frames, text_emb, neg_text_emb, device, steps=35, shift=5.0,
             sampler="unipc", progress=None, cfg_group=None):
    """One sample -> (video uint8 [T,H,W,3], latents [1,16,t,h,w] fp32). condition_frames: uint8 [k,H,W,3]
    from read_condition_frames (None for Text2World); text_emb, neg_text_emb: [1,L,D] (neg None when g = 0);
    cfg_group: the guidance pair of make_velocity_fn (None: both passes here); progress: a progress bar's label."""
    H, W = sample.resolution
    shape = (1, LATENT_CHANNELS, 1 + (sample.num_frames - 1) // VAE_TIME_FACTOR, H // VAE_SPACE_FACTOR,
             W // VAE_SPACE_FACTOR)
    noise = initial_noise(sample.seed, shape).to(device)
    cond_latent = torch.zeros_like(noise)
    n = sample.num_cond_frames
    if n > 0:
        video = frames_to_tensor(torch.from_numpy(condition_frames).to(device), dtype_for(device))  # [3,k,H,W]
        cond_latent[:, :, :n] = vae.encode(video[None]).float()
    neg_text_emb = None if neg_text_emb is None else neg_text_emb.to(device)
    velocity_fn = make_velocity_fn(net, noise, cond_latent, n, text_emb.to(device), neg_text_emb, sample.guidance,
                                   cfg_group)
    latents = SAMPLERS[sampler](velocity_fn, noise, *flow_schedule(steps, shift), progress=progress)
    video = vae.decode(latents)[0].float()  # [3,T,H,W], about [-1,1]; one latent frame (4 pixel frames) at a time
    # the reference's conversion: to [0,1], clamp, x255, truncate
    video = ((video + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(1, 2, 3, 0)  # [T,H,W,3]
    return video.cpu(), latents.cpu()


@torch.no_grad()
def generate_chunks(net, vae, sample, condition_frames, text_emb, neg_text_emb, device, steps=35, shift=5.0,
                    sampler="unipc", progress=None, cfg_group=None, model_frames=DEFAULT_NUM_FRAMES):
    """A long video in autoregressive chunks, as the reference's generate_autoregressive_from_batch does it ->
    (video uint8 [num_frames,H,W,3], latents [chunks,16,t,h,w]). Chunk k holds the frames [k s, k s + chunk_size)
    (stride s = chunk_size - 1), cut at num_frames; generate makes it at the model's length `model_frames` with
    seed + k, and it keeps its first frames. Chunk 0 is conditioned like the sample; each later one like
    Image2World on its first frame, the last frame of the chunk before, and drops that frame."""
    size, total = sample.chunk_size, sample.num_frames
    starts = range(0, max(total - size, 0) + size - 1, size - 1)  # until a chunk reaches the last frame
    video, latents = [], []
    for k, start in enumerate(starts):
        chunk = replace(sample, seed=sample.seed + k, num_frames=model_frames,
                        num_cond_frames=1 if k else sample.num_cond_frames)
        cond = video[-1][-1:].numpy() if k else condition_frames
        label = progress and f"{progress}, chunk {k + 1}/{len(starts)}"
        frames, z = generate(net, vae, chunk, cond, text_emb, neg_text_emb, device, steps, shift, sampler, label,
                             cfg_group)
        end = min(start + size, total)
        video.append(frames[1 if k else 0:end - start])  # a later chunk's first frame is the chunk before's last
        latents.append(z)
    return torch.cat(video), torch.cat(latents)


def generate_to_file(net, path, vae, text_emb, neg_text_emb=None, num_frames=DEFAULT_NUM_FRAMES,
                     resolution=DEFAULT_RESOLUTION, steps=35, guidance=7.0, seed=1, device="cuda", fps=16):
    """Text2World with the networks in memory (train.py's validation videos): text_emb, neg_text_emb [1,L,D] from
    encode_prompts -> the video uint8 [T,H,W,3], written to the mp4 `path` unless it is None (under FSDP every
    rank runs the same forwards, so a rank short of prompts samples a spare one and drops it)."""
    guidance = check_value(guidance, *SETTINGS["guidance"][1:], "guidance")
    if guidance and neg_text_emb is None:
        raise ValueError("guidance > 0 needs neg_text_emb (the negative prompt's embedding)")
    resolution = parse_resolution(",".join(map(str, resolution)), "resolution")
    s = Sample("validation", "", None, 0, "", seed, guidance, resolution, check_num_frames(num_frames, "num_frames"))
    video, _ = generate(net, vae, s, None, text_emb, neg_text_emb if guidance else None, torch.device(device), steps)
    if path is not None:
        write_video(path, video.numpy(), fps=fps)
    return video


# ----------------------------------------------------------------------------------------------------------------
# 5. Inputs: samples from the command line or sample files, checked before anything heavy runs
# ----------------------------------------------------------------------------------------------------------------

# The checked settings: name -> (where a sample file does not set it: the option that does, or the value itself;
# None: an option alone), type, test, the test in words. The reference conditions later chunks on chunk_overlap
# latent frames: only with 1 are they frames that the chunk before generated.
SETTINGS = {
    "negative_prompt": ("--negative_prompt", str, None, None),
    "seed": ("--seed", int, lambda n: 0 <= n < 2**32, "from 0 to 4294967295"),  # numpy's RandomState
    "guidance": ("--guidance", float, lambda g: g >= 0, ">= 0"),
    "resolution": ("--resolution", str, None, None),  # "H,W", or "none": the command line's
    "num_output_frames": ("--num_frames", int, lambda n: n >= 1, ">= 1"),  # the reference makes 93, whatever it says
    "num_steps": ("--steps", int, lambda n: n >= 1, ">= 1"),
    "enable_autoregressive": (False, bool, None, None),  # on by itself beyond DEFAULT_NUM_FRAMES
    # >= 5: a video's conditioning frames fit in chunk 0
    "chunk_size": ("--chunk_size", int, lambda n: 5 <= n <= DEFAULT_NUM_FRAMES, f"from 5 to {DEFAULT_NUM_FRAMES}"),
    "chunk_overlap": (1, int, lambda n: n == 1, "1"),
    "shift": (None, float, lambda x: 0 < x < math.inf, "> 0"),  # 0: sigma 0 everywhere; < 0: sigmas outside (0, 1)
    "fps": (None, int, lambda n: n >= 1, ">= 1"),
}
FILE_SETTINGS = [field for field, (option, *_) in SETTINGS.items() if option is not None]
SAMPLE_FIELDS = ("name", "inference_type", "prompt", "prompt_path", "input_path", *FILE_SETTINGS)
# the older batch format: a file of these fields, `samples` mapping names to BATCH_SAMPLE_FIELDS
BATCH_FIELDS = ("inference_type", "samples", "negative_prompt", "seed", "guidance", "resolution", "num_output_frames")
BATCH_SAMPLE_FIELDS = ("prompt", "prompt_path", "input_path")
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def check_value(value, kind, test, words, source):
    """`value` if it is of `kind` (an int is a number too, a bool nothing but true or false) and passes `test`."""
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ValueError(f"{source} must be {TYPE_NAMES[kind]}, got {value!r}")
    if test is not None and not test(value):
        raise ValueError(f"{source} must be {words}, got {value!r}")
    return value


def option_type(field):
    """The argparse type of SETTINGS[field]: argparse refuses a bad value naming the option (exit status 2)."""
    def parse(text):
        value = SETTINGS[field][1](text)  # no number at all: argparse says "invalid int value: 'x'"
        try:
            return check_value(value, *SETTINGS[field][1:], "")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).lstrip()) from None

    parse.__name__ = SETTINGS[field][1].__name__
    return parse


def parse_resolution(text, source):
    try:  # 'H,W', multiples of 16: the VAE's 8 times the DiT's patch 2
        return training_size(str(text))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{source}: {e}") from None


def check_num_frames(n, source):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (n - 1) % VAE_TIME_FACTOR:
        raise ValueError(f"{source}: the number of frames in one pass must be 1 + 4k (e.g. 93, 77, 1), got {n!r}; "
                         f"beyond {DEFAULT_NUM_FRAMES}, or with enable_autoregressive, any number, in chunks")
    return n


def check_fields(obj, known, where):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with fields {', '.join(known)}")
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(known)}")


def parse_sample(fields, args, folder, where):
    """One sample's fields (SAMPLE_FIELDS, paths relative to `folder`) -> Sample, checked. The settings it leaves
    out come from the command line, `args`."""
    check_fields(fields, SAMPLE_FIELDS, where)
    for field in ("name", "inference_type"):
        if field not in fields:
            raise ValueError(f"{where}: missing required field {field!r}")
    name, mode = fields["name"], fields["inference_type"]
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{where}: the name {name!r} becomes the file name <-o>/<name>.mp4, so it must be a plain "
                         f"file name (no folders)")
    if mode not in MODE_NAMES:
        raise ValueError(f"{where}: inference_type must be one of {', '.join(MODE_NAMES)}, got {mode!r}")
    value, source = {}, {}
    for field in FILE_SETTINGS:
        option = SETTINGS[field][0]
        if field in fields:
            source[field] = f"{where}: {field}"
            value[field] = check_value(fields[field], *SETTINGS[field][1:], source[field])
        else:  # the command line's (argparse checked it), or the value itself
            source[field] = option
            value[field] = getattr(args, option[2:]) if isinstance(option, str) else option
    prompt = fields.get("prompt", "")
    if ("prompt" in fields) == ("prompt_path" in fields) or not isinstance(prompt, str):
        raise ValueError(f"{where}: needs a string 'prompt' or a 'prompt_path' (one of them)")
    if "prompt_path" in fields:
        prompt_path = folder / str(fields["prompt_path"])
        if not prompt_path.is_file():
            raise FileNotFoundError(f"{where}: prompt_path {prompt_path} does not exist")
        prompt = prompt_path.read_text().strip()
    n = MODE_NAMES.index(mode)
    if bool(n) != ("input_path" in fields):
        raise ValueError(f"{where}: {mode} {'needs an' if n else 'takes no'} input_path")
    input_path = folder / str(fields["input_path"]) if n else None
    if n and not input_path.is_file():
        raise FileNotFoundError(f"{where}: input file {input_path} does not exist")
    if n == 2 and input_path.suffix.lower() in IMAGE_EXTENSIONS:  # an image makes 1 latent frame only
        raise ValueError(f"{where}: video2world needs a video (5 frames make its 2 conditioning latent frames), "
                         f"got the image {input_path}; use image2world for an image")
    frames = value["num_output_frames"]
    chunked = value["enable_autoregressive"] or frames > DEFAULT_NUM_FRAMES
    if not chunked:
        check_num_frames(frames, source["num_output_frames"])
    resolution = args.resolution if value["resolution"] == "none" else value["resolution"]
    return Sample(name, prompt, input_path, n, value["negative_prompt"], value["seed"], value["guidance"],
                  parse_resolution(resolution, source["resolution"]), frames, value["num_steps"],
                  value["chunk_size"] if chunked else None)


def entry_samples(text, suffix, where):
    """[(where, fields)] of one entry of a sample file: its sample, or a batch's in the older format."""
    def unique_keys(pairs):  # json keeps the last of repeated keys without a word
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} appear(s) more than once in one object")
        return dict(pairs)

    try:
        if suffix in (".yaml", ".yml"):
            import yaml  # optional: only .yaml files need it

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text, object_pairs_hook=unique_keys)
    except ImportError:
        raise ValueError(f"{where}: reading .yaml needs PyYAML (pip install pyyaml), or write it as .json") from None
    except Exception as e:  # json's and yaml's errors
        raise ValueError(f"cannot read the sample file {where}: {e}") from None
    if not isinstance(obj, dict) or "samples" not in obj:
        return [(where, obj)]
    check_fields(obj, BATCH_FIELDS, where)
    if not isinstance(obj["samples"], dict) or not obj["samples"]:
        raise ValueError(f"{where}: samples must be a non-empty object mapping names to samples")
    entries, shared = [], {k: v for k, v in obj.items() if k != "samples"}
    for name, fields in obj["samples"].items():
        check_fields(fields, BATCH_SAMPLE_FIELDS, f"{where}: sample {name!r}")
        if "prompt_path" in fields:  # that format's prompt file wins over an inline prompt
            fields = {k: v for k, v in fields.items() if k != "prompt"}
        entries.append((f"{where}: sample {name!r}", {**shared, "name": name, **fields}))
    return entries


def read_sample_files(paths, args):
    """The samples of the -i files (paths in a file relative to its folder, names unique over all) -> (samples,
    errors): a bad entry (a file or a .jsonl line) raises, or with args.keep_going is reported and skipped."""
    samples, errors = [], []
    for path in map(Path, paths):
        if path.suffix not in (".json", ".jsonl", ".yaml", ".yml") or not path.is_file():
            raise ValueError(f"-i {path}: expected an existing .json, .jsonl or .yaml file")
        text = path.read_text()
        lines = [(f"{path} line {i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        for where, text in lines if path.suffix == ".jsonl" else [(str(path), text)]:
            try:
                found = [parse_sample(f, args, path.parent, w) for w, f in entry_samples(text, path.suffix, where)]
                taken = {s.name for s in samples} & {s.name for s in found}
                if taken:
                    raise ValueError(f"{where}: sample name(s) {', '.join(sorted(taken))} used before (names make "
                                     f"the file names)")
                samples += found
            except (ValueError, OSError) as e:
                if not args.keep_going:
                    raise
                errors.append(str(e))
    return samples, errors


def read_condition_frames(sample):
    """The pixels behind the conditioning latent frames, uint8 [1 + 4(n-1), H, W, 3]: the image, or the last
    1 + 4(n-1) frames of the video, scaled to cover (H, W) and center-cropped. The reference pads them to the whole
    clip and encodes it all; the VAE is causal, so the first n latent frames, the only ones used, depend on these
    pixels alone: encoding them alone gives the same latents for a fraction of the work."""
    n, path = sample.num_cond_frames, sample.input_path
    needed = 1 + VAE_TIME_FACTOR * (n - 1)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        frames = read_image(path)  # [1,h,w,3]
    else:
        total = video_info(path).num_frames
        if total < needed:
            raise ValueError(f"sample {sample.name!r}: video {path} has {total} frame(s); "
                             f"{MODE_NAMES[n]} needs at least {needed}")
        frames, _ = read_video(path, start=total - needed, num_frames=needed)  # [k,h,w,3]
    return resize_frames(frames, sample.resolution, mode="crop")  # [k,H,W,3]


# ----------------------------------------------------------------------------------------------------------------
# 6. Networks: the text embeddings, the DiT with its adapters, the VAE
# ----------------------------------------------------------------------------------------------------------------


def encode_prompts(texts, text_encoder, device):
    """{text: embedding [1,512,100352] on the CPU} for each distinct text, by the text encoder in the folder
    `text_encoder`, which is freed before returning: the DiT and the VAE never share the device with it."""
    texts = list(dict.fromkeys(texts))
    try:
        encoder = TextEncoder.from_pretrained(text_encoder, device=device, dtype=dtype_for(device))
    except KeyError as e:  # a folder whose tensors do not fit its config
        raise ValueError(f"--text_encoder {text_encoder}: {e.args[0]}") from None
    embeddings = {t: encoder.encode([t]).cpu() for t in tqdm(texts, desc="text encoder", disable=len(texts) < 2)}
    del encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeddings


def text_embeddings(samples, text_encoder, prompt_embeds, device):
    """{text: embedding [1,L,D] on the CPU} for every prompt and every negative prompt that guidance uses: by the
    text encoder, or (one sample) from the file `prompt_embeds` with 'prompt' and, for g > 0, 'negative_prompt'."""
    if prompt_embeds is None:
        texts = [t for s in samples for t in [s.prompt] + ([s.negative_prompt] if s.guidance else [])]
        return encode_prompts(texts, text_encoder, device)
    (sample,) = samples
    tensors = read_tensor_file(prompt_embeds)
    wanted = {"prompt": sample.prompt} | ({"negative_prompt": sample.negative_prompt} if sample.guidance else {})
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ValueError(f"{prompt_embeds}: no tensor {', '.join(missing)} (it has {', '.join(tensors) or 'none'})")
    return {text: tensors[k].reshape(1, *tensors[k].shape[-2:]) for k, text in wanted.items()}


def check_text_width(net, text_encoder, prompt_embeds):
    """The text embeddings are as wide as the DiT's cross-attention input (28 layers x 3584 = 100352 for
    Cosmos-Reason1-7B): by the encoder's config.json or the embedding file."""
    if prompt_embeds is not None:
        widths = {k: v.shape[-1] for k, v in read_tensor_file(prompt_embeds).items()}
        source = f"--prompt_embeds {prompt_embeds}"
    else:
        try:
            cfg = TextEncoderConfig.from_hf_config(Path(text_encoder) / "config.json")
        except KeyError as e:  # a field missing from config.json
            raise ValueError(e.args[0]) from None
        widths = {"output": cfg.num_layers * cfg.hidden_size}
        source = f"--text_encoder {text_encoder} ({cfg.num_layers} layers x {cfg.hidden_size})"
    expected = net.cfg.crossattn_proj_in_channels
    wrong = {k: w for k, w in widths.items() if w != expected}
    if wrong:
        raise ValueError(f"{source}: embeddings of width {', '.join(f'{k} {w}' for k, w in wrong.items())}, "
                         f"but the DiT's cross-attention takes {expected}")


def read_config_file(path):
    """A training config's settings {key: value}: a .py file of plain assignments (run, as train.py runs it) or a
    run's config.json. The caller checks the keys and values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix not in (".py", ".json"):
        raise ValueError(f"config file {path}: expected a .py file of assignments or a run's config.json")
    try:
        if path.suffix == ".json":
            settings = json.loads(path.read_text())
        else:
            settings = {}
            exec(compile(path.read_text(), str(path), "exec"), settings)
    except Exception as e:  # bad JSON, or whatever the file's code raises
        raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"config file {path}: expected an object of settings, got {type(settings).__name__}")
    return {k: v for k, v in settings.items() if not k.startswith("__")}


# The training config's settings that shape the DiT, as in SETTINGS (type, test, words); the rest is train.py's.
DIT_SETTINGS = {"dit_preset": (str, lambda name: name in DIT_PRESETS, f"one of {', '.join(DIT_PRESETS)}"),
                "use_lora": (bool, None, None), "lora_rank": (int, lambda r: r >= 1, ">= 1"),
                "lora_alpha": (float, None, None), "lora_target_modules": (str, None, None)}


def load_dit(ckpt, loras=(), config=None, force=False):
    """The DiT of an official-layout checkpoint (a LoRA run's adapter included) plus the `--lora` adapters
    (path, scale), on the CPU in the checkpoint's dtype. The file is memory-mapped, so this is cheap: every shape
    is checked here, before any heavy work, and the weights are read when the model moves to the device.
    A training config `config` (like the reference's --experiment) gives the DIT_SETTINGS it sets; the others come
    from the checkpoint: the preset from its shapes, the adapters from its keys, alpha from checkpoint_alpha."""
    state_dict = load_checkpoint_file(ckpt, prefix="net.")
    settings = read_config_file(config) if config is not None else {}
    conf = {k: check_value(settings[k], *DIT_SETTINGS[k], f"--config {config}: {k}") for k in DIT_SETTINGS
            if k in settings}
    with torch.device("meta"):
        net = DiT(DIT_PRESETS[conf["dit_preset"]] if "dit_preset" in conf else infer_dit_config(state_dict, ckpt))
    add_checkpoint_adapters(net, state_dict, ckpt, conf, config)
    try:
        net.load_official_state_dict(state_dict, source=ckpt)  # also checks what the config sets against the file
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    for i, (path, scale) in enumerate(loras):
        adapter = read_adapter(path)  # ours, diffusers' or ComfyUI's layout, with its rank and alpha
        if holds_adapter(state_dict, adapter):
            raise ValueError(f"--lora {path} is the adapter that --ckpt {ckpt} already holds (a LoRA run's model "
                             f"file carries it): it would act twice; drop --lora, or give the base model as --ckpt")
        check_adapter_base(adapter, path, f"--ckpt {ckpt}", file_fingerprint(ckpt), force)
        try:
            inject_lora(net, list(adapter.modules), adapter.rank, adapter.alpha, adapter_name=f"lora{i}")
            load_lora_state_dict(net, adapter.state_dict(f"lora{i}"), f"lora{i}")
        except (KeyError, ValueError) as e:
            raise ValueError(f"--lora {path}: {e.args[0]} (an adapter trained for another model size?)") from None
        set_adapter_scale(net, f"lora{i}", scale)
    return net.eval()


def add_checkpoint_adapters(net, state_dict, ckpt, conf, config):
    """Inject the adapters of a LoRA run's model file, as its keys name them, with the rank, alpha and targets that
    the config's settings `conf` give, else its shapes and checkpoint_alpha."""
    ranks = {}  # adapter name -> {module: rank}
    for key, value in state_dict.items():
        if ".lora_A." in key:
            module, rest = key.split(".lora_A.")
            ranks.setdefault(rest.removesuffix(".weight"), {})[module] = value.shape[0]
    has_lora = any(".lora_" in k for k in state_dict)
    lora_keys = [k for k in ("lora_rank", "lora_alpha", "lora_target_modules") if k in conf]
    use_lora = conf.get("use_lora", has_lora or bool(lora_keys))  # LoRA settings alone describe a LoRA run
    if use_lora != has_lora:
        said = f"use_lora={use_lora}" if "use_lora" in conf else ", ".join(f"{k}={conf[k]!r}" for k in lora_keys)
        raise ValueError(f"--config {config} sets {said}, but --ckpt {ckpt} {'holds' if has_lora else 'holds no'} "
                         f"LoRA weights: give the model file exported from that run, or leave --config out (the DiT "
                         f"is then read from the checkpoint's shapes)")
    for name, modules in ranks.items():
        if len(set(modules.values())) != 1:
            raise ValueError(f"adapter {name!r} has several ranks {sorted(set(modules.values()))}")
        rank = conf.get("lora_rank", next(iter(modules.values())))
        alpha = conf["lora_alpha"] if "lora_alpha" in conf else checkpoint_alpha(ckpt, rank)
        try:
            inject_lora(net, conf.get("lora_target_modules", list(modules)), rank, alpha, adapter_name=name)
        except ValueError as e:  # no module of that name
            raise ValueError(f"adapter {name!r}: {e}") from None


def checkpoint_alpha(ckpt, rank):
    """The alpha of the adapter in a LoRA run's model file, which cannot hold it: from the meta.json train.py wrote
    beside it (convert.py exports into the checkpoint folder), else alpha = rank (the reference's scale 1), said."""
    meta = Path(ckpt).parent / "meta.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text())
        if recorded.get("lora_rank") == rank and "lora_alpha" in recorded:
            return recorded["lora_alpha"]
    print(f"{ckpt}: the alpha of its rank-{rank} adapter is not recorded beside it (no meta.json from train.py, or "
          f"one of another rank); taking alpha = rank (scale 1). If the run used another alpha, give a config that "
          f"sets lora_alpha with --config")
    return rank


def holds_adapter(state_dict, adapter):
    """Whether a checkpoint's own LoRA weights, under some adapter name, are this adapter's (to within bf16
    rounding, as an fp32 export of the same run is)."""
    def same(key, weight):
        own = state_dict.get(key)
        return own is not None and own.shape == weight.shape and torch.allclose(own.float(), weight.float(),
                                                                                rtol=1e-2, atol=1e-6)

    for tail in {k.split(".lora_A.")[1] for k in state_dict if ".lora_A." in k}:  # "<adapter name>.weight"
        if all(same(f"{module}.lora_A.{tail}", A) and same(f"{module}.lora_B.{tail}", B)
               for module, (A, B) in adapter.modules.items()):
            return True
    return False


def dit_to_device(net, device, merge=False):
    """The DiT on the device in the inference dtype; `merge` folds every adapter into the base weights (W += scale
    B A: one matmul per layer instead of three)."""
    net = net.to(device=device, dtype=dtype_for(device))
    for name in dict.fromkeys(n for m in lora_modules(net).values() for n in m.lora_A) if merge else []:
        merge_lora(net, name)
    return net


def load_vae(path, device):
    return WanVAE.from_pretrained(path, device=device, dtype=dtype_for(device))


# ----------------------------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to generate")
    what.add_argument("--prompt", help="the text prompt (one sample; or use -i)")
    src = what.add_mutually_exclusive_group()
    src.add_argument("--image", help="Image2World: condition on this image (1 latent frame); given a video, on its "
                                     "last frame, as the reference does")
    src.add_argument("--video", help="Video2World: condition on the last 5 frames of this video (2 latent frames)")
    what.add_argument("-i", "--input", nargs="+", metavar="FILE", help="sample files in the reference's formats: "
                      ".json (a sample, or the older batch), .jsonl (a sample a line), .yaml")
    what.add_argument("-o", "--output", required=True, help="output .mp4 (one sample) or folder (-i: <name>.mp4)")
    what.add_argument("--keep_going", action=argparse.BooleanOptionalAction, default=True,
                      help="-i: report a bad entry and go on with the rest, exit status 1 at the end (default: on)")
    what.add_argument("--overwrite", action="store_true", help="replace existing output files")
    what.add_argument("--save_latents", action="store_true",
                      help="also write the final latents (.safetensors; a long video's: one row per chunk)")
    nets = p.add_argument_group("weights")
    nets.add_argument("--ckpt", required=True, help="DiT checkpoint in the official layout (e.g. model_ema_bf16.pt)")
    nets.add_argument("--lora", action="append", default=[], type=parse_lora_arg, metavar="FILE[:SCALE]",
                      help="an extra adapter (ours, diffusers' or ComfyUI's) scaled by SCALE (default 1); repeatable")
    nets.add_argument("--force", action="store_true", help="use a --lora adapter trained on another base than --ckpt")
    nets.add_argument("--merge", action="store_true", help="fold the adapters into the base weights (faster)")
    nets.add_argument("--config", help="a training config (configs/*.py, or a run's config.json) giving the DiT preset "
                                       "and LoRA settings it sets; the rest is read from the checkpoint")
    nets.add_argument("--vae", required=True, help="Wan2.1 VAE weights (tokenizer.pth)")
    nets.add_argument("--text_encoder", help="Cosmos-Reason1 folder (Hugging Face layout)")
    nets.add_argument("--prompt_embeds", help="cached embeddings instead of the text encoder: a file with tensors "
                                              "'prompt' and 'negative_prompt' [512,100352]")
    how = p.add_argument_group("sampling (a sample file's own fields take precedence)")
    how.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="default: the reference's")
    how.add_argument("--guidance", type=option_type("guidance"), default=7.0,
                     help="g in v = v_cond + g (v_cond - v_uncond); 0 runs no unconditional pass (default: 7)")
    how.add_argument("--seed", type=option_type("seed"), default=1,
                     help="of the initial noise, numpy's RandomState (default: %(default)s)")
    how.add_argument("--resolution", default=",".join(map(str, DEFAULT_RESOLUTION)),
                     help="H,W in pixels, multiples of 16 (default: %(default)s)")
    how.add_argument("--num_frames", type=option_type("num_output_frames"), default=DEFAULT_NUM_FRAMES,
                     help="pixel frames, 1 + 4k (default: %(default)s); more: in autoregressive chunks")
    how.add_argument("--chunk_size", type=option_type("chunk_size"), default=77,
                     help="frames per chunk of a long video (default: %(default)s)")
    how.add_argument("--steps", type=option_type("num_steps"), default=35, help="sampler steps (default: %(default)s)")
    how.add_argument("--shift", type=option_type("shift"), default=5.0,
                     help="schedule shift towards high noise (default: %(default)s)")
    how.add_argument("--sampler", choices=list(SAMPLERS), default="unipc", help="flow UniPC (the reference's) or Euler")
    how.add_argument("--fps", type=option_type("fps"), default=16, help="frame rate of the mp4 (default: %(default)s)")
    how.add_argument("--context_parallel_size", type=int, help="processes sharing each video (their latent frames "
                     "split); default: 1 when the samples divide evenly over the processes, else all")
    how.add_argument("--cfg_parallel", action="store_true", help="the conditional and the unconditional pass on the "
                     "two halves of each group (default group size then: 2 when the samples divide evenly, else all)")
    return p


def default_context_parallel_size(num_samples, world):
    """Whole samples per process when they divide evenly (no communication), else all processes on each video in
    turn: either way no process waits for another."""
    return 1 if num_samples % world == 0 else world


def check_context_parallel(cp, cfg_parallel, world, num_heads, samples):
    """The processes split into groups of `cp`; the heads and every sample's latent frames over the processes of
    one forward pass (a group, or half of one with guidance parallelism): all must divide."""
    if cfg_parallel and world % 2:
        raise ValueError(f"--cfg_parallel runs the conditional and the unconditional pass on two halves of the "
                         f"processes: it needs an even number of them (torchrun --nproc_per_node=2 or more), "
                         f"got {world}")
    if cp < 1 or world % cp:
        raise ValueError(f"--context_parallel_size {cp} must divide the number of processes ({world})")
    if cfg_parallel and (cp % 2 or not all(s.guidance for s in samples)):
        raise ValueError(f"--cfg_parallel runs the conditional and the unconditional pass on the two halves of each "
                         f"group of {cp} process(es): it needs an even --context_parallel_size and guidance > 0")
    cp = cp // 2 if cfg_parallel else cp  # processes sharing one forward pass
    if num_heads % cp:
        raise ValueError(f"context parallelism over {cp} processes splits the DiT's {num_heads} attention heads "
                         f"evenly: choose a --context_parallel_size that divides {num_heads} (1: a sample per process)")
    for s in samples:
        frames = DEFAULT_NUM_FRAMES if s.chunk_size else s.num_frames  # a long video's chunks have the model's length
        latent_frames = 1 + (frames - 1) // VAE_TIME_FACTOR
        if latent_frames % cp:
            raise ValueError(f"sample {s.name!r}: {frames} frames make {latent_frames} latent frames, which "
                             f"context parallelism cannot split evenly over {cp} processes; choose num_frames = 1 + 4k "
                             f"with (1 + k) a multiple of {cp}, or another --context_parallel_size")


def context_parallel_groups(cp, cfg_parallel, rank, world, device):
    """(the DiT's context-parallel group, the guidance pair) of this process, None where unused. Processes
    [g cp, (g+1) cp) share the videos of group g; with cfg_parallel, process i of its first half (the conditional
    pass) swaps velocities with process i of the second (the unconditional one)."""
    if cp == 1:
        return None, None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    n = cp // 2 if cfg_parallel else cp  # processes sharing one forward pass
    dit_group = cfg_group = None
    for start in range(0, world, n):  # every process creates every group, in the same order
        group = dist.new_group(list(range(start, start + n))) if n > 1 else None
        dit_group = group if start <= rank < start + n else dit_group
    for start in range(0, world, cp) if cfg_parallel else []:
        for i in range(n):
            group = dist.new_group([start + i, start + n + i])
            cfg_group = group if rank in (start + i, start + n + i) else cfg_group
    return dit_group, cfg_group


def samples_from_args(args):
    """(the samples to generate, the errors of the bad entries of -i files skipped by --keep_going), checked
    (files exist, values valid) before anything heavy runs."""
    if args.input:
        if args.prompt or args.image or args.video or args.prompt_embeds:
            raise ValueError("-i takes the prompts and inputs from its files: drop --prompt/--image/--video/"
                             "--prompt_embeds")
        return read_sample_files(args.input, args)
    if not args.prompt and not args.prompt_embeds:
        raise ValueError("give --prompt (or --prompt_embeds), or sample files with -i")
    if args.prompt and args.prompt_embeds:
        raise ValueError("--prompt_embeds replaces the prompt's text: give --prompt or --prompt_embeds, not both")
    fields = {"name": Path(args.output).stem, "inference_type": "text2world", "prompt": args.prompt or ""}
    if args.image or args.video:
        fields.update(inference_type=MODE_NAMES[1 if args.image else 2], input_path=args.image or args.video)
    return [parse_sample(fields, args, Path(), "--image" if args.image else "--video")], []


def output_paths(args, samples):
    """{sample name: mp4 path}; existing files are an error unless --overwrite."""
    out = Path(args.output)
    if args.input and out.suffix == ".mp4":
        raise ValueError(f"-o {out}: a batch writes one mp4 per sample into a folder, not to one file")
    if not args.input and out.suffix != ".mp4":
        raise ValueError(f"-o {out}: one sample is written to an .mp4 file")
    paths = {s.name: out / f"{s.name}.mp4" for s in samples} if args.input else {samples[0].name: out}
    latents = [p.with_suffix(".safetensors") for p in paths.values()] if args.save_latents else []
    existing = [str(p) for p in [*paths.values(), *latents] if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"output exists (pass --overwrite to replace): {', '.join(existing)}")
    return paths


def main(argv=None):
    args = build_parser().parse_args(argv)
    if (args.text_encoder is None) == (args.prompt_embeds is None):
        raise ValueError("give exactly one of --text_encoder and --prompt_embeds")
    samples, failed = samples_from_args(args)
    frames = {}
    for s in samples:  # every rank decodes every input, so that all skip the same bad ones
        try:
            frames[s.name] = read_condition_frames(s) if s.num_cond_frames else None
        except (ValueError, OSError) as e:
            if not args.keep_going:
                raise
            failed.append(f"sample {s.name!r}: {e}")
    samples = [s for s in samples if s.name in frames]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not samples:  # every entry was bad
        raise ValueError("; ".join(failed) or "the -i files hold no sample")
    for error in failed if rank == 0 else []:
        print(f"sample.py: skipped: {error}", file=sys.stderr)
    if args.prompt_embeds and len(samples) != 1:
        raise ValueError("--prompt_embeds holds one prompt's embeddings; a batch needs --text_encoder")
    paths = output_paths(args, samples)
    for flag, f in [("--ckpt", args.ckpt), ("--vae", args.vae)]:
        if Path(f).is_dir():
            hint = f"; a training checkpoint folder is exported first: python convert.py {f} writes model_ema_bf16.pt"
            raise IsADirectoryError(f"{flag} {f} is a folder, not a file" + (hint if flag == "--ckpt" else ""))
        if not Path(f).is_file():
            raise FileNotFoundError(f"{flag} {f} does not exist")
    if args.text_encoder and not Path(args.text_encoder).is_dir():
        raise FileNotFoundError(f"--text_encoder {args.text_encoder}: no such folder")

    # Everything that can be wrong with the inputs shows up here, on every rank, before any heavy work: the
    # conditioning images and videos were decoded, the DiT checkpoint and the adapters are opened memory-mapped
    # and their shapes checked, and so are the VAE file and the width of the text embeddings.
    net = load_dit(args.ckpt, args.lora, args.config, args.force)
    check_text_width(net, args.text_encoder, args.prompt_embeds)
    pair = 2 if args.cfg_parallel else 1  # processes per sample at least
    cp = args.context_parallel_size or pair * default_context_parallel_size(len(samples), max(world // pair, 1))
    check_context_parallel(cp, args.cfg_parallel, world, net.cfg.num_heads, samples)
    mine = samples[rank // cp::world // cp]  # group g (processes g*cp ... g*cp + cp-1): samples g, g + world/cp, ...
    wan_vae_config(read_tensor_file(args.vae, "Wan VAE checkpoint"), args.vae)

    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dit_group, cfg_group = context_parallel_groups(cp, args.cfg_parallel, rank, world, device)
    if not mine:  # more processes than samples: nothing to do here
        if dist.is_initialized():
            dist.destroy_process_group()
        return failed
    # the text encoder runs first and is freed; then the DiT's weights go to the device, then the VAE
    embeddings = text_embeddings(mine, args.text_encoder, args.prompt_embeds, device)
    net = dit_to_device(net, device, args.merge)
    net.enable_context_parallel(dit_group)  # the processes of a group run the same sampler; the DiT splits the work
    vae = load_vae(args.vae, device)
    for s in mine:
        neg = embeddings[s.negative_prompt] if s.guidance else None
        video, latents = (generate_chunks if s.chunk_size else generate)(
            net, vae, s, frames[s.name], embeddings[s.prompt], neg, device, s.steps, args.shift, args.sampler,
            progress=s.name if rank == 0 else None, cfg_group=cfg_group)
        if rank % cp:  # the group's first process writes
            continue
        write_video(paths[s.name], video.numpy(), fps=args.fps)
        if args.save_latents:
            write_safetensors({"latents": latents.contiguous()}, paths[s.name].with_suffix(".safetensors"))
        print(f"[rank {rank}] {s.name}: {MODE_NAMES[s.num_cond_frames]}, {len(video)} frames "
              f"{s.resolution[0]}x{s.resolution[1]}, seed {s.seed} -> {paths[s.name]}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return failed  # the errors of the entries of -i files skipped by --keep_going


if __name__ == "__main__":
    try:
        failed = main()
    except (ValueError, OSError) as e:  # bad input (a missing or unreadable file, a wrong value): no traceback
        raise SystemExit(f"sample.py: error: {e}") from None
    if failed:
        raise SystemExit(f"sample.py: {len(failed)} bad entr{'y' if len(failed) == 1 else 'ies'} skipped (above)")
