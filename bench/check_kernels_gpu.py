"""GPU correctness of kernels/ at the real shapes: relative error against fp32 references, no NaN, every output
element written (outputs are NaN-poisoned before the kernels run).
Run from the repo root: python bench/check_kernels_gpu.py
"""

import os
import sys

import torch
import triton
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.attention as attention  # noqa: E402
from kernels import attention_hopper  # noqa: E402
from kernels.lora import _launch_matmul, block_r, lora_linear  # noqa: E402
from lora import LoRALinear, set_adapter_scale  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in full fp32
rows = []  # (what, error, limit)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def record(what, got, ref, limit):
    nan = got.isnan().any().item()
    err = float("nan") if nan else rel_err(got, ref)
    rows.append((what, err, limit, nan))


def attention_reference_head(q, k, v, do, scale, b, h, chunk=4096):
    """fp32 forward and backward of one (batch, head), queries in chunks: (out, lse, dq, dk, dv)."""
    qh, kh, vh, doh = (t[b, :, h].float() for t in (q, k, v, do))
    out, lse, dq = torch.empty_like(qh), qh.new_empty(qh.shape[0]), torch.empty_like(qh)
    dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
    for i in range(0, qh.shape[0], chunk):
        s = qh[i:i + chunk] @ kh.t() * scale
        lse[i:i + chunk] = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[i:i + chunk, None])
        out[i:i + chunk] = p @ vh
        ds = p * (doh[i:i + chunk] @ vh.t() - (out[i:i + chunk] * doh[i:i + chunk]).sum(-1, keepdim=True))
        dq[i:i + chunk] = ds @ kh * scale
        dk += ds.t() @ qh[i:i + chunk] * scale
        dv += p.t() @ doh[i:i + chunk]
    return out, lse, dq, dk, dv


def check_attention(B, Sq, Sk, H, D, dtype, heads):
    name = f"attn B{B} {Sq}x{Sk} H{H} D{D} {str(dtype)[6:]}"
    scale = D ** -0.5
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for S in (Sq, Sk, Sk, Sq))
    nan = float("nan")
    out, lse = torch.full_like(q, nan), torch.full((B, H, Sq), nan, device="cuda")
    attention._launch_fwd(q, k, v, scale, out, lse)
    dq, dk, dv = torch.full_like(q, nan), torch.full_like(k, nan), torch.full_like(v, nan)
    attention._launch_bwd(do, q, k, v, out, lse, torch.zeros_like(lse), scale, dq, dk, dv)
    for t, what in ((out, "out"), (lse, "lse"), (dq, "dq"), (dk, "dk"), (dv, "dv")):
        rows.append((f"{name} {what}: NaN-poisoned elements left", float(t.isnan().sum()), 0.0, False))

    # the autograd path (custom ops) gives the same bits as the direct launches; but for dQ from the Hopper backward,
    # whose atomic fp32 sums vary in order from run to run, flipping the bf16 rounding of a few elements
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out_g, lse_g = attention.flash_attention_with_lse(qg, kg, vg)
    dq_g, dk_g, dv_g = torch.autograd.grad(out_g, (qg, kg, vg), do)
    same = all(torch.equal(a, b) for a, b in zip((out_g, lse_g, dk_g, dv_g), (out, lse, dk, dv)))
    rows.append((f"{name}: autograd path differs from launches", float(not same), 0.0, False))
    if attention_hopper.serves_bwd(q, k):
        record(f"{name}: autograd path's dq vs launches'", dq_g, dq, 1e-3)
    else:
        rows.append((f"{name}: autograd path's dq differs from launches'", float(not torch.equal(dq_g, dq)), 0.0,
                     False))

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for b, h in heads:
        ref = attention_reference_head(q, k, v, do, scale, b, h)
        for what, got, want in zip(("out", "lse", "dq", "dk", "dv"),
                                   (out[b, :, h], lse[b, h], dq[b, :, h], dk[b, :, h], dv[b, :, h]), ref):
            record(f"{name} b{b} h{h} {what}", got, want, 1e-2 if dtype == torch.bfloat16 else 2e-3)
        record(f"{name} b{b} h{h} out (SDPA cuDNN, for comparison)", sdpa[b, :, h], ref[0], 1e-2)


