// Depthwise 2-D correlation on channel-blocked planes, fp32, one L-channel vector per pixel (L = 8 or 16).
//
// Plain C ABI (no torch headers) so the JIT build takes a few seconds; called through ctypes, which releases
// the GIL. A "plane" is one (image, block of L channels) slice stored (rows, cols, L) contiguous (oneDNN's nChw8c /
// nChw16c for one block). Each OpenMP thread (PyTorch's own pool, see dw_has_openmp) packs its planes from the
// tensors' own layout (any strides) into cache-resident buffers, correlates, and writes the result back in place;
// the forward / input gradient of kernels up to 13 (21) mostly runs in direct tiles of output pixels (conv_path).
//
// One primitive serves all three passes of a "same" depthwise convolution (RepLKNet, Ding et al. CVPR 2022, Sec. 3):
//   forward      y  = corr(x_pad,  w)                        (kernel KHxKW, output HxW)
//   input grad   dx = corr(gy_pad, flip(w))                  (same shapes; the flip is a negative-stride view)
//   weight grad  dw = sum_n corr(x_pad[n], gy[n])            (the output gradient is the HxW "kernel", output KHxKW)
// corr(in, k)[p, q] = sum_{i<KH, j<KW} in[p+i, q+j] * k[i, j]  (valid, per lane).
// Where the input gradient runs direct tiles on whole packed planes of gy, the weight gradient reads the same packed
// plane in the same pass (dw_backward_fused); where it runs packed planes, each plane of gy is packed once for both.
//
// Lane widths. The kernel body (below the #else) is written once over a GCC vector type of L floats and compiled
// three times into this one library, by including this file into three namespaces:
//   dw8    L = 8,  the build's own target (-march=native: AVX2 here);
//   dw16g  L = 16, the build's own target: on an AVX2 CPU GCC lowers each 16-lane vector to two 256-bit ones, so
//          the 16-lane blocking, packing and tiling run (and are tested) on a machine without AVX-512;
//   dw16   L = 16 with every function built for target("avx512f") (zmm registers), run only where the CPU reports
//          avx512f (__builtin_cpu_supports).
// dw_conv_fused / dw_wgrad_fused take the lane width (8 or 16; 0 = auto: 16 on an avx512f CPU, else 8) and run the
// matching variant; fastconv.cpu_kernels exposes the choice (FASTCONV_CPU_LANES, explain()).
// The AVX-512 variant's register tile, 4x5 (20 zmm accumulators + 5 window + 1 weight of 32 registers), measured
// against 6x4, 4x6, 5x5, 8x3 and 3x7 on a 2-core Intel Xeon with AVX-512 (1 thread, B=1 C=384 R=32, K=13 and 31,
// forward and weight gradient, paired rounds): each of them 1.05-1.37x slower.
//
// The forward / input gradient of kernels up to DMAXK skip the planes (conv_direct, see conv_path): a tile of DCO
// output pixels of one block, read straight from a channels_last tensor of whole blocks or, past straight_taps()
// taps, from the block's rows copied to a compact buffer (any layout where DANY_LAYOUT: all but dw16g), and written
// straight to a channels_last output (else through one row buffer), the kernel row's columns in chunks of KCH weight
// vectors held in registers (DCO accumulators + KCH weights + 1 input of the register file: AVX-512 16 + 13 + 1 of
// 32; 8 lanes 8 + 6 + 1 of 16; 16 lanes lowered to AVX2 4 + 2 + 1 vectors, two ymm each).
//
// Register tile: RO output rows x CO output columns of L-lane accumulators. Input row ii feeds output row r through
// kernel row ii - r: per (ii, j) the CO input vectors in[ii][j .. j+CO-1] are a window that slides by one along j (one
// new input load per j; the window rotates in registers, see input_row), and each of the RO weight vectors k[ii-r][j]
// is loaded once and used CO times: 1 + RO loads for RO*CO FMAs. The accumulator count must cover FMA latency x FMA
// ports (Zen 2: 5 x 2 = 10), and accumulators + window + 1 weight must fit the register file. 8 lanes (16 ymm): 2 x 5 =
// 10 accumulators + 5 + 1 = 16 registers. Measured on the dev box (1 thread, C=96, GFLOP/s forward / weight grad, FMA
// peak ~100): R=32 K=31 2x5 sliding 88/84 vs the earlier 2x4 without the window 51/51; R=64 K=31 87/82 vs 52/41; R=32
// K=13 80/72 vs 39/41 (4x3, 3x4, 5x2, 6x2, 3x3, 1x7 sliding: all slower, 27-74). 16 lanes lowered to AVX2 (two ymm per
// vector): 1 x 3; AVX-512 (32 zmm): 4 x 5. The last OW mod CO columns take taller tiles (tail_rows).
// Padding: the packed planes carry explicit zero borders, and corr_plane skips the input rows and kernel-column
// windows of a tile that lie wholly in them (a kernel as large as the map multiplies zeros in most of its taps), and
// at a row's first and last steps the window columns that lie in them (input_row's edge steps).
// A kernel at least twice the map swaps the roles of map and kernel in the forward / input gradient (swap_roles,
// above conv_fused): then nothing is padded at all.
// Large kernels on large maps (from 21 on maps from 22 with AVX-512, from 15 on maps from 20 with 8 lanes: wino_rows)
// run the planes in Winograd F(3, 3) rows (corr_plane_wino): three output rows of three kernel rows from five products
// instead of nine, each a plain correlation of a transformed plane (the input rows 3j .. 3j + 4 combined) with a
// transformed kernel of a third of the rows, so 1.72x fewer multiply-adds at K = 31
// (fastconv.roofline.winograd_rows_flops); the weight gradient of maps from 20 too (wino_wgrad). Kernels of 13 to 31
// on maps large enough (wino_direct) run the same Winograd rows in the direct tiles on packed rows instead (conv_path
// 5): each band's rows are transformed once and each product is a direct tile over the transformed rows. Not
// bit-identical to the direct sums: within a few float32 ulps of the sum's magnitude (the transforms scale by up to 4
// and 1/6), checked against float64 in the tests; the same numbers on any thread count. A NaN or inf input reaches the
// (up to two) other output rows of its triplets as NaN, where the direct sums leave them finite.
#ifndef DW_KERNEL_BODY
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

// Buffers of whole 64-byte cache lines, starting on one: a 16-lane vector (64 bytes) then never straddles two lines.
// malloc aligns large blocks to 16 bytes only, so every 16-lane load of a packed plane was a split load. Measured
// (Intel Xeon with AVX-512, 1 thread, B=1 C=384 R=32, paired rounds): forward 0.87-0.93x, weight gradient 0.88x.
template <class T>
struct LineAligned {
    typedef T value_type;
    static constexpr size_t LINE = 64;
    LineAligned() = default;
    template <class U>
    LineAligned(const LineAligned<U>&) {}
    T* allocate(size_t n) {
        void* p = std::aligned_alloc(LINE, (n * sizeof(T) + LINE - 1) / LINE * LINE);
        if (!p) throw std::bad_alloc();
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t) { std::free(p); }
    template <class U>
    bool operator==(const LineAligned<U>&) const { return true; }
    template <class U>
    bool operator!=(const LineAligned<U>&) const { return false; }
};
typedef std::vector<float, LineAligned<float>> Buffer;
// The same without the zero fill, for buffers whose every element is written before it is read (packed kernels, an
// output plane): the fill of the 1.5 MB of packed kernels at C=384 K=31 ran on one thread before the planes.
// Measured (Intel Xeon with AVX-512, B=1 C=384 R=32, 9 paired rounds, new / old median): 1 thread (thread CPU time)
// 0.98-0.99 at K=13, 27, 31; 2 threads (wall time) K=31 0.94, K=13 0.95-0.99.
template <class T>
struct LineAlignedRaw : LineAligned<T> {
    LineAlignedRaw() = default;
    template <class U>
    LineAlignedRaw(const LineAlignedRaw<U>&) {}
    template <class U>
    void construct(U* p) {
        ::new (static_cast<void*>(p)) U;  // default-initialized: no zero fill
    }
    template <class U>
    void construct(U* p, const U& v) {
        ::new (static_cast<void*>(p)) U(v);
    }
};
typedef std::vector<float, LineAlignedRaw<float>> RawBuffer;

// Where Winograd F(3, 3) rows replace direct sums, measured per variant and, with AVX-512, per kind of core
// (tuning): the direct tiles on packed rows (wino_direct, conv_path 5) for kernels min_k..max_k, K < 15 on maps from
// map_under_k15, K = 15-21 from min_map, K >= 23 on maps map_k23..max_map_k23 (and the band and tail rules in
// wino_direct); the weight gradient (wino_wgrad) of kernels from wgrad_min_k on maps from wgrad_min_map.
struct WinogradRules {
    int min_k, max_k, map_under_k15, min_map, map_k23, max_map_k23, wgrad_min_k, wgrad_min_map;
};

// The tuning, what was measured per kind of core: 1 on cores that run a 512-bit FMA as two 256-bit halves (AMD Zen 4:
// half the FMA rate per core of the Intel Xeon's two 512-bit units, the same loads and shuffles, so that fewer
// multiply-adds pay for the Winograd transforms sooner; AMD family 19h with avx512f, which its Zen 3 lacks), 0 on the
// others. It picks the AVX-512 variant's WINOGRAD_RULES and, in every variant, straight_taps; dw_set_tuning
// overrides it.
static int g_tuning = -1;
inline int cpu_splits_512bit_fma() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541 || d != 0x69746e65 || c != 0x444d4163)  // AuthenticAMD
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned base = (a >> 8) & 0xf, family = base + (base == 0xf ? (a >> 20) & 0xff : 0);
    return family == 0x19 && __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}
inline int tuning() {
    static const int detected = cpu_splits_512bit_fma();
    return g_tuning >= 0 ? g_tuning : detected;
}

// The register tile's steps must inline into the tile, whose accumulators then stay in registers: GCC's size limits
// left some input_row instances out of line (accumulators in memory, the tile 1.3x slower) once the edge steps came.
#define DW_TILE_STEP inline __attribute__((always_inline))

#define DW_KERNEL_BODY 1
namespace dw8 {
constexpr int L = 8;
#define DW_LANES 8
#define DW_PLANE_COLUMNS inline  // see plane_columns
#ifdef DW_RO8
constexpr int RO = DW_RO8, CO = DW_CO8;  // tuning experiments: -DDW_RO8=.. -DDW_CO8=..
#else
constexpr int RO = 2, CO = 5;
#endif
#ifdef DW_WRO8
constexpr int WRO = DW_WRO8, WCO = DW_WCO8;  // tuning experiments: -DDW_WRO8=.. -DDW_WCO8=..
#else
constexpr int WRO = 3, WCO = 3;  // the weight gradient's tile (corr_plane): see wgrad_plane
#endif
#ifndef DW_WREST8
#define DW_WREST8 true
#endif
constexpr bool WREST = DW_WREST8;
// DANY_LAYOUT: the direct tiles on packed rows (conv_path 3 and 5) on NCHW input too (see conv_path)
constexpr int DCO = 8, KCH = 6, DMAXK = 13, DANY_LAYOUT = 1;
constexpr int NREG = 16;  // vector registers of L floats: 16 ymm (AVX2); NEON: 32 q registers, two per vector
// Winograd rows on packed planes (corr_plane_wino): the forward / input gradient of kernels from WMINK on maps from
// WMINMAP (wino_rows, measured); in direct tiles and in the weight gradient: WINOGRAD_RULES
constexpr bool WINO = true;
constexpr int WMINK = 15, WMINMAP = 20;
#ifdef DW_WD8
constexpr WinogradRules WINOGRAD_RULES = {DW_WD8};  // tuning experiments: -DDW_WD8=9,31,16,16,24,32,9,20
#else
constexpr WinogradRules WINOGRAD_RULES = {9, 31, 16, 16, 24, 32, 9, 20};
#endif
inline const WinogradRules& winograd_rules() { return WINOGRAD_RULES; }
#include __FILE__
#undef DW_LANES
#undef DW_PLANE_COLUMNS
}  // namespace dw8
namespace dw16g {
#define DW_LANES 16
#define DW_PLANE_COLUMNS inline  // see plane_columns
constexpr int L = 16, RO = 1, CO = 3, NREG = 8, DCO = 4, KCH = 2, DMAXK = 13, DANY_LAYOUT = 0;  // two ymm per vector
constexpr int WRO = RO, WCO = CO;
constexpr bool WREST = false;
constexpr bool WINO = false;  // no Winograd rows: this variant only tests the 16-lane blocking without AVX-512
constexpr int WMINK = 0, WMINMAP = 0;
constexpr WinogradRules WINOGRAD_RULES = {0, 0, 0, 0, 0, 0, 0, 0};
inline const WinogradRules& winograd_rules() { return WINOGRAD_RULES; }
#include __FILE__
#undef DW_LANES
#undef DW_PLANE_COLUMNS
}  // namespace dw16g
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(DW_NO_AVX512)
#define DW_HAS_AVX512 1
// every function between DW_AVX512_BEGIN and DW_AVX512_END is built for target("avx512f")
#ifdef __clang__
#define DW_AVX512_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx512f\"))), apply_to = function)")
#define DW_AVX512_END _Pragma("clang attribute pop")
#else
#define DW_AVX512_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")")
#define DW_AVX512_END _Pragma("GCC pop_options")
#endif
DW_AVX512_BEGIN
#define DW_IN_AVX512 1
namespace dw16 {
#define DW_LANES 16
#define DW_PLANE_COLUMNS __attribute__((always_inline)) inline  // see plane_columns
constexpr int L = 16, RO = 4, CO = 5, NREG = 32, WRO = RO, WCO = CO;
#ifndef DW_WREST16
#define DW_WREST16 false
#endif
constexpr bool WREST = DW_WREST16;
#ifdef DW_DCO16
constexpr int DCO = DW_DCO16, KCH = DW_KCH16;
#else
constexpr int DCO = 16, KCH = 13;
#endif
constexpr int DMAXK = 21, DANY_LAYOUT = 1;
constexpr bool WINO = true;  // Winograd rows, as dw8's
constexpr int WMINK = 21, WMINMAP = 22;
// tuning 0 measured on an Intel Xeon, tuning 1 (cores that split 512-bit FMAs) on an AMD EPYC of Zen 4: see
// wino_direct and wino_wgrad
#ifdef DW_WD16
constexpr WinogradRules WINOGRAD_RULES[2] = {{DW_WD16}, {DW_WD16}};  // experiments: -DDW_WD16=13,31,36,17,20,1024,13,20
#else
constexpr WinogradRules WINOGRAD_RULES[2] = {{13, 31, 36, 17, 20, 1 << 30, 13, 20},
                                             {9, 31, 16, 16, 20, 1 << 30, 9, 16}};
#endif
inline const WinogradRules& winograd_rules() { return WINOGRAD_RULES[tuning()]; }
#include __FILE__
#undef DW_LANES
#undef DW_PLANE_COLUMNS
}  // namespace dw16
#undef DW_IN_AVX512
DW_AVX512_END
#else
#define DW_HAS_AVX512 0
#endif
#undef DW_KERNEL_BODY

namespace {
bool cpu_avx512f() {
#if DW_HAS_AVX512
    return __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
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

// 1 when the AVX-512 variant is in this library; 1 when the CPU runs it.
int dw_has_avx512_build() { return DW_HAS_AVX512; }
int dw_cpu_avx512f() { return cpu_avx512f() ? 1 : 0; }

// The tuning (the AVX-512 variant's WINOGRAD_RULES, every variant's straight_taps): 1 for cores that run a 512-bit FMA
// as two 256-bit halves (AMD Zen 4), 0 for the others. dw_set_tuning(0 or 1) chooses one for the process (the tests
// run both on one CPU), -1 the CPU's again; not while a call runs.
int dw_tuning() { return tuning(); }
void dw_set_tuning(int t) { g_tuning = t == 0 || t == 1 ? t : -1; }

// Which variant a lane request runs: 8 (dw8), 16 (dw16, AVX-512), 17 (dw16g, 16 lanes lowered to the build's
// target), 0 for an invalid request. lanes 0 = auto (16 on an avx512f CPU with the variant built, else 8).
int dw_variant(int64_t lanes) {
    const bool avx512 = DW_HAS_AVX512 && cpu_avx512f();
    if (lanes == 0) return avx512 ? 16 : 8;
    if (lanes == 8) return 8;
    if (lanes == 16) return avx512 ? 16 : 17;
    return 0;
}

// Weight gradient: gw (C, KH, KW) contiguous = sum_n corr(x_pad[n, c], g[n, c]) with x, g (N, C, H, W) given by
// element strides. Per L-channel block (and slice of the images where there are few blocks: wgrad_slices) a thread
// packs each image's padded input plane and output-gradient plane into its own buffers and accumulates the
// (KH, KW, L) correlation, then writes it out.
void dw_wgrad_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* g, int64_t gN,
                    int64_t gC, int64_t gH, int64_t gW, float* gw, int64_t N, int64_t C, int64_t H, int64_t W,
                    int64_t KH, int64_t KW, int64_t nthreads, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::wgrad_fused(x, sN, sC, sH, sW, g, gN, gC, gH, gW, gw, N, C, H, W, KH, KW, nthreads);
#if DW_HAS_AVX512
        case 16: return dw16::wgrad_fused(x, sN, sC, sH, sW, g, gN, gC, gH, gW, gw, N, C, H, W, KH, KW, nthreads);
#endif
        case 17: return dw16g::wgrad_fused(x, sN, sC, sH, sW, g, gN, gC, gH, gW, gw, N, C, H, W, KH, KW, nthreads);
        default: return;
    }
}

