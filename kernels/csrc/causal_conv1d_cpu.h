// Depthwise causal conv1d, CPU: forward (+ final state), backward, decode-step update (mamba_ssm's
// causal_conv1d layouts: x (batch, dim, L), weight (dim, W), bias (dim,), state (batch, dim, W - 1)).
//
//   xp = [initial_state, x]   (length W - 1 + L per row; zeros when no initial state)
//   pre[t] = bias + sum_k w[k] xp[t + k],   out = silu(pre) when asked (fused)
//   seq_idx (batch, L): tap k of output t is dropped when its position's id differs from t's
//   (positions before 0, i.e. the initial state, carry seq_idx[:, 0]).
//
// Forward: parallel over batch*dim rows; each row is copied once into a zero-padded scratch xp so the
// taps are plain shifted vector loads (8 outputs per vector, W taps, silu in registers).
// Backward: parallel over channels (each task owns its channels across the whole batch, so dweight and
// dbias are written without races and summed in a fixed order, fp64 partials); per row it recomputes
// pre, forms dpre = dout * silu'(pre), and gathers dxp[j] = sum_k w[k] dpre[j - k] from a padded
// dpre scratch; d(final state) lands on the last W - 1 positions of dxp, d(initial state) is its head.

#pragma once

#include "common.h"

namespace hiss {

template <typename T>
struct ConvArgs {
  int64_t batch = 0, dim = 0, L = 0, W = 0;
  bool silu = false;
  const T *x = nullptr, *w = nullptr, *bias = nullptr, *init = nullptr;
  const int64_t* seq = nullptr;
  T *out = nullptr, *final = nullptr;  // final: (batch, dim, W - 1), the last W - 1 entries of xp
  // backward
  const T *dout = nullptr, *dfinal = nullptr;
  T *dx = nullptr, *dinit = nullptr;
  double *dw = nullptr, *dbias = nullptr;  // (dim, W), (dim,)
};

// xp row (b, d) into buf[0 .. W-1+L), zero padded up to len_p.
template <typename T>
HISS_INLINE void load_row(const ConvArgs<T>& a, int64_t row, T* xp, int64_t len_p) {
  const int64_t W1 = a.W - 1;
  if (a.init)
    std::memcpy(xp, a.init + row * W1, sizeof(T) * W1);
  else
    std::fill(xp, xp + W1, T(0));
  std::memcpy(xp + W1, a.x + row * a.L, sizeof(T) * a.L);
  std::fill(xp + W1 + a.L, xp + len_p, T(0));
}

// pre-activation of row into pre[0 .. Lp), Lp a multiple of the vector width (tail garbage-free: zeros in).
template <typename T, int KW>
HISS_INLINE void row_pre(const ConvArgs<T>& a, int64_t row, const T* xp, T* pre, int64_t Lp) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int64_t d = row % a.dim, b = row / a.dim;
  const int W = KW > 0 ? KW : (int)a.W;
  const T* w = a.w + d * W;
  const T bv = a.bias ? a.bias[d] : T(0);
  if (!a.seq) {
    V wv[KW > 0 ? KW : 64];  // taps broadcast once per row (stores to pre could otherwise alias w)
    for (int k = 0; k < W; ++k) wv[k] = splat<V>(w[k]);
    const V vb = splat<V>(bv);
    for (int64_t t = 0; t < Lp; t += VW) {
      V acc = vb;
      for (int k = 0; k < W; ++k) acc += wv[k] * vload<V>(xp + t + k);
      vstore(pre + t, acc);
    }
  } else {  // packed sequences: scalar, taps masked by id
    const int64_t* s = a.seq + b * a.L;
    for (int64_t t = 0; t < a.L; ++t) {
      T acc = bv;
      for (int k = 0; k < W; ++k) {
        const int64_t pos = t - (W - 1) + k;
        if (s[pos < 0 ? 0 : pos] == s[t]) acc += w[k] * xp[t + k];
      }
      pre[t] = acc;
    }
    for (int64_t t = a.L; t < Lp; ++t) pre[t] = T(0);
  }
}

