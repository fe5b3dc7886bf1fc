// Decode-step selective state update (mamba_ssm's selective_state_update), CPU, in place.
//
//   dt = softplus(dt + dt_bias) (when asked),  s <- exp(dt A) s + dt x B,  out = <s, C> + D x,
//   out *= silu(z)
//
// One canonical layout: state (batch, H, P, N) with unit stride over N; x, dt, z (batch, H, P),
// A (H, P, N), B/C (batch, G, N), D / dt_bias (H, P), all with arbitrary strides. The Mamba-1 layout
// (state (batch, dim, N), B/C (batch, [G,] N)) is read as G heads of dim/G rows through strides alone,
// and a missing group axis as stride 0 (no Python-side views: a decode step is dominated by per-call
// overhead), so Mamba-2's stride-0 broadcast views (dt expanded
// over headdim, A over (headdim, N)) are read without materializing them. A row is one (batch, head,
// p): its B/C (shared by the group) and A row are gathered into padded scratch once, then the state row
// is updated with whole vectors. When A does not vary along N (Mamba-2) exp(dt A) is one scalar per row.

#pragma once

#include "common.h"

namespace hiss {

template <typename T>
struct StepArgs {
  int64_t batch = 0, H = 0, P = 0, N = 0, G = 0;
  bool softplus = false;
  T* state = nullptr;
  int64_t ss[3] = {0, 0, 0};  // state strides (b, h, p); n stride is 1
  const T *x = nullptr, *dt = nullptr, *A = nullptr, *B = nullptr, *C = nullptr, *D = nullptr, *z = nullptr;
  const T* bias = nullptr;
  int64_t sx[3], sdt[3], sz[3], sA[3], sB[3], sC[3], sD[2], sbias[2];
  T* out = nullptr;  // (batch, H, P) contiguous
};

// Rows are taken in blocks (at most 64, never crossing a (batch, head)): dt / softplus, silu(z) and the
// D skip are computed for a whole block with vector math first (scalar exp/log1p per row would cost more
// than the state update itself at N = 16), then each row's state is updated with whole vectors.
constexpr int kStepBlock = 64;

template <typename T>
HISS_INLINE void step_rows(const StepArgs<T>& a, int64_t begin, int64_t end) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  const int64_t N = a.N, Np = (N + W - 1) / W * W;
  const bool a_scalar = a.sA[2] == 0;  // A constant along N (Mamba-2 heads)
  const bool direct = N % W == 0;
  std::vector<T> buf((size_t)(4 * Np), T(0));
  T *Bb = buf.data(), *Cb = Bb + Np, *Ab = Cb + Np, *sb = Ab + Np;
  alignas(32) T dtb[kStepBlock], xb[kStepBlock], gate[kStepBlock];
  int64_t cur_bg = -1;
  for (int64_t r = begin; r < end;) {
    const int64_t p0 = r % a.P, h = (r / a.P) % a.H, b = r / (a.P * a.H);
    const int64_t n_rows = std::min<int64_t>({end - r, a.P - p0, kStepBlock});
    const int64_t g = h / (a.H / a.G);
    if (b * a.G + g != cur_bg) {  // rows of one group run consecutively: gather its B/C once
      cur_bg = b * a.G + g;
      for (int64_t n = 0; n < N; ++n) {
        Bb[n] = a.B[b * a.sB[0] + g * a.sB[1] + n * a.sB[2]];
        Cb[n] = a.C[b * a.sC[0] + g * a.sC[1] + n * a.sC[2]];
      }
    }
    for (int64_t i = 0; i < kStepBlock; ++i) {
      const int64_t p = p0 + std::min(i, n_rows - 1);  // lanes past the block repeat its last row
      dtb[i] = a.dt[b * a.sdt[0] + h * a.sdt[1] + p * a.sdt[2]] + (a.bias ? a.bias[h * a.sbias[0] + p * a.sbias[1]] : T(0));
      xb[i] = a.x[b * a.sx[0] + h * a.sx[1] + p * a.sx[2]];
      gate[i] = a.z ? a.z[b * a.sz[0] + h * a.sz[1] + p * a.sz[2]] : T(1);
    }
    for (int64_t i = 0; i < kStepBlock; i += W) {
      if (a.softplus) vstore(dtb + i, vsoftplus(vload<V>(dtb + i)));
      if (a.z) {
        V zv = vload<V>(gate + i);
        vstore(gate + i, zv * vsigmoid(zv));
      }
    }
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t p = p0 + i;
      const T dt = dtb[i], xv = xb[i];
      const T* Arow = a.A + h * a.sA[0] + p * a.sA[1];
      T* srow = a.state + b * a.ss[0] + h * a.ss[1] + p * a.ss[2];
      // whole vectors in place when N is a multiple of the width; else through the padded scratch
      T* s_ = direct ? srow : sb;
      if (!direct) std::memcpy(sb, srow, sizeof(T) * N);
      const V vdtx = splat<V>(dt * xv);
      V acc = {};
      if (a_scalar) {
        const V da = splat<V>(std::exp(dt * Arow[0]));
        for (int64_t n = 0; n < Np; n += W) {
          V s = da * vload<V>(s_ + n) + vdtx * vload<V>(Bb + n);
          vstore(s_ + n, s);
          acc += s * vload<V>(Cb + n);
        }
      } else {
        const T* A_ = Arow;
        if (!(direct && a.sA[2] == 1)) {
          for (int64_t n = 0; n < N; ++n) Ab[n] = Arow[n * a.sA[2]];
          A_ = Ab;
        }
        const V vdt = splat<V>(dt);
        for (int64_t n = 0; n < Np; n += W) {
          V s = vexp(vdt * vload<V>(A_ + n)) * vload<V>(s_ + n) + vdtx * vload<V>(Bb + n);
          vstore(s_ + n, s);
          acc += s * vload<V>(Cb + n);
        }
      }
      if (!direct) std::memcpy(srow, sb, sizeof(T) * N);  // padded lanes (B = C = 0) stay in the scratch
      T o = hsum(acc);
      if (a.D) o += xv * a.D[h * a.sD[0] + p * a.sD[1]];
      a.out[r + i] = o * gate[i];
    }
    r += n_rows;
  }
}

