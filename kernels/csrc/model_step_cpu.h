// Whole-model decode step on CPU (hiss kernels): every Mamba-1 / Mamba-2 layer of a language model in one
// call, no Python per layer per token.
//
//   x = embedding[token]                              (residual; fp32 when residual_in_fp32)
//   per layer:  h = norm(x);  mixer(h) as in ssm_core.modules.{Mamba, Mamba2}._step;  x += out
//               [h2 = norm2(x); x += fc2(fc1(h2) gated)]            (gated MLP, d_intermediate > 0)
//   logits = lm_head(norm_f(x))
//
// The weights are the modules' own tensors (matrices are not copied: fp32 or bf16, read in place, except the
// oneDNN-packed copies set_packed may add for many-row calls; the small per-channel parameters arrive as fp32
// copies made once by the Python binder), and the state is the caller's
// ModelState tensors, updated in place (conv state in the model dtype, SSM state fp32). All scratch buffers
// are allocated when the model is built or when a larger token count is first seen, never per token.
//
// int8 weight-only: any matrix (and a tied embedding / LM head) may instead arrive as int8 values q (O, K) with
// fp32 per-output-row scales s (O,) ("<name>_scale"): W = q s. Activations, state and accumulation stay fp32
// (the model dtype's roundings, if bf16, are kept); the GEMV widens int8 -> int32 -> fp32 in registers and
// multiplies each output row's dot product by its scale once, at the end.
//
// Numerics follow the module path: activations are fp32 here; wherever the module path holds a tensor in the
// model dtype (bf16 models) the value is rounded to bf16 at the same place (round to nearest even), so the
// bf16 step reproduces the module's roundings; state and accumulation are fp32.
//
// T tokens per row in one call (the multi-token step for speculative verification): every matmul runs on
// the batch*T rows at once, so each weight matrix is read once for all T tokens; the conv and the SSM
// recurrences walk the T tokens in order per channel. Optionally the state after every token is written to
// snapshot buffers, and restore(t) puts the state after token t back (a rejected speculative draft costs a
// copy, not a re-run).
//
// Matmuls: rows <= small_rows (default 8) go through our own GEMV kernel (4 weight rows x 2 activation rows
// per register block, fp32 or bf16 weights widened in registers, software prefetch, AVX2+FMA variant picked
// at run time; threads over output rows): at batch 1 a decode step is a stream of the weights, and this
// kernel reads them once at memory speed with no packing. Larger row counts go to oneDNN's packed-weight kernel
// where set_packed gave a packed copy (the LM head; every fp32 matrix, in one block of output rows per thread),
// else to ATen's mm (MKL for fp32, oneDNN for bf16) as Y^T = W X^T (the weight on the left: not repacked per call)
// into a preallocated scratch; int8
// matrices there are dequantised (q s, fp32) in blocks of output rows that stay in cache, each block multiplied
// by MKL's sgemm.
//
// Layers of another kind (attention) are "external": the Python side runs them between calls to
// run_layers(begin, end) on the residual buffer (hybrid models).

#pragma once

#include "simd.h"

#if HISS_HAVE_AVX2
#include <immintrin.h>  // the int8 GEMV's AVX2 variant (vpmovsxbd): GCC's vector extensions widen int8 lane by lane
#endif

#include <map>
#include <string>

namespace hiss {

// 8 x uint32 vectors: loads at 2-byte alignment (16 bf16 weights), splat
typedef uint32_t v8u_u __attribute__((vector_size(32), aligned(2)));
template <>
struct Splat<v8u> {
  static HISS_INLINE v8u make(uint32_t s) {
    v8u x = {};
    x[0] = s;
    return __builtin_shufflevector(x, x, 0, 0, 0, 0, 0, 0, 0, 0);
  }
};
template <>
struct Unaligned<v8u> {
  typedef v8u_u type;
};

namespace ms {

// ---- bf16 ---------------------------------------------------------------------------------------
#ifndef HISS_PREFETCH
#define HISS_PREFETCH 2048
#endif
constexpr int64_t kPrefetch = HISS_PREFETCH;  // elements ahead (bf16; fp32 uses half): 2 KB per weight row

HISS_INLINE float bf2f(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
HISS_INLINE uint16_t f2bf(float f) {  // round to nearest even (c10::BFloat16's rule); NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
HISS_INLINE float rbf(float f) { return bf2f(f2bf(f)); }

typedef uint16_t v8us __attribute__((vector_size(16), aligned(2)));

HISS_INLINE v8f wload(const float* p) { return vload<v8f>(p); }
HISS_INLINE v8f wload(const uint16_t* p) {
  v8us h = *reinterpret_cast<const v8us*>(p);
  v8u w = __builtin_convertvector(h, v8u) << 16;
  return (v8f)w;
}
// int8: 8 values (8 bytes, any alignment) sign-extended to int32 and converted (vpmovsxbd + vcvtdq2ps)
typedef int8_t v8c_u __attribute__((vector_size(8), aligned(1)));
HISS_INLINE v8f wload(const int8_t* p) {
  const v8c_u c = *reinterpret_cast<const v8c_u*>(p);
  return __builtin_convertvector(__builtin_convertvector(c, v8i), v8f);
}
HISS_INLINE float wscalar(float v) { return v; }
HISS_INLINE float wscalar(uint16_t v) { return bf2f(v); }
HISS_INLINE float wscalar(int8_t v) { return (float)v; }

// bf16 weights without shuffles: 16 weights loaded as 8 uint32 lanes give the even-indexed ones as (v << 16)
// and the odd-indexed ones as (v & 0xffff0000); x is handed over deinterleaved the same way (per 16-block:
// x[k], x[k+2], ..., x[k+14], then x[k+1], ..., x[k+15]), prepared once per matmul.
HISS_INLINE void deinterleave16(const float* x, int64_t K, float* xd) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16)
    for (int j = 0; j < 8; ++j) xd[k + j] = x[k + 2 * j], xd[k + 8 + j] = x[k + 2 * j + 1];
}

template <int MM>
HISS_INLINE void gemv_bf16_rows4(const uint16_t* w0, const uint16_t* w1, const uint16_t* w2, const uint16_t* w3,
                                 int64_t K, const float* xm, const float* xdm, int64_t ldx, float (*s)[4], bool pf) {
  const int64_t K16 = K / 16 * 16;
  const v8u hi = splat<v8u>(0xffff0000u);
  v8f a[MM][4] = {};
  for (int64_t k = 0; k < K16; k += 16) {
    if (pf && (k & 31) == 0) {  // one prefetch per 64-byte line, ahead: keeps enough misses in flight
      __builtin_prefetch(w0 + k + kPrefetch), __builtin_prefetch(w1 + k + kPrefetch);
      __builtin_prefetch(w2 + k + kPrefetch), __builtin_prefetch(w3 + k + kPrefetch);
    }
    const v8u u0 = vload<v8u>(w0 + k), u1 = vload<v8u>(w1 + k), u2 = vload<v8u>(w2 + k), u3 = vload<v8u>(w3 + k);
    const v8f e0 = (v8f)(u0 << 16), e1 = (v8f)(u1 << 16), e2 = (v8f)(u2 << 16), e3 = (v8f)(u3 << 16);
    const v8f d0 = (v8f)(u0 & hi), d1 = (v8f)(u1 & hi), d2 = (v8f)(u2 & hi), d3 = (v8f)(u3 & hi);
    for (int i = 0; i < MM; ++i) {
      const v8f xe = vload<v8f>(xdm + i * K + k), xo = vload<v8f>(xdm + i * K + k + 8);
      a[i][0] += e0 * xe + d0 * xo, a[i][1] += e1 * xe + d1 * xo;
      a[i][2] += e2 * xe + d2 * xo, a[i][3] += e3 * xe + d3 * xo;
    }
  }
  for (int i = 0; i < MM; ++i) {
    const float* x = xm + i * ldx;
    for (int r = 0; r < 4; ++r) s[i][r] = hsum(a[i][r]);
    for (int64_t k = K16; k < K; ++k) {
      s[i][0] += bf2f(w0[k]) * x[k], s[i][1] += bf2f(w1[k]) * x[k];
      s[i][2] += bf2f(w2[k]) * x[k], s[i][3] += bf2f(w3[k]) * x[k];
    }
  }
}

HISS_INLINE void gemv_bf16_impl(const uint16_t* W, int64_t K, const float* x, const float* xd, int64_t ldx, int64_t M,
                                float* y, int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd) {
  for (int64_t o = o0; o < o1; o += 4) {
    const int64_t nr = std::min<int64_t>(4, o1 - o);
    const uint16_t* w0 = W + o * K;
    const uint16_t* w1 = w0 + (nr > 1 ? K : 0);
    const uint16_t* w2 = w0 + (nr > 2 ? 2 * K : 0);
    const uint16_t* w3 = w0 + (nr > 3 ? 3 * K : 0);
    for (int64_t m = 0; m < M;) {
      float s[2][4];
      const int mm = M - m >= 2 ? 2 : 1;
      if (mm == 2)
        gemv_bf16_rows4<2>(w0, w1, w2, w3, K, x + m * ldx, xd + m * K, ldx, s, m == 0);
      else
        gemv_bf16_rows4<1>(w0, w1, w2, w3, K, x + m * ldx, xd + m * K, ldx, s, m == 0);
      for (int i = 0; i < mm; ++i) {
        float* ym = y + (m + i) * ldy + o;
        for (int64_t r = 0; r < nr; ++r) {
          const float v = s[i][r] + (bias ? bias[o + r] : 0.f);
          ym[r] = rnd ? rbf(v) : v;
        }
      }
      m += mm;
    }
  }
}

// ---- GEMV for a few rows: y[m, o] = bias[o] + sum_k W[o, k] x[m, k], output rows [o0, o1) ----------------
// x rows m0 (and m0 + 1 when MM == 2) against the 4 weight rows at w0..w3: MM x 4 accumulators, each weight
// vector loaded once for both x rows
template <int MM, typename WT>
HISS_INLINE void gemv_rows4(const WT* w0, const WT* w1, const WT* w2, const WT* w3, int64_t K, const float* xm,
                            int64_t ldx, float (*s)[4], bool prefetch) {
  const int64_t K8 = K / 8 * 8;
  constexpr int64_t line = 64 / sizeof(WT), ahead = kPrefetch * 2 / sizeof(WT);  // same bytes ahead as bf16
  v8f a[MM][4] = {};
  for (int64_t k = 0; k < K8; k += 8) {
    if (prefetch && (k & (line - 1)) == 0) {  // one prefetch per 64-byte line, ahead: keeps enough misses in flight
      __builtin_prefetch(w0 + k + ahead), __builtin_prefetch(w1 + k + ahead);
      __builtin_prefetch(w2 + k + ahead), __builtin_prefetch(w3 + k + ahead);
    }
    const v8f v0 = wload(w0 + k), v1 = wload(w1 + k), v2 = wload(w2 + k), v3 = wload(w3 + k);
    for (int i = 0; i < MM; ++i) {
      const v8f xv = vload<v8f>(xm + i * ldx + k);
      a[i][0] += v0 * xv, a[i][1] += v1 * xv, a[i][2] += v2 * xv, a[i][3] += v3 * xv;
    }
  }
  for (int i = 0; i < MM; ++i) {
    const float* x = xm + i * ldx;
    for (int r = 0; r < 4; ++r) s[i][r] = hsum(a[i][r]);
    for (int64_t k = K8; k < K; ++k) {
      s[i][0] += wscalar(w0[k]) * x[k], s[i][1] += wscalar(w1[k]) * x[k];
      s[i][2] += wscalar(w2[k]) * x[k], s[i][3] += wscalar(w3[k]) * x[k];
    }
  }
}

// scale (int8 weights): per output row, applied to the dot product before the bias; nullptr for none
template <typename WT>
HISS_INLINE void gemv_impl(const WT* W, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                           const float* bias, int64_t o0, int64_t o1, bool rnd, const float* scale = nullptr) {
  for (int64_t o = o0; o < o1; o += 4) {
    const int64_t nr = std::min<int64_t>(4, o1 - o);
    const WT* w0 = W + o * K;
    const WT* w1 = w0 + (nr > 1 ? K : 0);
    const WT* w2 = w0 + (nr > 2 ? 2 * K : 0);
    const WT* w3 = w0 + (nr > 3 ? 3 * K : 0);
    for (int64_t m = 0; m < M;) {  // the 4-row weight block stays in L1 after the first pair of x rows
      float s[2][4];
      const int mm = M - m >= 2 ? 2 : 1;
      if (mm == 2)
        gemv_rows4<2>(w0, w1, w2, w3, K, x + m * ldx, ldx, s, m == 0);
      else
        gemv_rows4<1>(w0, w1, w2, w3, K, x + m * ldx, ldx, s, m == 0);
      for (int i = 0; i < mm; ++i) {
        float* ym = y + (m + i) * ldy + o;
        for (int64_t r = 0; r < nr; ++r) {
          const float v = (scale ? s[i][r] * scale[o + r] : s[i][r]) + (bias ? bias[o + r] : 0.f);
          ym[r] = rnd ? rbf(v) : v;
        }
      }
      m += mm;
    }
  }
}

// x[0, n) <- silu(x) (rounded to bf16 when bf): the conv step's activation, vectorised over channels
HISS_INLINE void silu_impl(float* x, int64_t n, bool bf) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = vload<v8f>(x + i);
    vstore(x + i, v * vsigmoid(v));
  }
  for (; i < n; ++i) x[i] = silu_s(x[i]);
  if (bf)
    for (i = 0; i < n; ++i) x[i] = rbf(x[i]);
}
inline void silu_base(float* x, int64_t n, bool bf) { silu_impl(x, n, bf); }
#if HISS_HAVE_AVX2
__attribute__((target("avx2,fma"))) inline void silu_avx2(float* x, int64_t n, bool bf) { silu_impl(x, n, bf); }
#endif
inline void silu_rows(bool avx2, float* x, int64_t n, bool bf) {
#if HISS_HAVE_AVX2
  if (avx2) return silu_avx2(x, n, bf);
#endif
  silu_base(x, n, bf);
}

