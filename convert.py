"""Checkpoint formats and conversions for the Cosmos-Predict2.5 DiT.

    python convert.py [convert] CKPT [OUT_DIR] [--base B] [--force] [--overwrite] [--diffusers]
    python convert.py merge --base B --lora L[:scale] [--lora L2:0.5 ...] -o out.pt
    python convert.py import-diffusers FOLDER -o out.pt
    python convert.py export-diffusers in.pt -o FOLDER

CKPT is a train.py checkpoint, `.../checkpoints/iter_000001000` (or its `/model`, the reference's form): only what
was trained (the LoRA adapter, or every parameter when fine-tuning fully) and its EMA. The frozen base comes from
meta.json's `base_checkpoint` (or --base); a random-init run's base is drawn again from its seed. Written to OUT_DIR
(default: CKPT), as the reference's scripts/convert_distcp_to_pt.py does:

  model.pt                   regular weights under `net.`, EMA weights under `net_ema.` (base tensors stored once)
  model_ema_fp32.pt          the EMA weights alone under `net.`, every float tensor fp32
  model_ema_bf16.pt          the same with every fp32 tensor cast to bf16: the file for inference
  lora_ema_bf16.safetensors  (LoRA runs) the LoRA keys of model_ema_bf16.pt, `net.<module>.lora_A|B.default.weight`,
                             and where they come from: lora_rank, lora_alpha, lora_target_modules, dit_preset,
                             base_checkpoint, base_fingerprint, source_checkpoint, iteration
  --diffusers:               the adapter also for diffusers' `load_lora_weights` (`lora_ema_bf16_diffusers.safetensors`:
                             PEFT keys, `lora_adapter_metadata`) and for ComfyUI (`lora_ema_bf16_comfyui.safetensors`)

Keys are the official ones (the released checkpoints' keys: our `DiT.state_dict()` keys under `net.`). A LoRA
module's effect is W + alpha/rank * B @ A, with A [rank, in] and B [out, rank].
"""

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lora import inject_lora
from model import (DIT_BOOKKEEPING_KEYS, DIT_PRESETS, DIT_ROPE_BUFFER_KEYS, DiT, DiTConfig, check_keys,
                   file_fingerprint, infer_dit_config, load_checkpoint_file)
from prep_data import write_atomic, write_safetensors

# ----------------------------------------------------------------------------------------------------------------
# Key layouts: official <-> diffusers' CosmosTransformer3DModel, and the strict key check
# ----------------------------------------------------------------------------------------------------------------

# official module name -> diffusers' (block modules by their name inside `blocks.<i>` / `transformer_blocks.<i>`)
TOP_NAMES = {
    "x_embedder.proj.1": "patch_embed.proj", "t_embedding_norm": "time_embed.norm",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "crossattn_proj.0": "crossattn_proj.0", "final_layer.linear": "proj_out",
    "final_layer.adaln_modulation.1": "norm_out.linear_1", "final_layer.adaln_modulation.2": "norm_out.linear_2",
}
ATTENTION_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "output_proj": "to_out.0",
                   "q_norm": "norm_q", "k_norm": "norm_k"}
BLOCK_NAMES = {
    **{f"self_attn.{k}": f"attn1.{v}" for k, v in ATTENTION_NAMES.items()},
    **{f"cross_attn.{k}": f"attn2.{v}" for k, v in ATTENTION_NAMES.items()},
    "mlp.layer1": "ff.net.0.proj", "mlp.layer2": "ff.net.2",
    "adaln_modulation_self_attn.1": "norm1.linear_1", "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1", "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1", "adaln_modulation_mlp.2": "norm3.linear_2",
}
# target layout -> (top-level names, block names, block prefix, the target's block prefix)
RENAMES = {
    "diffusers": (TOP_NAMES, BLOCK_NAMES, "blocks.", "transformer_blocks."),
    "official": ({v: k for k, v in TOP_NAMES.items()}, {v: k for k, v in BLOCK_NAMES.items()},
                 "transformer_blocks.", "blocks."),
}
# official keys diffusers does not store (it recomputes the RoPE tables); our loader fills them in
DIT_OFFICIAL_ONLY = frozenset(DIT_BOOKKEEPING_KEYS + DIT_ROPE_BUFFER_KEYS)


