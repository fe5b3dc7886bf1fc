// Complex diagonal scan (S4D / complex Mamba), CPU forward + backward (hiss kernels).
//
//   dt_t = softplus(delta_t + bias)                  (when delta_softplus; torch's threshold 20)
//   a_t  = exp(dt_t A) = exp(dt_t Ar) (cos(dt_t Ai) + i sin(dt_t Ai))      A = Ar + i Ai, complex (dim, N)
//   h_t  = a_t h_{t-1} + dt_t u_t B_t                 complex state (batch, dim, N)
//   y_t  = 2 Re <C_t, h_t> + D u_t ;  y_t *= silu(z_t) when z is given   (mamba_ssm: y.real * 2)
//
// B and C are each either time-invariant, (dim, N), or input-dependent, (batch, G, N, L). Complex
// numbers are planar inside the kernel: a real plane and an imaginary plane, each padded to Np (a
// multiple of the SIMD width W), so a complex multiply is four whole-vector FMAs with no shuffles.
// The entry points take PyTorch's view_as_real layout (..., 2) and re-lay it out: A -> (2, dim, Np),
// invariant B/C -> (2, dim, Np), variable B/C -> (2, batch, G, L, Np) (time-major rows).
//
// States are independent per n, so the kernel runs the state axis in blocks of at most 4 vectors
// (32 complex states in fp32) held in registers, one pass over a chunk's time steps per block; y and
// the per-step sums of backward are accumulated across blocks.
//
// Forward saves the complex state at each chunk start: chunk_states (batch, dim, nchunks, 2, Np).
// Backward walks chunks in reverse and, per state block, recomputes the chunk's states and decays
// from the saved chunk-start state into a (chunk + 1, 2, NB) scratch, then runs the adjoint
//   G_t = 2 g_t conj(C_t) + conj(a_{t+1}) G_{t+1}       (G: dL/dRe h + i dL/dIm h, PyTorch's convention)
//   dB_t += dt_t u_t G_t,  dC_t += 2 g_t conj(h_t),  dA += dt_t conj(X_t),  X_t = conj(G_t) a_t h_{t-1},
//   d(dt_t) = sum_n Re(X_t A) + u_t sum_n Re(conj(G_t) B_t),  dh_{-1} = conj(a_0) G_0.
// No (batch, dim, L, N) tensor is ever formed. Reductions: dA, invariant dB/dC, dD, dbias: per
// (batch, channel) fp64 partials summed over batch afterwards. Variable dB/dC (batch, G, L, Np):
// backward's tasks own whole (batch, group) units, so rows are accumulated without races (the price:
// with G = 1 the parallelism of backward is the batch).
//
// When dt_t equals dt_{t-1} (the LTI layer: Δ = softplus(bias) at every step) the decay is not
// recomputed; results are identical either way.
//
// sin/cos: Cephes-style, range reduction by pi/4 in three parts, accurate to ~1-2 ulp for |x| < 8192
// in fp32 (dt * Ai beyond that loses accuracy gradually); fp64 calls std::sin / std::cos per lane (fp64
// is for tests). Included from selective_scan_cpu.cpp (one translation unit).

#pragma once

#include "common.h"

