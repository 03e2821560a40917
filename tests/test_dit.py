"""The DiT against the official key layout and against diffusers' CosmosTransformer3DModel (the test oracle)."""

import contextlib
import gc
import math
import re
import weakref
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convert import dit_key_to_diffusers, dit_to_diffusers
from lora import inject_lora, lora_state_dict, mark_only_lora_trainable
from model import DIT_PRESETS, BlockInputOffload, DiT, DiTConfig

SPEC_KEYS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "dit_2b_state_dict_keys.txt"


def read_spec_keys():
    keys = {}
    for line in SPEC_KEYS.read_text().splitlines():
        m = re.match(r"^(\S+) \[([\d, ]*)\] (\w+)$", line)
        if m:
            keys[m.group(1)] = tuple(int(s) for s in m.group(2).split(",") if s.strip())
    return keys


def meta_dit(preset):
    with torch.device("meta"):
        return DiT(DIT_PRESETS[preset])


def test_2b_keys_and_shapes_equal_the_official_checkpoint():
    spec = read_spec_keys()
    assert len(spec) == 576
    ours = {k: tuple(v.shape) for k, v in meta_dit("cosmos_2b").state_dict().items()}
    assert ours == spec


def test_parameter_counts():
    assert sum(p.numel() for p in meta_dit("cosmos_2b").parameters()) == 2_059_174_912
    assert sum(p.numel() for p in meta_dit("cosmos_14b").parameters()) == 14_368_047_104


def test_14b_keys_follow_the_2b_layout():
    spec = read_spec_keys()
    ours = meta_dit("cosmos_14b").state_dict()
    blocks_2b = {k for k in spec if not k.startswith("blocks.")} | {k for k in spec if k.startswith("blocks.0.")}
    assert {k for k in ours if not k.startswith("blocks.") or k.startswith("blocks.0.")} == blocks_2b
    assert len(ours) == 736
    assert tuple(ours["t_embedder.1.linear_2.weight"].shape) == (15360, 5120)
    assert tuple(ours["blocks.35.mlp.layer1.weight"].shape) == (20480, 5120)
    assert tuple(ours["crossattn_proj.0.weight"].shape) == (1024, 100352)


# ------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------------------


def torchvision_shim():
    """diffusers resizes the padding mask with torchvision, which does not install beside the CPU torch here.
    Its tensor `resize` with NEAREST is torch's nearest interpolation."""
    functional = types.SimpleNamespace(
        resize=lambda t, size, interpolation=None: F.interpolate(t, size=size, mode="nearest"))
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def small_config(head_dim=32, num_heads=2, num_blocks=2):
    return DiTConfig(model_channels=head_dim * num_heads, num_heads=num_heads, num_blocks=num_blocks,
                     adaln_lora_dim=16, crossattn_emb_channels=40, crossattn_proj_in_channels=72,
                     attention_backend="sdpa")


