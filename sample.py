"""Sample videos from a Cosmos-Predict2.5 DiT: Text2World, Image2World and Video2World.

    python sample.py --ckpt model_ema_bf16.pt --vae tokenizer.pth --text_encoder Cosmos-Reason1-7B
                     --prompt "A video of sks teal robot." [--image in.png | --video in.mp4] -o out.mp4
    python sample.py -i a.json b.jsonl -o outputs/ --ckpt ...                # sample files, the reference's formats
    python sample.py --prompt "..." --num_frames 229 -o long.mp4 ...         # a long video, in autoregressive chunks
    torchrun --nproc_per_node=8 sample.py --prompt "..." -o out.mp4 ...      # one video over 8 GPUs
    torchrun --nproc_per_node=8 sample.py -i prompts.json -o outputs/ ...    # the samples spread over the GPUs

Several processes (torchrun) share each video by context parallelism (its latent frames split over them, the
attention heads split inside self-attention: model.py, DiT.enable_context_parallel), or each take whole samples:
`--context_parallel_size` sets how many share a video; by default one process per sample when the samples divide
evenly over the processes, else all processes on every video. `--cfg_parallel` also splits guidance: the
conditional and the unconditional pass run on the two halves of each group. Either way a seed gives the same video.

What happens, in the reference's way:
1. the prompts and the negative prompt go through the text encoder, which is then freed;
2. an input image (Image2World) or the last 5 frames of an input video (Video2World) are resized, center-cropped
   and VAE-encoded into 1 or 2 clean latent frames, which stay fixed while the rest is generated;
3. starting from seeded Gaussian noise, the rectified-flow ODE is integrated from sigma ~1 to 0 with flow UniPC
   (35 steps, shift 5), the DiT giving the velocity v = eps - x0 with classifier-free guidance;
4. the VAE decodes the latents and the video is written as an H.264 mp4 at 16 fps.
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

from model import read_tensor_file, wan_vae_config
from prep_data import dtype_for

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
DEFAULT_NUM_FRAMES = 93  # pixel frames = 24 latent frames
NUM_TRAIN_TIMESTEPS = 1000
VAE_TIME_FACTOR, VAE_SPACE_FACTOR, LATENT_CHANNELS = 4, 8, 16
# conditioning latent frames per mode; each latent frame beyond the first covers 4 pixel frames
INFERENCE_TYPES = {"text2world": 0, "image2world": 1, "video2world": 2}
MODE_NAMES = {n: name for name, n in INFERENCE_TYPES.items()}
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


def log_snr(sigma):
    """lambda = log(alpha / sigma) on the flow path, alpha = 1 - sigma."""
    return math.log((1 - sigma) / sigma)


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
    `progress`: the label of a progress bar, None for none.
    """
    sig = [float(s) for s in sigmas]
    lam = [log_snr(s) if 0 < s < 1 else None for s in sig]
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
    """velocity_fn(x_t, sigma) for the samplers, the reference's Video2World denoiser (frame replacement).

    net(x, sigma, crossattn_emb, condition_mask) is the DiT. noise [B,16,T,H,W] is the initial noise x_T;
    cond_latent [B,16,T,H,W] holds the clean latent in its first `num_cond_frames` frames (the rest is unused).
    On those frames the network sees the clean latent (and a mask channel of ones), and its velocity is replaced
    by noise - cond_latent, the velocity of the straight line from x_T to the clean latent, so the sampler carries
    them along that line. Guidance: v = v_cond + g (v_cond - v_uncond) (the reference's form: g = 7 weighs the
    conditional branch by 8), the unconditional branch using the negative prompt and the same conditioning frames,
    both in one batched forward; g = 0 runs the conditional pass alone. With `cfg_group`, a process group of two
    (guidance parallelism), its first process runs the conditional pass, the second the unconditional one, and
    they swap their velocities.
    """
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


def initial_noise(seed, shape):
    """The reference's x_T: numpy's RandomState stream on the host in float32, so a seed means the same noise on
    any device and any number of processes."""
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# 4. Inputs: samples from the command line or sample files, checked before anything heavy runs
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


