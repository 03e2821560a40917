"""Build the demo's tiny text encoder: a Qwen2-architecture decoder (hidden 64, 4 layers, 4 heads, 2 KV heads)
with its own word-level tokenizer, written as a Hugging Face folder that `model.TextEncoder.from_pretrained` reads.

    python assets/demo/make_text_encoder.py --out assets/demo/text_encoder

The weights stay randomly initialised (seeded, normal(0, 0.02) as Qwen2's `initializer_range`, the pad token's
embedding zero): the encoder's only job in the demo is to give different captions different features; the tiny
DiT learns what they mean. Its output
is 4 layers x 64 = 256 features per token, the `tiny` DiT preset's `crossattn_proj_in_channels`.

The vocabulary is every word of the shapes-world captions, the teal-robot captions, the system prompt of the chat
template and the default negative prompt, lower-cased, plus Qwen's special tokens and an unknown-word token.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

sys.path.insert(0, str(Path(__file__).absolute().parents[2]))  # the repository root, for model.py and friends
from model import SYSTEM_PROMPT, TextEncoder, TextEncoderConfig  # noqa: E402
from prep_data import BACKGROUNDS, SHAPE_COLOURS  # noqa: E402
from sample import DEFAULT_NEGATIVE_PROMPT  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # <|endoftext|> pads, as in Qwen2
# the words of prep_data.shapes_clip / robot_clip captions, and the chat roles
CAPTION_WORDS = ["a an and moves moving on over background plain gradient striped checkered circle square triangle "
                 "left right up down", "A video of sks teal robot.", "system user assistant",
                 *SHAPE_COLOURS, *BACKGROUNDS]
CONFIG = TextEncoderConfig(vocab_size=0, hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4,
                           num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6)  # vocab_size: set from the tokenizer


def build_tokenizer():
    """Word-level: lower-case, split into words and punctuation, unknown words -> <unk>."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    words = set()
    for text in [SYSTEM_PROMPT, DEFAULT_NEGATIVE_PROMPT, *CAPTION_WORDS]:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # matched before normalisation, never split
    return tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another --out")
    tokenizer = build_tokenizer()
    cfg = TextEncoderConfig(**{**CONFIG.__dict__, "vocab_size": tokenizer.get_vocab_size()})

    torch.manual_seed(args.seed)
    encoder = TextEncoder(cfg)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        # The pad token embeds to zero: the ~480 padded positions of a caption then carry only what attention
        # brings them from the caption (standardised per token, so at full scale), not 480 copies of one vector
        # that would look the same for every caption.
        encoder.embed_tokens.weight[tokenizer.token_to_id("<|endoftext|>")] = 0.0

    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
         "unk_token": "<unk>", "model_max_length": 512}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2Model"], "model_type": "qwen2", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
         "rope_theta": cfg.rope_theta, "max_position_embeddings": 512, "initializer_range": 0.02,
         "tie_word_embeddings": True, "use_sliding_window": False, "torch_dtype": "float32"}, indent=2) + "\n")
    # Hugging Face Qwen2 names under `model.`, as a Qwen2ForCausalLM checkpoint has them
    save_file({f"model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    n = sum(p.numel() for p in encoder.parameters())
    print(f"wrote {out}: {cfg.vocab_size} words, {cfg.num_layers} layers x {cfg.hidden_size} = "
          f"{cfg.num_layers * cfg.hidden_size} features per token, {n:,} parameters")


if __name__ == "__main__":
    main()