namespace hiss {
namespace cplx {

// ---- sin / cos -----------------------------------------------------------------------------------
HISS_INLINE void vsincos(v8f x, v8f& s, v8f& c) {
  const v8f zero = {};
  const v8f ax = x < zero ? -x : x;
  v8i j = __builtin_convertvector(ax * 1.27323954473516268615f, v8i);  // |x| / (pi/4), truncated
  j = (j + 1) & ~1;                                                     // even: nearest multiple of pi/2
  const v8f y = __builtin_convertvector(j, v8f);
  v8f r = ax - y * 0.78515625f;  // pi/4 = DP1 + DP2 + DP3, DP1 and DP2 exact in few bits
  r = r - y * 2.4187564849853515625e-4f;
  r = r - y * 3.77489497744594108e-8f;
  const v8f z = r * r;
  v8f ps = splat<v8f>(-1.9515295891e-4f);
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  ps = ps * z * r + r;
  v8f pc = splat<v8f>(2.443315711809948e-5f);
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  pc = pc * z * z - 0.5f * z + 1.0f;
  const v8i q = (j >> 1) & 3;  // quadrant of |x|
  const v8i swap = (q & 1) != 0;
  v8f sa = swap ? pc : ps;
  v8f ca = swap ? ps : pc;
  sa = ((q & 2) != 0) ? -sa : sa;            // sin: quadrants 2, 3 negative
  ca = (((q + 1) & 2) != 0) ? -ca : ca;      // cos: quadrants 1, 2 negative
  s = x < zero ? -sa : sa;
  c = ca;
}

HISS_INLINE void vsincos(v4d x, v4d& s, v4d& c) {
  for (int l = 0; l < 4; ++l) {
    s[l] = std::sin(x[l]);
    c[l] = std::cos(x[l]);
  }
}

// ---- arguments -----------------------------------------------------------------------------------
template <typename T>
struct Args {
  int64_t batch = 0, dim = 0, L = 0, N = 0, Np = 0, G = 1, dpg = 1, chunk = 0, nchunks = 0, Tp = 0;
  bool softplus = false, b_var = false, c_var = false;
  // planes: X + plane * Xplane (plane 0 real, 1 imaginary)
  const T *u = nullptr, *delta = nullptr, *A = nullptr, *B = nullptr, *C = nullptr;
  int64_t Aplane = 0, Bplane = 0, Cplane = 0;
  const T *D = nullptr, *z = nullptr, *bias = nullptr, *h0 = nullptr;  // h0: (batch, dim, 2, Np)
  T *out = nullptr, *last = nullptr, *cst = nullptr;                  // last (batch, dim, 2, Np)
  // backward
  const T *dout = nullptr, *dlast = nullptr;
  T *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dh0 = nullptr;
  T *dBv = nullptr, *dCv = nullptr;                  // variable: like B / C
  double *dA_c = nullptr, *dB_c = nullptr, *dC_c = nullptr;  // (batch, dim, 2, Np) partials
  double *dD_c = nullptr, *dbias_c = nullptr;        // (batch, dim)