template <typename T, int KW>
HISS_INLINE void conv_fwd_rows(const ConvArgs<T>& a, int64_t begin, int64_t end) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int64_t Lp = (a.L + VW - 1) / VW * VW, len_p = Lp + a.W + VW;
  std::vector<T> buf((size_t)(len_p + Lp));
  T *xp = buf.data(), *pre = xp + len_p;
  for (int64_t row = begin; row < end; ++row) {
    load_row(a, row, xp, len_p);
    if (a.final) std::memcpy(a.final + row * (a.W - 1), xp + a.L, sizeof(T) * (a.W - 1));
    row_pre<T, KW>(a, row, xp, pre, Lp);
    T* o = a.out + row * a.L;
    int64_t t = 0;
    for (; t + VW <= a.L; t += VW) {
      V v = vload<V>(pre + t);
      vstore(o + t, a.silu ? v * vsigmoid(v) : v);
    }
    if (t < a.L) {  // tail through the scratch (pre is padded)
      V v = vload<V>(pre + t);
      vstore(pre + t, a.silu ? v * vsigmoid(v) : v);
      for (; t < a.L; ++t) o[t] = pre[t];
    }
  }
}

template <typename T, int KW>
HISS_INLINE void conv_bwd_channels(const ConvArgs<T>& a, int64_t dbegin, int64_t dend) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int W = KW > 0 ? KW : (int)a.W;
  const int64_t W1 = W - 1, L = a.L;
  const int64_t Lp = (L + VW - 1) / VW * VW, len_p = Lp + W + VW;
  const int64_t Jp = (L + W1 + VW - 1) / VW * VW;  // padded-input positions, rounded up
  std::vector<T> buf((size_t)(len_p + Lp + (Jp + 2 * W + VW)));
  T *xp = buf.data(), *pre = xp + len_p, *dpp = pre + Lp;  // dpp[W1 + t] = dpre[t], zeros around
  std::vector<T> dxp((size_t)Jp);
  for (int64_t d = dbegin; d < dend; ++d) {
    const T* w = a.w + d * W;
    double dwd[64] = {0.0};  // W <= 64 checked at entry
    double dbd = 0.0;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t row = b * a.dim + d;
      load_row(a, row, xp, len_p);
      row_pre<T, KW>(a, row, xp, pre, Lp);
      const T* go = a.dout + row * L;
      std::fill(dpp, dpp + Jp + 2 * W + VW, T(0));
      T* dpre = dpp + W1;
      std::memcpy(dpre, go, sizeof(T) * L);  // zeros after L (dpp was cleared): the padded lanes stay 0
      if (a.silu) {  // d silu(v) = sg (1 + v (1 - sg)), vectorized over the padded row
        const V one = splat<V>(1);
        for (int64_t t = 0; t < Lp; t += VW) {
          const V v = vload<V>(pre + t), sg = vsigmoid(v);
          vstore(dpre + t, vload<V>(dpre + t) * (sg * (one + v * (one - sg))));
        }
      }
      // dbias, dweight: dot products of dpre with shifted xp (masked taps contribute nothing)
      V sb = {};
      for (int64_t t = 0; t < Lp; t += VW) sb += vload<V>(dpre + t);
      dbd += hsum(sb);
      const int64_t* s = a.seq ? a.seq + b * L : nullptr;
      for (int k = 0; k < W; ++k) {
        if (!s) {
          V acc = {};
          for (int64_t t = 0; t < Lp; t += VW) acc += vload<V>(dpre + t) * vload<V>(xp + t + k);
          dwd[k] += hsum(acc);
        } else {
          T acc = 0;
          for (int64_t t = 0; t < L; ++t) {
            const int64_t pos = t - W1 + k;
            if (s[pos < 0 ? 0 : pos] == s[t]) acc += dpre[t] * xp[t + k];
          }
          dwd[k] += acc;
        }
      }
      // dxp[j] = sum_k w[k] dpre[j - k] (+ d final state on the last W - 1 positions)
      if (!s) {
        for (int64_t j = 0; j < Jp; j += VW) {
          V acc = {};
          for (int k = 0; k < W; ++k) acc += w[k] * vload<V>(dpp + W1 + j - k);
          vstore(dxp.data() + j, acc);
        }
      } else {
        for (int64_t j = 0; j < L + W1; ++j) {
          T acc = 0;
          for (int k = 0; k < W; ++k) {
            const int64_t t = j - k;  // output index this input feeds through tap k
            if (t < 0 || t >= L) continue;
            const int64_t pos = t - W1 + k;
            if (s[pos < 0 ? 0 : pos] == s[t]) acc += w[k] * dpre[t];
          }
          dxp[j] = acc;
        }
      }
      if (a.dfinal) {
        const T* df = a.dfinal + row * W1;
        for (int64_t i = 0; i < W1; ++i) dxp[L + i] += df[i];
      }
      std::memcpy(a.dx + row * L, dxp.data() + W1, sizeof(T) * L);
      if (a.dinit) std::memcpy(a.dinit + row * W1, dxp.data(), sizeof(T) * W1);
    }
    for (int k = 0; k < W; ++k) a.dw[d * W + k] = dwd[k];
    a.dbias[d] = dbd;
  }
}

