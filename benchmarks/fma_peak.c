/* Register-bound kernels for the machine's f32 FMA peak and its clock.
 *
 * Built at run time by native_peak.py with the host's C compiler, once with
 * -mavx512f (VEC_WIDTH 16) and once with -mavx2 -mfma (VEC_WIDTH 8); which
 * one runs depends on the CPU's flags.
 *
 * fma_chains: CHAINS (12) independent multiply-add chains, each a vector register
 * that never leaves the register file. Two FMA units with a 4-cycle latency
 * need at least 8 chains in flight; 12 leave margin for 5-cycle parts. The
 * chains start from different values and a, b arrive as arguments, so that
 * the compiler can neither merge the chains nor fold the loop away.
 *
 * clock_chain: a chain of dependent 64-bit multiplies (3 cycles each on
 * every x86 core of the last decade), timing the cycles that actually run.
 * Dependent adds would not do: recent Intel cores fold add-immediate chains
 * at rename.
 */
#include <immintrin.h>
#include <stdint.h>

#define CHAINS 12

#if VEC_WIDTH == 16
typedef __m512 vec;
#define SET1(x) _mm512_set1_ps(x)
#define FMA(x, a, b) _mm512_fmadd_ps(x, a, b)
#define ADD(x, y) _mm512_add_ps(x, y)
static float first_lane(vec v) { return _mm512_cvtss_f32(v); }
#else
typedef __m256 vec;
#define SET1(x) _mm256_set1_ps(x)
#define FMA(x, a, b) _mm256_fmadd_ps(x, a, b)
#define ADD(x, y) _mm256_add_ps(x, y)
static float first_lane(vec v) { return _mm256_cvtss_f32(v); }
#endif

int vec_width(void) { return VEC_WIDTH; }

int chains(void) { return CHAINS; }

/* iters x CHAINS x VEC_WIDTH FMAs (2 FLOP each). The chains are spelled
 * out, not an array, so that each is a named register at any -O level. */
float fma_chains(int64_t iters, float a_value, float b_value) {
  const vec a = SET1(a_value), b = SET1(b_value);
  vec x0 = SET1(1.f), x1 = SET1(2.f), x2 = SET1(3.f), x3 = SET1(4.f);
  vec x4 = SET1(5.f), x5 = SET1(6.f), x6 = SET1(7.f), x7 = SET1(8.f);
  vec x8 = SET1(9.f), x9 = SET1(10.f), x10 = SET1(11.f), x11 = SET1(12.f);
  for (int64_t i = 0; i < iters; ++i) {
    x0 = FMA(x0, a, b); x1 = FMA(x1, a, b); x2 = FMA(x2, a, b);
    x3 = FMA(x3, a, b); x4 = FMA(x4, a, b); x5 = FMA(x5, a, b);
    x6 = FMA(x6, a, b); x7 = FMA(x7, a, b); x8 = FMA(x8, a, b);
    x9 = FMA(x9, a, b); x10 = FMA(x10, a, b); x11 = FMA(x11, a, b);
  }
  vec total = ADD(ADD(ADD(x0, x1), ADD(x2, x3)), ADD(ADD(x4, x5), ADD(x6, x7)));
  total = ADD(total, ADD(ADD(x8, x9), ADD(x10, x11)));
  return first_lane(total);
}

/* iters x 8 dependent multiplies: 24 x iters cycles. */
uint64_t clock_chain(uint64_t iters, uint64_t seed) {
  uint64_t x = seed | 1u;
  for (uint64_t i = 0; i < iters; ++i) {
    __asm__ volatile(
        "imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0\n\t"
        "imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0"
        : "+r"(x));
  }
  return x;
}