  // row of B / C for channel c at time t0, and the step between time rows (0: time-invariant)
  HISS_INLINE int64_t row(bool var, int64_t c, int64_t t0) const {
    return var ? ((c / dpg) * L + t0) * Np : (c % dim) * Np;
  }
};

// ---- one block of NB vectors of complex states -------------------------------------------------------
// A's block (planes Ar, Ai) into registers
template <typename V, int NB, typename T>
HISS_INLINE void load_A(const T* Ar, const T* Ai, V* Arl, V* Ail) {
  constexpr int W = sizeof(V) / sizeof(T);
  for (int j = 0; j < NB; ++j) {
    Arl[j] = vload<V>(Ar + j * W);
    Ail[j] = vload<V>(Ai + j * W);
  }
}

// the decay a = exp(dt A) = exp(dt Ar) (cos(dt Ai) + i sin(dt Ai)) of the block, dv = dt on every lane
template <typename V, int NB>
HISS_INLINE void decay(V dv, const V* Arl, const V* Ail, V* aR, V* aI) {
  for (int j = 0; j < NB; ++j) {
    V e = vexp(dv * Arl[j]), s, c;
    vsincos(dv * Ail[j], s, c);
    aR[j] = e * c;
    aI[j] = e * s;
  }
}

// h <- a h + dt u B for one vector of states (duv = dt u on every lane, B = br + i bi)
template <typename V>
HISS_INLINE void step(V aR, V aI, V duv, V br, V bi, V& hr, V& hi) {
  const V r = aR * hr - aI * hi + duv * br;
  const V i = aR * hi + aI * hr + duv * bi;
  hr = r;
  hi = i;
}

// ---- forward: one block of NB vectors of states over one chunk --------------------------------------
// h (2 planes of stride Np, offset to the block) updated in place; y[t] += 2 Re <C_t, h_t>.
template <typename T, int NB>
HISS_INLINE void fwd_block(int64_t len, const T* dt, const T* dtu, const T* Ar, const T* Ai,
                           const T* Br, const T* Bi, int64_t bts, const T* Cr, const T* Ci, int64_t cts, T* hr_m,
                           T* hi_m, T* y) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  V hr[NB], hi[NB], Arl[NB], Ail[NB], aR[NB], aI[NB];
  load_A<V, NB>(Ar, Ai, Arl, Ail);
  for (int j = 0; j < NB; ++j) {
    hr[j] = vload<V>(hr_m + j * W);
    hi[j] = vload<V>(hi_m + j * W);
  }
  T dprev = std::numeric_limits<T>::quiet_NaN();
  for (int64_t t = 0; t < len; ++t) {
    const T d = dt[t];
    if (!(d == dprev)) {  // LTI: the same Δ at every step, the same decay
      dprev = d;
      decay<V, NB>(splat<V>(d), Arl, Ail, aR, aI);
    }
    const V duv = splat<V>(dtu[t]);
    V yacc = {};
    for (int j = 0; j < NB; ++j) {
      const int64_t ob = t * bts + j * W, oc = t * cts + j * W;
      step(aR[j], aI[j], duv, vload<V>(Br + ob), vload<V>(Bi + ob), hr[j], hi[j]);
      yacc += vload<V>(Cr + oc) * hr[j] - vload<V>(Ci + oc) * hi[j];
    }
    y[t] += T(2) * hsum(yacc);
  }
  for (int j = 0; j < NB; ++j) {
    vstore(hr_m + j * W, hr[j]);
    vstore(hi_m + j * W, hi[j]);
  }
}

// Run CALL(NB) for each block of at most 4 vectors of states (off: the block's first state). A macro, not a
// lambda: a lambda is a function of its own and would not inherit the avx2 target of its caller.
#define HISS_FOR_STATE_BLOCKS(Np, W, CALL)                         \
  for (int64_t jb_ = 0; jb_ < (Np) / (W); jb_ += 4) {             \
    const int64_t off = jb_ * (W);                                \
    switch (std::min<int64_t>(4, (Np) / (W) - jb_)) {             \
      case 4: CALL(4); break;                                     \
      case 3: CALL(3); break;                                     \
      case 2: CALL(2); break;                                     \
      default: CALL(1); break;                                    \
    }                                                             \
  }

template <typename T>
HISS_INLINE void fwd_range(const Args<T>& a, int64_t begin, int64_t end) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  const int64_t Np = a.Np, L = a.L, Tp = a.Tp;
  std::vector<T> buf((size_t)(6 * Tp));
  T *xu = buf.data(), *xd = xu + Tp, *dt = xd + Tp, *dtu = dt + Tp, *yb = dtu + Tp, *xz = yb + Tp;
  std::vector<T> h((size_t)(2 * Np));
  for (int64_t c = begin; c < end; ++c) {
    const int64_t d = c % a.dim;
    if (a.h0)
      std::memcpy(h.data(), a.h0 + c * 2 * Np, sizeof(T) * 2 * Np);
    else
      std::fill(h.begin(), h.end(), T(0));
    for (int64_t k = 0; k < a.nchunks; ++k) {
      const int64_t t0 = k * a.chunk, len = std::min(a.chunk, L - t0);
      std::memcpy(a.cst + (c * a.nchunks + k) * 2 * Np, h.data(), sizeof(T) * 2 * Np);
      load_padded(xu, a.u + c * L + t0, len, Tp);
      load_padded(xd, a.delta + c * L + t0, len, Tp);
      discretize(Tp, a.softplus, xd, xu, a.bias ? a.bias[d] : T(0), dt, dtu);
      std::fill(yb, yb + Tp, T(0));
      const int64_t ob = a.row(a.b_var, c, t0), oc = a.row(a.c_var, c, t0);
      const int64_t bts = a.b_var ? Np : 0, cts = a.c_var ? Np : 0;
#define HISS_CALL(NB)                                                                                          \
  fwd_block<T, NB>(len, dt, dtu, a.A + d * Np + off, a.A + a.Aplane + d * Np + off, a.B + ob + off,                \
                   a.B + a.Bplane + ob + off, bts, a.C + oc + off, a.C + a.Cplane + oc + off, cts, h.data() + off, \
                   h.data() + Np + off, yb)
      HISS_FOR_STATE_BLOCKS(Np, W, HISS_CALL)
#undef HISS_CALL
      // skip and gate, vectorized over time
      const T Dd = a.D ? a.D[d] : T(0);
      if (a.z) load_padded(xz, a.z + c * L + t0, len, Tp);
      for (int64_t i = 0; i < Tp; i += W) {
        V y = vload<V>(yb + i) + Dd * vload<V>(xu + i);
        if (a.z) {
          V zz = vload<V>(xz + i);
          y = y * (zz * vsigmoid(zz));
        }
        vstore(yb + i, y);
      }
      store_row(a.out + c * L + t0, yb, len);
    }
    std::memcpy(a.last + c * 2 * Np, h.data(), sizeof(T) * 2 * Np);
  }
}