// ---- the conv step for d_conv 4 (a state of three taps per channel), 8 channels at a time ------------
// The state of 8 channels is 24 consecutive values, channel by channel: three vectors. As 8 = 2 mod 3, each tap
// takes disjoint lanes of the three, so two shuffles give a tap as one vector, and six put the shifted taps
// back (three stores of two shuffles each); the arithmetic is one FMA chain per tap over 8 channels instead
// of a scalar loop per channel. The new tap is x as given, unrounded: for bf16 models x is in_proj's output,
// already rounded to bf16 by every matmul path, so the stored state equals the scalar path's.
struct Conv3Args {
  int64_t T, c0, c1, ld_in, conv_dim, snap_stride;  // channels [c0, c1) of one row; snap_stride: values per token
  const float *in, *wt, *bias;  // in: the row's first token, ld_in per token; wt: the weights transposed (4, conv_dim)
  float* out;                   // the row's first token's conv output, conv_dim per token
  void *state, *snap;           // the row's (conv_dim, 3) state; the snapshots of its token 0 (nullptr: none)
};
HISS_INLINE void sstore(float* p, v8f v) { vstore(p, v); }
HISS_INLINE void sstore(uint16_t* p, v8f v) {  // f2bf on 8 lanes: round to nearest even, NaN stays NaN
  const v8u u = (v8u)v;
  const v8u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v8u o = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : r;
  *reinterpret_cast<v8us*>(p) = __builtin_convertvector(o, v8us);
}
template <typename ST>
HISS_INLINE void store_taps(ST* p, v8f t0, v8f t1, v8f t2) {  // 8 channels' (t0, t1, t2) interleaved
  sstore(p, __builtin_shufflevector(__builtin_shufflevector(t0, t1, 0, 8, 0, 1, 9, 0, 2, 10), t2,
                                    0, 1, 8, 3, 4, 9, 6, 7));
  sstore(p + 8, __builtin_shufflevector(__builtin_shufflevector(t0, t1, 0, 3, 11, 0, 4, 12, 0, 5), t2,
                                        10, 1, 2, 11, 4, 5, 12, 7));
  sstore(p + 16, __builtin_shufflevector(__builtin_shufflevector(t0, t1, 13, 0, 6, 14, 0, 7, 15, 0), t2,
                                         0, 13, 2, 3, 14, 5, 6, 15));
}
// returns the first channel it did not do (the caller finishes the last c1 - c0 mod 8)
template <typename ST>
HISS_INLINE int64_t conv3_impl(const Conv3Args& a) {
  ST* const st = static_cast<ST*>(a.state);
  ST* const snap = static_cast<ST*>(a.snap);
  const float* wt = a.wt;
  int64_t c = a.c0;
  for (; c + 8 <= a.c1; c += 8) {
    ST* s = st + c * 3;
    const v8f va = wload(s), vb = wload(s + 8), vc = wload(s + 16);
    v8f t0 = __builtin_shufflevector(__builtin_shufflevector(va, vb, 0, 3, 6, 9, 12, 15, 0, 0), vc,
                                     0, 1, 2, 3, 4, 5, 10, 13);
    v8f t1 = __builtin_shufflevector(__builtin_shufflevector(va, vb, 1, 4, 7, 10, 13, 0, 0, 0), vc,
                                     0, 1, 2, 3, 4, 8, 11, 14);
    v8f t2 = __builtin_shufflevector(__builtin_shufflevector(va, vb, 2, 5, 8, 11, 14, 0, 0, 0), vc,
                                     0, 1, 2, 3, 4, 9, 12, 15);
    const int64_t C = a.conv_dim;
    const v8f w0 = vload<v8f>(wt + c), w1 = vload<v8f>(wt + C + c), w2 = vload<v8f>(wt + 2 * C + c),
              w3 = vload<v8f>(wt + 3 * C + c), b = a.bias ? vload<v8f>(a.bias + c) : v8f{};
    for (int64_t t = 0; t < a.T; ++t) {
      const v8f x = vload<v8f>(a.in + t * a.ld_in + c);
      v8f acc = b;  // the scalar loop's order: bias, the three state taps, then the new input
      acc += w0 * t0;
      acc += w1 * t1;
      acc += w2 * t2;
      acc += w3 * x;
      vstore(a.out + t * C + c, acc);
      t0 = t1, t1 = t2, t2 = x;
      if (snap) store_taps(snap + t * a.snap_stride + c * 3, t0, t1, t2);
    }
    store_taps(s, t0, t1, t2);
  }
  return c;
}
inline int64_t conv3_f32_base(const Conv3Args& a) { return conv3_impl<float>(a); }
inline int64_t conv3_bf16_base(const Conv3Args& a) { return conv3_impl<uint16_t>(a); }
#if HISS_HAVE_AVX2
__attribute__((target("avx2,fma"))) inline int64_t conv3_f32_avx2(const Conv3Args& a) { return conv3_impl<float>(a); }
__attribute__((target("avx2,fma"))) inline int64_t conv3_bf16_avx2(const Conv3Args& a) {
  return conv3_impl<uint16_t>(a);
}
#endif
template <typename ST>
inline int64_t conv3(bool avx2, const Conv3Args& a) {
  constexpr bool bf = std::is_same<ST, uint16_t>::value;
#if HISS_HAVE_AVX2
  if (avx2) return bf ? conv3_bf16_avx2(a) : conv3_f32_avx2(a);
#endif
  return bf ? conv3_bf16_base(a) : conv3_f32_base(a);
}

}  // namespace ms

