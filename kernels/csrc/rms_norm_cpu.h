// (Gated) RMSNorm, CPU: forward and backward of ssm_core.ops.norm.rms_norm_gated's default form (Mamba-2's
// output norm) and, without z, of rms_norm (every block's pre-norm).
//
//   per row and group of `size` channels:  h = x * silu(z)  (h = x without z),
//   r = 1 / sqrt(mean(h^2) + eps),  out = h * r * w
// Backward, with xhat = h r and go' = dout * w:
//   dh = r (go' - xhat <go', xhat> / size),  dx = dh * silu(z),  dz = dh * x * silu'(z),  dw = sum_rows dout * xhat
// silu'(z) = sig (1 + z (1 - sig)). Forward keeps r (one value per row and group); backward recomputes the rest.
// Parallel over blocks of kNormRows rows; each block writes its own dw partial row, summed afterwards in a fixed
// order (fp64): results do not depend on the thread count. x, z, dout: rows with a unit channel stride and any
// row stride (z is usually a slice of in_proj's output).

#pragma once

#include "common.h"

namespace hiss {

constexpr int64_t kNormRows = 64;

template <typename T>
struct NormArgs {
  int64_t n = 0, C = 0, size = 0, xs = 0, zs = 0, gs = 0, nblk = 0;  // rows, channels, group, row strides, blocks
  T eps = 0;
  const T *x = nullptr, *z = nullptr, *w = nullptr, *dout = nullptr;
  T *out = nullptr, *r = nullptr, *dx = nullptr, *dz = nullptr, *part = nullptr;  // r: (n, C / size)
};

// h = x * silu(z) (or x) for channels [c0, c1) into h (and silu(z), sig into g, sg when given); returns sum h^2.
template <typename T>
HISS_INLINE T norm_gate(const T* x, const T* z, int64_t c0, int64_t c1, T* h, T* g, T* sg) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  V ssv = {};
  int64_t c = c0;
  for (; c + VW <= c1; c += VW) {
    V hv = vload<V>(x + c);
    if (z) {
      const V zv = vload<V>(z + c), s = vsigmoid(zv), gv = zv * s;
      hv *= gv;
      if (g) vstore(g + c, gv), vstore(sg + c, s);
    }
    vstore(h + c, hv);
    ssv += hv * hv;
  }
  T ss = hsum(ssv);
  for (; c < c1; ++c) {
    T hv = x[c];
    if (z) {
      const T s = T(1) / (T(1) + std::exp(-z[c])), gv = z[c] * s;
      hv *= gv;
      if (g) g[c] = gv, sg[c] = s;
    }
    h[c] = hv;
    ss += hv * hv;
  }
  return ss;
}

template <typename T>
HISS_INLINE void norm_fwd_rows(const NormArgs<T>& a, int64_t r0, int64_t r1) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int64_t ng = a.C / a.size;
  for (int64_t row = r0; row < r1; ++row) {
    const T* x = a.x + row * a.xs;
    const T* z = a.z ? a.z + row * a.zs : nullptr;
    T* o = a.out + row * a.C;
    for (int64_t grp = 0; grp < ng; ++grp) {
      const int64_t c0 = grp * a.size, c1 = c0 + a.size;
      const T rr = T(1) / std::sqrt(norm_gate<T>(x, z, c0, c1, o, nullptr, nullptr) / T(a.size) + a.eps);
      a.r[row * ng + grp] = rr;
      int64_t c = c0;
      for (; c + VW <= c1; c += VW)
        vstore(o + c, a.w ? vload<V>(o + c) * rr * vload<V>(a.w + c) : vload<V>(o + c) * rr);
      for (; c < c1; ++c) o[c] = a.w ? o[c] * rr * a.w[c] : o[c] * rr;
    }
  }
}