// ---- backward: one block of NB vectors over one chunk -------------------------------------------------
// hs: (len + 1) x 2 x NB*W scratch of recomputed states, as_: len x 2 x NB*W decays.
// g (2 planes, stride Np) is the adjoint carry, updated in place; sB[t] += sum Re(conj(G) B),
// sA[t] += sum Re(X A); dA / dB / dC accumulators in fp64 for this channel.
template <typename T, int NB>
HISS_INLINE void bwd_block(const Args<T>& a, int64_t c, int64_t k, int64_t len, const T* dt, const T* dtu,
                           const T* dy, int64_t off, T* hs, T* as_, T* sB, T* sA, T* yb, double* dA_acc,
                           double* dB_acc, double* dC_acc, T* gcar) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  constexpr int64_t NW = NB * W;
  const int64_t Np = a.Np, t0 = k * a.chunk, d = c % a.dim;
  const T *Ar = a.A + d * Np + off, *Ai = a.A + a.Aplane + d * Np + off;
  const int64_t ob = a.row(a.b_var, c, t0) + off, oc = a.row(a.c_var, c, t0) + off;
  const int64_t bts = a.b_var ? Np : 0, cts = a.c_var ? Np : 0;
  const T *Br = a.B + ob, *Bi = a.B + a.Bplane + ob, *Cr = a.C + oc, *Ci = a.C + a.Cplane + oc;
  V Arl[NB], Ail[NB];
  load_A<V, NB>(Ar, Ai, Arl, Ail);
  // 1. recompute states and decays of the chunk (and y for the gate's gradient)
  {
    const T* h0 = a.cst + (c * a.nchunks + k) * 2 * Np + off;
    V hr[NB], hi[NB], aR[NB], aI[NB];
    for (int j = 0; j < NB; ++j) {
      hr[j] = vload<V>(h0 + j * W);
      hi[j] = vload<V>(h0 + Np + j * W);
      vstore(hs + j * W, hr[j]);
      vstore(hs + NW + j * W, hi[j]);
    }
    T dprev = std::numeric_limits<T>::quiet_NaN();
    for (int64_t t = 0; t < len; ++t) {
      const T dd = dt[t];
      if (!(dd == dprev)) {
        dprev = dd;
        decay<V, NB>(splat<V>(dd), Arl, Ail, aR, aI);
      }
      const V duv = splat<V>(dtu[t]);
      V yacc = {};
      T* hn = hs + (t + 1) * 2 * NW;
      T* at = as_ + t * 2 * NW;
      for (int j = 0; j < NB; ++j) {
        const int64_t o_b = t * bts + j * W, o_c = t * cts + j * W;
        step(aR[j], aI[j], duv, vload<V>(Br + o_b), vload<V>(Bi + o_b), hr[j], hi[j]);
        vstore(hn + j * W, hr[j]);
        vstore(hn + NW + j * W, hi[j]);
        vstore(at + j * W, aR[j]);
        vstore(at + NW + j * W, aI[j]);
        if (a.z) yacc += vload<V>(Cr + o_c) * hr[j] - vload<V>(Ci + o_c) * hi[j];
      }
      if (a.z) yb[t] += T(2) * hsum(yacc);
    }
  }
  // 2. adjoint, back through the chunk
  V gr[NB], gi[NB], dAr[NB], dAi[NB], dBr[NB], dBi[NB], dCr[NB], dCi[NB];
  for (int j = 0; j < NB; ++j) {
    gr[j] = vload<V>(gcar + off + j * W);
    gi[j] = vload<V>(gcar + Np + off + j * W);
    dAr[j] = dAi[j] = dBr[j] = dBi[j] = dCr[j] = dCi[j] = V{};
  }
  T* dBvr = a.dBv ? a.dBv + ob : nullptr;
  T* dBvi = a.dBv ? a.dBv + a.Bplane + ob : nullptr;
  T* dCvr = a.dCv ? a.dCv + oc : nullptr;
  T* dCvi = a.dCv ? a.dCv + a.Cplane + oc : nullptr;
  for (int64_t t = len - 1; t >= 0; --t) {
    const V g2 = splat<V>(T(2) * dy[t]), duv = splat<V>(dtu[t]), dtv = splat<V>(dt[t]);
    const T* hn = hs + (t + 1) * 2 * NW;  // h_t
    const T* hp = hs + t * 2 * NW;        // h_{t-1}
    const T* at = as_ + t * 2 * NW;
    V vsB = {}, vsA = {};
    for (int j = 0; j < NB; ++j) {
      const int64_t o_b = t * bts + j * W, o_c = t * cts + j * W;
      const V cr = vload<V>(Cr + o_c), ci = vload<V>(Ci + o_c);
      gr[j] += g2 * cr;  // G_t = 2 g conj(C) + conj(a_{t+1}) G_{t+1}
      gi[j] -= g2 * ci;
      const V hr = vload<V>(hn + j * W), hi = vload<V>(hn + NW + j * W);
      const V ecr = g2 * hr, eci = -(g2 * hi);  // 2 g conj(h_t)
      const V ebr = duv * gr[j], ebi = duv * gi[j];
      if (a.c_var) {
        vstore(dCvr + o_c, vload<V>(dCvr + o_c) + ecr);
        vstore(dCvi + o_c, vload<V>(dCvi + o_c) + eci);
      } else {
        dCr[j] += ecr;
        dCi[j] += eci;
      }
      if (a.b_var) {
        vstore(dBvr + o_b, vload<V>(dBvr + o_b) + ebr);
        vstore(dBvi + o_b, vload<V>(dBvi + o_b) + ebi);
      } else {
        dBr[j] += ebr;
        dBi[j] += ebi;
      }
      vsB += gr[j] * vload<V>(Br + o_b) + gi[j] * vload<V>(Bi + o_b);
      const V aR = vload<V>(at + j * W), aI = vload<V>(at + NW + j * W);
      const V hpr = vload<V>(hp + j * W), hpi = vload<V>(hp + NW + j * W);
      const V pr = aR * hpr - aI * hpi, pi = aR * hpi + aI * hpr;  // a_t h_{t-1}
      const V xr = gr[j] * pr + gi[j] * pi, xi = gr[j] * pi - gi[j] * pr;  // X = conj(G) a h_{t-1}
      vsA += xr * Arl[j] - xi * Ail[j];
      dAr[j] += dtv * xr;  // dA += dt conj(X)
      dAi[j] -= dtv * xi;
      const V nr = aR * gr[j] + aI * gi[j], ni = aR * gi[j] - aI * gr[j];  // conj(a_t) G_t
      gr[j] = nr;
      gi[j] = ni;
    }
    sB[t] += hsum(vsB);
    sA[t] += hsum(vsA);
  }
  for (int j = 0; j < NB; ++j) {
    vstore(gcar + off + j * W, gr[j]);
    vstore(gcar + Np + off + j * W, gi[j]);
    for (int l = 0; l < W; ++l) {
      const int64_t n = off + j * W + l;
      dA_acc[n] += (double)dAr[j][l];
      dA_acc[Np + n] += (double)dAi[j][l];
      if (!a.b_var) {
        dB_acc[n] += (double)dBr[j][l];
        dB_acc[Np + n] += (double)dBi[j][l];
      }
      if (!a.c_var) {
        dC_acc[n] += (double)dCr[j][l];
        dC_acc[Np + n] += (double)dCi[j][l];
      }
    }
  }
}