def randomize(model, seed=0):
    """Random weights everywhere (the reference init zeroes the adaLN up-projections, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def diffusers_twin(cfg, our_model):
    from diffusers import CosmosTransformer3DModel
    import diffusers.models.transformers.transformer_cosmos as tc

    tc.transforms = torchvision_shim()
    theirs = CosmosTransformer3DModel(
        in_channels=cfg.in_channels + 1, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.num_blocks, mlp_ratio=cfg.mlp_ratio,
        text_embed_dim=cfg.crossattn_emb_channels, adaln_lora_dim=cfg.adaln_lora_dim,
        max_size=(cfg.max_frames, cfg.max_img_h, cfg.max_img_w), patch_size=(1, 2, 2),
        rope_scale=(cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio),
        concat_padding_mask=True, extra_pos_embed_type=None, use_crossattn_projection=True,
        crossattn_proj_in_channels=cfg.crossattn_proj_in_channels,
        encoder_hidden_states_channels=cfg.crossattn_emb_channels)
    # the official q/k RMSNorm uses eps 1e-6 (Transformer Engine); diffusers builds them with 1e-5
    for name, module in theirs.named_modules():
        if name.endswith(("norm_q", "norm_k")):
            module.eps = 1e-6
    theirs.load_state_dict(dit_to_diffusers(our_model.state_dict()), strict=True)
    return theirs.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("num_cond_frames", [0, 1, 2])
@pytest.mark.parametrize("head_dim,per_frame_sigma", [(32, False), (64, True)])
def test_forward_matches_diffusers(num_cond_frames, head_dim, per_frame_sigma):
    torch.manual_seed(num_cond_frames + head_dim)
    cfg = small_config(head_dim=head_dim)
    ours = DiT(cfg).eval()
    randomize(ours, seed=head_dim)
    theirs = diffusers_twin(cfg, ours)

    B, T, H, W = 2, 3, 4, 6  # non-square latents, batch > 1
    x = torch.randn(B, 16, T, H, W)
    cond_mask = torch.zeros(B, 1, T, H, W)
    cond_mask[:, :, :num_cond_frames] = 1
    padding_mask = torch.zeros(1, 1, 8 * H, 8 * W)
    text = torch.randn(B, 7, cfg.crossattn_proj_in_channels)
    if per_frame_sigma:
        sigma = torch.rand(B, T)
        their_t = sigma[:, None, :, None, None]
    else:
        sigma = torch.rand(B)
        their_t = sigma
    with torch.no_grad():
        out = ours(x, sigma, text, condition_mask=cond_mask, padding_mask=padding_mask.expand(B, -1, -1, -1))
        ref = theirs(x, their_t, text, condition_mask=cond_mask, padding_mask=padding_mask, return_dict=False)[0]
    assert out.shape == (B, 16, T, H, W)
    assert rel_err(out, ref) <= 1e-5


def test_lora_matches_peft_on_diffusers():
    from peft import LoraConfig

    torch.manual_seed(0)
    cfg = small_config()
    ours = DiT(cfg).eval()
    randomize(ours, seed=1)
    theirs = diffusers_twin(cfg, ours)
    inject_lora(ours, rank=4, alpha=8)
    with torch.no_grad():  # non-zero B so the adapters matter
        for k, v in lora_state_dict(ours).items():
            v.normal_(0, 0.1)
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    peft_sd = theirs.state_dict()
    mapped = {}
    for k, v in lora_state_dict(ours).items():
        dk = dit_key_to_diffusers(k).replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        assert dk in peft_sd, dk
        mapped[dk] = v
    assert len(mapped) == sum(1 for k in peft_sd if ".lora_" in k) == 2 * 2 * 10
    theirs.load_state_dict(mapped, strict=False)  # only the adapter tensors; every one accounted for above

    x, text, sigma = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, cfg.crossattn_proj_in_channels), torch.rand(1)
    with torch.no_grad():
        out = ours(x, sigma, text, padding_mask=torch.zeros(1, 1, 32, 32))
        ref = theirs(x, sigma, text, condition_mask=torch.zeros(1, 1, 2, 4, 4),
                     padding_mask=torch.zeros(1, 1, 32, 32), return_dict=False)[0]
    assert rel_err(out, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------------


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = DiT(small_config()).eval()
    randomize(model, seed)
    return model


def tiny_inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.rand(1, generator=g),
            torch.randn(1, 5, 72, generator=g))


def test_zero_init_adapters_leave_outputs_bit_identical():
    model = tiny_model()
    x = tiny_inputs()
    with torch.no_grad():
        before = model(*x)
        inject_lora(model, rank=4, alpha=4)
        after = model(*x)
    assert torch.equal(before, after)


def test_lora_counts_on_2b():
    model = meta_dit("cosmos_2b")
    adapted = inject_lora(model, rank=32, alpha=32)
    mark_only_lora_trainable(model)
    assert len(adapted) == 280
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 45_875_200
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    keys = set(model.state_dict())
    assert "blocks.0.self_attn.q_proj.weight" in keys  # base keeps its official name
    assert "blocks.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "blocks.27.mlp.layer2.lora_B.default.weight" in keys


def test_adapter_math():
    from lora import LoRALinear

    torch.manual_seed(0)
    lin = LoRALinear(torch.nn.Linear(24, 40, bias=False))
    lin.add_adapter("default", rank=4, alpha=8)
    torch.nn.init.normal_(lin.lora_B["default"].weight)
    x = torch.randn(3, 5, 24)
    W, A, B = lin.weight, lin.lora_A["default"].weight, lin.lora_B["default"].weight
    assert torch.allclose(lin(x), x @ W.T + 2.0 * (x @ A.T) @ B.T, atol=1e-5)


def test_merge_unmerge_and_scales():
    from lora import merge_lora, set_adapter_scale, unmerge_lora

    model = tiny_model()
    x = tiny_inputs()
    inject_lora(model, rank=4, alpha=4, adapter_name="a")
    inject_lora(model, rank=2, alpha=4, adapter_name="b")
    with torch.no_grad():
        for name in ("a", "b"):
            for v in lora_state_dict(model, name).values():
                v.normal_(0, 0.2)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        adapted = model(*x)
        merge_lora(model, "a")
        merge_lora(model, "b")
        merged = model(*x)
        assert rel_err(merged, adapted) < 1e-5
        unmerge_lora(model, "a")
        unmerge_lora(model, "b")
        for k, v in model.state_dict().items():
            if k in base:
                assert torch.allclose(v, base[k], atol=1e-6), k
        set_adapter_scale(model, "b", 0.0)
        only_a = model(*x)
        set_adapter_scale(model, "a", 0.0)
        neither = model(*x)
        plain = tiny_model()(*x)
    assert rel_err(neither, plain) < 1e-5  # merge/unmerge leaves only fp32 rounding in the base (2.6e-7 here)
    assert rel_err(only_a, adapted) > 1e-3 and rel_err(only_a, plain) > 1e-3


def test_inject_before_or_after_loading_base_gives_the_same_model():
    source = tiny_model(seed=3)
    base_sd = {k: v.clone() for k, v in source.state_dict().items()}
    x = tiny_inputs()

    after = DiT(small_config())
    after.load_official_state_dict(base_sd)
    inject_lora(after, rank=4, alpha=4)

    before = DiT(small_config())
    inject_lora(before, rank=4, alpha=4)
    before.load_official_state_dict(base_sd)
    with torch.no_grad():
        for m in (after, before):
            for k, v in lora_state_dict(m).items():
                v.copy_(torch.full_like(v, 0.01))
        assert torch.equal(after(*x), before(*x))
        assert rel_err(after(*x), source(*x)) > 1e-4  # the adapters do act


# ------------------------------------------------------------------------------------------------------------
# Loading and bad input
# ------------------------------------------------------------------------------------------------------------


def save_checkpoint(tmp_path, state_dict, name="ckpt.pt"):
    path = tmp_path / name
    torch.save({f"net.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()},
               path)
    return path


def test_from_pretrained_roundtrip_and_rope_buffers_from_checkpoint(tmp_path):
    source = tiny_model()
    sd = source.state_dict()
    sd["pos_embedder.dim_spatial_range"] = sd["pos_embedder.dim_spatial_range"] + 1e-3  # stored values are used
    path = save_checkpoint(tmp_path, sd)
    loaded = DiT.from_pretrained(path, cfg=small_config(), dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k].to(torch.bfloat16).to(v.dtype)), k


def test_bookkeeping_and_rope_buffers_may_be_absent(tmp_path):
    model = tiny_model()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("accum_", "pos_embedder."))}
    loaded = DiT.from_pretrained(save_checkpoint(tmp_path, sd), cfg=small_config())
    assert loaded.accum_iteration.item() == 0
    for k in ("seq", "dim_spatial_range", "dim_temporal_range"):  # computed as the model computes them
        assert torch.equal(getattr(loaded.pos_embedder, k), getattr(model.pos_embedder, k).bfloat16()), k


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_the_key(tmp_path, problem):
    sd = tiny_model().state_dict()
    if problem == "missing":
        del sd["blocks.1.mlp.layer2.weight"]
        expected = "blocks.1.mlp.layer2.weight"
    elif problem == "extra":
        sd["blocks.1.mlp.layer3.weight"] = torch.zeros(2)
        expected = "blocks.1.mlp.layer3.weight"
    else:
        sd["blocks.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        expected = "blocks.0.self_attn.q_proj.weight"
    with pytest.raises(KeyError, match=re.escape(expected)) as info:
        DiT.from_pretrained(save_checkpoint(tmp_path, sd), cfg=small_config())
    assert {"missing": "missing", "extra": "unexpected", "shape": "mis-shaped"}[problem] in str(info.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        DiT.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        DiT.from_pretrained(tmp_path / "missing.pt")


def test_latent_not_divisible_by_patch():
    model = tiny_model()
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 16, 2, 5, 4), torch.rand(1), torch.randn(1, 5, 72))


@pytest.mark.parametrize("checkpointing, message", [
    ("none", "set activation_checkpointing='full' or 'selective' (got 'none')"),
    ("selective", "needs a CUDA device (got cpu)")])
def test_offload_block_inputs_needs_checkpointing_and_cuda(checkpointing, message):
    model = tiny_model()
    model.activation_checkpointing, model.offload_block_inputs = checkpointing, True
    with pytest.raises(ValueError, match=re.escape(message)):
        model(torch.randn(1, 16, 2, 4, 4), torch.rand(1), torch.randn(1, 5, 72))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_fused_elementwise_functions_compile_whole_and_keep_the_gradients(monkeypatch, checkpointing, dtype):
    """On CUDA the DiT runs its elementwise functions (those marked @fused_on_cuda in model.py) through torch.compile,
    where a graph break would silently split each back into several kernels. Here each is compiled on the CPU with
    fullgraph=True, so a graph break fails (aot_eager: Dynamo's tracing and AOTAutograd's backward, no code
    generation), inside a forward and backward, with and without selective checkpointing; each must be compiled."""
    import model as model_module
    from torch._dynamo.backends.registry import lookup_backend

    names = re.findall(r"^@fused_on_cuda\ndef (\w+)", Path(model_module.__file__).read_text(), re.M)
    assert sorted(names) == ["apply_rope", "gated_residual", "modulate", "rms_norm_fp32"]
    model = tiny_model().to(dtype)
    model.activation_checkpointing = checkpointing
    x, sigma, text = tiny_inputs()

    def grads():
        model.zero_grad()
        out = model(x, sigma, text)
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_out, want_grads = grads()
    torch._dynamo.reset()
    graphs = {name: 0 for name in names}

    def counting(name):
        def backend(gm, example_inputs):
            graphs[name] += 1
            return lookup_backend("aot_eager")(gm, example_inputs)
        return backend

    for name in names:
        eager = getattr(model_module, name).__wrapped__
        monkeypatch.setattr(model_module, name, torch.compile(eager, backend=counting(name), fullgraph=True))
    got_out, got_grads = grads()
    assert all(n > 0 for n in graphs.values()), graphs
    # aot_eager runs the same aten ops as eager: bit-identical (Inductor's CUDA kernels differ by bf16 rounding,
    # which bench/bench_train_step.py checks on the GPU)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=0, atol=0, msg=n)


class CopyOffload(BlockInputOffload):
    """BlockInputOffload's bookkeeping, with plain CPU copies in place of the CUDA side-stream copies."""

    def __init__(self):
        super().__init__(stream=None)
        self.log = []

    def to_host(self, t):
        self.log.append(("to_host", len(self.saved)))
        return t.detach().clone()

    def to_device(self, host):
        self.log.append(("to_device", next(s.index for s in self.saved if s.host is host)))
        return host.clone()

    def wait_for_copy(self, t):
        pass


