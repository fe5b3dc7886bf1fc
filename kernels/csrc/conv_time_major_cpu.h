// Depthwise causal conv1d on time-major inputs, CPU: forward and backward of
// ssm_core.ops.conv.causal_conv1d_time_major (Mamba-2's conv over (x, B, C), read in in_proj's layout).
//
//   xp: (batch, L + W - 1, dim), the state's W - 1 inputs then x;   wt: (W, dim), tap k's weights as a row
//   pre[t] = bias + sum_k wt[k] * xp[t + k]      (whole rows: channels are contiguous, so a row is vectors)
//   out[t] = silu(pre[t]) when asked
//
// Backward saves nothing but xp: it recomputes pre, forms dpre = dout * silu'(pre), and
//   dxp[j] = sum_k wt[k] * dpre[j - k],   dwt[k] = sum_t dpre[t] * xp[t + k],   dbias = sum_t dpre[t].
// Parallel over (batch, blocks of kTMRows padded positions j); a block recomputes the W - 1 rows of dpre it
// shares with the previous block, writes its own dxp rows and its own partial (dwt, dbias) rows, which the
// caller sums in a fixed order (fp64): results do not depend on the thread count.

#pragma once

#include "common.h"

namespace hiss {

constexpr int64_t kTMRows = 64;  // padded positions per backward block (its dpre scratch stays in L2)

template <typename T>
struct ConvTMArgs {
  int64_t batch = 0, L = 0, dim = 0, W = 0, nblk = 0;  // nblk: backward blocks per batch row
  bool silu = false;
  const T *xp = nullptr, *wt = nullptr, *bias = nullptr, *dout = nullptr;
  T *out = nullptr, *dxp = nullptr, *part = nullptr;  // part: (batch * nblk, W + 1, dim), dwt rows then dbias
};

// One time step, all channels, from xrow (the step's first tap row); pre = bias + sum_k wt[k] * xrow[k]:
//   kOut:  dst = silu(pre) or pre (a.silu);   kGrad: dst = go * silu'(pre) or go, with silu'(p) = sig (1 + p (1 - sig)).
// The activation stays in registers (a second pass over the row cost more than the taps).
enum TMRow { kOut, kGrad };
template <typename T, int KW, TMRow M>
HISS_INLINE void tm_row(const ConvTMArgs<T>& a, const T* xrow, T* dst, const T* go) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int W = KW > 0 ? KW : (int)a.W;
  const int64_t d = a.dim;
  int64_t c = 0;
  for (; c + VW <= d; c += VW) {
    V p = a.bias ? vload<V>(a.bias + c) : V{};
    for (int k = 0; k < W; ++k) p += vload<V>(a.wt + k * d + c) * vload<V>(xrow + k * d + c);
    if (M == kOut) {
      vstore(dst + c, a.silu ? p * vsigmoid(p) : p);
    } else if (a.silu) {
      const V sg = vsigmoid(p);
      vstore(dst + c, vload<V>(go + c) * sg * (T(1) + p * (T(1) - sg)));
    } else {
      vstore(dst + c, vload<V>(go + c));
    }
  }
  for (; c < d; ++c) {
    T p = a.bias ? a.bias[c] : T(0);
    for (int k = 0; k < W; ++k) p += a.wt[k * d + c] * xrow[k * d + c];
    const T sg = T(1) / (T(1) + std::exp(-p));
    if (M == kOut)
      dst[c] = a.silu ? p * sg : p;
    else
      dst[c] = a.silu ? go[c] * sg * (T(1) + p * (T(1) - sg)) : go[c];
  }
}

// Forward over output rows r = b * L + t in [r0, r1).
template <typename T, int KW>
HISS_INLINE void conv_tm_fwd_rows(const ConvTMArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t d = a.dim, Lp = a.L + a.W - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.L, t = r % a.L;
    tm_row<T, KW, kOut>(a, a.xp + (b * Lp + t) * d, a.out + r * d, nullptr);
  }
}

