// The audio U-Net's recurrent step (apps/audio/model.py) in C++, with sampling: many samples per call.
//
// The network is handed over once (weights copied in), with the state after a prefill. Then
//   unet_run(prompt (B, L), T, ...) teacher-forces L tokens per row, then T times: draws the next token from the
//   row's logits (temperature / top-k / top-p, a per-row seeded generator), writes it out and feeds it back;
//   unet_step(tokens) is one teacher-forced step that also returns the logits (the reference path's building block).
// The maths is the Python step's: ssm_core's RMSNorm, Mamba decode step (conv update with SiLU, selective or LTI
// Δ/B/C, softplus(Δ + bias) with torch's threshold 20, exp(ΔA) state update, D skip, SiLU(z) gate), the gated
// MLP, DownPool / UpPool linears with the one-frame shift.
//
// Batch-major: a group of rows goes through each layer together, and every Linear is a small GEMM (register
// tiles of up to 4 rows x a few SIMD vectors of outputs, over the transposed weight), so a weight is read once
// per step for all rows of the group instead of once per row. Rows are independent (their own state, sampler and
// generator), so with threads > 1 the batch is split into groups that run all T steps without meeting.
// SIMD through GCC/Clang vector extensions (any target: the width follows the build flags, 4 floats without
// AVX), every per-row array zero-padded to a whole number of vectors so the loops have no tails; exp / log are
// Cephes' single-precision polynomials (~1 ulp), vectorised, since libm's are scalar without -ffast-math.
// A plain C ABI (called through ctypes, which releases the GIL), no torch headers. Checked against the Python
// step in tests/apps/audio.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <numeric>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__)
#define HISS_VW 16
#elif defined(__AVX__)
#define HISS_VW 8
#else
#define HISS_VW 4
#endif

namespace {

constexpr int kV = HISS_VW;  // floats per SIMD vector
typedef float vf __attribute__((vector_size(HISS_VW * 4)));
typedef int32_t vi __attribute__((vector_size(HISS_VW * 4)));

inline int padded(int n) { return (n + kV - 1) / kV * kV; }
inline vf ld(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

#if defined(__clang__)
inline vf vmax(vf a, vf b) { return select(a > b, a, b); }
inline vf vmin(vf a, vf b) { return select(a < b, a, b); }
#else  // GCC turns these into one max / min instruction (x86's maxps is exactly a > b ? a : b)
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
#endif

// Cephes expf for x <= 88.37 (callers clamp above when needed): x = n ln2 + r, |r| <= ln2 / 2, e^r by a
// degree-5 polynomial, 2^n through the exponent bits. n = round(x log2e) by adding and subtracting 1.5 * 2^23
// (exact in round-to-nearest; the sum's low mantissa bits are n), fewer instructions than floor.
inline vf vexp_le(vf x) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  x = vmax(x, splat(-87.33654475f));  // e^x stays a normal float; below, e^x < 1.2e-38 -> ~0
  const vf big = x * 1.44269504088896341f + magic;
  const vf t = big - magic;
  x = x - t * 0.693359375f;
  x = x - t * -2.12194440e-4f;
  const vf z = x * x;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  return y * (vf)(((vi)big + (127 - 0x4B400000)) << 23);
}
inline vf vexp(vf x) { return vexp_le(vmin(x, splat(88.0f))); }  // n <= 127: no overflow to inf

// Cephes logf for x >= the smallest normal float: x = m 2^e, m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial
inline vf vlog(vf x) {
  vi bits = (vi)x;
  vf e = __builtin_convertvector((bits >> 23) - 126, vf);
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e += __builtin_convertvector(small, vf);  // -1 where small
  m = m - 1.0f + select(small, m, vf{});
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y -= z * 0.5f;
  return m + y + e * 0.693359375f;
}

inline vf vsilu(vf v) { return v / (1.0f + vexp(-v)); }

// torch's softplus (threshold 20); log1p(u) = log(w) u / (w - 1) with w = 1 + u keeps small u accurate
inline vf vsoftplus(vf v) {
  const vf u = vexp(v);
  const vf w = u + 1.0f;
  const vi exact = w == 1.0f;
  const vf lp = select(exact, u, vlog(w) * u / select(exact, splat(1.0f), w - 1.0f));
  return select(v > 20.0f, v, lp);
}

template <class T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <class U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};
using fvec = std::vector<float, AlignedAlloc<float>>;

// Reads what apps/audio/fast.py packs: ints (sizes, flags) and floats (weights, state) in one agreed order;
// every float vector is preceded by its length in the ints.
struct Reader {
  const int64_t* ints;
  int64_t ni, pi = 0;
  const float* floats;
  int64_t nf, pf = 0;
  int64_t i() {
    if (pi >= ni) throw std::runtime_error("unet_step: ints exhausted");
    return ints[pi++];
  }
  std::vector<float> v() {
    const int64_t n = i();
    if (n < 0 || pf + n > nf) throw std::runtime_error("unet_step: floats exhausted");
    std::vector<float> out(floats + pf, floats + pf + n);
    pf += n;
    return out;
  }
  float f() { return v().at(0); }
};