// Forward (or, with a flipped weight view, input gradient) in one pass: per (image, L-channel block) plane, a
// thread packs the padded input plane and its L-lane weight vectors into its own buffers (cache-resident),
// correlates, and writes the plane to y in y's own layout (or, see dw_conv_path, the direct tiles). x (N, C, H, W)
// and y (N, C, H, W) with element strides; w
// is (C, KH, KW) with strides (swC, swH, swW) (negative for the flipped kernel); b (C) contiguous or null.
void dw_conv_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* w, int64_t swC,
                   int64_t swH, int64_t swW, const float* b, float* y, int64_t yN, int64_t yC, int64_t yH, int64_t yW,
                   int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads,
                   int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::conv_fused(x, sN, sC, sH, sW, w, swC, swH, swW, b, y, yN, yC, yH, yW, N, C, H, W, KH, KW,
                                       nthreads);
#if DW_HAS_AVX512
        case 16: return dw16::conv_fused(x, sN, sC, sH, sW, w, swC, swH, swW, b, y, yN, yC, yH, yW, N, C, H, W, KH,
                                         KW, nthreads);
#endif
        case 17: return dw16g::conv_fused(x, sN, sC, sH, sW, w, swC, swH, swW, b, y, yN, yC, yH, yW, N, C, H, W, KH,
                                          KW, nthreads);
        default: return;
    }
}

// Which way dw_conv_fused computes a call (the same tests it makes): 1 direct channels_last tiles (conv_direct),
// 3 the same from rows packed per channel block, 5 those in Winograd rows (wino_direct), 2 packed planes with map and
// kernel swapped (swap_roles), 4 packed planes in Winograd rows (corr_plane_wino), 0 packed planes; -1 for an invalid
// lane request.
int dw_conv_path(int64_t sC, int64_t yC, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::conv_path(sC, yC, C, H, W, KH, KW);
#if DW_HAS_AVX512
        case 16: return dw16::conv_path(sC, yC, C, H, W, KH, KW);
#endif
        case 17: return dw16g::conv_path(sC, yC, C, H, W, KH, KW);
        default: return -1;
    }
}

// 1 where the weight gradient of an H x W map with a KH x KW kernel runs the Winograd rows (wgrad_plane), else 0;
// -1 for an invalid lane request.
int dw_wgrad_wino(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::wino_wgrad(H, W, KH, KW) ? 1 : 0;
#if DW_HAS_AVX512
        case 16: return dw16::wino_wgrad(H, W, KH, KW) ? 1 : 0;
#endif
        case 17: return dw16g::wino_wgrad(H, W, KH, KW) ? 1 : 0;
        default: return -1;
    }
}

// Input gradient gx (N, C, H, W; element strides xN, xC, xH, xW) = corr(g_pad, w) with w passed flipped (negative
// strides, as to dw_conv_fused) and weight gradient gw (C, KH, KW) contiguous in one pass (backward_fused) where
// that pass applies: returns 1, else 0 (nothing computed: call dw_conv_fused and dw_wgrad_fused); -1 for an invalid
// lane request.
int dw_backward_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* g, int64_t gN,
                      int64_t gC, int64_t gH, int64_t gW, const float* w, int64_t swC, int64_t swH, int64_t swW,
                      float* gx, int64_t xN, int64_t xC, int64_t xH, int64_t xW, float* gw, int64_t N, int64_t C,
                      int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::backward_fused(x, sN, sC, sH, sW, g, gN, gC, gH, gW, w, swC, swH, swW, gx, xN, xC, xH, xW,
                                           gw, N, C, H, W, KH, KW, nthreads);
#if DW_HAS_AVX512
        case 16: return dw16::backward_fused(x, sN, sC, sH, sW, g, gN, gC, gH, gW, w, swC, swH, swW, gx, xN, xC, xH,
                                             xW, gw, N, C, H, W, KH, KW, nthreads);
#endif
        case 17: return dw16g::backward_fused(x, sN, sC, sH, sW, g, gN, gC, gH, gW, w, swC, swH, swW, gx, xN, xC, xH,
                                              xW, gw, N, C, H, W, KH, KW, nthreads);
        default: return -1;
    }
}

// How dw_backward_fused computes a call with these channel strides of x, g and gx (1 direct tiles on packed rows, 2
// packed planes, 0 not in one pass), on nthreads threads; -1 for an invalid lane request.
int dw_backward_plan(int64_t sC, int64_t gC, int64_t xC, int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH,
                     int64_t KW, int64_t nthreads, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::backward_plan(sC, gC, xC, N, C, H, W, KH, KW, nthreads);
#if DW_HAS_AVX512
        case 16: return dw16::backward_plan(sC, gC, xC, N, C, H, W, KH, KW, nthreads);
#endif
        case 17: return dw16g::backward_plan(sC, gC, xC, N, C, H, W, KH, KW, nthreads);
        default: return -1;
    }
}

// The work split of a call (what conv_direct and wgrad_fused compute from the same arguments; -1 for an invalid
// lane request): row bands per (image, channel block) of the packed rows and channel blocks per unit of them,
// weight-gradient slices of the images.
int64_t dw_row_bands(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads,
                     int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::row_bands(N, C, H, W, KH, KW, nthreads);
#if DW_HAS_AVX512
        case 16: return dw16::row_bands(N, C, H, W, KH, KW, nthreads);
#endif
        case 17: return dw16g::row_bands(N, C, H, W, KH, KW, nthreads);
        default: return -1;
    }
}
int64_t dw_row_groups(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads,
                      int64_t channels_inner, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::row_groups(N, C, H, W, KH, KW, nthreads, channels_inner);
#if DW_HAS_AVX512
        case 16: return dw16::row_groups(N, C, H, W, KH, KW, nthreads, channels_inner);
#endif
        case 17: return dw16g::row_groups(N, C, H, W, KH, KW, nthreads, channels_inner);
        default: return -1;
    }
}
int64_t dw_wgrad_slices(int64_t N, int64_t C, int64_t channels_inner, int64_t lanes) {
    switch (dw_variant(lanes)) {
        case 8: return dw8::wgrad_slices(N, C, channels_inner);
#if DW_HAS_AVX512
        case 16: return dw16::wgrad_slices(N, C, channels_inner);
#endif
        case 17: return dw16g::wgrad_slices(N, C, channels_inner);
        default: return -1;
    }
}

// The three passes with their integer arguments in one array, in the order of the calls above (from sN to lanes,
// the pointers apart): ctypes converts each argument of a call, about 0.12 us each on a warm cache and more between
// the layers of a network, where the 23 of dw_conv_fused took 3-8 us of a 75 us call (fastconv.cpu_kernels keeps one
// array per call signature).
void dw_conv_fused_p(const float* x, const float* w, const float* b, float* y, const int64_t* a) {
    dw_conv_fused(x, a[0], a[1], a[2], a[3], w, a[4], a[5], a[6], b, y, a[7], a[8], a[9], a[10], a[11], a[12], a[13],
                  a[14], a[15], a[16], a[17], a[18]);
}
void dw_wgrad_fused_p(const float* x, const float* g, float* gw, const int64_t* a) {
    dw_wgrad_fused(x, a[0], a[1], a[2], a[3], g, a[4], a[5], a[6], a[7], gw, a[8], a[9], a[10], a[11], a[12], a[13],
                   a[14], a[15]);
}
int dw_backward_fused_p(const float* x, const float* g, const float* w, float* gx, float* gw, const int64_t* a) {
    return dw_backward_fused(x, a[0], a[1], a[2], a[3], g, a[4], a[5], a[6], a[7], w, a[8], a[9], a[10], gx, a[11],
                             a[12], a[13], a[14], gw, a[15], a[16], a[17], a[18], a[19], a[20], a[21], a[22]);
}

}  // extern "C"

#else  // ------------------------------------------------------------- the kernel body, per namespace (L, RO, CO)

typedef float vec __attribute__((vector_size(L * sizeof(float))));

inline vec load(const float* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);  // an unaligned vector load
    return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
// a * b + c: one FMA instruction per register (the build passes -ffp-contract=fast)
inline vec fma(vec a, vec b, vec c) { return a * b + c; }

// The input loads of the direct tiles that read straight from a channels_last tensor (direct_chunk with STRAIGHT):
// each input vector feeds up to KC FMAs, and GCC folded its load into every one of them (a memory operand per FMA: KC
// loads of one line), each at an address of its own (row + m * ps for the run-time pixel stride ps: more address
// registers than the general ones, spilled to vector registers). in_register keeps the loaded vector in a register
// (an empty asm that takes and gives it), next_pixel steps one pointer by ps (an empty asm hides its value, so the
// addresses are not recomputed from the row start). Measured (Zen 4, 2 threads, the C entry points of both builds in
// one process, median of 40-400 paired rounds, channels_last forward): AVX-512 B=1 C=384 R=32 K=3 0.81-0.84, K=5
// 0.82-0.90, R=16 K=3 0.79, C=768 K=3 0.72, B=8 C=128 R=56 K=3 0.69-0.75, K=5 0.78, 1 thread K=3 0.69-0.87; both
// gradients (input gradient straight, weight gradient as before) K=3 0.86-0.93, K=5 0.91-1.00, B=8 C=128 R=56 K=5
// 0.87; 8 lanes built for AVX2 K=3 0.85-0.96, K=5 0.88-0.92, B=8 C=128 R=56 K=3 0.93. One K=3 tile alone, its lines
// in L1 (1 thread): 66 -> 39 ns, 99 % of the FMA peak. Not on the packed rows, whose pixel stride is L: there both
// measured 1.13-1.16 (NCHW K=3, channels_last C=100), in_register alone forward 0.92-1.00 with AVX-512 but 1.00-1.09
// with 8 lanes, both gradients (one pass) 1.00-1.06. Where one register holds no vec (16 lanes built for AVX2: two
// ymm), in_register leaves the value as it is.
#if defined(__GNUC__) && (DW_IN_AVX512 || defined(__AVX512F__) || (defined(__AVX__) && DW_LANES == 8))
__attribute__((always_inline)) inline void in_register(vec& v) { asm("" : "+v"(v)); }
#else
__attribute__((always_inline)) inline void in_register(vec&) {}
#endif
__attribute__((always_inline)) inline const float* next_pixel(const float* p, int64_t ps) {
    p += ps;
    asm("" : "+r"(p));
    return p;
}

// The interior direct tiles' pixel stride as a run-time value where the target has 16 vector registers (AVX2), also
// where the caller passes a constant (the packed rows' L) and GCC inlines the tile or clones it for that constant: GCC
// then folded the input loads into the FMAs at constant offsets and kept 4 of the 8 accumulators in memory (8 lanes
// built for AVX2, K = 9-17: 1.12-1.14 the time, once code added elsewhere in the file had changed what GCC inlined).
// The edge tiles keep the constant (a run-time stride in them too: 1.02-1.04 at K = 21-31), and so does AVX-512 with
// its 32 registers (a run-time stride there: 1.06-1.22).
#if defined(__GNUC__) && defined(__AVX__) && !defined(__AVX512F__) && !DW_IN_AVX512
__attribute__((always_inline)) inline void opaque_stride(int64_t& ps) { asm("" : "+r"(ps)); }
#else
__attribute__((always_inline)) inline void opaque_stride(int64_t&) {}
#endif

// The part of a tile's work that can be nonzero: input rows [ii_lo, ii_hi) of the tile's R+KH-1, and kernel
// columns [j_lo, j_hi). Rows and column windows that lie wholly in the zero padding of the packed input are skipped
// (their products are zeros): at 14x14 with K=27 (RepLKNet-31B's stage 3 at 224 px) 73% of the taps.
// left_edge: the window starts C - 1 columns before the map's first (j_lo > 0 was clipped by it); right_edge: j_hi
// was clipped by the map's last column. Then input_row also skips the window columns that lie in the padding at the
// row's first and last steps (at R = 32, K = 31: about 7% of the tiles' multiply-adds).
struct Span {
    int64_t ii_lo, ii_hi, j_lo, j_hi;
    bool left_edge, right_edge;
};

// Slide a window in rotation 0 by one column (register moves).
template <int C>
DW_TILE_STEP void shift_window(vec (&x)[C]) {
#pragma GCC unroll 8
    for (int c = 0; c + 1 < C; ++c) x[c] = x[c + 1];
}

// One step j of input_row, the window held in rotation S: window column c (input pixel j + c) is in x[(c + S) % C],
// so C consecutive steps, S = 0 .. C-1, slide the window without a register move. Only the window columns
// [CL, CH) are multiplied (the others are known to hold zero padding: see input_row).
template <int R, int C, bool CHECK, int S, int CL = 0, int CH = C>
DW_TILE_STEP void window_step(vec (&acc)[R][C], vec (&x)[C], const float* inrow, const float* k, int64_t ii,
                              int64_t KH, int64_t KW, int64_t j) {
    x[(C - 1 + S) % C] = load(inrow + (j + C - 1) * L);  // one new input load per j
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        const int64_t i = ii - r;
        if (CHECK && (i < 0 || i >= KH)) continue;
        const vec w = load(k + (i * KW + j) * L);
#pragma GCC unroll 8
        for (int c = CL; c < CH; ++c) acc[r][c] = fma(x[(c + S) % C], w, acc[r][c]);
    }
}

template <int R, int C, bool CHECK, int... S>
DW_TILE_STEP void window_steps(vec (&acc)[R][C], vec (&x)[C], const float* inrow, const float* k, int64_t ii,
                               int64_t KH, int64_t KW, int64_t j, std::integer_sequence<int, S...>) {
    (window_step<R, C, CHECK, S>(acc, x, inrow, k, ii, KH, KW, j + S), ...);
}

// The first C steps of a row whose window starts C - 1 columns before the map (left edge): at step S the window
// columns below C - 1 - S still lie in the padding.
template <int R, int C, bool CHECK, int... S>
DW_TILE_STEP void left_edge_steps(vec (&acc)[R][C], vec (&x)[C], const float* inrow, const float* k, int64_t ii,
                                  int64_t KH, int64_t KW, int64_t j, std::integer_sequence<int, S...>) {
    (window_step<R, C, CHECK, S, C - 1 - S>(acc, x, inrow, k, ii, KH, KW, j + S), ...);
}

// The last C - 1 steps of a row whose window ends past the map (right edge), in rotation 0 with moves: at the
// T-th of them (T = 0 .. C-2) the window columns from C - 1 - T on lie in the padding.
template <int R, int C, bool CHECK, int... T>
DW_TILE_STEP void right_edge_steps(vec (&acc)[R][C], vec (&x)[C], const float* inrow, const float* k, int64_t ii,
                                   int64_t KH, int64_t KW, int64_t j, std::integer_sequence<int, T...>) {
    ((window_step<R, C, CHECK, 0, 0, C - 1 - T>(acc, x, inrow, k, ii, KH, KW, j + T), shift_window(x)), ...);
}

