"""Fused LoRA linear in Triton: y = x W^T + s (x A^T) B^T, W frozen; and a plain-PyTorch reference.

x [..., K], W [N, K], A [r, K], B [N, r]. A and B may be fp32 master weights: they are cast to x's dtype for the
compute and their gradients come back in their own dtype.

Forward:  one persistent Triton GEMM gives y = x W^T + S (s B)^T and S = x A^T (kept for the backward): y is written
          once, with no temporary the size of y, and S costs no pass over x of its own.
Backward: the same kernel gives dX = dY W + dS A, dS = dY (s B) and dB = s dY^T S; dA = dS^T x is a thin cuBLAS GEMM.
          No dW: W is frozen.

The thin products ride inside the GEMM: the first column tile of each row block (its "leader") also multiplies the
U tiles it loads anyway (x, or dY) by the thin operand (A^T, or s B), where a separate pass would read the whole
activation from HBM again. The leaders run first (phase 1) and publish their row block's product with release flags;
every other tile (phase 2) acquires it before its epilogue, which adds L R (L = S or dS) to the accumulator before
the store. The backward's leaders also add dY_k^T S into dB at each K step (fp32 atomics: dB's last bits vary from
run to run). One program an SM walks its tiles, phase 2's tile loop flattened into the K loop so that the next
tile's loads are in flight during this tile's epilogue. The flags need every program resident at once: a cooperative
launch (under the CPU interpreter, which runs programs one after another, a single program walks every tile).
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import LORA_MAX_RANK
from kernels.attention import _INTERPRET, _dot, _num_sms


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block), walking GROUP_M row blocks down each column block in turn, so that
    the tiles in flight at once share rows of U and columns of W in L2."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _rows(ptr, m, M, r, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Pointers to row block m of a row-major [M, r] matrix as [BLOCK_M, BLOCK_R], and the mask of those in it."""
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_R)
    return ptr + rows.to(tl.int64)[:, None] * r + cols[None, :], (rows < M)[:, None] & (cols < r)[None, :]