// a padded copy: n values placed in groups of g, each group padded to gp (gp >= g)
fvec pad_copy(const std::vector<float>& x, int n, int g, int gp, int total) {
  fvec out(static_cast<size_t>(total), 0.f);
  for (int k = 0; k < n && k < static_cast<int>(x.size()); ++k) out[static_cast<size_t>(k / g) * gp + k % g] = x[k];
  return out;
}

// y = b + W x for a group of rows. Wt (in, outp): the transposed weight, zero-padded to whole vectors of
// outputs; inputs may be grouped (DownPool reads p padded frames), outputs too (UpPool writes p padded frames).
struct Linear {
  int in = 0, outp = 0;  // in: the (padded) input count the loop runs over
  fvec Wt, b;
  Linear() = default;
  // rows [o0, o0 + n) of W (out, in_real) row-major; input k -> (k / ig) igp + k % ig; output o -> likewise
  Linear(const std::vector<float>& W, const std::vector<float>& bias, int in_real, int o0, int n, int ig, int igp,
         int og, int ogp) {
    in = in_real / ig * igp;
    outp = padded(n / og * ogp);
    Wt.assign(static_cast<size_t>(in) * outp, 0.f);
    b.assign(static_cast<size_t>(outp), 0.f);
    for (int o = 0; o < n; ++o) {
      const int op = o / og * ogp + o % og;
      for (int k = 0; k < in_real; ++k)
        Wt[static_cast<size_t>(k / ig * igp + k % ig) * outp + op] = W[static_cast<size_t>(o0 + o) * in_real + k];
      if (!bias.empty()) b[op] = bias[o0 + o];
    }
  }

  // NR rows x NV vectors of outputs in registers, over the whole input
  template <int NR, int NV>
  static void tile(const float* __restrict w, int outp, int in, const float* __restrict X, int ldx,
                   const float* __restrict bias, float* __restrict Y, int ldy) {
    vf acc[NR][NV];
    for (int j = 0; j < NV; ++j) {
      const vf bj = ld(bias + j * kV);
      for (int r = 0; r < NR; ++r) acc[r][j] = bj;
    }
    for (int i = 0; i < in; ++i, w += outp) {
      vf wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = ld(w + j * kV);
      for (int r = 0; r < NR; ++r) {
        const float xr = X[static_cast<size_t>(r) * ldx + i];
        for (int j = 0; j < NV; ++j) acc[r][j] += wv[j] * xr;
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < NV; ++j) st(Y + static_cast<size_t>(r) * ldy + j * kV, acc[r][j]);
  }

  template <int NR>
  void tiles(int nv, int o, const float* X, int ldx, float* Y, int ldy) const {
    const float* w = Wt.data() + o;
    const float* bb = b.data() + o;
    switch (nv) {
      case 1: tile<NR, 1>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      case 2: tile<NR, 2>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      case 3: tile<NR, 3>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      case 4: tile<NR, 4>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      case 5: tile<NR, 5>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      case 6: tile<NR, 6>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      case 7: tile<NR, 7>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
      default: tile<NR, 8>(w, outp, in, X, ldx, bb, Y + o, ldy); break;
    }
  }

  // X (nr, ldx) -> Y (nr, ldy), all outp outputs (padding lanes come out 0)
  void apply(const float* X, int ldx, int nr, float* Y, int ldy) const {
    // accumulators per tile: 16 of the 32 vector registers with AVX-512, 8 of 16 otherwise
    constexpr int acc = kV == 16 ? 16 : 8;
    const int rows = std::min(nr, 4);
    const int nv_tile = std::min(8, acc / rows);
    const int nvec = outp / kV;
    // column blocks outer, rows inner: a block of the weight (in x nv_tile vectors) stays in L1/L2 while every
    // row reads it, so the weight comes from memory once per step
    for (int j = 0; j < nvec; j += nv_tile) {
      const int nv = std::min(nv_tile, nvec - j);
      const int o = j * kV;
      int r = 0;
      for (; r + 4 <= nr; r += 4) tiles<4>(nv, o, X + static_cast<size_t>(r) * ldx, ldx, Y + static_cast<size_t>(r) * ldy, ldy);
      switch (nr - r) {
        case 3: tiles<3>(nv, o, X + static_cast<size_t>(r) * ldx, ldx, Y + static_cast<size_t>(r) * ldy, ldy); break;
        case 2: tiles<2>(nv, o, X + static_cast<size_t>(r) * ldx, ldx, Y + static_cast<size_t>(r) * ldy, ldy); break;
        case 1: tiles<1>(nv, o, X + static_cast<size_t>(r) * ldx, ldx, Y + static_cast<size_t>(r) * ldy, ldy); break;
        default: break;
      }
    }
  }
};

Linear read_linear(Reader& r, int ig = 1, int igp = 1, int og = 1, int ogp = 1) {
  const int out = static_cast<int>(r.i()), in = static_cast<int>(r.i());
  std::vector<float> W = r.v(), b = r.v();
  if (static_cast<int64_t>(W.size()) != static_cast<int64_t>(out) * in) throw std::runtime_error("unet_step: bad Linear");
  return Linear(W, b, in, 0, out, ig, igp, og, ogp);
}

// a Linear whose output rows are split in two halves (in_proj -> x, z; the MLP's fc1 -> value, gate), so that
// each half starts on a vector boundary
void read_split(Reader& r, Linear& a, Linear& b, int& half) {
  const int out = static_cast<int>(r.i()), in = static_cast<int>(r.i());
  std::vector<float> W = r.v(), bias = r.v();
  if (static_cast<int64_t>(W.size()) != static_cast<int64_t>(out) * in || out % 2) throw std::runtime_error("unet_step: bad Linear");
  half = out / 2;
  a = Linear(W, bias, in, 0, half, 1, 1, 1, 1);
  b = Linear(W, bias, in, half, half, 1, 1, 1, 1);
}

// y = x / sqrt(mean(x^2) + eps) * w over the first n of x; x's padding lanes are 0 and w is zero-padded, so
// y's are 0 too
void rms_norm(const float* x, const fvec& w, float eps, int n, float* y) {
  const int np = static_cast<int>(w.size());
  vf acc{};
  for (int i = 0; i < np; i += kV) acc += ld(x + i) * ld(x + i);
  double ss = 0.0;
  for (int l = 0; l < kV; ++l) ss += acc[l];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int i = 0; i < np; i += kV) st(y + i, ld(x + i) * r * ld(w.data() + i));
}

