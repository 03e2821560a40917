"""One LoRA training step of the 2B (and 14B) DiT at real video shapes: ours vs diffusers + PEFT, same run.

    python bench/bench_train_step.py                  # one H100: the default rows below, peers at the 2B shapes
    python bench/bench_train_step.py --rows 14b:24x88x160:full:sdpa:offload --skip_peer
    torchrun --nproc_per_node=2 bench/bench_train_step.py --rows 14b:24x88x160:full:sdpa:offload
    torchrun --nproc_per_node=2 bench/bench_train_step.py --context_parallel 2 --rows 2b:24x88x160:selective:sdpa
    python bench/bench_train_step.py --smoke          # tiny shapes on the CPU: checks the script runs

Ours is train.py's step (cached latents and text embeddings in, AdamW + EMA out): FSDP2 (over every rank), bf16
base, fp32 LoRA, activation checkpointing ("selective" keeps the attention outputs), optionally the block inputs in
pinned host memory ("offload"). A row is preset:TxHxW:checkpointing:attention[:offload] with a latent shape.
Under torchrun every rank takes a batch of 1 (data parallel), or `--context_parallel` ranks share one. The peer is
diffusers' CosmosTransformer3DModel with the Cosmos-2.5 config, PEFT LoRA r32 on the same 280 linears (fp32
adapters), gradient checkpointing, torch AdamW (one process only). Random weights: speed does not depend on them.
"""

import argparse
import gc
import statistics
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import bind_oracles  # noqa: E402  (the peer and our code each get their own `kernels`)

bind_oracles()
import train  # noqa: E402
from model import DIT_PRESETS  # noqa: E402

PEAK_TFLOPS = 780.0  # measured bf16 matmul on our H100 (spec/anchors.md E)


def step_flops(cfg, T, H, W, text_len=512):
    """Model FLOPs of one LoRA step: forward + backward without the frozen weights' gradients (no dW) and without
    recomputation. Attention fwd 4*S^2*D per layer (bwd 2.5x), linears 2*S*params (bwd 1x: dX only)."""
    S = T * (H // 2) * (W // 2)
    D, L = cfg.model_channels, cfg.num_blocks
    mlp = int(D * cfg.mlp_ratio)
    linear_params = L * (4 * D * D + 2 * D * D + 2 * D * cfg.crossattn_emb_channels + 2 * D * mlp)
    attn_fwd = L * (4 * S * S * D + 4 * S * text_len * D)
    linear_fwd = 2 * S * linear_params + 2 * text_len * cfg.crossattn_proj_in_channels * cfg.crossattn_emb_channels
    return 2 * linear_fwd + 3.5 * attn_fwd


def timed(fn, warmup, repeat, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def build(device, preset, backend, checkpointing="selective", offload=False):
    """train.py's model for these settings: a random base, LoRA r32 on the reference targets."""
    train.dit_preset, train.dtype, train.attention_backend = preset, "bfloat16", backend
    train.activation_checkpointing, train.offload_block_inputs = checkpointing, offload
    train.base_checkpoint, train.use_lora, train.seed = "", True, 0
    return train.build_model(device)


def random_inputs(device, preset, shape):
    """Latents [1,16,T,H,W] and text embeddings [1,512,D] in bf16, the same on every rank (a context-parallel
    group must share its video)."""
    g = torch.Generator(device).manual_seed(1)
    latents = torch.randn(1, 16, *shape, device=device, dtype=torch.bfloat16, generator=g)
    text_dim = DIT_PRESETS[preset].crossattn_proj_in_channels
    return latents, torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16, generator=g)


def ours(preset, shape, device, warmup, repeat, checkpointing, backend, offload=False, cp_group=None):
    """train.py's model and step."""
    reset_memory(device)
    model = build(device, preset, backend, checkpointing, offload)
    model.enable_context_parallel(cp_group)
    model = train.shard_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    ema = [p.detach().clone().float() for p in trainable]
    latents, text = random_inputs(device, preset, shape)
    generators = [torch.Generator(device).manual_seed(0)]
    reset_memory(device)  # the fp32 random init is not part of a step

    def step():
        per_sample, _ = train.flow_matching_loss(model, latents, text, generators)
        per_sample.mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.1, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in trainable], 0.01)

    seconds = timed(step, warmup, repeat, device)
    memory = peak_gib(device)
    del model, optimizer, ema, trainable
    return seconds, memory


