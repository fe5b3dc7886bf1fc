// Mamba-1 selective scan, CPU forward + backward (hiss kernels).
//
//   dt_t  = softplus(delta_t + bias)            (when delta_softplus; torch's threshold 20)
//   h_t   = exp(dt_t A) * h_{t-1} + dt_t u_t B_t   (per batch b, channel d, state n)
//   y_t   = <C_t, h_t> + D u_t ;  y_t *= silu(z_t) when z is given
//
// Layout inside the kernel: u/delta/z/out (batch, dim, L); B/C are re-laid out by the entry points
// to (batch, G, L, Np) (time-major, N padded with zeros to a multiple of the SIMD width W) so the
// inner loop over the state dimension is unit-stride and whole vectors; A is padded to (dim, Np).
// Padded lanes carry A=0, B=C=0, h=0 and never leak into results.
//
// Parallelism: at::parallel_for over the batch*dim channels; each task owns a contiguous channel
// range and walks time in blocks of ~1024 steps (set_time_block), visiting every channel of its
// range inside a block: the block's B/C rows (and dB/dC rows in backward) stay in L2 while the
// channels of a group reuse them, and each channel reads its u/delta/z rows as contiguous runs.
// Per-channel carries (state in forward, adjoint in backward) live in a (range, Np) buffer.
//
// Forward saves only the state at the start of each chunk: chunk_states (batch, dim, nchunks, Np).
// Backward walks chunks in reverse; per channel it recomputes the chunk's states (and decays) from
// the saved chunk-start state into a (chunk+1, Np) scratch, then runs the adjoint recurrence back
// through the chunk.  Reductions:
//   * dA, dD, dbias: per-channel fp64 partials (batch, dim, ...) written without races, summed over
//     batch afterwards (deterministic).
//   * dB, dC (batch, G, L, Np): a task writes straight into the output rows of every (batch, group)
//     whose channels it owns entirely; for a group shared with another task (at most two per task,
//     at the ends of its range) it accumulates into a private (L, Np) buffer, and the buffers are
//     added in after the parallel region in task order (deterministic for a fixed thread count).
// No (batch, dim, L, N) tensor is ever formed.
//
// SIMD: GCC vector extensions (32-byte vectors: 8 floats / 4 doubles) with our own exp/softplus
// (Cephes-style range reduction + polynomial, ~1-2 ulp), compiled twice: for the baseline x86-64
// target and with target("avx2,fma"), picked at run time (set_isa() overrides, for tests); the time-major scan
// (scan_time_major_cpu.h) has a third, 16-wide target("avx512f") build. No
// -ffast-math: IEEE semantics are kept; only fp contraction (fma) is allowed.

#include <torch/extension.h>

#include <mutex>

#include "simd.h"
#include "common.h"
#include "causal_conv1d_cpu.h"
#include "conv_time_major_cpu.h"
#include "rms_norm_cpu.h"
#include "state_update_cpu.h"
#include "model_step_cpu.h"
#include "complex_scan_cpu.h"
#include "scan_time_major_cpu.h"

namespace hiss {

// ---- arguments ---------------------------------------------------------------------------------
template <typename T>
struct Args {
  int64_t batch = 0, dim = 0, L = 0, N = 0, Np = 0, G = 0, dpg = 0, chunk = 0, nchunks = 0, nv = 0, Tp = 0;
  int64_t kblock = 1;  // chunks per time block (loop order: block, channel, chunk)
  bool softplus = false;
  bool a_const = false;  // every row of A constant along N (Mamba-2 / SSD): exp(dt A) is one value per step
  const T *u = nullptr, *delta = nullptr, *A = nullptr, *B = nullptr, *C = nullptr, *D = nullptr;
  const T *z = nullptr, *bias = nullptr, *h0 = nullptr;
  T *out = nullptr, *last = nullptr, *cst = nullptr;
  // backward
  const T *dout = nullptr, *dlast = nullptr;
  T *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dinit = nullptr, *dB = nullptr, *dC = nullptr;
  double *dA_c = nullptr, *dD_c = nullptr, *dbias_c = nullptr;  // per channel (batch*dim[, Np])
  std::vector<BwdPartial<T>>* partials = nullptr;
  std::mutex* mu = nullptr;
};

// ---- forward -----------------------------------------------------------------------------------
// exp(dt_t * A0) for one chunk, vectorized over time (rows of A constant along N: one exp per step, the very
// value vexp would give on every lane)
template <typename T>
HISS_INLINE void decay_scalar(int64_t Tp, const T* dt, T A0, T* da) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  for (int64_t i = 0; i < Tp; i += W) vstore(da + i, vexp(vload<V>(dt + i) * A0));
}