// Input row ii of a tile: acc[r][c] += in[ii][j + c] * k[ii - r][j] over j in [j_lo, j_hi), for every output row r
// whose kernel row ii - r exists. CHECK = false where all R rows use it (the tile's interior rows): no range test.
// The window in[ii][j .. j+C-1] slides in rotations, C steps at a time (window_step), then one step at a time with
// moves. The moves cost issue slots on the FMA ports where the CPU does not eliminate them: measured (Intel Xeon with
// AVX-512, 1 thread, B=1 C=384 R=32, paired rounds) K=31 0.96x, K=13 0.99x.
// Where the window starts or ends in the padding (Span), the first C and the last C - 1 steps multiply only the
// window columns inside the map (about 7% of a tile's multiply-adds at R=32, K=31). Measured (Intel Xeon with
// AVX-512, 1 thread, thread CPU time, 7 paired rounds, new / old median): B=1 C=384 R=32 K=31 forward, input and
// weight gradient 0.95-0.96 (8 lanes: 0.89-0.90), K=27 0.96-0.97, R=64 K=31 0.97-0.98, weight gradient at R=14-16
// 0.89-0.94; the same numbers bit for bit (20 shapes x 2 layouts x 8 and 16 lanes x the three passes).
template <int R, int C, bool CHECK>
DW_TILE_STEP void input_row(vec (&acc)[R][C], const float* inrow, const float* k, int64_t ii, int64_t KH,
                            int64_t KW, int64_t j_lo, int64_t j_hi, bool left_edge, bool right_edge) {
    vec x[C];
#pragma GCC unroll 8
    for (int c = 0; c + 1 < C; ++c) x[c] = load(inrow + (j_lo + c) * L);
    int64_t j = j_lo;
    // the edge steps skip the products with the padding; both only where the row has steps enough for them
    right_edge = right_edge && C > 1 && j_hi - j_lo >= C - 1;
    const int64_t j_end = right_edge ? j_hi - (C - 1) : j_hi;
    if (C > 1 && left_edge && j + C <= j_end) {
        left_edge_steps<R, C, CHECK>(acc, x, inrow, k, ii, KH, KW, j, std::make_integer_sequence<int, C>{});
        j += C;
    }
    for (; j + C <= j_end; j += C)  // C rotations bring the window back to rotation 0
        window_steps<R, C, CHECK>(acc, x, inrow, k, ii, KH, KW, j, std::make_integer_sequence<int, C>{});
    for (; j < j_end; ++j) {
        window_step<R, C, CHECK, 0>(acc, x, inrow, k, ii, KH, KW, j);
        shift_window(x);
    }
    if constexpr (C > 1) {
        if (right_edge)
            right_edge_steps<R, C, CHECK>(acc, x, inrow, k, ii, KH, KW, j, std::make_integer_sequence<int, C - 1>{});
    }
}

// One tile of R x C outputs (R <= RO, C <= CO) at out (row stride out_rs floats); in points at the tile's first
// input pixel (row stride in_rs), k at the kernel (KH x KW vectors). acc starts from init (or from out when accum).
template <int R, int C>
inline void tile(const float* in, int64_t in_rs, const float* k, int64_t KH, int64_t KW, float* out, int64_t out_rs,
                 const float* init, bool accum, Span sp) {
    vec acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = accum ? load(out + r * out_rs + c * L) : (init ? load(init) : vec{});
    for (int64_t ii = sp.ii_lo; ii < sp.ii_hi; ++ii) {
        if (ii >= R - 1 && ii < KH)
            input_row<R, C, false>(acc, in + ii * in_rs, k, ii, KH, KW, sp.j_lo, sp.j_hi, sp.left_edge,
                                   sp.right_edge);
        else
            input_row<R, C, true>(acc, in + ii * in_rs, k, ii, KH, KW, sp.j_lo, sp.j_hi, sp.left_edge,
                                  sp.right_edge);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) store(out + r * out_rs + c * L, acc[r][c]);
}

// Dispatch a runtime row count r <= R to the matching fixed-size tile of C columns.
template <int R, int C>
inline void tile_rows(int r, const float* in, int64_t in_rs, const float* k, int64_t KH, int64_t KW, float* out,
                      int64_t out_rs, const float* init, bool accum, Span sp) {
    if constexpr (R > 1) {
        if (r < R) return tile_rows<R - 1, C>(r, in, in_rs, k, KH, KW, out, out_rs, init, accum, sp);
    }
    tile<R, C>(in, in_rs, k, KH, KW, out, out_rs, init, accum, sp);
}

inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// What corr_plane's tiles share: the plane's geometry, the nonzero input window and how outputs start.
struct Plane {
    const float* in;
    const float* k;
    float* out;
    int64_t OH, KH, KW, in_rs, out_rs;
    const float* init;
    bool accum;
    int64_t row_lo, row_hi, col_lo, col_hi;
};

// Outputs [p, p + r) x [q, q + C) in one tile: of exactly R rows (FULL), else of r <= R rows.
template <int R, int C, bool FULL>
inline void tile_at(const Plane& pl, int64_t p, int r, int64_t q) {
    const Span sp{max64(0, pl.row_lo - p), min64(r + pl.KH - 1, pl.row_hi - p), max64(0, pl.col_lo - q - C + 1),
                  min64(pl.KW, pl.col_hi - q), pl.col_lo - q - C + 1 > 0, pl.col_hi - q < pl.KW};
    const float* in = pl.in + p * pl.in_rs + q * L;
    float* out = pl.out + p * pl.out_rs + q * L;
    if constexpr (FULL)
        tile<R, C>(in, pl.in_rs, pl.k, pl.KH, pl.KW, out, pl.out_rs, pl.init, pl.accum, sp);
    else
        tile_rows<R, C>(r, in, pl.in_rs, pl.k, pl.KH, pl.KW, out, pl.out_rs, pl.init, pl.accum, sp);
}

// All output rows of columns [q0, q1) (a multiple of C wide) in tiles of R x C, the last rows (fewer than R) in
// tiles of up to TR rows (the plane's tile height): R x C and 1..TR x C are the only tile instances (every row count
// up to a tail's R would double the build time).
template <int R, int C, int TR = RO>
inline void tile_columns(const Plane& pl, int64_t q0, int64_t q1) {
    int64_t p = 0;
    for (; p + R <= pl.OH; p += R)
        for (int64_t q = q0; q < q1; q += C) tile_at<R, C, true>(pl, p, R, q);
    for (; p < pl.OH; p += TR) {
        const int r = (int)((pl.OH - p) < TR ? (pl.OH - p) : TR);
        for (int64_t q = q0; q < q1; q += C) tile_at<TR, C, false>(pl, p, r, q);
    }
}

// Output rows per tile for the last c < CO columns of a plane whose tiles are TR rows high. A TR x c tile has too few
// accumulators to hide the FMA latency (each accumulator is one dependency chain: Zen 2 needs 5 cycles x 2 ports = 10
// in flight), so the tail columns take taller tiles: about 10 accumulators, within the registers (c accumulators per
// row, a c-vector window, one weight). dw8: c = 1, 2, 3, 4 -> 10, 5, 4, 2 rows (RO x c tiles: 2-8 accumulators, so c
// tail columns took the time of CO). The tails are wide: 32 = 6 x 5 + 2 output columns at R = 32, 13 = 2 x 5 + 3 and
// 31 = 6 x 5 + 1 kernel columns in the weight gradient (before its 3 x 3 tiles). Measured on the dev box against
// RO x c tails (1 thread, B=1, C=96, R=32, per-round paired medians, the same build flags; the spread is the host's):
// forward K=13 0.80-0.95x, K=31 0.80-0.98x; weight gradient K=13 0.83-0.96x, K=31 0.83-1.02x; 2 threads, C=384:
// 0.87-0.93x.
template <int C, int TR = RO>
constexpr int tail_rows() {
    constexpr int fit = (NREG - C - 1) / C, want = (10 + C - 1) / C;
    constexpr int rows = fit < want ? fit : want;
    return rows > TR ? rows : TR;
}

template <int C, int TR = RO>
inline void tail_columns(int c, const Plane& pl, int64_t q0, int64_t q1) {
    if constexpr (C > 1) {
        if (c < C) return tail_columns<C - 1, TR>(c, pl, q0, q1);
    }
    tile_columns<tail_rows<C, TR>(), C, TR>(pl, q0, q1);
}

// The OW columns of a plane in TR x TC tiles, the last OW % TC columns in tail tiles. Inlined into corr_plane in the
// AVX-512 variant (DW_PLANE_COLUMNS), where GCC's own placement measured 1.05 at R = 7, K = 13 (forward); left to GCC
// in the others. (GCC's inlining budget is the file's: forcing it in every variant moved the 8-lane packed rows' tiles
// by 0.87-1.20 at K = 3-13, with 8 lanes built for AVX2.)
template <int TR, int TC>
DW_PLANE_COLUMNS void plane_columns(const Plane& pl, int64_t OW) {
    const int64_t tail = OW % TC, body = OW - tail;
    tile_columns<TR, TC>(pl, 0, body);
    if constexpr (TC > 1) {
        if (tail) tail_columns<TC - 1, TR>((int)tail, pl, body, OW);
    }
}

// Output rows [p, OH) of a plane, as a plane of their own.
inline Plane rows_from(const Plane& pl, int64_t p) {
    Plane s = pl;
    s.in += p * pl.in_rs;
    s.out += p * pl.out_rs;
    s.OH -= p;
    s.row_lo -= p;
    s.row_hi -= p;
    return s;
}

// The last r < TR rows of a plane (REST): tiles r rows high and as wide as the registers allow (r x C accumulators,
// a C-vector window, one weight: dw8 1 x 7, 2 x 5), where TR-row tiles would hold r x TC accumulators, too few
// chains to hide the FMA latency (see tail_rows).
template <int r>
constexpr int rest_columns() {
    return (NREG - 1) / (r + 1) < 1 ? 1 : (NREG - 1) / (r + 1);
}
template <int r>
inline void rest_rows(int rest, const Plane& pl, int64_t OW) {
    if constexpr (r > 1) {
        if (rest < r) return rest_rows<r - 1>(rest, pl, OW);
    }
    plane_columns<r, rest_columns<r>()>(pl, OW);
}

// corr of one plane: in (OH+KH-1, OW+KW-1, L), k (KH, KW, L), out (OH, OW, L). Only input rows [row_lo, row_hi)
// and columns [col_lo, col_hi) of ``in`` may be nonzero (the rest is zero padding): a tile skips the input rows
// and kernel columns whose products all fall outside (same numbers for finite weights: only products with exact
// zeros are left out of the sums; an inf or NaN weight that meets only padding no longer turns its output NaN).
// ``in_rs``: the input's row stride in floats (0: packed, (OW + KW - 1) * L). Every output sums its products in the
// same order (input row, then kernel column) whatever tile computes it (up to a multiply-add the compiler leaves
// unfused in some tile: a last-bit difference). TR x TC: the register tile, RO x CO, or the weight gradient's
// WRO x WCO; REST: the last OH % TR rows in tiles of their own height (rest_rows).
template <int TR = RO, int TC = CO, bool REST = false>
inline void corr_plane(const float* in, const float* k, float* out, int64_t OH, int64_t OW, int64_t KH, int64_t KW,
                       const float* init, bool accum, int64_t row_lo, int64_t row_hi, int64_t col_lo,
                       int64_t col_hi, int64_t in_rs = 0) {
    Plane pl{in, k, out, OH, KH, KW, in_rs ? in_rs : (OW + KW - 1) * L, OW * L, init, accum,
             row_lo, row_hi, col_lo, col_hi};
    if constexpr (REST && TR > 1) {
        const int64_t rest = OH % TR;
        if (rest) {
            rest_rows<TR - 1>((int)rest, rows_from(pl, OH - rest), OW);
            pl.OH -= rest;
        }
    }
    plane_columns<TR, TC>(pl, OW);
}

// Winograd F(3, 3) along the rows (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016;
// points 0, 1, -1, 2, inf) for the planes of large kernels: three output rows y_i = sum_a d_{i+a} g_a of one chunk of
// three kernel rows g_0..2 (input rows d_0..4) from five products m_k = (B^T d)_k (G g)_k instead of nine,
//   B^T d = (2d0 - d1 - 2d2 + d3, -2d1 - d2 + d3, 2d1 - 3d2 + d3, d3 - d1, 2d1 - d2 - 2d3 + d4),
//   G g   = (g0 / 2, -(g0 + g1 + g2) / 2, (g1 - g0 - g2) / 6, (g0 + 2 g1 + 4 g2) / 6, g2),
//   y0 = m0 + m1 + m2 + m3,  y1 = m1 - m2 + 2 m3,  y2 = m1 + m2 + 4 m3 + m4,
// summed over the kernel's ceil(KH / 3) chunks before the output transform (it is linear). Output rows 3q.. and
// chunk t read input rows 3(q + t) .. 3(q + t) + 4: the input transform of rows 3j .. 3j + 4 is shared by every
// (triplet, chunk) with q + t = j, so each product is a plain correlation (corr_plane, its register tile and its
// padding skip) of a transformed plane of rows j with a transformed kernel of ceil(KH / 3) rows, giving one row per
// triplet. Multiply-adds per output: 5/3 ceil(KH / 3) KW against KH KW, 1/3 KW fewer where KH is no multiple of 3
// (wino_chunks_m4; K = 31: 18 x 31 against 31 x 31, 1.72x fewer; fastconv.roofline.winograd_rows_flops counts those
// that meet nonzero transformed rows). It replaced F(2, 3) rows (two output rows from four products, 1.41x fewer
// multiply-adds; benchmarks/HISTORY.md).

// Whether the forward / input gradient of an H x W map with a KH x KW kernel runs the Winograd rows (conv_path 4),
// chosen by measurement (2 threads, AVX-512 Intel Xeon, B = 1, C = 384, median of paired rounds, Winograd rows / the
// path otherwise taken). AVX-512: from K = 21 on maps from 22 (R = 32: K = 21 0.97-1.00 against F(2, 3) rows, which
// had measured 0.86 against the direct tiles; K = 31 0.89-0.91, 27 0.93-0.95, R = 64 K = 31 0.84-0.87 against F(2, 3)),
// not below (R = 32, K = 13 1.37-1.42, 15-19 1.01-1.16 against the direct tiles, which read each input once per
// kernel row from registers; R = 20, K = 27 1.06-1.09, R = 16, K = 13 1.7 against plain planes). 8 lanes: from K = 15
// on maps from 20 (R = 32: K = 15-19 0.81-0.85 and K = 13 0.93-1.07 against plain planes; K = 23 / 31 0.82-0.84
// against F(2, 3) rows; R = 24, K = 21 0.80-0.84; R = 20, K = 27 0.92-0.97; R = 14, K = 13 1.27-1.35).
inline bool wino_rows(int64_t H, int64_t W, int64_t KH, int64_t KW) {
    return WINO && min64(KH, KW) >= WMINK && min64(H, W) >= WMINMAP;
}

inline int64_t wino_chunks(int64_t KH) { return (KH + 2) / 3; }

// Product 4 (its transformed kernel row is a chunk's third row, g2) is zero in a last chunk whose third row lies past
// KH, and only a triplet's third output row reads it (y2 above): its chunks and its triplets stop one short where KH,
// or the output rows, are no multiple of 3. The same sums: only products with an exact zero and products no output
// reads are left out (an inf or NaN input no longer meets the zero row). 4-5 % fewer multiply-adds at K = 13, R = 32.
inline int64_t wino_chunks_m4(int64_t KH) { return KH / 3; }
inline int64_t wino_triplets_m4(int64_t OH) { return OH / 3; }

// The five transformed kernels (5, ceil(KH / 3), KW, L) of a packed kernel k (KH, KW, L), whose rows lie rs floats
// apart (0: KW * L, contiguous); rows past KH are zeros.
inline void wino_kernel(const float* k, int64_t KH, int64_t KW, float* G, int64_t rs = 0) {
    const int64_t T = wino_chunks(KH), TS = T * KW * L;
    if (!rs) rs = KW * L;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < KW; ++j) {
            const vec g0 = load(k + 3 * t * rs + j * L);
            const vec g1 = 3 * t + 1 < KH ? load(k + (3 * t + 1) * rs + j * L) : vec{};
            const vec g2 = 3 * t + 2 < KH ? load(k + (3 * t + 2) * rs + j * L) : vec{};
            float* o = G + (t * KW + j) * L;
            store(o, g0 * 0.5f);
            store(o + TS, (g0 + g1 + g2) * -0.5f);
            store(o + 2 * TS, (g1 - g0 - g2) * (1.f / 6));
            store(o + 3 * TS, (g0 + 2.f * g1 + 4.f * g2) * (1.f / 6));
            store(o + 4 * TS, g2);
        }
}

// Rows of the transformed planes (one per output triplet and chunk start, q + t) of an OH-row output, and the
// triplets.
inline int64_t wino_triplets(int64_t OH) { return (OH + 2) / 3; }
inline int64_t wino_rows_u(int64_t OH, int64_t KH) { return wino_triplets(OH) + wino_chunks(KH) - 1; }