def rename_module(name, to):
    """A module name in the other layout (`to`: "diffusers" or "official")."""
    top, block, prefix, new_prefix = RENAMES[to]
    m = re.match(rf"^{re.escape(prefix)}(\d+)\.(.+)$", name)
    if m and m.group(2) in block:
        return f"{new_prefix}{m.group(1)}.{block[m.group(2)]}"
    if not m and name in top:
        return top[name]
    raise KeyError(f"no {to} counterpart for module {name!r}")


def dit_key_to_diffusers(key):
    """Official DiT key -> diffusers key; LoRA keys `<m>.lora_A.<adapter>.weight` lose the adapter name, as in
    diffusers' LoRA files: `<m'>.lora_A.weight`."""
    m = re.match(r"^(.+)\.(lora_[AB])\.[^.]+\.weight$", key)
    module, suffix = (m.group(1), f"{m.group(2)}.weight") if m else key.rsplit(".", 1)
    return f"{rename_module(module, 'diffusers')}.{suffix}"


def dit_to_diffusers(state_dict):
    return {dit_key_to_diffusers(k): v for k, v in state_dict.items() if k not in DIT_OFFICIAL_ONLY}


def official_shapes(cfg, meta=None):
    """Key -> shape of DiT(cfg), with the adapters of a train.py run's meta.json (built on the meta device)."""
    with torch.device("meta"):
        net = DiT(cfg)
        if meta and meta["use_lora"]:
            inject_lora(net, meta["lora_target_modules"], rank=meta["lora_rank"], alpha=meta["lora_alpha"])
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing files: never over an existing one unless asked, and never a truncated one
# ----------------------------------------------------------------------------------------------------------------


def refuse_existing(paths, overwrite):
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output file(s) exist: {', '.join(existing)}; pass --overwrite to replace them")