// Backward over blocks q = b * nblk + i in [q0, q1): padded positions j in [i R, min((i + 1) R, L + W - 1)).
template <typename T, int KW>
HISS_INLINE void conv_tm_bwd_blocks(const ConvTMArgs<T>& a, int64_t q0, int64_t q1) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int W = KW > 0 ? KW : (int)a.W;
  const int64_t d = a.dim, L = a.L, Lp = L + W - 1, R = kTMRows;
  std::vector<T> scratch((size_t)((R + W - 1) * d));
  T* dp = scratch.data();  // dp[(t - t0) * d + c] = dpre[t, c]
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t b = q / a.nblk, s = (q % a.nblk) * R, e = std::min(s + R, Lp);
    const int64_t t0 = std::max<int64_t>(0, s - (W - 1)), t1 = std::min(e, L);  // the dpre that feed [s, e)
    const T* xb = a.xp + b * Lp * d;
    for (int64_t t = t0; t < t1; ++t)
      tm_row<T, KW, kGrad>(a, xb + t * d, dp + (t - t0) * d, a.dout + (b * L + t) * d);
    // dxp[j] = sum over taps k with t = j - k in [t0, t1) of wt[k] dpre[t]
    for (int64_t j = s; j < e; ++j) {
      T* dst = a.dxp + (b * Lp + j) * d;
      const int klo = (int)std::max<int64_t>(0, j - (t1 - 1)), khi = (int)std::min<int64_t>(W - 1, j - t0);
      int64_t c = 0;
      for (; c + VW <= d; c += VW) {
        V acc = {};
        for (int k = klo; k <= khi; ++k) acc += vload<V>(a.wt + k * d + c) * vload<V>(dp + (j - k - t0) * d + c);
        vstore(dst + c, acc);
      }
      for (; c < d; ++c) {
        T acc = 0;
        for (int k = klo; k <= khi; ++k) acc += a.wt[k * d + c] * dp[(j - k - t0) * d + c];
        dst[c] = acc;
      }
    }
    // this block's share of dwt / dbias: the steps t it owns, [s, min(e, L))
    T* pw = a.part + q * (W + 1) * d;
    std::fill(pw, pw + (W + 1) * d, T(0));
    for (int64_t t = s; t < t1; ++t) {
      const T* g = dp + (t - t0) * d;
      const T* xr = xb + t * d;
      int64_t c = 0;
      for (; c + VW <= d; c += VW) {
        const V gv = vload<V>(g + c);
        for (int k = 0; k < W; ++k) vstore(pw + k * d + c, vload<V>(pw + k * d + c) + gv * vload<V>(xr + k * d + c));
        vstore(pw + W * d + c, vload<V>(pw + W * d + c) + gv);
      }
      for (; c < d; ++c) {
        for (int k = 0; k < W; ++k) pw[k * d + c] += g[c] * xr[k * d + c];
        pw[W * d + c] += g[c];
      }
    }
  }
}

// ISA variants as for the channel-major conv; W = 4 (every Mamba block) gets its taps unrolled.
HISS_WIDTH_KERNEL(ConvTMFwd, ConvTMArgs, conv_tm_fwd_rows);
HISS_WIDTH_KERNEL(ConvTMBwd, ConvTMArgs, conv_tm_bwd_blocks);

template <typename T>
static ConvTMArgs<T> conv_tm_args(const at::Tensor& xp, const at::Tensor& wt, const at::Tensor& bias, bool silu) {
  ConvTMArgs<T> a;
  a.W = wt.size(0), a.dim = wt.size(1), a.batch = xp.size(0), a.L = xp.size(1) - (a.W - 1), a.silu = silu;
  a.nblk = (a.L + a.W - 1 + kTMRows - 1) / kTMRows;
  a.xp = xp.data_ptr<T>(), a.wt = wt.data_ptr<T>(), a.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
  return a;
}

static at::Tensor conv_tm_check(const at::Tensor& xp, const at::Tensor& wt, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(xp.dim() == 3 && wt.dim() == 2 && xp.size(2) == wt.size(1), "xp (batch, L + W - 1, dim), wt (W, dim)");
  const auto st = xp.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "causal_conv1d_time_major: float32 or float64 only, got ", st);
  TORCH_CHECK(wt.scalar_type() == st && xp.is_contiguous() && wt.is_contiguous(), "xp, wt: contiguous, one dtype");
  TORCH_CHECK(wt.size(0) >= 1 && wt.size(0) <= 64 && xp.size(1) >= wt.size(0), "width in [1, 64] and L >= 1");
  return opt_check(bias, st, "bias", {wt.size(1)});
}

// -> out (batch, L, dim)
inline at::Tensor conv_tm_fwd(const at::Tensor& xp, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                              bool silu) {
  const at::Tensor bc = conv_tm_check(xp, wt, bias);
  const int64_t W = wt.size(0), L = xp.size(1) - (W - 1), d = wt.size(1);
  at::Tensor out = at::empty({xp.size(0), L, d}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "hiss_conv_tm_fwd", [&] {
    ConvTMArgs<scalar_t> a = conv_tm_args<scalar_t>(xp, wt, bc, silu);
    a.out = out.data_ptr<scalar_t>();
    const auto fn = pick_isa<ConvTMFwd, ConvTMArgs<scalar_t>>();
    const int64_t rows = a.batch * L, grain = std::max<int64_t>(grain_of(rows), (int64_t(1) << 14) / std::max<int64_t>(d, 1));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return out;
}

// -> (dxp (batch, L + W - 1, dim), partials (batch * blocks, W + 1, dim): sum over dim 0 for (dwt; dbias))
inline std::vector<at::Tensor> conv_tm_bwd(const at::Tensor& xp, const at::Tensor& wt,
                                           const c10::optional<at::Tensor>& bias, bool silu, const at::Tensor& dout) {
  const at::Tensor bc = conv_tm_check(xp, wt, bias);
  const int64_t W = wt.size(0), L = xp.size(1) - (W - 1), d = wt.size(1);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({xp.size(0), L, d}) && dout.scalar_type() == xp.scalar_type() &&
                  dout.is_contiguous(), "dout: contiguous (batch, L, dim) of xp's dtype");
  at::Tensor dxp = at::empty_like(xp), part;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "hiss_conv_tm_bwd", [&] {
    ConvTMArgs<scalar_t> a = conv_tm_args<scalar_t>(xp, wt, bc, silu);
    part = at::empty({a.batch * a.nblk, W + 1, d}, xp.options());
    a.dout = dout.data_ptr<scalar_t>(), a.dxp = dxp.data_ptr<scalar_t>(), a.part = part.data_ptr<scalar_t>();
    const auto fn = pick_isa<ConvTMBwd, ConvTMArgs<scalar_t>>();
    at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {dxp, part};
}

}  // namespace hiss