template <typename T>
HISS_INLINE void norm_bwd_blocks(const NormArgs<T>& a, int64_t q0, int64_t q1) {
  typedef typename VT<T>::V V;
  constexpr int VW = VT<T>::W;
  const int64_t C = a.C, ng = C / a.size;
  std::vector<T> scratch((size_t)(3 * C));
  T *xh = scratch.data(), *g = xh + C, *sg = g + C;  // xhat (first h), silu(z), sigmoid(z) of one row
  for (int64_t q = q0; q < q1; ++q) {
    T* pw = a.w ? a.part + q * C : nullptr;
    if (pw) std::fill(pw, pw + C, T(0));
    for (int64_t row = q * kNormRows; row < std::min((q + 1) * kNormRows, a.n); ++row) {
      const T* x = a.x + row * a.xs;
      const T* z = a.z ? a.z + row * a.zs : nullptr;
      const T* go = a.dout + row * a.gs;
      T *dx = a.dx + row * C, *dz = a.z ? a.dz + row * C : nullptr;
      for (int64_t grp = 0; grp < ng; ++grp) {
        const int64_t c0 = grp * a.size, c1 = c0 + a.size;
        const T rr = a.r[row * ng + grp];
        norm_gate<T>(x, z, c0, c1, xh, g, sg);
        // xhat = h r; dw += dout xhat; dot = <dout w, xhat>
        V dv = {};
        T dot = 0;
        int64_t c = c0;
        for (; c + VW <= c1; c += VW) {
          const V xv = vload<V>(xh + c) * rr, gv = vload<V>(go + c);
          vstore(xh + c, xv);
          if (pw) vstore(pw + c, vload<V>(pw + c) + gv * xv);
          dv += (a.w ? gv * vload<V>(a.w + c) : gv) * xv;
        }
        for (; c < c1; ++c) {
          const T xv = xh[c] * rr;
          xh[c] = xv;
          if (pw) pw[c] += go[c] * xv;
          dot += (a.w ? go[c] * a.w[c] : go[c]) * xv;
        }
        const T proj = -(dot + hsum(dv)) / T(a.size);
        for (c = c0; c + VW <= c1; c += VW) {
          const V gv = vload<V>(go + c);
          const V dh = ((a.w ? gv * vload<V>(a.w + c) : gv) + vload<V>(xh + c) * proj) * rr;
          if (z) {
            const V s = vload<V>(sg + c), zv = vload<V>(z + c);
            vstore(dx + c, dh * vload<V>(g + c));
            vstore(dz + c, dh * vload<V>(x + c) * s * (T(1) + zv * (T(1) - s)));
          } else {
            vstore(dx + c, dh);
          }
        }
        for (; c < c1; ++c) {
          const T dh = ((a.w ? go[c] * a.w[c] : go[c]) + xh[c] * proj) * rr;
          if (z) {
            dx[c] = dh * g[c];
            dz[c] = dh * x[c] * sg[c] * (T(1) + z[c] * (T(1) - sg[c]));
          } else {
            dx[c] = dh;
          }
        }
      }
    }
  }
}

struct NormFwd {
  template <typename T>
  static HISS_INLINE void run(const NormArgs<T>& a, int64_t b, int64_t e) {
    norm_fwd_rows<T>(a, b, e);
  }
};
struct NormBwd {
  template <typename T>
  static HISS_INLINE void run(const NormArgs<T>& a, int64_t b, int64_t e) {
    norm_bwd_blocks<T>(a, b, e);
  }
};

// A (rows, C) operand with a unit channel stride (any row stride) of the given dtype, or undefined.
static at::Tensor norm_rows(const c10::optional<at::Tensor>& t, at::ScalarType st, int64_t n, int64_t C,
                            const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == C && t->scalar_type() == st, name,
              ": expected (", n, ", ", C, ") of ", st, ", got ", t->sizes(), " ", t->scalar_type());
  return t->stride(1) == 1 && t->stride(0) >= C ? *t : t->contiguous();
}

