// Helpers shared by the hiss CPU kernels beyond the SIMD maths of simd.h: padded chunk loads and the Δ
// discretization of the scans, optional-argument checks, the thread grain, the parts of the two scans' entry points
// that are alike (ScanPrepared, scan_args, ScanGrads), and the run-time choice between the baseline and the
// avx2+fma build of a kernel (pick_isa). Header-only, included by the kernel files.

#pragma once

#include <mutex>

#include "simd.h"

namespace hiss {

// Load len values (zero padded to Tp, a multiple of the vector width) into a scratch buffer. Whole-vector
// stores, so the vector loads that read the scratch next are forwarded from them: memcpy's overlapping stores of
// an odd length (a 17-token row) stalled every one of those loads and cost ~1/4 of a short scan.
template <typename T>
HISS_INLINE void load_padded(T* dst, const T* src, int64_t len, int64_t Tp) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  int64_t i = 0;
  for (; i + W <= len; i += W) vstore(dst + i, vload<V>(src + i));
  if (i < len) {
    V v = {};
    for (int64_t j = 0; i + j < len; ++j) v[j] = src[i + j];
    vstore(dst + i, v);
    i += W;
  }
  for (; i < Tp; i += W) vstore(dst + i, V{});
}

// Copy a scratch row (written by whole-vector stores) out to len values: whole-vector loads, then a scalar tail, so
// every load is forwarded from one store (memcpy's overlapping loads of an odd length are not).
template <typename T>
HISS_INLINE void store_row(T* dst, const T* src, int64_t len) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  int64_t i = 0;
  for (; i + W <= len; i += W) vstore(dst + i, vload<V>(src + i));
  for (; i < len; ++i) dst[i] = src[i];
}

// dt and dt*u for one chunk of one channel, vectorized over time.
template <typename T>
HISS_INLINE void discretize(int64_t Tp, bool softplus, const T* xd, const T* xu, T bias, T* dt, T* dtu) {
  typedef typename VT<T>::V V;
  constexpr int W = VT<T>::W;
  for (int64_t i = 0; i < Tp; i += W) {
    V x = vload<V>(xd + i) + bias;
    if (softplus) x = vsoftplus(x);
    vstore(dt + i, x);
    vstore(dtu + i, x * vload<V>(xu + i));
  }
}

// An optional input: undefined when absent, else checked (dtype, shape, CPU) and made contiguous.
inline at::Tensor opt_check(const c10::optional<at::Tensor>& t, at::ScalarType st, const char* name,
                            at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->scalar_type() == st, name, ": dtype ", t->scalar_type(), " != ", st);
  TORCH_CHECK(t->sizes() == shape, name, ": shape ", t->sizes(), " != ", shape);
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
  return t->contiguous();
}

// Lanes of a SIMD vector of the kernels' dtype (8 floats / 4 doubles).
inline int64_t simd_width(at::ScalarType st) { return st == at::kDouble ? 4 : 8; }

// at::parallel_for grain for `units` independent units: one task per thread.
inline int64_t grain_of(int64_t units) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (units + nthreads - 1) / nthreads);
}

// dB / dC rows of a (batch, group) shared by two tasks of a scan's backward: one task's private part, added into
// the output in task order (`begin`) after the parallel region.
template <typename T>
struct BwdPartial {
  int64_t begin = 0, bg = 0;
  std::vector<T> dB, dC;
};

// Where a backward task over units [q0, q1) writes dB / dC: for each (batch, group) bg it touches (upg units
// each), the output rows out(bg) -> {dB, dC} (row stride out_stride) when it holds every unit of bg, else a
// private BwdPartial of rows x row values (row stride row), handed over at the end (hand_over).
template <typename T>
struct BwdTargets {
  std::vector<BwdPartial<T>> mine;
  std::vector<T*> B, C;
  std::vector<int64_t> stride;
  int64_t bg0 = 0;