# A sample's settings: field -> (the command-line option that sets it where a file does not, or the value itself;
# type; least and greatest value). The reference conditions later chunks on chunk_overlap latent frames: only with
# 1 are they frames that the chunk before generated.
SETTINGS = {
    "negative_prompt": ("--negative_prompt", str, None, None),
    "seed": ("--seed", int, 0, 2**32 - 1),  # numpy's RandomState
    "guidance": ("--guidance", float, 0, None),
    "resolution": ("--resolution", str, None, None),  # "H,W", or "none": the command line's
    "num_output_frames": ("--num_frames", int, 1, None),  # the reference makes 93 in one pass, whatever it says
    "num_steps": ("--steps", int, 1, None),
    "enable_autoregressive": (False, bool, None, None),  # on by itself beyond DEFAULT_NUM_FRAMES
    "chunk_size": ("--chunk_size", int, 5, DEFAULT_NUM_FRAMES),  # >= 5: a video's conditioning frames fit chunk 0
    "chunk_overlap": (1, int, 1, 1),
}
SAMPLE_FIELDS = ("name", "inference_type", "prompt", "prompt_path", "input_path", *SETTINGS)
# the older batch format: a file of these fields, `samples` mapping names to BATCH_SAMPLE_FIELDS
BATCH_FIELDS = ("inference_type", "samples", "negative_prompt", "seed", "guidance", "resolution", "num_output_frames")
BATCH_SAMPLE_FIELDS = ("prompt", "prompt_path", "input_path")
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def parse_resolution(text, source):
    """'H,W' (multiples of 16: VAE factor 8 times the DiT patch 2) -> (H, W)."""
    parts = str(text).split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{source}: resolution must be 'H,W' in pixels, got {text!r}")
    H, W = (int(p) for p in parts)
    if H <= 0 or W <= 0 or H % 16 or W % 16:
        raise ValueError(f"{source}: resolution {H},{W} must be positive multiples of 16")
    return H, W


def check_num_frames(n, source):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (n - 1) % VAE_TIME_FACTOR:
        raise ValueError(f"{source}: the number of frames in one pass must be 1 + 4k (e.g. 93, 77, 1), got {n!r}; "
                         f"beyond {DEFAULT_NUM_FRAMES}, or with enable_autoregressive, any number, in chunks")
    return n


def check_guidance(g, source):
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
        raise ValueError(f"{source}: guidance must be a number >= 0, got {g!r}")
    return g


