"""Checkpoint formats and conversions for the Cosmos-Predict2.5 DiT.

    python convert.py CKPT [OUT_DIR] [--base B] [--force] [--overwrite] [--diffusers]
    python convert.py merge --base B --lora L[:scale] [--lora L2:0.5 ...] -o out.pt
    python convert.py import-diffusers FOLDER -o out.pt
    python convert.py export-diffusers in.pt -o FOLDER

CKPT is a train.py checkpoint, `.../checkpoints/iter_000001000` (or `.../iter_000001000/model`, the reference's
form). It holds only what was trained (the LoRA adapter, or every parameter when fine-tuning fully) and its EMA.
The frozen base comes from meta.json's `base_checkpoint` (or --base); a random-init run's base is drawn again from
its seed. Written to OUT_DIR (default: CKPT), as the reference's scripts/convert_distcp_to_pt.py does:

  model.pt                   regular weights under `net.`, EMA weights under `net_ema.`: base + trained tensors
                             (each base tensor is stored once, shared by the two prefixes)
  model_ema_fp32.pt          the EMA weights alone under `net.`, every float tensor fp32
  model_ema_bf16.pt          the same with every fp32 tensor cast to bf16: the file for inference
  lora_ema_bf16.safetensors  (LoRA runs) the EMA adapter alone: `net.<module>.lora_A.default.weight` [r, in] and
                             `net.<module>.lora_B.default.weight` [out, r] in bf16 (the LoRA keys of
                             model_ema_bf16.pt); metadata: lora_rank, lora_alpha, lora_target_modules, dit_preset,
                             base_checkpoint, base_fingerprint, source_checkpoint, iteration
With --diffusers, also (LoRA runs):
  lora_ema_bf16_diffusers.safetensors  `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` plus
                             diffusers' `lora_adapter_metadata` (r, lora_alpha, target_modules), for
                             `Cosmos2_5_PredictBasePipeline.load_lora_weights`
  lora_ema_bf16_comfyui.safetensors    `diffusion_model.<module>.lora_down.weight` (A), `.lora_up.weight` (B) and
                             `.alpha`: ComfyUI's generic LoRA keys over the official module names

Keys are the official ones: the released checkpoints' keys, which are our `DiT.state_dict()` keys under `net.`.
A LoRA module's effect is W + alpha/rank * B @ A.
"""

import argparse
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lora import inject_lora
from model import (DIT_BOOKKEEPING_KEYS, DIT_PRESETS, DIT_ROPE_BUFFER_KEYS, DiT, DiTConfig, file_fingerprint,
                   infer_dit_config, load_checkpoint_file)
from prep_data import write_safetensors

# ----------------------------------------------------------------------------------------------------------------
# 1. Key maps: the official DiT layout <-> diffusers' CosmosTransformer3DModel layout
# ----------------------------------------------------------------------------------------------------------------


# official block-local name -> diffusers block-local name (both without the `.weight` suffix)
_BLOCK_MAP = {
    "self_attn.q_proj": "attn1.to_q",
    "self_attn.k_proj": "attn1.to_k",
    "self_attn.v_proj": "attn1.to_v",
    "self_attn.output_proj": "attn1.to_out.0",
    "self_attn.q_norm": "attn1.norm_q",
    "self_attn.k_norm": "attn1.norm_k",
    "cross_attn.q_proj": "attn2.to_q",
    "cross_attn.k_proj": "attn2.to_k",
    "cross_attn.v_proj": "attn2.to_v",
    "cross_attn.output_proj": "attn2.to_out.0",
    "cross_attn.q_norm": "attn2.norm_q",
    "cross_attn.k_norm": "attn2.norm_k",
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
    "adaln_modulation_self_attn.1": "norm1.linear_1",
    "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1",
    "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1",
    "adaln_modulation_mlp.2": "norm3.linear_2",
}
_TOP_MAP = {
    "x_embedder.proj.1": "patch_embed.proj",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "t_embedding_norm": "time_embed.norm",
    "crossattn_proj.0": "crossattn_proj.0",
    "final_layer.linear": "proj_out",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
}
# official keys with no diffusers counterpart: bookkeeping counters, and the RoPE tables diffusers recomputes
DIT_OFFICIAL_ONLY = re.compile(r"^(accum_\w+|pos_embedder\.(seq|dim_spatial_range|dim_temporal_range))$")