// channel c, state n -> (c / kV, n, c % kV)
inline size_t ssm_index(int c, int n, int N) { return (static_cast<size_t>(c / kV) * N + n) * kV + c % kV; }

inline void add_into(float* x, const float* y, int np) {
  for (int i = 0; i < np; i += kV) st(x + i, ld(x + i) + ld(y + i));
}

struct Block {
  int D = 0, Dp = 0, Di = 0, Dip = 0, N = 0, R = 0, K = 0, DBCp = 0, Hp = 0;
  bool selective = true, mlp = false;
  float eps = 1e-5f, eps2 = 1e-5f;
  // conv_w (K, Dip) is stored transposed so the loops run over channels (SIMD); A and the SSM state as
  // (Dip / kV, N, kV): for each vector of channels its N state vectors are contiguous, so a row's state is read
  // and written as one sequential stream
  fvec norm_w, conv_w, conv_b, dt_bias, Bv, Cv, A, Dskip, norm2_w;
  Linear in_x, in_z, x_proj, dt_proj, out_proj, fc1v, fc1g, fc2;
  // state for every row of the batch: conv (batch, K-1, Dip), ssm (batch, Dip / kV, N, kV)
  fvec conv_state, ssm_state;

  // floats of scratch one row needs
  size_t scratch() const {
    size_t m = static_cast<size_t>(Dp) * 2 + static_cast<size_t>(Dip) * 5 + DBCp;
    if (mlp) m += 2 * static_cast<size_t>(Hp);
    return m;
  }

