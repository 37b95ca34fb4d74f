// FMA peak of this machine in fp32 GFLOP/s: ten independent FMA chains per thread on the widest vectors the
// compiler targets (-march=native: 512-bit where AVX-512 exists, else 256-bit), OpenMP over the given threads.
// The roofline reference for kernels that are not GEMM (fastconv's own). Plain C ABI, called through ctypes.
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <time.h>
#ifdef __AVX512F__
typedef __m512 V;
enum { L = 16 };
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET(x) _mm512_set1_ps(x)
#define ADD(a, b) _mm512_add_ps(a, b)
static float RED(V a) { return _mm512_reduce_add_ps(a); }
#elif defined(__FMA__)
typedef __m256 V;
enum { L = 8 };
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET(x) _mm256_set1_ps(x)
#define ADD(a, b) _mm256_add_ps(a, b)
static float RED(V a) { float t[8]; _mm256_storeu_ps(t, a); float s = 0; for (int i = 0; i < 8; i++) s += t[i]; return s; }
#else
#error "fma_peak needs FMA (AVX2 or AVX-512)"
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

// Vector width in floats of the path this library was built for.
int fma_lanes(void) { return L; }

// Best of ``repeats`` runs of ``flops_per_thread`` fp32 FLOP on each of ``threads`` threads, in GFLOP/s.
double fma_peak_gflops(int threads, double flops_per_thread, int repeats) {
  const long iters = (long)(flops_per_thread / (2.0 * 10 * L)) + 1;
  double best = 0; volatile float sink = 0;
  for (int rep = 0; rep < repeats; rep++) {
    double t0 = now(); float s = 0;
#pragma omp parallel num_threads(threads) reduction(+ : s)
    {
      V a0 = SET(1.f), a1 = SET(1.1f), a2 = SET(1.2f), a3 = SET(1.3f), a4 = SET(1.4f), a5 = SET(1.5f),
        a6 = SET(1.6f), a7 = SET(1.7f), a8 = SET(1.8f), a9 = SET(1.9f), b = SET(0.9999999f), c = SET(1e-7f);
      for (long i = 0; i < iters; i++) {
        a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c); a3 = FMA(a3, b, c); a4 = FMA(a4, b, c);
        a5 = FMA(a5, b, c); a6 = FMA(a6, b, c); a7 = FMA(a7, b, c); a8 = FMA(a8, b, c); a9 = FMA(a9, b, c);
      }
      s += RED(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(ADD(a6, a7), ADD(a8, a9)))));
    }
    double dt = now() - t0, gf = 2.0 * 10 * L * (double)iters * threads / dt / 1e9;
    if (gf > best) best = gf;
    sink += s;
  }
  return best + 0 * sink;
}
