"""Fused LoRA linear in Triton: y = x W^T + s (x A^T) B^T, W frozen; and a plain-PyTorch reference.

x [..., K], W [N, K], A [r, K], B [N, r]. A and B may be fp32 master weights: they are cast to x's dtype for the
compute and their gradients come back in their own dtype.

Forward:  S = x A^T (thin GEMM, kept for the backward), then one Triton GEMM that runs the K loop of x W^T and adds
          S (s B)^T to its accumulator before the store: y is written once, with no temporary the size of y.
Backward: one Triton pass over dY gives dS = dY (s B) and dB = s dY^T S (as per-row-block partial sums), dA = dS^T x
          is a thin cuBLAS GEMM, and dX = dY W + dS A runs in the same Triton GEMM as the forward. No dW: W is frozen.

The GEMM is persistent: one program an SM walks the output tiles, and its tile loop is flattened into the K loop so
that the next tile's loads are in flight while this tile's epilogue (the low-rank product, the store) runs. The
low-rank product goes in the epilogue, not before the K loop, because there it does not stall that pipeline.
"""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's CPU interpreter multiplies bf16 tiles as their raw 16-bit integers (seen with triton 3.9); under the
# interpreter every tl.dot gets fp32 operands instead. On the GPU this is a compile-time False.
_UPCAST_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc):
    if _UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block), walking GROUP_M row blocks down each column block in turn, so that
    the tiles in flight at once share rows of U and columns of W in L2."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit(do_not_specialize=["M"])  # one compile serves every token count
def _lora_matmul_kernel(desc_u, desc_w, desc_l, desc_r, desc_c, M, N, K,
                        TRANS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                        NUM_PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """C [M, N] = U [M, K] op(W) + L [M, r] op(R), op(t) = t^T if TRANS_W else t.

    forward:  U = x,  W = W [N, K],  L = S,  R = s B [N, r],  TRANS_W
    backward: U = dY, W = W [N, K] read as [K_red, N_out],  L = dS,  R = A [r, K]
    Tails (M, N, K, r not multiples of the blocks) are zero-filled by TMA on load and clipped on store.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # The epilogue recomputes its tile's coordinates from its own counter: flattening moves the next tile's
    # loads ahead of this tile's epilogue, so the two must not share one.
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, K, BLOCK_K):
            u = desc_u.load([pid_m * BLOCK_M, k])
            if TRANS_W:
                w = tl.trans(desc_w.load([pid_n * BLOCK_N, k]))  # [BLOCK_K, BLOCK_N]
            else:
                w = desc_w.load([k, pid_n * BLOCK_N])
            acc = _dot(u, w, acc)
        tile_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_out, num_pid_m, num_pid_n, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        low = desc_l.load([off_m, 0])  # [BLOCK_M, BLOCK_R]
        if TRANS_W:
            up = tl.trans(desc_r.load([off_n, 0]))  # [BLOCK_R, BLOCK_N]
        else:
            up = desc_r.load([0, off_n])
        acc = _dot(low, up, acc)
        # stored as two [BLOCK_M, BLOCK_N / 2] halves: half the shared-memory staging, which buys a pipeline stage
        left, right = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
        desc_c.store([off_m, off_n], left.to(low.dtype))
        desc_c.store([off_m, off_n + BLOCK_N // 2], right.to(low.dtype))


def _set_block_shapes(nargs):
    # Descriptors are built before the config is known; each config sets its own tile shapes.
    bm, bn, bk, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    trans = nargs["TRANS_W"]
    nargs["desc_u"].block_shape = [bm, bk]
    nargs["desc_w"].block_shape = [bn, bk] if trans else [bk, bn]
    nargs["desc_l"].block_shape = [bm, br]
    nargs["desc_r"].block_shape = [bn, br] if trans else [br, bn]
    nargs["desc_c"].block_shape = [bm, bn // 2]


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warp-specialized, num_stages, num_warps). Measured on an H100 (LoRA shapes,
# M = 84,480): 128x256 tiles, 3 stages, 8 warps came within 8% of cuBLAS; which grouping and whether Triton's
# warp specialisation wins depends on the shape. 128x128 with 4 warps is there for short M.
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "WARP_SPECIALIZE": ws},
                          num_stages=s, num_warps=w, pre_hook=_set_block_shapes)
            for bm, bn, bk, g, ws, s, w in [(128, 256, 64, 8, False, 3, 8), (128, 256, 64, 1, False, 3, 8),
                                            (128, 256, 64, 8, True, 3, 8), (128, 128, 64, 8, False, 5, 4)]]
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "WARP_SPECIALIZE": False,
                   "NUM_PROGRAMS": 3}  # fewer programs than tiles: each walks several
_lora_matmul_tuned = triton.autotune(_CONFIGS, key=["M", "N", "K", "TRANS_W"])(_lora_matmul_kernel)


def _desc(t):
    """TMA descriptor of a 2-D tensor with contiguous rows; each config sets its tile shape (see the pre-hooks)."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [16, 16])


@functools.cache
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_matmul(u, w, low, up, trans_w, out):
    """out [M, N] = u [M, K] op(w) + low [M, r] op(up); all 2-D, rows contiguous, same dtype."""
    M, K = u.shape
    N = out.shape[1]
    r = low.shape[1]
    args = dict(desc_u=_desc(u), desc_w=_desc(w), desc_l=_desc(low), desc_r=_desc(up), desc_c=_desc(out), M=M, N=N,
                K=K, TRANS_W=trans_w, BLOCK_R=max(16, triton.next_power_of_2(r)))
    if _INTERPRET:
        meta = dict(args, **_INTERPRET_META)
        _set_block_shapes(meta)
        _lora_matmul_kernel[(meta["NUM_PROGRAMS"],)](**meta)
    else:
        sms = _num_sms(u.device)
        grid = lambda m: (min(sms, triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])),)
        _lora_matmul_tuned[grid](**args, NUM_PROGRAMS=sms)


