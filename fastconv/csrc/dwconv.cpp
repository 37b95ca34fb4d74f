// Depthwise 2-D correlation on channel-blocked planes, fp32, one 8-channel AVX vector per pixel.
//
// Plain C ABI (no torch headers) so the JIT build takes a couple of seconds; called through ctypes, which releases
// the GIL. A "plane" is one (image, block of 8 channels) slice stored (rows, cols, 8) contiguous (oneDNN's nChw8c
// for one block). Each OpenMP thread (PyTorch's own pool, see dw_has_openmp) packs its planes from the tensors'
// own layout (any strides) into cache-resident buffers, correlates, and writes the result back in place.
//
// One primitive serves all three passes of a "same" depthwise convolution (RepLKNet, Ding et al. CVPR 2022, Sec. 3):
//   forward      y  = corr(x_pad,  w)                        (kernel KHxKW, output HxW)
//   input grad   dx = corr(gy_pad, flip(w))                  (same shapes; the flip is a negative-stride view)
//   weight grad  dw = sum_n corr(x_pad[n], gy[n])            (the output gradient is the HxW "kernel", output KHxKW)
// corr(in, k)[p, q] = sum_{i<KH, j<KW} in[p+i, q+j] * k[i, j]  (valid, per 8-channel lane).
//
// Register tile: RO output rows x CO output columns of 8-lane accumulators (2 x 4: the fastest of 4x3, 2x4, 3x3,
// 3x4, 1x6, 2x3 on the dev box, 37-39 GFLOP/s on one core = its SGEMM rate). Input row ii feeds output row r through
// kernel row ii - r, so each loaded input vector is used RO times and each weight vector CO times: per (ii, j) CO
// input loads + RO weight loads for RO*CO FMAs (2x4: 6 loads / 8 FMAs; a core that issues one 256-bit load and one
// FMA per cycle stays FMA-bound).
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

typedef __m256 v8;  // needs AVX (the build uses -march=native; cpu_kernels falls back without it)

namespace {

#ifndef DW_RO
#define DW_RO 2
#endif
#ifndef DW_CO
#define DW_CO 4
#endif
constexpr int RO = DW_RO;
constexpr int CO = DW_CO;

inline v8 load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, v8 v) { _mm256_storeu_ps(p, v); }
inline v8 fma(v8 a, v8 b, v8 c) {
#ifdef __FMA__
    return _mm256_fmadd_ps(a, b, c);
#else
    return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}

// Input row ii of a tile: acc[r][c] += in[ii][j + c] * k[ii - r][j] over j, for every output row r whose kernel
// row ii - r exists. CHECK = false where all R rows use it (the tile's interior rows): no range test in the loop.
template <int R, int C, bool CHECK>
inline void input_row(v8 (&acc)[R][C], const float* inrow, const float* k, int64_t ii, int64_t KH, int64_t KW) {
    for (int64_t j = 0; j < KW; ++j) {
        v8 x[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) x[c] = load(inrow + (j + c) * 8);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const int64_t i = ii - r;
            if (CHECK && (i < 0 || i >= KH)) continue;
            const v8 w = load(k + (i * KW + j) * 8);
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) acc[r][c] = fma(x[c], w, acc[r][c]);
        }
    }
}

// One tile of R x C outputs (R <= RO, C <= CO) at out (row stride out_rs floats); in points at the tile's first
// input pixel (row stride in_rs), k at the kernel (KH x KW vectors). acc starts from init (or from out when accum).
template <int R, int C>
inline void tile(const float* in, int64_t in_rs, const float* k, int64_t KH, int64_t KW, float* out, int64_t out_rs,
                 const float* init, bool accum) {
    v8 acc[R][C];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c)
            acc[r][c] = accum ? load(out + r * out_rs + c * 8) : (init ? load(init) : _mm256_setzero_ps());
    const int64_t rows = R + KH - 1;
    for (int64_t ii = 0; ii < rows; ++ii) {
        if (ii >= R - 1 && ii < KH)
            input_row<R, C, false>(acc, in + ii * in_rs, k, ii, KH, KW);
        else
            input_row<R, C, true>(acc, in + ii * in_rs, k, ii, KH, KW);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) store(out + r * out_rs + c * 8, acc[r][c]);
}