template <typename T>
HISS_INLINE void bwd_range(const Args<T>& a, int64_t begin, int64_t end) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  const int64_t Np = a.Np, L = a.L, Tp = a.Tp, NWmax = 4 * W;
  std::vector<T> buf((size_t)(11 * Tp));
  T *xu = buf.data(), *xd = xu + Tp, *dt = xd + Tp, *dtu = dt + Tp, *yb = dtu + Tp, *xz = yb + Tp;
  T *xo = xz + Tp, *dy = xo + Tp, *sB = dy + Tp, *sA = sB + Tp, *o1 = sA + Tp;
  std::vector<T> hs((size_t)((a.chunk + 1) * 2 * NWmax)), as_((size_t)(a.chunk * 2 * NWmax));
  std::vector<T> g((size_t)(2 * Np));
  std::vector<double> dB_tmp, dC_tmp;
  for (int64_t c = begin; c < end; ++c) {
    const int64_t d = c % a.dim;
    if (a.dlast)
      std::memcpy(g.data(), a.dlast + c * 2 * Np, sizeof(T) * 2 * Np);
    else
      std::fill(g.begin(), g.end(), T(0));
    double* dA_acc = a.dA_c + c * 2 * Np;
    double* dB_acc = a.b_var ? nullptr : a.dB_c + c * 2 * Np;
    double* dC_acc = a.c_var ? nullptr : a.dC_c + c * 2 * Np;
    const T Dd = a.D ? a.D[d] : T(0), bias = a.bias ? a.bias[d] : T(0);
    double dD = 0, dbias = 0;
    for (int64_t k = a.nchunks - 1; k >= 0; --k) {
      const int64_t t0 = k * a.chunk, len = std::min(a.chunk, L - t0);
      load_padded(xu, a.u + c * L + t0, len, Tp);
      load_padded(xd, a.delta + c * L + t0, len, Tp);
      load_padded(xo, a.dout + c * L + t0, len, Tp);
      discretize(Tp, a.softplus, xd, xu, bias, dt, dtu);
      if (a.z) load_padded(xz, a.z + c * L + t0, len, Tp);
      // dy = dout * silu(z) (the gradient reaching 2 Re<C, h> + D u)
      for (int64_t i = 0; i < Tp; i += W) {
        V go = vload<V>(xo + i);
        if (a.z) {
          V zz = vload<V>(xz + i);
          go = go * (zz * vsigmoid(zz));
        }
        vstore(dy + i, go);
      }
      std::fill(yb, yb + Tp, T(0));
      std::fill(sB, sB + Tp, T(0));
      std::fill(sA, sA + Tp, T(0));
#define HISS_CALL(NB) \
  bwd_block<T, NB>(a, c, k, len, dt, dtu, dy, off, hs.data(), as_.data(), sB, sA, yb, dA_acc, dB_acc, dC_acc, g.data())
      HISS_FOR_STATE_BLOCKS(Np, W, HISS_CALL)
#undef HISS_CALL
      // per-step scalars, vectorized over time (padded lanes: dout = 0, u = 0)
      V vdD = {}, vdb = {};
      for (int64_t i = 0; i < Tp; i += W) {
        const V uu = vload<V>(xu + i), gy = vload<V>(dy + i), sb = vload<V>(sB + i), sa = vload<V>(sA + i);
        const V dtv = vload<V>(dt + i);
        vstore(o1 + i, dtv * sb + Dd * gy);          // du
        V ddt = sa + uu * sb;                         // d dt
        if (a.softplus) ddt = ddt * vsoftplus_grad(vload<V>(xd + i) + bias);
        vstore(sA + i, ddt);
        vdD += gy * uu;
        vdb += ddt;
        if (a.z) {
          const V zz = vload<V>(xz + i), sg = vsigmoid(zz), one = splat<V>(1);
          const V yy = vload<V>(yb + i) + Dd * uu;
          vstore(sB + i, vload<V>(xo + i) * yy * (sg * (one + zz * (one - sg))));  // dz
        }
      }
      store_row(a.du + c * L + t0, o1, len);
      store_row(a.ddelta + c * L + t0, sA, len);
      if (a.z) store_row(a.dz + c * L + t0, sB, len);
      dD += (double)hsum(vdD);
      dbias += (double)hsum(vdb);
    }
    std::memcpy(a.dh0 + c * 2 * Np, g.data(), sizeof(T) * 2 * Np);
    a.dD_c[c] = dD;
    a.dbias_c[c] = dbias;
  }
}