// ---- the model ----------------------------------------------------------------------------------
class DecodeModel {
 public:
  typedef std::map<std::string, at::Tensor> Tensors;
  typedef std::map<std::string, double> Numbers;

  explicit DecodeModel(int64_t batch) : B_(batch) { TORCH_CHECK(batch >= 1, "DecodeModel: batch must be >= 1"); }

  // embedding (V, D) and lm_head (Vp, D) in the weight dtype, or int8 with "<name>_scale" (a tied, quantised
  // head: the same int8 tensor for both); norm_f weight [bias] fp32. The model dtype (activation roundings, conv
  // state) is the embedding's, or numbers["bf16"] when the embedding is int8.
  void set_io(const Tensors& t, const Numbers& n) {
    emb_ = mat(t, "embedding");
    head_ = lin(t, "lm_head", "");
    if (emb_.scalar_type() == at::kChar) {
      emb_s_ = f32(t, "embedding_scale");
      TORCH_CHECK(emb_s_.numel() == emb_.size(0), "embedding_scale must have one scale per row");
      bf_ = num(n, "bf16") != 0;
    } else {
      emb_s_ = at::Tensor();
      bf_ = emb_.scalar_type() == at::kBFloat16;
    }
    TORCH_CHECK(head_.q8 || head_.w.scalar_type() == wdt(), "embedding and lm_head must share a dtype (or be int8)");
    D_ = emb_.size(1);
    TORCH_CHECK(head_.K == D_, "lm_head must be (vocab, d_model)");
    normf_ = norm(t, n, "norm_f");
    res_fp32_ = num(n, "residual_in_fp32", 1) != 0;
  }

  // kind: "mamba1", "mamba2" or "external" (a layer the caller runs itself, e.g. attention).
  void add_layer(const std::string& kind, const Tensors& t, const Numbers& n) {
    Layer L;
    if (kind == "external") {
      L.kind = 2;
      layers_.push_back(std::move(L));
      return;
    }
    TORCH_CHECK(kind == "mamba1" || kind == "mamba2", "add_layer: kind must be mamba1, mamba2 or external");
    L.kind = kind == "mamba1" ? 0 : 1;
    L.norm = norm(t, n, "norm");
    L.in_proj = lin(t, "in_proj", "in_proj_bias");
    L.out_proj = lin(t, "out_proj", "out_proj_bias");
    L.conv_w = f32(t, "conv_weight");  // (conv_dim, W)
    L.conv_dim = L.conv_w.size(0), L.W = L.conv_w.size(1);
    L.conv_wt = L.conv_w.t().contiguous();  // (W, conv_dim): the vector conv step's rows
    if (t.count("conv_bias")) L.conv_b = f32(t, "conv_bias");
    L.A = f32(t, "A"), L.D = f32(t, "D"), L.dt_bias = f32(t, "dt_bias");
    L.N = (int64_t)num(n, "d_state");
    if (L.kind == 0) {
      L.Di = L.conv_dim;
      L.selective = num(n, "selective", 1) != 0;
      if (L.selective) {
        L.x_proj = lin(t, "x_proj", "");
        L.dt_proj = lin(t, "dt_proj", "");
        L.R = L.x_proj.O - 2 * L.N;
        TORCH_CHECK(L.R >= 1 && L.dt_proj.K == L.R && L.dt_proj.O == L.Di && L.x_proj.K == L.Di,
                    "x_proj/dt_proj shapes");
      } else {
        L.Bfix = f32(t, "B"), L.Cfix = f32(t, "C");
      }
      TORCH_CHECK(L.in_proj.O == 2 * L.Di && L.out_proj.K == L.Di, "mamba1 in_proj/out_proj shapes");
      TORCH_CHECK(L.A.numel() == L.Di * L.N && L.D.numel() == L.Di && L.dt_bias.numel() == L.Di, "mamba1 A/D/dt_bias");
      L.d_inner = L.Di;
    } else {
      L.H = (int64_t)num(n, "nheads"), L.P = (int64_t)num(n, "headdim"), L.G = (int64_t)num(n, "ngroups");
      L.d_ssm = L.H * L.P;
      L.d_mlp = (int64_t)num(n, "d_mlp");
      L.d_inner = L.d_mlp + L.d_ssm;
      L.dt_lo = (float)num(n, "dt_min"), L.dt_hi = (float)num(n, "dt_max");
      L.clamp = num(n, "dt_clamp") != 0;
      L.rmsnorm = num(n, "rmsnorm") != 0;
      L.norm_before_gate = num(n, "norm_before_gate") != 0;
      if (L.rmsnorm) {
        L.gnorm_w = f32(t, "gnorm_weight");
        L.gnorm_eps = (float)num(n, "gnorm_eps");
        L.gsize = (int64_t)num(n, "gnorm_group");
      }
      L.D_hdim = L.D.numel() == L.d_ssm && L.d_ssm != L.H;
      TORCH_CHECK(L.conv_dim == L.d_ssm + 2 * L.G * L.N, "mamba2 conv_dim");
      TORCH_CHECK(L.in_proj.O == 2 * L.d_mlp + L.d_ssm + L.conv_dim + L.H, "mamba2 in_proj shape");
      TORCH_CHECK(L.out_proj.K == L.d_inner, "mamba2 out_proj shape");
      TORCH_CHECK(L.A.numel() == L.H && L.dt_bias.numel() == L.H && (L.D.numel() == L.H || L.D.numel() == L.d_ssm),
                  "mamba2 A/D/dt_bias");
      TORCH_CHECK(L.H % L.G == 0, "nheads must be a multiple of ngroups");
    }
    if (t.count("fc1")) {
      L.mlp = true;
      L.norm2 = norm(t, n, "norm2");
      L.fc1 = lin(t, "fc1", "fc1_bias");
      L.fc2 = lin(t, "fc2", "fc2_bias");
      TORCH_CHECK(L.fc1.O == 2 * L.fc2.K, "fc1 must give 2 x fc2's input");
    }
    for (const ms_Lin* l : {&L.in_proj, &L.out_proj, &L.x_proj, &L.dt_proj, &L.fc1, &L.fc2})
      TORCH_CHECK(!l->w.defined() || l->q8 || l->w.scalar_type() == wdt(),
                  "all matrices must be of the model dtype (the embedding's) or int8");
    layers_.push_back(std::move(L));
  }

  // The layer's state tensors, updated in place by every step: conv (batch, conv_dim, S >= W - 1) in the weight
  // dtype, ssm (batch, d_inner, N) or (batch, nheads, headdim, N) fp32, both contiguous.
  void bind_state(int64_t i, at::Tensor conv, at::Tensor ssm) {
    TORCH_CHECK(i >= 0 && i < (int64_t)layers_.size() && layers_[i].kind != 2, "bind_state: not a Mamba layer");
    Layer& L = layers_[i];
    TORCH_CHECK(conv.is_contiguous() && conv.dim() == 3 && conv.size(0) == B_ && conv.size(1) == L.conv_dim &&
                    conv.size(2) >= L.W - 1 && conv.scalar_type() == wdt(),
                "bind_state: conv state must be contiguous (batch, conv_dim, >= d_conv - 1) of the weight dtype");
    TORCH_CHECK(ssm.is_contiguous() && ssm.scalar_type() == at::kFloat && ssm.size(0) == B_ &&
                    ssm.numel() == B_ * (L.kind == 0 ? L.Di : L.d_ssm) * L.N,
                "bind_state: ssm state must be contiguous fp32 (batch, ...) of the layer's size");
    L.conv_state = conv, L.ssm_state = ssm;
    L.S = conv.size(2);
    L.snap_conv.clear(), L.snap_ssm.clear();
  }

  // A matrix pre-packed by oneDNN (torch.ops.mkldnn._reorder_linear_weight) for the calls of more than small_rows
  // rows: the LM head (layer -1, fp32 or bf16) or a layer's fp32 in_proj / out_proj / x_proj / dt_proj / fc1 / fc2.
  // `parts`: packed copies of consecutive blocks of the weight's output rows, in order (one: the whole matrix). With
  // several, each part is one thread's product (threads over parts, oneDNN single-threaded inside): at two threads
  // oneDNN's own split of a 32-row product ran some shapes slower than on one thread.
  void set_packed(int64_t layer, const std::string& name, const std::vector<at::Tensor>& parts) {
    TORCH_CHECK(layer >= -1, "set_packed: layer must be -1 (the LM head) or a layer index, got ", layer);
    ms_Lin* l = &head_;
    if (layer >= 0) {
      TORCH_CHECK(layer < (int64_t)layers_.size() && layers_[layer].kind != 2, "set_packed: no Mamba layer ", layer);
      Layer& L = layers_[layer];
      std::map<std::string, ms_Lin*> by_name{{"in_proj", &L.in_proj}, {"out_proj", &L.out_proj},
                                             {"x_proj", &L.x_proj},   {"dt_proj", &L.dt_proj},
                                             {"fc1", &L.fc1},         {"fc2", &L.fc2}};
      TORCH_CHECK(by_name.count(name) && by_name[name]->w.defined(), "set_packed: layer ", layer, " has no '", name,
                  "'");
      l = by_name[name];
      TORCH_CHECK(!bf_, "set_packed: a layer's matrices are packed for fp32 weights only (bf16: no gain)");
    }
    TORCH_CHECK(!parts.empty(), "set_packed: '", name, "': no packed parts");
    std::vector<ms_Part> out;
    int64_t o0 = 0;
    for (const at::Tensor& p : parts) {
      TORCH_CHECK(p.is_mkldnn(), "set_packed: expected mkldnn tensors from _reorder_linear_weight");
      TORCH_CHECK(!l->q8 && p.scalar_type() == l->w.scalar_type(), "set_packed: '", name,
                  "' must be packed from its own (fp32 / bf16) weight");
      TORCH_CHECK(p.dim() == 2 && p.size(1) == l->K && p.size(0) >= 1 && o0 + p.size(0) <= l->O, "set_packed: '",
                  name, "' is ", l->O, " x ", l->K, ", a packed part ", p.sizes(), " at row ", o0);
      out.push_back({p, l->b.defined() ? l->b.narrow(0, o0, p.size(0)) : at::Tensor(), o0});
      o0 += p.size(0);
    }
    TORCH_CHECK(o0 == l->O, "set_packed: '", name, "' has ", l->O, " output rows, the packed parts ", o0);
    l->packed = std::move(out);
  }