def _map_module(name, top, block, block_prefix_from, block_prefix_to):
    m = re.match(rf"^{re.escape(block_prefix_from)}(\d+)\.(.+)$", name)
    if m:
        idx, local = m.groups()
        if local in block:
            return f"{block_prefix_to}{idx}.{block[local]}"
    elif name in top:
        return top[name]
    return None


def dit_key_to_diffusers(key):
    """Official DiT key -> diffusers key. LoRA keys `<m>.lora_A.<adapter>.weight` become diffusers/PEFT keys
    `<m'>.lora_A.weight` (the adapter name is dropped, as diffusers' LoRA files have it)."""
    m = re.match(r"^(.+)\.(lora_[AB])\.[^.]+\.weight$", key)
    module, suffix = (m.group(1), f"{m.group(2)}.weight") if m else key.rsplit(".", 1)
    mapped = _map_module(module, _TOP_MAP, _BLOCK_MAP, "blocks.", "transformer_blocks.")
    if mapped is None:
        raise KeyError(f"no diffusers counterpart for official DiT key {key!r}")
    return f"{mapped}.{suffix}"


def dit_key_from_diffusers(key, adapter_name="default"):
    m = re.match(r"^(.+)\.(lora_[AB])\.weight$", key)
    module, suffix = (m.group(1), f"{m.group(2)}.{adapter_name}.weight") if m else key.rsplit(".", 1)
    top = {v: k for k, v in _TOP_MAP.items()}
    block = {v: k for k, v in _BLOCK_MAP.items()}
    mapped = _map_module(module, top, block, "transformer_blocks.", "blocks.")
    if mapped is None:
        raise KeyError(f"no official counterpart for diffusers key {key!r}")
    return f"{mapped}.{suffix}"


def dit_to_diffusers(state_dict):
    """Official DiT state dict -> diffusers CosmosTransformer3DModel state dict (drops bookkeeping and RoPE
    buffers, which diffusers does not store)."""
    return {dit_key_to_diffusers(k): v for k, v in state_dict.items() if not DIT_OFFICIAL_ONLY.match(k)}


def dit_from_diffusers(state_dict, adapter_name="default"):
    return {dit_key_from_diffusers(k, adapter_name): v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------
# 2. Checkpoints written by train.py: DCP sections "model" (trained tensors), "ema", "optim", "scheduler",
#    "trainer", and meta.json naming the base
# ----------------------------------------------------------------------------------------------------------------


def _dcp_load(checkpoint_dir, state):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)


