// Mamba-1 selective scan on time-major inputs, CPU forward + backward, vectorized over channels
// (ssm_core.ops.selective_scan.selective_scan_time_major; the math of selective_scan_cpu.cpp's header).
//
//   u, delta, z, out: (batch, L, dim)   B, C: (batch, L, G, N)   A: (dim, N)   D, delta_bias: (dim,)
//
// Why a second scan: the channel-major kernel vectorizes over the state (N = 16 is two vectors) and pays, per
// channel, a set-up, a padded time chunk and a horizontal sum per step; at the short sequences of images
// (17-200 tokens) that overhead is most of its time. Here a SIMD vector holds W consecutive channels of one
// batch row, every operand of a step is a contiguous row (u, delta, z, out) or a broadcast scalar (B_t[n],
// C_t[n], shared by the channels of a group), the output needs no horizontal sum, and nothing is padded in time.
// It reads the Vim block's activations in place (no transposes).
//
// Builds: 8 floats / 4 doubles a vector (base and avx2+fma, like the other kernels) and 16 floats (avx512f), picked
// by isa() ("avx512" where the CPU has it); the same operations per lane, so all builds agree to rounding order.
// Units: (batch row, block of W channels); channels are padded per group to a multiple of W by the entry point
// (zero u / delta / z / A / D: the padded lanes keep h = 0 and contribute nothing). Forward saves the state at
// the start of each chunk: chunk_states (batch, nchunks, N, dim_padded). Backward walks a unit's chunks last
// first, recomputes the chunk's states and decays into scratch, then runs the adjoint back through it. dB / dC
// (sums over the channels of a group) are formed per unit as vectors, reduced over the lanes once per chunk
// (a transposing sum tree), and added into the output rows of every (batch, group) the task owns entirely, or
// into a private buffer for a group shared with the neighbouring task (added in task order afterwards, as in
// the channel-major kernel: deterministic for a fixed thread count). dA, dD, dbias: per-channel fp64 partials.
// No (batch, dim, L, N) tensor is formed.

#pragma once

#include <mutex>

#include "common.h"