// ISA variants: plain target and avx2+fma, chosen at run time like the scan's; W = 4 (every Mamba
// block) gets its taps unrolled.
HISS_WIDTH_KERNEL(ConvFwd, ConvArgs, conv_fwd_rows);
HISS_WIDTH_KERNEL(ConvBwd, ConvArgs, conv_bwd_channels);

struct ConvIn {
  at::Tensor x, w, bias, init, seq;
  int64_t batch, dim, L, W;
};

static ConvIn conv_prepare(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& init) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2 && weight.size(0) == x.size(1), "x (batch, dim, L), weight (dim, W)");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "causal_conv1d: float32 or float64 only, got ", st);
  ConvIn c;
  c.batch = x.size(0), c.dim = x.size(1), c.L = x.size(2), c.W = weight.size(1);
  TORCH_CHECK(c.W >= 1 && c.W <= 64, "causal_conv1d: width must be in [1, 64]");
  TORCH_CHECK(weight.scalar_type() == st, "weight dtype must match x");
  c.x = x.contiguous(), c.w = weight.contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == st && bias->sizes() == at::IntArrayRef({c.dim}), "bias must be (dim,)");
    c.bias = bias->contiguous();
  }
  if (init.has_value() && init->defined()) {
    TORCH_CHECK(init->scalar_type() == st && init->sizes() == at::IntArrayRef({c.batch, c.dim, c.W - 1}),
                "initial_states must be (batch, dim, W - 1) of x's dtype");
    c.init = init->contiguous();
  }
  if (seq_idx.has_value() && seq_idx->defined()) {
    TORCH_CHECK(seq_idx->sizes() == at::IntArrayRef({c.batch, c.L}), "seq_idx must be (batch, L)");
    c.seq = seq_idx->to(at::kLong).contiguous();
  }
  return c;
}

template <typename T>
static ConvArgs<T> conv_args(const ConvIn& c, bool silu) {
  ConvArgs<T> a;
  a.batch = c.batch, a.dim = c.dim, a.L = c.L, a.W = c.W, a.silu = silu;
  a.x = c.x.data_ptr<T>(), a.w = c.w.data_ptr<T>();
  a.bias = c.bias.defined() ? c.bias.data_ptr<T>() : nullptr;
  a.init = c.init.defined() ? c.init.data_ptr<T>() : nullptr;
  a.seq = c.seq.defined() ? c.seq.data_ptr<int64_t>() : nullptr;
  return a;
}

static int64_t conv_grain(int64_t rows, int64_t L) {
  // fork only with >= 32k elements of work; then about one task per thread
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(L, 1)),
                           (rows + nthreads - 1) / nthreads);
}

// -> (out, final_state (batch, dim, W - 1))
inline std::vector<at::Tensor> conv_fwd(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& seq_idx,
                                        const c10::optional<at::Tensor>& initial_states, bool silu) {
  ConvIn c = conv_prepare(x, weight, bias, seq_idx, initial_states);
  at::Tensor out = at::empty({c.batch, c.dim, c.L}, c.x.options());
  at::Tensor fin = at::empty({c.batch, c.dim, c.W - 1}, c.x.options());
  if (c.batch * c.dim > 0 && c.L > 0) {
    AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "hiss_conv_fwd", [&] {
      ConvArgs<scalar_t> a = conv_args<scalar_t>(c, silu);
      a.out = out.data_ptr<scalar_t>();
      a.final = c.W > 1 ? fin.data_ptr<scalar_t>() : nullptr;
      const auto fn = pick_isa<ConvFwd, ConvArgs<scalar_t>>();
      at::parallel_for(0, c.batch * c.dim, conv_grain(c.batch * c.dim, c.L),
                       [&](int64_t b, int64_t e) { fn(a, b, e); });
    });
  }
  if (c.L == 0) fin = c.init.defined() ? c.init.clone() : at::zeros_like(fin);
  return {out, fin};
}