  template <typename Out>
  BwdTargets(int64_t q0, int64_t q1, int64_t upg, int64_t rows, int64_t row, int64_t out_stride, Out out) {
    bg0 = q0 / upg;
    const int64_t n = (q1 - 1) / upg - bg0 + 1;
    B.resize((size_t)n);
    C.resize((size_t)n);
    stride.resize((size_t)n);
    mine.reserve(2);  // only the first and the last group of a range can be shared
    for (int64_t bg = bg0; bg < bg0 + n; ++bg) {
      if (bg * upg >= q0 && (bg + 1) * upg <= q1) {
        const std::pair<T*, T*> rows_out = out(bg);
        B[bg - bg0] = rows_out.first;
        C[bg - bg0] = rows_out.second;
        stride[bg - bg0] = out_stride;
      } else {
        mine.emplace_back();
        BwdPartial<T>& p = mine.back();
        p.begin = q0;
        p.bg = bg;
        p.dB.assign((size_t)(rows * row), T(0));
        p.dC.assign((size_t)(rows * row), T(0));
        B[bg - bg0] = p.dB.data();
        C[bg - bg0] = p.dC.data();
        stride[bg - bg0] = row;
      }
    }
  }
  void hand_over(std::vector<BwdPartial<T>>* partials, std::mutex* mu) {
    if (mine.empty()) return;
    std::lock_guard<std::mutex> lock(*mu);
    for (auto& p : mine) partials->push_back(std::move(p));
  }
};

// ---- the scans' entry points (selective_scan_cpu.cpp, complex_scan_cpu.h) --------------------------------
// Sizes and inputs as an entry point prepares them (contiguous, N padded); each scan's Prepared extends it.
struct ScanPrepared {
  int64_t batch = 0, dim = 0, L = 0, N = 0, Np = 0, G = 1, chunk = 0, nchunks = 0;
  at::Tensor u, delta, A, B, C, D, z, bias;
};

// Once batch, dim, L and N are set (and checked): N padded to whole vectors, the chunk and the number of
// chunks, contiguous u and delta.
inline void scan_chunking(ScanPrepared& p, const at::Tensor& u, const at::Tensor& delta, int64_t chunk) {
  const int64_t W = simd_width(u.scalar_type());
  p.Np = (p.N + W - 1) / W * W;
  p.chunk = std::min(chunk, p.L);
  p.nchunks = (p.L + p.chunk - 1) / p.chunk;
  p.u = u.contiguous();
  p.delta = delta.contiguous();
}

// The optional D, delta_bias (dim,) and z (like u), after scan_chunking.
inline void scan_optionals(ScanPrepared& p, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                           const c10::optional<at::Tensor>& bias) {
  const auto st = p.u.scalar_type();
  p.D = opt_check(D, st, "D", {p.dim});
  p.z = opt_check(z, st, "z", p.u.sizes());
  p.bias = opt_check(bias, st, "delta_bias", {p.dim});
}

// The fields every scan's Args<T> has: sizes, the padded chunk Tp, softplus and the input pointers.
template <typename T, typename Args>
void scan_args(Args& a, const ScanPrepared& p, bool softplus) {
  a.batch = p.batch;
  a.dim = p.dim;
  a.L = p.L;
  a.N = p.N;
  a.Np = p.Np;
  a.G = p.G;
  a.dpg = p.dim / p.G;
  a.chunk = p.chunk;
  a.nchunks = p.nchunks;
  a.Tp = (p.chunk + VT<T>::W - 1) / VT<T>::W * VT<T>::W;
  a.softplus = softplus;
  a.u = p.u.data_ptr<T>();
  a.delta = p.delta.data_ptr<T>();
  a.A = p.A.data_ptr<T>();
  a.B = p.B.data_ptr<T>();
  a.C = p.C.data_ptr<T>();
  a.D = p.D.defined() ? p.D.data_ptr<T>() : nullptr;
  a.z = p.z.defined() ? p.z.data_ptr<T>() : nullptr;
  a.bias = p.bias.defined() ? p.bias.data_ptr<T>() : nullptr;
}

// What every scan's backward takes and returns alike: chunk_states (checked by the caller) and dout (like u) made
// contiguous, du, ddelta, dz (when z) in u's dtype, and the fp64 per-channel partials of dD and dbias.
struct ScanGrads {
  at::Tensor cst, dout, du, ddelta, dz, dD_c, dbias_c;

