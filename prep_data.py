"""Everything about data, top to bottom (`python prep_data.py --help` for the command line):

1. video and image I/O with PyAV: a window of frames (seeking, not decoding whole files), resize, write mp4;
2. the reference's layout, `<dataset>/videos/*.mp4` and one caption per video in `<dataset>/metas/<name>.txt`,
   and the `prompts` and `check` commands;
3. `cache`: VAE latents of fixed clips and text embeddings of unique captions, encoded once, to safetensors;
4. what train.py reads: `VideoDataset` (raw mp4s), `CachedDataset` and `CachedSampler` (seeded, sharded, resumable);
5. `demo`: synthetic clips made with numpy, the teal robot and the "shapes world".
"""

import argparse
import gc
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from model import (TextEncoder, TextEncoderConfig, WanVAE, file_fingerprint, qwen_chat_text, read_tensor_file,
                   wan_vae_config)

MAX_TEXT_TOKENS = 512  # the text encoder pads or truncates every prompt to this many tokens
RESIZE_MODES = ("stretch", "crop")


class DataError(ValueError):
    """A problem with an input file or folder; the message names it and says what is wrong."""


class VideoError(DataError):
    """A video or image file that cannot be used: missing, empty, not a video, truncated, too short."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Video and image I/O
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    duration: float  # seconds, num_frames / fps
    codec: str


def _open(path):
    """Open a video or image with PyAV, turning every failure into a VideoError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video or image, or truncated ({e.strerror or e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _info(container, stream, path):
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError(f"{path}: the stream has no frame rate")
    num_frames = stream.frames
    if num_frames == 0:  # matroska/webm headers carry no frame count: count the packets (no decoding)
        try:
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        except av.error.FFmpegError as e:
            raise VideoError(f"{path}: cannot read packets ({e.strerror or e}); the file may be truncated") from None
        container.seek(0)
    if num_frames == 0:
        raise VideoError(f"{path}: the video has no frames")
    return VideoInfo(str(path), num_frames, float(rate), stream.height, stream.width, num_frames / float(rate),
                     stream.codec_context.name)


def video_info(path):
    """Frame count, fps, size, duration and codec from the container header (nothing is decoded)."""
    container, stream = _open(path)
    with container:
        return _info(container, stream, path)


def _decode(container, stream, start, stop, by_timestamp, path):
    """Frames start..stop-1 as rgb24 arrays. With `by_timestamp`, seek to the keyframe before `start` and number
    frames from their timestamps (constant frame rate); returns None when the timestamps do not line up, and the
    caller then decodes from the first frame, numbering frames in decoding order."""
    rate, time_base, t0 = Fraction(stream.average_rate or stream.guessed_rate), stream.time_base, stream.start_time or 0
    if by_timestamp and start > 0:
        container.seek(t0 + int(start / rate / time_base), stream=stream, backward=True)
    frames = []
    try:
        for n, frame in enumerate(container.decode(stream)):
            if by_timestamp:
                if frame.pts is None:
                    return None
                index = round((frame.pts - t0) * time_base * rate)
            else:
                index = n
            if index < start:
                continue
            if index != start + len(frames):  # a gap or a repeat: variable frame rate, or the seek overshot
                return None
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == stop - start:
                break
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: decoding failed while reading frames {start}..{stop - 1} ({e.strerror or e}); "
                         f"the file may be truncated or corrupt") from None
    return frames


def read_video(path, start=0, num_frames=None):
    """Read `num_frames` consecutive frames from frame `start` (all remaining frames when None).
    Returns (uint8 [T,H,W,3] numpy array, VideoInfo). Only the frames from the keyframe before `start` on are
    decoded, so a short window of a long file is cheap."""
    container, stream = _open(path)
    with container:
        info = _info(container, stream, path)
        stop = info.num_frames if num_frames is None else start + num_frames
        if start < 0 or stop > info.num_frames or stop <= start:
            raise VideoError(f"{path}: cannot read frames {start}..{stop - 1}: the video has {info.num_frames} frames")
        frames = _decode(container, stream, start, stop, by_timestamp=True, path=path)
        if frames is None:
            container.seek(0)
            frames = _decode(container, stream, start, stop, by_timestamp=False, path=path)
    if num_frames is not None and len(frames) < num_frames:
        raise VideoError(f"{path}: only {len(frames)} frames could be decoded from frame {start}, {num_frames} asked "
                         f"(the header says {info.num_frames}); the file may be truncated")
    if not frames:
        raise VideoError(f"{path}: no frame could be decoded from frame {start}")
    return np.stack(frames), info


def read_image(path):
    """A still image (png, jpg, anything FFmpeg reads) as uint8 [1,H,W,3]."""
    container, stream = _open(path)
    with container:
        try:
            frame = next(container.decode(stream), None)
        except av.error.FFmpegError as e:
            raise VideoError(f"{path}: cannot decode the image ({e.strerror or e})") from None
    if frame is None:
        raise VideoError(f"{path}: no image could be decoded")
    return frame.to_ndarray(format="rgb24")[None]


def write_video(path, frames, fps=16):
    """Write uint8 [T,H,W,3] frames to an H.264 mp4 (yuv420p, crf 18, moov atom first) that browsers and common
    players open. yuv420p stores colour at half resolution, so H and W must be even."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"{path}: expected uint8 frames [T,H,W,3] with T >= 1, got {frames.dtype} {frames.shape}")
    H, W = frames.shape[1:3]
    if H % 2 or W % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even height and width, got {H}x{W}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18"}  # visually lossless; x264's default (23) smears the fine detail of samples
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds


def resize_frames(frames, size, mode="stretch"):
    """Resize uint8 [T,h,w,3] frames to size=(H, W), bilinear with antialiasing.
    "stretch" (the reference's training data): straight to (H, W), aspect ratio not preserved.
    "crop" (the reference's inference input): scale by max(H/h, W/w) so the frame covers (H, W), then center crop.
    Like the reference, values go to float in [0,1] and back with truncation; an unchanged size returns the input."""
    H, W = size
    T, h, w = frames.shape[:3]
    if mode == "stretch":
        resized = (H, W)
    elif mode == "crop":
        scale = max(H / h, W / w)
        resized = (math.ceil(h * scale), math.ceil(w * scale))
    else:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    top, left = int(round((resized[0] - H) / 2.0)), int(round((resized[1] - W) / 2.0))
    if resized == (h, w):  # nothing to resample (the float round trip could only lose a level)
        return frames[:, top:top + H, left:left + W]
    out = np.empty((T, H, W, 3), np.uint8)
    for i in range(0, T, 16):  # 16 frames at a time bounds the float32 copy of a long 1080p clip
        x_T_3_h_w = torch.from_numpy(frames[i:i + 16]).permute(0, 3, 1, 2).float() / 255
        y = F.interpolate(x_T_3_h_w, size=resized, mode="bilinear", antialias=True, align_corners=False)
        y = y[:, :, top:top + H, left:left + W]
        out[i:i + 16] = (y * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def dtype_for(device):
    """The dtype the networks run inference in: bf16 on the GPU, as the reference; fp32 on the CPU, where bf16
    convolutions are many times slower."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def frames_to_tensor(frames, dtype=torch.float32):
    """uint8 [(B,)T,H,W,3] (numpy or torch, any device) -> [(B,)3,T,H,W] in [-1,1]. Cast first, then scale, in
    `dtype`, as the reference does (uint8.to(bf16) / 127.5 - 1)."""
    return torch.as_tensor(frames).movedim(-1, -4).to(dtype) / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# 2. Dataset layout (<dataset>/videos/*.mp4, <dataset>/metas/<name>.txt), `prompts` and `check`
# ----------------------------------------------------------------------------------------------------------------


def list_videos(dataset_path):
    """Sorted `videos/*.mp4` of a dataset, as the reference lists them."""
    videos_dir = Path(dataset_path) / "videos"
    if not videos_dir.is_dir():
        raise DataError(f"{dataset_path}: no videos/ folder (expected <dataset>/videos/*.mp4)")
    videos = sorted(videos_dir.glob("*.mp4"))
    if not videos:
        raise DataError(f"{videos_dir}: no .mp4 files")
    return videos


def caption_path(video):
    return video.parent.parent / "metas" / f"{video.stem}.txt"


def read_caption(video):
    """The stripped caption of a video, or None when its metas/<name>.txt does not exist."""
    path = caption_path(video)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def read_dataset(dataset_path, num_frames):
    """(videos, captions, VideoInfos) of a dataset to train on clips of `num_frames`. A missing or empty caption,
    or a video shorter than one clip, is an error naming every such file."""
    videos = list_videos(dataset_path)
    captions = [read_caption(v) for v in videos]
    bad = [str(caption_path(v)) for v, c in zip(videos, captions) if not c]
    if bad:
        raise DataError(f"missing or empty captions (write them with `prep_data.py prompts`): {', '.join(bad)}")
    infos = [video_info(v) for v in videos]
    short = [f"{i.path} ({i.num_frames} frames)" for i in infos if i.num_frames < num_frames]
    if short:
        raise DataError(f"videos shorter than one clip of {num_frames} frames: {', '.join(short)}")
    return videos, captions, infos


def write_prompts(dataset_path, prompt, overwrite=False):
    """Write `prompt` to metas/<name>.txt for every video; an existing caption is kept unless `overwrite` (an empty
    file holds none: it is filled, as `cache` and `check` ask)."""
    if not prompt.strip():
        raise DataError(f"--prompt {prompt!r} is empty: a caption must say what the videos show")
    videos = list_videos(dataset_path)
    (Path(dataset_path) / "metas").mkdir(exist_ok=True)
    written = 0
    for video in videos:
        path = caption_path(video)
        if not overwrite and path.exists() and path.read_bytes().strip():
            print(f"skipped {path} (exists; --overwrite replaces it)")
            continue
        path.write_text(prompt, encoding="utf-8")
        print(f"wrote   {path}")
        written += 1
    print(f"{written} caption(s) written, {len(videos) - written} kept, {len(videos)} video(s)")


def load_tokenizer(path):
    """A Hugging Face `tokenizer.json`, or a folder holding one (the text encoder's folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    return Tokenizer.from_file(str(path))


def check_dataset(dataset_path, num_frames=93, video_size=(704, 1280), tokenizer=None):
    """Print one line per video, then the problems that would break or degrade training, and return them (empty
    when the dataset is ready). With a tokenizer, captions are counted in the tokens the text encoder sees."""
    videos = list_videos(dataset_path)
    problems = []
    print(f"{'video':<32} {'frames':>6} {'fps':>6} {'WxH':>9} {'seconds':>7} {'codec':<6} {'clip':<5} caption")
    for video in videos:
        try:
            info = video_info(video)
            read_video(video, 0, 1)  # the first and the last frame decode: catches most truncated files
            read_video(video, info.num_frames - 1, 1)
        except VideoError as e:
            print(f"{video.name:<32} UNREADABLE: {e}")
            problems.append(str(e))
            continue
        long_enough = info.num_frames >= num_frames
        if not long_enough:
            problems.append(f"{video}: {info.num_frames} frames, fewer than one clip of {num_frames}")
        caption = read_caption(video)
        if caption is None:
            status = "MISSING"
            problems.append(f"{caption_path(video)}: missing caption")
        elif not caption:
            status = "EMPTY"
            problems.append(f"{caption_path(video)}: empty caption")
        elif tokenizer is None:
            status = f"{len(caption)} chars"
        else:
            n = len(tokenizer.encode(qwen_chat_text(caption)).ids)
            status = f"{n} tokens" + (" TOO LONG" if n > MAX_TEXT_TOKENS else "")
            if n > MAX_TEXT_TOKENS:
                problems.append(f"{caption_path(video)}: {n} tokens with the chat template; the text encoder keeps "
                                f"the first {MAX_TEXT_TOKENS}")
        size = f"{info.width}x{info.height}"
        print(f"{video.name:<32} {info.num_frames:>6} {info.fps:>6.2f} {size:>9} {info.duration:>7.1f} "
              f"{info.codec:<6} {'ok' if long_enough else 'SHORT':<5} {status}")
    if tokenizer is None:
        print("caption token counts skipped: pass --tokenizer <tokenizer.json or text encoder folder>")
    print(f"training resizes every clip to --video_size {video_size[0]},{video_size[1]} (H,W)")
    if problems:
        print(f"\n{len(problems)} problem(s) would break or degrade training:")
        print("\n".join(f"  - {p}" for p in problems))
    else:
        print("\nready for training")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# 3. cache: VAE latents of fixed clips and text embeddings of unique captions
# ----------------------------------------------------------------------------------------------------------------
# Layout, next to the dataset (tag = <num_frames>f_<H>x<W>_<resize>):
#   <dataset>/cache/<tag>/latents/<video>_<start>.safetensors  {"latents": bf16 [16,T',H/8,W/8]} + metadata
#   <dataset>/cache/<tag>/text/<sha256(encoder, caption)>.safetensors  {"text_emb": bf16 [L,D]} + metadata
#   <dataset>/cache/<tag>/manifest.json  one entry per clip; written last, only when every file exists
# A later run skips files whose metadata matches, re-encodes unreadable ones and latents of a video replaced since,
# and stops on files made with other settings.


@dataclass
class Clip:
    video: Path
    start: int
    fps: float
    source_size: tuple  # (H, W) of the video file
    caption: str
    source_digest: str  # file_fingerprint of the video: one replaced under the same name is encoded again


@dataclass
class CachePlan:
    dataset_path: Path
    cache_dir: Path
    num_frames: int
    video_size: tuple
    resize: str
    clip_choice: str
    vae_id: str
    text_encoder_id: str
    clips: list
    captions: list  # unique, sorted

    def latent_path(self, clip):
        return self.cache_dir / "latents" / f"{clip.video.stem}_{clip.start:06d}.safetensors"

    def text_path(self, caption):
        key = hashlib.sha256(f"{self.text_encoder_id}\0{caption}".encode()).hexdigest()[:32]
        return self.cache_dir / "text" / f"{key}.safetensors"

    def latent_meta(self, clip):
        return {"source": clip.video.name, "start_frame": str(clip.start), "num_frames": str(self.num_frames),
                "fps": repr(clip.fps), "source_size": "{}x{}".format(*clip.source_size),
                "video_size": "{}x{}".format(*self.video_size), "resize": self.resize, "vae": self.vae_id,
                "source_digest": clip.source_digest}

    def text_meta(self, caption):
        return {"caption": caption, "text_encoder": self.text_encoder_id}

    def todo(self, rank=0, world_size=1):
        """This rank's unfinished work: (captions, clips). Rank r takes items r::world_size of each list."""
        captions = [c for c in self.captions[rank::world_size] if not _cached(self.text_path(c), self.text_meta(c))]
        clips = [c for c in self.clips[rank::world_size] if not _cached(self.latent_path(c), self.latent_meta(c))]
        return captions, clips


def clip_starts(total, num_frames, clips_per_video=None, stride=None):
    """Start frames of the cached windows of a video with `total` frames. `clips_per_video`: that many windows
    evenly spaced from the first to the last possible start (duplicates dropped on short videos). `stride`: a window
    every `stride` frames from frame 0; by default back-to-back windows (stride = num_frames). The reference instead
    draws one random window per training step."""
    last = total - num_frames
    if last < 0:
        return []
    if clips_per_video is not None:
        return sorted({round(i * last / max(clips_per_video - 1, 1)) for i in range(clips_per_video)})
    return list(range(0, last + 1, stride or num_frames))


def weights_id(path):
    """What the cache records as the model an entry was made with: the resolved path, and the total size and latest
    modification time of the file or the folder's files. Weights replaced at the same path then no longer match
    the cache's entries (an error for latents, new files for captions) instead of being silently reused."""
    path = Path(path).resolve()
    if not path.exists():
        raise DataError(f"{path}: no such model file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no model weights there")
    stats = [f.stat() for f in files]
    return f"{path} ({sum(s.st_size for s in stats)} bytes, modified {max(s.st_mtime_ns for s in stats)} ns)"


def read_manifest(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); run the cache command again") from None


def plan_cache(dataset_path, vae_id, text_encoder_id, num_frames=93, video_size=(704, 1280), resize="stretch",
               clips_per_video=None, stride=None):
    """List every clip and unique caption to cache; fails on short videos and missing captions, naming them. Each
    clip records its video's fingerprint (size, first and last MiB: an mp4's index sits at one end, so a re-encoded
    video differs there; it survives copies and is cheap on every run)."""
    if clips_per_video is not None and stride is not None:
        raise ValueError("give clips_per_video or stride, not both")
    for key, value in (("clips_per_video", clips_per_video), ("stride", stride)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 1 + 4k for the 4x temporal VAE, got {num_frames}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize!r}")
    clips = []
    for video, caption, info in zip(*read_dataset(dataset_path, num_frames)):
        digest = file_fingerprint(video)
        clips += [Clip(video, start, info.fps, (info.height, info.width), caption, digest)
                  for start in clip_starts(info.num_frames, num_frames, clips_per_video, stride)]
    tag = f"{num_frames}f_{video_size[0]}x{video_size[1]}_{resize}"
    choice = f"clips_per_video={clips_per_video}" if clips_per_video is not None else f"stride={stride or num_frames}"
    manifest = Path(dataset_path) / "cache" / tag / "manifest.json"
    if manifest.is_file() and (made := read_manifest(manifest)["clip_choice"]) != choice:
        raise DataError(f"{manifest.parent} holds the clips of {made}, not {choice}: a run training on it would "
                        f"change dataset under it. Move the folder away to cache with {choice}")
    return CachePlan(Path(dataset_path), manifest.parent, num_frames, tuple(video_size), resize, choice, vae_id,
                     text_encoder_id, clips, sorted({c.caption for c in clips}))


def _cached(path, meta):
    """True when `path` is a complete cache file made with the same settings from the same source video. Unreadable
    files (a partial write by another tool, a disk that filled up) and latents of a video since replaced are redone;
    a file made with other settings is an error."""
    if not path.exists():
        return False
    try:
        with safe_open(path, "pt") as f:
            found = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        print(f"{path}: unreadable ({type(e).__name__}), encoding it again")
        return False
    differ = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v and k != "source_digest"}
    if differ:
        diff = ", ".join(f"{k}: {a!r} in the file, {b!r} now" for k, (a, b) in differ.items())
        raise DataError(f"{path} was made with other settings ({diff}); move the cache folder away to rebuild it")
    if found.get("source_digest") != meta.get("source_digest"):
        print(f"{path}: its video {meta['source']} has changed since, encoding it again")
        return False
    return True


def write_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, but the file gets the mode of any new file (0644 under umask 022), not save_file's
    0600: caches, latents and adapters are outputs to share."""
    path = Path(path)
    path.unlink(missing_ok=True)
    path.touch()
    mode = path.stat().st_mode
    save_file(tensors, path, metadata=metadata)
    path.chmod(mode)


def write_atomic(path, write):
    """write(<path>.partial), then rename it to `path`: an interrupted run never leaves a file that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def embed_texts(load_text_encoder, texts, show_progress=False):
    """Yield (text, embedding [L,D] on the CPU) for each text. The encoder, `load_text_encoder()`, is built on the
    first text and freed after the last, before the caller builds its next network (the VAE, the DiT): the two
    never share the GPU's memory. Nothing is built when there are no texts."""
    if not texts:
        return
    encoder = load_text_encoder()
    for text in tqdm(texts, unit="text", desc="text encoder", disable=not show_progress):
        with torch.no_grad():
            emb_L_D = encoder.encode([text])[0].cpu()  # encode(list[str]) -> [B,L,D]
        yield text, emb_L_D
    del encoder
    gc.collect()
    torch.cuda.empty_cache()  # does nothing where CUDA was never used


def encode_captions(plan, load_text_encoder, captions, show_progress=True):
    """Embed each caption with the text encoder that `load_text_encoder()` builds and save it as bf16 [L,D]."""
    for caption, emb_L_D in embed_texts(load_text_encoder, captions, show_progress):
        tensors = {"text_emb": emb_L_D.to(torch.bfloat16).contiguous()}
        write_atomic(plan.text_path(caption), lambda tmp: write_safetensors(tensors, tmp, plan.text_meta(caption)))


def load_clip(plan, clip):
    """The uint8 [T,H,W,3] frames of a clip at the cache's size: exactly what encode_clips feeds the VAE."""
    frames, _ = read_video(clip.video, clip.start, plan.num_frames)
    return resize_frames(frames, plan.video_size, plan.resize)


@torch.no_grad()
def encode_video(vae, frames_B_T_H_W_3):
    """uint8 frames [B,T,H,W,3] -> the VAE's latents [B,16,T',H/8,W/8], in its dtype: the cache's encoding and
    train.py's online one."""
    weight = next(vae.parameters())
    return vae.encode(frames_to_tensor(frames_B_T_H_W_3.to(weight.device), weight.dtype))


def encode_clips(plan, vae, clips, show_progress=True):
    """VAE-encode each clip and save it as bf16. The next clip is decoded on a CPU thread while the VAE encodes."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_clip, plan, clips[0]) if clips else None
        for i, clip in enumerate(tqdm(clips, unit="clip", desc="latents", disable=not show_progress)):
            frames = pending.result()
            if i + 1 < len(clips):
                pending = pool.submit(load_clip, plan, clips[i + 1])
            latents = encode_video(vae, torch.from_numpy(frames)[None])[0].to(torch.bfloat16).cpu().contiguous()
            write_atomic(plan.latent_path(clip),
                         lambda tmp: write_safetensors({"latents": latents}, tmp, plan.latent_meta(clip)))


def write_manifest(plan):
    """The index CachedDataset reads. Written last (atomically), and only when every listed file exists."""
    missing = [str(p) for p in [plan.latent_path(c) for c in plan.clips] + [plan.text_path(c) for c in plan.captions]
               if not p.exists()]
    if missing:
        raise DataError(f"cannot write the manifest, {len(missing)} cache file(s) missing, e.g. {missing[0]}; "
                        f"run the cache command again")
    manifest = {
        "format": 1, "dataset": str(plan.dataset_path.resolve()), "num_frames": plan.num_frames,
        "video_size": list(plan.video_size), "resize": plan.resize, "clip_choice": plan.clip_choice,
        "vae": plan.vae_id, "text_encoder": plan.text_encoder_id,
        "clips": [{"latents": str(plan.latent_path(c).relative_to(plan.cache_dir)),
                   "text_emb": str(plan.text_path(c.caption).relative_to(plan.cache_dir)),
                   "caption": c.caption, "source": f"videos/{c.video.name}", "start_frame": c.start,
                   "num_frames": plan.num_frames, "fps": c.fps} for c in plan.clips],
    }
    path = plan.cache_dir / "manifest.json"
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return path


def build_cache(dataset_path, vae, text_encoder, vae_id, text_encoder_id, num_frames=93, video_size=(704, 1280),
                resize="stretch", clips_per_video=None, stride=None, show_progress=False):
    """Cache a dataset with already-built encoders, in one process; returns the manifest path. The `cache` command
    does the same, but builds the text encoder, uses and frees it before it builds the VAE, and shards the work
    across torchrun ranks."""
    plan = plan_cache(dataset_path, vae_id, text_encoder_id, num_frames, video_size, resize, clips_per_video, stride)
    captions, clips = plan.todo()
    encode_captions(plan, lambda: text_encoder, captions, show_progress)
    encode_clips(plan, vae, clips, show_progress)
    return write_manifest(plan)


# ----------------------------------------------------------------------------------------------------------------
# 4. What train.py reads: the datasets and the sampler
# ----------------------------------------------------------------------------------------------------------------


class VideoDataset(torch.utils.data.Dataset):
    """The reference's dataset: one item per mp4, a random window of `num_frames` frames at the file's frame rate,
    resized to `video_size`. Unlike the reference, the last window can be drawn (a video of exactly `num_frames`
    works) and short videos or missing captions are errors, not skipped. DataLoader workers each get a copy of
    `self.rng`: give each its own (worker_init_fn)."""

    def __init__(self, dataset_dir, num_frames=93, video_size=(704, 1280), resize="stretch", seed=0):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize!r}")
        self.videos, self.captions, self.infos = read_dataset(dataset_dir, num_frames)
        self.num_frames, self.video_size, self.resize = num_frames, tuple(video_size), resize
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        info = self.infos[i]
        start = int(self.rng.integers(0, info.num_frames - self.num_frames + 1))
        frames, _ = read_video(self.videos[i], start, self.num_frames)
        frames = resize_frames(frames, self.video_size, self.resize)
        video_3_T_H_W = torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()
        return {"video": video_3_T_H_W, "caption": self.captions[i], "fps": info.fps,
                "source": str(self.videos[i]), "start_frame": start}


class CachedDataset(torch.utils.data.Dataset):
    """Clips from a cache written by `prep_data.py cache`: one item per cached clip. Tensors are read on access
    from memory-mapped safetensors files, so opening a large cache costs nothing."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        path = self.cache_dir / "manifest.json"
        if not path.is_file():
            raise DataError(f"{path}: no manifest; the cache is missing or unfinished (run `prep_data.py cache`)")
        self.clips = read_manifest(path)["clips"]
        missing = [c[k] for c in self.clips for k in ("latents", "text_emb") if not (self.cache_dir / c[k]).exists()]
        if missing:
            raise DataError(f"{self.cache_dir}: {len(missing)} file(s) listed in the manifest are missing, "
                            f"e.g. {missing[0]}")
        for rel in sorted({c[k] for c in self.clips for k in ("latents", "text_emb")}):
            self._tensor(rel)  # reads the header: a truncated file fails here, not mid-run

    def __len__(self):
        return len(self.clips)

    def _tensor(self, rel, key=None):
        """The tensor `key` of a cache file (None: only check that the file is readable)."""
        try:
            with safe_open(self.cache_dir / rel, "pt") as f:
                return f.get_tensor(key) if key else None
        except SafetensorError as e:
            raise DataError(f"{self.cache_dir / rel}: unreadable cache file ({e}); move it away and run "
                            f"`prep_data.py cache` again") from None

    def __getitem__(self, i):
        """The manifest's entry, with its latents (bf16 [16,T',H/8,W/8]) and text_emb (bf16 [L,D]) read."""
        item = dict(self.clips[i])
        for key in ("latents", "text_emb"):
            item[key] = self._tensor(item[key], key)
        return item


class CachedSampler:
    """An endless, resumable stream of dataset indices. Epoch e is a permutation of range(n) drawn from seed + e;
    the epochs follow one another in a single global stream, dealt round-robin to the ranks (rank r takes global
    positions r, r + world_size, ...), so every index is used once per epoch across all ranks. The state is just
    `position`, the samples drawn by all ranks together: a run resumed at step s sets it to
    s * batch_size * world_size and continues the same order, even on a different number of ranks."""

    def __init__(self, n, seed=0, rank=0, world_size=1):
        if n < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need n >= 1 and 0 <= rank < world_size, got n={n}, rank={rank}, world={world_size}")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.position = 0
        self._epoch, self._perm = None, None

    def __iter__(self):
        return self

    def __next__(self):
        epoch, i = divmod(self.position + self.rank, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        self.position += self.world_size
        return self._perm[i]


# ----------------------------------------------------------------------------------------------------------------
# 5. Synthetic data: the teal-robot demo and the shapes world
# ----------------------------------------------------------------------------------------------------------------
# Shapes are drawn from signed distances (negative inside, in pixels) with a one-pixel soft edge, so motion is
# smooth at small sizes. The shapes world never uses teal nor the robot, so a model pretrained on it has never seen
# the "sks teal robot" that the demo LoRA learns.

SHAPE_COLOURS = {"red": (220, 40, 40), "green": (50, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
                 "orange": (240, 130, 30), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"gray": (128, 128, 128), "light gray": (200, 200, 200), "beige": (225, 205, 170),
               "dark blue": (25, 30, 80), "pink": (240, 180, 200), "brown": (110, 80, 50)}
TEAL = (0, 128, 128)


def _grid(H, W):
    y, x = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    return y, x


def _paint(img, dist, colour):
    """Blend `colour` where the signed distance is negative (antialiased over one pixel)."""
    alpha = np.clip(0.5 - dist, 0, 1)[..., None]
    img *= 1 - alpha
    img += alpha * np.asarray(colour, np.float32)


def _box(y, x, cy, cx, hh, hw, r=0.0):
    """Signed distance to a rectangle of half-size (hh, hw) with corners rounded by r."""
    qy, qx = np.abs(y - cy) - (hh - r), np.abs(x - cx) - (hw - r)
    return np.hypot(np.maximum(qy, 0), np.maximum(qx, 0)) + np.minimum(np.maximum(qy, qx), 0) - r


def _circle(y, x, cy, cx, r):
    return np.hypot(y - cy, x - cx) - r


def _triangle(y, x, cy, cx, r):
    """An upward triangle inscribed in a circle of radius r: the largest of the three edge distances (edges lie
    r/2 from the centre; normals in image coordinates, y pointing down)."""
    normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]  # (x, y)
    return np.max([nx * (x - cx) + ny * (y - cy) for nx, ny in normals], axis=0) - r / 2


def _background(rng, H, W):
    """A random background and its name: a plain colour, a vertical gradient, stripes or a checkerboard."""
    names = list(BACKGROUNDS)
    a, b = rng.choice(len(names), 2, replace=False)
    c1, c2 = np.asarray(BACKGROUNDS[names[a]], np.float32), np.asarray(BACKGROUNDS[names[b]], np.float32)
    y, x = _grid(H, W)
    kind = rng.choice(["plain", "gradient", "striped", "checkered"])
    if kind == "plain":
        mix = np.zeros((H, W), np.float32)
    elif kind == "gradient":
        mix = y / H
    elif kind == "striped":
        mix = ((x // max(W // 8, 1)) % 2).astype(np.float32)
    else:
        period = max(H // 4, 1)
        mix = ((y // period + x // period) % 2).astype(np.float32)
    img = c1 * (1 - mix[..., None]) + c2 * mix[..., None]
    return img, (names[a] if kind == "plain" else kind)


def _path(rng, H, W, margin, T):
    """Centres of an object moving in a straight line across the frame, and the direction in words."""
    direction = rng.choice(["left", "right", "up", "down"])
    lo_y, hi_y, lo_x, hi_x = margin, H - margin, margin, W - margin
    t = np.linspace(0, 1, T, dtype=np.float32)
    if direction in ("left", "right"):
        cy = np.full(T, rng.uniform(lo_y, hi_y), np.float32)
        cx = lo_x + (hi_x - lo_x) * (t if direction == "right" else 1 - t)
    else:
        cx = np.full(T, rng.uniform(lo_x, hi_x), np.float32)
        cy = lo_y + (hi_y - lo_y) * (t if direction == "down" else 1 - t)
    return cy, cx, str(direction)


def robot_clip(rng, num_frames=17, size=(64, 64)):
    """A teal robot (rounded body, head with eyes and an antenna, legs) moving over a random background.
    Returns (uint8 [T,H,W,3], caption)."""
    H, W = size
    s = min(H, W) / 64  # the robot is drawn for 64 px and scaled
    background, bg_name = _background(rng, H, W)
    cy, cx, direction = _path(rng, H, W, 24 * s, num_frames)  # the robot spans 24 px around its centre
    y, x = _grid(H, W)
    frames = []
    for t in range(num_frames):
        img = background.copy()
        by, bx = cy[t] + 1.5 * s * math.sin(t * 1.3), cx[t]  # a little bob, as if walking
        for leg in (-5, 5):
            _paint(img, _box(y, x, by + 12 * s, bx + leg * s, 4 * s, 2 * s), (0, 90, 90))
        _paint(img, _box(y, x, by + 2 * s, bx, 9 * s, 9 * s, 3 * s), TEAL)  # body
        _paint(img, _box(y, x, by - 12 * s, bx, 5 * s, 7 * s, 2 * s), TEAL)  # head
        for eye in (-3, 3):
            _paint(img, _circle(y, x, by - 12 * s, bx + eye * s, 1.5 * s), (255, 255, 255))
        _paint(img, _box(y, x, by - 19.5 * s, bx, 2.5 * s, 0.6 * s), (0, 90, 90))  # antenna
        _paint(img, _circle(y, x, by - 22 * s, bx, 1.6 * s), (230, 60, 60))
        frames.append(img)
    caption = rng.choice(["A video of sks teal robot.", f"A video of sks teal robot moving {direction}.",
                          f"A video of sks teal robot moving {direction} over a {bg_name} background."])
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), str(caption)


def shapes_clip(rng, num_frames=17, size=(64, 64)):
    """One or two coloured circles, squares or triangles moving in straight lines over a random background, with
    a caption naming colour, shape and motion. Never teal, never a robot. Returns (uint8 [T,H,W,3], caption)."""
    H, W = size
    background, bg_name = _background(rng, H, W)
    y, x = _grid(H, W)
    kinds = [(colour, shape) for colour in SHAPE_COLOURS for shape in ("circle", "square", "triangle")]
    objects, phrases = [], []
    for k in rng.choice(len(kinds), rng.integers(1, 3), replace=False):  # two objects never look alike
        colour, shape = kinds[k]
        r = rng.uniform(0.12, 0.2) * min(H, W)
        cy, cx, direction = _path(rng, H, W, r + 1, num_frames)
        objects.append((shape, SHAPE_COLOURS[colour], r, cy, cx))
        phrases.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} moves {direction}")
    frames = []
    for t in range(num_frames):
        img = background.copy()
        for shape, colour, r, cy, cx in objects:
            if shape == "circle":
                dist = _circle(y, x, cy[t], cx[t], r)
            elif shape == "square":
                dist = _box(y, x, cy[t], cx[t], r * 0.85, r * 0.85)
            else:
                dist = _triangle(y, x, cy[t], cx[t], r)
            _paint(img, dist, colour)
        frames.append(img)
    caption = " and ".join(phrases) + f" on a {bg_name} background."
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), caption[0].upper() + caption[1:]


def write_synthetic_dataset(out, kind="robot", num_videos=8, num_frames=17, size=(64, 64), fps=16, seed=0):
    """Write `num_videos` clips to <out>/videos/*.mp4 and their captions to <out>/metas/*.txt, deterministic
    from `seed`. Refuses to write into a dataset that already has videos or captions."""
    out = Path(out)
    for folder in (out / "videos", out / "metas"):
        if folder.is_dir() and any(folder.iterdir()):
            raise DataError(f"{folder} already has files; choose another --out or delete it")
    make = {"robot": robot_clip, "shapes": shapes_clip}[kind]
    rng = np.random.default_rng(seed)
    (out / "metas").mkdir(parents=True, exist_ok=True)
    for i in range(num_videos):
        frames, caption = make(rng, num_frames, size)
        write_video(out / "videos" / f"{kind}_{i:03d}.mp4", frames, fps)
        (out / "metas" / f"{kind}_{i:03d}.txt").write_text(caption, encoding="utf-8")
    print(f"wrote {num_videos} {kind} clips of {num_frames} frames at {size[0]}x{size[1]} to {out}")


# ----------------------------------------------------------------------------------------------------------------
# 6. Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_size(text):
    """'704,1280' -> (704, 1280)."""
    try:
        H, W = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 704,1280), got {text!r}") from None
    return H, W


def checked(kind, ok, expected):
    """An argparse type: kind(text), refused unless ok(value), so argparse names the option (exit code 2)."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


positive_int = checked(int, lambda n: n >= 1, "an integer >= 1")
clip_length = checked(int, lambda n: n >= 1 and (n - 1) % 4 == 0,
                      "1 + 4k frames for the 4x temporal VAE (93, 29, 17, ...)")
training_size = checked(parse_size, lambda hw: min(hw) >= 16 and hw[0] % 16 == hw[1] % 16 == 0,
                        "H and W positive multiples of 16 (the VAE's 8x times the DiT's 2x2 patches)")


# Each command's docstring is its --help description.


def cmd_prompts(args):
    """Write the same caption for every video lacking one (the reference's create_prompts_for_nemo_assets.py).
    Existing captions are kept."""
    write_prompts(args.dataset_path, args.prompt, args.overwrite)
    return 0


def cmd_check(args):
    """Open every video (header, first and last frame) and caption. Reports frames, fps, size, duration, codec,
    whether one clip fits, and missing, empty or too long captions. Exits 1 with a summary when there are problems."""
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    return 1 if check_dataset(args.dataset_path, args.num_frames, args.video_size, tokenizer) else 0


def cmd_cache(args):
    """Write VAE latents of fixed clips and text embeddings of unique captions to
    <dataset>/cache/<frames>f_<H>x<W>_<resize>/ (bf16 safetensors + manifest.json). Clips: back-to-back windows by
    default (stride = num_frames), or --stride S, or --clips_per_video N evenly spaced windows. Re-running skips
    finished files. The text encoder runs first and is freed before the VAE is built, so peak memory is the larger
    of the two. Under torchrun each rank takes every world_size-th item; rank 0 writes the manifest once all are
    done."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # or every rank would also open a context on GPU 0
    vae_id, text_encoder_id = weights_id(args.vae), weights_id(args.text_encoder)
    # each file fits its role, checked before any work
    if not (Path(args.text_encoder) / "config.json").is_file():
        raise DataError(f"--text_encoder {args.text_encoder}: expected the text encoder's Hugging Face folder "
                        f"(config.json, *.safetensors, tokenizer.json), found no config.json there")
    try:
        TextEncoderConfig.from_hf_config(Path(args.text_encoder) / "config.json")
        wan_vae_config(read_tensor_file(args.vae, "--vae"), f"--vae {args.vae}")
    except (ValueError, KeyError) as e:
        raise DataError(e.args[0]) from None
    plan = plan_cache(args.dataset_path, vae_id, text_encoder_id, args.num_frames, args.video_size, args.resize,
                      args.clips_per_video, args.stride)
    captions, clips = plan.todo(rank, world_size)
    print(f"rank {rank}/{world_size}: {len(plan.clips)} clips, {len(plan.captions)} unique captions in "
          f"{plan.cache_dir}; this rank encodes {len(captions)} caption(s) and {len(clips)} clip(s)")
    encode_captions(plan, lambda: TextEncoder.from_pretrained(args.text_encoder, device=device), captions,
                    show_progress=rank == 0)
    if clips:
        print(f"rank {rank}: the VAE runs in {str(dtype_for(device)).removeprefix('torch.')} on {device}")
        vae = WanVAE.from_pretrained(args.vae, device=device, dtype=dtype_for(device))
        encode_clips(plan, vae, clips, show_progress=rank == 0)
    if world_size > 1:  # gloo: a barrier between processes that needs no GPU collective
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"wrote {write_manifest(plan)}")
    return 0


def cmd_demo(args):
    """Procedural clips made with numpy: 'robot' = a teal robot moving over varied backgrounds with 'A video of sks
    teal robot...' captions (the LoRA demo); 'shapes' = coloured circles, squares and triangles with captions naming
    colour, shape and motion (for pretraining a tiny base model; never teal, never a robot)."""
    write_synthetic_dataset(args.out, args.kind, args.num_videos, args.num_frames, args.size, args.fps, args.seed)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="prep_data.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prepare a video dataset for LoRA post-training of Cosmos-Predict2.5.\n"
                    "A dataset is <dataset>/videos/*.mp4 plus one caption per video in <dataset>/metas/<name>.txt.",
        epilog="typical use:\n"
               "  python prep_data.py demo    --out datasets/demo\n"
               "  python prep_data.py prompts --dataset_path datasets/cosmos_nemo_assets --prompt \"A video of sks "
               "teal robot.\"\n"
               "  python prep_data.py check   --dataset_path datasets/cosmos_nemo_assets --tokenizer ckpt/Reason1-7B\n"
               "  python prep_data.py cache   --dataset_path datasets/cosmos_nemo_assets --vae ckpt/tokenizer.pth "
               "--text_encoder ckpt/Reason1-7B\n"
               "  torchrun --nproc_per_node=8 prep_data.py cache ...   (shards the clips across GPUs)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name, func, help, dataset=True, clip=True):
        p = sub.add_parser(name, help=help, description=func.__doc__)
        p.set_defaults(func=func)
        if dataset:
            p.add_argument("--dataset_path", required=True, help="dataset folder holding videos/ and metas/")
        if clip:
            p.add_argument("--num_frames", type=clip_length, default=93,
                           help="frames per training clip, 1 + 4k (default 93)")
            p.add_argument("--video_size", type=training_size, default=(704, 1280), metavar="H,W",
                           help="training resolution (default 704,1280)")
        return p

    p = command("prompts", cmd_prompts, "write metas/<name>.txt for videos that have no caption", clip=False)
    p.add_argument("--prompt", default="A video of sks teal robot.", help="the caption (default: %(default)r)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too")

    p = command("check", cmd_check, "report every video and caption; exit 1 if anything would break training")
    p.add_argument("--tokenizer", help="tokenizer.json or the text encoder folder, to count caption tokens "
                                       f"(more than {MAX_TEXT_TOKENS} are truncated); skipped without it")

    p = command("cache", cmd_cache, "encode clips with the VAE and captions with the text encoder, once")
    p.add_argument("--vae", required=True, help="Wan2.1 VAE weights (tokenizer.pth)")
    p.add_argument("--text_encoder", required=True, help="Cosmos-Reason1-7B folder (safetensors + tokenizer.json)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--clips_per_video", type=positive_int,
                        help="N windows per video, evenly spaced first to last")
    choice.add_argument("--stride", type=positive_int, help="a window every S frames (default: num_frames)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                   help="stretch: straight to H,W like the reference (default); crop: keep aspect, center crop")

    p = command("demo", cmd_demo, "write a small synthetic dataset (no downloads)", dataset=False, clip=False)
    p.add_argument("--out", default="datasets/demo", help="output dataset folder (default %(default)s)")
    p.add_argument("--kind", choices=["robot", "shapes"], default="robot", help="what to draw (default robot)")
    p.add_argument("--num_videos", type=int, default=8)
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--size", type=parse_size, default=(64, 64), metavar="H,W", help="even sizes (default 64,64)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