// -> (dx, dweight, dbias, dinitial_states); dbias / dinit undefined when absent
inline std::vector<at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& seq_idx,
                                        const c10::optional<at::Tensor>& initial_states, bool silu,
                                        const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal) {
  ConvIn c = conv_prepare(x, weight, bias, seq_idx, initial_states);
  const auto st = c.x.scalar_type();
  TORCH_CHECK(dout.sizes() == c.x.sizes() && dout.scalar_type() == st, "dout must match x");
  at::Tensor go = dout.contiguous(), gf;
  if (dfinal.has_value() && dfinal->defined()) {
    TORCH_CHECK(dfinal->sizes() == at::IntArrayRef({c.batch, c.dim, c.W - 1}) && dfinal->scalar_type() == st,
                "dfinal must be (batch, dim, W - 1)");
    gf = dfinal->contiguous();
  }
  at::Tensor dx = at::empty_like(c.x);
  at::Tensor dinit = at::empty({c.batch, c.dim, c.W - 1}, c.x.options());
  auto d64 = c.x.options().dtype(at::kDouble);
  at::Tensor dw = at::zeros({c.dim, c.W}, d64), db = at::zeros({c.dim}, d64);
  if (c.batch * c.dim > 0 && c.L > 0) {
    AT_DISPATCH_FLOATING_TYPES(st, "hiss_conv_bwd", [&] {
      ConvArgs<scalar_t> a = conv_args<scalar_t>(c, silu);
      a.dout = go.data_ptr<scalar_t>();
      a.dfinal = gf.defined() ? gf.data_ptr<scalar_t>() : nullptr;
      a.dx = dx.data_ptr<scalar_t>(), a.dinit = dinit.data_ptr<scalar_t>();
      a.dw = dw.data_ptr<double>(), a.dbias = db.data_ptr<double>();
      const auto fn = pick_isa<ConvBwd, ConvArgs<scalar_t>>();
      const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
      const int64_t g = std::max<int64_t>(std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(c.L * c.batch, 1)),
                                          (c.dim + nthreads - 1) / nthreads);
      at::parallel_for(0, c.dim, g, [&](int64_t b, int64_t e) { fn(a, b, e); });
    });
  } else if (gf.defined() && c.L == 0) {  // (unreachable from Python: L >= 1 is checked there)
    dinit.copy_(gf);
  }
  return {dx, dw.to(st), c.bias.defined() ? db.to(st) : at::Tensor(), dinit};
}

// One decode step, in place: state (batch, dim, S >= W - 1) shifted left with x appended; returns out.
inline at::Tensor conv_update(const at::Tensor& x, at::Tensor state, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, bool silu) {
  TORCH_CHECK(x.dim() == 2 && state.dim() == 3 && state.size(0) == x.size(0) && state.size(1) == x.size(1),
              "x (batch, dim), state (batch, dim, S)");
  TORCH_CHECK(state.is_contiguous(), "conv state must be contiguous");
  const auto st = state.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "causal_conv1d_update: float32 or float64 only");
  const int64_t batch = x.size(0), dim = x.size(1), S = state.size(2), W = weight.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim && S >= W - 1, "weight (dim, W) with W - 1 <= S");
  TORCH_CHECK(x.scalar_type() == st && weight.scalar_type() == st, "x, weight, state must share a dtype");
  at::Tensor xc = x.contiguous(), wc = weight.contiguous(), bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == st && bias->sizes() == at::IntArrayRef({dim}), "bias must be (dim,)");
    bc = bias->contiguous();
  }
  at::Tensor out = at::empty({batch, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_conv_update", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *wp = wc.data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    scalar_t *sp = state.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(S + W, 1));
    at::parallel_for(0, batch * dim, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t d = r % dim;
        scalar_t* s = sp + r * S;
        const scalar_t* w = wp + d * W;
        const scalar_t xv = xp[r];
        scalar_t acc = bp ? bp[d] : scalar_t(0);
        for (int64_t k = 0; k < W - 1; ++k) acc += w[k] * s[S - (W - 1) + k];
        acc += w[W - 1] * xv;
        if (S > 0) {
          std::memmove(s, s + 1, sizeof(scalar_t) * (S - 1));
          s[S - 1] = xv;
        }
        op[r] = silu ? silu_s(acc) : acc;
      }
    });
  });
  return out;
}

}  // namespace hiss