template <typename T, int NV, bool AC>
HISS_INLINE void fwd_range_impl(const Args<T>& a, int64_t begin, int64_t end) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  constexpr bool S = NV > 0;
  const int nv = S ? NV : (int)a.nv;
  const int64_t Np = a.Np, L = a.L, Tp = a.Tp, nch = end - begin;
  // flags and pointers as locals: provably unchanged by the stores in the loops
  const bool sp = a.softplus;
  const T *const zp = a.z, *const Dp = a.D, *const biasp = a.bias;

  std::vector<T> hst((size_t)(nch * Np));
  for (int64_t c = begin; c < end; ++c) {
    T* h = hst.data() + (c - begin) * Np;
    if (a.h0)
      std::memcpy(h, a.h0 + c * Np, sizeof(T) * Np);
    else
      std::fill(h, h + Np, T(0));
  }
  std::vector<T> buf((size_t)(7 * Tp));
  T *xu = buf.data(), *xd = xu + Tp, *xz = xd + Tp, *dt = xz + Tp, *dtu = dt + Tp, *yb = dtu + Tp, *da = yb + Tp;

  for (int64_t kb = 0; kb < a.nchunks; kb += a.kblock) {  // time blocks
    const int64_t ke = std::min(a.nchunks, kb + a.kblock);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = kb; k < ke; ++k) {
        const int64_t t0 = k * a.chunk, len = std::min(a.chunk, L - t0);
        const int64_t d = c % a.dim, bg = c / a.dpg;
        T* hmem = hst.data() + (c - begin) * Np;
        std::memcpy(a.cst + (c * a.nchunks + k) * Np, hmem, sizeof(T) * Np);
        load_padded(xu, a.u + c * L + t0, len, Tp);
        load_padded(xd, a.delta + c * L + t0, len, Tp);
        discretize(Tp, sp, xd, xu, biasp ? biasp[d] : T(0), dt, dtu);

        const T* Ar = a.A + d * Np;
        if (AC) decay_scalar(Tp, dt, Ar[0], da);
        const T* Bt = a.B + (bg * L + t0) * Np;
        const T* Ct = a.C + (bg * L + t0) * Np;
        V hl[S ? NV : 1], Al[S ? NV : 1];
        if (S)
          for (int j = 0; j < nv; ++j) {
            hl[j] = vload<V>(hmem + j * W);
            Al[j] = vload<V>(Ar + j * W);
          }
        for (int64_t t = 0; t < len; ++t) {
          const V dtv = splat<V>(dt[t]), duv = splat<V>(dtu[t]);
          const V dAc = AC ? splat<V>(da[t]) : V{};
          V yacc = {};
          for (int j = 0; j < nv; ++j) {
            V hj = S ? hl[j] : vload<V>(hmem + j * W);
            V dA = AC ? dAc : vexp(dtv * (S ? Al[j] : vload<V>(Ar + j * W)));
            hj = dA * hj + duv * vload<V>(Bt + t * Np + j * W);
            yacc += vload<V>(Ct + t * Np + j * W) * hj;
            if (S)
              hl[j] = hj;
            else
              vstore(hmem + j * W, hj);
          }
          yb[t] = hsum(yacc);
        }
        if (S)
          for (int j = 0; j < nv; ++j) vstore(hmem + j * W, hl[j]);

        // y = (y + D u) * silu(z), vectorized over time
        const T Dd = Dp ? Dp[d] : T(0);
        if (zp) load_padded(xz, zp + c * L + t0, len, Tp);
        for (int64_t i = 0; i < Tp; i += W) {
          V y = vload<V>(yb + i) + Dd * vload<V>(xu + i);
          if (zp) {
            V zz = vload<V>(xz + i);
            y = y * (zz * vsigmoid(zz));
          }
          vstore(yb + i, y);
        }
        store_row(a.out + c * L + t0, yb, len);
      }
    }
  }
  std::memcpy(a.last + begin * Np, hst.data(), sizeof(T) * nch * Np);
}