@triton.jit
def _epilogue(acc, low, desc_r, desc_c, off_m, off_n, TRANS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """C tile = acc + low op(R), stored as four [BLOCK_M, BLOCK_N / 4] quarters (a quarter of the tile's shared-memory
    staging, which leaves room for the thin operand's pipeline stages)."""
    if TRANS_W:
        up = tl.trans(desc_r.load([off_n, 0]))  # [BLOCK_R, BLOCK_N]
    else:
        up = desc_r.load([0, off_n])
    acc = _dot(low, up, acc)
    left, right = tl.split(tl.permute(tl.reshape(acc, [acc.shape[0], 2, BLOCK_N // 2]), [0, 2, 1]))
    q0, q1 = tl.split(tl.permute(tl.reshape(left, [acc.shape[0], 2, BLOCK_N // 4]), [0, 2, 1]))
    q2, q3 = tl.split(tl.permute(tl.reshape(right, [acc.shape[0], 2, BLOCK_N // 4]), [0, 2, 1]))
    desc_c.store([off_m, off_n], q0.to(desc_c.dtype))
    desc_c.store([off_m, off_n + BLOCK_N // 4], q1.to(desc_c.dtype))
    desc_c.store([off_m, off_n + BLOCK_N // 2], q2.to(desc_c.dtype))
    desc_c.store([off_m, off_n + 3 * BLOCK_N // 4], q3.to(desc_c.dtype))


@triton.jit(do_not_specialize=["M"])  # one compile serves every token count
def _lora_matmul_kernel(desc_u, desc_w, desc_t, desc_r, desc_c, S_PTR, L_PTR, FLAGS, DB_ACC, M, N, K, r,
                        TRANS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                        THREADS: tl.constexpr):
    """C [M, N] = U [M, K] op(W) + L op(R) with L [M, r] = U T computed here, op(t) = t^T if TRANS_W else t.

    forward  (TRANS_W): U = x, W [N, K], T = A^T (A [r, K]), R = s B [N, r]; L = S into L_PTR
    backward:           U = dY, W [N, K] read as [K_red, N_out], T = s B [K_red, r], R = A [r, N_out]; L = dS into
                        L_PTR, and DB_ACC [K_red, BLOCK_R] (fp32 zeros) += dY^T S, S read from S_PTR [M, r]
    FLAGS [cdiv(M, BLOCK_M)] int32 zeros: a row block's flag reaches THREADS once its leader has published L.
    Tails (M, N, K, r not multiples of the blocks) are zero-filled by TMA on load and clipped on store; L and S go
    through masked loads and stores ([M, r] with rows of exactly r).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    each_thread = tl.zeros([THREADS], tl.int32)  # one flag update from each thread: each publishes its own stores

    # phase 1: the leaders, tiles 0 .. num_pid_m - 1 of the round-robin sequence (row block m, column block 0).
    # The backward's is not flattened: flattened, its dB sums came out wrong (Triton 3.6).
    m_out = pid - NUM_PROGRAMS
    for m in tl.range(pid, num_pid_m, NUM_PROGRAMS, flatten=TRANS_W):
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_l = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        if not TRANS_W:  # S's rows, for dB
            s_ptrs, s_mask = _rows(S_PTR, m, M, r, BLOCK_M, BLOCK_R)
            s_rows = tl.load(s_ptrs, mask=s_mask, other=0.0)
        for k in range(0, K, BLOCK_K):
            u = desc_u.load([m * BLOCK_M, k])
            if TRANS_W:
                acc = _dot(u, tl.trans(desc_w.load([0, k])), acc)
                acc_l = _dot(u, tl.trans(desc_t.load([0, k])), acc_l)  # S += x_k A_k^T
            else:
                acc = _dot(u, desc_w.load([k, 0]), acc)
                acc_l = _dot(u, desc_t.load([k, 0]), acc_l)  # dS += dY_k (s B)_k
                db = _dot(tl.trans(u), s_rows, tl.zeros([BLOCK_K, BLOCK_R], tl.float32))  # dY_k^T S
                offs_k = k + tl.arange(0, BLOCK_K)
                tl.atomic_add(DB_ACC + offs_k[:, None] * BLOCK_R + offs_r[None, :], db, mask=offs_k[:, None] < K,
                              sem="relaxed")
        m_out = m_out + NUM_PROGRAMS if TRANS_W else m  # flattened, the epilogue keeps its own counter
        low = acc_l.to(desc_c.dtype)
        l_ptrs, l_mask = _rows(L_PTR, m_out, M, r, BLOCK_M, BLOCK_R)
        tl.store(l_ptrs, low, mask=l_mask)
        tl.atomic_add(FLAGS + m_out + each_thread, each_thread + 1, sem="release", scope="gpu")
        _epilogue(acc, low, desc_r, desc_c, m_out * BLOCK_M, 0, TRANS_W, BLOCK_N)

    # phase 2: the other tiles, the sequence's tiles num_pid_m .. (columns 1.., in the grouped order)
    first = pid + tl.cdiv(tl.maximum(num_pid_m - pid, 0), NUM_PROGRAMS) * NUM_PROGRAMS
    num_rest_n = tl.maximum(num_pid_n - 1, 1)
    # The epilogue recomputes its tile's coordinates from its own counter: flattening moves the next tile's
    # loads ahead of this tile's epilogue, so the two must not share one.
    t_out = first - NUM_PROGRAMS
    for t in tl.range(first, num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(t - num_pid_m, num_pid_m, num_rest_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, K, BLOCK_K):
            u = desc_u.load([pid_m * BLOCK_M, k])
            if TRANS_W:
                w = tl.trans(desc_w.load([(pid_n + 1) * BLOCK_N, k]))  # [BLOCK_K, BLOCK_N]
            else:
                w = desc_w.load([k, (pid_n + 1) * BLOCK_N])
            acc = _dot(u, w, acc)
        t_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(t_out - num_pid_m, num_pid_m, num_rest_n, GROUP_M)
        seen = tl.min(tl.atomic_add(FLAGS + pid_m + each_thread, each_thread, sem="acquire", scope="gpu"), 0)
        while seen < THREADS:  # the row block's leader has not published L yet (it usually ran rounds ago)
            seen = tl.min(tl.atomic_add(FLAGS + pid_m + each_thread, each_thread, sem="acquire", scope="gpu"), 0)
        l_ptrs, l_mask = _rows(L_PTR, pid_m, M, r, BLOCK_M, BLOCK_R)
        low = tl.load(l_ptrs, mask=l_mask, other=0.0)
        _epilogue(acc, low, desc_r, desc_c, pid_m * BLOCK_M, (pid_n + 1) * BLOCK_N, TRANS_W, BLOCK_N)


def _set_block_shapes(nargs):
    # Descriptors are built before the config is known; each config sets its own tile shapes.
    bm, bn, bk, br = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    trans = nargs["TRANS_W"]
    nargs["desc_u"].block_shape = [bm, bk]
    nargs["desc_w"].block_shape = [bn, bk] if trans else [bk, bn]
    nargs["desc_t"].block_shape = [br, bk] if trans else [bk, br]
    nargs["desc_r"].block_shape = [bn, br] if trans else [br, bn]
    nargs["desc_c"].block_shape = [bm, bn // 4]


# Tiles measured best on an H100 (BENCHMARKS.md); whether phase 2 walks the tiles grouped by 8 row blocks or row by
# row wins depends on the shape, so both are tuned. Ranks up to LORA_MAX_RANK fit in shared memory and registers.
# THREADS must be the program's thread count: every thread publishes its own part of L, and a waiter needs all.
_BLOCK_M, _WARPS = 128, 8
_CONFIGS = [triton.Config({"BLOCK_M": _BLOCK_M, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": g, "THREADS": 32 * _WARPS},
                          num_stages=3, num_warps=_WARPS, pre_hook=_set_block_shapes) for g in (8, 1)]
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "THREADS": 32, "NUM_PROGRAMS": 1}
# The autotuner runs each config many times, and once more for the result: the flags and dB's sums start from zero
# each time.
_lora_fwd_tuned = triton.autotune(_CONFIGS, key=["M", "N", "K"], reset_to_zero=["FLAGS"])(_lora_matmul_kernel)
_lora_bwd_tuned = triton.autotune(_CONFIGS, key=["M", "N", "K"], reset_to_zero=["FLAGS", "DB_ACC"])(
    _lora_matmul_kernel)


def _desc(t):
    """TMA descriptor of a 2-D tensor with contiguous rows; each config sets its tile shape (see the pre-hooks)."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [16, 16])


def block_r(r):
    """The rank's padded width in the kernel (and the width of the dB sums it adds into): at least 32, since ptxas
    serializes the thin products' wgmma at 16."""
    return max(32, triton.next_power_of_2(r))


def _launch_matmul(u, w, thin, up, out, low_out, s_in=None, db_acc=None):
    """Forward (s_in None): out [M, N] = u op(w) + L up^T and low_out = L = u thin^T, w [N, K], thin [r, K], up [N, r].
    Backward: out [M, N] = u w + L up and low_out = L = u thin, w [K, N], thin [K, r], up [r, N]; and db_acc fp32
    [K, block_r(r)] (zeros) += u^T s_in. All 2-D with contiguous rows, low_out, s_in and db_acc contiguous; one dtype
    (db_acc fp32)."""
    M, K = u.shape
    N, r = out.shape[1], low_out.shape[1]
    bwd = s_in is not None
    flags = torch.zeros(triton.cdiv(M, _INTERPRET_META["BLOCK_M"] if _INTERPRET else _BLOCK_M), device=u.device,
                        dtype=torch.int32)  # a flag a row block
    args = dict(desc_u=_desc(u), desc_w=_desc(w), desc_t=_desc(thin), desc_r=_desc(up), desc_c=_desc(out),
                S_PTR=s_in if bwd else low_out, L_PTR=low_out, FLAGS=flags, DB_ACC=db_acc if bwd else flags,
                M=M, N=N, K=K, r=r, TRANS_W=not bwd, BLOCK_R=block_r(r))
    if _INTERPRET:
        meta = dict(args, **_INTERPRET_META)
        _set_block_shapes(meta)
        _lora_matmul_kernel[(1,)](**meta)
    else:
        sms = _num_sms(u.device)
        tuned = _lora_bwd_tuned if bwd else _lora_fwd_tuned
        tuned[(sms,)](**args, NUM_PROGRAMS=sms, launch_cooperative_grid=True)


@torch.library.custom_op("cosmos_kernels::lora_linear_fwd", mutates_args=())
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    y_M_N = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    s_M_r = torch.empty((x.shape[0], lora_A.shape[0]), device=x.device, dtype=x.dtype)
    _launch_matmul(x, weight, lora_A.to(x.dtype), (lora_B * scale).to(x.dtype), y_M_N, s_M_r)
    return y_M_N, s_M_r


@_lora_fwd.register_fake
def _(x, weight, lora_A, lora_B, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("cosmos_kernels::lora_linear_bwd", mutates_args=())
def _lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              s_M_r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, r = lora_B.shape
    dx_M_K = torch.empty_like(x)
    ds_M_r = torch.empty_like(s_M_r)
    dyt_s_N_r = torch.zeros((N, block_r(r)), device=dy.device, dtype=torch.float32)
    _launch_matmul(dy, weight, (lora_B * scale).to(dy.dtype), lora_A.to(dy.dtype), dx_M_K, ds_M_r, s_M_r, dyt_s_N_r)
    db_N_r = (dyt_s_N_r[:, :r] * scale).to(lora_B.dtype)
    da_r_K = (ds_M_r.t() @ x).to(lora_A.dtype)
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
    if r > LORA_MAX_RANK:
        raise ValueError(f"the fused kernel serves ranks up to {LORA_MAX_RANK}, got r={r}; use lora_linear_reference")
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
