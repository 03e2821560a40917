"""Key maps between the Wan VAE's official layout (tokenizer.pth, model.WanVAE) and diffusers' AutoencoderKLWan, for
the parity tests (tests/test_vae.py) and bench/bench_vae.py. The encoder's flat `downsamples` list has the same
indices as diffusers' `down_blocks`; the decoder's flat `upsamples` list is split into stages there: each stage has
num_res_blocks + 1 res-blocks, then (except the last) one upsampler."""

import re

from model import WanVAEConfig

_RES_BLOCK_NAMES = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                        ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_RESAMPLE_NAMES = (("resample.1.", "resample.1."), ("time_conv.", "time_conv."))
_FIXED_NAMES = (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
                    ("middle.1.", "mid_block.attentions.0."))


def _rename(name, pairs, key, reverse=False):
    for official, diffusers in pairs:
        src, dst = (diffusers, official) if reverse else (official, diffusers)
        if name.startswith(src):
            return dst + name[len(src):]
    raise KeyError(f"not a Wan VAE {'diffusers' if reverse else 'official'} key: {key}")


def _official_key_to_diffusers(key, num_res_blocks):
    if key.startswith(("conv1.", "conv2.")):
        return {"conv1": "quant_conv", "conv2": "post_quant_conv"}[key[:5]] + key[5:]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(f"not a Wan VAE official key: {key}")
    if m := re.fullmatch(r"downsamples\.(\d+)\.(.*)", rest):
        rest = f"down_blocks.{m[1]}." + _rename(m[2], _RES_BLOCK_NAMES + _RESAMPLE_NAMES, key)
    elif m := re.fullmatch(r"upsamples\.(\d+)\.(.*)", rest):
        stage, j = divmod(int(m[1]), num_res_blocks + 2)
        rest = (f"up_blocks.{stage}.upsamplers.0." + _rename(m[2], _RESAMPLE_NAMES, key)
                if j == num_res_blocks + 1 else
                f"up_blocks.{stage}.resnets.{j}." + _rename(m[2], _RES_BLOCK_NAMES, key))
    elif m := re.fullmatch(r"middle\.([02])\.(.*)", rest):
        rest = f"mid_block.resnets.{int(m[1]) // 2}." + _rename(m[2], _RES_BLOCK_NAMES, key)
    else:
        rest = _rename(rest, _FIXED_NAMES, key)
    return f"{side}.{rest}"


def _diffusers_key_to_official(key, num_res_blocks):
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return ("conv1" if key.startswith("quant_conv.") else "conv2") + key[key.index("."):]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(f"not a Wan VAE diffusers key: {key}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.*)", rest):
        rest = f"downsamples.{m[1]}." + _rename(m[2], _RES_BLOCK_NAMES + _RESAMPLE_NAMES, key, True)
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        index = int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1
        rest = f"upsamples.{index}." + _rename(m[2], _RESAMPLE_NAMES, key, True)
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        index = int(m[1]) * (num_res_blocks + 2) + int(m[2])
        rest = f"upsamples.{index}." + _rename(m[3], _RES_BLOCK_NAMES, key, True)
    elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.*)", rest):
        rest = f"middle.{2 * int(m[1])}." + _rename(m[2], _RES_BLOCK_NAMES, key, True)
    else:
        rest = _rename(rest, _FIXED_NAMES, key, True)
    return f"{side}.{rest}"


def wan_vae_official_to_diffusers(state_dict, cfg: WanVAEConfig | None = None):
    """tokenizer.pth / WanVAE state dict -> diffusers AutoencoderKLWan state dict (same tensors, renamed)."""
    num_res_blocks = (cfg or WanVAEConfig()).num_res_blocks
    return {_official_key_to_diffusers(k, num_res_blocks): v for k, v in state_dict.items()}


def wan_vae_diffusers_to_official(state_dict, cfg: WanVAEConfig | None = None):
    """diffusers AutoencoderKLWan state dict -> tokenizer.pth / WanVAE state dict (same tensors, renamed)."""
    num_res_blocks = (cfg or WanVAEConfig()).num_res_blocks
    return {_diffusers_key_to_official(k, num_res_blocks): v for k, v in state_dict.items()}