// ---- backward ----------------------------------------------------------------------------------
template <typename T, int NV, bool AC>
HISS_INLINE void bwd_range_impl(const Args<T>& a, int64_t begin, int64_t end) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  constexpr bool S = NV > 0;
  const int nv = S ? NV : (int)a.nv;
  const int64_t Np = a.Np, L = a.L, Tp = a.Tp, nch = end - begin;
  // flags and pointers as locals: provably unchanged by the stores in the loops
  const bool sp = a.softplus;
  const T *const zp = a.z, *const Dp = a.D, *const biasp = a.bias;

  // dB/dC targets per (batch, group) touched by this range (rows of Np).
  BwdTargets<T> tg(begin, end, a.dpg, L, Np, Np, [&](int64_t bg) {
    return std::make_pair(a.dB + bg * L * Np, a.dC + bg * L * Np);
  });

  std::vector<T> gst((size_t)(nch * Np));  // adjoint carries dL/dh
  for (int64_t c = begin; c < end; ++c) {
    T* g = gst.data() + (c - begin) * Np;
    if (a.dlast)
      std::memcpy(g, a.dlast + c * Np, sizeof(T) * Np);
    else
      std::fill(g, g + Np, T(0));
  }
  std::vector<T> buf((size_t)(13 * Tp + (2 * Tp + 1) * Np));
  T *xu = buf.data(), *xd = xu + Tp, *xz = xd + Tp, *xo = xz + Tp, *dt = xo + Tp, *dtu = dt + Tp;
  T *yb = dtu + Tp, *dy = yb + Tp, *sgB = dy + Tp, *sqA = sgB + Tp, *o1 = sqA + Tp, *o2 = o1 + Tp;
  T* hs = o2 + Tp;       // (Tp + 1, Np): h_{t-1} at row t
  T* as = hs + (Tp + 1) * Np;  // (Tp, Np): exp(dt_t A)
  T* da = as + Tp * Np;        // (Tp): exp(dt_t A0) when A is constant along N

  for (int64_t kend = a.nchunks; kend > 0; kend -= a.kblock) {  // time blocks, last first
    const int64_t kb = std::max<int64_t>(0, kend - a.kblock);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = kend - 1; k >= kb; --k) {
        const int64_t t0 = k * a.chunk, len = std::min(a.chunk, L - t0);
        const int64_t d = c % a.dim, bg = c / a.dpg;
        const T bias = biasp ? biasp[d] : T(0);
        const T Dd = Dp ? Dp[d] : T(0);
        load_padded(xu, a.u + c * L + t0, len, Tp);
        load_padded(xd, a.delta + c * L + t0, len, Tp);
        load_padded(xo, a.dout + c * L + t0, len, Tp);
        if (zp) load_padded(xz, zp + c * L + t0, len, Tp);
        discretize(Tp, sp, xd, xu, bias, dt, dtu);

        const T* Ar = a.A + d * Np;
        if (AC) decay_scalar(Tp, dt, Ar[0], da);
        const T* Bt = a.B + (bg * L + t0) * Np;
        const T* Ct = a.C + (bg * L + t0) * Np;
        T* dBt = tg.B[bg - tg.bg0] + t0 * Np;
        T* dCt = tg.C[bg - tg.bg0] + t0 * Np;
        V Al[S ? NV : 1];
        if (S)
          for (int j = 0; j < nv; ++j) Al[j] = vload<V>(Ar + j * W);

        // 1. recompute the chunk's states from the saved chunk-start state
        std::memcpy(hs, a.cst + (c * a.nchunks + k) * Np, sizeof(T) * Np);
        {
          V hl[S ? NV : 1];
          if (S)
            for (int j = 0; j < nv; ++j) hl[j] = vload<V>(hs + j * W);
          for (int64_t t = 0; t < len; ++t) {
            const V dtv = splat<V>(dt[t]), duv = splat<V>(dtu[t]);
            const V dAc = AC ? splat<V>(da[t]) : V{};
            V yacc = {};
            for (int j = 0; j < nv; ++j) {
              V hj = S ? hl[j] : vload<V>(hs + t * Np + j * W);
              V dA = AC ? dAc : vexp(dtv * (S ? Al[j] : vload<V>(Ar + j * W)));
              hj = dA * hj + duv * vload<V>(Bt + t * Np + j * W);
              vstore(as + t * Np + j * W, dA);
              vstore(hs + (t + 1) * Np + j * W, hj);
              if (zp) yacc += vload<V>(Ct + t * Np + j * W) * hj;
              if (S) hl[j] = hj;
            }
            if (zp) yb[t] = hsum(yacc);
          }
        }

        // 2. output gate and skip, vectorized over time (padded lanes have dout = 0)
        {
          V dDacc = {};
          for (int64_t i = 0; i < Tp; i += W) {
            V go = vload<V>(xo + i), uu = vload<V>(xu + i);
            V g = go;
            if (zp) {
              V zz = vload<V>(xz + i), sg = vsigmoid(zz);
              V yy = vload<V>(yb + i) + Dd * uu;
              g = go * (zz * sg);
              V one = splat<V>(1);
              vstore(o1 + i, go * yy * (sg * (one + zz * (one - sg))));  // dz
            }
            vstore(dy + i, g);
            dDacc += g * uu;
          }
          if (zp) store_row(a.dz + c * L + t0, o1, len);
          if (Dp) a.dD_c[c] += (double)hsum(dDacc);
        }

        // 3. adjoint recurrence backward through the chunk
        {
          T* gmem = gst.data() + (c - begin) * Np;
          V gl[S ? NV : 1], dAl[S ? NV : 1];
          std::vector<T> dAdyn;  // dynamic-N accumulators (only when !S); plain T: no over-aligned allocs
          if (S) {
            for (int j = 0; j < nv; ++j) {
              gl[j] = vload<V>(gmem + j * W);
              dAl[j] = V{};
            }
          } else {
            dAdyn.assign((size_t)(nv * W), T(0));
          }
          for (int64_t t = len - 1; t >= 0; --t) {
            const V dyv = splat<V>(dy[t]), duv = splat<V>(dtu[t]), dtv = splat<V>(dt[t]);
            V vgb = {}, vqa = {};
            for (int j = 0; j < nv; ++j) {
              const int64_t o = t * Np + j * W;
              V gj = S ? gl[j] : vload<V>(gmem + j * W);
              V Aj = S ? Al[j] : vload<V>(Ar + j * W);
              gj += dyv * vload<V>(Ct + o);
              vstore(dCt + o, vload<V>(dCt + o) + dyv * vload<V>(hs + Np + o));
              vstore(dBt + o, vload<V>(dBt + o) + gj * duv);
              vgb += gj * vload<V>(Bt + o);
              V aj = vload<V>(as + o);
              V q = gj * aj * vload<V>(hs + o);
              if (S)
                dAl[j] += q * dtv;
              else
                vstore(dAdyn.data() + j * W, vload<V>(dAdyn.data() + j * W) + q * dtv);
              vqa += q * Aj;
              gj = aj * gj;
              if (S)
                gl[j] = gj;
              else
                vstore(gmem + j * W, gj);
            }
            sgB[t] = hsum(vgb);
            sqA[t] = hsum(vqa);
          }
          for (int64_t t = len; t < Tp; ++t) sgB[t] = sqA[t] = T(0);
          double* dAc = a.dA_c + c * Np;
          for (int j = 0; j < nv; ++j) {
            V v = S ? dAl[j] : vload<V>(dAdyn.data() + j * W);
            for (int l = 0; l < W; ++l) dAc[j * W + l] += (double)v[l];
            if (S) vstore(gmem + j * W, gl[j]);
          }
        }

        // 4. du, ddelta (through softplus), dbias, vectorized over time
        {
          V dbacc = {};
          for (int64_t i = 0; i < Tp; i += W) {
            V gb = vload<V>(sgB + i);
            V ddt = vload<V>(sqA + i) + vload<V>(xu + i) * gb;
            vstore(o1 + i, vload<V>(dy + i) * Dd + vload<V>(dt + i) * gb);
            if (sp) ddt = ddt * vsoftplus_grad(vload<V>(xd + i) + bias);
            vstore(o2 + i, ddt);
            dbacc += ddt;
          }
          store_row(a.du + c * L + t0, o1, len);
          store_row(a.ddelta + c * L + t0, o2, len);
          if (biasp) a.dbias_c[c] += (double)hsum(dbacc);
        }
      }
    }
  }
  std::memcpy(a.dinit + begin * Np, gst.data(), sizeof(T) * nch * Np);
  tg.hand_over(a.partials, a.mu);
}

