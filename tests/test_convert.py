"""convert.py: checkpoints of tiny CPU training runs -> consolidated files and adapter files, checked against the
training model, diffusers (its pipeline's LoRA loader and its own saved folders) and ComfyUI's LoRA rule; merge;
and the error of each bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import convert
from convert import (DIT_OFFICIAL_ONLY, convert_checkpoint, dit_key_to_diffusers, export_diffusers,
                     import_diffusers, merge, read_adapter, read_dcp)
from lora import inject_lora, load_lora_state_dict, set_adapter_scale
from model import DIT_PRESETS, DiT, load_checkpoint_file
from tests.test_dit import randomize, rel_err, small_config, torchvision_shim
from tests.test_train import cache, ckpt, run_train  # noqa: F401 (cache is a fixture)

REPO = Path(__file__).resolve().parents[1]
TINY = DIT_PRESETS["tiny"]
TARGETS = "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"
RANK, ALPHA = 8, 16  # alpha != rank, so a lost alpha shows


def save_base(path, seed, cfg=TINY):
    """A released-style base file (`net.` keys) with every weight random (the reference init zeroes the adaLN
    up-projections, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    randomize(model, seed)
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "base_ema.pt", seed=5)


@pytest.fixture(scope="module")
def lora_ckpt(cache, base_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    run_train(out, cache, "max_iter=3", "save_iter=3", f"base_checkpoint='{base_file}'", f"lora_rank={RANK}",
              f"lora_alpha={ALPHA}")
    return ckpt(out, 3)


@pytest.fixture(scope="module")
def converted(lora_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    convert.main([str(lora_ckpt / "model"), str(out), "--diffusers"])  # the reference's form of the command
    return out


def inputs():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.rand(1, generator=g),
            torch.randn(1, 5, TINY.crossattn_proj_in_channels, generator=g))


def adapted(base_file, lora_state_dict, rank=RANK, alpha=ALPHA):
    """The training run's network: the base file, then the adapter."""
    model = DiT.from_pretrained(base_file, cfg=TINY, dtype=torch.float32).eval()
    inject_lora(model, TARGETS, rank=rank, alpha=alpha)
    load_lora_state_dict(model, lora_state_dict)
    return model


def from_file(path, rank=RANK, alpha=ALPHA):
    """An official-layout file with adapter keys, loaded strictly into DiT + LoRA."""
    model = DiT(TINY).eval()
    inject_lora(model, TARGETS, rank=rank, alpha=alpha)
    state_dict = load_checkpoint_file(path, prefix="net.")
    assert set(state_dict) == set(model.state_dict())  # everything, nothing left to the model's own init
    model.load_official_state_dict(state_dict, source=path)
    return model


def bf16_rounded(model):
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.bfloat16().float())
    return model


def run(model):
    with torch.no_grad():
        return model(*inputs())


# ------------------------------------------------------------------------------------------------------------
# DCP checkpoint -> consolidated files
# ------------------------------------------------------------------------------------------------------------


def test_ema_files_load_strictly_and_equal_the_training_model(converted, lora_ckpt, base_file):
    ema = read_dcp(lora_ckpt, "ema")
    reference = adapted(base_file, ema)
    assert torch.equal(run(from_file(converted / "model_ema_fp32.pt")), run(reference))
    bf16_file = load_checkpoint_file(converted / "model_ema_bf16.pt")
    assert all(v.dtype == torch.bfloat16 for v in bf16_file.values() if v.is_floating_point())
    assert torch.equal(run(from_file(converted / "model_ema_bf16.pt")), run(bf16_rounded(reference)))
    assert rel_err(run(reference), run(DiT.from_pretrained(base_file, cfg=TINY, dtype=torch.float32))) > 1e-3


def test_model_pt_holds_regular_and_ema_weights(converted, lora_ckpt, base_file):
    sd = load_checkpoint_file(converted / "model.pt")
    regular = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
    averaged = {k[8:]: v for k, v in sd.items() if k.startswith("net_ema.")}
    assert len(regular) + len(averaged) == len(sd) and regular.keys() == averaged.keys()
    trained, ema = read_dcp(lora_ckpt, "model"), read_dcp(lora_ckpt, "ema")
    base = load_checkpoint_file(base_file, prefix="net.")
    for k in regular:
        if k in trained:
            assert torch.equal(regular[k], trained[k]) and torch.equal(averaged[k], ema[k]), k
        else:
            assert torch.equal(regular[k], base[k]) and torch.equal(averaged[k], base[k]), k
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)  # two different sets of adapter weights
    # each base tensor is stored once for both prefixes
    assert (converted / "model.pt").stat().st_size < 1.2 * base_file.stat().st_size


