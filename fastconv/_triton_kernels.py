"""Triton kernels for depthwise large-kernel convolution (imported lazily by ``fastconv.triton_backend``).

Block-wise implicit GEMM in the spirit of RepLKNet (Ding et al., CVPR 2022, Sec. 3 / Appendix A): each program
owns a ``BLOCK_C`` vector of channels (contiguous in NHWC) and a ``BLOCK_H x BLOCK_W`` output tile; the input
halo ``(BLOCK_H+KH-1) x (BLOCK_W+KW-1) x BLOCK_C`` is read from DRAM once and re-used from L1/L2 by the KH*KW
shifted tap loads; the ``BLOCK_C`` weights of one tap sit in registers; accumulation is fp32.

Depthwise convolution has no reduction over channels, so there is no GEMM for ``tl.dot``: in the default kernels
every tap is an elementwise fp32 FMA on CUDA cores (exact for all dtypes; fp32 through tl.dot would be TF32).
``dwconv_fwd_dot_kernel`` is an opt-in alternative for 16-bit inputs: a Toeplitz re-formulation that reaches the
tensor cores (mma.sync on sm_90) at the price of ``BLOCK_U/KW`` times the FLOPs plus a per-row Toeplitz gather.

All kernels take explicit element strides, so one kernel serves NCHW and channels_last tensors.
"""
import triton
import triton.language as tl


