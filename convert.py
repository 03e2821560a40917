"""Checkpoint formats: the official DiT layout <-> diffusers' CosmosTransformer3DModel layout.

Official keys are the released checkpoint's without the `net.` prefix (= our `DiT.state_dict()` keys).
"""

import re

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
# DCP checkpoints written by train.py
# ----------------------------------------------------------------------------------------------------------------


def read_dcp(checkpoint_dir, section):
    """One section ("model", "ema", ...) of a train.py DCP checkpoint as a plain dict of CPU tensors, read in a
    single process (no torch.distributed needed), whatever the number of ranks that wrote it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(checkpoint_dir))
    try:
        metadata = reader.read_metadata()
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir} is not a DCP checkpoint (no .metadata file)") from None
    prefix = section + "."
    tensors = {k[len(prefix):]: v for k, v in metadata.state_dict_metadata.items()
               if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not tensors:
        raise KeyError(f"{checkpoint_dir} has no tensors in section {section!r}")
    state = {section: {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in tensors.items()}}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state[section]