def check_input(path, num_cond_frames, source):
    """The conditioning input exists and suits the mode (an image gives 1 latent frame only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: input file {path} does not exist")
    if num_cond_frames == 2 and path.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"{source}: video2world needs a video (5 frames make its 2 conditioning latent frames), "
                         f"got the image {path}; use image2world for an image")
    return path


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
    if not isinstance(mode, str) or mode not in INFERENCE_TYPES:
        raise ValueError(f"{where}: inference_type must be one of {', '.join(INFERENCE_TYPES)}, got {mode!r}")
    value, source = {}, {}
    for field, (option, kind, least, most) in SETTINGS.items():
        source[field] = f"{where}: {field}" if field in fields else option
        v = value[field] = fields.get(field, getattr(args, option[2:]) if isinstance(option, str) else option)
        if isinstance(v, bool) != (kind is bool) or not isinstance(v, (int, float) if kind is float else kind):
            raise ValueError(f"{source[field]} must be {TYPE_NAMES[kind]}, got {v!r}")
        if least is not None and v < least or most is not None and v > most:
            bounds = f">= {least}" if most is None else f"from {least} to {most}"
            raise ValueError(f"{source[field]} must be {bounds}, got {v!r}")
    prompt = fields.get("prompt", "")
    if ("prompt" in fields) == ("prompt_path" in fields) or not isinstance(prompt, str):
        raise ValueError(f"{where}: needs a string 'prompt' or a 'prompt_path' (one of them)")
    if "prompt_path" in fields:
        prompt_path = folder / str(fields["prompt_path"])
        if not prompt_path.is_file():
            raise FileNotFoundError(f"{where}: prompt_path {prompt_path} does not exist")
        prompt = prompt_path.read_text().strip()
    n = INFERENCE_TYPES[mode]
    if bool(n) != ("input_path" in fields):
        raise ValueError(f"{where}: {mode} {'needs an' if n else 'takes no'} input_path")
    frames = value["num_output_frames"]
    chunked = value["enable_autoregressive"] or frames > DEFAULT_NUM_FRAMES
    if not chunked:
        check_num_frames(frames, source["num_output_frames"])
    resolution = args.resolution if value["resolution"] == "none" else value["resolution"]
    return Sample(name, prompt, check_input(folder / str(fields["input_path"]), n, where) if n else None, n,
                  value["negative_prompt"], value["seed"], value["guidance"],
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
    """The samples of the files given to -i -> (samples, errors). A .json file holds a sample or a batch in the older
    format, a .jsonl file a sample a line, a .yaml file a sample. Paths in a file are relative to its folder; names
    are unique over all files. A bad entry (a file or a line) raises, or with args.keep_going is reported in
    `errors` and skipped."""
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
    1 + 4(n-1) frames of the video, scaled to cover (H, W) and center-cropped (spec §3.4).

    The reference pads these to the full clip (zeros after an image, the last frame repeated after a video) and
    encodes all of it; the VAE is causal, so the first n latent frames, the only ones used, depend on these pixels
    alone and encoding them alone gives the same latents for a fraction of the work.
    """
    from prep_data import read_image, read_video, resize_frames, video_info

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
# 5. Networks
# ----------------------------------------------------------------------------------------------------------------


def encode_prompts(texts, text_encoder, device):
    """{text: embedding [1,512,100352] on the CPU} for each distinct text, from the text encoder folder
    `text_encoder`; the encoder is freed before returning, so the DiT and the VAE never share the GPU with it."""
    from model import TextEncoder

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
    """{text: embedding [1,512,100352] on the CPU} for every prompt, and every negative prompt that guidance uses.
    With `prompt_embeds` (one sample) they come from that file: a .safetensors or .pt holding the tensors
    'prompt' and, when guidance > 0, 'negative_prompt'. Otherwise the text encoder computes them."""
    if prompt_embeds is None:
        return encode_prompts([t for s in samples for t in [s.prompt] + ([s.negative_prompt] if s.guidance else [])],
                              text_encoder, device)
    (sample,) = samples
    tensors = read_tensor_file(prompt_embeds)
    wanted = {"prompt": sample.prompt} | ({"negative_prompt": sample.negative_prompt} if sample.guidance else {})
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ValueError(f"{prompt_embeds}: no tensor {', '.join(missing)} (it has {', '.join(tensors) or 'none'})")
    return {text: tensors[k].reshape(1, *tensors[k].shape[-2:]) for k, text in wanted.items()}


def check_text_width(net, text_encoder, prompt_embeds):
    """The text embeddings must be as wide as the DiT's cross-attention input (28 layers x 3584 = 100352 for
    Cosmos-Reason1-7B); checked from the encoder's config.json or the embedding file, before anything runs."""
    from model import TextEncoderConfig

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


def parse_lora_spec(spec):
    """--lora's argparse type: 'file[:scale]' -> (Path, scale), by convert.py's parser (imported only here, as
    convert imports train)."""
    from convert import parse_lora_arg

    return parse_lora_arg(spec)


def checkpoint_alpha(ckpt, rank):
    """The alpha of the adapter in a LoRA run's model file, which cannot hold it: from the meta.json train.py wrote
    beside it (convert.py exports into the checkpoint folder), else alpha = rank (the reference's scale 1), said."""
    meta = Path(ckpt).parent / "meta.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text())
        if recorded.get("lora_rank") == rank and "lora_alpha" in recorded:
            return recorded["lora_alpha"]
    print(f"{ckpt}: the alpha of its rank-{rank} adapter is not recorded beside it (no meta.json from train.py, or "
          f"one of another rank); taking alpha = rank (scale 1). If the run used another alpha, pass its config "
          f"with --config")
    return rank