@triton.jit
def _output_tile(H, tiles_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(image n, first output row h0, first output column w0) of this program's tile; axis 0 enumerates
    (n, tile_h, tile_w)."""
    pid_s = tl.program_id(0)
    n_tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    t = pid_s % n_tiles
    return pid_s // n_tiles, (t // tiles_w) * BLOCK_H, (t % tiles_w) * BLOCK_W



@triton.jit
def dwconv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    tiles_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y[n,c,h,w] = b[c] + sum_{i,j} x[n,c,h+i-KH//2,w+j-KW//2] * w[i,j,c]; ``w`` is pre-transposed to (KH,KW,C)."""
    n, h0, w0 = _output_tile(H, tiles_w, BLOCK_H, BLOCK_W)
    pid_c = tl.program_id(1)          # channel block

    oh = h0 + tl.arange(0, BLOCK_H)[:, None, None]
    ow = w0 + tl.arange(0, BLOCK_W)[None, :, None]
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = cc[None, None, :]
    cmask = cc < C
    cmask3 = c3 < C

    x_base = x_ptr + n.to(tl.int64) * sxn + c3 * sxc + (ow - KW // 2) * sxw     # (1, BLOCK_W, BLOCK_C)
    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    for i in tl.range(0, KH):
        ih = oh + (i - KH // 2)
        row_mask = (ih >= 0) & (ih < H) & cmask3                                  # (BLOCK_H, 1, BLOCK_C)
        row_ptrs = x_base + ih * sxh                                              # full tile, once per row
        for j in tl.range(0, KW):
            iw = ow + (j - KW // 2)
            xv = tl.load(row_ptrs + j * sxw, mask=row_mask & (iw >= 0) & (iw < W), other=0.0)
            wv = tl.load(w_ptr + (i * KW + j) * C + cc, mask=cmask, other=0.0)    # one tap, BLOCK_C channels
            acc = tl.fma(xv.to(tl.float32), wv.to(tl.float32)[None, None, :], acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)[None, None, :]

    out_mask = (oh < H) & (ow < W) & cmask3
    y_ptrs = y_ptr + n.to(tl.int64) * syn + c3 * syc + oh * syh + ow * syw
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def dwconv_bwd_weight_kernel(
    x_ptr, g_ptr, part_ptr,
    N, C, H, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    n_split,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial dL/dw for one (channel block, kernel tap tile, split) program.

    Tap tile = kernel row ``i`` x ``BLOCK_J`` consecutive columns.  The reduction over N*H*W runs over
    ``BLOCK_H x BLOCK_W`` pixel tiles; tiles are split-K across ``n_split`` programs, each storing fp32 partials
    ``part[split, i*KW+j, c]`` that the host sums (a deterministic second reduction pass, no atomics).
    dL/dw[c,i,j] = sum_{n,h,w} x[n,c,h+i-KH//2,w+j-KW//2] * g[n,c,h,w].
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    j_tiles = tl.cdiv(KW, BLOCK_J)
    i = pid_t // j_tiles
    j0 = (pid_t % j_tiles) * BLOCK_J

    jj = j0 + tl.arange(0, BLOCK_J)
    j3 = jj[:, None, None]                                            # (J, 1, 1)
    pp = tl.arange(0, BLOCK_H * BLOCK_W)                              # pixel tile flattened: rank <= 3 tensors
    ph = (pp // BLOCK_W)[:, None]                                     # (P, 1)
    pw = (pp % BLOCK_W)[:, None]
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c2 = cc[None, :]                                                  # (1, BC)
    cmask2 = c2 < C
    tiles_h = tl.cdiv(H, BLOCK_H)

    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    for r in tl.range(pid_s, N * tiles_h, n_split):                  # split-K over (image, row tile)
        n = r // tiles_h
        oh = (r % tiles_h) * BLOCK_H + ph                             # (P, 1)
        ih = oh + (i - KH // 2)
        g_rows = g_ptr + n.to(tl.int64) * sgn + oh * sgh + c2 * sgc   # (P, BC)
        x_rows = x_ptr + n.to(tl.int64) * sxn + ih * sxh + c2 * sxc
        gmask_h = (oh < H) & cmask2
        xmask_h = ((ih >= 0) & (ih < H) & cmask2)[None, :, :] & (j3 < KW)   # (J, P, BC)
        for w0 in tl.range(0, W, BLOCK_W):
            ow = w0 + pw                                              # (P, 1)
            gv = tl.load(g_rows + ow * sgw, mask=gmask_h & (ow < W), other=0.0).to(tl.float32)
            iw = ow[None, :, :] + j3 - KW // 2                        # (J, P, 1)
            xv = tl.load(x_rows[None, :, :] + iw * sxw, mask=xmask_h & (iw >= 0) & (iw < W), other=0.0)
            acc += tl.sum(xv.to(tl.float32) * gv[None, :, :], axis=1)

    p_ptrs = part_ptr + (pid_s.to(tl.int64) * (KH * KW) + i * KW + jj[:, None]) * C + cc[None, :]
    tl.store(p_ptrs, acc, mask=(jj[:, None] < KW) & (cc[None, :] < C))


@triton.jit
def dwconv_fwd_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    tiles_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """Experimental tensor-core forward for fp16/bf16 (opt-in, see ``triton_backend.dwconv_forward``).

    Per kernel row ``i`` the row convolution is a batched (over channels) matmul with a Toeplitz matrix:
    y[c,h,w] += sum_u x[c,h+i-KH//2,w0+u-KW//2] * T_i[c,u,w],  T_i[c,u,w] = w[i,u-w,c] if 0 <= u-w < KW else 0,
    with u over BLOCK_U >= BLOCK_W+KW-1 input columns.  It spends BLOCK_U/KW times the useful FLOPs, so it only
    pays off for large kernels, and only for 16-bit inputs (fp32 would run as TF32 or slow IEEE emulation).
    """
    n, h0, w0 = _output_tile(H, tiles_w, BLOCK_H, BLOCK_W)
    pid_c = tl.program_id(1)

    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = cc[:, None, None]                                            # (BC, 1, 1)
    cmask3 = c3 < C
    hh = h0 + tl.arange(0, BLOCK_H)[None, :, None]                    # (1, BH, 1)
    uu = tl.arange(0, BLOCK_U)
    iw = w0 + uu[None, None, :] - KW // 2                             # (1, 1, U) input columns of the tile
    a_cols = cmask3 & (iw >= 0) & (iw < W) & (uu[None, None, :] < BLOCK_W + KW - 1)
    d = uu[None, :, None] - tl.arange(0, BLOCK_W)[None, None, :]      # (1, U, BW) tap index u - w
    t_mask = cmask3 & (d >= 0) & (d < KW)
    x_base = x_ptr + n.to(tl.int64) * sxn + c3 * sxc + iw * sxw

    acc = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=tl.float32)
    for i in tl.range(0, KH):
        ih = hh + (i - KH // 2)
        a = tl.load(x_base + ih * sxh, mask=a_cols & (ih >= 0) & (ih < H), other=0.0)
        toeplitz = tl.load(w_ptr + (i * KW + d) * C + c3, mask=t_mask, other=0.0)
        acc = tl.dot(a, toeplitz.to(a.dtype), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cc, mask=cc < C, other=0.0).to(tl.float32)[:, None, None]

    ow = w0 + tl.arange(0, BLOCK_W)[None, None, :]
    y_ptrs = y_ptr + n.to(tl.int64) * syn + c3 * syc + hh * syh + ow * syw
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=cmask3 & (hh < H) & (ow < W))
