"""Wan2.1 VAE: official key layout, parity with diffusers' AutoencoderKLWan, chunked encode, strict loading."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from model import WanVAE, WanVAEConfig, _vae_blend_ramp, _vae_tile_starts
from vae_keys import wan_vae_diffusers_to_official, wan_vae_official_to_diffusers

FIXTURE = Path(__file__).parent / "fixtures" / "wan_vae_keys.txt"
SMALL = WanVAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=2, temperal_downsample=(False, True, True))
SMALL_B = WanVAEConfig(dim=12, dim_mult=(1, 2, 4, 4), num_res_blocks=1, temperal_downsample=(True, False, True))


def random_vae(cfg, seed=0):
    """A small VAE with every tensor random (gains and biases too, not their 1/0 init)."""
    torch.manual_seed(seed)
    model = WanVAE(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        # diffusers clamps its decode output to [-1,1] and we do not: keep outputs inside so the clamp is a no-op
        model.decoder.head["2"].weight.mul_(0.1)
    return model


def diffusers_twin(model):
    cfg = model.cfg
    ref = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample))
    ref.load_state_dict(wan_vae_official_to_diffusers(model.state_dict(), cfg), strict=True)
    return ref.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_default_config_matches_official_key_set():
    with torch.device("meta"):
        model = WanVAE()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {}
    for line in FIXTURE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            expected[key] = tuple(int(s) for s in shape.split(","))
    assert len(expected) == 194
    assert shapes == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 126_892_531
    # the key map covers the whole released layout, both ways, onto diffusers' default AutoencoderKLWan
    with torch.device("meta"):
        ref_shapes = {k: tuple(v.shape) for k, v in AutoencoderKLWan().state_dict().items()}
    assert {k: tuple(v.shape) for k, v in wan_vae_official_to_diffusers(model.state_dict()).items()} == ref_shapes
    assert set(wan_vae_diffusers_to_official(ref_shapes)) == set(shapes)
    with pytest.raises(KeyError, match=r"encoder\.downsamples\.0\.residual\.1\.weight"):
        wan_vae_official_to_diffusers({"encoder.downsamples.0.residual.1.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"decoder\.mid_block\.resnets\.2\.conv1\.weight"):
        wan_vae_diffusers_to_official({"decoder.mid_block.resnets.2.conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize("cfg,hw", [(SMALL, (16, 24)), (SMALL_B, (16, 16))])
def test_parity_with_diffusers(cfg, hw):
    model = random_vae(cfg)
    ref = diffusers_twin(model)
    # the oracle's latent statistics (its Wan2.1 config), not our constants
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    torch.manual_seed(1)
    for T in (1, 5, 9):
        video = torch.rand(2, 3, T, *hw) * 2 - 1
        latents = model.encode(video)
        assert latents.shape == (2, 16, 1 + (T - 1) // 4, hw[0] // 8, hw[1] // 8)
        with torch.no_grad():
            ref_latents = (ref.encode(video).latent_dist.mode() - mean) / std  # diffusers returns raw mu
        assert rel_err(latents, ref_latents) <= 1e-4, T
        assert rel_err(model.encode(video, temporal_window=4), ref_latents) <= 1e-4, T

        decoded = model.decode(latents)
        assert decoded.shape == video.shape
        assert decoded.abs().max() < 1  # diffusers' clamp changed nothing
        with torch.no_grad():
            ref_decoded = ref.decode(latents * std + mean).sample
        assert rel_err(decoded, ref_decoded) <= 1e-4, T


def test_chunked_encode_equals_one_shot():
    model = random_vae(SMALL)
    torch.manual_seed(2)
    video = torch.rand(1, 3, 21, 16, 16) * 2 - 1
    one_shot = model.encode(video, temporal_window=20)  # frame 0, then all 20 frames in one window
    assert one_shot.shape == (1, 16, 6, 2, 2)
    for window in (4, 8, 16):  # 16 leaves a remainder window of 4 frames
        chunked = model.encode(video, temporal_window=window)
        torch.testing.assert_close(chunked, one_shot, rtol=1e-5, atol=1e-5 * one_shot.abs().max().item())
    with pytest.raises(ValueError, match="temporal_window must be a positive multiple of 4"):
        model.encode(video, temporal_window=6)


def test_encoder_trains_under_autograd():
    """The encoder's in-place inference path (norms written straight into the conv's padded buffer) switches to
    out-of-place ops when autograd records: same numbers, and every parameter gets a gradient."""
    model = random_vae(SMALL)
    torch.manual_seed(3)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    chunks = [video[:, :, :1], video[:, :, 1:]]
    with torch.no_grad():
        cache = {}
        expected = torch.cat([model.encoder(c, cache) for c in chunks], dim=2)
    cache = {}
    h = torch.cat([model.encoder(c, cache) for c in chunks], dim=2)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-6)
    h.square().mean().backward()
    grads = {n: p.grad for n, p in model.encoder.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                            if g is None or not g.abs().sum()]


def test_tiled_decode():
    model = random_vae(SMALL)
    torch.manual_seed(3)
    latents = torch.randn(1, 16, 3, 10, 14)
    untiled = model.decode(latents)
    # one tile covering the frame goes through the tiled path and gives the untiled result
    torch.testing.assert_close(model.decode(latents, tile_hw=(16, 16)), untiled, rtol=0, atol=0)
    # several tiles: close, not equal (each tile's attention and receptive field stop at its border)
    tiled = model.decode(latents, tile_hw=(8, 8))
    assert tiled.shape == untiled.shape and 1e-4 < rel_err(tiled, untiled) < 0.1
    with pytest.raises(ValueError, match=r"tile_hw must be at least 4 x 4.*\(2, 8\)"):
        model.decode(latents, tile_hw=(2, 8))

    # the tiling and blending are exact for a spatially local decoder: every pixel's weights sum to one
    def local_decoder(z_B_C_t_h_w):  # nearest upsampling of 3 latent channels, 1 + 4(t-1) frames
        B, C, t, h, w = z_B_C_t_h_w.shape
        return torch.nn.functional.interpolate(z_B_C_t_h_w[:, :3], size=(1 + 4 * (t - 1), 8 * h, 8 * w))

    model.decode_frames = local_decoder
    expected = model.decode(latents)
    for tile_hw in ((6, 8), (4, 4), (4, 14)):
        torch.testing.assert_close(model.decode(latents, tile_hw=tile_hw), expected, rtol=1e-6, atol=1e-6)

    # tiles cover the axis with >= a quarter tile of overlap; weights ramp across the overlap to each neighbour
    assert _vae_tile_starts(22, 8) == [0, 6, 12, 14] and _vae_tile_starts(8, 8) == [0]
    first, middle = _vae_blend_ramp(0, 8, 22, 8, "cpu"), _vae_blend_ramp(6, 8, 22, 8, "cpu")
    assert torch.equal(middle, middle.flip(0)) and bool((middle[16:48] == 1).all())
    assert 0 < middle[0] and bool((middle[1:17] > middle[:16]).all())
    assert bool((first[:48] == 1).all()) and torch.equal(first[48:], middle[48:])


def test_bad_shapes_raise():
    model = random_vae(SMALL)
    with pytest.raises(ValueError, match=r"\[B,3,1\+4k,H,W\].*\[1, 3, 4, 16, 16\]"):
        model.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 8.*\[1, 3, 5, 12, 16\]"):
        model.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match=r"latents \[B,16,t,h,w\].*\[1, 4, 2, 2, 2\]"):
        model.decode(torch.zeros(1, 4, 2, 2, 2))


def test_bf16_close_to_fp32():
    model = random_vae(SMALL)
    model_bf16 = WanVAE(SMALL).to(torch.bfloat16)
    model_bf16.load_state_dict(model.state_dict())
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents, latents_bf16 = model.encode(video), model_bf16.encode(video)
    assert latents_bf16.dtype == torch.bfloat16 and rel_err(latents_bf16.float(), latents) < 2e-2
    decoded_bf16 = model_bf16.decode(latents)
    assert decoded_bf16.dtype == torch.bfloat16 and rel_err(decoded_bf16.float(), model.decode(latents)) < 5e-2


def test_from_pretrained_strict(tmp_path):
    model = random_vae(SMALL)
    good = tmp_path / "tokenizer.pth"
    torch.save(model.state_dict(), good)
    loaded = WanVAE.from_pretrained(good, cfg=SMALL)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    loaded = WanVAE.from_pretrained(good, dtype=torch.float32, cfg=SMALL)
    for (k, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k

    def broken(name, edit):
        sd = dict(model.state_dict())
        edit(sd)
        torch.save(sd, tmp_path / name)
        return tmp_path / name

    missing = broken("missing.pth", lambda sd: sd.pop("decoder.head.2.bias"))
    with pytest.raises(ValueError, match=r"missing\.pth(.|\n)*missing keys \(1\): \['decoder\.head\.2\.bias'\]"):
        WanVAE.from_pretrained(missing, cfg=SMALL)
    extra = broken("extra.pth", lambda sd: sd.update({"vae.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"extra\.pth(.|\n)*unexpected keys \(1\): \['vae\.extra'\]"):
        WanVAE.from_pretrained(extra, cfg=SMALL)
    shaped = broken("shape.pth", lambda sd: sd.update({"conv2.weight": torch.zeros(16, 16, 1, 1)}))
    with pytest.raises(ValueError, match=r"shape\.pth(.|\n)*conv2\.weight: file \(16, 16, 1, 1\), "
                                         r"expected \(16, 16, 1, 1, 1\)"):
        WanVAE.from_pretrained(shaped, cfg=SMALL)
    # without a config, the file's shapes give it; a config given explicitly must match the file
    inferred = WanVAE.from_pretrained(good, dtype=torch.float32)
    assert {k: v.shape for k, v in inferred.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tokenizer\.pth does not match(.|\n)*"
                                         r"encoder\.conv1\.weight: file \(8, 3, 3, 3, 3\)"):
        WanVAE.from_pretrained(good, cfg=WanVAEConfig())

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth is not a PyTorch checkpoint"):
        WanVAE.from_pretrained(text, cfg=SMALL)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": model.state_dict()}, nested)
    with pytest.raises(ValueError, match=r"nested\.pth: expected a flat dict of tensors"):
        WanVAE.from_pretrained(nested, cfg=SMALL)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth does not exist"):
        WanVAE.from_pretrained(tmp_path / "absent.pth", cfg=SMALL)