@triton.jit(do_not_specialize=["M"])
def _lora_dy_pass_kernel(desc_dy, desc_b, desc_s, desc_ds, DB_PARTS, M, N,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One read of dY [M, N] for both low-rank gradients: dS [M, r] = dY (s B), and this program's share of
    dY^T S, summed over its BLOCK_M rows: DB_PARTS[program] [N, BLOCK_R] (fp32, summed over programs afterwards)."""
    pid = tl.program_id(0)
    off_m = pid * BLOCK_M
    s = desc_s.load([off_m, 0])  # [BLOCK_M, BLOCK_R]; rows past M and columns past r are zero-filled
    ds = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for n in range(0, N, BLOCK_N):
        dy = desc_dy.load([off_m, n])  # [BLOCK_M, BLOCK_N]
        ds = _dot(dy, desc_b.load([n, 0]), ds)
        db = _dot(tl.trans(dy), s, tl.zeros([BLOCK_N, BLOCK_R], tl.float32))
        offs_n = n + tl.arange(0, BLOCK_N)
        tl.store(DB_PARTS + (pid.to(tl.int64) * N + offs_n)[:, None] * BLOCK_R + offs_r[None, :], db,
                 mask=offs_n[:, None] < N)
    desc_ds.store([off_m, 0], ds.to(s.dtype))


def _set_dy_pass_shapes(nargs):
    bm, bn, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_R"]
    for name, shape in (("desc_dy", [bm, bn]), ("desc_b", [bn, br]), ("desc_s", [bm, br]), ("desc_ds", [bm, br])):
        nargs[name].block_shape = shape


# BLOCK_M is fixed (it sets the number of dB partial sums, allocated before the launch): 256 rows make the partials a
# quarter of dY's bytes (fp32, r = 32) and 330 programs at 84,480 tokens, enough to keep HBM busy.
_DY_PASS_BLOCK_M = 256
_DY_PASS_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_stages=s, num_warps=w, pre_hook=_set_dy_pass_shapes)
                    for bn, s, w in [(64, 3, 8), (128, 2, 8), (64, 4, 8)]]
_lora_dy_pass_tuned = triton.autotune(_DY_PASS_CONFIGS, key=["M", "N"])(_lora_dy_pass_kernel)


def _launch_dy_pass(dy, b_scaled, s_M_r):
    """(dS = dY (s B) [M, r] in dY's dtype, dY^T S [N, r] in fp32) from one read of dY."""
    M, N = dy.shape
    r = s_M_r.shape[1]
    block_m = 16 if _INTERPRET else _DY_PASS_BLOCK_M
    block_r = max(16, triton.next_power_of_2(r))
    programs = triton.cdiv(M, block_m)
    ds = torch.empty((M, r), device=dy.device, dtype=dy.dtype)
    db_parts = torch.empty((programs, N, block_r), device=dy.device, dtype=torch.float32)
    args = dict(desc_dy=_desc(dy), desc_b=_desc(b_scaled), desc_s=_desc(s_M_r), desc_ds=_desc(ds),
                DB_PARTS=db_parts, M=M, N=N, BLOCK_M=block_m, BLOCK_R=block_r)
    if _INTERPRET:
        meta = dict(args, BLOCK_N=16)
        _set_dy_pass_shapes(meta)
        _lora_dy_pass_kernel[(programs,)](**meta)
    else:
        _lora_dy_pass_tuned[(programs,)](**args)
    return ds, db_parts.sum(0)[:, :r]


@torch.library.custom_op("cosmos_kernels::lora_linear_fwd", mutates_args=())
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    s_M_r = x @ lora_A.to(x.dtype).t()
    y_M_N = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    _launch_matmul(x, weight, s_M_r, (lora_B * scale).to(x.dtype), True, y_M_N)
    return y_M_N, s_M_r


@_lora_fwd.register_fake
def _(x, weight, lora_A, lora_B, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("cosmos_kernels::lora_linear_bwd", mutates_args=())
def _lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              s_M_r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds_M_r, dyt_s_N_r = _launch_dy_pass(dy, (lora_B * scale).to(dy.dtype), s_M_r)
    db_N_r = (dyt_s_N_r * scale).to(lora_B.dtype)
    da_r_K = (ds_M_r.t() @ x).to(lora_A.dtype)
    dx_M_K = torch.empty_like(x)
    _launch_matmul(dy, weight, ds_M_r, lora_A.to(dy.dtype), False, dx_M_K)
    return dx_M_K, da_r_K, db_N_r


@_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, s_M_r, scale):
    return x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, scale = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])
    ctx.scale = scale