// Dispatch a runtime edge size (r rows <= R, c columns <= C) to the matching fixed-size tile.
template <int R, int C>
inline void tile_n(int r, int c, const float* in, int64_t in_rs, const float* k, int64_t KH, int64_t KW, float* out,
                   int64_t out_rs, const float* init, bool accum) {
    if constexpr (R > 1) {
        if (r < R) return tile_n<R - 1, C>(r, c, in, in_rs, k, KH, KW, out, out_rs, init, accum);
    }
    if constexpr (C > 1) {
        if (c < C) return tile_n<R, C - 1>(r, c, in, in_rs, k, KH, KW, out, out_rs, init, accum);
    }
    tile<R, C>(in, in_rs, k, KH, KW, out, out_rs, init, accum);
}

// corr of one plane: in (OH+KH-1, OW+KW-1, 8), k (KH, KW, 8), out (OH, OW, 8).
void corr_plane(const float* in, const float* k, float* out, int64_t OH, int64_t OW, int64_t KH, int64_t KW,
                const float* init, bool accum) {
    const int64_t IW = OW + KW - 1, in_rs = IW * 8, out_rs = OW * 8;
    for (int64_t p = 0; p < OH; p += RO) {
        const int r = (int)((OH - p) < RO ? (OH - p) : RO);
        for (int64_t q = 0; q < OW; q += CO) {
            const int c = (int)((OW - q) < CO ? (OW - q) : CO);
            const float* ip = in + p * in_rs + q * 8;
            float* op = out + p * out_rs + q * 8;
            tile_n<RO, CO>(r, c, ip, in_rs, k, KH, KW, op, out_rs, init, accum);
        }
    }
}

inline int64_t lane_count(int64_t C, int64_t c0) { return (C - c0) < 8 ? (C - c0) : 8; }

// Padded row r of one plane: out (W+2pw, 8) from x rows (element strides sC, sH, sW; ``lanes`` real channels).
inline void pack_row(const float* x, int64_t lanes, int64_t sC, int64_t sH, int64_t sW, int64_t H, int64_t W,
                     int64_t ph, int64_t pw, int64_t r, float* o) {
    const int64_t Wp = W + 2 * pw, h = r - ph;
    if (h < 0 || h >= H) {
        std::memset(o, 0, sizeof(float) * Wp * 8);
        return;
    }
    std::memset(o, 0, sizeof(float) * pw * 8);
    std::memset(o + (pw + W) * 8, 0, sizeof(float) * pw * 8);
    const float* xr = x + h * sH;
    float* orow = o + pw * 8;
    if (sC == 1 && lanes == 8) {
        for (int64_t w = 0; w < W; ++w) std::memcpy(orow + w * 8, xr + w * sW, sizeof(float) * 8);
    } else {
        for (int64_t l = 0; l < 8; ++l)  // lane-outer: contiguous reads along W for NCHW inputs
            for (int64_t w = 0; w < W; ++w) orow[w * 8 + l] = l < lanes ? xr[w * sW + l * sC] : 0.f;
    }
}

// One plane row (W, 8) back to an (N, C, H, W) row with element strides sC, sW.
inline void unpack_row(const float* yr, int64_t lanes, int64_t W, float* orow, int64_t sC, int64_t sW) {
    if (sC == 1 && lanes == 8) {
        for (int64_t w = 0; w < W; ++w) std::memcpy(orow + w * sW, yr + w * 8, sizeof(float) * 8);
    } else {
        for (int64_t l = 0; l < lanes; ++l)
            for (int64_t w = 0; w < W; ++w) orow[w * sW + l * sC] = yr[w * 8 + l];
    }
}

}  // namespace