struct Fwd {
  template <typename T>
  static HISS_INLINE void run(const Args<T>& a, int64_t b, int64_t e) { fwd_range<T>(a, b, e); }
};
struct Bwd {
  template <typename T>
  static HISS_INLINE void run(const Args<T>& a, int64_t b, int64_t e) { bwd_range<T>(a, b, e); }
};

// ---- entry points ------------------------------------------------------------------------------------
struct Prepared : ScanPrepared {
  bool b_var = false, c_var = false;
};

// (..., N, 2) view_as_real -> (2, ..., Np) planes, zero padded
static at::Tensor planes(const at::Tensor& x, int64_t Np) {
  at::Tensor p = x.movedim(-1, 0);
  return at::constant_pad_nd(p, {0, Np - p.size(-1)}).contiguous();
}
// variable B/C (batch, G, N, L, 2) -> (2, batch, G, L, Np)
static at::Tensor var_planes(const at::Tensor& x, int64_t Np) {
  at::Tensor p = x.movedim(-1, 0).transpose(3, 4);
  return at::constant_pad_nd(p, {0, Np - p.size(-1)}).contiguous();
}

static Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& bias, int64_t chunk) {
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "complex_scan_cpu: float32 or float64 only, got ", st);
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u, delta must be (batch, dim, L)");
  Prepared p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.L = u.size(2);
  TORCH_CHECK(A.dim() == 3 && A.size(0) == p.dim && A.size(2) == 2, "A must be (dim, N, 2)");
  p.N = A.size(1);
  TORCH_CHECK(p.L > 0 && p.N > 0 && chunk > 0, "empty sequence / state or bad chunk");
  for (const at::Tensor* X : {&u, &delta, &A, &B, &C})
    TORCH_CHECK(X->scalar_type() == st && X->device().is_cpu(), "inputs must be CPU tensors of u's dtype");
  scan_chunking(p, u, delta, chunk);
  p.A = planes(A, p.Np);
  auto bc = [&](const at::Tensor& X, bool& var, const char* name) {
    if (X.dim() == 3) {
      TORCH_CHECK(X.size(0) == p.dim && X.size(1) == p.N && X.size(2) == 2, name, " must be (dim, N, 2)");
      var = false;
      return planes(X, p.Np);
    }
    TORCH_CHECK(X.dim() == 5 && X.size(0) == p.batch && X.size(2) == p.N && X.size(3) == p.L && X.size(4) == 2,
                name, " must be (dim, N, 2) or (batch, G, N, L, 2)");
    var = true;
    return var_planes(X, p.Np);
  };
  p.B = bc(B, p.b_var, "B");
  p.C = bc(C, p.c_var, "C");
  if (p.b_var) p.G = B.size(1);
  if (p.c_var) {
    TORCH_CHECK(!p.b_var || C.size(1) == p.G, "B and C must have the same number of groups");
    p.G = C.size(1);
  }
  TORCH_CHECK(p.dim % p.G == 0, "G must divide dim");
  scan_optionals(p, D, z, bias);
  return p;
}