def read_dcp(checkpoint_dir, section):
    """One section ("model", "ema", ...) of a train.py DCP checkpoint as a plain dict of CPU tensors, read in a
    single process (no torch.distributed needed), whatever the number of ranks that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir} is not a DCP checkpoint (no .metadata file)") from None
    prefix = section + "."
    tensors = {k[len(prefix):]: v for k, v in metadata.state_dict_metadata.items()
               if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not tensors:
        raise KeyError(f"{checkpoint_dir} has no tensors in section {section!r}")
    state = {section: {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in tensors.items()}}
    _dcp_load(checkpoint_dir, state)
    return state[section]


def read_iteration(checkpoint_dir):
    state = {"trainer": {"iteration": 0}}
    _dcp_load(checkpoint_dir, state)
    return state["trainer"]["iteration"]


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


def training_model_shapes(meta):
    """Key -> shape of the network train.py trained: the preset with its adapters (built on the meta device)."""
    with torch.device("meta"):
        net = DiT(DIT_PRESETS[meta["dit_preset"]])
        if meta["use_lora"]:
            inject_lora(net, meta["lora_target_modules"], rank=meta["lora_rank"], alpha=meta["lora_alpha"])
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def compare_keys(state_dict, expected, optional=()):
    """Missing, unexpected and mis-shaped keys of `state_dict` against `expected` (key -> shape)."""
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k}: {tuple(v.shape)}, expected {expected[k]}" for k, v in state_dict.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    return missing, unexpected, mis_shaped


def key_report(missing, unexpected, mis_shaped):
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if keys:
            lines.append(f"  {len(keys)} {title}: " + "; ".join(keys[:6]) + ("; ..." if len(keys) > 6 else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 3. The base weights of a run
# ----------------------------------------------------------------------------------------------------------------

# buffers our loader fills in when a file lacks them (bookkeeping counters; RoPE tables it computes)
OPTIONAL_KEYS = frozenset(DIT_BOOKKEEPING_KEYS + DIT_ROPE_BUFFER_KEYS)


def random_base(meta):
    """The base of a run with base_checkpoint="": train.py draws DiT(preset) right after torch.manual_seed(seed)
    and, when training LoRA, casts it to the compute dtype. Drawn here on the CPU (see the printed note)."""
    seed = int(meta["base_fingerprint"].removeprefix("random:"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DiT(DIT_PRESETS[meta["dit_preset"]])
    if meta["use_lora"]:
        net.to(getattr(torch, meta["config"]["dtype"]))
    return net.state_dict()


def load_base(meta, base=None):
    """-> (base state dict, its name, its fingerprint). A file is memory-mapped, not read into RAM."""
    recorded = meta["base_fingerprint"]
    if base is None and recorded.startswith("random:"):
        print(f"drawing the random-init base again from seed {recorded.removeprefix('random:')} on the CPU "
              f"(equal to the training base when train.py drew it on the CPU)")
        return random_base(meta), f"random init ({recorded})", recorded
    path = base or meta["base_checkpoint"]
    if not path:
        raise ValueError("meta.json names no base checkpoint; pass --base")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base checkpoint {path} does not exist"
                                + ("" if base else " (named in meta.json); pass --base"))
    return load_checkpoint_file(path, prefix="net."), str(path), file_fingerprint(path)


def check_base(base, base_name, fingerprint, trained, meta, checkpoint, force):
    """The base must hold every frozen tensor of the trained network with its shape, and be the base the run was
    trained on (same fingerprint) unless `force`."""
    shapes = training_model_shapes(meta)
    _, unexpected, mis_shaped = compare_keys(trained, shapes)
    if unexpected or mis_shaped:
        raise ValueError(f"{checkpoint} does not match its own meta.json ({describe(meta)}):\n"
                         f"{key_report([], unexpected, mis_shaped)}")
    missing, unexpected, mis_shaped = compare_keys(base, shapes, OPTIONAL_KEYS | trained.keys())
    unexpected += [k for k in base if ".lora_" in k and k in shapes]  # a LoRA run's output file is no base
    if missing or unexpected or mis_shaped:
        raise ValueError(f"base {base_name} does not fit {checkpoint} (trained as {describe(meta)}); a base of "
                         f"another model size?\n{key_report(missing, unexpected, mis_shaped)}")
    if fingerprint != meta["base_fingerprint"] and not force:
        trained_on = meta["base_checkpoint"] or "a random init"
        raise ValueError(f"base {base_name} has fingerprint {fingerprint}, but {checkpoint} was trained on "
                         f"{trained_on} (fingerprint {meta['base_fingerprint']}); pass --force to use this base "
                         f"anyway")


# ----------------------------------------------------------------------------------------------------------------
# 4. Writing files: never over an existing one unless asked, and never a truncated one
# ----------------------------------------------------------------------------------------------------------------


def refuse_existing(paths, overwrite):
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output file(s) exist: {', '.join(existing)}; pass --overwrite to replace them")


def write_file(path, write):
    """write(tmp_path), then rename: an interrupted conversion never leaves a truncated `<name>` behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def save_torch(state_dict, path):
    write_file(path, lambda tmp: torch.save(state_dict, tmp))