def add_adapters(net, state_dict, ckpt):
    """Inject the adapters whose `lora_A` weights appear in `state_dict` (rank from their shape; alpha from
    checkpoint_alpha) into exactly the modules named there. Returns the adapter names."""
    from lora import inject_lora

    modules = {}  # adapter name -> {module: rank}
    for key, value in state_dict.items():
        if ".lora_A." in key:
            module, rest = key.split(".lora_A.")
            modules.setdefault(rest.removesuffix(".weight"), {})[module] = value.shape[0]
    for name, ranks in modules.items():
        if len(set(ranks.values())) != 1:
            raise ValueError(f"adapter {name!r} has several ranks {sorted(set(ranks.values()))}")
        rank = next(iter(ranks.values()))
        try:
            inject_lora(net, list(ranks), rank=rank, alpha=checkpoint_alpha(ckpt, rank), adapter_name=name)
        except ValueError as e:  # no module of that name
            raise ValueError(f"adapter {name!r}: {e}") from None
    return list(modules)


def holds_adapter(state_dict, adapter):
    """Whether a checkpoint's own LoRA weights are this adapter's (to within bf16 rounding, as an fp32 export of the
    same run is): each module's A and B against the checkpoint's under any adapter name."""
    def same(a, b):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-6)

    for module, (A, B) in adapter.modules.items():
        tails = {k.split(".lora_A.")[1] for k in state_dict if k.startswith(module + ".lora_A.")}  # "<name>.weight"
        if not any(same(state_dict[f"{module}.lora_A.{n}"], A) and same(state_dict[f"{module}.lora_B.{n}"], B)
                   for n in tails):
            return False
    return bool(adapter.modules)


def load_dit(ckpt, loras=(), config=None, force=False):
    """The DiT of an official-layout checkpoint (a LoRA run's adapters included) plus the `--lora` adapters
    (path, scale), each trained on this checkpoint (its recorded base fingerprint; `force` takes another with a
    warning), on the CPU in the checkpoint's dtype. The file is memory-mapped, so this is cheap: every shape
    is checked here, before any heavy work, and the weights are read when the model moves to the GPU.
    The preset and the checkpoint's adapter come from its shapes (alpha: checkpoint_alpha), or from a training config
    file (`dit_preset`, `use_lora`, `lora_rank`, `lora_alpha`, `lora_target_modules`), like the reference's
    --experiment."""
    from convert import check_adapter_base, file_fingerprint, read_adapter
    from lora import inject_lora, load_lora_state_dict, set_adapter_scale
    from model import DIT_PRESETS, DiT, infer_dit_config, load_checkpoint_file

    state_dict = load_checkpoint_file(ckpt, prefix="net.")
    if config is None:
        with torch.device("meta"):
            net = DiT(infer_dit_config(state_dict, ckpt))
        add_adapters(net, state_dict, ckpt)
    else:
        import train

        conf = train.load_config([str(config)])
        with torch.device("meta"):
            net = DiT(DIT_PRESETS[conf["dit_preset"]])
        has_lora = any(".lora_" in k for k in state_dict)
        if conf["use_lora"] != has_lora:
            raise ValueError(f"--config {config} sets use_lora={conf['use_lora']}, but --ckpt {ckpt} "
                             f"{'holds' if has_lora else 'holds no'} LoRA weights: give the model file exported from "
                             f"that run, or leave --config out (the DiT is then read from the checkpoint's shapes)")
        if conf["use_lora"]:
            inject_lora(net, conf["lora_target_modules"], rank=conf["lora_rank"], alpha=conf["lora_alpha"])
    try:
        net.load_official_state_dict(state_dict, source=ckpt)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    for i, (path, scale) in enumerate(loras):
        name = f"lora{i}"
        adapter = read_adapter(path)  # ours, diffusers' or ComfyUI's layout, with its rank and alpha
        if holds_adapter(state_dict, adapter):
            raise ValueError(f"--lora {path} is the adapter that --ckpt {ckpt} already holds (a LoRA run's model "
                             f"file carries it): it would act twice; drop --lora, or give the base model as --ckpt")
        check_adapter_base(adapter, path, f"--ckpt {ckpt}", file_fingerprint(ckpt), force)
        try:
            inject_lora(net, list(adapter.modules), rank=adapter.rank, alpha=adapter.alpha, adapter_name=name)
            load_lora_state_dict(net, adapter.state_dict(name), name)
        except (KeyError, ValueError) as e:
            raise ValueError(f"--lora {path}: {e.args[0]} (an adapter trained for another model size?)") from None
        set_adapter_scale(net, name, scale)
    return net.eval()