template <typename T>
static Args<T> make_args(const Prepared& p, bool softplus) {
  Args<T> a;
  scan_args<T>(a, p, softplus);
  a.b_var = p.b_var;
  a.c_var = p.c_var;
  a.Aplane = p.A.numel() / 2;
  a.Bplane = p.B.numel() / 2;
  a.Cplane = p.C.numel() / 2;
  return a;
}

// state (batch, dim, N, 2) -> (batch, dim, 2, Np)
static at::Tensor state_in(const c10::optional<at::Tensor>& s, const Prepared& p, at::ScalarType st,
                           const char* name) {
  if (!s.has_value() || !s->defined()) return at::Tensor();
  TORCH_CHECK(s->scalar_type() == st && s->dim() == 4 && s->size(0) == p.batch && s->size(1) == p.dim &&
                  s->size(2) == p.N && s->size(3) == 2,
              name, " must be (batch, dim, N, 2) of u's dtype");
  return at::constant_pad_nd(s->transpose(2, 3), {0, p.Np - p.N}).contiguous();
}
static at::Tensor state_out(const at::Tensor& s, int64_t N) { return s.narrow(3, 0, N).transpose(2, 3).contiguous(); }

}  // namespace cplx

// -> (out (batch, dim, L), last_state (batch, dim, N, 2), chunk_states (batch, dim, nchunks, 2, Np))
std::vector<at::Tensor> complex_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                    bool delta_softplus, const c10::optional<at::Tensor>& initial_state,
                                    int64_t chunk) {
  using namespace cplx;
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, chunk);
  const auto st = u.scalar_type();
  at::Tensor h0 = state_in(initial_state, p, st, "initial_state");
  auto opts = u.options().dtype(st);
  at::Tensor out = at::empty({p.batch, p.dim, p.L}, opts);
  at::Tensor last = at::empty({p.batch, p.dim, 2, p.Np}, opts);
  at::Tensor cst = at::empty({p.batch, p.dim, p.nchunks, 2, p.Np}, opts);
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_complex_scan_fwd", [&] {
    Args<scalar_t> a = make_args<scalar_t>(p, delta_softplus);
    a.h0 = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
    a.out = out.data_ptr<scalar_t>();
    a.last = last.data_ptr<scalar_t>();
    a.cst = cst.data_ptr<scalar_t>();
    const auto fn = pick_isa<Fwd, Args<scalar_t>>();
    const int64_t n = p.batch * p.dim;
    at::parallel_for(0, n, grain_of(n), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {out, state_out(last, p.N), cst};
}

