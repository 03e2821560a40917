"""Cache throughput of `prep_data.py cache` at the reference shape (93 frames at 704x1280) on one GPU.

    python bench/bench_cache.py            # on the H100: real-size Wan VAE and 7B text encoder, random weights
    python bench/bench_cache.py --smoke    # tiny models and clips on the CPU: checks the script runs

Runs the cache's own stages on a synthetic dataset: the text encoder over the unique captions, then the VAE over
the clips (decode + resize on a CPU thread overlapping the GPU encode), each timed separately.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prep_data  # noqa: E402
from model import TextEncoder, TextEncoderConfig, TextTokenizer, WanVAE, WanVAEConfig, qwen_chat_text  # noqa: E402


def word_tokenizer(captions):
    """A word-level tokenizer with the Qwen chat tokens (the ids do not matter for speed: all pad to 512)."""
    words = sorted({w for c in captions for w in qwen_chat_text(c).split()} | {"<|endoftext|>"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextTokenizer(tok, tok.token_to_id("<|endoftext|>"))


def synced(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        num_frames, size, videos, frames_per_video = 9, (32, 32), 2, 18
        vae_cfg, te_cfg = WanVAEConfig(dim=8, dim_mult=(1, 1, 1, 1), num_res_blocks=1), TextEncoderConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    else:
        num_frames, size, videos, frames_per_video = 93, (704, 1280), 2, 3 * 93
        vae_cfg, te_cfg = WanVAEConfig(), TextEncoderConfig()
    torch.backends.cudnn.benchmark = True
    root = Path(tempfile.mkdtemp())
    prep_data.write_synthetic_dataset(root / "data", num_videos=videos, num_frames=frames_per_video, size=size)
    captions = [f"A video of sks teal robot, take {i}." for i in range(8)]
    for i, meta in enumerate(sorted((root / "data" / "metas").glob("*.txt"))):
        meta.write_text(captions[i % len(captions)])
    plan = prep_data.plan_cache(root / "data", "bench-vae", "bench-te", num_frames, size, stride=num_frames)
    plan.captions = captions  # eight unique captions to time the encoder on

    with torch.device(device):
        encoder = TextEncoder(te_cfg, word_tokenizer(captions)).to(torch.bfloat16).eval()
    if device.type == "cuda":  # the random init ran in fp32; a real load streams bf16 weights
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = synced(device)
    prep_data.encode_captions(plan, lambda: encoder, plan.captions, show_progress=False)
    text_s = (synced(device) - t0) / len(plan.captions)
    text_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    with torch.device(device):
        vae = WanVAE(vae_cfg).to(torch.bfloat16).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prep_data.encode_clips(plan, vae, plan.clips[:1], show_progress=False)  # warm-up (cuDNN autotuning)
    t0 = synced(device)
    prep_data.encode_clips(plan, vae, plan.clips, show_progress=False)
    clip_s = (synced(device) - t0) / len(plan.clips)
    vae_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    t0 = time.perf_counter()
    for clip in plan.clips:
        prep_data.load_clip(plan, clip)
    decode_s = (time.perf_counter() - t0) / len(plan.clips)

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nprep_data.py cache, {num_frames}x{size[0]}x{size[1]} clips, {card}, torch {torch.__version__}")
    print("| stage | per item s | items/s | peak GiB |")
    print("|---|---|---|---|")
    print(f"| text encoder ({te_cfg.num_layers} layers x {te_cfg.hidden_size}, 512 tokens) | {text_s:.3f} | "
          f"{1 / text_s:.2f} captions/s | {text_peak:.1f} |")
    print(f"| VAE encode incl. overlapped decode+resize ({len(plan.clips)} clips) | {clip_s:.3f} | "
          f"{1 / clip_s:.2f} clips/s | {vae_peak:.1f} |")
    print(f"| mp4 decode + resize alone (CPU, for reference) | {decode_s:.3f} | {1 / decode_s:.2f} clips/s | - |")


if __name__ == "__main__":
    main()