  int64_t batch() const { return B_; }
  int64_t num_layers() const { return (int64_t)layers_.size(); }
  void set_small_rows(int64_t r) { small_rows_ = r; }
  int64_t small_rows() const { return small_rows_; }

  // ---- the call sequence: embed(tokens) -> run_layers(a, b) ... -> head(n_last) -----------------------
  void embed(const at::Tensor& tokens) {
    TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == B_ && tokens.size(1) >= 1, "tokens must be (batch, T >= 1)");
    at::Tensor tk = tokens.to(at::kLong).contiguous();
    T_ = tk.size(1);
    const int64_t M = B_ * T_;
    reserve(M);
    const int64_t* ids = tk.data_ptr<int64_t>();
    const int64_t V = emb_.size(0);
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(ids[m] >= 0 && ids[m] < V, "token id ", ids[m], " outside [0, ", V, ")");
      float* x = x_.data() + m * D_;
      if (emb_s_.defined()) {  // int8 rows: q s, as the dequantised weight holds it
        const int8_t* e = emb_.data_ptr<int8_t>() + ids[m] * D_;
        const float sc = emb_s_.data_ptr<float>()[ids[m]];
        for (int64_t d = 0; d < D_; ++d) x[d] = R((float)e[d] * sc);
      } else if (bf_) {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(emb_.data_ptr<at::BFloat16>()) + ids[m] * D_;
        for (int64_t d = 0; d < D_; ++d) x[d] = ms::bf2f(e[d]);
      } else {
        std::memcpy(x, emb_.data_ptr<float>() + ids[m] * D_, sizeof(float) * D_);
      }
    }
    snapshots_ = false;
  }

  // Run layers [begin, end) on the residual (all must be Mamba layers); with_snapshots keeps each token's state.
  void run_layers(int64_t begin, int64_t end, bool with_snapshots) {
    TORCH_CHECK(T_ > 0, "run_layers: call embed first");
    snapshots_ = with_snapshots;
    for (int64_t i = begin; i < end; ++i) {
      Layer& L = layers_[i];
      TORCH_CHECK(L.kind != 2, "run_layers: layer ", i, " is external (run it from Python)");
      TORCH_CHECK(L.conv_state.defined(), "run_layers: layer ", i, " has no bound state");
      layer_step(L);
    }
  }

  // The residual stream (batch, T, d_model) fp32: a view of the internal buffer (for external layers).
  at::Tensor residual() {
    return at::from_blob(x_.data(), {B_, T_, D_}, at::TensorOptions().dtype(at::kFloat));
  }

  // Final norm + LM head on the last n_last tokens of each row -> logits (batch, n_last, vocab) in the weight
  // dtype. The returned tensor may be an internal buffer, overwritten by the next call (a head packed in one part
  // returns oneDNN's fresh output instead: it has no out= variant, and copying 3-6 MB at batch 32 is avoidable).
  at::Tensor head(int64_t n_last) {
    TORCH_CHECK(n_last >= 1 && n_last <= T_, "head: n_last must be in [1, T]");
    const int64_t M = B_ * n_last, Vp = head_.O;
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t j = 0; j < n_last; ++j)
        norm_row(normf_, x_.data() + (b * T_ + T_ - n_last + j) * D_, h_.data() + (b * n_last + j) * D_);
    const bool packed = !head_.packed.empty() && M > small_rows_;  // oneDNN (bf16: rounded as the module's)
    at::Tensor hf;
    if (packed) {
      hf = at::from_blob(h_.data(), {M, D_}, at::TensorOptions().dtype(at::kFloat));
      if (bf_) hf = scratch_bf16(xb_, M * D_).view({M, D_}).copy_(hf);
      if (head_.packed.size() == 1) return packed_part(hf, head_.packed[0]).view({B_, n_last, Vp});  // no copy
    }
    auto opts = at::TensorOptions().dtype(bf_ ? at::kBFloat16 : at::kFloat);
    if (!logits_.defined() || logits_.size(0) != B_ || logits_.size(1) != n_last)
      logits_ = at::empty({B_, n_last, Vp}, opts);
    if (packed) {
      packed_into(hf, head_, logits_.view({M, Vp}));
      return logits_;
    }
    if (!bf_) {
      linear(head_, h_.data(), D_, M, logits_.data_ptr<float>(), Vp, false);
    } else {
      if ((int64_t)lg_.size() < M * Vp) lg_.resize(M * Vp);
      linear(head_, h_.data(), D_, M, lg_.data(), Vp, true);
      uint16_t* o = reinterpret_cast<uint16_t*>(logits_.data_ptr<at::BFloat16>());
      const float* s = lg_.data();
      at::parallel_for(0, M * Vp, 1 << 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = ms::f2bf(s[i]);
      });
    }
    return logits_;
  }

  // Everything in one call when no layer is external: tokens (batch, T) -> logits (batch, n_last, vocab).
  at::Tensor forward(const at::Tensor& tokens, int64_t n_last, bool with_snapshots) {
    embed(tokens);
    run_layers(0, (int64_t)layers_.size(), with_snapshots);
    return head(n_last);
  }

  // Put back the state after token t (0-based) of the last forward run with snapshots, every Mamba layer.
  void restore(int64_t t) {
    TORCH_CHECK(snapshots_ && t >= 0 && t < T_, "restore: no snapshot of token ", t);
    for (Layer& L : layers_) {
      if (L.kind == 2) continue;
      const int64_t nc = L.conv_state.numel(), ns = L.ssm_state.numel();
      copy_any(L.conv_state.data_ptr(), L.snap_conv.data() + t * nc * esize(), nc * esize());
      std::memcpy(L.ssm_state.data_ptr<float>(), L.snap_ssm.data() + t * ns, sizeof(float) * ns);
    }
  }

 private:
  struct ms_Part {  // set_packed's copy of output rows [o0, o0 + packed.size(0)) of a weight, and their bias
    at::Tensor packed, b;
    int64_t o0 = 0;
  };
  typedef struct ms_Lin {
    at::Tensor w, b, s;  // s: per-row scales of an int8 w
    std::vector<ms_Part> packed;  // set_packed's copy of w, in parts
    int64_t O = 0, K = 0;
    bool q8 = false;
  } ms_Lin;
  struct Norm {
    std::vector<float> w, b;
    float eps = 1e-5f;
    bool layer = false;
  };
  struct Layer {
    int kind = 0;  // 0 mamba1, 1 mamba2, 2 external
    Norm norm, norm2;
    ms_Lin in_proj, out_proj, x_proj, dt_proj, fc1, fc2;
    bool mlp = false, selective = true, clamp = false, rmsnorm = false, norm_before_gate = false, D_hdim = false;
    at::Tensor conv_w, conv_wt, conv_b, A, D, dt_bias, Bfix, Cfix, gnorm_w;
    int64_t conv_dim = 0, W = 0, S = 0, N = 0, Di = 0, R = 0, H = 0, P = 0, G = 0, d_ssm = 0, d_mlp = 0, d_inner = 0;
    int64_t gsize = 0;
    float dt_lo = 0.f, dt_hi = 0.f, gnorm_eps = 1e-5f;
    at::Tensor conv_state, ssm_state;
    std::vector<char> snap_conv;
    std::vector<float> snap_ssm;
  };

  static double num(const Numbers& n, const char* k, double dflt = NAN) {
    auto it = n.find(k);
    if (it != n.end()) return it->second;
    TORCH_CHECK(!std::isnan(dflt), "missing number '", k, "'");
    return dflt;
  }
  static at::Tensor get(const Tensors& t, const std::string& k) {
    auto it = t.find(k);
    TORCH_CHECK(it != t.end() && it->second.defined(), "missing tensor '", k, "'");
    TORCH_CHECK(it->second.device().is_cpu(), "tensor '", k, "' must be on the CPU");
    return it->second;
  }
  static at::Tensor f32(const Tensors& t, const std::string& k) {
    at::Tensor x = get(t, k);
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "tensor '", k, "' must be contiguous fp32");
    return x;
  }
  static at::Tensor mat(const Tensors& t, const std::string& k) {
    at::Tensor x = get(t, k);
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kChar),
                "'", k, "' must be a contiguous fp32, bf16 or int8 matrix");
    return x;
  }
  ms_Lin lin(const Tensors& t, const std::string& w, const std::string& b) {
    ms_Lin l;
    l.w = mat(t, w);
    l.O = l.w.size(0), l.K = l.w.size(1);
    if (l.w.scalar_type() == at::kChar) {
      l.q8 = true;
      l.s = f32(t, w + "_scale");
      TORCH_CHECK(l.s.numel() == l.O, "'", w, "_scale' must have one scale per output row");
    }
    if (!b.empty() && t.count(b)) {
      l.b = f32(t, b);
      TORCH_CHECK(l.b.numel() == l.O, "bias '", b, "' size");
    }
    return l;
  }
  Norm norm(const Tensors& t, const Numbers& n, const std::string& k) {
    Norm r;
    at::Tensor w = f32(t, k + "_weight");
    r.w.assign(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
    if (t.count(k + "_bias")) {
      at::Tensor b = f32(t, k + "_bias");
      r.b.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
    }
    r.eps = (float)num(n, (k + "_eps").c_str());
    r.layer = num(n, (k + "_layernorm").c_str(), 0) != 0;
    return r;
  }
  int64_t esize() const { return bf_ ? 2 : 4; }
  at::ScalarType wdt() const { return bf_ ? at::kBFloat16 : at::kFloat; }
  static void copy_any(void* dst, const void* src, int64_t bytes) { std::memcpy(dst, src, bytes); }
  HISS_INLINE float R(float v) const { return bf_ ? ms::rbf(v) : v; }

  void reserve(int64_t M) {
    if (M <= M_cap_) return;
    M_cap_ = M;
    int64_t wide = D_, conv = 0, ssm_in = 0;
    for (const Layer& L : layers_) {
      if (L.kind == 2) continue;
      wide = std::max({wide, L.in_proj.O, L.d_inner, L.mlp ? L.fc1.O : 0});
      conv = std::max(conv, L.conv_dim);
      ssm_in = std::max({ssm_in, L.x_proj.O, L.Di, L.d_ssm});
    }
    x_.assign(M * D_, 0.f), h_.assign(M * D_, 0.f), o_.assign(M * D_, 0.f);
    big_.assign(M * wide, 0.f), y_.assign(M * wide, 0.f);
    xc_.assign(M * std::max<int64_t>(conv, 1), 0.f);
    dbc_.assign(M * std::max<int64_t>(ssm_in, 1), 0.f), dt_.assign(M * std::max<int64_t>(ssm_in, 1), 0.f);
    gate_.assign(M * std::max<int64_t>(ssm_in, 1), 0.f), dl_.assign(M * std::max<int64_t>(ssm_in, 1), 0.f);
  }

  // ---- pieces ----------------------------------------------------------------------------------
  void norm_row(const Norm& nm, const float* x, float* y) const {
    const int64_t n = D_;
    // the module path casts the residual to the norm's dtype first (bf16 models: a rounding)
    double s = 0.0, mu = 0.0;
    if (nm.layer) {
      for (int64_t i = 0; i < n; ++i) mu += R(x[i]);
      mu /= n;
    }
    for (int64_t i = 0; i < n; ++i) {
      const double v = R(x[i]) - mu;
      s += v * v;
    }
    const float r = 1.f / std::sqrt((float)(s / n) + nm.eps);
    for (int64_t i = 0; i < n; ++i) {
      float v = ((float)(R(x[i]) - mu)) * r * nm.w[i];
      if (!nm.b.empty()) v += nm.b[i];
      y[i] = R(v);
    }
  }

  // Y (M, O) = X W^T + b through oneDNN's packed-weight kernel; X contiguous, in the weight's dtype. One part: oneDNN's
  // own threads (its fresh output); several: one thread per part (grain 1), each writing its columns of Y.
  static at::Tensor packed_part(const at::Tensor& X, const ms_Part& p) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    std::vector<c10::IValue> st{X, p.packed, p.b.defined() ? c10::IValue(p.b) : c10::IValue(), std::string("none"),
                                c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    op.callBoxed(&st);
    return st[0].toTensor();
  }
  // Y: (M, O) in X's dtype, any row stride. Rows are copied with memcpy, not ATen's copy_: worker threads do not
  // inherit the caller's InferenceMode, and an in-place ATen op there on a tensor made under it is refused.
  static void packed_into(const at::Tensor& X, const ms_Lin& l, const at::Tensor& Y) {
    char* y = static_cast<char*>(Y.data_ptr());
    const int64_t es = Y.element_size(), ld = Y.stride(0), M = X.size(0);
    at::parallel_for(0, (int64_t)l.packed.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const ms_Part& p = l.packed[i];
        const int64_t rows = p.packed.size(0);
        const at::Tensor P = packed_part(X, p).contiguous();
        const char* src = static_cast<const char*>(P.data_ptr());
        for (int64_t m = 0; m < M; ++m) std::memcpy(y + (m * ld + p.o0) * es, src + m * rows * es, rows * es);
      }
    });
  }
  void linear(const ms_Lin& l, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, bool rnd) {
    const float* bias = l.b.defined() ? l.b.data_ptr<float>() : nullptr;
    if (l.q8) return linear_q8(l, x, ldx, M, y, ldy, bias, rnd);
    if (M <= small_rows_) {
      const int64_t nblk = (l.O + 3) / 4;
      const int64_t bytes_per_blk = 4 * l.K * (bf_ ? 2 : 4);
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(bytes_per_blk, 1));
      const bool avx2 = isa() != "base";
      if (bf_) {
        const uint16_t* W = reinterpret_cast<const uint16_t*>(l.w.data_ptr<at::BFloat16>());
        if ((int64_t)xd_.size() < M * l.K) xd_.resize(M * l.K);
        for (int64_t m = 0; m < M; ++m) ms::deinterleave16(x + m * ldx, l.K, xd_.data() + m * l.K);
        const float* xd = xd_.data();
        at::parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
          gemv_bf16(avx2, W, l.K, x, xd, ldx, M, y, ldy, bias, b * 4, std::min(e * 4, l.O), rnd);
        });
      } else {
        const float* W = l.w.data_ptr<float>();
        at::parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
          gemv_f32(avx2, W, l.K, x, ldx, M, y, ldy, bias, b * 4, std::min(e * 4, l.O), rnd);
        });
      }
      return;
    }
    // Many rows: Y^T = W X^T (ATen mm: MKL sgemm / oneDNN bf16), then transposed into y with the bias. With
    // the weight as the left operand the BLAS streams it in place; as the right operand (X W^T) MKL packed
    // (copied) the whole weight matrix on every call, which at 32 rows cost more than the multiply itself.
    auto f32o = at::TensorOptions().dtype(at::kFloat);
    at::Tensor X = at::from_blob(const_cast<float*>(x), {M, l.K}, {ldx, 1}, f32o);
    const int64_t O = l.O;
    if (!l.packed.empty() && !bf_) {  // oneDNN, packed fp32 weight (which ones pay: FastDecoder.pack)
      const at::Tensor Xc = ldx == l.K ? X : X.contiguous();
      if (l.packed.size() > 1) return packed_into(Xc, l, at::from_blob(y, {M, O}, {ldy, 1}, f32o));
      const at::Tensor Y = packed_part(Xc, l.packed[0]);
      const float* yp = Y.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * ldy, yp + m * O, sizeof(float) * O);
      return;
    }
    if (!bf_) {
      if ((int64_t)yt_.size() < O * M) yt_.resize(O * M);
      at::Tensor YT = at::from_blob(yt_.data(), {O, M}, f32o);
      at::mm_out(YT, l.w, X.t());
      transpose_rows(yt_.data(), O, M, y, ldy, [bias](int64_t o, float v) { return bias ? v + bias[o] : v; });
      return;
    }
    // bf16 weights: oneDNN's bf16 matmul on bf16 copies of the activations; the result rounded like the module's
    at::Tensor Xb = scratch_bf16(xb_, M * l.K).view({M, l.K});
    Xb.copy_(X);
    at::Tensor YTb = scratch_bf16(yb_, M * O).view({O, M});
    at::mm_out(YTb, l.w, Xb.t());
    const uint16_t* yb = reinterpret_cast<const uint16_t*>(YTb.data_ptr<at::BFloat16>());
    transpose_rows(yb, O, M, y, ldy, [bias](int64_t o, uint16_t u) {
      const float v = ms::bf2f(u);
      return bias ? ms::rbf(v + bias[o]) : v;
    });
  }
  // y[m * ldy + o] = f(o, yt[o * M + m]): tiles of 64 output columns (the tile's yt rows stay in L1), threads
  // over tiles
  template <typename S, typename F>
  static void transpose_rows(const S* yt, int64_t O, int64_t M, float* y, int64_t ldy, F f) {
    constexpr int64_t tile = 64;
    at::parallel_for(0, (O + tile - 1) / tile, std::max<int64_t>(1, 4096 / std::max<int64_t>(M * tile, 1)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t o0 = b * tile; o0 < std::min(O, e * tile); o0 += tile) {
                         const int64_t o1 = std::min(O, o0 + tile);
                         for (int64_t m = 0; m < M; ++m)
                           for (int64_t o = o0; o < o1; ++o) y[m * ldy + o] = f(o, yt[o * M + m]);
                       }
                     });
  }
  // int8 weights: the GEMV for a few rows; more rows: blocks of output rows dequantised to fp32 (q s, exactly the
  // dequantised weight) into a cache-sized scratch, each multiplied by ATen's mm (MKL sgemm) into y's columns
  void linear_q8(const ms_Lin& l, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, const float* bias,
                 bool rnd) {
    const int8_t* W = l.w.data_ptr<int8_t>();
    const float* sc = l.s.data_ptr<float>();
    if (M <= small_rows_) {
      const int64_t nblk = (l.O + 3) / 4;
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(4 * l.K, 1));
      const bool avx2 = isa() != "base";
      at::parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
        gemv_i8(avx2, W, l.K, x, ldx, M, y, ldy, bias, b * 4, std::min(e * 4, l.O), rnd, sc);
      });
      return;
    }
    const int64_t K = l.K;
    const int64_t rows = std::min<int64_t>(l.O, std::max<int64_t>(16, (int64_t(1) << 18) / std::max<int64_t>(K, 1)));
    if ((int64_t)dq_.size() < rows * K) dq_.resize(rows * K);
    auto f32o = at::TensorOptions().dtype(at::kFloat);
    at::Tensor X = at::from_blob(const_cast<float*>(x), {M, K}, {ldx, 1}, f32o);
    for (int64_t o0 = 0; o0 < l.O; o0 += rows) {
      const int64_t nr = std::min(rows, l.O - o0);
      float* dq = dq_.data();
      at::parallel_for(0, nr, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int8_t* q = W + (o0 + r) * K;
          const float s = sc[o0 + r];
          float* d = dq + r * K;
          for (int64_t k = 0; k < K; ++k) d[k] = (float)q[k] * s;
        }
      });
      at::Tensor Wb = at::from_blob(dq, {nr, K}, f32o);
      at::Tensor Y = at::from_blob(y + o0, {M, nr}, {ldy, 1}, f32o);
      if (l.b.defined())
        at::addmm_out(Y, l.b.narrow(0, o0, nr), X, Wb.t());
      else
        at::mm_out(Y, X, Wb.t());
    }
    if (rnd)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < l.O; ++o) y[m * ldy + o] = ms::rbf(y[m * ldy + o]);
  }

  static at::Tensor scratch_bf16(at::Tensor& buf, int64_t n) {
    if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, at::TensorOptions().dtype(at::kBFloat16));
    return buf.narrow(0, 0, n);
  }

  static void gemv_f32(bool avx2, const float* W, int64_t K, const float* x, int64_t ldx, int64_t M, float* y,
                       int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd);
  static void gemv_bf16(bool avx2, const uint16_t* W, int64_t K, const float* x, const float* xd, int64_t ldx,
                        int64_t M, float* y, int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd);
  static void gemv_i8(bool avx2, const int8_t* W, int64_t K, const float* x, int64_t ldx, int64_t M, float* y,
                      int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd, const float* scale);

  // conv step over T tokens for channels [c0, c1) of row b: in (M, ld_in) at column off -> out (M, conv_dim)
  template <typename ST>
  void conv_rows(Layer& L, int64_t b, int64_t c0, int64_t c1, const float* in, int64_t ld_in, float* out, bool avx2) {
    const int64_t S = L.S, W = L.W, T = T_;
    ST* st = reinterpret_cast<ST*>(L.conv_state.data_ptr()) + b * L.conv_dim * S;
    const float* w = L.conv_w.data_ptr<float>();
    const float* cb = L.conv_b.defined() ? L.conv_b.data_ptr<float>() : nullptr;
    const int64_t nc = L.conv_state.numel();
    int64_t cv = c0;  // channels [c0, cv) done by the vector kernel
    if (S == 3 && W == 4) {
      ms::Conv3Args a{T, c0, c1, ld_in, L.conv_dim, nc, in + b * T * ld_in, L.conv_wt.data_ptr<float>(), cb,
                      out + b * T * L.conv_dim, st,
                      snapshots_ ? reinterpret_cast<ST*>(L.snap_conv.data()) + b * L.conv_dim * S : nullptr};
      cv = ms::conv3<ST>(avx2, a);
    }
    for (int64_t c = cv; c < c1; ++c) {
      ST* s = st + c * S;
      const float* wc = w + c * W;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t m = b * T + t;
        const float xv = in[m * ld_in + c];
        float acc = cb ? cb[c] : 0.f;
        for (int64_t k = 0; k < W - 1; ++k) acc += wc[k] * ld(s[S - (W - 1) + k]);
        acc += wc[W - 1] * xv;
        if (S > 0) {
          for (int64_t k = 0; k + 1 < S; ++k) s[k] = s[k + 1];  // S is tiny (d_conv - 1): no memmove call
          stv(s + S - 1, xv);
        }
        out[m * L.conv_dim + c] = acc;  // the activation follows, for the whole block at once
        if (snapshots_) {
          ST* snap = reinterpret_cast<ST*>(L.snap_conv.data()) + t * nc + (b * L.conv_dim + c) * S;
          std::memcpy(snap, s, sizeof(ST) * S);
        }
      }
    }
    for (int64_t t = 0; t < T; ++t) ms::silu_rows(avx2, out + (b * T + t) * L.conv_dim + c0, c1 - c0, bf_);
  }
  static HISS_INLINE float ld(float v) { return v; }
  static HISS_INLINE float ld(uint16_t v) { return ms::bf2f(v); }
  static HISS_INLINE void stv(float* p, float v) { *p = v; }
  static HISS_INLINE void stv(uint16_t* p, float v) { *p = ms::f2bf(v); }

  void conv_all(Layer& L, const float* in, int64_t ld_in, float* out) {
    const int64_t per = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(T_ * L.W, 1));
    const int64_t nblk = (L.conv_dim + per - 1) / per;
    const bool avx2 = isa() != "base";  // once per call, not per row block
    at::parallel_for(0, B_ * nblk, 4, [&](int64_t b0, int64_t e0) {
      for (int64_t i = b0; i < e0; ++i) {
        const int64_t b = i / nblk, c0 = (i % nblk) * per, c1 = std::min(L.conv_dim, c0 + per);
        if (bf_)
          conv_rows<uint16_t>(L, b, c0, c1, in, ld_in, out, avx2);
        else
          conv_rows<float>(L, b, c0, c1, in, ld_in, out, avx2);
      }
    });
  }

  void ssm1_range(Layer& L, int64_t b, int64_t c0, int64_t c1);
  void ssm2_range(Layer& L, int64_t b, int64_t h0, int64_t h1);

  void ensure_snapshots(Layer& L) {
    const size_t nc = (size_t)(L.conv_state.numel() * esize() * T_), ns = (size_t)(L.ssm_state.numel() * T_);
    if (L.snap_conv.size() < nc) L.snap_conv.resize(nc);
    if (L.snap_ssm.size() < ns) L.snap_ssm.resize(ns);
  }

  void layer_step(Layer& L) {
    const int64_t M = B_ * T_;
    if (snapshots_) ensure_snapshots(L);
    for (int64_t m = 0; m < M; ++m) norm_row(L.norm, x_.data() + m * D_, h_.data() + m * D_);
    const int64_t Oin = L.in_proj.O;
    linear(L.in_proj, h_.data(), D_, M, big_.data(), Oin, bf_);
    if (L.kind == 0) {
      conv_all(L, big_.data(), Oin, xc_.data());  // x is the first Di columns
      if (L.selective) {
        const int64_t Ox = L.x_proj.O;
        linear(L.x_proj, xc_.data(), L.Di, M, dbc_.data(), Ox, bf_);
        linear(L.dt_proj, dbc_.data(), Ox, M, dt_.data(), L.Di, bf_);
      }
      const int64_t per = std::max<int64_t>(8, (int64_t(1) << 15) / std::max<int64_t>(L.N * T_, 1)) / 8 * 8;
      const int64_t nblk = (L.Di + per - 1) / per;
      at::parallel_for(0, B_ * nblk, 1, [&](int64_t b0, int64_t e0) {
        for (int64_t i = b0; i < e0; ++i) {
          const int64_t b = i / nblk, c0 = (i % nblk) * per;
          ssm1_range(L, b, c0, std::min(L.Di, c0 + per));
        }
      });
    } else {
      const int64_t off_xbc = 2 * L.d_mlp + L.d_ssm;
      conv_all(L, big_.data() + off_xbc, Oin, xc_.data());
      const int64_t per = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(L.P * L.N * T_, 1));
      const int64_t nblk = (L.H + per - 1) / per;
      at::parallel_for(0, B_ * nblk, 1, [&](int64_t b0, int64_t e0) {
        for (int64_t i = b0; i < e0; ++i) {
          const int64_t b = i / nblk, h0 = (i % nblk) * per;
          ssm2_range(L, b, h0, std::min(L.H, h0 + per));
        }
      });
      mamba2_output(L);
    }
    linear(L.out_proj, y_.data(), L.d_inner, M, o_.data(), D_, bf_);
    add_residual();
    if (L.mlp) {
      for (int64_t m = 0; m < M; ++m) norm_row(L.norm2, x_.data() + m * D_, h_.data() + m * D_);
      const int64_t Hd = L.fc2.K;
      linear(L.fc1, h_.data(), D_, M, big_.data(), L.fc1.O, bf_);
      for (int64_t m = 0; m < M; ++m) {
        const float* u = big_.data() + m * L.fc1.O;
        float* y = y_.data() + m * Hd;
        for (int64_t j = 0; j < Hd; ++j) y[j] = R(u[j] * R(silu_s(u[Hd + j])));
      }
      linear(L.fc2, y_.data(), Hd, M, o_.data(), D_, bf_);
      add_residual();
    }
  }

  void add_residual() {
    const int64_t n = B_ * T_ * D_;
    const bool rr = bf_ && !res_fp32_;  // a bf16 residual stream rounds after every add
    for (int64_t i = 0; i < n; ++i) {
      const float v = x_[i] + o_[i];
      x_[i] = rr ? ms::rbf(v) : v;
    }
  }

  // y (M, d_inner) = [silu(z0) * x0, gated-norm(y_ssm, z)] for Mamba-2
  void mamba2_output(Layer& L) {
    const int64_t M = B_ * T_, Oin = L.in_proj.O;
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const float* u = big_.data() + m * Oin;
        float* y = y_.data() + m * L.d_inner;
        for (int64_t j = 0; j < L.d_mlp; ++j) y[j] = R(R(silu_s(u[j])) * u[L.d_mlp + j]);
        if (!L.rmsnorm) continue;
        float* ys = y + L.d_mlp;
        const float* z = u + 2 * L.d_mlp;
        const float* w = L.gnorm_w.data_ptr<float>();
        for (int64_t g0 = 0; g0 < L.d_ssm; g0 += L.gsize) {
          double ss = 0.0;
          if (!L.norm_before_gate) {
            for (int64_t j = g0; j < g0 + L.gsize; ++j) {
              const float v = ys[j] * silu_s(z[j]);
              ys[j] = v;
              ss += (double)v * v;
            }
            const float r = 1.f / std::sqrt((float)(ss / L.gsize) + L.gnorm_eps);
            for (int64_t j = g0; j < g0 + L.gsize; ++j) ys[j] = R(ys[j] * r * w[j]);
          } else {
            for (int64_t j = g0; j < g0 + L.gsize; ++j) ss += (double)ys[j] * ys[j];
            const float r = 1.f / std::sqrt((float)(ss / L.gsize) + L.gnorm_eps);
            for (int64_t j = g0; j < g0 + L.gsize; ++j) ys[j] = R(R(ys[j] * r * w[j]) * silu_s(z[j]));
          }
        }
      }
    });
  }

  int64_t B_ = 1, D_ = 0, T_ = 0, M_cap_ = 0, small_rows_ = 8;
  bool bf_ = false, res_fp32_ = true, snapshots_ = false;
  at::Tensor emb_, emb_s_, logits_, xb_, yb_;
  ms_Lin head_;
  Norm normf_;
  std::vector<Layer> layers_;
  std::vector<float> x_, h_, o_, big_, y_, xc_, dbc_, dt_, gate_, dl_, lg_, xd_, dq_, yt_;
};

