"""Text encoder vs transformers' Qwen2.5-VL (tiny random config, CPU): weights, ids, hidden states, embeddings."""

import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from model import (SYSTEM_PROMPT, TextEncoder, TextEncoderConfig, TextTokenizer, qwen_chat_text,
                           qwen_standardize)

transformers = pytest.importorskip("transformers")

MAX_LEN = 64  # the first two captions get padded, the third (74 tokens once templated) truncated
CAPTIONS = ["A video of sks teal robot.", "", "Ünïcode captions\nwith a newline and 123 digits!"]
# The chat template shipped with Qwen/Qwen2.5-VL-7B-Instruct (chat_template.json), the reference's processor template.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tiny_qwen_tokenizer(folder):
    """A byte-level BPE shaped like Qwen2's tokenizer.json, trained on a few sentences, with Qwen's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SYSTEM_PROMPT, "A video of a teal robot walking in a warehouse."] * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))


def reference_ids(folder, captions, max_length):
    """The reference's tokenisation through transformers: processor chat template, then pad/truncate to max_length."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = []
    for caption in captions:
        chat = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": caption}]}]
        text = hf_tok.apply_chat_template(chat, chat_template=QWEN25VL_CHAT_TEMPLATE, tokenize=False,
                                          add_generation_prompt=False, add_vision_id=False)
        rows.append(hf_tok(text, padding="max_length", truncation=True, max_length=max_length)["input_ids"])
    return torch.tensor(rows)