def check_offload(device, shape=(8, 32, 64)):
    """The step with the block inputs in host memory computes what it computes without (loss and every LoRA
    gradient, against the difference between two runs without offload: the GPU backward is not bit-reproducible),
    and its peak memory is lower by about the block inputs' size. Exits when either fails."""
    model = build(device, "cosmos_2b", "sdpa")
    latents, text = random_inputs(device, "cosmos_2b", shape)
    results = []
    for offload in (False, False, True):
        model.offload_block_inputs = offload
        torch.cuda.reset_peak_memory_stats(device)
        per_sample, _ = train.flow_matching_loss(model, latents, text, [torch.Generator(device).manual_seed(0)])
        per_sample.mean().backward()
        results.append((per_sample.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad],
                        torch.cuda.max_memory_allocated(device)))
        model.zero_grad(set_to_none=True)
    T, H, W = shape
    block_inputs = len(model.blocks) * T * (H // 2) * (W // 2) * model.cfg.model_channels * 2  # bf16 bytes
    del model

    def difference(a, b):
        loss = (a[0] - b[0]).abs().max().item()
        grads = max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a[1], b[1]))
        return loss, grads

    (rerun_loss, rerun_grad), (offload_loss, offload_grad) = (difference(results[0], results[1]),
                                                              difference(results[2], results[0]))
    saved = (results[0][2] - results[2][2]) / block_inputs
    print(f"offload check (2B, {T}x{H}x{W}): loss difference {offload_loss:.1e}, largest relative LoRA gradient "
          f"difference {offload_grad:.1e}; two runs without offload: {rerun_loss:.1e}, {rerun_grad:.1e}; peak memory "
          f"lower by {saved:.0%} of the block inputs' {block_inputs / 2**30:.2f} GiB", flush=True)
    if offload_loss > 2 * rerun_loss + 1e-6 or offload_grad > 2 * rerun_grad + 1e-4 or saved < 0.5:
        raise SystemExit("offload check FAILED")