// A thread's buffers for corr_plane_wino on the planes of one call: the five transformed planes U (rows j of input
// rows 3j .. 3j + 4), their products M (one row per output triplet), a transformed kernel G where each plane brings
// its own (the weight gradient's), and a row of zeros. Every plane of a call has the same nonzero input rows
// [row_lo, row_hi) and columns [col_lo, col_hi): corr_plane_wino writes the transformed rows that can be nonzero
// there, and the tiles read them from up to C - 1 columns before col_lo to C - 1 after col_hi, C the widest tile's
// columns: CO, or where the weight gradient's planes end in 1-row tiles (WREST), rest_columns<1>() (1 x 7 with 8
// lanes: KH = 11, 19, 21, 29, and product 4's four triplet rows at K = 13, wino_chunks_m4; zeroing CO columns left
// the sixth to the heap's leftovers, which reached those kernels' gradients). The padding is zeroed here once: a
// zero fill of the whole buffers took 4-8 % of a call's time at B = 1. other_OH: the output rows of another pass that
// the same buffers serve (backward_planes: the transformed rows are as many in both).
struct WinoBuffers {
    RawBuffer u, m, g;
    Buffer zeros;
    int64_t J = 0;
    WinoBuffers(bool on, int64_t Hp, int64_t Wp, int64_t OW, int64_t KH, int64_t KW, bool own_kernel, int64_t row_lo,
                int64_t row_hi, int64_t col_lo, int64_t col_hi, int64_t other_OH = 0)
        : u(on ? 5 * wino_rows_u(Hp - KH + 1, KH) * Wp * L : 0),
          m(on ? 5 * wino_triplets(max64(Hp - KH + 1, other_OH)) * OW * L : 0),
          g(on && own_kernel ? 5 * wino_chunks(KH) * KW * L : 0), zeros(on ? Wp * L : 0) {
        if (!on) return;
        J = wino_rows_u(Hp - KH + 1, KH);
        constexpr int64_t widest = WREST && WRO > 1 && rest_columns<1>() > CO ? rest_columns<1>() : CO;
        const int64_t c0 = max64(0, col_lo - widest), c1 = min64(Wp, col_hi + widest);
        for (int k = 0; k < 5; ++k)
            for (int64_t j = 0; j < J; ++j) {
                float* r = u.data() + (k * J + j) * Wp * L;
                std::memset(r + c0 * L, 0, sizeof(float) * (col_lo - c0) * L);
                std::memset(r + col_hi * L, 0, sizeof(float) * (c1 - col_hi) * L);
            }
    }
};

// The transformed rows j of each product k that can be nonzero, [lo[k], hi[k]) of J: the input rows 3j + a it combines
// (a in A_LO[k] .. A_HI[k]) meet the nonzero input rows [row_lo, row_hi); [j_lo, j_hi) spans them all (the transforms
// run over all products' rows there).
struct WinoRows {
    int64_t lo[5], hi[5], j_lo, j_hi;
    WinoRows(int64_t row_lo, int64_t row_hi, int64_t J) : j_lo(J), j_hi(0) {
        constexpr int A_LO[5] = {0, 1, 1, 1, 1}, A_HI[5] = {3, 3, 3, 3, 4};
        for (int k = 0; k < 5; ++k) {
            lo[k] = row_lo - A_HI[k] > 0 ? (row_lo - A_HI[k] + 2) / 3 : 0;
            hi[k] = row_hi - 1 - A_LO[k] >= 0 ? min64(J, (row_hi - 1 - A_LO[k]) / 3 + 1) : 0;
            if (hi[k] < lo[k]) hi[k] = lo[k];
            j_lo = min64(j_lo, lo[k]);
            j_hi = max64(j_hi, hi[k]);
        }
    }
};

// The input transform of one transformed row j (B^T above): pixels [q0, q1) of the input rows 3j .. 3j + 4 at
// r[0..4] (pixel stride L) to the five products' rows o, o + us, .., o + 4 us.
inline void wino_input_row(const float* const* r, float* o, int64_t us, int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
        const vec d0 = load(r[0] + q * L), d1 = load(r[1] + q * L), d2 = load(r[2] + q * L), d3 = load(r[3] + q * L),
                  d4 = load(r[4] + q * L);
        const vec e = d3 - d1;
        store(o + q * L, 2.f * (d0 - d2) + e);
        store(o + us + q * L, e - d1 - d2);
        store(o + 2 * us + q * L, d1 - 2.f * d2 + d3 + (d1 - d2));
        store(o + 3 * us + q * L, e);
        store(o + 4 * us + q * L, 2.f * (d1 - d3) - d2 + d4);
    }
}

// The output transform of one triplet: its first `rows` (1..3) output rows at y (row stride ys, pixel stride ps) from
// the five products' rows m, m + ms, .., m + 4 ms (pixel stride L), OW pixels; outputs start from b, or from y where
// accum.
inline void wino_output_rows(const float* m, int64_t ms, float* y, int64_t ys, int64_t ps, int64_t OW, int64_t rows,
                             vec b, bool accum) {
    float* y1 = y + ys;
    float* y2 = y + 2 * ys;
    for (int64_t q = 0; q < OW; ++q) {
        const vec m0 = load(m + q * L), m1 = load(m + ms + q * L), m2 = load(m + 2 * ms + q * L),
                  m3 = load(m + 3 * ms + q * L);
        store(y + q * ps, (accum ? load(y + q * ps) : b) + m0 + m1 + m2 + m3);
        if (rows > 1) store(y1 + q * ps, (accum ? load(y1 + q * ps) : b) + m1 - m2 + 2.f * m3);
        if (rows > 2)  // (product 4's row is computed for whole triplets only: wino_chunks_m4)
            store(y2 + q * ps, (accum ? load(y2 + q * ps) : b) + m1 + m2 + 4.f * m3 + load(m + 4 * ms + q * L));
    }
}

// What corr_plane computes, by the Winograd rows: in is the packed plane (OH + KH - 1 rows of OW + KW - 1 pixels),
// nonzero only in rows [row_lo, row_hi) and columns [col_lo, col_hi); G its kernel's wino_kernel; outputs start from
// init (a bias vector, or null: zeros), or from out where accum. TR, TC, REST: corr_plane's.
template <int TR = RO, int TC = CO, bool REST = false>
inline void corr_plane_wino(const float* in, const float* G, float* out, int64_t OH, int64_t OW, int64_t KH,
                            int64_t KW, const float* init, bool accum, int64_t row_lo, int64_t row_hi, int64_t col_lo,
                            int64_t col_hi, WinoBuffers& wb) {
    const int64_t Hp = OH + KH - 1, rs = (OW + KW - 1) * L, T = wino_chunks(KH), Q = wino_triplets(OH), J = wb.J;
    float* U = wb.u.data();
    float* M = wb.m.data();
    const WinoRows wr(row_lo, row_hi, J);
    const int64_t *lo = wr.lo, *hi = wr.hi, j_lo = wr.j_lo, j_hi = wr.j_hi;
    const float* zeros = wb.zeros.data();  // the rows past the plane
    for (int64_t j = j_lo; j < j_hi; ++j) {
        const float* r[5];
        for (int a = 0; a < 5; ++a) r[a] = 3 * j + a < Hp ? in + (3 * j + a) * rs : zeros;
        wino_input_row(r, U + j * rs, J * rs, col_lo, col_hi);  // (J * rs: from one transformed plane to the next)
    }
    const int64_t TS = T * KW * L, MS = Q * OW * L;
    for (int k = 0; k < 5; ++k) {
        const int64_t Tk = k == 4 ? wino_chunks_m4(KH) : T, Qk = k == 4 ? wino_triplets_m4(OH) : Q;  // (see there)
        if (Tk > 0 && Qk > 0)
            corr_plane<TR, TC, REST>(U + k * J * rs, G + k * TS, M + k * MS, Qk, OW, Tk, KW, nullptr, false, lo[k],
                                     hi[k], col_lo, col_hi, rs);
    }
    const vec b = init ? load(init) : vec{};
    for (int64_t t = 0; t < Q; ++t)
        wino_output_rows(M + t * OW * L, MS, out + 3 * t * OW * L, OW * L, L, OW, min64(3, OH - 3 * t), b, accum);
}

// Whether the weight gradient of an H x W map runs the Winograd rows (the map is its "kernel": its chunks of three
// rows are the sum's, the kernel's rows the triplets'), as winograd_rules() say: with AVX-512's tuning 0 kernels from
// 13 on maps from 20, with 8 lanes from 9 on maps from 20 (2 threads, dw_wgrad_fused, paired medians against plain
// planes / F(2, 3) rows; AVX-512 R = 32: K = 13 0.94-0.98, 17 0.87, 19 0.79-0.82, 21 0.84-0.86, 31 0.92-0.97; R =
// 20, K = 27 0.92-0.94; R = 16 / 14, K = 13 1.11-1.20; B = 4, K = 9 0.97-1.02. 8 lanes: R = 32, K = 13 0.91-0.93,
// 17-31 0.76-0.84; R = 20, K = 27 0.81-0.86; R = 16, K = 13 1.07-1.09); with tuning 1 (AMD Zen 4, against plain
// planes) kernels from 9 on maps from 16: R = 32 K = 9 0.72-0.78, K = 11 0.72, K = 13 0.81-0.86; R = 16 K = 13 0.90.
// 8 lanes on the Zen 4 (AVX2 build), from 9 on maps from 16 against 13 from 20: R = 32 K = 9 0.85, K = 11 0.79;
// R = 16 K = 9 and 13 0.95-0.99 (on the Xeon R = 16 K = 13 1.07-1.09 above: maps from 20 kept).
inline bool wino_wgrad(int64_t H, int64_t W, int64_t KH, int64_t KW) {
    const WinogradRules& rules = winograd_rules();
    return WINO && min64(KH, KW) >= rules.wgrad_min_k && min64(H, W) >= rules.wgrad_min_map;
}

// One image's weight gradient of one block: a (KH, KW, L) (+)= corr(xin, gin) with xin the padded input plane
// (nonzero in rows [ph, ph + H), columns [pw, pw + W)) and gin the (H, W, L) output gradient. Its planes are small
// (the kernel's, and in Winograd rows ceil(KH / 3) x KW: 5 x 13 at K = 13) and their sums long, so their tiles are
// their own (WRO x WCO, the last rows in tiles of their own height: WREST). 8 lanes: 3 x 3, the last rows 2 x 5 or
// 1 x 7, where the forward's 2 x 5 ran the last row of a 5-row plane in 1 x 5 tiles (five dependency chains).
// Measured (Zen 4, built for AVX2, 2 threads, B = 1, C = 384, median of 40 paired rounds, the weight gradient alone,
// against 2 x 5): R = 32 K = 9 0.84, 13 0.88, 17 0.94, 21 0.85, 27 0.86, 31 0.92; R = 14 K = 27 0.78; R = 16 K = 13
// 0.83; B = 8 C = 128 R = 56 K = 13 0.90 (3 x 3 without WREST: 0.87-0.94 at R = 32; 2 x 4 0.78-1.15, 4 x 3
// 1.34-1.42; against 3 x 3: 4 x 2, 6 x 2, 3 x 4 1.13-1.56). The AVX-512 variant keeps its 4 x 5 (5 x 5, 3 x 6,
// 4 x 6, 3 x 7 measured 0.96-1.03; 5 x 4 1.05-1.13).
inline void wgrad_plane(const float* xin, const float* gin, float* a, int64_t KH, int64_t KW, int64_t H, int64_t W,
                        bool accum, int64_t ph, int64_t pw, bool wino, WinoBuffers& wb) {
    if (!wino) return corr_plane<WRO, WCO, WREST>(xin, gin, a, KH, KW, H, W, nullptr, accum, ph, ph + H, pw, pw + W);
    wino_kernel(gin, H, W, wb.g.data());
    corr_plane_wino<WRO, WCO, WREST>(xin, wb.g.data(), a, KH, KW, H, W, nullptr, accum, ph, ph + H, pw, pw + W, wb);
}

inline int64_t lane_count(int64_t C, int64_t c0) { return (C - c0) < L ? (C - c0) : L; }

// 8 x 8 transpose for the packing of NCHW rows (8 channel rows of 8 pixels -> 8 pixel vectors of 8 channels) and
// its inverse: src row i at src + i * ss, dst row i at dst + i * ds. Unpack, shuffle, 128-bit permute, all in
// registers. Measured on the dev box (1 thread, B=1 C=384 R=32): packing the NCHW input 145 -> 55 us, writing the
// output back 179 -> 91 us, against a GCC-vector version whose blocks went through a stack array in 16-byte copies.
// DW_AVX: the build's target has AVX (dw8, dw16g), or the avx512f target of dw16 (which implies it).
#if defined(__AVX__) || DW_IN_AVX512
#define DW_AVX 1
inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
    const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss), r2 = _mm256_loadu_ps(src + 2 * ss),
                 r3 = _mm256_loadu_ps(src + 3 * ss), r4 = _mm256_loadu_ps(src + 4 * ss),
                 r5 = _mm256_loadu_ps(src + 5 * ss), r6 = _mm256_loadu_ps(src + 6 * ss),
                 r7 = _mm256_loadu_ps(src + 7 * ss);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#else
#define DW_AVX 0
#endif

#if DW_IN_AVX512
// 16 x 16 transpose in zmm registers for the 16-lane AVX-512 variant: each of the 16 rows is one full 64-byte load
// (or store), 64 shuffles in four stages (32-bit, 64-bit, then two 128-bit-lane steps), against two 8 x 8 ymm
// transposes per 8 pixels (32 half-line loads, 96 shuffles per 16 pixels).
inline void transpose16x16(const float* src, int64_t ss, float* dst, int64_t ds) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]), c = _mm512_castps_pd(t[i + 2]),
                      d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(dst + i * ds, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
        _mm512_storeu_ps(dst + (i + 8) * ds, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
    }
}
#endif

// L channels of W pixels: from rows of a (.., C, .., W) layout (channel l at chan + l * sC, pixel w at + w * sW) to
// pixel vectors (pix + w * L, L lanes), or back (to_planes = false). Full 8 x 8 blocks where pixels are contiguous
// (sW = +-1: NCHW rows, or a flipped kernel's; W >= 8: when 8 does not divide W the last block overlaps the one
// before it, whose pixels are written twice with the same values), vector copies where channels are contiguous
// (sC == 1: channels_last), else scalar. The AVX-512 variant transposes 16 x 16 blocks where W >= 16 (the same
// overlap at the end). Measured (2-core AVX-512 Xeon, B=1 C=384 R=32, NCHW, paired rounds, 1 / 2 threads): forward
// K=13 0.86 / 0.87x, K=31 0.97 / 0.95x; weight gradient 1.00 / 0.97x at both K. channels_last rows are copies
// (unchanged; prefetching 4-16 pixels of the same row ahead or two channel blocks per thread gained nothing there,
// with warm caches; the next row, fetched into L2, is pack_row's: see prefetch_row).
template <bool to_planes>
inline void transpose_row(float* chan, int64_t lanes, int64_t sC, int64_t sW, int64_t W, float* pix) {
#if DW_IN_AVX512
    if (lanes == L && (sW == 1 || sW == -1) && W >= 16) {
        for (int64_t w0 = 0;; w0 += 16) {
            const int64_t w = w0 + 16 <= W ? w0 : W - 16;
            const int64_t first = sW == 1 ? w : w + 15, step = sW * L;  // as in the 8 x 8 blocks below
            float* c = chan + first * sW;
            if (to_planes)
                transpose16x16(c, sC, pix + first * L, step);
            else
                transpose16x16(pix + first * L, step, c, sC);
            if (w + 16 >= W) return;
        }
    }
#endif
#if DW_AVX
    if (lanes == L && (sW == 1 || sW == -1) && W >= 8) {
        for (int64_t w0 = 0;; w0 += 8) {
            const int64_t w = w0 + 8 <= W ? w0 : W - 8;
            // pixels w .. w+7: ascending in memory, or descending (sW = -1: a flipped kernel) from pixel w+7's address
            const int64_t first = sW == 1 ? w : w + 7, step = sW * L;
            float* c = chan + first * sW;
            for (int h = 0; h < L / 8; ++h) {
                if (to_planes)
                    transpose8x8(c + h * 8 * sC, sC, pix + first * L + h * 8, step);
                else
                    transpose8x8(pix + first * L + h * 8, step, c + h * 8 * sC, sC);
            }
            if (w + 8 >= W) return;
        }
    }
    if (lanes == L && sC == 1) {
        for (int64_t w = 0; w < W; ++w)
            for (int h = 0; h < L / 8; ++h) {
                if (to_planes)
                    _mm256_storeu_ps(pix + w * L + h * 8, _mm256_loadu_ps(chan + w * sW + h * 8));
                else
                    _mm256_storeu_ps(chan + w * sW + h * 8, _mm256_loadu_ps(pix + w * L + h * 8));
            }
        return;
    }
#endif
    if (lanes == L && sC == 1) {  // without AVX: channels_last pixels as L-float copies
        for (int64_t w = 0; w < W; ++w) {
            if (to_planes)
                std::memcpy(pix + w * L, chan + w * sW, sizeof(float) * L);
            else
                std::memcpy(chan + w * sW, pix + w * L, sizeof(float) * L);
        }
        return;
    }
    if (to_planes) {
        for (int64_t l = 0; l < L; ++l)  // lane-outer: contiguous reads along W for NCHW inputs
            for (int64_t w = 0; w < W; ++w) pix[w * L + l] = l < lanes ? chan[w * sW + l * sC] : 0.f;
    } else {
        for (int64_t l = 0; l < lanes; ++l)
            for (int64_t w = 0; w < W; ++w) chan[w * sW + l * sC] = pix[w * L + l];
    }
}