struct StepRows {
  template <typename T>
  static HISS_INLINE void run(const StepArgs<T>& a, int64_t b, int64_t e) { step_rows<T>(a, b, e); }
};

// Strides of t (rank nd) as the canonical rank: Mamba-1 rows (dim) split into (G, dim / G) at axis `row`.
static void canon_strides(const at::Tensor& t, int64_t* dst, bool m1, int row, int64_t P) {
  int j = 0;
  for (int i = 0; i < t.dim(); ++i) {
    if (m1 && i == row) {
      dst[j++] = P * t.stride(i);
      dst[j++] = t.stride(i);
    } else {
      dst[j++] = t.stride(i);
    }
  }
}

// Updates `state` in place; returns out with x's shape (one token).
inline at::Tensor state_update(at::Tensor state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                               const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                               bool dt_softplus) {
  const bool m1 = state.dim() == 3;
  TORCH_CHECK((state.dim() == 3 || state.dim() == 4) && state.stride(-1) == 1,
              "state must be (batch, dim, N) or (batch, H, P, N) with unit stride over N");
  const auto st = state.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "state_update: float32 or float64 only, got ", st);
  const int64_t batch = state.size(0), N = state.size(-1);
  TORCH_CHECK(A.sizes() == state.sizes().slice(1), "A must be state.shape[1:]");
  TORCH_CHECK(x.sizes() == state.sizes().slice(0, state.dim() - 1) && dt.sizes() == x.sizes(),
              "x, dt must be state.shape[:-1]");
  TORCH_CHECK(B.sizes() == C.sizes() && (B.dim() == 2 || B.dim() == 3) && B.size(0) == batch && B.size(-1) == N,
              "B/C must be (batch, N) or (batch, G, N)");
  const int64_t G = B.dim() == 3 ? B.size(1) : 1, rows = state.size(1);
  TORCH_CHECK(G > 0 && rows % G == 0, "G must divide ", rows);
  const int64_t H = m1 ? G : state.size(1), P = m1 ? rows / G : state.size(2);
  std::vector<const at::Tensor*> all = {&x, &dt, &A, &B, &C};
  if (D.has_value() && D->defined()) all.push_back(&*D);
  if (z.has_value() && z->defined()) all.push_back(&*z);
  if (dt_bias.has_value() && dt_bias->defined()) all.push_back(&*dt_bias);
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->scalar_type() == st && t->device().is_cpu(), "all tensors must be CPU tensors of dtype ", st);
  }
  at::Tensor out = at::empty(x.sizes(), state.options());
  if (batch * H * P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(st, "hiss_state_update", [&] {
    StepArgs<scalar_t> a;
    a.batch = batch, a.H = H, a.P = P, a.N = N, a.G = G, a.softplus = dt_softplus;
    a.state = state.data_ptr<scalar_t>();
    int64_t tmp[4];
    canon_strides(state, tmp, m1, 1, P);
    std::copy(tmp, tmp + 3, a.ss);
    a.x = x.data_ptr<scalar_t>(), a.dt = dt.data_ptr<scalar_t>(), a.A = A.data_ptr<scalar_t>();
    a.B = B.data_ptr<scalar_t>(), a.C = C.data_ptr<scalar_t>();
    canon_strides(x, a.sx, m1, 1, P), canon_strides(dt, a.sdt, m1, 1, P), canon_strides(A, a.sA, m1, 0, P);
    for (auto [X, dst] : {std::make_pair(&B, a.sB), std::make_pair(&C, a.sC)}) {
      if (X->dim() == 2)  // no group axis: one group, stride 0
        dst[0] = X->stride(0), dst[1] = 0, dst[2] = X->stride(1);
      else
        dst[0] = X->stride(0), dst[1] = X->stride(1), dst[2] = X->stride(2);
    }
    if (D.has_value() && D->defined()) {
      TORCH_CHECK(D->sizes() == A.sizes().slice(0, A.dim() - 1), "D must be A.shape[:-1]");
      a.D = D->data_ptr<scalar_t>(), canon_strides(*D, a.sD, m1, 0, P);
    }
    if (z.has_value() && z->defined()) {
      TORCH_CHECK(z->sizes() == x.sizes(), "z must match x");
      a.z = z->data_ptr<scalar_t>(), canon_strides(*z, a.sz, m1, 1, P);
    }
    if (dt_bias.has_value() && dt_bias->defined()) {
      TORCH_CHECK(dt_bias->sizes() == A.sizes().slice(0, A.dim() - 1), "dt_bias must be A.shape[:-1]");
      a.bias = dt_bias->data_ptr<scalar_t>(), canon_strides(*dt_bias, a.sbias, m1, 0, P);
    }
    a.out = out.data_ptr<scalar_t>();
    // A decode step is microseconds of work: only fork threads when there are >= 64k state elements.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(N, 1));
    const auto fn = pick_isa<StepRows, StepArgs<scalar_t>>();
    at::parallel_for(0, batch * H * P, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return out;
}

}  // namespace hiss