def dit_to_device(net, device, merge=False):
    """Move the DiT to the device in the inference dtype; `merge` folds every adapter into the base weights
    (W += scale B A: one matmul per layer instead of three)."""
    from lora import lora_modules, merge_lora

    net = net.to(device=device, dtype=dtype_for(device))
    if merge:
        for name in dict.fromkeys(n for m in lora_modules(net).values() for n in m.lora_A):
            merge_lora(net, name)
    return net


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


def load_vae(path, device):
    """The Wan VAE of `path` on `device`, in the inference dtype."""
    from model import WanVAE

    return WanVAE.from_pretrained(path, device=device, dtype=dtype_for(device))


# ----------------------------------------------------------------------------------------------------------------
# 6. Generation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(net, vae, sample, condition_frames, text_emb, neg_text_emb, device, steps=35, shift=5.0,
             sampler="unipc", progress=None, cfg_group=None):
    """One sample -> (video uint8 [T,H,W,3], latents [1,16,t,h,w] fp32). condition_frames: uint8 [k,H,W,3]
    from read_condition_frames (None for Text2World); text_emb, neg_text_emb: [1,L,D] (neg None when g = 0);
    cfg_group: the guidance pair of make_velocity_fn (None: both passes here); progress: a progress bar's label."""
    from prep_data import frames_to_tensor

    H, W = sample.resolution
    shape = (1, LATENT_CHANNELS, 1 + (sample.num_frames - 1) // VAE_TIME_FACTOR, H // VAE_SPACE_FACTOR,
             W // VAE_SPACE_FACTOR)
    noise = initial_noise(sample.seed, shape).to(device)
    cond_latent = torch.zeros_like(noise)
    n = sample.num_cond_frames
    if n > 0:
        video = frames_to_tensor(torch.from_numpy(condition_frames).to(device), dtype_for(device))  # [3,k,H,W]
        cond_latent[:, :, :n] = vae.encode(video[None]).float()
    velocity_fn = make_velocity_fn(net, noise, cond_latent, n, text_emb.to(device),
                                   None if neg_text_emb is None else neg_text_emb.to(device), sample.guidance,
                                   cfg_group)
    sigmas, net_sigmas = flow_schedule(steps, shift)
    latents = SAMPLERS[sampler](velocity_fn, noise, sigmas, net_sigmas, progress=progress)
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
    """Text2World with the networks already in memory (train.py's validation videos): `vae` from load_vae,
    text_emb / neg_text_emb [1,L,D] from encode_prompts (neg_text_emb needed when guidance > 0). Writes an mp4 to
    `path` and returns the video uint8 [T,H,W,3]. path=None samples without writing: under FSDP every rank must
    run the same number of forwards, so a rank short of prompts samples a spare one and drops it."""
    from prep_data import write_video

    device = torch.device(device)
    guidance = check_guidance(guidance, "guidance")
    if guidance and neg_text_emb is None:
        raise ValueError("guidance > 0 needs neg_text_emb (the negative prompt's embedding)")
    resolution = parse_resolution(",".join(str(n) for n in resolution), "resolution")
    s = Sample("validation", "", None, 0, "", seed, guidance, resolution, check_num_frames(num_frames, "num_frames"))
    video, _ = generate(net, vae, s, None, text_emb, neg_text_emb if guidance else None, device, steps)
    if path is not None:
        write_video(path, video.numpy(), fps=fps)
    return video


# ----------------------------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------------------------


def checked(kind, ok, expected):
    """An argparse type: kind(text), refused unless ok(value), so argparse names the option (exit code 2)."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


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
    nets.add_argument("--lora", action="append", default=[], type=parse_lora_spec, metavar="FILE[:SCALE]",
                      help="an extra adapter (ours, diffusers' or ComfyUI's), its output scaled by SCALE (default 1); "
                           "repeatable")
    nets.add_argument("--force", action="store_true", help="use a --lora adapter trained on another base than --ckpt")
    nets.add_argument("--merge", action="store_true", help="fold the adapters into the base weights (faster)")
    nets.add_argument("--config", help="the training config (e.g. configs/nemo_lora.py) giving the DiT preset and "
                                       "the checkpoint's LoRA settings; default: read from the checkpoint's shapes")
    nets.add_argument("--vae", required=True, help="Wan2.1 VAE weights (tokenizer.pth)")
    nets.add_argument("--text_encoder", help="Cosmos-Reason1 folder (Hugging Face layout)")
    nets.add_argument("--prompt_embeds", help="cached embeddings instead of the text encoder: a file with tensors "
                                              "'prompt' and 'negative_prompt' [512,100352]")
    how = p.add_argument_group("sampling (a sample file's own fields take precedence)")
    how.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT,
                     help="the unconditional branch's prompt (default: the reference's)")
    how.add_argument("--guidance", type=float, default=7.0,
                     help="g in v = v_cond + g (v_cond - v_uncond); 0 runs no unconditional pass (default: 7)")
    how.add_argument("--seed", type=checked(int, lambda n: 0 <= n < 2**32, "an integer in [0, 2**32)"), default=1,
                     help="seed of the initial noise, numpy RandomState (default: 1)")
    how.add_argument("--resolution", default=f"{DEFAULT_RESOLUTION[0]},{DEFAULT_RESOLUTION[1]}",
                     help="H,W in pixels, multiples of 16 (default: %(default)s)")
    how.add_argument("--num_frames", type=int, default=DEFAULT_NUM_FRAMES,
                     help="pixel frames, 1 + 4k (default: %(default)s); more: in autoregressive chunks")
    how.add_argument("--chunk_size", type=int, default=77, help="frames per chunk of a long video (default: 77)")
    how.add_argument("--steps", type=checked(int, lambda n: n >= 1, "an integer >= 1"), default=35,
                     help="sampler steps (default: %(default)s)")
    how.add_argument("--shift", type=checked(float, lambda x: 0 < x < math.inf, "a number > 0"), default=5.0,
                     help="schedule shift towards high noise (default: %(default)s)")
    how.add_argument("--sampler", choices=list(SAMPLERS), default="unipc", help="flow UniPC (the reference's) or Euler")
    how.add_argument("--fps", type=checked(int, lambda n: n >= 1, "an integer >= 1"), default=16,
                     help="frame rate of the written mp4 (default: %(default)s)")
    how.add_argument("--context_parallel_size", type=int,
                     help="processes sharing each video (must divide the process count, the DiT's heads and the "
                          "latent frames); default: 1 when the samples divide evenly over the processes, else all")
    how.add_argument("--cfg_parallel", action="store_true",
                     help="guidance parallelism: the conditional and the unconditional pass on the two halves of "
                          "each group of --context_parallel_size processes (default then: 2 when the samples divide "
                          "evenly over the pairs of processes, else all)")
    return p


def default_context_parallel_size(num_samples, world):
    """Whole samples per process when they divide evenly over the processes (no communication at all), otherwise
    every process on each video in turn: either way no process waits for another."""
    return 1 if num_samples % world == 0 else world


def check_context_parallel(cp, cfg_parallel, world, num_heads, samples):
    """Context parallelism splits the processes into groups, the heads and every sample's latent frames over the
    processes of one forward pass (a group, or half of it with guidance parallelism): all must divide. Checked
    before any heavy work."""
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
    """(the DiT's context-parallel group, the guidance pair) of this process, None where unused; for cp = 1 no
    process group is started at all (NCCL on the GPU, gloo on the CPU). Processes [g*cp, (g+1)*cp) share the videos
    of group g. With cfg_parallel the first half of a group runs the conditional pass and the second half the
    unconditional one, each half splitting the video, and process i of one half swaps velocities with process i
    of the other."""
    if cp == 1:
        return None, None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    n = cp // 2 if cfg_parallel else cp  # processes sharing one forward pass
    dit_group = cfg_group = None
    for start in range(0, world, n):  # every process creates every group, in the same order
        group = dist.new_group(list(range(start, start + n))) if n > 1 else None
        dit_group = group if start <= rank < start + n else dit_group
    if cfg_parallel:
        for start in range(0, world, cp):
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
        mode = "image2world" if args.image else "video2world"
        fields.update(inference_type=mode, input_path=args.image or args.video)
    return [parse_sample(fields, args, Path(), "--image" if args.image else "--video")], []


def output_paths(args, samples):
    """{sample name: mp4 path}; existing files are an error unless --overwrite."""
    if args.input:
        out = Path(args.output)
        if out.suffix == ".mp4":
            raise ValueError(f"-o {out}: a batch writes one mp4 per sample into a folder, not to one file")
        paths = {s.name: out / f"{s.name}.mp4" for s in samples}
    else:
        if Path(args.output).suffix != ".mp4":
            raise ValueError(f"-o {args.output}: one sample is written to an .mp4 file")
        paths = {samples[0].name: Path(args.output)}
    written = list(paths.values()) + ([p.with_suffix(".safetensors") for p in paths.values()] if args.save_latents
                                      else [])
    existing = [str(p) for p in written if p.exists()]
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
    if not samples:
        raise ValueError("; ".join(failed) or "the -i files hold no sample")
    for error in failed if rank == 0 else []:
        print(f"sample.py: skipped: {error}", file=sys.stderr)
    if args.prompt_embeds and len(samples) != 1:
        raise ValueError("--prompt_embeds holds one prompt's embeddings; a batch needs --text_encoder")
    paths = output_paths(args, samples)
    for flag, f in [("--ckpt", args.ckpt), ("--vae", args.vae)] + ([("--config", args.config)] if args.config else []):
        if Path(f).is_dir():
            hint = (f"; a training checkpoint folder is exported first: python convert.py {f} writes "
                    f"model_ema_bf16.pt into it") if flag == "--ckpt" else ""
            raise IsADirectoryError(f"{flag} {f} is a folder, not a file{hint}")
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
    frames = {s.name: frames[s.name] for s in mine}
    wan_vae_config(read_tensor_file(args.vae, "Wan VAE checkpoint"), args.vae)

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
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

    from prep_data import write_safetensors, write_video

    for s in mine:
        neg = embeddings[s.negative_prompt] if s.guidance else None
        video, latents = (generate_chunks if s.chunk_size else generate)(
            net, vae, s, frames[s.name], embeddings[s.prompt], neg, device, s.steps, args.shift, args.sampler,
            progress=s.name if rank == 0 else None, cfg_group=cfg_group)
        if rank % cp:  # the group's first process writes
            continue
        path = paths[s.name]
        write_video(path, video.numpy(), fps=args.fps)
        if args.save_latents:
            write_safetensors({"latents": latents.contiguous()}, path.with_suffix(".safetensors"))
        print(f"[rank {rank}] {s.name}: {MODE_NAMES[s.num_cond_frames]}, {len(video)} frames "
              f"{s.resolution[0]}x{s.resolution[1]}, seed {s.seed} -> {path}")
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