  ScanGrads(const ScanPrepared& p, const at::Tensor& chunk_states, const at::Tensor& dout_) {
    const auto st = p.u.scalar_type();
    TORCH_CHECK(dout_.scalar_type() == st && dout_.sizes() == p.u.sizes(), "dout must match u");
    cst = chunk_states.contiguous();
    dout = dout_.contiguous();
    const auto opts = p.u.options(), dopts = p.u.options().dtype(at::kDouble);
    du = at::empty({p.batch, p.dim, p.L}, opts);
    ddelta = at::empty({p.batch, p.dim, p.L}, opts);
    dz = p.z.defined() ? at::empty({p.batch, p.dim, p.L}, opts) : at::Tensor();
    dD_c = at::zeros({p.batch, p.dim}, dopts);
    dbias_c = at::zeros({p.batch, p.dim}, dopts);
  }
  // their pointers into a scan's Args<T> (fields of the same names)
  template <typename T, typename Args>
  void bind(Args& a) const {
    a.cst = cst.data_ptr<T>();
    a.dout = dout.data_ptr<T>();
    a.du = du.data_ptr<T>();
    a.ddelta = ddelta.data_ptr<T>();
    a.dz = dz.defined() ? dz.data_ptr<T>() : nullptr;
    a.dD_c = dD_c.data_ptr<double>();
    a.dbias_c = dbias_c.data_ptr<double>();
  }
  // dD, dbias summed over the batch (undefined when D / delta_bias were not given)
  at::Tensor dD(const ScanPrepared& p) const {
    return p.D.defined() ? dD_c.sum(0).to(p.u.scalar_type()) : at::Tensor();
  }
  at::Tensor dbias(const ScanPrepared& p) const {
    return p.bias.defined() ? dbias_c.sum(0).to(p.u.scalar_type()) : at::Tensor();
  }
};

// ---- run-time ISA choice -------------------------------------------------------------------------
// A kernel K is a struct with `static HISS_INLINE void run(const A& args, int64_t begin, int64_t end)`. It is
// compiled twice, inlined into a baseline wrapper and into one with target("avx2,fma") (K::run must be
// always_inline, so that the avx2 wrapper really gets the avx2 build of the loops), and pick_isa returns the
// wrapper for the instruction set of isa().
template <typename A>
using RangeFnOf = void (*)(const A&, int64_t, int64_t);

template <typename K, typename A>
void isa_base(const A& a, int64_t b, int64_t e) {
  K::run(a, b, e);
}
#if HISS_HAVE_AVX2
template <typename K, typename A>
__attribute__((target("avx2,fma"))) void isa_avx2(const A& a, int64_t b, int64_t e) {
  K::run(a, b, e);
}
// the 16-wide build of a kernel with one (K::run picks the 64-byte vector types itself)
template <typename K, typename A>
__attribute__((target("avx512f,avx512dq,avx2,fma"))) void isa_avx512(const A& a, int64_t b, int64_t e) {
  K::run(a, b, e);
}
#endif

// A kernel struct NAME for pick_isa whose run calls FN<T, 4> when the conv width a.W is 4 (every Mamba block: its
// taps unrolled at compile time) and FN<T, 0> (any width, read at run time) otherwise.
#define HISS_WIDTH_KERNEL(NAME, ARGS, FN)                                      \
  struct NAME {                                                                \
    template <typename T>                                                      \
    static HISS_INLINE void run(const ARGS<T>& a, int64_t b, int64_t e) {      \
      if (a.W == 4)                                                            \
        FN<T, 4>(a, b, e);                                                     \
      else                                                                     \
        FN<T, 0>(a, b, e);                                                     \
    }                                                                          \
  }

template <typename K, typename A>
RangeFnOf<A> pick_isa() {
#if HISS_HAVE_AVX2
  if (isa() != "base") return isa_avx2<K, A>;  // "avx512" too: this kernel's widest build
#endif
  return isa_base<K, A>;
}

}  // namespace hiss
