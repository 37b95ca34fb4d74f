// Portability check of fastconv/csrc/dwconv.cpp (tests/csrc/check_portability.py): its C entry points built by
// another compiler or for another CPU, against a double-precision reference: forward, input gradient (the forward
// of the output gradient with the kernel flipped through negative strides), weight gradient and, where it applies,
// the one-pass backward; NCHW and channels_last, both lane widths, kernels 3 to 31 on maps smaller and larger, channel
// counts with lane tails and of whole blocks: every path of conv_path.
// Prints one line per failing case and a summary; exit status 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

extern "C" {
void dw_conv_fused(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                   const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                   int64_t, int64_t, int64_t, int64_t);
void dw_wgrad_fused(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                    int64_t, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
int dw_backward_fused(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                      int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int64_t,
                      float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
int dw_variant(int64_t);
int dw_has_openmp();
int dw_conv_path(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
int dw_wgrad_wino(int64_t, int64_t, int64_t, int64_t, int64_t);
}

namespace {

struct Case {
    int64_t N, C, H, W, K, lanes;
    bool channels_last;
};

struct Errors {
    double y = 0, x = 0, w = 0;  // largest error over largest reference magnitude
    bool one_pass = false;       // the one-pass backward applied (and was checked)
};

Errors run(const Case& k, std::mt19937& rng) {
    const int64_t N = k.N, C = k.C, H = k.H, W = k.W, K = k.K, P = K / 2;
    std::normal_distribution<float> normal;
    std::vector<float> x(N * C * H * W), g(x.size()), w(C * K * K), b(C), y(x.size()), gx(x.size()), gx1(x.size()),
        gw(w.size()), gw1(w.size());
    for (auto* v : {&x, &g, &w, &b})
        for (auto& e : *v) e = normal(rng);
    const int64_t s[4] = {C * H * W, k.channels_last ? 1 : H * W, k.channels_last ? W * C : W,
                          k.channels_last ? C : 1};  // element strides of (N, C, H, W)
    auto at = [&](const std::vector<float>& t, int64_t n, int64_t c, int64_t h, int64_t q) -> double {
        return h < 0 || h >= H || q < 0 || q >= W ? 0.0 : t[n * s[0] + c * s[1] + h * s[2] + q * s[3]];
    };
    const float* flipped = w.data() + (K - 1) * K + (K - 1);  // strides (K * K, -K, -1)
    dw_conv_fused(x.data(), s[0], s[1], s[2], s[3], w.data(), K * K, K, 1, b.data(), y.data(), s[0], s[1], s[2], s[3],
                  N, C, H, W, K, K, 2, k.lanes);
    dw_conv_fused(g.data(), s[0], s[1], s[2], s[3], flipped, K * K, -K, -1, nullptr, gx.data(), s[0], s[1], s[2],
                  s[3], N, C, H, W, K, K, 2, k.lanes);
    dw_wgrad_fused(x.data(), s[0], s[1], s[2], s[3], g.data(), s[0], s[1], s[2], s[3], gw.data(), N, C, H, W, K, K,
                   2, k.lanes);
    Errors e;
    e.one_pass = dw_backward_fused(x.data(), s[0], s[1], s[2], s[3], g.data(), s[0], s[1], s[2], s[3], flipped, K * K,
                                   -K, -1, gx1.data(), s[0], s[1], s[2], s[3], gw1.data(), N, C, H, W, K, K, 2,
                                   k.lanes) == 1;
    double max_y = 0, max_x = 0, max_w = 0;
    for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = 0; h < H; ++h)
                for (int64_t q = 0; q < W; ++q) {
                    double ry = b[c], rx = 0;
                    for (int64_t i = 0; i < K; ++i)
                        for (int64_t j = 0; j < K; ++j) {
                            ry += at(x, n, c, h + i - P, q + j - P) * w[(c * K + i) * K + j];
                            rx += at(g, n, c, h + i - P, q + j - P) * w[(c * K + K - 1 - i) * K + K - 1 - j];
                        }
                    e.y = std::fmax(e.y, std::fabs(at(y, n, c, h, q) - ry));
                    e.x = std::fmax(e.x, std::fabs(at(gx, n, c, h, q) - rx));
                    if (e.one_pass) e.x = std::fmax(e.x, std::fabs(at(gx1, n, c, h, q) - rx));
                    max_y = std::fmax(max_y, std::fabs(ry));
                    max_x = std::fmax(max_x, std::fabs(rx));
                }
    for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < K; ++j) {
                double rw = 0;
                for (int64_t n = 0; n < N; ++n)
                    for (int64_t h = 0; h < H; ++h)
                        for (int64_t q = 0; q < W; ++q)
                            rw += at(x, n, c, h + i - P, q + j - P) * at(g, n, c, h, q);
                e.w = std::fmax(e.w, std::fabs(gw[(c * K + i) * K + j] - rw));
                if (e.one_pass) e.w = std::fmax(e.w, std::fabs(gw1[(c * K + i) * K + j] - rw));
                max_w = std::fmax(max_w, std::fabs(rw));
            }
    e.y /= max_y;
    e.x /= max_x;
    e.w /= max_w;
    return e;
}

}  // namespace

int main() {
    std::mt19937 rng(0);
    int cases = 0, fails = 0, one_pass = 0, winograd = 0, winograd_direct = 0;
    // (N, C): channel blocks with lane tails; whole blocks of 8 and 16 (the direct tiles straight on channels_last
    // tensors), with the blocks the one-pass backward needs
    // (H, W, K): small maps (W = H + 3) with every path below the Winograd rows, then a 24 x 27 map with K = 23 and 31,
    // where the Winograd rows run on planes (AVX-512 both; 8 lanes K = 31, and K = 23 in direct tiles) and in the
    // weight gradient, and a 24 x 32 map with K = 23, where AVX-512 and 8 lanes run them in the direct tiles on packed
    // rows (as the 8-lane 20 x 23 map with K = 13 does)
    std::vector<std::tuple<int64_t, int64_t, int64_t>> maps;
    for (int64_t H : {5, 11, 20})
        for (int64_t K : {3, 7, 13, 31}) maps.emplace_back(H, H + 3, K);
    maps.emplace_back(24, 27, 23);
    maps.emplace_back(24, 27, 31);
    maps.emplace_back(24, 32, 23);
    const int64_t batches[2][2] = {{2, 19}, {4, 48}};
    for (const auto& nc : batches)
        for (int64_t lanes : {8, 16})
            for (const auto& [H, W, K] : maps)
                for (bool channels_last : {false, true}) {
                    const Case k{nc[0], nc[1], H, W, K, lanes, channels_last};
                    const int64_t sC = channels_last ? 1 : k.H * k.W;
                    const int path = dw_conv_path(sC, sC, k.C, H, W, K, K, lanes);
                    winograd += path == 4 && dw_wgrad_wino(k.H, k.W, K, K, lanes) == 1;
                    winograd_direct += path == 5;
                    const Errors e = run(k, rng);
                    ++cases;
                    one_pass += e.one_pass;
                    if (e.y <= 1e-5 && e.x <= 1e-5 && e.w <= 1e-5) continue;
                    ++fails;
                    std::printf("FAIL N=%lld C=%lld H=%lld W=%lld K=%lld lanes %lld (variant %d) %s: relative "
                                "error y %.2e dx %.2e dw %.2e\n",
                                (long long)k.N, (long long)k.C, (long long)k.H, (long long)k.W, (long long)K,
                                (long long)lanes, dw_variant(lanes), channels_last ? "channels_last" : "NCHW",
                                e.y, e.x, e.w);
                }
    std::printf("variants %d / %d, OpenMP %d: %d of %d cases match the reference (%d through the one-pass "
                "backward, %d in Winograd rows on planes, %d in direct tiles)\n", dw_variant(8), dw_variant(16),
                dw_has_openmp(), cases - fails, cases, one_pass, winograd, winograd_direct);
    return fails ? 1 : 0;
}