// The W pixels of one channel block's channels_last row (pixel w at p + w * sW), read into the core's L2 cache ahead
// of their use (prefetcht1 on x86, pldl2keep on ARM). Such a row is a cache line (or part of one) per pixel, C floats
// apart: it crosses a 4 KB page every few pixels, where the hardware's stride prefetchers stop, and from memory (where
// other work ran between the calls) its lines came one miss at a time. pack_row fetches the next row this way while it
// copies one, conv_direct the output rows it stores next. Only where every pixel starts its block at the same offset
// in a line (a pixel stride of whole 64-byte lines; C = 100 gained nothing cold and lost 4 % warm), and there, where
// blocks are narrower than a line, only the block that starts the line fetches it (the 8-lane variant fetching every
// block: 1.04 warm at B = 1). Measured on the Zen 4 (2 threads, median of paired rounds, new / old, forward,
// channels_last, C = 384 R = 32; "cold": a 64 MB copy before each call, "warm": none):
//   AVX-512: cold B = 4 K = 13 0.88, K = 9 0.83, K = 17 0.91, B = 1 K = 13 0.89, K = 31 0.97, C = 96 / 192 0.91 /
//   0.89; warm B = 4 K = 13 0.89, K = 9 0.87, K = 17 0.92, B = 16 C = 128 R = 56 K = 13 0.92, B = 1 K = 9-21
//   0.95-1.01, C = 96 1.03 (0.11 ms calls); forward + both gradients (autograd) cold 0.89-0.97, warm 0.87-0.98.
//   8 lanes built for AVX2: cold B = 4 K = 13 0.87, K = 9 0.80, B = 1 K = 13 0.89; warm B = 4 0.87, B = 1 1.01-1.02.
//   NCHW inputs and the straight tiles (K <= 7): unchanged (0.99-1.02).
inline void prefetch_row(const float* p, int64_t sW, int64_t W) {
    if (sW * sizeof(float) % 64 != 0 || (reinterpret_cast<uintptr_t>(p) & 63) >= L * sizeof(float)) return;
    for (int64_t w = 0; w < W; ++w) __builtin_prefetch(p + w * sW, 0, 2);
}

// Padded row r of one plane: out (W+2pw, L) from x rows (element strides sC, sH, sW; ``lanes`` real channels).
// The pad columns and rows are written only when ``zero_pad``: a thread's buffer keeps them zero between planes.
inline void pack_row(const float* x, int64_t lanes, int64_t sC, int64_t sH, int64_t sW, int64_t H, int64_t W,
                     int64_t ph, int64_t pw, int64_t r, float* o, bool zero_pad = true) {
    const int64_t Wp = W + 2 * pw, h = r - ph;
    if (h < 0 || h >= H) {
        if (zero_pad) std::memset(o, 0, sizeof(float) * Wp * L);
        return;
    }
    if (zero_pad) {
        std::memset(o, 0, sizeof(float) * pw * L);
        std::memset(o + (pw + W) * L, 0, sizeof(float) * pw * L);
    }
    if (sC == 1 && h + 1 < H) prefetch_row(x + (h + 1) * sH, sW, W);  // see prefetch_row
    transpose_row<true>(const_cast<float*>(x + h * sH), lanes, sC, sW, W, o + pw * L);  // read, not written
}

// One plane row (W, L) back to an (N, C, H, W) row with element strides sC, sW.
inline void unpack_row(const float* yr, int64_t lanes, int64_t W, float* orow, int64_t sC, int64_t sW) {
    transpose_row<false>(orow, lanes, sC, sW, W, const_cast<float*>(yr));
}

// Channel blocks per 64-byte cache line where a tensor has channels innermost (channels_last, element stride 1):
// with 8 lanes two blocks share every line, so they are processed back to back on one thread (each line is fetched,
// or written, by one core once, not by both cores in halves).
inline int64_t blocks_per_line(bool channels_inner) {
    return channels_inner && L * sizeof(float) < 64 ? 64 / (L * sizeof(float)) : 1;
}

// The weight gradient's units: groups of G blocks (one cache line of a channels-innermost tensor), each over a slice
// of the images. Fewer than WG_UNITS groups are split into min(N, ceil(WG_UNITS / groups)) slices, which sum their
// images in order and are then added in order: the same numbers on any thread count. Measured (2 threads, AVX-512 Xeon,
// channels_last, K=13 / K=31, us): B=64 C=16 R=16 (one block: one unit kept a thread idle) 430 -> 231 / 1059 -> 577;
// B=8 C=48 R=32 516 -> 401 / 1771 -> 1391; 16 units (C=32: 2 groups x 8 slices) lost 3-10 % to the partial sums.
#ifndef WG_UNITS
#define WG_UNITS 4
#endif
inline int64_t wgrad_slices(int64_t N, int64_t C, bool channels_inner) {
    if (N < 1 || C < 1) return 1;  // an empty call: no work to split (and no division by zero blocks)
    const int64_t CB = (C + L - 1) / L, G = blocks_per_line(channels_inner), CBG = (CB + G - 1) / G;
    return max64(1, min64(N, (WG_UNITS + CBG - 1) / CBG));
}

// The S slices' partial sums (KS floats each, one after another from part) added in slice order into acc.
inline void add_slices(const float* part, int64_t S, int64_t KS, float* acc) {
    for (int64_t i = 0; i < KS; ++i) acc[i] = part[i];
    for (int64_t s = 1; s < S; ++s)
        for (int64_t i = 0; i < KS; ++i) acc[i] += part[s * KS + i];
}

// Blocks [cb0, cb1)'s (KH, KW, L) sums, one after another from a, into gw (C, KH, KW) contiguous.
inline void write_weight_grad(const float* a, int64_t cb0, int64_t cb1, int64_t C, int64_t KH, int64_t KW, float* gw) {
    for (int64_t cb = cb0; cb < cb1; ++cb)
        for (int64_t i = 0; i < KH; ++i)
            unpack_row(a + ((cb - cb0) * KH + i) * KW * L, lane_count(C, cb * L), KW, gw + (cb * L * KH + i) * KW,
                       KH * KW, 1);
}

void wgrad_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* g, int64_t gN,
                 int64_t gC, int64_t gH, int64_t gW, float* gw, int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH,
                 int64_t KW, int64_t nthreads) {
    const int64_t CB = (C + L - 1) / L, ph = KH / 2, pw = KW / 2, Hp = H + 2 * ph, Wp = W + 2 * pw;
    const int64_t G = blocks_per_line(sC == 1 || gC == 1), CBG = (CB + G - 1) / G, KS = G * KH * KW * L;
    const int64_t S = wgrad_slices(N, C, sC == 1 || gC == 1);
    Buffer part(S > 1 ? CBG * S * KS : 0);  // unit u's (KH, KW, L) sums per block of its group at u * KS
    const bool wino = wino_wgrad(H, W, KH, KW);
    auto write_group = [&](const float* a, int64_t cbg) {
        write_weight_grad(a, cbg * G, min64(CB, cbg * G + G), C, KH, KW, gw);
    };
#pragma omp parallel num_threads(nthreads)
    {
        Buffer xin(Hp * Wp * L), gin(H * W * L), acc(KS);
        WinoBuffers wb(wino, Hp, Wp, KW, H, W, true, ph, ph + H, pw, pw + W);
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < CBG * S; ++u) {
            const int64_t cbg = u / S, n0 = u % S * N / S, n1 = (u % S + 1) * N / S;
            const int64_t nb = CB - cbg * G < G ? CB - cbg * G : G;  // blocks in this group
            float* a = S > 1 ? part.data() + u * KS : acc.data();
            for (int64_t n = n0; n < n1; ++n)
                for (int64_t k = 0; k < nb; ++k) {
                    const int64_t c0 = (cbg * G + k) * L, lanes = lane_count(C, c0);
                    for (int64_t r = ph; r < ph + H; ++r)
                        pack_row(x + n * sN + c0 * sC, lanes, sC, sH, sW, H, W, ph, pw, r, xin.data() + r * Wp * L,
                                 false);
                    for (int64_t r = 0; r < H; ++r)
                        pack_row(g + n * gN + c0 * gC, lanes, gC, gH, gW, H, W, 0, 0, r, gin.data() + r * W * L);
                    wgrad_plane(xin.data(), gin.data(), a + k * KH * KW * L, KH, KW, H, W, n > n0, ph, pw, wino, wb);
                }
            if (S == 1) write_group(acc.data(), cbg);
        }
        if (S > 1) {
#pragma omp for schedule(static)
            for (int64_t cbg = 0; cbg < CBG; ++cbg) {
                add_slices(part.data() + cbg * S * KS, S, KS, acc.data());
                write_group(acc.data(), cbg);
            }
        }
    }
}

// A kernel at least twice the map (KH >= 2H - 1 and KW >= 2W - 1: RepLKNet-31B's stages 3 and 4 at 224 px, every
// stage of the kernel-family study at 64 px) meets every input pixel from every output pixel through a real tap:
// y[p, q] = sum_{u, v} x[u, v] k[u - p + ph, v - q + pw] with all indices inside k. Swapping the roles,
// y[H-1-p', W-1-q'] = corr(kwin, x)[p', q'] where kwin is the (2H-1) x (2W-1) window of k starting at
// (ph - H + 1, pw - W + 1): the map is the "kernel" and nothing is padded, so no product meets padding (the padded
// form wastes the tile-edge FMAs on zeros). The same products, summed in another order; the output is written back
// flipped in both axes. Measured on the dev box (1 thread, 64 planes, correlation only): 14x14 K=27 1.41x,
// 7x7 K=13 1.36x, 16x16 K=31 1.21x, 8x8 K=29 1.47x, 4x4 K=27 1.63x.
inline bool swap_roles(int64_t H, int64_t W, int64_t KH, int64_t KW) { return KH >= 2 * H - 1 && KW >= 2 * W - 1; }

// ------------------------------------------------------------------------------------------ direct tiles forward
// Kernel columns [k0, k0 + KC) of one kernel row for one tile of DCO output pixels (direct_tile): the KC weight
// vectors stay in registers and each input vector of the chunk's window (DCO + KC - 1 pixels) is loaded once and
// feeds the up to KC outputs it reaches, in ascending kernel column per output. row: input pixel x0 of the window
// (pixel stride ps floats), kr: the chunk's first weight vector. EDGE: pixels outside columns [0, W) are zeros (the
// padding) and are skipped. STRAIGHT: row lies in a channels_last tensor (run-time pixel stride: in_register and
// next_pixel), else in packed rows (pixel stride L).
template <int TC, int KC, bool EDGE, bool STRAIGHT>
__attribute__((always_inline)) inline void direct_chunk(vec (&acc)[TC], const float* row, int64_t ps,
                                                        const float* kr, int64_t x0, int64_t W) {
    vec w[KC];
#pragma GCC unroll 16
    for (int kx = 0; kx < KC; ++kx) w[kx] = load(kr + kx * L);
    if constexpr (STRAIGHT) {
#pragma GCC unroll 64
        for (int m = 0; m < TC + KC - 1; ++m) {
            if (!EDGE || (uint64_t)(x0 + m) < (uint64_t)W) {
                vec v = load(row);
                in_register(v);
#pragma GCC unroll 16
                for (int kx = 0; kx < KC; ++kx)
                    if (m - kx >= 0 && m - kx < TC) acc[m - kx] = fma(v, w[kx], acc[m - kx]);
            }
            row = next_pixel(row, ps);
        }
    } else {
#pragma GCC unroll 64
        for (int m = 0; m < TC + KC - 1; ++m) {
            if (EDGE && (uint64_t)(x0 + m) >= (uint64_t)W) continue;
            const vec v = load(row + m * ps);
#pragma GCC unroll 16
            for (int kx = 0; kx < KC; ++kx)
                if (m - kx >= 0 && m - kx < TC) acc[m - kx] = fma(v, w[kx], acc[m - kx]);
        }
    }
}

// The last KW mod KCH columns of a kernel row: the chunk of that width.
template <int TC, int KC, bool EDGE, bool STRAIGHT>
__attribute__((always_inline)) inline void direct_rest(int r, vec (&acc)[TC], const float* row, int64_t ps,
                                                       const float* kr, int64_t x0, int64_t W) {
    if constexpr (KC > 1) {
        if (r < KC) return direct_rest<TC, KC - 1, EDGE, STRAIGHT>(r, acc, row, ps, kr, x0, W);
    }
    direct_chunk<TC, KC, EDGE, STRAIGHT>(acc, row, ps, kr, x0, W);
}

// One row of TC output pixels (DCO, or HCO at a row's end) of one L-channel block, from a channels_last tensor or a
// block's packed rows: acc[c] += in[ky][c + kx] * k[ky][kx] over kernel rows [ky_lo, ky_hi) and all kernel columns, in
// the planar kernel's order (input row, then kernel column), the columns in chunks of KCH (weights in registers). in:
// input pixel x0 = q - pw of kernel row 0 (row stride in_rs, pixel stride ps floats); k: the block's (KH, KW) vectors.
template <int TC, bool EDGE, bool STRAIGHT>
inline void direct_tile(const float* in, int64_t in_rs, int64_t ps, const float* k, int64_t KW, int64_t ky_lo,
                        int64_t ky_hi, const float* bias, float* out, int64_t out_ps, int64_t x0, int64_t W) {
    if constexpr (!EDGE) opaque_stride(ps);
    vec acc[TC];
    const vec init = bias ? load(bias) : vec{};
#pragma GCC unroll 32
    for (int c = 0; c < TC; ++c) acc[c] = init;
    for (int64_t ky = ky_lo; ky < ky_hi; ++ky) {
        const float* row = in + ky * in_rs;
        const float* kr = k + ky * KW * L;
        int64_t k0 = 0;
        for (; k0 + KCH <= KW; k0 += KCH)
            direct_chunk<TC, KCH, EDGE, STRAIGHT>(acc, row + k0 * ps, ps, kr + k0 * L, x0 + k0, W);
        if constexpr (KCH > 1) {
            if (k0 < KW)
                direct_rest<TC, KCH - 1, EDGE, STRAIGHT>((int)(KW - k0), acc, row + k0 * ps, ps, kr + k0 * L, x0 + k0,
                                                         W);
        }
    }
#pragma GCC unroll 32
    for (int c = 0; c < TC; ++c) store(out + c * out_ps, acc[c]);
}

// A row of W >= DCO output pixels runs W / DCO tiles of DCO from 0, then the last W mod DCO pixels in one tile of HCO
// where they fit it (narrow_tail), else in one of DCO; the last tile ends at W (overlapping the one before, whose
// pixels are then written twice with the same values). Measured (2 threads, AVX-512 Xeon, C = 384, paired rounds,
// against a last tile of DCO; NCHW / channels_last): R = 56 K = 7 0.94 / 0.93, K = 13 0.92 / 0.92; Winograd rows
// R = 20 K = 15 0.84 / 0.80, R = 24 K = 21 0.81 / 0.83, B = 8 C = 128 R = 56 K = 31 0.89 / 0.90; R = 32 (no tail)
// 0.99-1.03.
constexpr int HCO = DCO >= 16 ? DCO / 2 : DCO;  // (8 accumulators: as many as the FMA latency needs in flight)
inline bool narrow_tail(int64_t W) { return HCO < DCO && W % DCO != 0 && W % DCO <= HCO; }