def save(path, obj, metadata=None):
    """Tensors to a .safetensors or torch file, or a dict to a .json file, written as `<name>.partial` and renamed:
    an interrupted conversion never leaves a truncated file behind."""
    path = Path(path)

    def write(tmp):
        if path.suffix == ".safetensors":
            write_safetensors(obj, tmp, {"format": "pt", **(metadata or {})})
        elif path.suffix == ".json":
            tmp.write_text(json.dumps(obj, indent=2) + "\n")
        else:
            torch.save(obj, tmp)

    write_atomic(path, write)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def with_prefix(prefix, state_dict):
    return {prefix + k: v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------
# train.py checkpoint (DCP sections "model": the trained tensors, "ema", ...; meta.json names the base) -> files
# ----------------------------------------------------------------------------------------------------------------


def read_dcp(checkpoint_dir, section):
    """One section ("model", "ema", ...) of a train.py DCP checkpoint as a dict of CPU tensors, read in one process
    whatever the number of ranks that wrote it."""
    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    prefix = section + "."
    tensors = {k[len(prefix):]: v for k, v in metadata.state_dict_metadata.items()
               if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not tensors:
        raise KeyError(f"{checkpoint_dir} has no tensors in section {section!r}")
    state = {section: {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in tensors.items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)
    return state[section]


def find_checkpoint(path):
    """A train.py checkpoint folder and its meta.json; `<iteration>/model` (the reference's form) is accepted."""
    path = Path(path)
    if path.name == "model" and not path.exists() and (path.parent / ".metadata").is_file():
        path = path.parent  # our checkpoints keep every section in the iteration folder itself
    if not (path / ".metadata").is_file():
        if (path / "meta.json").is_file():  # train.py's keep_last rotation keeps exported files and meta.json
            kept = ", ".join(sorted(f.name for f in path.iterdir() if f.name != "meta.json"))
            raise ValueError(f"{path}: its training state was deleted by train.py's keep_last rotation; the files "
                             f"exported from it stay there ({kept})")
        latest = path / "latest_checkpoint.txt"
        hint = f"; the latest one here is {path / latest.read_text().strip()}" if latest.is_file() else ""
        raise ValueError(f"{path} is not a DCP checkpoint folder (no .metadata); expected a train.py checkpoint "
                         f"such as .../checkpoints/iter_000001000{hint}")
    if not (path / "meta.json").is_file():
        raise ValueError(f"{path} has no meta.json: not a checkpoint written by train.py")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("dit_preset") not in DIT_PRESETS:
        raise ValueError(f"{path}/meta.json: unknown dit_preset {meta.get('dit_preset')!r} "
                         f"(known: {', '.join(DIT_PRESETS)})")
    return path, meta


def describe(meta):
    lora = (f"LoRA rank {meta['lora_rank']}, alpha {meta['lora_alpha']} on {meta['lora_target_modules']}"
            if meta["use_lora"] else "full fine-tuning")
    return f"dit_preset {meta['dit_preset']!r}, {lora}"


def load_base(meta, checkpoint, trained, base=None, force=False):
    """-> (state dict, name) of the run's base, checked: every frozen tensor of the trained network with its shape,
    and the base the run was trained on (same fingerprint) unless `force`. A file is memory-mapped, not read."""
    recorded = meta["base_fingerprint"]
    if base is None and recorded.startswith("random:"):
        seed = int(recorded.removeprefix("random:"))
        print(f"drawing the random-init base again from seed {seed} on the CPU "
              f"(equal to the training base when train.py drew it on the CPU)")
        with torch.random.fork_rng(devices=[]):  # as train.py: DiT(preset) right after torch.manual_seed(seed)
            torch.manual_seed(seed)
            net = DiT(DIT_PRESETS[meta["dit_preset"]])
        if meta["use_lora"]:  # train.py casts a LoRA run's frozen base to the compute dtype
            net.to(getattr(torch, meta["config"]["dtype"]))
        state_dict, name, fingerprint = net.state_dict(), f"random init ({recorded})", recorded
    else:
        path = base or meta["base_checkpoint"]
        if not path:
            raise ValueError("meta.json names no base checkpoint; pass --base")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"base checkpoint {path} does not exist"
                                    + ("" if base else " (named in meta.json); pass --base"))
        state_dict, name, fingerprint = load_checkpoint_file(path, prefix="net."), str(path), file_fingerprint(path)

    shapes = official_shapes(DIT_PRESETS[meta["dit_preset"]], meta)
    check_keys(trained, shapes, f"{checkpoint} does not match its own meta.json ({describe(meta)})", ValueError,
               optional=shapes)
    frozen = {k: v for k, v in shapes.items() if ".lora_" not in k}  # a LoRA run's output file is no base
    check_keys(state_dict, frozen, f"base {name} does not fit {checkpoint} (trained as {describe(meta)}); a base "
               f"of another model size?", ValueError, optional=DIT_OFFICIAL_ONLY | trained.keys())
    if fingerprint != recorded and not force:
        trained_on = meta["base_checkpoint"] or "a random init"
        raise ValueError(f"base {name} has fingerprint {fingerprint}, but {checkpoint} was trained on {trained_on} "
                         f"(fingerprint {recorded}); pass --force to use this base anyway")
    return state_dict, name


def convert_checkpoint(checkpoint, out_dir=None, base=None, force=False, overwrite=False, diffusers=False):
    """A train.py checkpoint -> the files of the module docstring; returns {file name: path}."""
    checkpoint, meta = find_checkpoint(checkpoint)
    out_dir = Path(out_dir) if out_dir else checkpoint
    use_lora = meta["use_lora"]
    if diffusers and not use_lora:
        raise ValueError(f"--diffusers exports a LoRA adapter, and {checkpoint} is a full fine-tuning checkpoint; "
                         f"export the whole network with `convert.py export-diffusers model_ema_bf16.pt -o FOLDER`")
    names = ["model.pt", "model_ema_fp32.pt", "model_ema_bf16.pt"]
    names += ["lora_ema_bf16.safetensors"] if use_lora else []
    names += ["lora_ema_bf16_diffusers.safetensors", "lora_ema_bf16_comfyui.safetensors"] if diffusers else []
    out = {name: out_dir / name for name in names}
    if diffusers and not overwrite and all(out[name].exists() for name in names[:4]):
        # --diffusers after a plain conversion: only the translations of its adapter file are missing
        adapter = read_adapter(out["lora_ema_bf16.safetensors"])
        if adapter.metadata.get("source_checkpoint") != str(checkpoint.resolve()):
            raise FileExistsError(f"{out['lora_ema_bf16.safetensors']} was exported from "
                                  f"{adapter.metadata.get('source_checkpoint')}, not from {checkpoint}; pass "
                                  f"--overwrite to replace the files in {out_dir}")
        refuse_existing([out[name] for name in names[4:]], overwrite)
        return write_translations(adapter, out)
    refuse_existing(out.values(), overwrite)

    trained, ema = read_dcp(checkpoint, "model"), read_dcp(checkpoint, "ema")
    if trained.keys() != ema.keys():
        raise ValueError(f"{checkpoint}: sections 'model' and 'ema' hold different keys: "
                         f"{sorted(trained.keys() ^ ema.keys())[:6]}")
    base_sd, base_name = load_base(meta, checkpoint, trained, base, force)
    print(f"{checkpoint}: {describe(meta)}, {len(trained)} trained tensors; base {base_name}")

    # one file at a time; base tensors are shared (memory-mapped), only casts and trained tensors are new
    out_dir.mkdir(parents=True, exist_ok=True)
    regular, averaged = {**base_sd, **trained}, {**base_sd, **ema}
    save(out["model.pt"], {**with_prefix("net.", regular), **with_prefix("net_ema.", averaged)})
    del regular
    fp32 = {k: v.float() if v.is_floating_point() else v for k, v in averaged.items()}
    save(out["model_ema_fp32.pt"], with_prefix("net.", fp32))
    del fp32
    bf16 = {k: v.bfloat16() if v.dtype == torch.float32 else v for k, v in averaged.items()}
    save(out["model_ema_bf16.pt"], with_prefix("net.", bf16))
    if not use_lora:
        return out

    recorded = ("lora_rank", "lora_alpha", "lora_target_modules", "dit_preset", "base_checkpoint", "base_fingerprint",
                "iteration")
    provenance = {**{k: str(meta[k]) for k in recorded}, "source_checkpoint": str(checkpoint.resolve())}
    save(out["lora_ema_bf16.safetensors"], with_prefix("net.", {k: bf16[k] for k in ema}), provenance)
    return write_translations(read_adapter(out["lora_ema_bf16.safetensors"]), out) if diffusers else out


# ----------------------------------------------------------------------------------------------------------------
# Adapter files (ours, diffusers' and ComfyUI's), and merging them into a base
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One low-rank adapter: official module name -> (A [rank, in], B [out, rank]); W' = W + alpha/rank * B @ A."""
    modules: dict
    rank: int
    alpha: float
    metadata: dict  # str -> str, from the file (ours: provenance, see the module docstring)

    def state_dict(self, adapter_name="default"):
        """Our layout, the keys of `lora.lora_state_dict`."""
        out = {}
        for module, (A, B) in self.modules.items():
            out[f"{module}.lora_A.{adapter_name}.weight"] = A
            out[f"{module}.lora_B.{adapter_name}.weight"] = B
        return out


# layout -> the pattern of its keys: the module, its part (A, B, or ComfyUI's down/up/alpha), our adapter name
ADAPTER_KEYS = {
    "ours": re.compile(r"^(?:net\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<name>[^.]+)\.weight$"),
    "diffusers": re.compile(r"^(?:transformer\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$"),
    "comfyui": re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"),
}
COMFYUI_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


def read_adapter(path):
    """An adapter file in one of the layouts this file writes (ours, diffusers', ComfyUI's), told by its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    else:
        tensors, metadata = load_checkpoint_file(path), {}
    parts, alphas, layouts, names = {}, {}, set(), set()
    for key, value in tensors.items():
        for layout, pattern in ADAPTER_KEYS.items():
            if m := pattern.match(key):
                break
        else:
            raise ValueError(f"{path}: {key!r} is not a LoRA weight; an adapter file has only "
                             f"`[net.]<module>.lora_A|lora_B.<name>.weight` (ours), "
                             f"`transformer.<module>.lora_A|lora_B.weight` (diffusers) or "
                             f"`diffusion_model.<module>.lora_down|lora_up.weight|alpha` (ComfyUI) keys")
        layouts.add(layout)
        module, part = m["module"], COMFYUI_PARTS.get(m["part"], m["part"])
        if layout == "ours":
            names.add(m["name"])
        elif layout == "diffusers":
            module = rename_module(module, "official")
        if part == "alpha":
            alphas[module] = value.item()
        else:
            parts.setdefault(module, {})[part] = value
    if len(layouts) > 1 or len(names) > 1:
        raise ValueError(f"{path} mixes adapter layouts {sorted(layouts)} or adapter names {sorted(names)}")
    layout = layouts.pop() if layouts else None
    if layout == "ours":
        alpha = metadata.get("lora_alpha")
    elif layout == "diffusers":
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        if config.get("transformer.rank_pattern") or config.get("transformer.alpha_pattern"):
            raise ValueError(f"{path}: per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported")
        alpha = config.get("transformer.lora_alpha")
    else:  # ComfyUI's, or no LoRA weights at all (said below)
        if len(set(alphas.values())) > 1:
            raise ValueError(f"{path}: per-module alphas are not supported (found {sorted(set(alphas.values()))})")
        alpha = next(iter(alphas.values()), None)

    modules, ranks = {}, set()
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{path}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                             f"expected [r, in] and [out, r]")
        modules[module] = (A, B)
        ranks.add(A.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks) or 'no LoRA weights'}")
    rank = ranks.pop()
    return Adapter(modules, rank, float(rank if alpha is None else alpha), metadata)


def check_adapter_base(adapter, path, base, fingerprint, force):
    """An adapter of ours records the fingerprint of the base it was trained on: another base is refused, or with
    `force` taken with a warning (adapters of other tools record none)."""
    recorded = adapter.metadata.get("base_fingerprint")
    if recorded and recorded != fingerprint:
        trained_on = adapter.metadata.get("base_checkpoint") or "a random init"
        message = f"adapter {path} was trained on {trained_on} (fingerprint {recorded}), not on {base} ({fingerprint})"
        if not force:
            raise ValueError(f"{message}; pass --force to use it anyway")
        print(f"warning: {message}; using it anyway (--force)")


def write_translations(adapter, out):
    """--diffusers: the adapter in diffusers' layout (PEFT keys under `transformer.`, and in
    `lora_adapter_metadata` the LoraConfig `load_lora_weights` builds) and in ComfyUI's."""
    theirs, comfyui = {}, {}
    for module, (A, B) in adapter.modules.items():
        name = rename_module(module, "diffusers")
        theirs[f"transformer.{name}.lora_A.weight"] = A
        theirs[f"transformer.{name}.lora_B.weight"] = B
        comfyui[f"diffusion_model.{module}.lora_down.weight"] = A
        comfyui[f"diffusion_model.{module}.lora_up.weight"] = B
        comfyui[f"diffusion_model.{module}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    config = {"transformer.r": adapter.rank, "transformer.lora_alpha": adapter.alpha,
              "transformer.target_modules": sorted(rename_module(m, "diffusers") for m in adapter.modules)}
    save(out["lora_ema_bf16_diffusers.safetensors"], theirs,
         {**adapter.metadata, "lora_adapter_metadata": json.dumps(config)})
    save(out["lora_ema_bf16_comfyui.safetensors"], comfyui, adapter.metadata)
    return out


def merge(base, loras, output, force=False, overwrite=False):
    """Fold LoRA adapters (file, scale) into an official-layout base: W + the sum of scale * alpha/rank * B @ A over
    the adapters, in fp32, rounded to the base's dtype once. Writes plain weights under `net.`, loadable anywhere a
    released checkpoint is."""
    output = Path(output)
    refuse_existing([output], overwrite)
    weights = load_checkpoint_file(base, prefix="net.")
    if any(".lora_" in k for k in weights):
        raise ValueError(f"base {base} holds LoRA adapter keys (a LoRA run's model_ema_*.pt?); merge that run's "
                         f"lora_ema_bf16.safetensors into the original base instead")
    fingerprint = file_fingerprint(base)
    terms = {}  # weight key -> [(factor, A, B)]
    for path, scale in loras:
        adapter = read_adapter(path)
        check_adapter_base(adapter, path, base, fingerprint, force)
        for module, (A, B) in adapter.modules.items():
            key = module + ".weight"
            if key not in weights:
                raise KeyError(f"adapter {path} adapts {module}, but base {base} has no {key}")
            if tuple(weights[key].shape) != (B.shape[0], A.shape[1]):
                raise ValueError(f"adapter {path} does not fit base {base}: {module} is {tuple(weights[key].shape)}"
                                 f" there, the adapter makes {(B.shape[0], A.shape[1])} (another model size?)")
            terms.setdefault(key, []).append((scale * adapter.alpha / adapter.rank, A, B))
    merged = dict(weights)
    for key, adapters in terms.items():
        w = weights[key].to(torch.float32, copy=True)
        for factor, A, B in adapters:
            w.addmm_(B.float(), A.float(), alpha=factor)
        merged[key] = w.to(weights[key].dtype)
    save(output, with_prefix("net.", merged))
    return output


# ----------------------------------------------------------------------------------------------------------------
# diffusers CosmosTransformer3DModel folders (config.json + safetensors) <-> official-layout files
# ----------------------------------------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
# diffusers config key -> DiTConfig field(s); in_channels, attention_head_dim and the rest are derived below
DIFFUSERS_CONFIG = {
    "out_channels": "out_channels", "num_attention_heads": "num_heads", "num_layers": "num_blocks",
    "mlp_ratio": "mlp_ratio", "text_embed_dim": "crossattn_emb_channels", "adaln_lora_dim": "adaln_lora_dim",
    "concat_padding_mask": "concat_padding_mask", "use_crossattn_projection": "use_crossattn_projection",
    "crossattn_proj_in_channels": "crossattn_proj_in_channels",
    "max_size": ("max_frames", "max_img_h", "max_img_w"),
    "patch_size": ("patch_temporal", "patch_spatial", "patch_spatial"),
    "rope_scale": ("rope_t_extrapolation_ratio", "rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio"),
}
# what a config.json without these keys means to diffusers
DIFFUSERS_DEFAULTS = {"_class_name": "CosmosTransformer3DModel", "extra_pos_embed_type": "learnable",
                      "controlnet_block_every_n": None, "img_context_dim_in": None}


def diffusers_config(cfg: DiTConfig):
    config = {"_class_name": "CosmosTransformer3DModel",
              "in_channels": cfg.in_channels + 1,  # diffusers counts the condition-mask channel in
              "attention_head_dim": cfg.head_dim, "extra_pos_embed_type": None,
              "encoder_hidden_states_channels": cfg.crossattn_emb_channels}
    for key, field in DIFFUSERS_CONFIG.items():
        config[key] = [getattr(cfg, f) for f in field] if isinstance(field, tuple) else getattr(cfg, field)
    return config


def dit_config_from_diffusers(config, source):
    """The DiTConfig of a diffusers config.json, which diffusers_config must write back as it is: a Predict2.5 base
    transformer (no learnable position embedding, no ControlNet, square patches)."""
    missing = [k for k in [*DIFFUSERS_CONFIG, "in_channels", "attention_head_dim"] if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(map(repr, missing))}")
    fields = {"in_channels": config["in_channels"] - 1,
              "model_channels": config["num_attention_heads"] * config["attention_head_dim"]}
    for key, field in DIFFUSERS_CONFIG.items():
        if isinstance(field, tuple):
            fields.update(zip(field, config[key]))
        else:
            fields[field] = config[key]
    cfg = DiTConfig(**fields)
    given, expected = {**DIFFUSERS_DEFAULTS, **config}, {**DIFFUSERS_DEFAULTS, **diffusers_config(cfg)}
    wrong = [f"{k} {given.get(k)!r}, expected {v!r}" for k, v in expected.items() if given.get(k) != v]
    if wrong:
        raise ValueError(f"{source} is not a Cosmos-Predict2.5 base transformer: {'; '.join(wrong)}")
    return cfg


def import_diffusers(folder, output, overwrite=False):
    """A diffusers CosmosTransformer3DModel folder (config.json + safetensors, sharded or not) -> one official-layout
    .pt file (`net.<key>`), without the RoPE tables and counters diffusers does not store (our loader makes them)."""
    folder, output = Path(folder), Path(output)
    refuse_existing([output], overwrite)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (for a pipeline folder pass its transformer/ folder)")
    cfg = dit_config_from_diffusers(json.loads((folder / "config.json").read_text()), folder / "config.json")
    if (folder / DIFFUSERS_INDEX).is_file():
        files = sorted(set(json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        files = [DIFFUSERS_WEIGHTS]
    else:
        raise FileNotFoundError(f"{folder} has neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")
    state_dict = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                module, suffix = key.rsplit(".", 1)
                state_dict[f"{rename_module(module, 'official')}.{suffix}"] = f.get_tensor(key)
    expected = {k: v for k, v in official_shapes(cfg).items() if k not in DIT_OFFICIAL_ONLY}
    check_keys(state_dict, expected, f"{folder} does not match its config.json", ValueError)
    save(output, with_prefix("net.", state_dict))
    return output


def export_diffusers(checkpoint, folder, overwrite=False):
    """An official-layout .pt file of plain weights -> a diffusers CosmosTransformer3DModel folder (config.json +
    diffusion_pytorch_model.safetensors) of the preset whose shapes the file has. Fold adapters in with `merge`."""
    folder = Path(folder)
    out = [folder / "config.json", folder / DIFFUSERS_WEIGHTS, folder / DIFFUSERS_INDEX]
    refuse_existing(out, overwrite)
    state_dict = load_checkpoint_file(checkpoint, prefix="net.")
    if any(".lora_" in k for k in state_dict):
        raise ValueError(f"{checkpoint} holds LoRA adapter keys; fold them into plain weights first "
                         f"(`convert.py merge --base BASE --lora lora_ema_bf16.safetensors -o merged.pt`)")
    cfg = infer_dit_config(state_dict, checkpoint)
    check_keys(state_dict, official_shapes(cfg), f"{checkpoint} is not a complete DiT checkpoint", ValueError,
               optional=DIT_OFFICIAL_ONLY)
    folder.mkdir(parents=True, exist_ok=True)
    out[2].unlink(missing_ok=True)  # a stale shard index would shadow the new single file
    save(out[1], {k: v.contiguous() for k, v in dit_to_diffusers(state_dict).items()})
    save(out[0], diffusers_config(cfg))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_lora_arg(spec):
    """--lora's argparse type, here and in sample.py: 'file[:scale]' -> (Path, scale); a file whose own name holds
    ':' is taken whole."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or Path(spec).is_file():
        path, scale = spec, "1"
    try:
        scale = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec}: the scale after the last ':' must be a number, got {scale!r} "
                                         f"(and there is no file {spec})") from None
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{spec}: adapter file {path} does not exist")
    return Path(path), scale


def main(argv):
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__, formatter_class=raw)
    commands = p.add_subparsers(dest="command")
    c = commands.add_parser("convert", description=__doc__, formatter_class=raw)
    c.add_argument("checkpoint", help="train.py checkpoint folder .../checkpoints/iter_000001000 (or its /model)")
    c.add_argument("out_dir", nargs="?", help="output folder (default: the checkpoint folder)")
    c.add_argument("--base", help="base checkpoint to use instead of the one named in meta.json")
    c.add_argument("--diffusers", action="store_true", help="also write the adapter for diffusers and ComfyUI")
    m = commands.add_parser("merge", description=merge.__doc__)
    m.add_argument("--base", required=True, help="official-layout base checkpoint (e.g. *_ema_bf16.pt)")
    m.add_argument("--lora", dest="loras", required=True, action="append", type=parse_lora_arg, metavar="FILE[:SCALE]",
                   help="adapter file (ours, diffusers' or ComfyUI's) and its scale (default 1); repeatable")
    m.add_argument("-o", "--output", required=True, help="output .pt file")
    i = commands.add_parser("import-diffusers", description=import_diffusers.__doc__)
    i.add_argument("folder")
    i.add_argument("-o", "--output", required=True, help="output .pt file")
    e = commands.add_parser("export-diffusers", description=export_diffusers.__doc__)
    e.add_argument("checkpoint")
    e.add_argument("-o", "--output", dest="folder", required=True, help="output folder")
    for sub in (c, m):
        sub.add_argument("--force", action="store_true", help="use a base other than the recorded one (by fingerprint)")
    for sub in (c, m, i, e):
        sub.add_argument("--overwrite", action="store_true", help="replace existing output files")
    if not argv or argv[0] not in [*commands.choices, "-h", "--help"]:
        argv = ["convert", *argv]  # `convert.py CKPT ...` is `convert.py convert CKPT ...`
    args = vars(p.parse_args(argv))
    run = {"convert": convert_checkpoint, "merge": merge, "import-diffusers": import_diffusers,
           "export-diffusers": export_diffusers}[args.pop("command")]
    return run(**args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise SystemExit(f"convert.py: error: {message}") from None