// ---- ISA variants ------------------------------------------------------------------------------
template <typename T>
HISS_INLINE void fwd_range_nv(const Args<T>& a, int64_t b, int64_t e) {
  if (a.a_const) {  // Mamba-2 / SSD: a large N, one exp per step (the register-resident sizes don't apply)
    fwd_range_impl<T, 0, true>(a, b, e);
    return;
  }
  switch (a.nv) {
    case 1: fwd_range_impl<T, 1, false>(a, b, e); break;
    case 2: fwd_range_impl<T, 2, false>(a, b, e); break;
    case 4: fwd_range_impl<T, 4, false>(a, b, e); break;
    default: fwd_range_impl<T, 0, false>(a, b, e);
  }
}
template <typename T>
HISS_INLINE void bwd_range_nv(const Args<T>& a, int64_t b, int64_t e) {
  if (a.a_const) {
    bwd_range_impl<T, 0, true>(a, b, e);
    return;
  }
  switch (a.nv) {
    case 1: bwd_range_impl<T, 1, false>(a, b, e); break;
    case 2: bwd_range_impl<T, 2, false>(a, b, e); break;
    case 4: bwd_range_impl<T, 4, false>(a, b, e); break;
    default: bwd_range_impl<T, 0, false>(a, b, e);
  }
}