  // x (nr, Dp) of rows r0.. is updated in place: x += mixer(norm(x)) [+ mlp(norm2(x))]
  void step(int r0, int nr, float* x, float* s) {
    float* h = s;                                      // (nr, Dp)
    float* xin = h + static_cast<size_t>(nr) * Dp;     // (nr, Dip)
    float* z = xin + static_cast<size_t>(nr) * Dip;    // (nr, Dip)
    float* xc = z + static_cast<size_t>(nr) * Dip;     // (nr, Dip)
    float* dt = xc + static_cast<size_t>(nr) * Dip;    // (nr, Dip)
    float* y = dt + static_cast<size_t>(nr) * Dip;     // (nr, Dip)
    float* o = y + static_cast<size_t>(nr) * Dip;      // (nr, Dp)
    float* dbc = o + static_cast<size_t>(nr) * Dp;     // (nr, DBCp)
    float* u = dbc + static_cast<size_t>(nr) * DBCp;   // (nr, 2 Hp)
    for (int r = 0; r < nr; ++r) rms_norm(x + static_cast<size_t>(r) * Dp, norm_w, eps, D, h + static_cast<size_t>(r) * Dp);
    in_x.apply(h, Dp, nr, xin, Dip);
    in_z.apply(h, Dp, nr, z, Dip);
    const int Km = K - 1;
    for (int r = 0; r < nr; ++r) {
      float* cs = conv_state.data() + static_cast<size_t>(r0 + r) * Km * Dip;
      const float* xr = xin + static_cast<size_t>(r) * Dip;
      float* xcr = xc + static_cast<size_t>(r) * Dip;
      for (int c = 0; c < Dip; c += kV) {
        const vf xv = ld(xr + c);
        vf acc = ld(conv_b.data() + c) + ld(conv_w.data() + static_cast<size_t>(Km) * Dip + c) * xv;
        for (int k = 0; k < Km; ++k) acc += ld(conv_w.data() + static_cast<size_t>(k) * Dip + c) * ld(cs + static_cast<size_t>(k) * Dip + c);
        for (int k = 0; k + 1 < Km; ++k) st(cs + static_cast<size_t>(k) * Dip + c, ld(cs + static_cast<size_t>(k + 1) * Dip + c));
        if (Km > 0) st(cs + static_cast<size_t>(Km - 1) * Dip + c, xv);
        st(xcr + c, vsilu(acc));
      }
    }
    if (selective) {
      x_proj.apply(xc, Dip, nr, dbc, DBCp);
      dt_proj.apply(dbc, DBCp, nr, dt, Dip);  // reads the first R of dbc; dt_proj carries the dt bias
    } else {
      for (int r = 0; r < nr; ++r) std::copy(dt_bias.begin(), dt_bias.end(), dt + static_cast<size_t>(r) * Dip);
    }
    for (int r = 0; r < nr; ++r) {
      const float* B = selective ? dbc + static_cast<size_t>(r) * DBCp + R : Bv.data();
      const float* C = selective ? B + N : Cv.data();
      const float* xcr = xc + static_cast<size_t>(r) * Dip;
      const float* zr = z + static_cast<size_t>(r) * Dip;
      const float* dtr = dt + static_cast<size_t>(r) * Dip;
      float* yr = y + static_cast<size_t>(r) * Dip;
      float* ss = ssm_state.data() + static_cast<size_t>(r0 + r) * N * Dip;
      for (int c = 0; c < Dip; c += kV) {
        const vf d = vsoftplus(ld(dtr + c));
        const vf xv = ld(xcr + c);
        const vf dx = d * xv;
        vf acc{};
        float* sp = ss + static_cast<size_t>(c) * N;
        const float* ap = A.data() + static_cast<size_t>(c) * N;
        for (int n = 0; n < N; ++n, sp += kV, ap += kV) {
          const vf v = vexp_le(d * ld(ap)) * ld(sp) + dx * B[n];  // d A <= 0
          st(sp, v);
          acc += v * C[n];
        }
        st(yr + c, (acc + ld(Dskip.data() + c) * xv) * vsilu(ld(zr + c)));
      }
    }
    out_proj.apply(y, Dip, nr, o, Dp);
    for (int r = 0; r < nr; ++r) add_into(x + static_cast<size_t>(r) * Dp, o + static_cast<size_t>(r) * Dp, Dp);
    if (mlp) {
      float* g = u + static_cast<size_t>(nr) * Hp;
      for (int r = 0; r < nr; ++r) rms_norm(x + static_cast<size_t>(r) * Dp, norm2_w, eps2, D, h + static_cast<size_t>(r) * Dp);
      fc1v.apply(h, Dp, nr, u, Hp);
      fc1g.apply(h, Dp, nr, g, Hp);
      for (size_t i = 0; i < static_cast<size_t>(nr) * Hp; i += kV) st(u + i, ld(u + i) * vsilu(ld(g + i)));
      fc2.apply(u, Hp, nr, o, Dp);
      for (int r = 0; r < nr; ++r) add_into(x + static_cast<size_t>(r) * Dp, o + static_cast<size_t>(r) * Dp, Dp);
    }
  }
};

// ---- sampling ---------------------------------------------------------------------------------------------
// xoshiro256** (Blackman & Vigna 2018), one per batch row, seeded with splitmix64 from (seed, row): a row's
// draws depend on the seed and its index only, not on the batch size or the number of threads.
inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct Rng {
  uint64_t s[4];
  void seed(uint64_t seed, uint64_t row) {
    uint64_t x = seed;
    x = splitmix64(x) ^ (row * 0xd1b54a32d192ed03ull);
    for (auto& w : s) w = splitmix64(x);
  }
  static uint64_t rotl(uint64_t v, int k) { return (v << k) | (v >> (64 - k)); }
  uint64_t next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1), 53 bits
};

struct Sampling {
  float temperature = 1.f;
  int64_t top_k = 0;
  float top_p = 0.f;
};