def test_adapter_file_alone_with_the_base_gives_the_same(converted, lora_ckpt, base_file):
    path = converted / "lora_ema_bf16.safetensors"
    ema = read_dcp(lora_ckpt, "ema")
    with safe_open(path, framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {f"net.{k}" for k in ema}
    meta = json.loads((lora_ckpt / "meta.json").read_text())
    assert metadata["lora_rank"] == str(RANK) and metadata["lora_alpha"] == str(ALPHA)
    assert metadata["lora_target_modules"] == TARGETS and metadata["dit_preset"] == "tiny"
    assert metadata["base_fingerprint"] == meta["base_fingerprint"] == convert.file_fingerprint(base_file)
    assert metadata["base_checkpoint"] == str(base_file.resolve()) and metadata["iteration"] == "3"

    adapter = read_adapter(path)
    assert (adapter.rank, adapter.alpha) == (RANK, ALPHA)
    rounded = {k: v.bfloat16().float() for k, v in ema.items()}
    assert torch.equal(run(adapted(base_file, adapter.state_dict(), adapter.rank, adapter.alpha)),
                       run(adapted(base_file, rounded)))


@pytest.fixture(scope="module")
def random_init_ckpt(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("random_run")
    run_train(out, cache, "max_iter=2", "save_iter=2", "lora_rank=4", "lora_alpha=4")
    return ckpt(out, 2)


def test_random_init_base_is_drawn_again(random_init_ckpt, tmp_path):
    rng = torch.get_rng_state()
    convert_checkpoint(random_init_ckpt, tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    torch.manual_seed(0)  # train.py's seed
    expected = DiT(TINY).state_dict()
    expected.update(read_dcp(random_init_ckpt, "ema"))
    got = load_checkpoint_file(tmp_path / "model_ema_fp32.pt", prefix="net.")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_full_fine_tuning_checkpoint(cache, tmp_path):
    run_train(tmp_path / "run", cache, "max_iter=1", "save_iter=1", "use_lora=False")
    checkpoint = ckpt(tmp_path / "run", 1)
    with pytest.raises(ValueError, match="full fine-tuning checkpoint"):
        convert_checkpoint(checkpoint, tmp_path / "out", diffusers=True)
    written = convert_checkpoint(checkpoint, tmp_path / "out")
    assert sorted(written) == ["model.pt", "model_ema_bf16.pt", "model_ema_fp32.pt"]
    assert not (tmp_path / "out" / "lora_ema_bf16.safetensors").exists()
    trained, ema = read_dcp(checkpoint, "model"), read_dcp(checkpoint, "ema")
    assert set(trained) == {n for n, _ in DiT(TINY).named_parameters()}  # every parameter was trained
    torch.manual_seed(0)
    buffers = dict(DiT(TINY).named_buffers())
    model_pt = load_checkpoint_file(tmp_path / "out" / "model.pt")
    ema_fp32 = load_checkpoint_file(tmp_path / "out" / "model_ema_fp32.pt", prefix="net.")
    assert ema_fp32.keys() == DiT(TINY).state_dict().keys()
    for k, v in ema_fp32.items():
        assert torch.equal(v, ema[k] if k in ema else buffers[k]), k
        assert torch.equal(model_pt[f"net.{k}"], trained[k] if k in trained else buffers[k]), k


# ------------------------------------------------------------------------------------------------------------
# diffusers and ComfyUI
# ------------------------------------------------------------------------------------------------------------


def diffusers_transformer(folder):
    from diffusers import CosmosTransformer3DModel
    import diffusers.models.transformers.transformer_cosmos as tc

    tc.transforms = torchvision_shim()
    model = CosmosTransformer3DModel.from_pretrained(folder).eval()
    for name, module in model.named_modules():  # the official q/k RMSNorm eps is 1e-6, diffusers builds 1e-5
        if name.endswith(("norm_q", "norm_k")):
            module.eps = 1e-6
    return model


def run_diffusers(model):
    x, sigma, text = inputs()
    with torch.no_grad():
        return model(x, sigma, text, condition_mask=torch.zeros(1, 1, *x.shape[2:]),
                     padding_mask=torch.zeros(1, 1, 32, 32), return_dict=False)[0]


def test_diffusers_pipeline_loads_the_adapter(converted, base_file, tmp_path):
    from diffusers import AutoencoderKLWan, Cosmos2_5_PredictBasePipeline, UniPCMultistepScheduler

    export_diffusers(base_file, tmp_path / "transformer")
    transformer = diffusers_transformer(tmp_path / "transformer")
    base = DiT.from_pretrained(base_file, cfg=TINY, dtype=torch.float32).eval()
    assert rel_err(run_diffusers(transformer), run(base)) <= 1e-5  # the exported base alone

    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = Cosmos2_5_PredictBasePipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                         scheduler=UniPCMultistepScheduler(), safety_checker=torch.nn.Identity())
    pipe.load_lora_weights(str(converted / "lora_ema_bf16_diffusers.safetensors"))
    adapter = read_adapter(converted / "lora_ema_bf16.safetensors")
    assert sum(".lora_" in k for k in transformer.state_dict()) == 2 * len(adapter.modules)  # every module adapted
    ours = run(adapted(base_file, adapter.state_dict()))
    assert rel_err(run_diffusers(transformer), ours) <= 1e-5
    assert rel_err(ours, run(base)) > 1e-3


def test_comfyui_file_follows_comfyui_lora_rules(converted, base_file):
    """ComfyUI (comfy/lora.py, comfy/weight_adapter/lora.py) maps `diffusion_model.<module>` to the model's
    `<module>.weight` and adds alpha / rank * lora_up @ lora_down, rank = lora_down's rows."""
    weights = load_checkpoint_file(base_file, prefix="net.")
    with safe_open(converted / "lora_ema_bf16_comfyui.safetensors", framework="pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    modules = {k.removeprefix("diffusion_model.").removesuffix(".alpha") for k in lora if k.endswith(".alpha")}
    assert len(lora) == 3 * len(modules)
    for m in modules:
        down, up = lora[f"diffusion_model.{m}.lora_down.weight"].float(), lora[f"diffusion_model.{m}.lora_up.weight"]
        weights[f"{m}.weight"] = weights[f"{m}.weight"] + lora[f"diffusion_model.{m}.alpha"].item() / down.shape[0] * (
            up.float() @ down)
    patched = DiT(TINY).eval()
    patched.load_official_state_dict(weights)
    adapter = read_adapter(converted / "lora_ema_bf16.safetensors")
    assert rel_err(run(patched), run(adapted(base_file, adapter.state_dict()))) <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------------------


def test_merge_equals_the_adapted_model(converted, base_file, tmp_path):
    ours, theirs = converted / "lora_ema_bf16.safetensors", converted / "lora_ema_bf16_diffusers.safetensors"
    convert.main(["merge", "--base", str(base_file), "--lora", str(ours), "--lora", f"{theirs}:-0.5",
                  "--lora", str(converted / "lora_ema_bf16_comfyui.safetensors") + ":0.25", "-o",
                  str(tmp_path / "merged.pt")])
    merged = DiT.from_pretrained(tmp_path / "merged.pt", cfg=TINY, dtype=torch.float32).eval()
    model = DiT.from_pretrained(base_file, cfg=TINY, dtype=torch.float32).eval()
    for name, path, scale in (("a", ours, 1.0), ("b", theirs, -0.5), ("c", ours, 0.25)):
        adapter = read_adapter(path)
        inject_lora(model, TARGETS, rank=adapter.rank, alpha=adapter.alpha, adapter_name=name)
        load_lora_state_dict(model, adapter.state_dict(name), name)
        set_adapter_scale(model, name, scale)
    assert rel_err(run(merged), run(model)) <= 1e-5
    set_adapter_scale(model, "b", 0.0)
    assert rel_err(run(merged), run(model)) > 1e-3  # each adapter counts, with its scale
    assert not any(".lora_" in k for k in load_checkpoint_file(tmp_path / "merged.pt"))


# ------------------------------------------------------------------------------------------------------------
# diffusers folders
# ------------------------------------------------------------------------------------------------------------


def test_diffusers_folder_import_export_is_the_identity(tmp_path):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    original = CosmosTransformer3DModel(**{k: v for k, v in convert.diffusers_config(TINY).items()
                                           if not k.startswith("_")})
    with torch.no_grad():
        for p in original.parameters():
            p.normal_()
    original.save_pretrained(tmp_path / "theirs", max_shard_size="1MB")  # sharded, with an index
    assert (tmp_path / "theirs" / convert.DIFFUSERS_INDEX).is_file()
    convert.main(["import-diffusers", str(tmp_path / "theirs"), "-o", str(tmp_path / "official.pt")])
    convert.main(["export-diffusers", str(tmp_path / "official.pt"), "-o", str(tmp_path / "ours")])
    back = CosmosTransformer3DModel.from_pretrained(tmp_path / "ours")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(original.config)
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_official_to_diffusers_to_official_is_the_identity(base_file, tmp_path):
    export_diffusers(base_file, tmp_path / "folder")
    import_diffusers(tmp_path / "folder", tmp_path / "back.pt")
    original, back = load_checkpoint_file(base_file), load_checkpoint_file(tmp_path / "back.pt")
    kept = {k for k in original if k.removeprefix("net.") not in DIT_OFFICIAL_ONLY}
    assert back.keys() == kept and all(torch.equal(back[k], original[k]) for k in kept)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["in_channels"] == 17 and config["rope_scale"] == [1.0, 3.0, 3.0]
    assert (tmp_path / "folder" / convert.DIFFUSERS_WEIGHTS).stat().st_mode & 0o777 == 0o666 & ~umask()
    assert set(dit_key_to_diffusers(k.removeprefix("net.")) for k in kept) == set(
        safe_open(tmp_path / "folder" / convert.DIFFUSERS_WEIGHTS, framework="pt").keys())


def test_diffusers_folders_refuse_what_they_cannot_hold(converted, base_file, tmp_path):
    with pytest.raises(ValueError, match="holds LoRA adapter keys"):
        export_diffusers(converted / "model_ema_bf16.pt", tmp_path / "folder")
    export_diffusers(base_file, tmp_path / "folder")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_diffusers(base_file, tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    without_pos_embed = {k: v for k, v in config.items() if k != "extra_pos_embed_type"}  # diffusers: "learnable"
    without_layers = {k: v for k, v in config.items() if k != "num_layers"}
    for bad, message in (({**config, "extra_pos_embed_type": "learnable"}, "extra_pos_embed_type 'learnable'"),
                         (without_pos_embed, "extra_pos_embed_type 'learnable', expected None"),
                         ({**config, "patch_size": [1, 2, 3]}, "patch_size [1, 2, 3], expected [1, 3, 3]"),
                         ({**config, "encoder_hidden_states_channels": 64}, "encoder_hidden_states_channels 64")):
        (tmp_path / "folder" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(f"not a Cosmos-Predict2.5 base transformer: {message}")):
            import_diffusers(tmp_path / "folder", tmp_path / "back.pt")
    (tmp_path / "folder" / "config.json").write_text(json.dumps(without_layers))
    with pytest.raises(ValueError, match="config.json lacks 'num_layers'"):
        import_diffusers(tmp_path / "folder", tmp_path / "back.pt")
    incomplete = load_checkpoint_file(base_file)
    del incomplete["net.final_layer.linear.weight"]
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match=re.escape("incomplete.pt is not a complete DiT checkpoint: missing keys (1): "
                                                   "['final_layer.linear.weight']")):
        export_diffusers(tmp_path / "incomplete.pt", tmp_path / "other")


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------


def test_not_a_checkpoint_folder_fails_on_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "convert.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{tmp_path} is not a DCP checkpoint folder" in result.stderr and "Traceback" not in result.stderr
    # a folder whose training state train.py's rotation deleted, keeping the exports
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "model_ema_bf16.pt").write_bytes(b"an export")
    result = subprocess.run([sys.executable, "convert.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert (f"{tmp_path}: its training state was deleted by train.py's keep_last rotation; the files exported from "
            f"it stay there (model_ema_bf16.pt)") in result.stderr


def test_base_of_another_model_size(lora_ckpt, base_file, converted, tmp_path):
    other = save_base(tmp_path / "other.pt", seed=1, cfg=replace(small_config(), crossattn_proj_in_channels=256))
    with pytest.raises(ValueError, match="another model size") as info:
        convert_checkpoint(lora_ckpt, tmp_path / "out", base=other, force=True)
    assert "mis-shaped" in str(info.value) and str(other) in str(info.value)
    assert not (tmp_path / "out").exists()
    partial = load_checkpoint_file(base_file)
    del partial["net.final_layer.linear.weight"]
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=re.escape("missing keys (1): ['final_layer.linear.weight']")):
        convert_checkpoint(lora_ckpt, tmp_path / "out", base=tmp_path / "partial.pt", force=True)
    with pytest.raises(ValueError, match=r"unexpected keys \(80\): \['blocks.0.self_attn.q_proj.lora_A.default"):
        convert_checkpoint(lora_ckpt, tmp_path / "out", base=converted / "model_ema_bf16.pt", force=True)
    assert not (tmp_path / "out").exists()


def test_base_with_another_fingerprint_needs_force(lora_ckpt, converted, tmp_path):
    other = save_base(tmp_path / "other.pt", seed=6)  # same shapes, other weights
    with pytest.raises(ValueError, match="pass --force"):
        convert_checkpoint(lora_ckpt, tmp_path / "out", base=other)
    convert_checkpoint(lora_ckpt, tmp_path / "out", base=other, force=True)
    got = load_checkpoint_file(tmp_path / "out" / "model_ema_fp32.pt", prefix="net.")
    original = load_checkpoint_file(converted / "model_ema_fp32.pt", prefix="net.")
    key, lora_key = "blocks.0.mlp.layer1.weight", "blocks.0.mlp.layer1.lora_A.default.weight"
    assert not torch.equal(got[key], original[key]) and torch.equal(got[lora_key], original[lora_key])


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_diffusers_after_a_plain_conversion_adds_only_its_files(lora_ckpt, converted, tmp_path):
    """--diffusers after a plain conversion writes the two missing files, as a conversion with --diffusers from the
    start does, and leaves the others alone; existing files still need --overwrite. Every file is readable like any
    new file (safetensors' save_file alone makes 0600 files)."""
    out = tmp_path / "out"
    convert_checkpoint(lora_ckpt, out)
    plain = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    convert.main([str(lora_ckpt), str(out), "--diffusers"])
    added = ["lora_ema_bf16_comfyui.safetensors", "lora_ema_bf16_diffusers.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*plain, *added])
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.name in plain} == plain
    for name in added:
        with safe_open(out / name, framework="pt") as f, safe_open(converted / name, framework="pt") as g:
            assert f.metadata() == g.metadata() and f.keys() == g.keys()
            assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask()}
    with pytest.raises(FileExistsError, match="lora_ema_bf16_diffusers.safetensors.*--overwrite"):
        convert_checkpoint(lora_ckpt, out, diffusers=True)
    # the plain files of another checkpoint are not this one's
    (out / added[0]).unlink()
    (out / added[1]).unlink()
    with safe_open(out / "lora_ema_bf16.safetensors", framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, out / "lora_ema_bf16.safetensors", {**metadata, "source_checkpoint": "/elsewhere/iter_1"})
    with pytest.raises(FileExistsError, match="was exported from /elsewhere/iter_1, not from .*--overwrite"):
        convert_checkpoint(lora_ckpt, out, diffusers=True)
    assert not (out / added[0]).exists() and not (out / added[1]).exists()


def test_existing_outputs_need_overwrite(lora_ckpt, tmp_path):
    (tmp_path / "model_ema_bf16.pt").write_text("precious")
    with pytest.raises(FileExistsError, match="model_ema_bf16.pt.*--overwrite"):
        convert_checkpoint(lora_ckpt, tmp_path)
    assert (tmp_path / "model_ema_bf16.pt").read_text() == "precious"
    assert not (tmp_path / "model.pt").exists()  # refused before writing anything
    convert_checkpoint(lora_ckpt, tmp_path, overwrite=True)
    assert load_checkpoint_file(tmp_path / "model_ema_bf16.pt")


def test_merge_refuses_other_bases_and_existing_outputs(converted, tmp_path, capsys):
    adapter = converted / "lora_ema_bf16.safetensors"
    other = save_base(tmp_path / "other.pt", seed=6)
    with pytest.raises(ValueError, match="pass --force"):
        merge(other, [(adapter, 1.0)], tmp_path / "merged.pt")
    capsys.readouterr()
    merge(other, [(adapter, 1.0)], tmp_path / "forced.pt", force=True)
    assert f"warning: adapter {adapter} was trained on " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:  # a scale that is no number, named as such
        convert.main(["merge", "--base", str(other), "--lora", f"{adapter}:abc", "-o", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "argument --lora: " in err and "must be a number, got 'abc'" in err
    small = save_base(tmp_path / "small.pt", seed=1, cfg=replace(small_config(), crossattn_proj_in_channels=256))
    with pytest.raises(ValueError, match="another model size"):
        merge(small, [(adapter, 1.0)], tmp_path / "merged.pt", force=True)
    with pytest.raises(ValueError, match="holds LoRA adapter keys"):
        merge(converted / "model_ema_bf16.pt", [(adapter, 1.0)], tmp_path / "merged.pt", force=True)
    with pytest.raises(ValueError, match="not a LoRA weight"):
        merge(other, [(converted / "model_ema_bf16.pt", 1.0)], tmp_path / "merged.pt", force=True)
    shutil.copy(other, tmp_path / "merged.pt")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge(other, [(adapter, 1.0)], tmp_path / "merged.pt", force=True)
