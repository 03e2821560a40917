"""Triton kernels (kernels/attention.py, kernels/lora.py) against their plain-PyTorch references.

Runs under TRITON_INTERPRET=1 on the CPU (as CI does) or on a CUDA GPU. Shapes are tiny: the interpreter runs each
program in numpy. Errors are ||ours - ref|| / ||ref|| against fp32 (attention) or fp64 (LoRA) references.
"""

import math
import os
import subprocess
import sys
import zlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import kernels.attention as attention
from kernels.attention import attention_reference, flash_attention, flash_attention_with_lse
from kernels.lora import _launch_matmul, block_r, lora_linear, lora_linear_reference
import lora

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}  # bf16 / fp16 rounding of inputs, P and dS


@pytest.fixture(autouse=True)
def seed_from_test_id(request):
    """Each case draws its own inputs, the same ones on every run whatever ran before it."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def reference_grads(q, k, v, scale, g_out, g_lse):
    """fp32 reference forward and the gradients of sum(out * g_out) + sum(lse * g_lse)."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(q32, k32, v32, scale)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q32, k32, v32))
    return out, lse, grads


# ----------------------------------------------------------------------------------------------------------------
# attention


def test_attention_reference_matches_sdpa():
    q, k, v = randn(2, 11, 3, 64, dtype=torch.float32), randn(2, 7, 3, 64, dtype=torch.float32), \
        randn(2, 7, 3, 64, dtype=torch.float32)
    out, lse = attention_reference(q, k, v, 0.2)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.2
    assert rel_err(out, expected.transpose(1, 2)) < 1e-5
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-6