// The tiles of one output row of W pixels: QT of DCO pixels (the last may overlap the one before), then, where narrow,
// one of HCO ending at W. in: the row's input pixel 0 of kernel row 0 (row stride in_rs, pixel stride ps); output
// pixel q at out + q * out_ps; the other arguments as direct_tile's.
template <bool STRAIGHT>
__attribute__((always_inline)) inline void row_of_tiles(const float* in, int64_t in_rs, int64_t ps, const float* k,
                                                        int64_t KW, int64_t ky_lo, int64_t ky_hi, const float* bias,
                                                        float* out, int64_t out_ps, int64_t W, int64_t pw, int64_t QT,
                                                        bool narrow) {
    for (int64_t t = 0; t < QT; ++t) {
        const int64_t q = min64(t * DCO, W - DCO), x0 = q - pw;
        if (q < pw || q + DCO + pw > W)
            direct_tile<DCO, true, STRAIGHT>(in + x0 * ps, in_rs, ps, k, KW, ky_lo, ky_hi, bias, out + q * out_ps,
                                             out_ps, x0, W);
        else
            direct_tile<DCO, false, STRAIGHT>(in + x0 * ps, in_rs, ps, k, KW, ky_lo, ky_hi, bias, out + q * out_ps,
                                              out_ps, x0, W);
    }
    if (narrow) {
        const int64_t q = W - HCO, x0 = q - pw;
        direct_tile<HCO, true, STRAIGHT>(in + x0 * ps, in_rs, ps, k, KW, ky_lo, ky_hi, bias, out + q * out_ps, out_ps,
                                         x0, W);
    }
}

// Straight from channels_last tensors (rows_packed false, below), the AVX-512 variant runs each tile of a row through
// all channel blocks before the next tile (the tile's lines of all blocks are adjacent: whole pixels), the others each
// block's row of tiles before the next block. Measured on the Zen 4 (2 threads, median of paired rounds, tile first
// over block first), forward: AVX-512 B=1 C=384 R=16-32 K=3 / 5 0.89-0.96, C=768 R=32 K=3 0.82, C=128-256 R=28-112
// 0.96-0.99, B=8 C=128 R=56 K=3 0.93, B=16 K=5 0.95, 1 thread 0.86-0.95; 8 lanes built for AVX2 R=32 K=3 / 5 0.94 /
// 0.99 but B=8 C=128 R=56 K=3 1.13.
constexpr bool DTILES_FIRST = DCO >= 16;

// Forward / input gradient in DCO-pixel tiles. The kernel is repacked once to (ceil(C / L), KH, KW, L) by pack_row
// (as the packed planes' kernels are): a block's kernel in consecutive cache lines. Two ways to read x:
// - rows_packed false (channels_last x and y, C a multiple of L): output rows split over the threads, each row's
//   tiles through all channel blocks, read straight from x and written straight to y. A block's pixels lie C floats
//   apart (a multiple of 512 bytes for C = 128, 256, 384, ...), so they fall in a few of L1's sets and a tile's
//   input window (KH x (DCO + KW - 1) lines) does not stay there for the next tile.
// - rows_packed true: units of (image, channel block, band of output rows) split over the threads; a unit first copies
//   its block's input rows (the band and its KH - 1 halo rows) into a compact buffer (pixel stride L, one whole row
//   after another: the window's lines spread over all of L1's sets and stay there from tile to tile and row to row),
//   then runs the band's tiles from it. Any layout: pack_row copies channels_last pixels and transposes NCHW rows (a
//   partial last block too); the tiles store into a channels_last y of whole blocks, else into one row buffer that
//   unpack_row writes back (transposed on NCHW). The bands: row_bands (as tall as fit DW_BAND_FLOATS, at least 4 units
//   per thread, whole rounds of units). The copy costs about 1.5 ns per 64-byte line in L2 and more where x streams
//   from memory, which small kernels do not win back (straight_taps, below). Measured (2 threads, AVX-512 Xeon, B=1
//   C=384 R=32 channels_last forward, us, straight vs packed rows): K=3 78 vs 103, K=5 110-137 vs 117-132, K=7 198 vs
//   181, K=9 265 vs 222, K=13 453 vs 369; where x streams from memory (B=16 C=128 R=56) K=5 2076 vs 2876, K=7 4260 vs
//   4131, K=13 7776 vs 7679. Packed planes against packed rows (B=1 C=384 R=32): K=17 735 vs 631, K=21 930 vs 859, K=27
//   1306 vs 1298, K=31 1547 vs 1609 (so DMAXK 21). 8 lanes (same Xeon): K=5 194 vs 200, K=9 522 vs 394, K=13 868 vs
//   736; planes K=17 1162 vs 1100 (within the noise: DMAXK 13); on the Zen 4 (built for AVX2), where maps from 16 run
//   K=15-21 in Winograd rows, direct tiles up to 21 on the maps under 16 took 1.00-1.12x the planes' time (R=8-14).
// - in Winograd F(3, 3) rows (wino_direct, conv_path 5; packed rows as above): per band (a multiple of 3 rows tall, so
//   that its triplets are the map's) the input rows are transformed once (corr_plane_wino's B^T, five transformed rows
//   per three output rows), each of the five products of an output triplet runs direct tiles over its ceil(KH / 3)
//   transformed rows with the block's transformed kernel (wino_kernel, made once per call), and the output transform
//   writes the triplet's three rows: 5 ceil(KH / 3) KW multiply-adds per three outputs instead of 3 KH KW. The tiles
//   keep their register use and their skipping of the columns in the padding; the products whose transformed rows are
//   all padding are left out.
// conv_path: the straight channels_last tiles up to straight_taps() taps, the packed rows from the next. 48 (kernels
// to 5 x 5 and 5 x 7 / 7 x 5), as measured on the Intel Xeon above (K = 7: packed rows 0.91-0.97 of the straight tiles'
// time); 49 (7 x 7 too) with the Zen 4 tuning, in every variant. Measured on the Zen 4 (2 threads, channels_last, the
// C entry points of both builds in one process, median of 80-200 paired rounds, straight over packed rows, forward):
// AVX-512 B=1 C=384 R=32 K=7 0.95, B=4 0.81, B=2 C=256 R=56 0.68, B=16 C=128 R=56 0.63; 8 lanes built for AVX2
// (x86-64-v3) B=1 0.91-1.03, B=2 0.94, B=4 0.69-0.72, B=8 0.69, B=2 C=256 R=56 0.68-0.72, C=128 R=112 0.82, B=64 C=64
// R=16 0.86, B=16 C=128 R=56 0.63-0.70; ConvNeXt-T's 7x7 layers at B=32 (C=96 R=56, C=192 R=28, C=384 R=14) AVX-512
// 0.90 / 0.80 / 1.00 (R=14 is under a 16-pixel tile: planes), 8 lanes 0.90 / 0.70 / 0.67; 1 thread 0.71-0.89; forward +
// both gradients through autograd (the backward then in two passes) AVX-512 0.80-0.90, 8 lanes 0.75-0.94; the same
// outputs, bit for bit. K = 5 unchanged (0.98-1.00); from 9 x 9 the Winograd rows beat the straight tiles (1.12-1.42
// against them).
inline int64_t straight_taps() { return tuning() == 1 ? 49 : 48; }
#ifndef DW_BAND_FLOATS
#define DW_BAND_FLOATS (128 * 1024)
#endif
// the band buffer of the Winograd rows (wino_direct) of kernels from 15: their bands must be tall (each transforms
// KH - 1 halo rows), and 2 MB per thread measured faster than 512 KB at large maps (2 threads, AVX-512 Xeon, against
// 512 KB, where those maps then ran the planes: R = 256 C = 128 K = 31 0.92-0.95, K = 21 0.83-0.86, K = 17 0.79-0.88,
// K = 15 0.80-0.94; R = 128 C = 256 K = 29 0.90; B = 2 C = 128 R = 96 K = 31 0.88-0.90; 4 MB: 0.98-1.00 against
// 2 MB). Not for K = 13, whose transforms weigh more: R = 128 1.01-1.14, R = 256 0.97-1.12 against the 512 KB bands.
#ifndef DW_WD_BAND_FLOATS
#define DW_WD_BAND_FLOATS (512 * 1024)
#endif
// Whether the direct tiles on packed rows run in Winograd F(3, 3) rows (conv_path 5, see conv_direct): kernels
// min_k..max_k of the variant's winograd_rules() on maps from map_under_k15 (K < 15), min_map (K 15-21), map_k23 up to
// max_map_k23 (K >= 23), where a band of twice the kernel's height fits the band buffer (shorter bands transform
// KH - 1 halo rows for each few outputs: R = 256, K = 31 took 2.1-2.5x the packed planes' time in bands of 2 rows;
// R = 256, K = 13 1.10x in bands of 20), and row_bands halves no band below KH rows. Measured (2 threads, B = 1,
// C = 384 unless given, median of paired rounds, against the path otherwise taken, NCHW / channels_last):
//   AVX-512 on an Intel Xeon (tuning 0; against the direct tiles up to K = 21 on maps under 22, else the Winograd
//   rows on packed planes): R = 32 K = 15 0.84 / 0.88, 17 0.84 / 0.85, 19 0.82 / 0.86, 21 0.83 / 0.79, 23 0.86 /
//   0.83, 25 0.87 / 0.88, 27 0.89 / 0.88, 31 0.94 / 0.89; R = 64 K = 17 0.78 / 0.81, 21 0.84 / 0.83, 31 0.91 / 0.92;
//   C = 512 R = 64 K = 27 0.89 / 0.90; C = 128 R = 128 K = 21 0.80 / 0.82; R = 17-20, K = 15-21 0.76-0.87; K = 13
//   at R = 36-64 0.90-0.95 (R = 32 1.01 /
//   1.06, B = 4 0.96 / 1.01, R = 16 1.04 / 1.07: not below 36); K >= 23 from maps of K - 3 where a row's last W mod 16
//   pixels fit the narrow tile (R = 24 K = 27 0.86 / 0.90, R = 22 K = 23 0.90 / 0.88, R = 56 K = 31 0.89 / 0.90; tails
//   of 10-14 pixels: R = 28 K = 29 1.02 / 1.07, R = 30 K = 31 1.03 / 0.90, R = 44 K = 31 1.01 / 1.02; R = 20 K = 31
//   1.09 / 1.12).
//   AVX-512 on an AMD EPYC of Zen 4 (tuning 1, against the direct tiles; forward, then the backward's one pass):
//   K = 13 at R = 32 0.85 / 0.83 (B = 4 0.83 / 0.87), R = 16-28 0.80-0.91, backward R = 32 0.94 / 0.95; K = 11 R = 32
//   0.89 / 0.81, R = 16 0.90, C = 128 R = 64 0.90, B = 4 C = 128 R = 56 0.78 / backward 0.96; K = 9 R = 32 0.88 /
//   0.93, R = 56 0.83 / backward 0.88, C = 128 R = 128 0.91; K = 15-21 at R = 16 0.82-0.83 (backward 0.98); but
//   K = 7 R = 32 1.09 (R = 56 0.98).
//   8 lanes (built for AVX2 on the same Xeon, channels_last): R = 32 K = 13 0.87, 17 0.86, 21 0.88, 27 0.92, 31
//   0.95; R = 20 K = 15 0.80; R = 64 K = 13 0.90, 17 0.92, 21 0.99, but 27 1.04 and R = 48 K = 31 1.04 (so K >= 23 up
//   to maps of 32); R = 24 K = 27 0.90; R = 16 K = 13 0.97. 8 lanes on the Zen 4 (built with -march=znver3: AVX2
//   with 16 ymm registers, as on an AVX2-only CPU; a -march=native build there, whose 8-lane code gets AVX-512VL's 32
//   registers and wider packing loops, ran the planes 1.18-1.25x faster than an AVX2 CPU would), K = 9 and 11 too,
//   from maps of 16: forward K = 9 R = 32 0.51 / 0.64-0.69, K = 11 0.69 / 0.70, R = 16 K = 11 0.79, B = 4 C = 128
//   R = 56 K = 9 0.75 (K = 13: 0.99, the same rule); backward K = 9 0.63, K = 11 0.67; the weight gradient alone
//   (wino_wgrad) K = 9 R = 32 0.85 / 0.86, K = 11 0.79.
// The 8-lane numbers are from AVX-512 CPUs running AVX2 code; no AVX2-only CPU was at hand.
inline int64_t wd_band_floats(int64_t KH, int64_t KW) {
    return min64(KH, KW) >= 15 ? DW_WD_BAND_FLOATS : DW_BAND_FLOATS;
}
inline bool wino_direct(int64_t H, int64_t W, int64_t KH, int64_t KW) {
    const WinogradRules& rules = winograd_rules();
    const int64_t k = min64(KH, KW), r = min64(H, W);
    if (!rules.min_k || k < rules.min_k || max64(KH, KW) > rules.max_k ||
        wd_band_floats(KH, KW) / (W * L) - (KH - 1) < 2 * KH)
        return false;
    if (k < 15) return r >= rules.map_under_k15;
    if (k <= 21) return r >= rules.min_map;
    return r >= max64(rules.map_k23, k - 3) && r <= rules.max_map_k23 && (W % DCO == 0 || W % DCO <= HCO);
}

// How many bands of output rows conv_direct's packed rows cut each (image, channel block) into: bands as tall as fit
// DW_BAND_FLOATS (in Winograd rows wd_band_floats) with their halo, halved until there are 4 units per thread (in
// Winograd rows not below KH), then up to twice as many bands where that gives every thread the same number of units
// (9 units on 2 threads left one idle for a ninth of the time).
// Measured (2 threads, AVX-512 Xeon, B=1 C=48 R=96: 9 units -> 12, forward, us): channels_last K=13 632 -> 519, K=21
// 1284 -> 1136; NCHW K=13 508 -> 431, K=21 1186 -> 1047. Each thread packs its share of the blocks' kernels (B=1
// C=384 R=16 K=21 NCHW 176 -> 167 us).
inline int64_t row_bands(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads) {
    if (N < 1 || C < 1 || H < 1 || W < 1 || nthreads < 1) return 1;  // (exported: dw_row_bands)
    const int64_t CB = (C + L - 1) / L, min_band = wino_direct(H, W, KH, KW) ? KH : 1;
    int64_t band = max64(1, min64(H, (min_band > 1 ? wd_band_floats(KH, KW) : DW_BAND_FLOATS) / (W * L) - (KH - 1)));
    while (band > min_band && N * CB * ((H + band - 1) / band) < 4 * nthreads) band = max64(min_band, (band + 1) / 2);
    const int64_t nb0 = (H + band - 1) / band;
    for (int64_t nb = nb0; nb <= min64(H, 2 * nb0); ++nb) {
        const int64_t rows = (H + nb - 1) / nb, bands = (H + rows - 1) / rows;
        if (N * CB * bands % nthreads == 0) return bands;
    }
    return nb0;
}
// Channel blocks per unit of conv_direct's packed rows where x is channels_last with whole blocks (1 elsewhere): 4,
// else 2, where the blocks divide into such groups and the units stay at least 4 per thread in whole rounds. A unit
// copies its blocks' rows pixel by pixel side by side (G * 64 contiguous bytes of a pixel instead of 64 bytes every C
// floats) and stores their output rows in turn. Measured (2 threads, Intel Xeon with AVX-512, C=384 R=32, min / median
// ms of 2 benchmark runs each, old vs new): B=4 K=13 forward 2.04-2.06 / 2.42-2.51 -> 1.60-1.67 / 1.77-2.07, forward +
// both gradients 7.42-7.64 / 7.91-8.20 -> 5.59-5.63 / 6.00-6.14; K=21 forward + both gradients 13.1-13.4 -> 11.7-12.6;
// B=1 K=13 forward 0.41 -> 0.38. The kernel alone (forward, best of 15 calls, 2 runs, ms): B=16 C=128 R=56 K=13
// 10.9-11.0 -> 9.0-9.4, K=7 6.3-7.0 -> 5.8-6.0; B=2 C=128 R=128 K=13 (3 bands, 4 band buffers of 512 KB) 7.1-7.5 ->
// 6.3-6.5; B=1 C=384 R=32 K=13 0.38 both; B=64 C=64 R=16 K=9 0.53-0.55 both.
inline int64_t row_groups(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads,
                          bool channels_inner) {
    if (!channels_inner || C % L != 0 || nthreads < 1) return 1;  // (exported: dw_row_groups)
    const int64_t CB = C / L, units = N * row_bands(N, C, H, W, KH, KW, nthreads);
    for (int64_t g : {4, 2})
        if (CB % g == 0 && units * (CB / g) >= 4 * nthreads && units * (CB / g) % nthreads == 0) return g;
    return 1;
}
// The weight gradient computed beside an input gradient in direct tiles on packed rows (backward_fused): the input
// gradient's x is the output gradient g, whose packed rows of one (image, channel block) are, with one band per
// plane, the weight gradient's packed plane of g (pixel stride L, row stride W * L).
struct WeightGradOf {
    const float* x;  // the forward's input, element strides sN, sC, sH, sW
    int64_t sN, sC, sH, sW;
    float* gw;  // (C, KH, KW) contiguous
};