// One token from logits (V) with ssm_core's sample_logits rules: temperature 0 or top_k 1 is argmax (the first
// maximum, as torch.argmax); else softmax(logits / temperature) restricted to the top_k largest logits and to
// the top-p nucleus (a token is dropped when the tokens ranked before it already hold top_p of the mass), and a
// draw by inversion. work: padded(V) + 2 V floats.
int64_t sample_row(const float* logits, int V, const Sampling& sp, Rng& rng, float* work) {
  int64_t best = 0;
  for (int i = 1; i < V; ++i)
    if (logits[i] > logits[best]) best = i;
  if (sp.temperature == 0.f || sp.top_k == 1) return best;
  const int Vp = padded(V);
  float* p = work;
  const float m = logits[best], inv = 1.f / sp.temperature;
  for (int i = 0; i < V; ++i) p[i] = (logits[i] - m) * inv;
  for (int i = V; i < Vp; ++i) p[i] = -100.f;
  for (int i = 0; i < Vp; i += kV) st(p + i, vexp(ld(p + i)));
  if (sp.top_k > 0 && sp.top_k < V) {
    float* tmp = work + Vp;  // scratch for the k-th largest logit
    std::copy(logits, logits + V, tmp);
    std::nth_element(tmp, tmp + (sp.top_k - 1), tmp + V, std::greater<float>());
    const float kth = tmp[sp.top_k - 1];
    for (int i = 0; i < V; ++i)
      if (logits[i] < kth) p[i] = 0.f;
  }
  double total = 0.0;
  for (int i = 0; i < V; ++i) total += p[i];
  if (sp.top_p > 0.f && sp.top_p < 1.f) {
    // A token below (1 - top_p) total / V has at least top_p of the mass ranked before it: dropped at once.
    // The rest are ranked by 64-bit keys (p's bits, which order like p >= 0, then the index, lower first) and
    // the nucleus found by a quickselect on mass (expected O(V), no full sort): split the candidates at a
    // pivot; if the higher part holds the mass still needed, every lower token is dropped, else every higher
    // token is kept.
    const double keep = static_cast<double>(sp.top_p) * total;
    const float floor_p = static_cast<float>((total - keep) / V * (1.0 - 1e-6));
    uint64_t* key = reinterpret_cast<uint64_t*>(work + Vp);
    auto index = [](uint64_t k) { return static_cast<int>(0xffffffffu - static_cast<uint32_t>(k)); };
    int n = 0;
    for (int i = 0; i < V; ++i) {
      if (p[i] > 0.f && p[i] >= floor_p) {
        uint32_t bits;
        std::memcpy(&bits, p + i, 4);
        key[n++] = (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
      } else {
        p[i] = 0.f;
      }
    }
    int lo = 0, hi = n;
    double before = 0.0;  // mass of the tokens kept so far, all ranked before [lo, hi)
    while (hi - lo > 16) {
      uint64_t a = key[lo], b = key[lo + (hi - lo) / 2], c = key[hi - 1];
      const uint64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
      uint64_t* mid = std::partition(key + lo, key + hi, [pivot](uint64_t k) { return k > pivot; });
      const int m = static_cast<int>(mid - key);
      double front = 0.0;
      for (int j = lo; j < m; ++j) front += p[index(key[j])];
      if (before + front >= keep) {
        for (int j = m; j < hi; ++j) p[index(key[j])] = 0.f;
        hi = m;
      } else {
        before += front;
        lo = m;
      }
    }
    std::sort(key + lo, key + hi, std::greater<uint64_t>());
    for (int j = lo; j < hi; ++j) {
      const int i = index(key[j]);
      if (before >= keep) p[i] = 0.f;
      else before += p[i];
    }
    total = before;
  }
  const double u = rng.uniform() * total;
  double acc = 0.0;
  int64_t last = best;
  for (int i = 0; i < V; ++i) {
    if (p[i] <= 0.f) continue;
    acc += p[i];
    last = i;
    if (u < acc) return i;
  }
  return last;  // u rounded up to the total
}

class UNetStep {
 public:
  // The layout fast.py packs (see its _pack): sizes, then embedding, final norm, head, pools, conditioning,
  // blocks in the model's blocks_in_order() order, each with its state, then the pooling buffers.
  explicit UNetStep(Reader& r) {
    S_ = static_cast<int>(r.i());
    batch_ = r.i();
    t_ = r.i();
    for (int s = 0; s <= S_; ++s) width_.push_back(static_cast<int>(r.i()));
    for (int s = 0; s < S_; ++s) pool_.push_back(static_cast<int>(r.i()));
    for (int w : width_) wp_.push_back(padded(w));
    down_.resize(S_);
    up_.resize(S_);
    cond_.resize(S_ + 1);
    const int W0 = width_[0];
    std::vector<float> emb = r.v();
    V_ = static_cast<int>(emb.size() / W0);
    emb_ = fvec(static_cast<size_t>(V_) * wp_[0], 0.f);
    for (int v = 0; v < V_; ++v) std::copy(emb.begin() + static_cast<size_t>(v) * W0, emb.begin() + static_cast<size_t>(v + 1) * W0, emb_.begin() + static_cast<size_t>(v) * wp_[0]);
    normf_ = pad_copy(r.v(), W0, W0, W0, wp_[0]);
    epsf_ = r.f();
    head_ = read_linear(r);
    if (head_.outp != padded(V_)) throw std::runtime_error("unet_step: head and embedding disagree on the vocabulary");
    Vp_ = head_.outp;
    for (int s = 0; s < S_; ++s) {
      const int W = width_[s], Wp = wp_[s], p = pool_[s];
      dpool_.push_back(read_linear(r, W, Wp, 1, 1));   // input: p frames of W, each padded to Wp
      upool_.push_back(read_linear(r, 1, 1, W, Wp));   // output: p frames of W, each padded to Wp
      if (dpool_.back().in != p * Wp || upool_.back().outp != p * Wp) throw std::runtime_error("unet_step: bad pooling layer");
    }
    for (int s = 0; s <= S_; ++s) {  // (batch, width) or empty
      std::vector<float> c = r.v();
      if (!c.empty()) cond_[s] = pad_copy(c, static_cast<int>(c.size()), width_[s], wp_[s], static_cast<int>(batch_) * wp_[s]);
    }
    const int64_t n_blocks = r.i();
    for (int64_t j = 0; j < n_blocks; ++j) {
      const int64_t where = r.i(), level = r.i();
      Block b;
      b.selective = r.i() != 0;
      b.mlp = r.i() != 0;
      b.D = static_cast<int>(r.i());
      b.Di = static_cast<int>(r.i());
      b.N = static_cast<int>(r.i());
      b.K = static_cast<int>(r.i());
      b.Dp = padded(b.D);
      b.Dip = padded(b.Di);
      const int Di = b.Di, Dip = b.Dip, N = b.N, K = b.K;
      if (b.D != width_[level] || K < 1) throw std::runtime_error("unet_step: block width does not match its level");
      b.norm_w = pad_copy(r.v(), b.D, b.D, b.D, b.Dp);
      b.eps = r.f();
      int half = 0;
      read_split(r, b.in_x, b.in_z, half);
      if (half != Di) throw std::runtime_error("unet_step: in_proj does not give 2 d_inner outputs");
      std::vector<float> cw = r.v();  // (Di, K)
      b.conv_w = fvec(static_cast<size_t>(K) * Dip, 0.f);
      for (int c = 0; c < Di; ++c)
        for (int k = 0; k < K; ++k) b.conv_w[static_cast<size_t>(k) * Dip + c] = cw.at(static_cast<size_t>(c) * K + k);
      b.conv_b = pad_copy(r.v(), Di, Di, Di, Dip);
      if (b.selective) {
        b.x_proj = read_linear(r);
        b.dt_proj = read_linear(r);
        b.R = b.dt_proj.in;
        b.DBCp = b.x_proj.outp;
        if (b.x_proj.outp < b.R + 2 * N || b.dt_proj.outp != Dip) throw std::runtime_error("unet_step: bad x_proj / dt_proj");
      } else {
        b.dt_bias = pad_copy(r.v(), Di, Di, Di, Dip);
        b.Bv = pad_copy(r.v(), N, N, N, N);
        b.Cv = pad_copy(r.v(), N, N, N, N);
      }
      std::vector<float> A = r.v();  // (Di, N)
      if (static_cast<int64_t>(A.size()) != static_cast<int64_t>(Di) * N) throw std::runtime_error("unet_step: bad A");
      b.A = fvec(static_cast<size_t>(N) * Dip, 0.f);
      for (int c = 0; c < Di; ++c)
        for (int n = 0; n < N; ++n) b.A[ssm_index(c, n, N)] = A[static_cast<size_t>(c) * N + n];
      b.Dskip = pad_copy(r.v(), Di, Di, Di, Dip);
      b.out_proj = read_linear(r);
      if (b.out_proj.outp != b.Dp) throw std::runtime_error("unet_step: bad out_proj");
      if (b.mlp) {
        b.norm2_w = pad_copy(r.v(), b.D, b.D, b.D, b.Dp);
        b.eps2 = r.f();
        int hid = 0;
        read_split(r, b.fc1v, b.fc1g, hid);
        b.Hp = padded(hid);
        b.fc2 = read_linear(r);
        if (b.fc2.in != hid || b.fc2.outp != b.Dp) throw std::runtime_error("unet_step: bad MLP");
      }
      std::vector<float> cs = r.v(), ss = r.v();  // (batch, Di, K-1), (batch, Di, N)
      if (static_cast<int64_t>(cs.size()) != batch_ * Di * (K - 1) || static_cast<int64_t>(ss.size()) != batch_ * Di * N)
        throw std::runtime_error("unet_step: state size does not match the batch");
      b.conv_state = fvec(static_cast<size_t>(batch_) * (K - 1) * Dip, 0.f);
      b.ssm_state = fvec(static_cast<size_t>(batch_) * N * Dip, 0.f);
      for (int64_t row = 0; row < batch_; ++row)
        for (int c = 0; c < Di; ++c) {
          for (int k = 0; k < K - 1; ++k)
            b.conv_state[(static_cast<size_t>(row) * (K - 1) + k) * Dip + c] = cs[(static_cast<size_t>(row) * Di + c) * (K - 1) + k];
          for (int n = 0; n < N; ++n)
            b.ssm_state[static_cast<size_t>(row) * N * Dip + ssm_index(c, n, N)] = ss[(static_cast<size_t>(row) * Di + c) * N + n];
        }
      scratch_ = std::max(scratch_, b.scratch());
      if (where == 0) down_[level].push_back(std::move(b));
      else if (where == 1) center_.push_back(std::move(b));
      else up_[level].push_back(std::move(b));
    }
    for (int s = 0; s < S_; ++s) {  // (batch, p, W) -> (batch, p, Wp)
      const int n = static_cast<int>(batch_) * pool_[s] * width_[s], total = static_cast<int>(batch_) * pool_[s] * wp_[s];
      buf_.push_back(pad_copy(r.v(), n, width_[s], wp_[s], total));
      pending_.push_back(pad_copy(r.v(), n, width_[s], wp_[s], total));
    }
    if (r.pi != r.ni || r.pf != r.nf) throw std::runtime_error("unet_step: unread data left (layout mismatch)");
    logits_ = fvec(static_cast<size_t>(batch_) * Vp_, 0.f);
    rng_.resize(static_cast<size_t>(batch_));
    seed(0);
  }

  int64_t position() const { return t_; }
  int64_t vocab() const { return V_; }
  void seed(uint64_t s) {
    for (int64_t b = 0; b < batch_; ++b) rng_[b].seed(s, static_cast<uint64_t>(b));
  }

  // Teacher-force forced (batch, L), then draw T tokens per row into out (batch, T), feeding each back (the
  // last one only if feed_last). Row groups run on up to `threads` OpenMP threads, all steps without meeting.
  // Returns 0; -1: a forced token outside the vocabulary; -2: T > 0 but no logits to sample from yet.
  int run(const int64_t* forced, int64_t L, int64_t T, const Sampling& sp, int64_t* out, bool feed_last, int threads) {
    for (int64_t i = 0; i < batch_ * L; ++i)
      if (forced[i] < 0 || forced[i] >= V_) return -1;
    if (T > 0 && L == 0 && !has_logits_) return -2;
    const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(threads, batch_));
    const int64_t t0 = t_;
    if (static_cast<int64_t>(works_.size()) != groups) {  // kept between calls: step() is called per sample
      works_.assign(static_cast<size_t>(groups), fvec());
      for (int64_t g = 0; g < groups; ++g) {
        const int nr = static_cast<int>(batch_ * (g + 1) / groups - batch_ * g / groups);
        works_[g].assign(work_size(nr) + Vp_ + 2 * static_cast<size_t>(V_), 0.f);
      }
    }
#pragma omp parallel for num_threads(static_cast<int>(groups)) schedule(static, 1) if (groups > 1)
    for (int64_t g = 0; g < groups; ++g) {
      const int r0 = static_cast<int>(batch_ * g / groups), r1 = static_cast<int>(batch_ * (g + 1) / groups);
      const int nr = r1 - r0;
      float* work = works_[g].data();  // the step's scratch, then the sampler's
      float* swork = work + work_size(nr);
      std::vector<int64_t> tok(static_cast<size_t>(nr));
      int64_t t = t0;
      for (int64_t l = 0; l < L; ++l) {
        for (int r = 0; r < nr; ++r) tok[r] = forced[(r0 + r) * L + l];
        group_step(r0, nr, tok.data(), t++, work);
      }
      for (int64_t i = 0; i < T; ++i) {
        for (int r = 0; r < nr; ++r) {
          tok[r] = sample_row(logits_.data() + static_cast<size_t>(r0 + r) * Vp_, V_, sp, rng_[r0 + r], swork);
          out[(r0 + r) * T + i] = tok[r];
        }
        if (i + 1 < T || feed_last) group_step(r0, nr, tok.data(), t++, work);
      }
    }
    const bool fed_all = T == 0 || feed_last;
    t_ += L + T - (fed_all ? 0 : 1);
    has_logits_ = fed_all && (L > 0 || T > 0 || has_logits_);
    return 0;
  }

  void copy_logits(float* out) const {
    for (int64_t b = 0; b < batch_; ++b) std::copy_n(logits_.data() + b * Vp_, V_, out + b * V_);
  }

  static int64_t sample_many(const float* logits, int V, int64_t n, const Sampling& sp, uint64_t seed, int64_t* out) {
    Rng rng;
    rng.seed(seed, 0);
    fvec work(static_cast<size_t>(padded(V) + 2 * V));
    for (int64_t i = 0; i < n; ++i) out[i] = sample_row(logits, V, sp, rng, work.data());
    return 0;
  }

 private:
  size_t work_size(int nr) const {
    size_t w = scratch_;
    for (int s = 0; s <= S_; ++s) w += 3 * static_cast<size_t>(wp_[s]);
    return static_cast<size_t>(nr) * (w + 2 * static_cast<size_t>(wp_[0])) + 16;
  }

  // level s takes its n-th input x (nr, Wp_s) for rows r0.. and leaves its output in x; work: after x
  void level_step(int s, int r0, int nr, float* x, int64_t n, float* work) {
    if (s == S_) {
      for (auto& blk : center_) blk.step(r0, nr, x, work);
      return;
    }
    for (auto& blk : down_[s]) blk.step(r0, nr, x, work);
    const int Wp = wp_[s], p = pool_[s];
    const int k = static_cast<int>(n % p);
    const size_t frame = static_cast<size_t>(p) * Wp;  // one row's p frames
    float* buf = buf_[s].data() + r0 * frame;
    float* pend = pending_[s].data() + r0 * frame;
    float* coarse_in = work;  // (nr, Wp): the up-pooled input for this position, from the previous group
    for (int r = 0; r < nr; ++r) {
      std::copy_n(pend + r * frame + static_cast<size_t>(k) * Wp, Wp, coarse_in + static_cast<size_t>(r) * Wp);
      std::copy_n(x + static_cast<size_t>(r) * Wp, Wp, buf + r * frame + static_cast<size_t>(k) * Wp);
    }
    float* rest = coarse_in + static_cast<size_t>(nr) * Wp;
    if (k == p - 1) {
      const int Wcp = wp_[s + 1];
      float* y = rest;  // (nr, Wcp)
      dpool_[s].apply(buf, static_cast<int>(frame), nr, y, Wcp);
      if (!cond_[s + 1].empty())
        for (int r = 0; r < nr; ++r) add_into(y + static_cast<size_t>(r) * Wcp, cond_[s + 1].data() + static_cast<size_t>(r0 + r) * Wcp, Wcp);
      level_step(s + 1, r0, nr, y, n / p, y + static_cast<size_t>(nr) * Wcp);
      upool_[s].apply(y, Wcp, nr, pend, static_cast<int>(frame));  // (p, Wp) frames for the next group
    }
    for (int r = 0; r < nr; ++r) add_into(x + static_cast<size_t>(r) * Wp, coarse_in + static_cast<size_t>(r) * Wp, Wp);
    for (auto& blk : up_[s]) blk.step(r0, nr, x, rest);
  }

  void group_step(int r0, int nr, const int64_t* tok, int64_t t, float* work) {
    const int Wp = wp_[0];
    float* x = work;
    for (int r = 0; r < nr; ++r) {
      float* xr = x + static_cast<size_t>(r) * Wp;
      std::copy_n(emb_.data() + tok[r] * Wp, Wp, xr);
      if (!cond_[0].empty()) add_into(xr, cond_[0].data() + static_cast<size_t>(r0 + r) * Wp, Wp);
    }
    float* rest = x + static_cast<size_t>(nr) * Wp;
    level_step(0, r0, nr, x, t, rest);
    for (int r = 0; r < nr; ++r) rms_norm(x + static_cast<size_t>(r) * Wp, normf_, epsf_, width_[0], rest + static_cast<size_t>(r) * Wp);
    head_.apply(rest, Wp, nr, logits_.data() + static_cast<size_t>(r0) * Vp_, Vp_);
  }

  std::vector<int> pool_, width_, wp_;
  int64_t batch_ = 0, t_ = 0;
  int S_ = 0, V_ = 0, Vp_ = 0;
  bool has_logits_ = false;
  size_t scratch_ = 0;
  fvec emb_, normf_, logits_;
  float epsf_ = 1e-5f;
  Linear head_;
  std::vector<std::vector<Block>> down_, up_;
  std::vector<Block> center_;
  std::vector<Linear> dpool_, upool_;
  std::vector<fvec> cond_, buf_, pending_;
  std::vector<Rng> rng_;
  std::vector<fvec> works_;  // scratch per group of rows
};

}  // namespace