template <typename T>
static NormArgs<T> norm_args(const at::Tensor& x, const at::Tensor& z, const at::Tensor& w, double eps, int64_t size) {
  NormArgs<T> a;
  a.n = x.size(0), a.C = x.size(1), a.size = size, a.eps = T(eps), a.nblk = (a.n + kNormRows - 1) / kNormRows;
  a.x = x.data_ptr<T>(), a.xs = x.stride(0);
  if (z.defined()) a.z = z.data_ptr<T>(), a.zs = z.stride(0);
  a.w = w.defined() ? w.data_ptr<T>() : nullptr;
  return a;
}

// x, z: (n, C); weight (C,) or None -> (out (n, C), r (n, C / size))
inline std::vector<at::Tensor> norm_fwd(const at::Tensor& x_, const c10::optional<at::Tensor>& z_,
                                        const c10::optional<at::Tensor>& weight, double eps, int64_t size) {
  TORCH_CHECK(x_.dim() == 2, "rms_norm: x must be (rows, channels)");
  const auto st = x_.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "rms_norm: float32 or float64 only, got ", st);
  const int64_t n = x_.size(0), C = x_.size(1);
  TORCH_CHECK(size >= 1 && C % size == 0, "rms_norm: group size ", size, " does not divide ", C, " channels");
  const at::Tensor x = norm_rows(x_, st, n, C, "x"), z = norm_rows(z_, st, n, C, "z");
  const at::Tensor w = opt_check(weight, st, "weight", {C});
  at::Tensor out = at::empty({n, C}, x.options()), r = at::empty({n, C / size}, x.options());
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_norm_fwd", [&] {
    NormArgs<scalar_t> a = norm_args<scalar_t>(x, z, w, eps, size);
    a.out = out.data_ptr<scalar_t>(), a.r = r.data_ptr<scalar_t>();
    const auto fn = pick_isa<NormFwd, NormArgs<scalar_t>>();
    const int64_t grain = std::max<int64_t>(grain_of(n), (int64_t(1) << 14) / std::max<int64_t>(C, 1));
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {out, r};
}

// -> (dx (n, C), dz (n, C) or undefined, dw partials (blocks, C) or undefined: sum over dim 0)
inline std::vector<at::Tensor> norm_bwd(const at::Tensor& x_, const c10::optional<at::Tensor>& z_,
                                        const c10::optional<at::Tensor>& weight, int64_t size,
                                        const at::Tensor& r, const at::Tensor& dout_) {
  const auto st = x_.scalar_type();
  TORCH_CHECK(x_.dim() == 2 && (st == at::kFloat || st == at::kDouble), "rms_norm: x (rows, channels), fp32/fp64");
  const int64_t n = x_.size(0), C = x_.size(1);
  TORCH_CHECK(size >= 1 && C % size == 0, "rms_norm: group size ", size, " does not divide ", C, " channels");
  const at::Tensor x = norm_rows(x_, st, n, C, "x"), z = norm_rows(z_, st, n, C, "z");
  const at::Tensor dout = norm_rows(dout_, st, n, C, "dout"), w = opt_check(weight, st, "weight", {C});
  TORCH_CHECK(r.sizes() == at::IntArrayRef({n, C / size}) && r.scalar_type() == st && r.is_contiguous(),
              "rms_norm: r must be the forward's (rows, groups)");
  at::Tensor dx = at::empty({n, C}, x.options()), dz, part;
  if (z.defined()) dz = at::empty({n, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_norm_bwd", [&] {
    NormArgs<scalar_t> a = norm_args<scalar_t>(x, z, w, 0.0, size);  // eps lives in r, the forward's 1/rms
    if (w.defined()) part = at::empty({a.nblk, C}, x.options()), a.part = part.data_ptr<scalar_t>();
    a.dout = dout.data_ptr<scalar_t>(), a.gs = dout.stride(0), a.r = r.data_ptr<scalar_t>();
    a.dx = dx.data_ptr<scalar_t>(), a.dz = dz.defined() ? dz.data_ptr<scalar_t>() : nullptr;
    const auto fn = pick_isa<NormBwd, NormArgs<scalar_t>>();
    at::parallel_for(0, a.nblk, 1, [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {dx, dz, part};
}

}  // namespace hiss