def _backward(ctx, dy, _ds):  # S is an internal output: nothing downstream uses it, its gradient is zero
    x, weight, lora_A, lora_B, s_M_r = ctx.saved_tensors
    dx, da, db = _lora_bwd(dy.contiguous(), x, weight, lora_A, lora_B, s_M_r, ctx.scale)
    return dx, None, da, db, None


_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, lora_A, lora_B, scale):
    """y = x W^T + scale (x A^T) B^T. x [..., K], W [N, K] (frozen), A [r, K], B [N, r] -> y [..., N]."""
    if not (x.is_cuda or _INTERPRET):
        raise ValueError(f"lora_linear runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device "
                         f"{x.device}; use lora_linear_reference elsewhere")
    K = x.shape[-1]
    N, r = weight.shape[0], lora_A.shape[0]
    if weight.shape != (N, K) or lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise ValueError(f"expected x [..., K], W [N, K], A [r, K], B [N, r]; got x {tuple(x.shape)}, W "
                         f"{tuple(weight.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"x and W must both be bf16 or both fp16, got {x.dtype} and {weight.dtype}")
    if weight.requires_grad:
        raise ValueError("lora_linear keeps W frozen and never computes dW, but W requires grad")
    if K % 8 or N % 8 or r % 8:
        raise ValueError(f"TMA needs 16-byte rows: K={K}, N={N} and r={r} must be multiples of 8")
    x_M_K = x.reshape(-1, K)
    if x_M_K.stride(-1) != 1 or (x_M_K.stride(0) * x.element_size()) % 16 or x_M_K.data_ptr() % 16:
        x_M_K = x_M_K.contiguous()  # a view TMA cannot describe: copy once
    y_M_N = _lora_fwd(x_M_K, weight.contiguous(), lora_A, lora_B, float(scale))[0]
    return y_M_N.reshape(*x.shape[:-1], N)


def lora_linear_reference(x, weight, lora_A, lora_B, scale):
    """Unfused PyTorch: x W^T + scale (x A^T) B^T, with A and B cast to x's dtype."""
    return x @ weight.t() + scale * ((x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t())