def save_safetensors(tensors, path, metadata):
    write_file(path, lambda tmp: write_safetensors(tensors, tmp, {"format": "pt", **metadata}))


def with_prefix(prefix, state_dict):
    return {prefix + k: v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------
# 5. Adapter files: ours, diffusers' and ComfyUI's
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One low-rank adapter: official module name -> (A [rank, in], B [out, rank]); W' = W + alpha/rank * B @ A."""
    modules: dict
    rank: int
    alpha: float
    metadata: dict  # str -> str, from the file (ours: provenance, see the module docstring)

    def state_dict(self, adapter_name="default"):
        """Our layout, the keys of `lora.lora_state_dict`: `<module>.lora_A.<name>.weight`, `...lora_B...`."""
        out = {}
        for module, (A, B) in self.modules.items():
            out[f"{module}.lora_A.{adapter_name}.weight"] = A
            out[f"{module}.lora_B.{adapter_name}.weight"] = B
        return out


OURS_KEY = re.compile(r"^(?:net\.)?(.+)\.lora_([AB])\.([^.]+)\.weight$")
DIFFUSERS_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")
COMFYUI_KEY = re.compile(r"^diffusion_model\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
COMFYUI_PART = {"lora_down.weight": "A", "lora_up.weight": "B"}


def make_adapter(parts, alpha, metadata, source):
    """parts: module -> {"A": tensor, "B": tensor}; checks that they pair up with one rank."""
    modules, ranks = {}, set()
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{source}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{source}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                             f"expected [r, in] and [out, r]")
        modules[module] = (A, B)
        ranks.add(A.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"{source}: expected one LoRA rank, found {sorted(ranks) or 'no LoRA weights'}")
    rank = ranks.pop()
    return Adapter(modules, rank, float(rank if alpha is None else alpha), metadata)


def read_tensors_with_metadata(path):
    """(tensors, safetensors metadata) of a .safetensors or torch file of flat tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    return load_checkpoint_file(path), {}


def read_adapter(path):
    """An adapter file in one of the layouts this file writes (ours, diffusers', ComfyUI's), told by its keys."""
    tensors, metadata = read_tensors_with_metadata(path)
    parts, alphas, layouts, names = {}, {}, set(), set()
    for key, value in tensors.items():
        if m := COMFYUI_KEY.match(key):
            layouts.add("comfyui")
            module, part = m.groups()
            if part == "alpha":
                alphas[module] = value.item()
                continue
            part = COMFYUI_PART[part]
        elif m := OURS_KEY.match(key):
            layouts.add("ours")
            module, part, name = m.groups()
            names.add(name)
        elif m := DIFFUSERS_KEY.match(key):
            layouts.add("diffusers")
            module, part = m.groups()
            module = dit_key_from_diffusers(module + ".weight").removesuffix(".weight")
        else:
            raise ValueError(f"{path}: {key!r} is not a LoRA weight; an adapter file has only "
                             f"`[net.]<module>.lora_A|lora_B.<name>.weight` (ours), "
                             f"`transformer.<module>.lora_A|lora_B.weight` (diffusers) or "
                             f"`diffusion_model.<module>.lora_down|lora_up.weight|alpha` (ComfyUI) keys")
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
    else:  # ComfyUI's, or no LoRA weights at all (make_adapter says so)
        if len(set(alphas.values())) > 1:
            raise ValueError(f"{path}: per-module alphas are not supported (found {sorted(set(alphas.values()))})")
        alpha = next(iter(alphas.values()), None)
    return make_adapter(parts, alpha, metadata, path)


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


def adapter_to_diffusers(adapter):
    """-> (tensors, metadata) for diffusers' `load_lora_weights`: PEFT keys under `transformer.`, and the
    LoraConfig it builds (rank, alpha, the exact target modules) in `lora_adapter_metadata`."""
    tensors, targets = {}, []
    for module, (A, B) in adapter.modules.items():
        name = dit_key_to_diffusers(module + ".weight").removesuffix(".weight")
        tensors[f"transformer.{name}.lora_A.weight"] = A
        tensors[f"transformer.{name}.lora_B.weight"] = B
        targets.append(name)
    config = {"transformer.r": adapter.rank, "transformer.lora_alpha": adapter.alpha,
              "transformer.target_modules": sorted(targets)}
    return tensors, {**adapter.metadata, "lora_adapter_metadata": json.dumps(config)}


def adapter_to_comfyui(adapter):
    tensors = {}
    for module, (A, B) in adapter.modules.items():
        tensors[f"diffusion_model.{module}.lora_down.weight"] = A
        tensors[f"diffusion_model.{module}.lora_up.weight"] = B
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# 6. DCP checkpoint -> consolidated files
# ----------------------------------------------------------------------------------------------------------------


def convert_checkpoint(checkpoint, out_dir=None, base=None, force=False, overwrite=False, diffusers=False):
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
    base_sd, base_name, fingerprint = load_base(meta, base)
    check_base(base_sd, base_name, fingerprint, trained, meta, checkpoint, force)
    print(f"{checkpoint}: {describe(meta)}, {len(trained)} trained tensors; base {base_name}")

    # one file at a time; base tensors are shared (memory-mapped), only casts and trained tensors are new
    out_dir.mkdir(parents=True, exist_ok=True)
    regular, averaged = {**base_sd, **trained}, {**base_sd, **ema}
    save_torch({**with_prefix("net.", regular), **with_prefix("net_ema.", averaged)}, out["model.pt"])
    del regular
    save_torch(with_prefix("net.", {k: v.float() if v.is_floating_point() else v for k, v in averaged.items()}),
               out["model_ema_fp32.pt"])
    bf16 = {k: v.bfloat16() if v.dtype == torch.float32 else v for k, v in averaged.items()}
    save_torch(with_prefix("net.", bf16), out["model_ema_bf16.pt"])
    if not use_lora:
        return out

    provenance = {"lora_rank": str(meta["lora_rank"]), "lora_alpha": str(meta["lora_alpha"]),
                  "lora_target_modules": meta["lora_target_modules"], "dit_preset": meta["dit_preset"],
                  "base_checkpoint": meta["base_checkpoint"], "base_fingerprint": meta["base_fingerprint"],
                  "source_checkpoint": str(checkpoint.resolve()), "iteration": str(read_iteration(checkpoint))}
    lora_keys = {k: bf16[k] for k in ema}
    save_safetensors(with_prefix("net.", lora_keys), out["lora_ema_bf16.safetensors"], provenance)
    return write_translations(read_adapter(out["lora_ema_bf16.safetensors"]), out) if diffusers else out


def write_translations(adapter, out):
    """--diffusers: the adapter of lora_ema_bf16.safetensors in diffusers' and ComfyUI's layouts."""
    tensors, metadata = adapter_to_diffusers(adapter)
    save_safetensors(tensors, out["lora_ema_bf16_diffusers.safetensors"], metadata)
    save_safetensors(adapter_to_comfyui(adapter), out["lora_ema_bf16_comfyui.safetensors"], adapter.metadata)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 7. Merge: base + adapters -> plain weights
# ----------------------------------------------------------------------------------------------------------------


def merge(base, loras, output, force=False, overwrite=False):
    """Fold adapters [(file, scale)] into an official-layout base: W + sum_i scale_i * alpha_i/rank_i * B_i @ A_i,
    summed in fp32 and rounded to the base's dtype once. Writes `net.<key>` plain weights."""
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
    save_torch(with_prefix("net.", merged), output)
    return output


# ----------------------------------------------------------------------------------------------------------------
# 8. diffusers CosmosTransformer3DModel folders (config.json + safetensors) <-> official-layout files
# ----------------------------------------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"


def diffusers_config(cfg: DiTConfig):
    return {"_class_name": "CosmosTransformer3DModel",
            "in_channels": cfg.in_channels + 1,  # diffusers counts the condition-mask channel in
            "out_channels": cfg.out_channels, "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "num_layers": cfg.num_blocks, "mlp_ratio": cfg.mlp_ratio,
            "text_embed_dim": cfg.crossattn_emb_channels, "adaln_lora_dim": cfg.adaln_lora_dim,
            "max_size": [cfg.max_frames, cfg.max_img_h, cfg.max_img_w],
            "patch_size": [cfg.patch_temporal, cfg.patch_spatial, cfg.patch_spatial],
            "rope_scale": [cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio,
                           cfg.rope_w_extrapolation_ratio],
            "concat_padding_mask": cfg.concat_padding_mask, "extra_pos_embed_type": None,
            "use_crossattn_projection": cfg.use_crossattn_projection,
            "crossattn_proj_in_channels": cfg.crossattn_proj_in_channels,
            "encoder_hidden_states_channels": cfg.crossattn_emb_channels}


def dit_config_from_diffusers(config, source):
    def need(key):
        if key not in config:
            raise ValueError(f"{source} lacks {key!r}")
        return config[key]

    need("extra_pos_embed_type")  # absent means diffusers' default, "learnable"
    extras = {k: config[k] for k in ("extra_pos_embed_type", "controlnet_block_every_n", "img_context_dim_in")
              if config.get(k) is not None}  # a Predict2.5 base has no learnable position embedding, no ControlNet
    if config.get("_class_name", "CosmosTransformer3DModel") != "CosmosTransformer3DModel" or extras:
        raise ValueError(f"{source} is not a Cosmos-Predict2.5 base transformer ({config.get('_class_name')}, "
                         f"{extras})")
    pt, ph, pw = need("patch_size")
    frames, height, width = need("max_size")
    rope_t, rope_h, rope_w = need("rope_scale")
    if ph != pw:
        raise ValueError(f"{source}: non-square patch_size {need('patch_size')}")
    if need("use_crossattn_projection") and need("encoder_hidden_states_channels") != need("text_embed_dim"):
        raise ValueError(f"{source}: encoder_hidden_states_channels must equal text_embed_dim")
    return DiTConfig(max_img_h=height, max_img_w=width, max_frames=frames, in_channels=need("in_channels") - 1,
                     out_channels=need("out_channels"), patch_spatial=ph, patch_temporal=pt,
                     concat_padding_mask=need("concat_padding_mask"),
                     model_channels=need("num_attention_heads") * need("attention_head_dim"),
                     num_blocks=need("num_layers"), num_heads=need("num_attention_heads"), mlp_ratio=need("mlp_ratio"),
                     crossattn_emb_channels=need("text_embed_dim"),
                     use_crossattn_projection=need("use_crossattn_projection"),
                     crossattn_proj_in_channels=need("crossattn_proj_in_channels"),
                     adaln_lora_dim=need("adaln_lora_dim"), rope_h_extrapolation_ratio=rope_h,
                     rope_w_extrapolation_ratio=rope_w, rope_t_extrapolation_ratio=rope_t)


def official_shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}