// ---- SIMD kernels, compiled for the baseline and for AVX2+FMA ------------------------------------
namespace ms {

// Mamba-1: channels [c0, c1) of row b, T tokens: delta = softplus(dt + bias) (or softplus(bias) for the LTI
// layer), s <- exp(delta A) s + delta x B, y = (<s, C> + D x) silu(z)
struct Ssm1Args {
  int64_t T, b, c0, c1, Di, N, Oin, ldbc, R;
  bool selective, bf, snap;
  const float *xz, *xc, *dbc, *dt, *A, *D, *bias, *Bfix, *Cfix;
  float *state, *y, *snap_ssm, *gate, *delta;
  int64_t snap_stride;  // floats per token snapshot
};

HISS_INLINE float rb(bool bf, float v) { return bf ? rbf(v) : v; }

// One token without snapshots (plain decoding), N = 8 NV: four channels per iteration, their state read 16
// channels ahead by prefetch, the four <s, C> sums in one shuffle tree. One channel at a time, at batch 32 of a
// 130m model, took about as long with its state in cache (compute) as without its exp (streaming), both short
// of their limits: the loop was latency-bound; this one is 1.5x faster (a stand-alone replica on that shape, 24
// layers, one thread: 16.5 -> 10.7 ms).
// Returns the first channel it left (the caller does the last c1 - c0 mod 4).
template <int NV>
HISS_INLINE int64_t ssm1_one_token(const Ssm1Args& a) {
  constexpr int64_t N = 8 * NV, ahead = 16;
  const int64_t m = a.b;
  const float* Bp = a.selective ? a.dbc + m * a.ldbc + a.R : a.Bfix;
  const float* Cp = a.selective ? Bp + N : a.Cfix;
  v8f Bv[NV], Cv[NV];
  for (int j = 0; j < NV; ++j) Bv[j] = vload<v8f>(Bp + 8 * j), Cv[j] = vload<v8f>(Cp + 8 * j);
  const float *dl = a.delta + m * a.Di, *xc = a.xc + m * a.Di, *gt = a.gate + m * a.Di;
  float* y = a.y + m * a.Di;
  int64_t c = a.c0;
  for (; c + 4 <= a.c1; c += 4) {
    float* s = a.state + (a.b * a.Di + c) * N;
    for (int64_t k = 0; k < 4 * N; k += 16) __builtin_prefetch(s + ahead * N + k, 1);
    const float* Ar = a.A + c * N;
    v8f p[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const float d = dl[c + i];
      const v8f vd = splat<v8f>(d), vdx = splat<v8f>(d * xc[c + i]);
      v8f acc = {};
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        float* sp = s + i * N + 8 * j;
        const v8f sv = vexp(vd * vload<v8f>(Ar + i * N + 8 * j)) * vload<v8f>(sp) + vdx * Bv[j];
        vstore(sp, sv);
        acc += sv * Cv[j];
      }
      p[i] = acc;
    }
    const v8f q0 = __builtin_shufflevector(p[0], p[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(p[0], p[1], 4, 5, 6, 7, 12, 13, 14, 15);
    const v8f q1 = __builtin_shufflevector(p[2], p[3], 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(p[2], p[3], 4, 5, 6, 7, 12, 13, 14, 15);
    const v8f r = __builtin_shufflevector(q0, q1, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(q0, q1, 2, 3, 6, 7, 10, 11, 14, 15);  // channel i: lanes 2i, 2i + 1
    for (int i = 0; i < 4; ++i)
      y[c + i] = rb(a.bf, (r[2 * i] + r[2 * i + 1] + a.D[c + i] * xc[c + i]) * gt[c + i]);
  }
  return c;
}

HISS_INLINE void ssm1_impl(const Ssm1Args& a) {
  const int64_t N = a.N;
  const bool vec = N % 8 == 0;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t m = a.b * a.T + t;
    float* dl = a.delta + m * a.Di;  // scratch rows (M, Di): this task's channels only
    float* gt = a.gate + m * a.Di;
    const float* z = a.xz + m * a.Oin + a.Di;
    int64_t c = a.c0;
    for (; c + 8 <= a.c1; c += 8) {
      v8f d = vload<v8f>(a.bias + c);
      if (a.selective) d += vload<v8f>(a.dt + m * a.Di + c);
      vstore(dl + c, vsoftplus(d));
      v8f zz = vload<v8f>(z + c);
      vstore(gt + c, zz * vsigmoid(zz));
    }
    for (; c < a.c1; ++c) {
      dl[c] = softplus_s((a.selective ? a.dt[m * a.Di + c] : 0.f) + a.bias[c]);
      gt[c] = silu_s(z[c]);
    }
  }
  int64_t c0 = a.c0;  // channels [a.c0, c0) done by the one-token loop
  if (a.T == 1 && !a.snap) {
    if (N == 16) c0 = ssm1_one_token<2>(a);
    else if (N == 8) c0 = ssm1_one_token<1>(a);
    else if (N == 32) c0 = ssm1_one_token<4>(a);
  }
  for (int64_t c = c0; c < a.c1; ++c) {
    float* s = a.state + (a.b * a.Di + c) * N;
    const float* Ar = a.A + c * N;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t m = a.b * a.T + t;
      const float* Bv = a.selective ? a.dbc + m * a.ldbc + a.R : a.Bfix;
      const float* Cv = a.selective ? a.dbc + m * a.ldbc + a.R + N : a.Cfix;
      const float d = a.delta[m * a.Di + c], xv = a.xc[m * a.Di + c];
      const float dx = d * xv;
      float acc;
      if (vec) {
        const v8f vd = splat<v8f>(d), vdx = splat<v8f>(dx);
        v8f va = {};
        for (int64_t n = 0; n < N; n += 8) {
          v8f sv = vexp(vd * vload<v8f>(Ar + n)) * vload<v8f>(s + n) + vdx * vload<v8f>(Bv + n);
          vstore(s + n, sv);
          va += sv * vload<v8f>(Cv + n);
        }
        acc = hsum(va);
      } else {
        acc = 0.f;
        for (int64_t n = 0; n < N; ++n) {
          const float sv = std::exp(d * Ar[n]) * s[n] + dx * Bv[n];
          s[n] = sv;
          acc += sv * Cv[n];
        }
      }
      a.y[m * a.Di + c] = rb(a.bf, (acc + a.D[c] * xv) * a.gate[m * a.Di + c]);
      if (a.snap) std::memcpy(a.snap_ssm + t * a.snap_stride + (a.b * a.Di + c) * N, s, sizeof(float) * N);
    }
  }
}

// Mamba-2: heads [h0, h1) of row b, T tokens. dA = exp(dt A_h) is one scalar per head and token.
struct Ssm2Args {
  int64_t T, b, h0, h1, H, P, N, G, d_ssm, Oin, off_z, off_dt, conv_dim, d_inner, d_mlp;
  bool bf, snap, clamp, rmsnorm, D_hdim;
  float lo, hi;
  const float *xz, *xbc, *A, *D, *bias;
  float *state, *y, *snap_ssm;
  int64_t snap_stride;
};

HISS_INLINE void ssm2_impl(const Ssm2Args& a) {
  const int64_t N = a.N, P = a.P;
  const bool vec = N % 8 == 0;
  const int64_t hpg = a.H / a.G;
  for (int64_t h = a.h0; h < a.h1; ++h) {
    const int64_t g = h / hpg;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t m = a.b * a.T + t;
      const float* u = a.xz + m * a.Oin;
      float d = softplus_s(u[a.off_dt + h] + a.bias[h]);
      if (a.clamp) d = std::min(std::max(d, a.lo), a.hi);
      const float dA = std::exp(d * a.A[h]);
      const float* xr = a.xbc + m * a.conv_dim;
      const float* Bv = xr + a.d_ssm + g * N;
      const float* Cv = xr + a.d_ssm + a.G * N + g * N;
      float* yr = a.y + m * a.d_inner + a.d_mlp;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t ch = h * P + p;
        float* s = a.state + ((a.b * a.H + h) * P + p) * N;
        const float xv = xr[ch], dx = d * xv;
        float acc;
        if (vec) {
          const v8f vda = splat<v8f>(dA), vdx = splat<v8f>(dx);
          v8f va = {};
          for (int64_t n = 0; n < N; n += 8) {
            v8f sv = vda * vload<v8f>(s + n) + vdx * vload<v8f>(Bv + n);
            vstore(s + n, sv);
            va += sv * vload<v8f>(Cv + n);
          }
          acc = hsum(va);
        } else {
          acc = 0.f;
          for (int64_t n = 0; n < N; ++n) {
            const float sv = dA * s[n] + dx * Bv[n];
            s[n] = sv;
            acc += sv * Cv[n];
          }
        }
        float out = acc + (a.D_hdim ? a.D[ch] : a.D[h]) * xv;
        if (!a.rmsnorm) out *= silu_s(u[a.off_z + ch]);
        yr[ch] = rb(a.bf, out);
        if (a.snap) std::memcpy(a.snap_ssm + t * a.snap_stride + ((a.b * a.H + h) * P + p) * N, s, sizeof(float) * N);
      }
    }
  }
}