def rewrite_shards(folder, rename, keep_index=False):
    """Applies rename(key) -> new key or None (drop) to every shard; updates the index unless keep_index."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(folder / shard)
        save_file({rename(k): v for k, v in tensors.items() if rename(k)}, folder / shard, metadata={"format": "pt"})
    if not keep_index:
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items() if rename(k)}
        index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    """A tiny random Qwen2_5_VLForConditionalGeneration saved in every key layout, plus its reference outputs."""
    root = tmp_path_factory.mktemp("qwen")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-6, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norm weights so a swapped or skipped norm cannot go unnoticed
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folders = {
        "original": dict(max_shard_size="20KB"),  # 5.x default: the original Qwen layout `model.*`, `visual.*`
        "v5": dict(max_shard_size="20KB", save_original_format=False),  # `model.language_model.*`
        "single": dict(),  # one model.safetensors, no index
    }
    for name, kwargs in folders.items():
        hf.save_pretrained(root / name, **kwargs)
        write_tiny_qwen_tokenizer(root / name)
    shutil.copytree(root / "original", root / "llava")  # LLaVA-style exports: `language_model.model.*`
    rewrite_shards(root / "llava", lambda k: "language_model." + k if k.startswith(("model.", "lm_head")) else k)

    ids = reference_ids(root / "original", CAPTIONS, MAX_LEN)
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    return dict(root=root, ids=ids, hidden=hidden)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout", ["original", "v5", "llava", "single"])
def test_parity_with_transformers(hf_setup, layout):
    enc = TextEncoder.from_pretrained(hf_setup["root"] / layout, device="cpu", dtype=torch.float32,
                                      max_length=MAX_LEN)
    hidden = hf_setup["hidden"]
    assert len(hidden) == enc.cfg.num_layers == 3
    ours = enc.hidden_states(hf_setup["ids"])
    for i, (a, b) in enumerate(zip(ours, hidden)):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5, f"layer {i}"
    # end to end: our tokenizer + encoder vs transformers' template, tokenizer, model and the reference's normalisation
    ids = hf_setup["ids"]
    assert (ids[:2, -1] == enc.tokenizer.pad_id).all() and (ids[2] != enc.tokenizer.pad_id).all()
    with pytest.warns(UserWarning, match="caption 2 truncated from 74 to 64 tokens"):
        emb = enc.encode(CAPTIONS)
    ref = torch.cat([qwen_standardize(h) for h in hidden], dim=-1)
    assert emb.shape == (len(CAPTIONS), MAX_LEN, 3 * 64) and emb.dtype == torch.float32
    assert rel_err(emb, ref) <= 1e-5
    # the standardisation is the reference's: zero mean, unit unbiased std per token and layer
    per_layer = emb.view(len(CAPTIONS), MAX_LEN, 3, 64)
    torch.testing.assert_close(per_layer.mean(-1), torch.zeros(len(CAPTIONS), MAX_LEN, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_layer.std(-1), torch.ones(len(CAPTIONS), MAX_LEN, 3), atol=1e-5, rtol=0)


def test_bf16_matches_transformers_bf16(hf_setup):
    enc = TextEncoder.from_pretrained(hf_setup["root"] / "v5", device="cpu", max_length=MAX_LEN)
    assert enc.embed_tokens.weight.dtype == torch.bfloat16
    hf16 = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_setup["root"] / "original",
                                                                           dtype=torch.bfloat16).eval()
    with torch.no_grad():
        hidden = hf16(input_ids=hf_setup["ids"], output_hidden_states=True).hidden_states[1:]
    with pytest.warns(UserWarning, match="caption 2 truncated"):
        emb = enc.encode(CAPTIONS)
    assert emb.dtype == torch.bfloat16
    assert rel_err(emb, torch.cat([qwen_standardize(h) for h in hidden], dim=-1)) <= 1e-3


def test_batch_rows_are_independent(hf_setup):
    enc = TextEncoder.from_pretrained(hf_setup["root"] / "v5", device="cpu", dtype=torch.float32,
                                      max_length=MAX_LEN)
    captions = CAPTIONS[:2]
    batch = enc.encode(captions)
    for i, caption in enumerate(captions):
        torch.testing.assert_close(enc.encode([caption])[0], batch[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_length", [512, 24])
def test_chat_template_ids_match_reference(tmp_path, max_length):
    write_tiny_qwen_tokenizer(tmp_path)
    captions = CAPTIONS + ["a long caption about a teal robot walking in a warehouse " * 3]
    tokenizer = TextTokenizer.from_folder(tmp_path, max_length=max_length)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_id == hf_tok.pad_token_id == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    for caption in captions:  # the rendered text, before tokenisation
        chat = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": caption}]}]
        assert qwen_chat_text(caption) == hf_tok.apply_chat_template(
            chat, chat_template=QWEN25VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer(captions)
    assert torch.equal(ids, reference_ids(tmp_path, captions, max_length))
    truncated = [str(w.message) for w in caught]
    if max_length == 512:
        assert truncated == [] and (ids[:, -1] == tokenizer.pad_id).all()
    else:  # every caption is longer than 24 tokens once templated: each warning names its caption
        assert len(truncated) == len(captions)
        assert all(f"caption {i}" in m and repr(c[:20])[:-1] in m for i, (m, c) in enumerate(zip(truncated, captions)))


def test_config_layouts_give_the_7b_config(tmp_path):
    """The flat config of the original Qwen2.5-VL-7B release and a transformers 5.x text_config both parse."""
    seven_b = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, hidden_act="silu")
    flat = dict(model_type="qwen2_5_vl", rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, vision_config={"depth": 32}, **seven_b)
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    assert TextEncoderConfig.from_hf_config(tmp_path / "flat.json") == TextEncoderConfig()
    v5 = transformers.Qwen2_5_VLConfig(text_config=dict(**seven_b, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}))
    v5.save_pretrained(tmp_path / "v5")
    assert "hidden_size" not in json.loads((tmp_path / "v5" / "config.json").read_text())  # really nested
    assert TextEncoderConfig.from_hf_config(tmp_path / "v5" / "config.json") == TextEncoderConfig()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(hf_setup, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_setup["root"] / "original", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder, "model.layers.1.mlp.up_proj.weight", index["model.layers.1.mlp.up_proj.weight"]


def load(folder):
    return TextEncoder.from_pretrained(folder, device="cpu", dtype=torch.float32, max_length=MAX_LEN)


def test_missing_config(broken):
    folder, _, _ = broken
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "config.json"))):
        load(folder)


def test_missing_shard(broken):
    folder, _, shard = broken
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        load(folder)


def test_shard_missing_a_layer_weight(broken):
    folder, key, shard = broken
    rewrite_shards(folder, lambda k: None if k == key else k, keep_index=True)
    with pytest.raises(KeyError, match=re.escape(key) + ".*" + re.escape(shard)):
        load(folder)


def test_index_missing_a_layer_weight(broken):
    folder, key, _ = broken
    rewrite_shards(folder, lambda k: None if k == key else k)
    with pytest.raises(KeyError, match=re.escape(key)):
        load(folder)


def test_misshaped_weight(broken):
    folder, key, shard = broken
    tensors = load_file(folder / shard)
    tensors[key] = tensors[key][:-1]
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(key) + ".*" + re.escape(shard) + r".*\[95, 64\].*\[96, 64\]"):
        load(folder)


def test_extra_layer_is_rejected(broken):
    folder, _, _ = broken
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 2  # the shards still hold layer 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"for a 2-layer config(.|\n)*unexpected keys(.|\n)*model\.layers\.2\."):
        load(folder)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_non_qwen2_config(broken, model_type):
    folder, _, _ = broken
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"model_type is '{model_type}', not a Qwen2-family"):
        load(folder)