def check_lora(M, K, N, r):
    name = f"lora M{M} K{K} N{N} r{r}"
    s = 2.0
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    a = torch.randn(r, K, device="cuda") / K ** 0.5  # fp32 masters
    b = torch.randn(N, r, device="cuda") / r ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    # raw launches into poisoned buffers: forward (W transposed; S from its leaders) and backward (W as is; dS, dB)
    ab, sb = a.bfloat16(), (s * b).bfloat16()
    y, low = (torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16) for shape in ((M, N), (M, r)))
    _launch_matmul(x, w, ab, sb, y, low)
    rows.append((f"{name} fwd GEMM: NaN-poisoned elements left", float(y.isnan().sum() + low.isnan().sum()), 0.0,
                 False))
    t = x.float() @ ab.float().t()
    record(f"{name} fwd GEMM, S", low, t, 1e-2)
    record(f"{name} fwd GEMM, y", y, x.float() @ w.float().t() + low.float() @ sb.float().t(), 1e-2)
    dx, dlow = (torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16) for shape in ((M, K), (M, r)))
    dyt_s = torch.zeros(N, block_r(r), device="cuda")
    _launch_matmul(dy, w, sb, ab, dx, dlow, low, dyt_s)
    rows.append((f"{name} bwd GEMM: NaN-poisoned elements left", float(dx.isnan().sum() + dlow.isnan().sum()), 0.0,
                 False))
    record(f"{name} bwd GEMM, dS", dlow, dy.float() @ sb.float(), 1e-2)
    record(f"{name} bwd GEMM, dx", dx, dy.float() @ w.float() + dlow.float() @ ab.float(), 1e-2)
    record(f"{name} bwd GEMM, dY^T S", dyt_s[:, :r], dy.float().t() @ low.float(), 1e-2)
    # the full op with autograd, against fp32
    xg, ag, bg = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
    y = lora_linear(xg, w, ag, bg, s)
    dx, da, db = torch.autograd.grad(y, (xg, ag, bg), dy)
    ab, bb = a.bfloat16().float(), b.bfloat16().float()
    dt = s * dy.float() @ bb
    for what, got, want in (("y", y, x.float() @ w.float().t() + s * t @ bb.t()),
                            ("dx", dx, dy.float() @ w.float() + dt @ ab),
                            ("dA", da, dt.t() @ x.float()), ("dB", db, s * dy.float().t() @ t)):
        record(f"{name} {what}", got, want, 1e-2)


def check_lora_module(M, K, N):
    """LoRALinear's dispatch: one active adapter runs the fused kernel with its own scale (alpha / rank times the
    multiplier set_adapter_scale sets, as sample.py's --lora file:0.5 does), several run plain PyTorch; against
    x W^T + sum_i m_i alpha_i / r_i (x A_i^T) B_i^T in fp32 from the bf16-rounded adapters."""
    lin = LoRALinear(torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16))
    adapters = {"a": (32, 16, 0.5), "b": (16, 32, -1.5)}  # rank, alpha, multiplier
    for name, (rank, alpha, _) in adapters.items():
        lin.add_adapter(name, rank, alpha)
        torch.nn.init.normal_(lin.lora_B[name].weight, std=rank ** -0.5)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for active in (["a"], ["b"], ["a", "b"]):
        name = f"lora module M{M} K{K} N{N} adapters {'+'.join(active)}"
        for adapter, (_, _, multiplier) in adapters.items():
            set_adapter_scale(lin, adapter, multiplier if adapter in active else 0.0)
        if len(active) == 1:
            rows.append((f"{name}: the fused kernel does not serve", float(not lin.fused_kernel_serves(x, active[0])),
                         0.0, False))
        with torch.no_grad():
            y = lin(x)
        expected = x.float() @ lin.weight.float().t()
        for adapter in active:
            rank, alpha, multiplier = adapters[adapter]
            A, B = (lin.lora_A[adapter].weight.bfloat16().float(), lin.lora_B[adapter].weight.bfloat16().float())
            expected += multiplier * alpha / rank * (x.float() @ A.t()) @ B.t()
        record(name, y, expected, 1e-2)