struct ScanFwd {
  template <typename T>
  static HISS_INLINE void run(const Args<T>& a, int64_t b, int64_t e) { fwd_range_nv<T>(a, b, e); }
};
struct ScanBwd {
  template <typename T>
  static HISS_INLINE void run(const Args<T>& a, int64_t b, int64_t e) { bwd_range_nv<T>(a, b, e); }
};

static std::string g_isa_request = "auto";
// Time steps per block: a task walks (block, channel, chunk), so a block's B/C rows (and dB/dC rows)
// stay in L2 while every channel of the task passes over them, and each channel reads its
// u/delta/z/dout rows as contiguous runs of up to this many steps.
static int64_t g_time_block = 1024;

int64_t time_block() { return g_time_block; }
void set_time_block(int64_t steps) {
  TORCH_CHECK(steps > 0, "set_time_block: steps must be positive");
  g_time_block = steps;
}

static bool cpu_has_avx2() {
#if HISS_HAVE_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static bool cpu_has_avx512() {
#if HISS_HAVE_AVX2
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

std::string isa() {
  if (g_isa_request == "base" || !cpu_has_avx2()) return "base";
  if (g_isa_request == "avx2" || !cpu_has_avx512()) return "avx2";
  return "avx512";
}

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "auto" || name == "base" || name == "avx2" || name == "avx512",
              "set_isa: expected auto, base, avx2 or avx512, got ", name);
  TORCH_CHECK(name != "avx2" || cpu_has_avx2(), "set_isa: this CPU lacks AVX2/FMA");
  TORCH_CHECK(name != "avx512" || cpu_has_avx512(), "set_isa: this CPU lacks AVX-512 (F, DQ)");
  g_isa_request = name;
}

// ---- entry points ------------------------------------------------------------------------------
struct Prepared : ScanPrepared {
  bool a_const = false;
};

static Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& bias, int64_t chunk) {
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, L)");
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "selective_scan_cpu: float32 or float64 only, got ", st);
  Prepared p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == p.dim, "A must be (dim, N)");
  p.N = A.size(1);
  TORCH_CHECK(B.dim() == 4 && C.dim() == 4, "B and C must be (batch, G, N, L)");
  p.G = B.size(1);
  TORCH_CHECK(p.G > 0 && p.dim % p.G == 0, "G must divide dim");
  for (const at::Tensor* X : {&B, &C})
    TORCH_CHECK(X->size(0) == p.batch && X->size(1) == p.G && X->size(2) == p.N && X->size(3) == p.L,
                "B/C must be (batch, G, N, L) = (", p.batch, ", ", p.G, ", ", p.N, ", ", p.L, "), got ", X->sizes());
  TORCH_CHECK(p.L > 0 && p.N > 0, "empty sequence or state");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  for (const at::Tensor* X : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(X->scalar_type() == st, "all inputs must share u's dtype ", st, ", got ", X->scalar_type());
    TORCH_CHECK(X->device().is_cpu(), "inputs must be CPU tensors");
  }
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta must match u");
  scan_chunking(p, u, delta, chunk);
  const int64_t W = simd_width(st);
  p.A = at::constant_pad_nd(A, {0, p.Np - p.N}).contiguous();
  // rows constant along N (SSD's A is one scalar per head, expanded): one exp(dt A) per step, not per state.
  // Only worth it beyond one vector of states; the results are identical either way.
  p.a_const = p.Np > W && p.N > 1 && A.eq(A.narrow(1, 0, 1)).all().item<bool>();
  // (batch, G, N, L) -> (batch, G, L, Np): time-major rows, zero padded state lanes.
  p.B = at::constant_pad_nd(B.transpose(2, 3), {0, p.Np - p.N}).contiguous();
  p.C = at::constant_pad_nd(C.transpose(2, 3), {0, p.Np - p.N}).contiguous();
  scan_optionals(p, D, z, bias);
  return p;
}