def test_block_input_offload_moves_each_input_once_prefetches_backwards_and_frees_with_the_graph():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
    shared = torch.randn(16)  # like the RoPE table: saved by every block, never moved

    def run(offload):
        x0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        x, inputs = x0 * 1.0, []
        with offload.hooks() if offload else contextlib.nullcontext():
            for block in blocks:
                inputs.append(x.detach().clone())
                if offload:
                    offload.block_input = x
                x = torch.utils.checkpoint.checkpoint(lambda h, s, b=block: torch.tanh(b(h)) * s, x, shared,
                                                      use_reentrant=False)
            if offload:
                offload.block_input = None
        return x0, x, inputs

    x0_ref, out_ref, _ = run(None)
    out_ref.square().sum().backward()
    grads_ref = [x0_ref.grad] + [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad(set_to_none=True)

    gc.disable()  # the host copies must go with the graph, not wait for the garbage collector
    try:
        offload = CopyOffload()
        x0, out, inputs = run(offload)
        log, first_host = offload.log, weakref.ref(offload.saved[0].host)
        assert log == [("to_host", i) for i in range(4)]  # the block inputs, and nothing else (not `shared`)
        assert all(torch.equal(s.host, i) for s, i in zip(offload.saved, inputs))
        del offload
        out.square().sum().backward()
        # block 3 fetches its own input, then each block's unpack prefetches the one before it
        assert log[4:] == [("to_device", i) for i in (3, 2, 1, 0)]
        grads = [x0.grad] + [p.grad for p in blocks.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
        del out
        assert first_host() is None
    finally:
        gc.enable()