void ssm1_base(const Ssm1Args& a) { ssm1_impl(a); }
void ssm2_base(const Ssm2Args& a) { ssm2_impl(a); }
void gemv_f32_base_(const float* W, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                    const float* bias, int64_t o0, int64_t o1, bool rnd) {
  gemv_impl<float>(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd);
}
void gemv_bf16_base_(const uint16_t* W, int64_t K, const float* x, const float* xd, int64_t ldx, int64_t M, float* y,
                     int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd) {
  gemv_bf16_impl(W, K, x, xd, ldx, M, y, ldy, bias, o0, o1, rnd);
}
void gemv_i8_base_(const int8_t* W, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                   const float* bias, int64_t o0, int64_t o1, bool rnd, const float* scale) {
  gemv_impl<int8_t>(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd, scale);
}
#if HISS_HAVE_AVX2
__attribute__((target("avx2,fma"))) void ssm1_avx2(const Ssm1Args& a) { ssm1_impl(a); }
__attribute__((target("avx2,fma"))) void ssm2_avx2(const Ssm2Args& a) { ssm2_impl(a); }
__attribute__((target("avx2,fma"))) void gemv_f32_avx2_(const float* W, int64_t K, const float* x, int64_t ldx,
                                                         int64_t M, float* y, int64_t ldy, const float* bias,
                                                         int64_t o0, int64_t o1, bool rnd) {
  gemv_impl<float>(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd);
}
__attribute__((target("avx2,fma"))) void gemv_bf16_avx2_(const uint16_t* W, int64_t K, const float* x, const float* xd,
                                                          int64_t ldx, int64_t M, float* y, int64_t ldy,
                                                          const float* bias, int64_t o0, int64_t o1, bool rnd) {
  gemv_bf16_impl(W, K, x, xd, ldx, M, y, ldy, bias, o0, o1, rnd);
}
#endif