def check_forward_kernels_agree(B, S, Sk, H):
    """The Gluon (Hopper) forward, launched directly, against the `tl` forward: the same function."""
    name = f"forward B{B} {S}x{Sk} H{H}: Gluon vs tl kernel"
    q = torch.randn(B, S, H, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Sk, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = torch.full_like(q, float("nan")), torch.full((B, H, S), float("nan"), device="cuda")
    attention_hopper.launch_fwd(q, k, v, 128 ** -0.5, out, lse)
    rows.append((f"{name}: NaN-poisoned elements left", float(out.isnan().sum() + lse.isnan().sum()), 0.0, False))
    out_tl, lse_tl = torch.empty_like(q), torch.empty_like(lse)
    attention._launch_fwd(q, k, v, 128 ** -0.5, out_tl, lse_tl, hopper=False)
    record(f"{name}, out", out, out_tl, 2e-3)
    record(f"{name}, lse", lse, lse_tl, 1e-6)


def check_backward_kernels_agree(B, Sq, Sk, H):
    """The Gluon (Hopper) backward, launched directly, against the `tl` backward: the same function."""
    name = f"backward B{B} {Sq}x{Sk} H{H}: Gluon vs tl kernels"
    q, do = (torch.randn(B, Sq, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, Sk, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = torch.empty_like(q), torch.empty((B, H, Sq), device="cuda")
    attention._launch_fwd(q, k, v, 128 ** -0.5, out, lse)
    dlse = torch.randn_like(lse)  # the gradient reaching lse, as when the lse is an output (context parallel)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    attention_hopper.launch_bwd(do, q, k, v, out, lse, dlse, 128 ** -0.5, *grads)
    rows.append((f"{name}: NaN-poisoned elements left", float(sum(g.isnan().sum() for g in grads)), 0.0, False))
    grads_tl = [torch.empty_like(t) for t in (q, k, v)]
    attention._launch_bwd(do, q, k, v, out, lse, dlse, 128 ** -0.5, *grads_tl, hopper=False)
    for what, got, want in zip(("dq", "dk", "dv"), grads, grads_tl):
        record(f"{name}, {what}", got, want, 5e-3)


def main():
    hopper = torch.cuda.get_device_capability() == (9, 0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; forward "
          f"kernel for >= {attention_hopper.MIN_KEYS} keys, backward for D=128 and >= {attention_hopper.BWD_MIN_KEYS}"
          f" keys: {'Gluon (Hopper)' if hopper else 'tl'}")
    torch.manual_seed(0)
    check_attention(1, 84480, 84480, 16, 128, torch.bfloat16, heads=[(0, 0), (0, 15)])
    check_attention(1, 84480, 512, 16, 128, torch.bfloat16, heads=[(0, 0), (0, 15)])  # split dK/dV path
    check_attention(2, 1000, 777, 4, 64, torch.bfloat16, heads=[(0, 0), (1, 3)])  # odd lengths, B > 1
    check_attention(1, 4096, 4096, 8, 128, torch.float16, heads=[(0, 0), (0, 7)])
    check_attention(2, 37, 50, 3, 64, torch.float16, heads=[(0, 0), (1, 2)])  # one key block, rows < one tile
    check_attention(2, 1000, 1777, 4, 64, torch.bfloat16, heads=[(0, 0), (1, 3)])  # odd lengths, Hopper forward
    check_attention(1, 37, 1100, 2, 128, torch.float16, heads=[(0, 0), (0, 1)])  # rows < one tile, Hopper forward
    check_attention(2, 1000, 4100, 3, 128, torch.bfloat16, heads=[(0, 0), (1, 2)])  # odd lengths, Hopper backward
    check_attention(1, 37, 5000, 2, 128, torch.float16, heads=[(0, 0), (0, 1)])  # rows < one tile, Hopper backward
    if hopper:
        check_forward_kernels_agree(1, 84480, 84480, 16)
        check_forward_kernels_agree(5, 84480, 1024, 40)  # an output of over 2^31 elements (64-bit offsets)
        check_backward_kernels_agree(1, 84480, 84480, 16)
        check_backward_kernels_agree(3, 1001, 8191, 2)
        check_backward_kernels_agree(5, 256, 84480, 40)  # dK, dV of over 2^31 elements (64-bit offsets)
    for K, N in ((2048, 2048), (2048, 8192), (8192, 2048)):
        check_lora(84480, K, N, 32)
    check_lora(1001, 2048, 2048, 32)  # odd M
    check_lora(3001, 1016, 264, 64)  # the largest rank served, N in two column blocks (one phase-2 tile a row)
    check_lora(257, 136, 4104, 8)  # rows and K under one block, rank 8
    check_lora_module(4096, 2048, 2048)
    check_lora_module(1001, 1016, 264)  # odd M, N in two column blocks
    print(f"\n{'check':<72} {'rel.err':>10} {'limit':>8}  ok")
    bad = 0
    for what, err, limit, nan in rows:
        ok = (not nan) and err <= limit
        bad += not ok
        print(f"{what:<72} {err:>10.2e} {limit:>8.0e}  {'ok' if ok else 'FAIL'}")
    print(f"\n{len(rows) - bad} / {len(rows)} checks passed on {torch.cuda.get_device_name()}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
