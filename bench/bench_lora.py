"""LoRA linear speed on the GPU: fused (kernels/lora.py) vs unfused x W^T + s (x A^T) B^T vs the plain x W^T.

M = 84,480 tokens, (K, N) in {(2048, 2048), (2048, 8192), (8192, 2048)}, r = 32, bf16, W frozen; forward and
forward + backward (dX, dA, dB; the plain matmul has only dX). Also a composition of cuBLAS calls that adds the
low-rank term in place (addmm), the best one can do without a custom GEMM. CUDA events, warm-up, median over
samples of 10 back-to-back calls: the GPU time of a call when the host runs ahead, as in a training step (a lone
call of the fused op also waits on its host-side launches: Python, autograd, TMA descriptors; reported too).
Run from the repo root: python bench/bench_lora.py
"""

import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.lora import lora_linear, lora_linear_reference  # noqa: E402

M, R, SCALE = 84480, 32, 2.0
SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048)]


def time_ms(fn, reps=10, budget_ms=1000):
    """Median ms a call, each sample timing `reps` back-to-back calls."""
    fn(), fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < 5 or (sum(times) * reps < budget_ms and len(times) < 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


class LoRAAddmm(torch.autograd.Function):
    """y = x W^T, then y += s S B^T in place (cuBLAS reads and writes y once more); backward likewise."""

    @staticmethod
    def forward(ctx, x, w, a, b, s):
        s_lr = x @ a.t()
        y = (x @ w.t()).addmm_(s_lr, b.t(), alpha=s)
        ctx.save_for_backward(x, w, a, b, s_lr)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, s_lr = ctx.saved_tensors
        ds = dy @ (b * ctx.s)
        return (dy @ w).addmm_(ds, a), None, ds.t() @ x, (dy.t() @ s_lr) * ctx.s, None


def profile_fused(K, N):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    a, b = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for shape in ((R, K), (N, R)))
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    step = lambda: torch.autograd.grad(lora_linear(x, w, a, b, SCALE), (x, a, b), dy)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"\nper-kernel, one fused fwd+bwd at K={K} N={N}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))


def main():
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    methods = {"plain x W^T": lambda x, w, a, b: x @ w.t(),
               "unfused LoRA": lambda x, w, a, b: lora_linear_reference(x, w, a, b, SCALE),
               "cuBLAS addmm LoRA": lambda x, w, a, b: LoRAAddmm.apply(x, w, a, b, SCALE),
               "fused LoRA (ours)": lambda x, w, a, b: lora_linear(x, w, a, b, SCALE)}
    results = []
    for K, N in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        a = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        b = torch.randn(N, R, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for method, fn in methods.items():
            try:
                with torch.no_grad():
                    fwd = time_ms(lambda: fn(x, w, a, b))
                xg, ag, bg = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
                wrt = (xg,) if method.startswith("plain") else (xg, ag, bg)
                both = time_ms(lambda: torch.autograd.grad(fn(xg, w, ag, bg), wrt, dy))
            except Exception as e:
                print(f"{method} at K={K} N={N}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                fwd = both = float("nan")
            results.append((K, N, method, fwd, both))
            print(results[-1], flush=True)
            if method.startswith("fused"):
                lone = time_ms(lambda: torch.autograd.grad(fn(xg, w, ag, bg), wrt, dy), reps=1)
                print(f"fused LoRA at K={K} N={N}: a lone fwd+bwd call (synchronized, host launches exposed) "
                      f"{lone:.3f} ms", flush=True)
    profile_fused(2048, 2048)
    print(f"\nLoRA linear, M={M} r={R} bf16, W frozen, {name}")
    print(f"{'K':>5} {'N':>5} {'method':<20} {'fwd ms':>8} {'f+b ms':>8} {'fwd/plain':>10} {'f+b/plain':>10}")
    plain = {(K, N): (fwd, both) for K, N, method, fwd, both in results if method.startswith("plain")}
    for K, N, method, fwd, both in results:
        p = plain[(K, N)]
        print(f"{K:>5} {N:>5} {method:<20} {fwd:>8.3f} {both:>8.3f} {fwd / p[0]:>10.2f} {both / p[1]:>10.2f}")


if __name__ == "__main__":
    main()