def import_diffusers(folder, output, overwrite=False):
    """A diffusers CosmosTransformer3DModel folder (one safetensors file or shards with an index) -> `net.<key>`.
    The RoPE tables and bookkeeping counters, which diffusers does not store, stay absent (our loader computes
    them)."""
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
    tensors = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    state_dict = dit_from_diffusers(tensors)
    expected = {k: v for k, v in official_shapes(cfg).items() if not DIT_OFFICIAL_ONLY.match(k)}
    problems = compare_keys(state_dict, expected)
    if any(problems):
        raise ValueError(f"{folder} does not match its config.json:\n{key_report(*problems)}")
    save_torch(with_prefix("net.", state_dict), output)
    return output


def export_diffusers(checkpoint, folder, overwrite=False):
    """An official-layout file (plain weights) -> a diffusers CosmosTransformer3DModel folder. The config is the
    preset whose shapes the file has (cosmos_2b, cosmos_14b, tiny)."""
    folder = Path(folder)
    out = [folder / "config.json", folder / DIFFUSERS_WEIGHTS, folder / DIFFUSERS_INDEX]
    refuse_existing(out, overwrite)
    state_dict = load_checkpoint_file(checkpoint, prefix="net.")
    if any(".lora_" in k for k in state_dict):
        raise ValueError(f"{checkpoint} holds LoRA adapter keys; fold them into plain weights first "
                         f"(`convert.py merge --base BASE --lora lora_ema_bf16.safetensors -o merged.pt`)")
    cfg = infer_dit_config(state_dict, checkpoint)
    problems = compare_keys(state_dict, official_shapes(cfg), OPTIONAL_KEYS)
    if any(problems):
        raise ValueError(f"{checkpoint} is not a complete DiT checkpoint:\n{key_report(*problems)}")
    folder.mkdir(parents=True, exist_ok=True)
    out[2].unlink(missing_ok=True)  # a stale shard index would shadow the new single file
    save_safetensors({k: v.contiguous() for k, v in dit_to_diffusers(state_dict).items()}, out[1], {})
    write_file(out[0], lambda tmp: tmp.write_text(json.dumps(diffusers_config(cfg), indent=2) + "\n"))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# 9. Command line
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
    if argv and argv[0] == "merge":
        p = argparse.ArgumentParser(prog="convert.py merge", description=(
            "Fold LoRA adapters into a base: W + scale * alpha/rank * B @ A for each adapted module; writes plain "
            "weights under `net.` (the official layout), loadable anywhere a released checkpoint is."))
        p.add_argument("--base", required=True, help="official-layout base checkpoint (e.g. *_ema_bf16.pt)")
        p.add_argument("--lora", required=True, action="append", type=parse_lora_arg, metavar="FILE[:SCALE]",
                       help="adapter file (ours, diffusers' or ComfyUI's) and its scale (default 1); repeatable")
        p.add_argument("-o", "--output", required=True, help="output .pt file")
        p.add_argument("--force", action="store_true", help="merge an adapter trained on another base")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        a = p.parse_args(argv[1:])
        return merge(a.base, a.lora, a.output, force=a.force, overwrite=a.overwrite)
    if argv and argv[0] == "import-diffusers":
        p = argparse.ArgumentParser(prog="convert.py import-diffusers", description=(
            "A diffusers CosmosTransformer3DModel folder (config.json + safetensors, sharded or not) -> one "
            "official-layout .pt file (`net.<key>`)."))
        p.add_argument("folder")
        p.add_argument("-o", "--output", required=True, help="output .pt file")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        a = p.parse_args(argv[1:])
        return import_diffusers(a.folder, a.output, overwrite=a.overwrite)
    if argv and argv[0] == "export-diffusers":
        p = argparse.ArgumentParser(prog="convert.py export-diffusers", description=(
            "An official-layout .pt file of plain weights -> a diffusers CosmosTransformer3DModel folder "
            f"(config.json + {DIFFUSERS_WEIGHTS}). Fold adapters in with `merge` first."))
        p.add_argument("checkpoint")
        p.add_argument("-o", "--output", required=True, help="output folder")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        a = p.parse_args(argv[1:])
        return export_diffusers(a.checkpoint, a.output, overwrite=a.overwrite)
    p = argparse.ArgumentParser(prog="convert.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__,
                                epilog="`convert.py merge|import-diffusers|export-diffusers --help` for the others.")
    p.add_argument("checkpoint", help="train.py checkpoint folder .../checkpoints/iter_000001000 (or its /model)")
    p.add_argument("out_dir", nargs="?", help="output folder (default: the checkpoint folder)")
    p.add_argument("--base", help="base checkpoint to use instead of the one named in meta.json")
    p.add_argument("--force", action="store_true", help="accept a base whose fingerprint differs from the recorded")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--diffusers", action="store_true", help="also write the adapter for diffusers and ComfyUI")
    a = p.parse_args(argv)
    return convert_checkpoint(a.checkpoint, a.out_dir, base=a.base, force=a.force, overwrite=a.overwrite,
                              diffusers=a.diffusers)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise SystemExit(f"convert.py: error: {message}") from None