void conv_direct(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* w, int64_t swC,
                 int64_t swH, int64_t swW, const float* b, float* y, int64_t yN, int64_t yC, int64_t yH, int64_t yW,
                 int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads,
                 bool rows_packed, const WeightGradOf* wg = nullptr) {
    const bool narrow = narrow_tail(W);  // the tiles of a row: QT of DCO pixels, then one of HCO where narrow
    const int64_t CB = (C + L - 1) / L, ph = KH / 2, pw = KW / 2, QT = narrow ? W / DCO : (W + DCO - 1) / DCO;
    const bool wd = rows_packed && wino_direct(H, W, KH, KW);  // the tiles in Winograd rows (conv_path 5)
    const int64_t T = wino_chunks(KH), TS = T * KW * L;
    RawBuffer k(CB * L * KH * KW), gk(wd ? CB * 5 * TS : 0);
    Buffer bias(b ? CB * L : 0);
    auto pack_kernel = [&](int64_t c0) {  // one block's kernel and bias; the threads share the blocks
        const int64_t lanes = lane_count(C, c0);
        for (int64_t i = 0; i < KH; ++i)
            pack_row(w + c0 * swC, lanes, swC, swH, swW, KH, KW, 0, 0, i, k.data() + (c0 * KH + i * L) * KW);
        for (int64_t l = 0; b && l < L; ++l) bias[c0 + l] = l < lanes ? b[c0 + l] : 0.f;
        if (wd) wino_kernel(k.data() + c0 * KH * KW, KH, KW, gk.data() + c0 / L * 5 * TS);
    };
    // one output row p of block c0 in tiles; xr: the input row of kernel row 0 (may lie outside x), pixel 0; the
    // tiles store pixel q at yr + q * ops
    auto row_tiles = [&](const float* xr, int64_t rs, int64_t ps, int64_t p, int64_t c0, float* yr, int64_t ops) {
        const int64_t ky_lo = max64(0, ph - p), ky_hi = min64(KH, H + ph - p);
        const float* kb = k.data() + c0 * KH * KW;
        const float* bb = b ? bias.data() + c0 : nullptr;
        row_of_tiles<false>(xr, rs, ps, kb, KW, ky_lo, ky_hi, bb, yr, ops, W, pw, QT, narrow);
    };
    if (!rows_packed) {  // channels_last x and y of whole blocks
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t cb = 0; cb < CB; ++cb) pack_kernel(cb * L);
#pragma omp for schedule(static)
            for (int64_t np = 0; np < N * H; ++np) {
                const int64_t n = np / H, p = np % H;
                const float* xr = x + n * sN + (p - ph) * sH;
                float* yr = y + n * yN + p * yH;
                const int64_t ky_lo = max64(0, ph - p), ky_hi = min64(KH, H + ph - p);
                if constexpr (DTILES_FIRST) {
                    for (int64_t t = 0; t < QT + narrow; ++t) {  // one tile's pixels through all blocks, then the next
                        const int64_t q = t == QT ? W - HCO : min64(t * DCO, W - DCO), x0 = q - pw;
                        const bool edge = q < pw || q + DCO + pw > W;
                        for (int64_t c0 = 0; c0 < C; c0 += L) {
                            const float *in = xr + c0 + x0 * sW, *kb = k.data() + c0 * KH * KW,
                                        *bb = b ? bias.data() + c0 : nullptr;
                            float* out = yr + c0 + q * yW;
                            if (t == QT)
                                direct_tile<HCO, true, true>(in, sH, sW, kb, KW, ky_lo, ky_hi, bb, out, yW, x0, W);
                            else if (edge)
                                direct_tile<DCO, true, true>(in, sH, sW, kb, KW, ky_lo, ky_hi, bb, out, yW, x0, W);
                            else
                                direct_tile<DCO, false, true>(in, sH, sW, kb, KW, ky_lo, ky_hi, bb, out, yW, x0, W);
                        }
                    }
                } else {
                    for (int64_t c0 = 0; c0 < C; c0 += L)
                        row_of_tiles<true>(xr + c0, sH, sW, k.data() + c0 * KH * KW, KW, ky_lo, ky_hi,
                                           b ? bias.data() + c0 : nullptr, yr + c0, yW, W, pw, QT, narrow);
                }
            }
        }
        return;
    }
    // the bands: NB of them, each as tall (in the Winograd rows a multiple of 3 tall, so that every band's triplets
    // are those of the whole map: the same numbers on any banding, any thread count)
    const int64_t RS = W * L, NB = wg ? 1 : row_bands(N, C, H, W, KH, KW, nthreads),
                  band = wd ? wino_triplets((H + NB - 1) / NB) * 3 : (H + NB - 1) / NB;
    // with the weight gradient (wg): units of (channel block, slice of the images) as in wgrad_fused, one band each
    const int64_t S = wg ? wgrad_slices(N, C, false) : 1, KS = KH * KW * L, Hp = H + 2 * ph, Wp = W + 2 * pw;
    Buffer part(wg && S > 1 ? CB * S * KS : 0);
    const int64_t G = wg ? 1 : row_groups(N, C, H, W, KH, KW, nthreads, sC == 1),
                  BS = (band + KH - 1 + (wd ? 4 : 0)) * RS;  // a band's input rows (band_tiles)
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < CB; ++cb) pack_kernel(cb * L);
        Buffer buf(G * BS), orow(wd ? 3 * RS : RS), xin(wg ? Hp * Wp * L : 0), acc(wg ? KS : 0);
        const bool wino = wg && wino_wgrad(H, W, KH, KW);
        WinoBuffers wb(wino, Hp, Wp, KW, H, W, true, ph, ph + H, pw, pw + W);
        const int64_t JU = wd ? wino_triplets(band) + T - 1 : 0;  // transformed rows of a band, at most
        RawBuffer U(5 * JU * RS), M(wd ? 5 * RS : 0);
        Buffer zeros(wd ? RS : 0);
        // Output rows [p0, p1) of block c0 (image n) from its packed input rows [r0, r1) at in, in Winograd F(3, 3)
        // rows (as corr_plane_wino): transformed row u of product k combines the map rows p0 - ph + 3u + a (a = 0..4;
        // rows outside [r0, r1), that is outside the map, are zeros), triplet q of output rows p0 + 3q .. reads
        // transformed rows q .. q + T - 1, and each product of a tile is a direct tile over them with the transformed
        // kernel's T rows (the products that meet only zero rows are skipped, as corr_plane_wino skips them).
        // band_wino out of line and band_tiles inlined, as GCC had placed them before the straight tiles' own
        // instantiations (direct_tile with STRAIGHT) grew the file: left to its heuristics it inlined otherwise, and
        // the packed rows, the same source, measured 1.07-1.13 at K = 13 / 17 with 8 lanes (NCHW, AVX2 build).
        auto band_wino = [&](int64_t n, int64_t c0, int64_t p0, int64_t p1, int64_t r0, int64_t r1,
                             const float* in) __attribute__((noinline)) {
            const int64_t Q = wino_triplets(p1 - p0), J = Q + T - 1, base = p0 - ph, row_lo = r0 - base,
                          row_hi = r1 - base, lanes = lane_count(C, c0), T4 = wino_chunks_m4(KH);
            const WinoRows wr(row_lo, row_hi, J);
            const int64_t *lo = wr.lo, *hi = wr.hi;
            float* u = U.data();
            const int64_t us = J * RS;  // from one product's transformed rows to the next
            for (int64_t j = wr.j_lo; j < wr.j_hi; ++j) {
                const float* r[5];
                for (int a = 0; a < 5; ++a) {
                    const int64_t i = base + 3 * j + a;
                    r[a] = i >= r0 && i < r1 ? in + (i - r0) * RS : zeros.data();
                }
                wino_input_row(r, u + j * RS, us, 0, W);
            }
            const float* gb = gk.data() + c0 / L * 5 * TS;
            const vec bv = b ? load(bias.data() + c0) : vec{};
            const bool straight = yC == 1 && lanes == L;  // channels_last output: stored into y
            float* m = M.data();
            const int64_t ms = RS;  // from one product's row of the triplet to the next
            for (int64_t q = 0; q < Q; ++q) {
                const int64_t P = p0 + 3 * q, rows = min64(3, p1 - P);
                if (straight)  // the next triplet's output rows (prefetch_row)
                    for (int64_t i = P + 3; i < min64(P + 6, p1); ++i)
                        prefetch_row(y + n * yN + c0 * yC + i * yH, yW, W);
                for (int kk = 0; kk < 5; ++kk) {  // the product's row, its tiles one after another
                    if (kk == 4 && rows < 3) continue;  // product 4: its chunks and triplets (wino_chunks_m4)
                    const int64_t t_lo = max64(0, lo[kk] - q), t_hi = min64(kk == 4 ? T4 : T, hi[kk] - q);
                    float* mk = m + kk * ms;
                    if (t_lo >= t_hi) {
                        std::memset(mk, 0, sizeof(float) * ms);
                        continue;
                    }
                    row_of_tiles<false>(u + kk * us + q * RS, RS, L, gb + kk * TS, KW, t_lo, t_hi, nullptr, mk, L, W,
                                        pw, QT, narrow);
                }
                float* yr = y + n * yN + c0 * yC + P * yH;
                if (straight) {
                    wino_output_rows(m, ms, yr, yH, yW, W, rows, bv, false);
                } else {
                    wino_output_rows(m, ms, orow.data(), RS, L, W, rows, bv, false);
                    for (int64_t i = 0; i < rows; ++i) unpack_row(orow.data() + i * RS, lanes, W, yr + i * yH, yC, yW);
                }
            }
        };
        // output rows [p0, p1) of image n, the G blocks from c0 (G > 1 only where row_groups says so), from the
        // blocks' input rows copied to buf side by side (block g's at g * BS), row by row
        auto band_tiles = [&](int64_t n, int64_t c0, int64_t p0, int64_t p1) __attribute__((always_inline)) {
            // the input rows the band reads; in Winograd rows all that its transformed rows combine (up to 4 more: the
            // last triplet's rows past p1 and the kernel's zero rows past KH), the same as a band of the whole map's
            const int64_t r0 = max64(0, p0 - ph),
                          r1 = min64(H, wd ? p0 - ph + 3 * (wino_triplets(p1 - p0) + T - 2) + 5 : p1 + KH - 1 - ph);
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t cg = c0 + g * L;
                    pack_row(x + n * sN + cg * sC, lane_count(C, cg), sC, sH, sW, H, W, 0, 0, r,
                             buf.data() + g * BS + (r - r0) * RS);
                }
            if (wd) {
                for (int64_t g = 0; g < G; ++g) band_wino(n, c0 + g * L, p0, p1, r0, r1, buf.data() + g * BS);
                return;
            }
            for (int64_t p = p0; p < p1; ++p)
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t cg = c0 + g * L, lanes = lane_count(C, cg);
                    const bool straight = yC == 1 && lanes == L;  // channels_last output: the tiles store into y
                    float* yr = y + n * yN + cg * yC + p * yH;
                    if (straight && p + 1 < p1) prefetch_row(yr + yH, yW, W);  // the next output row (prefetch_row)
                    row_tiles(buf.data() + g * BS + (p - ph - r0) * RS, RS, L, p, cg, straight ? yr : orow.data(),
                              straight ? yW : L);
                    if (!straight) unpack_row(orow.data(), lanes, W, yr, yC, yW);
                }
        };
        if (!wg) {
            const int64_t CG = CB / G;  // units of G blocks (G divides CB)
#pragma omp for schedule(static)
            for (int64_t u = 0; u < N * CG * NB; ++u) {
                const int64_t p0 = u % NB * band;
                if (p0 < H) band_tiles(u / (CG * NB), (u / NB) % CG * G * L, p0, min64(H, p0 + band));
            }
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < CB * S; ++u) {
                const int64_t c0 = u / S * L, n0 = u % S * N / S, n1 = (u % S + 1) * N / S, lanes = lane_count(C, c0);
                float* a = S > 1 ? part.data() + u * KS : acc.data();
                for (int64_t n = n0; n < n1; ++n) {
                    band_tiles(n, c0, 0, H);  // buf: the (H, W, L) plane of g
                    for (int64_t r = ph; r < ph + H; ++r)
                        pack_row(wg->x + n * wg->sN + c0 * wg->sC, lanes, wg->sC, wg->sH, wg->sW, H, W, ph, pw, r,
                                 xin.data() + r * Wp * L, false);
                    wgrad_plane(xin.data(), buf.data(), a, KH, KW, H, W, n > n0, ph, pw, wino, wb);
                }
                if (S == 1) write_weight_grad(acc.data(), c0 / L, c0 / L + 1, C, KH, KW, wg->gw);
            }
            if (S > 1) {
#pragma omp for schedule(static)
                for (int64_t cb = 0; cb < CB; ++cb) {  // as wgrad_fused
                    add_slices(part.data() + cb * S * KS, S, KS, acc.data());
                    write_weight_grad(acc.data(), cb, cb + 1, C, KH, KW, wg->gw);
                }
            }
        }
    }
}

// Which way conv_fused computes a call (dw_conv_path): 2 swapped roles (a kernel at least twice the map); 5 the direct
// tiles in Winograd rows (wino_direct) on packed rows, where those run (channels_last, or any layout where
// DANY_LAYOUT); 4 the Winograd rows on packed planes (wino_rows); the direct tiles (conv_direct: rows of at least DCO
// pixels, kernels up to DMAXK): 3 from packed rows past straight_taps() taps on channels_last x and y (on any layout
// where DANY_LAYOUT: NCHW forward, 2 threads, B=1 C=384 R=32, us, planes vs packed rows, AVX-512 K=7 233 vs 168, K=13
// 449 vs 344, K=21 838 vs 785; B=4: K=13 1754 vs 1363, K=21 3246 vs 2818; B=8 C=128 R=56: K=7 1850 vs 1564, K=13 3619
// vs 3301, but K=17 5045 vs 5313, K=21 7203 vs 7615, and on channels_last there K=17 6265 vs 5929, K=21 8328 vs 8270;
// K=27 / 31 stay on the planes at every size measured; 8 lanes on the Xeon, before the Winograd rows in direct tiles:
// K=13 624-709 vs 652-915. 8 lanes on the Zen 4, built for AVX2 (-march=znver3), NCHW, median of paired rounds, packed
// rows over planes: forward R=32 K=7 0.88 (1.10 in another run), K=9 0.75, K=11 0.82, K=13 0.61-0.63, K=17 0.76, K=21
// 0.78, K=27 0.84, K=31 0.82-0.85; R=64 K=7 0.82, K=13 0.64, K=31 1.00 (planes: K >= 23 on maps over 32); B=4 K=7 0.86;
// R=16 K=7 0.87, K=13 0.66; B=16 C=128 R=56 K=7 0.80, K=13 0.63; B=64 C=64 R=8 K=13 0.83 but B=2 C=256 R=12 K=13 1.09;
// backward (both gradients) K=7 0.85, K=13 0.79-0.81, K=17-21 0.88, K=31 1.0), else 1 straight from channels_last x and
// y of whole L-channel blocks; else 3 on maps from DROWS_MIN_W wide (below); else 0 packed planes.
// The direct tiles against packed planes (2 threads, B=1 C=384 R=32, channels_last, forward, us): AVX-512 straight from
// x K=3 74 vs 202, K=5 121 vs 252; from packed rows K=7 181 vs 293, K=9 222 vs 350, K=13 369 vs 528, K=17 631 vs 735,
// K=21 859 vs 930; past that the packed planes win (their 4-row tiles share input loads and skip whole tiles of
// padding); the 8-lane variant built for AVX2 K=3 122 vs 247, K=9 394 vs 538 (packed rows), K=17 1100 vs 1162 (planes).
// Against oneDNN's channels_last kernel they win where the tensors stay in cache (B=1 C=384 R=32, K=3 74 vs 100 us) and
// not always where they stream from memory (B=16 C=128 R=56 K=5 2.2 vs 1.8 ms; since the loads of the straight tiles
// were fixed, Zen 4: 2.3 vs 2.9 ms, but K=3 at B=64 C=128 R=32 13.5 vs 12.6): the dispatcher times it.
// Up to straight_taps() taps, the inputs that are not channels_last of whole blocks (NCHW, a partial last block) run
// the packed rows too on maps from DROWS_MIN_W wide, where DANY_LAYOUT (before: the packed planes). Measured on the Zen
// 4 (2 threads, median of paired rounds, packed rows over planes), forward: AVX-512 NCHW B=1 C=384 R=16-64 K=3 / 5
// 0.82-0.89, B=4 K=5 0.82, B=8 C=128 R=56 K=3 0.94, C=96 R=112 K=3 0.88; channels_last C=100 R=32 K=3 / 5 0.71-0.72,
// C=40 R=56 K=3 0.85; 1 thread 0.82-0.93; both gradients (one pass) NCHW 0.84-0.91. 8 lanes built for AVX2 (x86-64-v3):
// NCHW R=16-64 0.74-0.90, B=8 C=128 R=56 K=3 0.74, C=96 R=112 0.72; channels_last C=100 / 44 / 204 0.69-0.84; both
// gradients 0.76-0.87; but maps under 16 wide (R=8-14) 1.07-1.29, so they keep the planes.
constexpr int DROWS_MIN_W = 16;
inline int conv_path(int64_t sC, int64_t yC, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW) {
    if (swap_roles(H, W, KH, KW)) return 2;
    const bool cl = sC == 1 && yC == 1;
    if (W >= DCO && (cl || DANY_LAYOUT) && wino_direct(H, W, KH, KW)) return 5;
    if (wino_rows(H, W, KH, KW)) return 4;
    if (W < DCO || KH > DMAXK || KW > DMAXK) return 0;
    if (KH * KW > straight_taps() && (cl || DANY_LAYOUT)) return 3;
    if (cl && C % L == 0) return 1;
    return DANY_LAYOUT && W >= DROWS_MIN_W ? 3 : 0;
}