def torchvision_shim():
    functional = types.SimpleNamespace(
        resize=lambda t, size, interpolation=None: F.interpolate(t, size=size, mode="nearest"))
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def diffusers_peft(preset, shape, device, warmup, repeat):
    """diffusers' Cosmos transformer + PEFT LoRA r32, gradient checkpointing, AdamW; loss like ours."""
    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import CosmosTransformer3DModel
    from peft import LoraConfig

    tc.transforms = torchvision_shim()
    cfg = DIT_PRESETS[preset]
    reset_memory(device)
    with torch.device(device):
        net = CosmosTransformer3DModel(
            in_channels=17, out_channels=16, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            num_layers=cfg.num_blocks, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240),
            patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
            use_crossattn_projection=True, crossattn_proj_in_channels=cfg.crossattn_proj_in_channels,
            encoder_hidden_states_channels=1024).to(torch.bfloat16)
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights=True, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    trainable = [p for p in net.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    net.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    T, H, W = shape
    x0 = torch.randn(1, 16, T, H, W, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, cfg.crossattn_proj_in_channels, device=device, dtype=torch.bfloat16)
    cond_mask = torch.zeros(1, 1, T, H, W, device=device, dtype=torch.bfloat16)
    padding_mask = torch.zeros(1, 1, 8 * H, 8 * W, device=device, dtype=torch.bfloat16)
    reset_memory(device)

    def step():
        sigma = torch.rand(1, device=device)
        noise = torch.randn_like(x0)
        x_t = (sigma * noise + (1 - sigma) * x0).to(torch.bfloat16)
        v = net(x_t, sigma.to(torch.bfloat16), text, condition_mask=cond_mask, padding_mask=padding_mask,
                return_dict=False)[0]
        F.mse_loss(v.float(), (noise - x0).float()).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = timed(step, warmup, repeat, device)
        memory = peak_gib(device)
    except torch.OutOfMemoryError:
        seconds, memory = float("nan"), peak_gib(device)
    del net, optimizer, trainable
    return seconds, memory


@torch.no_grad()
def check_forward(device, shape):
    """The DiT forward with our Triton attention, with SDPA, and with SDPA and no torch.compile (model.fused_on_cuda
    off), each against an eager fp32 forward with SDPA (same weights and inputs). Exits when one is off by more than
    bf16 rounding, or the compiled forward by over 1.25x as much as the eager one."""
    reset_memory(device)
    model = build(device, "cosmos_2b", "triton")
    x, text = random_inputs(device, "cosmos_2b", shape)
    sigma = torch.full((1,), 0.7, device=device)
    outs = {}
    for name, backend, compiled in (("triton", "triton", True), ("sdpa", "sdpa", True), ("sdpa eager", "sdpa", False)):
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        with torch.compiler.set_stance("default" if compiled else "force_eager"):
            outs[name] = model(x, sigma, text)
    with torch.compiler.set_stance("force_eager"):
        ref = model.float()(x.float(), sigma, text.float())
    err = {name: ((o - ref).norm() / ref.norm()).item() for name, o in outs.items()}
    del model
    if max(err.values()) > 2e-2 or err["sdpa"] > 1.25 * err["sdpa eager"]:
        raise SystemExit(f"DiT forward differs from the fp32 forward by more than bf16 rounding, or compiled by more "
                         f"than eager: {err}")
    return err


def parse_row(text):
    """preset:TxHxW:checkpointing:attention[:offload] -> (preset, (T, H, W), checkpointing, attention, offload)."""
    parts = text.split(":")
    presets = {"2b": "cosmos_2b", "14b": "cosmos_14b", "tiny": "tiny"}
    dims = parts[1].split("x") if len(parts) > 1 else []
    if (len(parts) not in (4, 5) or parts[0] not in presets or len(dims) != 3 or not all(d.isdigit() for d in dims)
            or parts[2] not in ("none", "full", "selective") or parts[3] not in ("sdpa", "triton")
            or (len(parts) == 5 and parts[4] != "offload")):
        raise SystemExit(f"row {text!r} is not preset:TxHxW:checkpointing:attention[:offload] with preset in "
                         f"{sorted(presets)}, checkpointing none/full/selective, attention sdpa/triton")
    shape = tuple(int(n) for n in dims)
    return presets[parts[0]], shape, parts[2], parts[3], len(parts) == 5


DEFAULT_ROWS = ",".join([
    "2b:24x88x160:selective:sdpa", "2b:24x88x160:selective:triton", "2b:24x88x160:selective:sdpa:offload",
    "2b:24x54x96:selective:sdpa", "2b:24x54x96:selective:triton",
    "14b:24x88x160:full:sdpa:offload"])  # selective + offload: out of memory on an 80 GB card (74.2 GiB)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script runs)")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="our rows, comma-separated (see above)")
    parser.add_argument("--skip_peer", action="store_true", help="re-runs on a machine where the peer was just timed")
    parser.add_argument("--skip_checks", action="store_true", help="skip the attention and offload checks")
    parser.add_argument("--context_parallel", type=int, default=1, help="ranks sharing one video (under torchrun)")
    args = parser.parse_args()
    rank, world, device = train.init_distributed()
    train.context_parallel_size = args.context_parallel
    cp_group = train.context_parallel_group(rank, world)
    torch.backends.cuda.matmul.allow_tf32 = True
    say = print if rank == 0 else (lambda *a, **k: None)
    rows = [parse_row(r) for r in ("tiny:3x4x4:selective:sdpa" if args.smoke else args.rows).split(",")]
    warmup, repeat = (1, 2) if args.smoke else (1, 3)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peer = {}
    peer_shapes = [] if args.skip_peer or world > 1 else sorted({(p, s) for p, s, *_ in rows if p != "cosmos_14b"})
    for preset, shape in peer_shapes:
        peer[(preset, shape)] = diffusers_peft(preset, shape, device, warmup, repeat)
        say(f"diffusers+PEFT {preset} {shape}: {peer[(preset, shape)][0]:.3f} s, {peer[(preset, shape)][1]:.1f} GiB",
            flush=True)
    if not (args.smoke or args.skip_checks or world > 1):
        err = check_forward(device, (24, 54, 96))
        say("2B forward at 24x54x96, relative error vs an eager fp32 forward: "
            + ", ".join(f"{name} {e:.2e}" for name, e in err.items()), flush=True)
        check_offload(device)
    results = []
    for preset, shape, ckpt, backend, offload in rows:
        try:
            seconds, memory = ours(preset, shape, device, warmup, 1 if preset == "cosmos_14b" else repeat, ckpt,
                                   backend, offload, cp_group)
        except torch.OutOfMemoryError:
            if world > 1:  # the other ranks would wait in FSDP's collectives for this one
                raise
            seconds, memory = float("nan"), peak_gib(device)
        say(f"ours {preset} {shape} {ckpt} {backend}{' offload' if offload else ''}: {seconds:.3f} s, "
            f"{memory:.1f} GiB", flush=True)
        results.append((preset, shape, ckpt, backend, offload, seconds, memory))

    layout = f"{world} rank(s), context parallel {args.context_parallel}, batch 1 per group"
    say(f"\nLoRA r32 training step, {layout}, {card}, torch {torch.__version__}")
    say("| model | latent TxHxW | tokens | ours (checkpointing, attention) | ours s | ours GiB | MFU | "
        "diffusers+PEFT s | GiB | speed-up |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for preset, shape, ckpt, backend, offload, seconds, memory in results:
        T, H, W = shape
        cfg = DIT_PRESETS[preset]
        # MFU per GPU: a context-parallel group shares one step's FLOPs
        flops = step_flops(cfg, T, H, W) / args.context_parallel
        mfu = flops / seconds / 1e12 / PEAK_TFLOPS if seconds == seconds else float("nan")
        p_s, p_mem = peer.get((preset, shape), (float("nan"), float("nan")))
        say(f"| {preset} | {T}x{H}x{W} | {T * H * W // 4:,} | {ckpt}{' + offload' if offload else ''}, {backend} | "
            f"{seconds:.2f} | {memory:.1f} | {mfu:.0%} | {p_s:.2f} | {p_mem:.1f} | {p_s / seconds:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