template <typename T>
static Args<T> make_args(const Prepared& p, bool softplus) {
  Args<T> a;
  scan_args<T>(a, p, softplus);
  a.nv = p.Np / VT<T>::W;
  a.a_const = p.a_const;
  a.kblock = std::max<int64_t>(1, g_time_block / std::max<int64_t>(1, p.chunk));
  return a;
}

static at::Tensor pad_state(const c10::optional<at::Tensor>& s, const Prepared& p, at::ScalarType st, const char* name) {
  if (!s.has_value() || !s->defined()) return at::Tensor();
  TORCH_CHECK(s->scalar_type() == st, name, ": dtype ", s->scalar_type(), " != ", st);
  TORCH_CHECK(s->dim() == 3 && s->size(0) == p.batch && s->size(1) == p.dim && s->size(2) == p.N, name,
              " must be (batch, dim, N)");
  return at::constant_pad_nd(*s, {0, p.Np - p.N}).contiguous();
}

std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                            bool delta_softplus, const c10::optional<at::Tensor>& initial_state, int64_t chunk) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, chunk);
  const auto st = u.scalar_type();
  at::Tensor h0 = pad_state(initial_state, p, st, "initial_state");
  auto opts = u.options().dtype(st);
  at::Tensor out = at::empty({p.batch, p.dim, p.L}, opts);
  at::Tensor last = at::empty({p.batch, p.dim, p.Np}, opts);
  at::Tensor cst = at::empty({p.batch, p.dim, p.nchunks, p.Np}, opts);
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_selective_scan_fwd", [&] {
    Args<scalar_t> a = make_args<scalar_t>(p, delta_softplus);
    a.h0 = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
    a.out = out.data_ptr<scalar_t>();
    a.last = last.data_ptr<scalar_t>();
    a.cst = cst.data_ptr<scalar_t>();
    const auto fn = pick_isa<ScanFwd, Args<scalar_t>>();
    at::parallel_for(0, p.batch * p.dim, grain_of(p.batch * p.dim), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {out, last.narrow(2, 0, p.N).contiguous(), cst};
}

std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                            bool delta_softplus, const at::Tensor& chunk_states, const at::Tensor& dout,
                            const c10::optional<at::Tensor>& dlast_state, int64_t chunk) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, chunk);
  const auto st = u.scalar_type();
  TORCH_CHECK(chunk_states.scalar_type() == st && chunk_states.dim() == 4 && chunk_states.size(0) == p.batch &&
                  chunk_states.size(1) == p.dim && chunk_states.size(2) == p.nchunks && chunk_states.size(3) == p.Np,
              "chunk_states does not match the inputs / chunk (pass fwd's third output and the same chunk)");
  const ScanGrads g(p, chunk_states, dout);
  at::Tensor gl = pad_state(dlast_state, p, st, "dlast_state");
  auto opts = u.options().dtype(st);
  auto dopts = u.options().dtype(at::kDouble);
  at::Tensor dinit = at::empty({p.batch, p.dim, p.Np}, opts);
  at::Tensor dB = at::zeros({p.batch, p.G, p.L, p.Np}, opts);
  at::Tensor dC = at::zeros({p.batch, p.G, p.L, p.Np}, opts);
  at::Tensor dA_c = at::zeros({p.batch, p.dim, p.Np}, dopts);
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_selective_scan_bwd", [&] {
    Args<scalar_t> a = make_args<scalar_t>(p, delta_softplus);
    std::vector<BwdPartial<scalar_t>> partials;
    std::mutex mu;
    g.bind<scalar_t>(a);
    a.dlast = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
    a.dinit = dinit.data_ptr<scalar_t>();
    a.dB = dB.data_ptr<scalar_t>();
    a.dC = dC.data_ptr<scalar_t>();
    a.dA_c = dA_c.data_ptr<double>();
    a.partials = &partials;
    a.mu = &mu;
    const auto fn = pick_isa<ScanBwd, Args<scalar_t>>();
    at::parallel_for(0, p.batch * p.dim, grain_of(p.batch * p.dim), [&](int64_t b, int64_t e) { fn(a, b, e); });
    // shared (batch, group) rows: add the private partials in task order (deterministic)
    std::sort(partials.begin(), partials.end(),
              [](const BwdPartial<scalar_t>& x, const BwdPartial<scalar_t>& y) { return x.begin < y.begin; });
    const int64_t n = p.L * p.Np;
    for (const auto& part : partials) {
      scalar_t* tb = a.dB + part.bg * n;
      scalar_t* tc = a.dC + part.bg * n;
      at::parallel_for(0, n, 4096, [&](int64_t b0, int64_t e0) {
        for (int64_t i = b0; i < e0; ++i) {
          tb[i] += part.dB[i];
          tc[i] += part.dC[i];
        }
      });
    }
  });
  at::Tensor dA = dA_c.sum(0).narrow(1, 0, p.N).to(st);
  at::Tensor dBo = dB.narrow(3, 0, p.N).transpose(2, 3).contiguous();
  at::Tensor dCo = dC.narrow(3, 0, p.N).transpose(2, 3).contiguous();
  return {g.du, g.ddelta, dA, dBo, dCo, g.dD(p), g.dz, g.dbias(p), dinit.narrow(2, 0, p.N).contiguous()};
}