// -> (du, ddelta, dA (dim, N, 2), dB, dC (like B, C), dD, dz, dbias, dinitial_state (batch, dim, N, 2))
std::vector<at::Tensor> complex_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                    bool delta_softplus, const at::Tensor& chunk_states, const at::Tensor& dout,
                                    const c10::optional<at::Tensor>& dlast_state, int64_t chunk) {
  using namespace cplx;
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, chunk);
  const auto st = u.scalar_type();
  TORCH_CHECK(chunk_states.scalar_type() == st && chunk_states.dim() == 5 && chunk_states.size(0) == p.batch &&
                  chunk_states.size(1) == p.dim && chunk_states.size(2) == p.nchunks && chunk_states.size(3) == 2 &&
                  chunk_states.size(4) == p.Np,
              "chunk_states does not match the inputs / chunk (pass complex_fwd's third output and the same chunk)");
  const ScanGrads g(p, chunk_states, dout);
  at::Tensor gl = state_in(dlast_state, p, st, "dlast_state");
  auto opts = u.options().dtype(st);
  auto dopts = u.options().dtype(at::kDouble);
  at::Tensor dh0 = at::empty({p.batch, p.dim, 2, p.Np}, opts);
  at::Tensor dBv = p.b_var ? at::zeros_like(p.B) : at::Tensor();
  at::Tensor dCv = p.c_var ? at::zeros_like(p.C) : at::Tensor();
  at::Tensor dA_c = at::zeros({p.batch, p.dim, 2, p.Np}, dopts);
  at::Tensor dB_c = p.b_var ? at::Tensor() : at::zeros({p.batch, p.dim, 2, p.Np}, dopts);
  at::Tensor dC_c = p.c_var ? at::Tensor() : at::zeros({p.batch, p.dim, 2, p.Np}, dopts);
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_complex_scan_bwd", [&] {
    Args<scalar_t> a = make_args<scalar_t>(p, delta_softplus);
    g.bind<scalar_t>(a);
    a.dlast = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
    a.dh0 = dh0.data_ptr<scalar_t>();
    a.dBv = dBv.defined() ? dBv.data_ptr<scalar_t>() : nullptr;
    a.dCv = dCv.defined() ? dCv.data_ptr<scalar_t>() : nullptr;
    a.dA_c = dA_c.data_ptr<double>();
    a.dB_c = dB_c.defined() ? dB_c.data_ptr<double>() : nullptr;
    a.dC_c = dC_c.defined() ? dC_c.data_ptr<double>() : nullptr;
    const auto fn = pick_isa<Bwd, Args<scalar_t>>();
    // variable B/C: a task owns whole (batch, group) units, so their dB/dC rows have one writer
    const int64_t per = (p.b_var || p.c_var) ? p.dim / p.G : 1;
    const int64_t units = p.batch * p.dim / per;
    at::parallel_for(0, units, grain_of(units), [&](int64_t b, int64_t e) { fn(a, b * per, e * per); });
  });
  // (batch, dim, 2, Np) partials -> (dim, N, 2); planes -> the caller's (..., N[, L], 2) layouts
  auto inv = [&](const at::Tensor& c) { return c.sum(0).narrow(2, 0, p.N).transpose(1, 2).to(st).contiguous(); };
  auto var = [&](const at::Tensor& v) {  // (2, batch, G, L, Np) -> (batch, G, N, L, 2)
    return v.narrow(4, 0, p.N).transpose(3, 4).movedim(0, -1).contiguous();
  };
  at::Tensor dA = inv(dA_c);
  at::Tensor dB = p.b_var ? var(dBv) : inv(dB_c);
  at::Tensor dC = p.c_var ? var(dCv) : inv(dC_c);
  return {g.du, g.ddelta, dA, dB, dC, g.dD(p), g.dz, g.dbias(p), state_out(dh0, p.N)};
}

// vector sin / cos (accuracy tests): x -> (sin x, cos x)
std::vector<at::Tensor> complex_sincos(const at::Tensor& x_) {
  at::Tensor x = x_.contiguous();
  at::Tensor s = at::empty_like(x), c = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hiss_sincos", [&] {
    typedef typename VT<scalar_t>::V V;
    constexpr int W = VT<scalar_t>::W;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t *sp = s.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
    scalar_t tmp[W], ts[W], tc[W];
    for (int64_t i = 0; i < x.numel(); i += W) {
      const int64_t m = std::min<int64_t>(W, x.numel() - i);
      for (int l = 0; l < W; ++l) tmp[l] = l < m ? xp[i + l] : scalar_t(0);
      V vs, vc;
      cplx::vsincos(vload<V>(tmp), vs, vc);
      vstore(ts, vs);
      vstore(tc, vc);
      for (int l = 0; l < m; ++l) {
        sp[i + l] = ts[l];
        cp[i + l] = tc[l];
      }
    }
  });
  return {s, c};
}

}  // namespace hiss