namespace hiss {

template <typename T>
struct ScanTMArgs {
  int64_t batch = 0, L = 0, dim = 0, N = 0, G = 0, dpg = 0, chunk = 0, nchunks = 0, ncb = 0;
  bool softplus = false;
  const T *u = nullptr, *delta = nullptr, *z = nullptr, *At = nullptr /* (N, dim) */, *B = nullptr, *C = nullptr;
  const T *D = nullptr, *bias = nullptr, *h0 = nullptr /* (batch, N, dim) */;
  T *out = nullptr, *last = nullptr /* (batch, N, dim) */, *cst = nullptr /* (batch, nchunks, N, dim) */;
  const T *dout = nullptr, *dlast = nullptr;
  T *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dinit = nullptr, *dB = nullptr, *dC = nullptr;
  double *dA_c = nullptr /* (batch, N, dim) */, *dD_c = nullptr, *dbias_c = nullptr /* (batch, dim) */;
  std::vector<BwdPartial<T>>* partials = nullptr;
  std::mutex* mu = nullptr;
};

// out[k] = the sum of the lanes of vector k of v (n vectors stored one after another, unaligned), k < n: a
// transposing tree for 8 floats (2.6 ops a sum, not 5).
HISS_INLINE void lane_sums(const float* v, int n, float* out) {
  int k = 0;
  for (; k + 8 <= n; k += 8) {
    v8f p[4], q[2];
    for (int i = 0; i < 4; ++i) {
      const v8f a = vload<v8f>(v + (k + 2 * i) * 8), b = vload<v8f>(v + (k + 2 * i + 1) * 8);
      p[i] = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
    }
    for (int i = 0; i < 2; ++i)
      q[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(p[2 * i], p[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    const v8f r = __builtin_shufflevector(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
    vstore(out + k, r);
  }
  for (; k < n; ++k) out[k] = hsum(vload<v8f>(v + k * 8));
}
HISS_INLINE void lane_sums(const double* v, int n, double* out) {
  for (int k = 0; k < n; ++k) out[k] = hsum(vload<v4d>(v + k * 4));
}
// The same for 16 floats: four levels of (shuffle, shuffle, add), 2.8 ops a sum.
HISS_INLINE v16f sum_pairs16(v16f a, v16f b) {  // -> [a01, b01, a23, b23, ..., aEF, bEF]
  return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
HISS_INLINE void lane_sums16(const float* v, int n, float* out) {
  int k = 0;
  for (; k + 16 <= n; k += 16) {
    v16f p[8], q[4], r[2];
    for (int i = 0; i < 8; ++i) p[i] = sum_pairs16(vload<v16f>(v + (k + 2 * i) * 16), vload<v16f>(v + (k + 2 * i + 1) * 16));
    for (int i = 0; i < 4; ++i)  // -> sums of 4: [a0123, b0123, c0123, d0123, a4567, ...]
      q[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
             __builtin_shufflevector(p[2 * i], p[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    for (int i = 0; i < 2; ++i)  // -> sums of 8: [a0-7, ..., h0-7, a8-F, ..., h8-F]
      r[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
             __builtin_shufflevector(q[2 * i], q[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    vstore(out + k, v16f(__builtin_shufflevector(r[0], r[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                         __builtin_shufflevector(r[0], r[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)));
  }
  for (; k < n; ++k) out[k] = hsum(vload<v16f>(v + k * 16));
}
// V: the vector type of the build
template <typename V, typename T>
HISS_INLINE void lane_sums_of(const T* v, int n, T* out) {
  if constexpr (sizeof(V) / sizeof(T) == 16)
    lane_sums16(v, n, out);
  else
    lane_sums(v, n, out);
}

// dst[l] += src[l] in fp64, l < W (the per-channel partials of dA, dD, dbias)
template <typename T>
HISS_INLINE void add_f64(double* __restrict__ dst, const T* __restrict__ src, int W) {
  for (int l = 0; l < W; ++l) dst[l] += (double)src[l];
}

// dt and dt*u of one row of W channels (softplus of delta + bias when asked).
template <typename V>
HISS_INLINE void tm_discretize(bool sp, V xd, V uu, V& dt, V& dtu) {
  dt = sp ? vsoftplus(xd) : xd;
  dtu = dt * uu;
}

template <typename T, int NS, typename V>
HISS_INLINE void tm_fwd_units(const ScanTMArgs<T>& a, int64_t q0, int64_t q1) {
  constexpr int W = sizeof(V) / sizeof(T);
  const int N = NS > 0 ? NS : (int)a.N;
  const int64_t L = a.L, dim = a.dim, G = a.G;
  const bool sp = a.softplus;
  std::vector<T> hbuf((size_t)(N * W)), abuf((size_t)(N * W));
  T *hm = hbuf.data(), *Am = abuf.data();
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t b = q / a.ncb, c0 = (q % a.ncb) * W, g = c0 / a.dpg;
    for (int n = 0; n < N; ++n) {
      vstore(hm + n * W, a.h0 ? vload<V>(a.h0 + (b * N + n) * dim + c0) : V{});
      vstore(Am + n * W, vload<V>(a.At + n * dim + c0));
    }
    const V biasv = a.bias ? vload<V>(a.bias + c0) : V{}, Dv = a.D ? vload<V>(a.D + c0) : V{};
    V hl[NS > 0 ? NS : 1];  // the states in registers when N is known (16: 16 of AVX-512's 32 registers)
    if (NS > 0)
      for (int n = 0; n < N; ++n) hl[n] = vload<V>(hm + n * W);
    for (int64_t t = 0; t < L; ++t) {
      if (t % a.chunk == 0) {
        T* cs = a.cst + ((b * a.nchunks + t / a.chunk) * N) * dim + c0;
        for (int n = 0; n < N; ++n) vstore(cs + n * dim, NS > 0 ? hl[n] : vload<V>(hm + n * W));
      }
      const int64_t row = (b * L + t) * dim + c0;
      const V uu = vload<V>(a.u + row);
      V dt, dtu;
      tm_discretize(sp, vload<V>(a.delta + row) + biasv, uu, dt, dtu);
      const T* Bt = a.B + ((b * L + t) * G + g) * N;
      const T* Ct = a.C + ((b * L + t) * G + g) * N;
      V ys2[2] = {Dv * uu, V{}};  // two sums over n: half the dependent chain
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        V h = NS > 0 ? hl[n] : vload<V>(hm + n * W);
        const V dA = vexp(dt * vload<V>(Am + n * W));
        h = dA * h + dtu * splat<V>(Bt[n]);
        ys2[n & 1] += splat<V>(Ct[n]) * h;
        if (NS > 0)
          hl[n] = h;
        else
          vstore(hm + n * W, h);
      }
      V y = ys2[0] + ys2[1];
      if (a.z) {
        const V zz = vload<V>(a.z + row);
        y = y * (zz * vsigmoid(zz));
      }
      vstore(a.out + row, y);
    }
    for (int n = 0; n < N; ++n) vstore(a.last + (b * N + n) * dim + c0, NS > 0 ? hl[n] : vload<V>(hm + n * W));
  }
}

template <typename T, int NS, typename V>
HISS_INLINE void tm_bwd_units(const ScanTMArgs<T>& a, int64_t q0, int64_t q1) {
  constexpr int W = sizeof(V) / sizeof(T);
  const int N = NS > 0 ? NS : (int)a.N;
  const int64_t L = a.L, dim = a.dim, G = a.G, K = a.chunk, upg = a.dpg / W;  // units per group
  const bool sp = a.softplus;

  // dB / dC targets per (batch, group) this range touches: the output rows (row stride G N) when the range owns
  // every unit of the group, else a private (L, N) buffer
  BwdTargets<T> tg(q0, q1, upg, L, N, G * N, [&](int64_t bg) {
    const int64_t off = ((bg / G) * L * G + bg % G) * N;
    return std::make_pair(a.dB + off, a.dC + off);
  });

  // scratch, in T (vload / vstore): states h_{t-1} at row i (K + 1 rows of N vectors), decays (K x N), the
  // chunk's dt, dt u, u, delta + bias and C.h rows (K vectors each), vector dB / dC terms (K x N), carries
  std::vector<T> buf((size_t)(W * ((K + 1) * N + 3 * K * N + 5 * K + 3 * N)));
  T* hs = buf.data();
  T* as = hs + (K + 1) * N * W;
  T* dBs = as + K * N * W;
  T* dCs = dBs + K * N * W;
  T *dts = dCs + K * N * W, *dtus = dts + K * W, *us = dtus + K * W, *xds = us + K * W, *ys = xds + K * W;
  T *gm = ys + K * W, *Am = gm + N * W, *dAm = Am + N * W;
  std::vector<T> sums((size_t)N);  // one row of dB or dC, summed over the lanes

  for (int64_t q = q0; q < q1; ++q) {
    const int64_t b = q / a.ncb, c0 = (q % a.ncb) * W, g = c0 / a.dpg, bg = b * G + g;
    T* const tb = tg.B[bg - tg.bg0];
    T* const tc = tg.C[bg - tg.bg0];
    const int64_t ts = tg.stride[bg - tg.bg0];
    for (int n = 0; n < N; ++n) {
      vstore(gm + n * W, a.dlast ? vload<V>(a.dlast + (b * N + n) * dim + c0) : V{});
      vstore(Am + n * W, vload<V>(a.At + n * dim + c0));
    }
    const V biasv = a.bias ? vload<V>(a.bias + c0) : V{}, Dv = a.D ? vload<V>(a.D + c0) : V{};
    V gl[NS > 0 ? NS : 1];  // the adjoint carries in registers when N is known
    if (NS > 0)
      for (int n = 0; n < N; ++n) gl[n] = vload<V>(gm + n * W);
    for (int64_t k = a.nchunks - 1; k >= 0; --k) {
      const int64_t t0 = k * K, len = std::min(K, L - t0);
      // 1. recompute the chunk's states and decays from the saved chunk-start state
      const T* cs = a.cst + ((b * a.nchunks + k) * N) * dim + c0;
      for (int n = 0; n < N; ++n) vstore(hs + n * W, vload<V>(cs + n * dim));
      for (int64_t i = 0; i < len; ++i) {
        const int64_t row = (b * L + t0 + i) * dim + c0;
        const V uu = vload<V>(a.u + row), xd = vload<V>(a.delta + row) + biasv;
        V dt, dtu;
        tm_discretize(sp, xd, uu, dt, dtu);
        vstore(dts + i * W, dt);
        vstore(dtus + i * W, dtu);
        vstore(us + i * W, uu);
        vstore(xds + i * W, xd);
        const T* Bt = a.B + ((b * L + t0 + i) * G + g) * N;
        const T* Ct = a.C + ((b * L + t0 + i) * G + g) * N;
        V y2[2] = {V{}, V{}};
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) {
          const V dA = vexp(dt * vload<V>(Am + n * W));
          const V h = dA * vload<V>(hs + (i * N + n) * W) + dtu * splat<V>(Bt[n]);
          vstore(as + (i * N + n) * W, dA);
          vstore(hs + ((i + 1) * N + n) * W, h);
          y2[n & 1] += splat<V>(Ct[n]) * h;
        }
        vstore(ys + i * W, y2[0] + y2[1]);
      }
      // 2. the adjoint back through the chunk
      V dDacc = {}, dbacc = {};
      for (int n = 0; n < N; ++n) vstore(dAm + n * W, V{});
      for (int64_t i = len - 1; i >= 0; --i) {
        const int64_t row = (b * L + t0 + i) * dim + c0;
        const V go = vload<V>(a.dout + row), uu = vload<V>(us + i * W);
        const V dt = vload<V>(dts + i * W), dtu = vload<V>(dtus + i * W);
        V dy = go;
        if (a.z) {
          const V zz = vload<V>(a.z + row), sg = vsigmoid(zz), one = splat<V>(1);
          const V yy = vload<V>(ys + i * W) + Dv * uu;
          vstore(a.dz + row, go * yy * (sg * (one + zz * (one - sg))));
          dy = go * (zz * sg);
        }
        dDacc += dy * uu;
        const T* Bt = a.B + ((b * L + t0 + i) * G + g) * N;
        const T* Ct = a.C + ((b * L + t0 + i) * G + g) * N;
        V gB2[2] = {V{}, V{}}, qa2[2] = {V{}, V{}};
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) {
          const int64_t o = (i * N + n) * W;
          V gn = (NS > 0 ? gl[n] : vload<V>(gm + n * W)) + dy * splat<V>(Ct[n]);
          vstore(dCs + o, dy * vload<V>(hs + o + N * W));
          vstore(dBs + o, gn * dtu);
          gB2[n & 1] += gn * splat<V>(Bt[n]);
          const V an = vload<V>(as + o);
          const V qn = gn * an * vload<V>(hs + o);
          vstore(dAm + n * W, vload<V>(dAm + n * W) + qn * dt);
          qa2[n & 1] += qn * vload<V>(Am + n * W);
          gn = an * gn;
          if (NS > 0)
            gl[n] = gn;
          else
            vstore(gm + n * W, gn);
        }
        const V gB = gB2[0] + gB2[1], qa = qa2[0] + qa2[1];
        vstore(a.du + row, dy * Dv + dt * gB);
        V ddt = qa + uu * gB;
        if (sp) ddt = ddt * vsoftplus_grad(vload<V>(xds + i * W));
        vstore(a.ddelta + row, ddt);
        dbacc += ddt;
      }
      // 3. flush: per-channel fp64 partials, dB / dC rows summed over the lanes
      for (int n = 0; n < N; ++n) add_f64(a.dA_c + (b * N + n) * dim + c0, dAm + n * W, W);
      T acc[W];
      vstore(acc, dDacc);
      add_f64(a.dD_c + b * dim + c0, acc, W);
      vstore(acc, dbacc);
      add_f64(a.dbias_c + b * dim + c0, acc, W);
      for (int64_t i = 0; i < len; ++i) {
        T* rb = tb + (t0 + i) * ts;
        T* rc = tc + (t0 + i) * ts;
        lane_sums_of<V>(dBs + i * N * W, N, sums.data());
        for (int n = 0; n < N; ++n) rb[n] += sums[n];
        lane_sums_of<V>(dCs + i * N * W, N, sums.data());
        for (int n = 0; n < N; ++n) rc[n] += sums[n];
      }
    }
    for (int n = 0; n < N; ++n) vstore(a.dinit + (b * N + n) * dim + c0, NS > 0 ? gl[n] : vload<V>(gm + n * W));
  }
  tg.hand_over(a.partials, a.mu);
}

// Wide: the 16-float build (run inside isa_avx512); doubles keep their 4-wide vectors.
template <bool Wide, typename T>
using TMVec = std::conditional_t<Wide && std::is_same<T, float>::value, v16f, typename VT<T>::V>;
template <bool Wide>
struct ScanTMFwd {
  template <typename T>
  static HISS_INLINE void run(const ScanTMArgs<T>& a, int64_t b, int64_t e) {
    if (a.N == 16)
      tm_fwd_units<T, 16, TMVec<Wide, T>>(a, b, e);
    else
      tm_fwd_units<T, 0, TMVec<Wide, T>>(a, b, e);
  }
};
template <bool Wide>
struct ScanTMBwd {
  template <typename T>
  static HISS_INLINE void run(const ScanTMArgs<T>& a, int64_t b, int64_t e) {
    if (a.N == 16)
      tm_bwd_units<T, 16, TMVec<Wide, T>>(a, b, e);
    else
      tm_bwd_units<T, 0, TMVec<Wide, T>>(a, b, e);
  }
};

// The build for this dtype and isa(), and its vector width (channels are padded per group to a multiple of it).
inline bool tm_wide(at::ScalarType st) { return HISS_HAVE_AVX2 && st == at::kFloat && isa() == "avx512"; }
inline int64_t tm_width(at::ScalarType st) { return tm_wide(st) ? 16 : simd_width(st); }
template <template <bool> class K, typename T>
RangeFnOf<ScanTMArgs<T>> tm_kernel(int64_t W) {
#if HISS_HAVE_AVX2
  if (std::is_same<T, float>::value && W == 16) return isa_avx512<K<true>, ScanTMArgs<T>>;
#endif
  return pick_isa<K<false>, ScanTMArgs<T>>();
}

// ---- entry points ------------------------------------------------------------------------------
// Inputs checked, channels padded per group to a multiple of W, A transposed to (N, dim_padded).
struct TMPrepared {
  int64_t batch = 0, L = 0, dim = 0, dimp = 0, N = 0, G = 1, dpg = 0, dpgp = 0, chunk = 0, nchunks = 0;
  int64_t W = 8;  // the vector width of the build, decided once per call (isa() may change between calls)
  at::Tensor u, delta, z, At, B, C, D, bias;
  // (batch, L, dim) -> (batch, L, dim_padded), each group's channels zero padded to dpgp
  at::Tensor pad_rows(const at::Tensor& x) const {
    if (dpgp == dpg) return x.contiguous();
    return at::constant_pad_nd(x.reshape({x.size(0), x.size(1), G, dpg}), {0, dpgp - dpg})
        .reshape({x.size(0), x.size(1), dimp});
  }
  at::Tensor unpad_rows(const at::Tensor& x) const {
    if (dpgp == dpg) return x;
    return x.reshape({x.size(0), x.size(1), G, dpgp}).narrow(3, 0, dpg).reshape({x.size(0), x.size(1), dim});
  }
  // (dim, ...) per-channel vectors / rows -> (dim_padded, ...)
  at::Tensor pad_channels(const at::Tensor& x) const {
    if (dpgp == dpg) return x.contiguous();
    auto s = x.sizes().vec();
    std::vector<int64_t> grouped = {G, dpg};
    grouped.insert(grouped.end(), s.begin() + 1, s.end());
    std::vector<int64_t> pad((size_t)(2 * (s.size() - 1)), 0);
    pad.push_back(0);
    pad.push_back(dpgp - dpg);
    std::vector<int64_t> flat = {dimp};
    flat.insert(flat.end(), s.begin() + 1, s.end());
    return at::constant_pad_nd(x.reshape(grouped), pad).reshape(flat).contiguous();
  }
  // a state (batch, dim, N) -> (batch, N, dim_padded), and back
  at::Tensor state_in(const at::Tensor& s) const {
    return pad_rows(s.transpose(1, 2).contiguous()).contiguous();
  }
  at::Tensor state_out(const at::Tensor& s) const { return unpad_rows(s).transpose(1, 2).contiguous(); }
};

inline TMPrepared tm_prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const c10::optional<at::Tensor>& D,
                             const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                             int64_t chunk) {
  TORCH_CHECK(u.dim() == 3, "scan_tm: u must be (batch, L, dim), got ", u.sizes());
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "scan_tm: float32 or float64 only, got ", st);
  TMPrepared p;
  p.batch = u.size(0);
  p.L = u.size(1);
  p.dim = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == p.dim, "scan_tm: A must be (dim, N) = (", p.dim, ", N), got ", A.sizes());
  p.N = A.size(1);
  TORCH_CHECK(B.dim() == 4 && C.dim() == 4, "scan_tm: B and C must be (batch, L, G, N)");
  p.G = B.size(2);
  TORCH_CHECK(p.G > 0 && p.dim % p.G == 0, "scan_tm: G must divide dim");
  for (const at::Tensor* X : {&B, &C})
    TORCH_CHECK(X->size(0) == p.batch && X->size(1) == p.L && X->size(2) == p.G && X->size(3) == p.N,
                "scan_tm: B/C must be (batch, L, G, N) = (", p.batch, ", ", p.L, ", ", p.G, ", ", p.N, "), got ",
                X->sizes());
  TORCH_CHECK(p.L > 0 && p.N > 0 && p.batch > 0 && p.dim > 0, "scan_tm: empty input");
  TORCH_CHECK(chunk > 0, "scan_tm: chunk must be positive");
  for (const at::Tensor* X : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(X->scalar_type() == st, "scan_tm: all inputs must share u's dtype ", st, ", got ", X->scalar_type());
    TORCH_CHECK(X->device().is_cpu(), "scan_tm: inputs must be CPU tensors");
  }
  TORCH_CHECK(delta.sizes() == u.sizes(), "scan_tm: delta must match u");
  p.W = tm_width(st);
  p.dpg = p.dim / p.G;
  p.dpgp = (p.dpg + p.W - 1) / p.W * p.W;
  p.dimp = p.G * p.dpgp;
  p.chunk = std::min(chunk, p.L);
  p.nchunks = (p.L + p.chunk - 1) / p.chunk;
  p.u = p.pad_rows(u);
  p.delta = p.pad_rows(delta);
  at::Tensor zc = opt_check(z, st, "z", u.sizes());
  if (zc.defined()) p.z = p.pad_rows(zc);
  p.At = p.pad_channels(A).t().contiguous();
  p.B = B.contiguous();
  p.C = C.contiguous();
  at::Tensor Dc = opt_check(D, st, "D", {p.dim}), bc = opt_check(bias, st, "delta_bias", {p.dim});
  if (Dc.defined()) p.D = p.pad_channels(Dc);
  if (bc.defined()) p.bias = p.pad_channels(bc);
  return p;
}

template <typename T>
ScanTMArgs<T> tm_args(const TMPrepared& p, bool softplus) {
  ScanTMArgs<T> a;
  a.batch = p.batch;
  a.L = p.L;
  a.dim = p.dimp;
  a.N = p.N;
  a.G = p.G;
  a.dpg = p.dpgp;
  a.chunk = p.chunk;
  a.nchunks = p.nchunks;
  a.ncb = p.dimp / p.W;
  a.softplus = softplus;
  a.u = p.u.data_ptr<T>();
  a.delta = p.delta.data_ptr<T>();
  a.z = p.z.defined() ? p.z.data_ptr<T>() : nullptr;
  a.At = p.At.data_ptr<T>();
  a.B = p.B.data_ptr<T>();
  a.C = p.C.data_ptr<T>();
  a.D = p.D.defined() ? p.D.data_ptr<T>() : nullptr;
  a.bias = p.bias.defined() ? p.bias.data_ptr<T>() : nullptr;
  return a;
}

inline at::Tensor tm_state(const c10::optional<at::Tensor>& s, const TMPrepared& p, at::ScalarType st,
                           const char* name) {
  if (!s.has_value() || !s->defined()) return at::Tensor();
  TORCH_CHECK(s->scalar_type() == st, name, ": dtype ", s->scalar_type(), " != ", st);
  TORCH_CHECK(s->dim() == 3 && s->size(0) == p.batch && s->size(1) == p.dim && s->size(2) == p.N, name,
              " must be (batch, dim, N) = (", p.batch, ", ", p.dim, ", ", p.N, "), got ", s->sizes());
  return p.state_in(*s);
}

// -> (out (batch, L, dim), last_state (batch, dim, N), chunk_states)
inline std::vector<at::Tensor> scan_tm_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                           const c10::optional<at::Tensor>& initial_state, int64_t chunk) {
  TMPrepared p = tm_prepare(u, delta, A, B, C, D, z, delta_bias, chunk);
  const auto st = u.scalar_type();
  at::Tensor h0 = tm_state(initial_state, p, st, "initial_state");
  auto opts = u.options();
  at::Tensor out = at::empty({p.batch, p.L, p.dimp}, opts);
  at::Tensor last = at::empty({p.batch, p.N, p.dimp}, opts);
  at::Tensor cst = at::empty({p.batch, p.nchunks, p.N, p.dimp}, opts);
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_scan_tm_fwd", [&] {
    ScanTMArgs<scalar_t> a = tm_args<scalar_t>(p, delta_softplus);
    a.h0 = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
    a.out = out.data_ptr<scalar_t>();
    a.last = last.data_ptr<scalar_t>();
    a.cst = cst.data_ptr<scalar_t>();
    const auto fn = tm_kernel<ScanTMFwd, scalar_t>(p.W);
    const int64_t units = p.batch * a.ncb;
    at::parallel_for(0, units, grain_of(units), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {p.unpad_rows(out).contiguous(), p.state_out(last), cst};
}

// -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)
inline std::vector<at::Tensor> scan_tm_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                           const at::Tensor& chunk_states, const at::Tensor& dout,
                                           const c10::optional<at::Tensor>& dlast_state, int64_t chunk) {
  TMPrepared p = tm_prepare(u, delta, A, B, C, D, z, delta_bias, chunk);
  const auto st = u.scalar_type();
  TORCH_CHECK(chunk_states.scalar_type() == st && chunk_states.dim() == 4 && chunk_states.size(0) == p.batch &&
                  chunk_states.size(1) == p.nchunks && chunk_states.size(2) == p.N &&
                  chunk_states.size(3) == p.dimp,
              "scan_tm: chunk_states ", chunk_states.sizes(), " does not match the inputs / chunk (expected (", p.batch,
              ", ", p.nchunks, ", ", p.N, ", ", p.dimp, "): pass fwd's third output and the same chunk, and keep the "
              "instruction set (set_isa) between forward and backward: its vector width sets the channel padding)");
  TORCH_CHECK(dout.scalar_type() == st && dout.sizes() == u.sizes(), "scan_tm: dout must match u");
  at::Tensor cst = chunk_states.contiguous(), go = p.pad_rows(dout);
  at::Tensor gl = tm_state(dlast_state, p, st, "dlast_state");
  auto opts = u.options(), dopts = u.options().dtype(at::kDouble);
  at::Tensor du = at::empty({p.batch, p.L, p.dimp}, opts), ddelta = at::empty({p.batch, p.L, p.dimp}, opts);
  at::Tensor dz = p.z.defined() ? at::empty({p.batch, p.L, p.dimp}, opts) : at::Tensor();
  at::Tensor dinit = at::empty({p.batch, p.N, p.dimp}, opts);
  at::Tensor dB = at::zeros({p.batch, p.L, p.G, p.N}, opts), dC = at::zeros({p.batch, p.L, p.G, p.N}, opts);
  at::Tensor dA_c = at::zeros({p.batch, p.N, p.dimp}, dopts);
  at::Tensor dD_c = at::zeros({p.batch, p.dimp}, dopts), dbias_c = at::zeros({p.batch, p.dimp}, dopts);
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_scan_tm_bwd", [&] {
    ScanTMArgs<scalar_t> a = tm_args<scalar_t>(p, delta_softplus);
    std::vector<BwdPartial<scalar_t>> partials;
    std::mutex mu;
    a.cst = cst.data_ptr<scalar_t>();
    a.dout = go.data_ptr<scalar_t>();
    a.dlast = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
    a.du = du.data_ptr<scalar_t>();
    a.ddelta = ddelta.data_ptr<scalar_t>();
    a.dz = dz.defined() ? dz.data_ptr<scalar_t>() : nullptr;
    a.dinit = dinit.data_ptr<scalar_t>();
    a.dB = dB.data_ptr<scalar_t>();
    a.dC = dC.data_ptr<scalar_t>();
    a.dA_c = dA_c.data_ptr<double>();
    a.dD_c = dD_c.data_ptr<double>();
    a.dbias_c = dbias_c.data_ptr<double>();
    a.partials = &partials;
    a.mu = &mu;
    const auto fn = tm_kernel<ScanTMBwd, scalar_t>(p.W);
    const int64_t units = p.batch * a.ncb;
    at::parallel_for(0, units, grain_of(units), [&](int64_t b, int64_t e) { fn(a, b, e); });
    // shared (batch, group) rows: add the private partials in task order (deterministic)
    std::sort(partials.begin(), partials.end(),
              [](const BwdPartial<scalar_t>& x, const BwdPartial<scalar_t>& y) { return x.begin < y.begin; });
    for (const auto& part : partials) {
      const int64_t b = part.bg / p.G, g = part.bg % p.G;
      for (int64_t t = 0; t < p.L; ++t)
        for (int64_t n = 0; n < p.N; ++n) {
          a.dB[((b * p.L + t) * p.G + g) * p.N + n] += part.dB[t * p.N + n];
          a.dC[((b * p.L + t) * p.G + g) * p.N + n] += part.dC[t * p.N + n];
        }
    }
  });
  const auto unpad_vec = [&](const at::Tensor& v) {  // (batch, dimp) fp64 partials -> (dim,) in st
    at::Tensor s = v.sum(0);
    if (p.dpgp != p.dpg) s = s.reshape({p.G, p.dpgp}).narrow(1, 0, p.dpg).reshape({p.dim});
    return s.to(st);
  };
  at::Tensor dA = dA_c.sum(0);  // (N, dimp)
  if (p.dpgp != p.dpg) dA = dA.reshape({p.N, p.G, p.dpgp}).narrow(2, 0, p.dpg).reshape({p.N, p.dim});
  return {p.unpad_rows(du).contiguous(),
          p.unpad_rows(ddelta).contiguous(),
          dA.t().contiguous().to(st),
          dB,
          dC,
          p.D.defined() ? unpad_vec(dD_c) : at::Tensor(),
          dz.defined() ? p.unpad_rows(dz).contiguous() : at::Tensor(),
          p.bias.defined() ? unpad_vec(dbias_c) : at::Tensor(),
          p.state_out(dinit)};
}

}  // namespace hiss