extern "C" {

// Returns a handle, or nullptr with the reason in err (err_len bytes).
void* unet_create(const int64_t* ints, int64_t n_ints, const float* floats, int64_t n_floats, char* err,
                  int64_t err_len) {
  try {
    Reader r{ints, n_ints, 0, floats, n_floats, 0};
    return new UNetStep(r);
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), static_cast<size_t>(err_len - 1));
    err[err_len - 1] = 0;
    return nullptr;
  }
}

// One teacher-forced step: tokens (batch,) -> logits (batch, vocab). 0, or -1 for a token outside the vocabulary.
int unet_step(void* h, const int64_t* tokens, float* logits, int threads) {
  auto* u = static_cast<UNetStep*>(h);
  const int rc = u->run(tokens, 1, 0, Sampling{}, nullptr, true, threads);
  if (rc == 0) u->copy_logits(logits);
  return rc;
}

// forced (batch, L) teacher-forced, then T draws per row into out (batch, T); see UNetStep::run.
int unet_run(void* h, const int64_t* forced, int64_t L, int64_t T, float temperature, int64_t top_k, float top_p,
             int64_t* out, int feed_last, int threads) {
  return static_cast<UNetStep*>(h)->run(forced, L, T, Sampling{temperature, top_k, top_p}, out, feed_last != 0,
                                        threads);
}

void unet_seed(void* h, uint64_t seed) { static_cast<UNetStep*>(h)->seed(seed); }

// n draws from one logits vector (V) with the generator of row 0 for this seed: the sampler alone, for tests.
int64_t unet_sample_many(const float* logits, int64_t V, int64_t n, float temperature, int64_t top_k, float top_p,
                         uint64_t seed, int64_t* out) {
  return UNetStep::sample_many(logits, static_cast<int>(V), n, Sampling{temperature, top_k, top_p}, seed, out);
}

int64_t unet_position(void* h) { return static_cast<UNetStep*>(h)->position(); }

int unet_simd_width() { return kV; }

void unet_destroy(void* h) { delete static_cast<UNetStep*>(h); }

}  // extern "C"