// Input and weight gradient in one pass where the input gradient runs packed planes (conv_path 0 or 4: plain planes
// or Winograd rows): the weight gradient's units (wgrad_fused: a group of channel blocks over a slice of the images)
// pack each plane of the output gradient g once, with its zero borders, as the input gradient's input, and copy its
// interior (a contiguous copy within the cache) as the weight gradient's "kernel", so g is read and transposed once
// instead of twice and both gradients run in one parallel region. The same sums in the same order as conv_fused
// (flipped kernel) and wgrad_fused: the same numbers. Where backward_plan says 2. Measured (2 threads, AVX-512 Intel
// Xeon, the C entry points of both builds in one process, paired rounds, one pass / the two passes, NCHW and
// channels_last): B = 1 C = 384 R = 32 K = 31 0.91-0.95, K = 21 0.93-0.97, R = 64 K = 31 0.95-0.98; B = 4 R = 32 K = 31
// 0.92-0.97; B = 8 C = 128 R = 56 K = 31 0.95; B = 2 C = 256 R = 28 K = 29 0.95-0.98; R = 14 K = 13 (plain planes)
// 0.88-0.99, R = 20 K = 27 0.91-1.00; 8 lanes 0.95-1.00.
void backward_planes(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* g, int64_t gN,
                     int64_t gC, int64_t gH, int64_t gW, const float* w, int64_t swC, int64_t swH, int64_t swW,
                     float* gx, int64_t xN, int64_t xC, int64_t xH, int64_t xW, float* gw, int64_t N, int64_t C,
                     int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads) {
    const bool inner = sC == 1 || gC == 1;
    const int64_t CB = (C + L - 1) / L, ph = KH / 2, pw = KW / 2, Hp = H + 2 * ph, Wp = W + 2 * pw;
    const int64_t G = blocks_per_line(inner), CBG = (CB + G - 1) / G, KS = G * KH * KW * L;
    const int64_t S = wgrad_slices(N, C, inner), units = CBG * S;
    const bool wino = wino_rows(H, W, KH, KW), wino_w = wino_wgrad(H, W, KH, KW);
    const int64_t wks = 5 * wino_chunks(KH) * KW * L;
    RawBuffer ker(wino ? 0 : CB * KH * KW * L), wk(wino ? CB * wks : 0);  // (as conv_fused's)
    Buffer part(S > 1 ? units * KS : 0);  // unit u's (KH, KW, L) sums per block of its group at u * KS
#pragma omp parallel num_threads(nthreads)
    {
        RawBuffer scratch(wino ? KH * KW * L : 0);
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < CB; ++cb) {  // the flipped kernel, packed (and transformed) once per block
            const int64_t c0 = cb * L, lanes = lane_count(C, c0);
            float* kp = wino ? scratch.data() : ker.data() + cb * KH * KW * L;
            for (int64_t i = 0; i < KH; ++i)
                pack_row(w + c0 * swC, lanes, swC, swH, swW, KH, KW, 0, 0, i, kp + i * KW * L);
            if (wino) wino_kernel(kp, KH, KW, wk.data() + cb * wks);
        }
        // one padded plane (g's, then x's: the zero borders are the padding of both), the output gradient's interior
        // copied where the weight gradient runs plain tiles, and one set of Winograd buffers for both passes (the
        // same transformed rows and columns; the products as wide as the wider output): a thread's working set stays
        // that of one pass (two sets of buffers measured 1.00-1.06x the separate passes at B = 1, R = 32 to 64)
        Buffer pl(Hp * Wp * L), acc(KS);
        RawBuffer gin(wino_w ? 0 : H * W * L), out(H * W * L);
        WinoBuffers wb(wino || wino_w, Hp, Wp, max64(W, KW), H, W, wino_w, ph, ph + H, pw, pw + W, H);
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; ++u) {
            const int64_t cbg = u / S, n0 = u % S * N / S, n1 = (u % S + 1) * N / S;
            const int64_t nb = CB - cbg * G < G ? CB - cbg * G : G;  // blocks in this group
            float* a = S > 1 ? part.data() + u * KS : acc.data();
            for (int64_t n = n0; n < n1; ++n)
                for (int64_t k = 0; k < nb; ++k) {
                    const int64_t cb = cbg * G + k, c0 = cb * L, lanes = lane_count(C, c0);
                    for (int64_t r = ph; r < ph + H; ++r)
                        pack_row(g + n * gN + c0 * gC, lanes, gC, gH, gW, H, W, ph, pw, r, pl.data() + r * Wp * L,
                                 false);
                    const float* interior = pl.data() + (ph * Wp + pw) * L;
                    for (int64_t r = 0; !wino_w && r < H; ++r)
                        std::memcpy(gin.data() + r * W * L, interior + r * Wp * L, sizeof(float) * W * L);
                    if (wino)
                        corr_plane_wino(pl.data(), wk.data() + cb * wks, out.data(), H, W, KH, KW, nullptr, false, ph,
                                        ph + H, pw, pw + W, wb);
                    else
                        corr_plane(pl.data(), ker.data() + cb * KH * KW * L, out.data(), H, W, KH, KW, nullptr, false,
                                   ph, ph + H, pw, pw + W);
                    float* gxp = gx + n * xN + c0 * xC;
                    for (int64_t h = 0; h < H; ++h) unpack_row(out.data() + h * W * L, lanes, W, gxp + h * xH, xC, xW);
                    if (wino_w) wino_kernel(interior, H, W, wb.g.data(), Wp * L);  // (what wgrad_plane computes)
                    for (int64_t r = ph; r < ph + H; ++r)
                        pack_row(x + n * sN + c0 * sC, lanes, sC, sH, sW, H, W, ph, pw, r, pl.data() + r * Wp * L,
                                 false);
                    float* ak = a + k * KH * KW * L;
                    if (wino_w)
                        corr_plane_wino<WRO, WCO, WREST>(pl.data(), wb.g.data(), ak, KH, KW, H, W, nullptr, n > n0,
                                                         ph, ph + H, pw, pw + W, wb);
                    else
                        corr_plane<WRO, WCO, WREST>(pl.data(), gin.data(), ak, KH, KW, H, W, nullptr, n > n0, ph,
                                                    ph + H, pw, pw + W);
                }
            if (S == 1) write_weight_grad(acc.data(), cbg * G, min64(CB, cbg * G + G), C, KH, KW, gw);
        }
        if (S > 1) {
#pragma omp for schedule(static)
            for (int64_t cbg = 0; cbg < CBG; ++cbg) {
                add_slices(part.data() + cbg * S * KS, S, KS, acc.data());
                write_weight_grad(acc.data(), cbg * G, min64(CB, cbg * G + G), C, KH, KW, gw);
            }
        }
    }
}

// Input and weight gradient in one pass where the input gradient runs direct tiles on packed rows with one band per
// (image, channel block) plane and the weight gradient groups no blocks (16 lanes, or no channels-innermost tensor):
// each unit's packed rows of the output gradient g serve both, so g is read and packed once, and the plane is still in
// cache for the weight gradient (backward_plan 1; 2: backward_planes). The same sums in the same order as conv_fused
// (flipped kernel) and wgrad_fused: the same numbers. Returns false (and computes nothing) elsewhere. Measured (2
// threads, AVX-512 Xeon, B=1 C=384 R=32, the two gradients alone, paired rounds, fused / separate): K=9 0.91-0.92, K=13
// 0.92-0.94, K=17 0.94-0.96, K=21 0.95-0.98; B=4 K=13 0.91-0.93; forward + both gradients through autograd (median
// per-round ratio): K=7 0.81-0.89, K=9 0.81-0.87, K=13 0.93-0.96, K=17 0.95-0.98, K=21 0.95-0.98.
// How backward_fused computes a call: 1 direct tiles on packed rows (plain or in Winograd rows) that the weight
// gradient reads too (conv_direct with a WeightGradOf), 2 packed planes (backward_planes), 0 not in one pass. Where
// the direct tiles in Winograd rows replaced the packed planes, one pass on rows against the former one pass on planes
// (2 threads, AVX-512 Xeon, B = 1, C = 384, paired, NCHW / channels_last): R = 32 K = 31 0.98 / 0.99, K = 27 0.96 /
// 0.99, K = 21 0.94 / 0.94, R = 64 K = 31 0.99 / 1.00, B = 4 R = 32 K = 31 0.97 / 0.99. Its units, (group of channel
// blocks, slice of the images), must still keep every thread busy (the input gradient alone runs N x blocks units):
// whole rounds of them, or at least 4 per thread.
inline int backward_plan(int64_t sC, int64_t gC, int64_t xC, int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH,
                         int64_t KW, int64_t nthreads) {
    const int path = conv_path(gC, xC, C, H, W, KH, KW);
    const bool inner = sC == 1 || gC == 1, planes = path == 0 || path == 4;
    if (!planes && ((path != 3 && path != 5) || row_bands(N, C, H, W, KH, KW, nthreads) != 1 ||
                    blocks_per_line(inner) != 1))
        return 0;
    const int64_t G = planes ? blocks_per_line(inner) : 1;
    const int64_t units = ((C + L - 1) / L + G - 1) / G * wgrad_slices(N, C, planes && inner);
    if (units % nthreads != 0 && units < 4 * nthreads) return 0;
    return planes ? 2 : 1;
}

bool backward_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* g, int64_t gN,
                    int64_t gC, int64_t gH, int64_t gW, const float* w, int64_t swC, int64_t swH, int64_t swW,
                    float* gx, int64_t xN, int64_t xC, int64_t xH, int64_t xW, float* gw, int64_t N, int64_t C,
                    int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads) {
    const int plan = backward_plan(sC, gC, xC, N, C, H, W, KH, KW, nthreads);
    if (plan == 2)
        backward_planes(x, sN, sC, sH, sW, g, gN, gC, gH, gW, w, swC, swH, swW, gx, xN, xC, xH, xW, gw, N, C, H, W,
                        KH, KW, nthreads);
    if (plan != 1) return plan == 2;
    const WeightGradOf wg{x, sN, sC, sH, sW, gw};
    conv_direct(g, gN, gC, gH, gW, w, swC, swH, swW, nullptr, gx, xN, xC, xH, xW, N, C, H, W, KH, KW, nthreads, true,
                &wg);
    return true;
}

void conv_fused(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const float* w, int64_t swC,
                int64_t swH, int64_t swW, const float* b, float* y, int64_t yN, int64_t yC, int64_t yH, int64_t yW,
                int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t nthreads) {
    const int path = conv_path(sC, yC, C, H, W, KH, KW);
    if (path == 1 || path == 3 || path == 5)
        return conv_direct(x, sN, sC, sH, sW, w, swC, swH, swW, b, y, yN, yC, yH, yW, N, C, H, W, KH, KW, nthreads,
                           path != 1);
    const int64_t CB = (C + L - 1) / L, ph = KH / 2, pw = KW / 2, Hp = H + 2 * ph, Wp = W + 2 * pw;
    const bool swap = swap_roles(H, W, KH, KW);
    const int64_t G = blocks_per_line(sC == 1 || yC == 1), CBG = (CB + G - 1) / G;
    // image-major order where a tensor has channels innermost (see below); every block's kernel (and bias) is packed
    // once, up front, so that consecutive planes of other blocks do not repack theirs
    const bool image_major = sC == 1 || yC == 1;
    // the packed kernels, or where the Winograd rows run only their transforms (each block's packed kernel then goes
    // through a thread's scratch: the 1.5 MB of packed kernels at C = 384, K = 31 no longer written and read back)
    const bool wino = path == 4;
    const int64_t wks = 5 * wino_chunks(KH) * KW * L;
    RawBuffer ker(wino ? 0 : CB * KH * KW * L), wk(wino ? CB * wks : 0);
    Buffer bias(b ? CB * L : 0);
#pragma omp parallel num_threads(nthreads)
    {
        RawBuffer scratch(wino ? KH * KW * L : 0);
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < CB; ++cb) {
            const int64_t c0 = cb * L, lanes = lane_count(C, c0);
            float* kp = wino ? scratch.data() : ker.data() + cb * KH * KW * L;
            for (int64_t i = 0; i < KH; ++i)
                pack_row(w + c0 * swC, lanes, swC, swH, swW, KH, KW, 0, 0, i, kp + i * KW * L);
            for (int64_t l = 0; b && l < L; ++l) bias[c0 + l] = l < lanes ? b[c0 + l] : 0.f;
            if (wino) wino_kernel(kp, KH, KW, wk.data() + cb * wks);
        }
        Buffer xin(Hp * Wp * L);  // its zero borders are the padding
        RawBuffer out(H * W * L);
        WinoBuffers wb(wino, Hp, Wp, W, KH, KW, false, ph, ph + H, pw, pw + W);
        // planes p = (group * N + n) * G + k for block group * G + k: a chunk of G planes (one image, the blocks of
        // one cache line) runs on one thread. With channels innermost, p = (n * CBG + group) * G + k: one image's
        // blocks in turn, so the 64-byte lines of a pixel's neighbouring blocks (fetched with this block's) are
        // still in cache when their plane comes (in block-major order, every image of a block before the next
        // block, they were evicted from B = 16 on: each line a miss). Measured (1 thread, Intel Xeon with AVX-512,
        // thread CPU time, 9 paired rounds, new / old median): channels_last B=16 C=128 R=56 K=27 0.92, B=64 C=128
        // R=16 K=31 0.95, B=4 and 16 C=384 R=32 K=31 0.99-1.02 (NCHW, unchanged order, 0.99-1.02 in the same rounds)
#pragma omp for schedule(dynamic, G)
        for (int64_t p = 0; p < CBG * N * G; ++p) {
            const int64_t k = p % G, n = image_major ? p / G / CBG : (p / G) % N,
                          cb = (image_major ? (p / G) % CBG : p / G / N) * G + k;
            if (cb >= CB) continue;
            const int64_t c0 = cb * L, lanes = lane_count(C, c0);
            const float* kp = wino ? nullptr : ker.data() + cb * KH * KW * L;
            const float* bp = b ? bias.data() + c0 : nullptr;
            const float* xp = x + n * sN + c0 * sC;
            if (swap)  // the map as the "kernel": unpadded
                for (int64_t r = 0; r < H; ++r) pack_row(xp, lanes, sC, sH, sW, H, W, 0, 0, r, xin.data() + r * W * L);
            else
                for (int64_t r = ph; r < ph + H; ++r)
                    pack_row(xp, lanes, sC, sH, sW, H, W, ph, pw, r, xin.data() + r * Wp * L, false);
            float* yp = y + n * yN + c0 * yC;
            if (swap) {
                const float* kwin = kp + ((ph - H + 1) * KW + (pw - W + 1)) * L;
                corr_plane(kwin, xin.data(), out.data(), H, W, H, W, bp, false, 0, 2 * H - 1, 0,
                           2 * W - 1, KW * L);
                for (int64_t h = 0; h < H; ++h)  // row H-1-h, columns reversed (a negative pixel stride)
                    unpack_row(out.data() + (H - 1 - h) * W * L, lanes, W, yp + h * yH + (W - 1) * yW, yC, -yW);
                continue;
            }
            if (wino)
                corr_plane_wino(xin.data(), wk.data() + cb * wks, out.data(), H, W, KH, KW, bp, false, ph, ph + H,
                                pw, pw + W, wb);
            else
                corr_plane(xin.data(), kp, out.data(), H, W, KH, KW, bp, false, ph, ph + H, pw, pw + W);
            for (int64_t h = 0; h < H; ++h) unpack_row(out.data() + h * W * L, lanes, W, yp + h * yH, yC, yW);
        }
    }
}

#undef DW_AVX
#endif  // DW_KERNEL_BODY
