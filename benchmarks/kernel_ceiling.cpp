// Probes of fastconv's C++ kernel below a whole call, on one thread. benchmarks/bench_kernel_ceiling.py compiles
// this file with the kernel's own source (fastconv/csrc/dwconv.cpp, passed as DWCONV_SRC) and runs:
//   ceiling_row    the register tile's steady state: input rows of one RO x CO tile that every output row of the
//                  tile uses (input_row<RO, CO, false>), again and again on L1-resident data;
//   ceiling_plane  corr_plane on one packed (R+K-1) x (R+K-1) plane with a K x K kernel (the forward and input
//                  gradient of K > DMAXK), skipping the products with the zero padding as the kernel does
//                  (skip = 1), or multiplying every tap (skip = 0);
//   ceiling_wino_plane  the same plane in Winograd F(3, 3) rows (corr_plane_wino), as the call runs it where
//                  conv_path says 4.
// Each returns the best over `rounds` of the mean seconds per call over `reps` calls; the caller counts the FMAs.
#ifndef CEILING_BODY
#include DWCONV_SRC
#include <chrono>

#define CEILING_BODY 1
namespace dw8 {
#include __FILE__
}
namespace dw16g {
#include __FILE__
}
#if DW_HAS_AVX512
DW_AVX512_BEGIN
namespace dw16 {
#include __FILE__
}
DW_AVX512_END
#endif
#undef CEILING_BODY

extern "C" {

// `expr` (a call or constant of the probes' namespace) in the kernel variant that `lanes` selects (see dw_variant)
#if DW_HAS_AVX512
#define CEILING_AVX512_CASE(expr) case 16: return dw16::expr;
#else
#define CEILING_AVX512_CASE(expr)
#endif
#define CEILING_IN_VARIANT(lanes, expr)                                   \
    switch (dw_variant(lanes)) {                                          \
        case 8: return dw8::expr;                                         \
        CEILING_AVX512_CASE(expr)                                         \
        case 17: return dw16g::expr;                                      \
        default: return -1;                                               \
    }

// RO (which = 0), CO (1) and lanes L (2) of the variant; -1 if `lanes` selects none.
int64_t ceiling_tile(int64_t lanes, int64_t which) {
    CEILING_IN_VARIANT(lanes, tile_shape(which))
}

double ceiling_row(int64_t KW, int64_t reps, int64_t rounds, int64_t lanes) {
    CEILING_IN_VARIANT(lanes, row_seconds(KW, reps, rounds))
}

double ceiling_plane(int64_t K, int64_t R, int64_t skip, int64_t reps, int64_t rounds, int64_t lanes) {
    CEILING_IN_VARIANT(lanes, plane_seconds(K, R, skip, reps, rounds))
}

double ceiling_wino_plane(int64_t K, int64_t R, int64_t reps, int64_t rounds, int64_t lanes) {
    CEILING_IN_VARIANT(lanes, wino_plane_seconds(K, R, reps, rounds))
}

}  // extern "C"

#else  // ------------------------------------------------------------------- the probes, per kernel namespace

inline double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline int64_t tile_shape(int64_t which) { return which == 0 ? RO : which == 1 ? CO : L; }

volatile float ceiling_sink = 0;  // the results are read, so the compiler keeps the work

// Mean seconds per input row of an RO x CO tile (RO * CO * KW FMAs of L lanes each), best of `rounds`: 8 input rows
// of KW + CO pixels and a kernel of RO + 3 rows, all in L1; input row ii = RO - 1 .. RO + 2 meets every output row.
inline double row_seconds(int64_t KW, int64_t reps, int64_t rounds) {
    const int64_t rows = 8, KH = RO + 3, rs = (KW + CO) * L;
    Buffer in(rows * rs, 0.5f), k(KH * KW * L, 0.25f), out(RO * CO * L);
    double best = 1e30;
    for (int64_t t = 0; t < rounds; ++t) {
        vec acc[RO][CO] = {};
        const double t0 = now_seconds();
        for (int64_t r = 0; r < reps; ++r)
            input_row<RO, CO, false>(acc, in.data() + (r % rows) * rs, k.data(), RO - 1 + (r & 3), KH, KW, 0, KW,
                                     false, false);
        const double s = (now_seconds() - t0) / reps;
        for (int a = 0; a < RO; ++a)
            for (int c = 0; c < CO; ++c) store(out.data() + (a * CO + c) * L, acc[a][c]);
        ceiling_sink = ceiling_sink + out[0];
        best = s < best ? s : best;
    }
    return best;
}

// Mean seconds per corr_plane call on one packed plane of an R x R map (zero borders of K / 2), best of `rounds`.
inline double plane_seconds(int64_t K, int64_t R, int64_t skip, int64_t reps, int64_t rounds) {
    const int64_t P = R + K - 1, pad = K / 2;
    Buffer in(P * P * L, 0.f), k(K * K * L), out(R * R * L);
    for (int64_t r = pad; r < pad + R; ++r)
        for (int64_t c = pad; c < pad + R; ++c)
            for (int64_t l = 0; l < L; ++l) in[(r * P + c) * L + l] = 0.001f * ((r * 7 + c * 3 + l) % 11);
    for (size_t i = 0; i < k.size(); ++i) k[i] = 0.01f * (i % 13);
    const int64_t lo = skip ? pad : 0, hi = skip ? pad + R : P;
    double best = 1e30;
    for (int64_t t = 0; t < rounds; ++t) {
        const double t0 = now_seconds();
        for (int64_t i = 0; i < reps; ++i)
            corr_plane(in.data(), k.data(), out.data(), R, R, K, K, nullptr, false, lo, hi, lo, hi);
        const double s = (now_seconds() - t0) / reps;
        ceiling_sink = ceiling_sink + out[0];
        best = s < best ? s : best;
    }
    return best;
}

// The same plane through corr_plane_wino (the Winograd rows; the kernel transformed once, outside the timing);
// -1 where the variant has no Winograd rows.
inline double wino_plane_seconds(int64_t K, int64_t R, int64_t reps, int64_t rounds) {
    if (!WINO) return -1.0;
    const int64_t P = R + K - 1, pad = K / 2;
    Buffer in(P * P * L, 0.f), k(K * K * L), out(R * R * L), G(5 * wino_chunks(K) * K * L);
    for (int64_t r = pad; r < pad + R; ++r)
        for (int64_t c = pad; c < pad + R; ++c)
            for (int64_t l = 0; l < L; ++l) in[(r * P + c) * L + l] = 0.001f * ((r * 7 + c * 3 + l) % 11);
    for (size_t i = 0; i < k.size(); ++i) k[i] = 0.01f * (i % 13);
    wino_kernel(k.data(), K, K, G.data());
    WinoBuffers wb(true, P, P, R, K, K, false, pad, pad + R, pad, pad + R);
    double best = 1e30;
    for (int64_t t = 0; t < rounds; ++t) {
        const double t0 = now_seconds();
        for (int64_t i = 0; i < reps; ++i)
            corr_plane_wino(in.data(), G.data(), out.data(), R, R, K, K, nullptr, false, pad, pad + R, pad, pad + R,
                            wb);
        const double s = (now_seconds() - t0) / reps;
        ceiling_sink = ceiling_sink + out[0];
        best = s < best ? s : best;
    }
    return best;
}

#endif  // CEILING_BODY