#if HISS_HAVE_AVX2
// int8 GEMV, AVX2 + FMA: gemv_impl<int8_t>'s loop with the widening as vpmovsxbd (8 bytes -> 8 int32) + vcvtdq2ps;
// written with intrinsics in a target region (GCC lowers the vector-extension int8 -> int32 conversion lane by
// lane, and a target-specific intrinsic cannot be inlined into the generic template)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
HISS_INLINE v8f i8x8_avx2(const int8_t* p) {
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <int MM>
HISS_INLINE void gemv_i8_rows4_avx2(const int8_t* w0, const int8_t* w1, const int8_t* w2, const int8_t* w3,
                                    int64_t K, const float* xm, int64_t ldx, float (*s)[4], bool prefetch) {
  const int64_t K8 = K / 8 * 8;
  v8f a[MM][4] = {};
  for (int64_t k = 0; k < K8; k += 8) {
    // The 4 rows are one contiguous 4K-byte stream consumed 32 bytes per iteration: one line of it per 2
    // iterations, to L2 32 KB ahead and to L1 2 KB ahead. (Measured on one core here: 10-12 GB/s of int8 weights
    // against 7-9 with the fp32 kernel's per-row prefetch 4 KB ahead; the int8 loop's widening leaves fewer
    // cycles for the out-of-order window to find misses, so they are asked for earlier.)
    if (prefetch && (k & 15) == 0) {
      __builtin_prefetch(w0 + 4 * k + 32768, 0, 2);
      __builtin_prefetch(w0 + 4 * k + 2048, 0, 3);
    }
    const v8f v0 = i8x8_avx2(w0 + k), v1 = i8x8_avx2(w1 + k), v2 = i8x8_avx2(w2 + k), v3 = i8x8_avx2(w3 + k);
    for (int i = 0; i < MM; ++i) {
      const v8f xv = vload<v8f>(xm + i * ldx + k);
      a[i][0] += v0 * xv, a[i][1] += v1 * xv, a[i][2] += v2 * xv, a[i][3] += v3 * xv;
    }
  }
  for (int i = 0; i < MM; ++i) {
    const float* x = xm + i * ldx;
    for (int r = 0; r < 4; ++r) s[i][r] = hsum(a[i][r]);
    for (int64_t k = K8; k < K; ++k) {
      s[i][0] += (float)w0[k] * x[k], s[i][1] += (float)w1[k] * x[k];
      s[i][2] += (float)w2[k] * x[k], s[i][3] += (float)w3[k] * x[k];
    }
  }
}
void gemv_i8_avx2_(const int8_t* W, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                   const float* bias, int64_t o0, int64_t o1, bool rnd, const float* scale) {
  for (int64_t o = o0; o < o1; o += 4) {
    const int64_t nr = std::min<int64_t>(4, o1 - o);
    const int8_t* w0 = W + o * K;
    const int8_t* w1 = w0 + (nr > 1 ? K : 0);
    const int8_t* w2 = w0 + (nr > 2 ? 2 * K : 0);
    const int8_t* w3 = w0 + (nr > 3 ? 3 * K : 0);
    for (int64_t m = 0; m < M;) {
      float s[2][4];
      const int mm = M - m >= 2 ? 2 : 1;
      if (mm == 2)
        gemv_i8_rows4_avx2<2>(w0, w1, w2, w3, K, x + m * ldx, ldx, s, m == 0);
      else
        gemv_i8_rows4_avx2<1>(w0, w1, w2, w3, K, x + m * ldx, ldx, s, m == 0);
      for (int i = 0; i < mm; ++i) {
        float* ym = y + (m + i) * ldy + o;
        for (int64_t r = 0; r < nr; ++r) {
          const float v = s[i][r] * scale[o + r] + (bias ? bias[o + r] : 0.f);
          ym[r] = rnd ? rbf(v) : v;
        }
      }
      m += mm;
    }
  }
}
#pragma GCC pop_options
#endif

}  // namespace ms