@pytest.mark.parametrize("B,Sq,Sk,H,D,dtype,scale", [
    (2, 37, 53, 2, 64, torch.bfloat16, None),  # odd lengths, Sq != Sk, B > 1, H > 1
    (1, 37, 9, 2, 128, torch.float16, None),  # cross-attention-like: fewer keys than a block, split dK/dV
    (2, 48, 48, 3, 128, torch.bfloat16, 0.05),  # lengths a multiple of the block: no tails
    (1, 21, 70, 2, 64, torch.float16, None),
])
def test_attention_forward_and_gradients(B, Sq, Sk, H, D, dtype, scale):
    q, k, v = randn(B, Sq, H, D, dtype=dtype), randn(B, Sk, H, D, dtype=dtype), randn(B, Sk, H, D, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g_out, g_lse = randn(B, Sq, H, D, dtype=torch.float32), randn(B, H, Sq, dtype=torch.float32)
    out, lse = flash_attention_with_lse(q, k, v, scale)
    grads = torch.autograd.grad((out.float() * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref_out, ref_lse, ref_grads = reference_grads(q, k, v, scale, g_out, g_lse)

    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-4  # lse depends on the scores only, accumulated in fp32
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert grad.dtype == dtype and not grad.isnan().any(), name
        assert rel_err(grad, ref) < TOL[dtype], f"d{name}: {rel_err(grad, ref):.2e}"


@pytest.mark.parametrize("use_lse", ["sum", "transposed"])
def test_attention_gradient_through_lse_with_any_strides(use_lse):
    """Autograd hands the lse's gradient over with whatever strides the graph gives it: expanded (stride 0) after
    lse.sum(), transposed after lse.transpose(1, 2). The backward must read it as a [B, H, Sq] tensor, not as memory."""
    B, Sq, Sk, H, D = 2, 19, 40, 3, 64
    q, k, v = (randn(B, S, H, D).requires_grad_() for S in (Sq, Sk, Sk))
    g_out = randn(B, Sq, H, D, dtype=torch.float32)
    g_lse = randn(B, Sq, H, dtype=torch.float32)
    out, lse = flash_attention_with_lse(q, k, v)
    lse_term = lse.sum() if use_lse == "sum" else (lse.transpose(1, 2) * g_lse).sum()
    grads = torch.autograd.grad((out.float() * g_out).sum() + lse_term, (q, k, v))
    g_lse_B_H_Sq = torch.ones(B, H, Sq, device=DEVICE) if use_lse == "sum" else g_lse.transpose(1, 2)
    _, _, ref_grads = reference_grads(q, k, v, D ** -0.5, g_out, g_lse_B_H_Sq)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert rel_err(grad, ref) < TOL[torch.bfloat16], f"d{name}: {rel_err(grad, ref):.2e}"


def test_attention_on_fused_qkv_views():
    # The DiT splits one [B, S, 3, H, D] projection into q, k, v: strided views, read in place.
    qkv = randn(2, 29, 3, 2, 128).requires_grad_()
    q, k, v = qkv.unbind(2)
    g_out = randn(2, 29, 2, 128, dtype=torch.float32)
    (flash_attention(q, k, v).float() * g_out).sum().backward()
    ref_out, _, ref_grads = reference_grads(q, k, v, None, g_out, torch.zeros(2, 2, 29, device=DEVICE))
    assert rel_err(flash_attention(q, k, v), ref_out) < TOL[torch.bfloat16]
    assert rel_err(qkv.grad, torch.stack(ref_grads, 2)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("Sq,Sk", [(37, 53), (37, 9)])  # one dK/dV split, several
def test_attention_kernels_write_every_element(Sq, Sk):
    B, H, D, scale = 1, 2, 64, 0.125
    q, k, v, do = randn(B, Sq, H, D), randn(B, Sk, H, D), randn(B, Sk, H, D), randn(B, Sq, H, D)
    nan = float("nan")
    out, lse = torch.full_like(q, nan), torch.full((B, H, Sq), nan, device=DEVICE)
    attention._launch_fwd(q, k, v, scale, out, lse)
    dq, dk, dv = torch.full_like(q, nan), torch.full_like(k, nan), torch.full_like(v, nan)
    attention._launch_bwd(do, q, k, v, out, lse, torch.zeros_like(lse), scale, dq, dk, dv)
    ref_out, ref_lse, ref_grads = reference_grads(q, k, v, scale, do.float(), torch.zeros_like(lse))
    for name, got, ref in [("out", out, ref_out), ("lse", lse, ref_lse), *zip(("dq", "dk", "dv"), (dq, dk, dv),
                                                                                 ref_grads)]:
        assert not got.isnan().any(), f"{name} has unwritten elements"
        assert rel_err(got, ref) < TOL[torch.bfloat16], name


def test_attention_rejects_bad_inputs():
    q = randn(1, 2, 16, 64).transpose(1, 2)  # [B, S, H, D] view of a [B, H, S, D] tensor: heads not packed
    with pytest.raises(ValueError, match="strides"):
        flash_attention(q, q, q)
    q = randn(1, 16, 2, 32)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, q, q)
    q = randn(1, 16, 2, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="bf16"):
        flash_attention(q, q, q)


def test_selective_checkpoint_keeps_attention_output(monkeypatch):
    # A policy that saves the custom op's outputs (out, lse) must make the backward skip the attention forward.
    calls = []
    launch_fwd = attention._launch_fwd
    monkeypatch.setattr(attention, "_launch_fwd", lambda *a: calls.append(1) or launch_fwd(*a))

    def policy(ctx, op, *args, **kwargs):
        if op is torch.ops.cosmos_kernels.flash_attn_fwd.default:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def block(x):
        return flash_attention(x * 2, x, x).float().square().sum()

    x = randn(1, 24, 2, 64).requires_grad_()
    grads = []
    for context_fn in (partial(create_selective_checkpoint_contexts, policy), None):
        calls.clear()
        kwargs = {} if context_fn is None else {"context_fn": context_fn}
        checkpoint(block, x, use_reentrant=False, **kwargs).backward()
        grads.append(x.grad)
        x.grad = None
        assert len(calls) == (1 if context_fn else 2)  # plain checkpointing re-runs the forward
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("lead,K,N,r,dtype,ab_dtype", [
    ((37,), 48, 40, 8, torch.bfloat16, torch.float32),  # odd M, fp32 master A/B with bf16 x
    ((2, 19), 64, 24, 16, torch.float16, torch.float16),  # leading dims
    ((5, 7), 32, 48, 8, torch.bfloat16, torch.bfloat16),
    ((3, 11), 40, 56, 40, torch.bfloat16, torch.float32),  # a rank padded to 64
])
def test_lora_forward_and_gradients(lead, K, N, r, dtype, ab_dtype):
    x = randn(*lead, K, dtype=dtype).requires_grad_()
    w = randn(N, K, dtype=dtype) / K ** 0.5
    a = (randn(r, K, dtype=ab_dtype) / K ** 0.5).requires_grad_()
    b = randn(N, r, dtype=ab_dtype).requires_grad_()
    scale = 0.7
    y = lora_linear(x, w, a, b, scale)
    g = randn(*lead, N, dtype=dtype)
    dx, da, db = torch.autograd.grad(y, (x, a, b), g)

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w.double().t() + scale * (x64 @ a64.t()) @ b64.t()
    ref = (y64, *torch.autograd.grad(y64, (x64, a64, b64), g.double()))
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert (dx.dtype, da.dtype, db.dtype) == (dtype, ab_dtype, ab_dtype)
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, dx, da, db), ref):
        assert rel_err(got, want) < TOL[dtype], f"{name}: {rel_err(got, want):.2e}"
    # the unfused reference computes the same function
    assert rel_err(lora_linear_reference(x, w, a, b, scale), y64) < TOL[dtype]


@pytest.mark.parametrize("bwd", [False, True])
def test_lora_matmul_writes_every_element(bwd):
    """The raw kernel into NaN-poisoned outputs: C, the thin product L its leaders publish, and (backward) dB's sums.
    Nothing a multiple of the interpreter's 16x32x16 tiles: 3 row blocks (the last partial), 3 column blocks."""
    M, K, N, r = 45, 40, 72, 24
    u, thin, up = randn(M, K), randn(r, K) if not bwd else randn(K, r), randn(N, r) if not bwd else randn(r, N)
    w = randn(N, K) if not bwd else randn(K, N)
    out = torch.full((M, N), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    low = torch.full((M, r), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    op = (lambda t: t.t()) if not bwd else (lambda t: t)
    if bwd:
        s = randn(M, r)
        db = torch.zeros(K, block_r(r), device=DEVICE)
        _launch_matmul(u, w, thin, up, out, low, s, db)
        assert rel_err(db[:, :r], u.double().t() @ s.double()) < TOL[torch.bfloat16]
        assert not db[:, r:].any()  # the padding columns stay zero
    else:
        _launch_matmul(u, w, thin, up, out, low)
    low_expected = u.double() @ op(thin).double()
    expected = u.double() @ op(w).double() + low.double() @ op(up).double()
    assert not out.isnan().any() and not low.isnan().any()
    assert rel_err(low, low_expected) < TOL[torch.bfloat16]
    assert rel_err(out, expected) < TOL[torch.bfloat16]


def test_lora_linear_module_scales_each_adapter(monkeypatch):
    """LoRALinear's dispatch: one active adapter takes the fused kernel with its own scale, alpha / rank times the
    multiplier that set_adapter_scale sets (sample.py's --lora file:0.5); several take plain PyTorch. Both against
    x W^T + sum_i m_i alpha_i / r_i (x A_i^T) B_i^T in fp64. On the CPU the interpreter runs the kernel where CUDA
    would."""
    import kernels.lora

    monkeypatch.setattr(lora, "FUSED_DEVICE", torch.device(DEVICE).type)
    scales, fused = [], kernels.lora.lora_linear
    monkeypatch.setattr(kernels.lora, "lora_linear", lambda *args: scales.append(args[-1]) or fused(*args))
    lin = lora.LoRALinear(torch.nn.Linear(32, 48, bias=False, device=DEVICE, dtype=torch.bfloat16))
    adapters = {"a": (8, 4, 0.5), "b": (16, 32, -1.5)}  # rank, alpha, multiplier
    for name, (rank, alpha, _) in adapters.items():
        lin.add_adapter(name, rank, alpha)
        torch.nn.init.normal_(lin.lora_B[name].weight, std=rank ** -0.5)
    x = randn(3, 5, 32)
    for active in (["a"], ["b"], ["a", "b"]):
        for name, (_, _, multiplier) in adapters.items():
            lora.set_adapter_scale(lin, name, multiplier if name in active else 0.0)
        scales.clear()
        with torch.no_grad():
            y = lin(x)
        expected, expected_scales = x.double() @ lin.weight.double().t(), []
        for name in active:
            rank, alpha, multiplier = adapters[name]
            A, B = lin.lora_A[name].weight.double(), lin.lora_B[name].weight.double()
            expected += multiplier * alpha / rank * (x.double() @ A.t()) @ B.t()
            expected_scales.append(multiplier * alpha / rank)
        assert scales == (expected_scales if len(active) == 1 else []), active  # the kernel serves one adapter
        assert rel_err(y, expected) < TOL[torch.bfloat16], active


def test_lora_rejects_bad_inputs():
    x, w, a, b = randn(4, 32), randn(16, 32), randn(8, 32), randn(16, 8)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.requires_grad_(), a, b, 1.0)
    with pytest.raises(ValueError, match="multiples of 8"):
        lora_linear(randn(4, 20), randn(16, 20), randn(8, 20), b, 1.0)
    with pytest.raises(ValueError, match="expected x"):
        lora_linear(x, w.detach(), randn(8, 24), b, 1.0)
    with pytest.raises(ValueError, match="ranks up to 64"):
        lora_linear(x, w.detach(), randn(72, 32), randn(16, 72), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Hopper kernels (Gluon): they have no interpreter, so the CPU can only build them (bench/check_kernels_gpu.py checks
# their numbers on an H100). The build runs in a fresh process without TRITON_INTERPRET, which would turn the Triton
# functions Gluon borrows (max, sum) into interpreter objects.

_BUILD_FOR_SM90 = """
import sys, torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from kernels import attention_hopper as hop


class Sm90Compiler:  # just enough of a driver to compile (never launch) for an H100 without a GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


which, D, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
q = torch.empty(1, 300, 2, D, dtype=dtype)
driver.set_active(Sm90Compiler())
if which == "forward":  # what launch_fwd would launch
    grid, args, meta = hop.launch_args(q, q, q, 0.1, q, torch.empty(1, 2, 300))
    compiled = hop._attn_fwd_kernel.warmup(*args, **meta, grid=grid)
else:  # what launch_bwd would launch
    rows = torch.empty(2, 320)  # lse2 and delta, padded to whole query blocks
    grid, args, meta = hop.bwd_launch_args(q, q, q, q, rows, rows, 0.1, q.float(), q, q)
    compiled = hop._attn_bwd_kernel.warmup(*args, **meta, grid=grid)
ptx = compiled.asm["ptx"]
print("wgmma", "wgmma.mma_async" in ptx, "setmaxnreg", "setmaxnreg" in ptx, "reduce", "cp.reduce.async.bulk" in ptx,
      "cubin", len(compiled.asm["cubin"]))
"""


@pytest.mark.parametrize("which,D,dtype", [("forward", 128, "bfloat16"), ("forward", 64, "float16"),
                                           ("backward", 128, "bfloat16"), ("backward", 128, "float16")])
def test_hopper_kernels_build_for_sm90(which, D, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _BUILD_FOR_SM90, which, str(D), dtype], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    words = run.stdout.split()
    # tensor-core products, warp-specialised partitions (register reallocation), a cubin from ptxas; the backward
    # sums dQ with TMA reduce-adds, the forward has none
    assert words[:4] == ["wgmma", "True", "setmaxnreg", "True"] and int(words[7]) > 0, run.stdout
    assert words[4:6] == ["reduce", str(which == "backward")], run.stdout


def test_hopper_backward_rows_kernel():
    """The backward's per-row inputs: lse in base 2 and delta = rowsum(dO * O) - dlse, padded to whole query blocks
    with lse2 = inf (P = 0) and delta = 0; O and dO with different row strides."""
    from kernels import attention_hopper as hop
    B, Sq, H, D = 2, 37, 3, 64
    out = randn(B, Sq, H, D)
    do = randn(B, Sq, H + 2, D)[:, :, :H]  # rows of dO are longer than its H*D values
    lse, dlse = torch.randn(B, H, Sq, device=DEVICE), torch.randn(B, H, Sq, device=DEVICE)
    Sq_pad = 64
    lse2, delta = (torch.full((B * H, Sq_pad), float("nan"), device=DEVICE) for _ in range(2))
    hop._bwd_rows_kernel[(1, B * H)](out, do, lse, dlse, lse2, delta, out.stride(0), out.stride(1), do.stride(0),
                                     do.stride(1), Sq, Sq_pad, H, HEAD_DIM=D, BLOCK=64)
    want_delta = torch.einsum("bshd,bshd->bhs", out.double(), do.double()) - dlse.double()
    assert rel_err(delta.view(B, H, Sq_pad)[..., :Sq], want_delta) < 1e-6
    assert rel_err(lse2.view(B, H, Sq_pad)[..., :Sq], lse.double() / math.log(2)) < 1e-6
    assert torch.all(lse2.view(B, H, Sq_pad)[..., Sq:] == float("inf"))
    assert torch.all(delta.view(B, H, Sq_pad)[..., Sq:] == 0)
