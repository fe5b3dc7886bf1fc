// SIMD helpers shared by the hiss CPU kernels: GCC vector types (32-byte: 8 floats / 4 doubles),
// unaligned loads/stores, splat, horizontal sums, and vector exp / softplus / sigmoid with IEEE
// semantics (no -ffast-math). Header-only; every kernel file of the extension includes it.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define HISS_INLINE inline __attribute__((always_inline))

namespace hiss {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef uint64_t v4ul __attribute__((vector_size(32)));
// 16 floats: only inside functions built with target("avx512f") (the time-major scan's wide build)
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

template <typename T>
struct VT;
template <>
struct VT<float> {
  typedef v8f V;
  typedef v8i VI;
  static constexpr int W = 8;
};
template <>
struct VT<double> {
  typedef v4d V;
  typedef v4l VI;
  static constexpr int W = 4;
};

// Unaligned loads/stores through element-aligned vector types. (Not memcpy: that is a char access
// that may alias anything, which made GCC reload the argument struct after every store.)
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
typedef double v4d_u __attribute__((vector_size(32), aligned(8)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));
template <typename V>
struct Unaligned;
template <>
struct Unaligned<v8f> {
  typedef v8f_u type;
};
template <>
struct Unaligned<v4d> {
  typedef v4d_u type;
};
template <>
struct Unaligned<v16f> {
  typedef v16f_u type;
};
template <typename V, typename P>
HISS_INLINE V vload(const P* p) {
  return *reinterpret_cast<const typename Unaligned<V>::type*>(p);
}
template <typename V, typename P>
HISS_INLINE void vstore(P* p, V v) {
  *reinterpret_cast<typename Unaligned<V>::type*>(p) = v;
}
template <typename V>
struct Splat;
template <>
struct Splat<v8f> {
  static HISS_INLINE v8f make(float s) {
    v8f x = {};
    x[0] = s;
    return __builtin_shufflevector(x, x, 0, 0, 0, 0, 0, 0, 0, 0);  // GCC turns {s,...,s} into inserts
  }
};
template <>
struct Splat<v16f> {
  static HISS_INLINE v16f make(float s) {  // a list, not a shuffle: GCC 12 then broadcasts from memory ({1to16})
    return v16f{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
  }
};
template <>
struct Splat<v4d> {
  static HISS_INLINE v4d make(double s) {
    v4d x = {};
    x[0] = s;
    return __builtin_shufflevector(x, x, 0, 0, 0, 0);
  }
};
// broadcast a scalar (converted to the lane type) to all lanes
template <typename V, typename S>
HISS_INLINE V splat(S s) {
  typedef std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>> E;
  return Splat<V>::make(static_cast<E>(s));
}

typedef float v4f __attribute__((vector_size(16)));
typedef double v2d __attribute__((vector_size(16)));

// Horizontal sums as halving shuffles (extract + add, movhl + add, shuffle + add).
HISS_INLINE float hsum(v8f v) {
  v4f s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  s = s + __builtin_shufflevector(s, s, 2, 3, 2, 3);
  return s[0] + s[1];
}
HISS_INLINE float hsum(v16f v) {
  return hsum(v8f(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}
HISS_INLINE double hsum(v4d v) {
  v2d s = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
  return s[0] + s[1];
}

// ---- exp ---------------------------------------------------------------------------------------
// Range reduction x = n ln2 + r (|r| <= ln2/2, ln2 split in two so n*C1 is exact), n rounded with
// the 1.5*2^p "magic" add (its low mantissa bits then hold n), polynomial for exp(r), scale by 2^n
// built in the exponent bits. Results below the smallest normal flush to 0; overflow gives +inf
// (slightly early: above 88.376 in fp32, 709.09 in fp64); NaN propagates. Arguments outside
// [lo, hi] are not clamped: their lanes produce garbage (possibly NaN/inf, never denormals) that the
// final selects replace, which is cheaper than clamping first.
// fp32, any width (V: the float vector, U: the uint32 vector of the same width): the same operations on every lane,
// so the 8- and 16-wide builds agree bit for bit.
template <typename V, typename U>
HISS_INLINE V vexp_f32(V x) {
  const V hi = splat<V>(88.3762626647949f), lo = splat<V>(-87.3365447505531f);
  const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23
  const V xc = x;  // no clamp: lanes outside [lo, hi] compute garbage that the selects below replace
  V fm = xc * 1.44269504088896341f + magic;
  V fx = fm - magic;
  V r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  V p = splat<V>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r + 1.0f;  // 1 + r + r^2 P(r), Horner with fma
  p = p * r + 1.0f;
  U n = (U)fm - (U)magic;  // two's complement n in 32 bits
  U bits = (n + 127u) << 23;
  V res = p * (V)bits;
  res = x < lo ? splat<V>(0.0f) : res;
  res = x > hi ? splat<V>(std::numeric_limits<float>::infinity()) : res;
  return res;
}
HISS_INLINE v8f vexp(v8f x) { return vexp_f32<v8f, v8u>(x); }
HISS_INLINE v16f vexp(v16f x) { return vexp_f32<v16f, v16u>(x); }

HISS_INLINE v4d vexp(v4d x) {
  const v4d hi = splat<v4d>(709.08956571282405), lo = splat<v4d>(-708.39641853226408);
  const v4d magic = splat<v4d>(6755399441055744.0);  // 1.5 * 2^52
  const v4d xc = x;
  v4d fm = xc * 1.4426950408889634073599 + magic;
  v4d fx = fm - magic;
  v4d r = xc - fx * 6.93145751953125E-1;
  r = r - fx * 1.42860682030941723212E-6;
  // Taylor to degree 13: truncation < 5e-18 for |r| <= ln2/2.
  v4d p = splat<v4d>(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  v4ul n = (v4ul)fm - (v4ul)magic;
  v4ul bits = (n + (uint64_t)1023) << 52;
  v4d res = p * (v4d)bits;
  res = x < lo ? splat<v4d>(0.0) : res;
  res = x > hi ? splat<v4d>(std::numeric_limits<double>::infinity()) : res;
  return res;
}

// log1p(e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) in [0, 1/3]: odd series in s, no log needed.
template <typename V>
HISS_INLINE V log1p_unit(V e);
template <typename V>
HISS_INLINE V log1p_unit_f32(V e) {
  V s = e / (2.0f + e);
  V s2 = s * s;
  V p = splat<V>(1.0f / 15.0f);
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
template <>
HISS_INLINE v8f log1p_unit(v8f e) {
  return log1p_unit_f32(e);
}
template <>
HISS_INLINE v16f log1p_unit(v16f e) {
  return log1p_unit_f32(e);
}
template <>
HISS_INLINE v4d log1p_unit(v4d e) {
  v4d s = e / (2.0 + e);
  v4d s2 = s * s;
  v4d p = splat<v4d>(1.0 / 35.0);
  for (int k = 16; k >= 0; --k) p = p * s2 + 1.0 / (2 * k + 1);
  return 2.0 * s * p;
}

// torch.nn.functional.softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)).
template <typename V>
HISS_INLINE V vsoftplus(V x) {
  V zero = {};
  V ax = x < zero ? -x : x;
  V e = vexp(-ax);
  V r = (x > zero ? x : zero) + log1p_unit(e);
  return x > splat<V>(20) ? x : r;
}
// logistic sigmoid, stable on both sides.
template <typename V>
HISS_INLINE V vsigmoid(V x) {
  V zero = {};
  V ax = x < zero ? -x : x;
  V e = vexp(-ax);
  V one = splat<V>(1);
  V inv = one / (one + e);
  return x >= zero ? inv : e * inv;
}
// d softplus / dx as torch computes it: 1 above the threshold, sigmoid below.
template <typename V>
HISS_INLINE V vsoftplus_grad(V x) {
  return x > splat<V>(20) ? splat<V>(1) : vsigmoid(x);
}


// torch's softplus (threshold 20) and silu, scalar.
template <typename T>
HISS_INLINE T softplus_s(T v) {
  return v > T(20) ? v : std::log1p(std::exp(v));
}
template <typename T>
HISS_INLINE T silu_s(T v) {
  return v / (T(1) + std::exp(-v));
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HISS_HAVE_AVX2 1
#else
#define HISS_HAVE_AVX2 0
#endif

// "avx512", "avx2" or "base": the instruction set the kernels run with (defined in selective_scan_cpu.cpp); kernels
// without a 16-wide build run their avx2 build under "avx512".
std::string isa();

}  // namespace hiss