inline void DecodeModel::gemv_f32(bool avx2, const float* W, int64_t K, const float* x, int64_t ldx, int64_t M,
                                  float* y, int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd) {
#if HISS_HAVE_AVX2
  if (avx2) return ms::gemv_f32_avx2_(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd);
#endif
  ms::gemv_f32_base_(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd);
}
inline void DecodeModel::gemv_bf16(bool avx2, const uint16_t* W, int64_t K, const float* x, const float* xd,
                                   int64_t ldx, int64_t M, float* y, int64_t ldy, const float* bias, int64_t o0,
                                   int64_t o1, bool rnd) {
#if HISS_HAVE_AVX2
  if (avx2) return ms::gemv_bf16_avx2_(W, K, x, xd, ldx, M, y, ldy, bias, o0, o1, rnd);
#endif
  ms::gemv_bf16_base_(W, K, x, xd, ldx, M, y, ldy, bias, o0, o1, rnd);
}
inline void DecodeModel::gemv_i8(bool avx2, const int8_t* W, int64_t K, const float* x, int64_t ldx, int64_t M,
                                 float* y, int64_t ldy, const float* bias, int64_t o0, int64_t o1, bool rnd,
                                 const float* scale) {
#if HISS_HAVE_AVX2
  if (avx2) return ms::gemv_i8_avx2_(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd, scale);
#endif
  ms::gemv_i8_base_(W, K, x, ldx, M, y, ldy, bias, o0, o1, rnd, scale);
}

inline void DecodeModel::ssm1_range(Layer& L, int64_t b, int64_t c0, int64_t c1) {
  ms::Ssm1Args a;
  a.T = T_, a.b = b, a.c0 = c0, a.c1 = c1, a.Di = L.Di, a.N = L.N, a.Oin = L.in_proj.O;
  a.ldbc = L.selective ? L.x_proj.O : 0, a.R = L.R;
  a.selective = L.selective, a.bf = bf_, a.snap = snapshots_;
  a.xz = big_.data(), a.xc = xc_.data(), a.dbc = dbc_.data(), a.dt = dt_.data();
  a.A = L.A.data_ptr<float>(), a.D = L.D.data_ptr<float>(), a.bias = L.dt_bias.data_ptr<float>();
  a.Bfix = L.selective ? nullptr : L.Bfix.data_ptr<float>();
  a.Cfix = L.selective ? nullptr : L.Cfix.data_ptr<float>();
  a.state = L.ssm_state.data_ptr<float>(), a.y = y_.data();
  a.snap_ssm = snapshots_ ? L.snap_ssm.data() : nullptr;
  a.snap_stride = L.ssm_state.numel();
  a.gate = gate_.data(), a.delta = dl_.data();
#if HISS_HAVE_AVX2
  if (isa() != "base") return ms::ssm1_avx2(a);
#endif
  ms::ssm1_base(a);
}

inline void DecodeModel::ssm2_range(Layer& L, int64_t b, int64_t h0, int64_t h1) {
  ms::Ssm2Args a;
  a.T = T_, a.b = b, a.h0 = h0, a.h1 = h1, a.H = L.H, a.P = L.P, a.N = L.N, a.G = L.G, a.d_ssm = L.d_ssm;
  a.Oin = L.in_proj.O, a.off_z = 2 * L.d_mlp, a.off_dt = 2 * L.d_mlp + L.d_ssm + L.conv_dim;
  a.conv_dim = L.conv_dim, a.d_inner = L.d_inner, a.d_mlp = L.d_mlp;
  a.bf = bf_, a.snap = snapshots_, a.clamp = L.clamp, a.rmsnorm = L.rmsnorm, a.D_hdim = L.D_hdim;
  a.lo = L.dt_lo, a.hi = L.dt_hi;
  a.xz = big_.data(), a.xbc = xc_.data(), a.A = L.A.data_ptr<float>(), a.D = L.D.data_ptr<float>();
  a.bias = L.dt_bias.data_ptr<float>();
  a.state = L.ssm_state.data_ptr<float>(), a.y = y_.data();
  a.snap_ssm = snapshots_ ? L.snap_ssm.data() : nullptr;
  a.snap_stride = L.ssm_state.numel();
#if HISS_HAVE_AVX2
  if (isa() != "base") return ms::ssm2_avx2(a);
#endif
  ms::ssm2_base(a);
}

}  // namespace hiss