extern "C" {

// 1 when built with OpenMP: the parallel loops then run on the process's OpenMP pool, which is PyTorch's own
// (torch loads its libgomp.so.1 first and the dynamic loader resolves this library's libgomp.so.1 to it), so the
// kernel does not compete with PyTorch's spinning worker threads.
int dw_has_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// Weight gradient: gw (C, KH, KW) contiguous = sum_n corr(x_pad[n, c], g[n, c]) with x, g (N, C, H, W) given by
// element strides. Per 8-channel block a thread packs each image's padded input plane and output-gradient plane
// into its own buffers and accumulates the (KH, KW, 8) correlation, then writes it out.
void dw_wgrad_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* g, int64_t gN,
                    int64_t gC, int64_t gH, int64_t gW, float* gw, int64_t N, int64_t C, int64_t H, int64_t W,
                    int64_t KH, int64_t KW, int64_t nthreads) {
    const int64_t CB = (C + 7) / 8, ph = KH / 2, pw = KW / 2, Hp = H + 2 * ph, Wp = W + 2 * pw;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> xin(Hp * Wp * 8), gin(H * W * 8), acc(KH * KW * 8);
#pragma omp for schedule(dynamic, 1)
        for (int64_t cb = 0; cb < CB; ++cb) {
            const int64_t c0 = cb * 8, lanes = lane_count(C, c0);
            for (int64_t n = 0; n < N; ++n) {
                for (int64_t r = 0; r < Hp; ++r)
                    pack_row(x + n * sN + c0 * sC, lanes, sC, sH, sW, H, W, ph, pw, r, xin.data() + r * Wp * 8);
                for (int64_t r = 0; r < H; ++r)
                    pack_row(g + n * gN + c0 * gC, lanes, gC, gH, gW, H, W, 0, 0, r, gin.data() + r * W * 8);
                corr_plane(xin.data(), gin.data(), acc.data(), KH, KW, H, W, nullptr, n > 0);
            }
            for (int64_t i = 0; i < KH; ++i)
                unpack_row(acc.data() + i * KW * 8, lanes, KW, gw + c0 * KH * KW + i * KW, KH * KW, 1);
        }
    }
}

// Forward (or, with a flipped weight view, input gradient) in one pass: per (image, 8-channel block) plane, a
// thread packs the padded input plane and its 8 weight vectors into its own buffers (cache-resident), correlates,
// and writes the plane to y in y's own layout. x (N, C, H, W) and y (N, C, H, W) with element strides; w is
// (C, KH, KW) with strides (swC, swH, swW) (negative for the flipped kernel); b (C) contiguous or null.
void dw_conv_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* w, int64_t swC,
                   int64_t swH, int64_t swW, const float* b, float* y, int64_t yN, int64_t yC, int64_t yH, int64_t yW,
                   int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads) {
    const int64_t CB = (C + 7) / 8, ph = KH / 2, pw = KW / 2, Hp = H + 2 * ph, Wp = W + 2 * pw;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> xin(Hp * Wp * 8), ker(KH * KW * 8), out(H * W * 8);
        float bias[8];
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < N * CB; ++p) {
            const int64_t n = p / CB, c0 = (p % CB) * 8, lanes = lane_count(C, c0);
            const float* xp = x + n * sN + c0 * sC;
            for (int64_t r = 0; r < Hp; ++r) pack_row(xp, lanes, sC, sH, sW, H, W, ph, pw, r, xin.data() + r * Wp * 8);
            for (int64_t i = 0; i < KH; ++i)
                pack_row(w + c0 * swC, lanes, swC, swH, swW, KH, KW, 0, 0, i, ker.data() + i * KW * 8);
            if (b)
                for (int64_t l = 0; l < 8; ++l) bias[l] = l < lanes ? b[c0 + l] : 0.f;
            corr_plane(xin.data(), ker.data(), out.data(), H, W, KH, KW, b ? bias : nullptr, false);
            float* yp = y + n * yN + c0 * yC;
            for (int64_t h = 0; h < H; ++h) unpack_row(out.data() + h * W * 8, lanes, W, yp + h * yH, yC, yW);
        }
    }
}

}  // extern "C"