// elementwise helpers exposed for accuracy tests: name in {exp, softplus, sigmoid, softplus_grad}
at::Tensor elementwise(const std::string& name, const at::Tensor& x_) {
  at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hiss_elementwise", [&] {
    typedef typename VT<scalar_t>::V V;
    constexpr int W = VT<scalar_t>::W;
    const int64_t n = x.numel();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t tmp[W];
    for (int64_t i = 0; i < n; i += W) {
      const int64_t m = std::min<int64_t>(W, n - i);
      for (int l = 0; l < W; ++l) tmp[l] = l < m ? xp[i + l] : scalar_t(0);
      V v = vload<V>(tmp), r;
      if (name == "exp")
        r = vexp(v);
      else if (name == "softplus")
        r = vsoftplus(v);
      else if (name == "sigmoid")
        r = vsigmoid(v);
      else if (name == "softplus_grad")
        r = vsoftplus_grad(v);
      else
        TORCH_CHECK(false, "elementwise: unknown ", name);
      vstore(tmp, r);
      for (int l = 0; l < m; ++l) yp[i + l] = tmp[l];
    }
  });
  return y;
}

}  // namespace hiss

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hiss CPU kernels: selective scan fwd + bwd (channel- and time-major), complex scan fwd + bwd, causal conv1d fwd + bwd + update (channel- and time-major), (gated) RMSNorm fwd + bwd, state update";
  m.def("fwd", &hiss::fwd, "selective scan forward -> (out, last_state, chunk_states)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("z") = py::none(), py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false,
        py::arg("initial_state") = py::none(), py::arg("chunk") = 64);
  m.def("bwd", &hiss::bwd,
        "selective scan backward -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("z") = py::none(), py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false,
        py::arg("chunk_states"), py::arg("dout"), py::arg("dlast_state") = py::none(), py::arg("chunk") = 64);
  m.def("scan_tm_fwd", &hiss::scan_tm_fwd,
        "time-major selective scan forward -> (out (batch, L, dim), last_state, chunk_states)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("z") = py::none(), py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false,
        py::arg("initial_state") = py::none(), py::arg("chunk") = 64);
  m.def("scan_tm_bwd", &hiss::scan_tm_bwd,
        "time-major selective scan backward -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("z") = py::none(), py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false,
        py::arg("chunk_states"), py::arg("dout"), py::arg("dlast_state") = py::none(), py::arg("chunk") = 64);
  m.def("complex_fwd", &hiss::complex_fwd,
        "complex diagonal scan forward -> (out, last_state (batch, dim, N, 2), chunk_states)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("z") = py::none(), py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false,
        py::arg("initial_state") = py::none(), py::arg("chunk") = 64);
  m.def("complex_bwd", &hiss::complex_bwd,
        "complex diagonal scan backward -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("z") = py::none(), py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false,
        py::arg("chunk_states"), py::arg("dout"), py::arg("dlast_state") = py::none(), py::arg("chunk") = 64);
  m.def("complex_sincos", &hiss::complex_sincos, "vector (sin x, cos x) of the complex scan (tests)");
  m.def("isa", &hiss::isa, "instruction set the kernels run with: 'avx512', 'avx2' or 'base'");
  m.def("set_isa", &hiss::set_isa, "force 'base', 'avx2' or 'avx512', or 'auto' (default: the best here)");
  m.def("time_block", &hiss::time_block, "time steps per loop block (tuning knob)");
  m.def("set_time_block", &hiss::set_time_block, "set time steps per loop block (results are identical)");
  m.def("elementwise", &hiss::elementwise, "vector exp/softplus/sigmoid/softplus_grad (tests)");
  m.def("state_update", &hiss::state_update, "decode-step state update in place -> out (batch, H, P)",
        py::arg("state"), py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D") = py::none(), py::arg("z") = py::none(), py::arg("dt_bias") = py::none(),
        py::arg("dt_softplus") = false);
  m.def("conv_fwd", &hiss::conv_fwd, "causal conv1d forward -> (out, final_states)", py::arg("x"),
        py::arg("weight"), py::arg("bias") = py::none(), py::arg("seq_idx") = py::none(),
        py::arg("initial_states") = py::none(), py::arg("silu") = false);
  m.def("conv_bwd", &hiss::conv_bwd, "causal conv1d backward -> (dx, dweight, dbias, dinitial_states)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("seq_idx"), py::arg("initial_states"),
        py::arg("silu"), py::arg("dout"), py::arg("dfinal_states") = py::none());
  m.def("conv_tm_fwd", &hiss::conv_tm_fwd, "time-major causal conv1d forward on the padded input -> out",
        py::arg("xp"), py::arg("wt"), py::arg("bias") = py::none(), py::arg("silu") = false);
  m.def("conv_tm_bwd", &hiss::conv_tm_bwd, "time-major causal conv1d backward -> (dxp, (dwt; dbias) partials)",
        py::arg("xp"), py::arg("wt"), py::arg("bias"), py::arg("silu"), py::arg("dout"));
  m.def("norm_fwd", &hiss::norm_fwd, "(gated) RMSNorm forward -> (out, 1/rms per row and group)", py::arg("x"),
        py::arg("z") = py::none(), py::arg("weight") = py::none(), py::arg("eps") = 1e-5, py::arg("size") = 0);
  m.def("norm_bwd", &hiss::norm_bwd, "(gated) RMSNorm backward -> (dx, dz, dweight partials)", py::arg("x"),
        py::arg("z"), py::arg("weight"), py::arg("size"), py::arg("r"), py::arg("dout"));
  m.def("conv_update", &hiss::conv_update, "causal conv1d decode step, state shifted in place -> out",
        py::arg("x"), py::arg("state"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("silu") = false);
  py::class_<hiss::DecodeModel>(m, "DecodeModel", "whole-model decode step (kernels/csrc/model_step_cpu.h)")
      .def(py::init<int64_t>(), py::arg("batch"))
      .def("set_io", &hiss::DecodeModel::set_io, py::arg("tensors"), py::arg("numbers"))
      .def("add_layer", &hiss::DecodeModel::add_layer, py::arg("kind"), py::arg("tensors"), py::arg("numbers"))
      .def("bind_state", &hiss::DecodeModel::bind_state, py::arg("layer"), py::arg("conv"), py::arg("ssm"))
      .def("embed", &hiss::DecodeModel::embed, py::arg("tokens"))
      .def("run_layers", &hiss::DecodeModel::run_layers, py::arg("begin"), py::arg("end"), py::arg("snapshots"))
      .def("residual", &hiss::DecodeModel::residual)
      .def("head", &hiss::DecodeModel::head, py::arg("n_last"))
      .def("forward", &hiss::DecodeModel::forward, py::arg("tokens"), py::arg("n_last"), py::arg("snapshots"))
      .def("restore", &hiss::DecodeModel::restore, py::arg("t"))
      .def("set_small_rows", &hiss::DecodeModel::set_small_rows, py::arg("rows"))
      .def("set_packed", &hiss::DecodeModel::set_packed, py::arg("layer"), py::arg("name"), py::arg("packed"))
      .def_property_readonly("small_rows", &hiss::DecodeModel::small_rows)
      .def_property_readonly("batch", &hiss::DecodeModel::batch)
      .def_property_readonly("num_layers", &hiss::DecodeModel::num_layers);
}
