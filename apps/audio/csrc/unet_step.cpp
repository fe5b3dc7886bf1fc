// One recurrent step of the whole audio U-Net (apps/audio/model.py) in C++, no Python per layer.
//
// The network is handed over once (weights copied in), with the state after a prefill; then every call to
// step(tokens) consumes one µ-law sample per batch row and returns the logits of the next one. The maths is
// the Python step's: ssm_core's RMSNorm, Mamba decode step (conv update with SiLU, selective or LTI Δ/B/C,
// softplus(Δ + bias) with torch's threshold 20, exp(ΔA) state update, D skip, SiLU(z) gate), the gated MLP,
// DownPool / UpPool linears with the one-frame shift. Rows are independent and run in parallel (OpenMP).
// A plain C ABI (called through ctypes, which releases the GIL) and no torch headers, so it builds in seconds.
// Checked against the Python step in tests/apps/audio.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

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
    if (pf + n > nf) throw std::runtime_error("unet_step: floats exhausted");
    std::vector<float> out(floats + pf, floats + pf + n);
    pf += n;
    return out;
  }
  float f() { return v().at(0); }
};

struct Linear {
  int in = 0, out = 0;
  std::vector<float> Wt, b;  // Wt: (in, out), the transposed weight: the inner loop runs over outputs (SIMD)
  Linear() = default;
  explicit Linear(Reader& r) {
    out = static_cast<int>(r.i());
    in = static_cast<int>(r.i());
    std::vector<float> W = r.v();  // (out, in), row-major
    b = r.v();
    if (static_cast<int64_t>(W.size()) != static_cast<int64_t>(out) * in) throw std::runtime_error("unet_step: bad Linear");
    Wt.resize(W.size());
    for (int o = 0; o < out; ++o)
      for (int k = 0; k < in; ++k) Wt[static_cast<size_t>(k) * out + o] = W[static_cast<size_t>(o) * in + k];
  }
  // y[o] = b[o] + sum_i W[o, i] x[i]
  void apply(const float* __restrict x, float* __restrict y) const {
    if (b.empty()) std::fill(y, y + out, 0.f);
    else std::copy(b.begin(), b.end(), y);
    const float* w = Wt.data();
    for (int i = 0; i < in; ++i, w += out) {
      const float xi = x[i];
#pragma omp simd
      for (int o = 0; o < out; ++o) y[o] += w[o] * xi;
    }
  }
};
inline float silu(float v) { return v / (1.f + std::exp(-v)); }
inline float softplus(float v) { return v > 20.f ? v : std::log1p(std::exp(v)); }

void rms_norm(const float* x, const std::vector<float>& w, float eps, int n, float* y) {
  double ss = 0.0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

struct Block {
  int D = 0, Di = 0, N = 0, R = 0, K = 0;
  bool selective = true, mlp = false;
  float eps = 1e-5f, eps2 = 1e-5f;
  std::vector<float> norm_w, conv_w, conv_b, dt_bias, Bv, Cv, A, Dskip, norm2_w;
  Linear in_proj, x_proj, dt_proj, out_proj, fc1, fc2;
  // state, per batch row: conv (Di, K-1), ssm (Di, N)
  std::vector<float> conv_state, ssm_state;

  size_t scratch() const {
    size_t m = static_cast<size_t>(D + 2 * Di + Di + (R + 2 * N) + Di + Di + D);
    if (mlp) m += fc1.out + D;
    return m;
  }

  // x (D) is updated in place: x += mixer(norm(x)) [+ mlp(norm2(x))]
  void step(int row, float* x, float* s) {
    float* h = s;               // D
    float* xz = h + D;          // 2 Di
    float* xc = xz + 2 * Di;    // Di
    float* dbc = xc + Di;       // R + 2N
    float* dt = dbc + R + 2 * N;  // Di
    float* y = dt + Di;         // Di
    rms_norm(x, norm_w, eps, D, h);
    in_proj.apply(h, xz);
    const float* xi = xz;
    const float* z = xz + Di;
    float* cs = conv_state.data() + static_cast<size_t>(row) * Di * (K - 1);
    for (int c = 0; c < Di; ++c) {
      float* st = cs + static_cast<size_t>(c) * (K - 1);
      const float* w = conv_w.data() + static_cast<size_t>(c) * K;
      float acc = conv_b.empty() ? 0.f : conv_b[c];
      for (int k = 0; k < K - 1; ++k) acc += w[k] * st[k];
      acc += w[K - 1] * xi[c];
      for (int k = 0; k + 1 < K - 1; ++k) st[k] = st[k + 1];
      if (K > 1) st[K - 2] = xi[c];
      xc[c] = silu(acc);
    }
    const float* B;
    const float* C;
    if (selective) {
      x_proj.apply(xc, dbc);
      dt_proj.apply(dbc, dt);  // dt_proj carries the dt bias
      B = dbc + R;
      C = dbc + R + N;
    } else {
      for (int c = 0; c < Di; ++c) dt[c] = dt_bias[c];
      B = Bv.data();
      C = Cv.data();
    }
    float* ss = ssm_state.data() + static_cast<size_t>(row) * Di * N;
    for (int c = 0; c < Di; ++c) {
      const float d = softplus(dt[c]);
      const float dx = d * xc[c];
      const float* __restrict a = A.data() + static_cast<size_t>(c) * N;
      float* __restrict st = ss + static_cast<size_t>(c) * N;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int n = 0; n < N; ++n) {
        const float v = std::exp(d * a[n]) * st[n] + dx * B[n];
        st[n] = v;
        acc += v * C[n];
      }
      y[c] = (acc + Dskip[c] * xc[c]) * silu(z[c]);
    }
    float* o = y + Di;  // D
    out_proj.apply(y, o);
    for (int i = 0; i < D; ++i) x[i] += o[i];
    if (mlp) {
      float* u = o + D;  // fc1.out
      rms_norm(x, norm2_w, eps2, D, h);
      fc1.apply(h, u);
      const int hid = fc1.out / 2;
      for (int i = 0; i < hid; ++i) u[i] = u[i] * silu(u[hid + i]);
      fc2.apply(u, o);
      for (int i = 0; i < D; ++i) x[i] += o[i];
    }
  }
};

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
    down_.resize(S_);
    up_.resize(S_);
    cond_.resize(S_ + 1);
    emb_ = r.v();
    normf_ = r.v();
    epsf_ = r.f();
    head_ = Linear(r);
    V_ = head_.out;
    for (int s = 0; s < S_; ++s) {
      dpool_.emplace_back(r);
      upool_.emplace_back(r);
    }
    for (int s = 0; s <= S_; ++s) cond_[s] = r.v();  // (batch, width) or empty
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
      b.norm_w = r.v();
      b.eps = r.f();
      b.in_proj = Linear(r);
      b.conv_w = r.v();
      b.conv_b = r.v();
      if (b.selective) {
        b.x_proj = Linear(r);
        b.dt_proj = Linear(r);
        b.R = b.dt_proj.in;
      } else {
        b.dt_bias = r.v();
        b.Bv = r.v();
        b.Cv = r.v();
      }
      b.A = r.v();
      b.Dskip = r.v();
      b.out_proj = Linear(r);
      if (b.mlp) {
        b.norm2_w = r.v();
        b.eps2 = r.f();
        b.fc1 = Linear(r);
        b.fc2 = Linear(r);
      }
      b.conv_state = r.v();
      b.ssm_state = r.v();
      if (static_cast<int64_t>(b.conv_state.size()) != batch_ * b.Di * (b.K - 1) ||
          static_cast<int64_t>(b.ssm_state.size()) != batch_ * b.Di * b.N)
        throw std::runtime_error("unet_step: state size does not match the batch");
      scratch_ = std::max(scratch_, b.scratch());
      if (where == 0) down_[level].push_back(std::move(b));
      else if (where == 1) center_.push_back(std::move(b));
      else up_[level].push_back(std::move(b));
    }
    for (int s = 0; s < S_; ++s) {
      buf_.push_back(r.v());
      pending_.push_back(r.v());
    }
    if (r.pi != r.ni || r.pf != r.nf) throw std::runtime_error("unet_step: unread data left (layout mismatch)");
  }

  int64_t position() const { return t_; }
  int64_t vocab() const { return V_; }

  // tokens (batch,) -> logits (batch, V); rows run on up to `threads` OpenMP threads. Returns 0, or -1 for a
  // token outside the vocabulary.
  int step(const int64_t* tokens, float* logits, int threads) {
    for (int64_t b = 0; b < batch_; ++b)
      if (tokens[b] < 0 || tokens[b] * width_[0] >= static_cast<int64_t>(emb_.size())) return -1;
    const int64_t t = t_;
    const size_t ws = work_size();
#pragma omp parallel num_threads(threads) if (threads > 1 && batch_ > 1)
    {
      std::vector<float> work(ws);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch_; ++b) row_step(static_cast<int>(b), tokens[b], t, logits + b * V_, work.data());
    }
    t_ += 1;
    return 0;
  }

 private:
  size_t work_size() const {
    size_t w = scratch_;
    for (int s = 0; s <= S_; ++s) w += 4 * static_cast<size_t>(width_[s]);
    return w + static_cast<size_t>(width_[0]) + 16;
  }

  // level s takes its n-th input x (width s) and leaves its output in x; work: scratch after x
  void level_step(int s, int row, float* x, int64_t n, float* work) {
    const int W = width_[s];
    if (s == S_) {
      for (auto& blk : center_) blk.step(row, x, work);
      return;
    }
    for (auto& blk : down_[s]) blk.step(row, x, work);
    const int p = pool_[s];
    const int k = static_cast<int>(n % p);
    float* buf = buf_[s].data() + static_cast<size_t>(row) * p * W;
    float* pend = pending_[s].data() + static_cast<size_t>(row) * p * W;
    float* coarse_in = work;  // W: the up-pooled input for this position, from the previous group
    std::copy(pend + static_cast<size_t>(k) * W, pend + static_cast<size_t>(k + 1) * W, coarse_in);
    std::copy(x, x + W, buf + static_cast<size_t>(k) * W);
    float* rest = coarse_in + W;
    if (k == p - 1) {
      const int Wc = width_[s + 1];
      float* y = rest;  // Wc
      dpool_[s].apply(buf, y);
      if (!cond_[s + 1].empty())
        for (int i = 0; i < Wc; ++i) y[i] += cond_[s + 1][static_cast<size_t>(row) * Wc + i];
      level_step(s + 1, row, y, n / p, y + Wc);
      upool_[s].apply(y, pend);  // (p, W) frames for the next group
    }
    for (int i = 0; i < W; ++i) x[i] += coarse_in[i];
    for (auto& blk : up_[s]) blk.step(row, x, rest);
  }

  void row_step(int row, int64_t token, int64_t t, float* logits, float* work) {
    const int W = width_[0];
    float* x = work;
    std::copy(emb_.begin() + token * W, emb_.begin() + (token + 1) * W, x);
    if (!cond_[0].empty())
      for (int i = 0; i < W; ++i) x[i] += cond_[0][static_cast<size_t>(row) * W + i];
    level_step(0, row, x, t, x + W);
    float* h = x + W;
    rms_norm(x, normf_, epsf_, W, h);
    head_.apply(h, logits);
  }

  std::vector<int> pool_, width_;
  int64_t batch_ = 0;
  int S_ = 0;
  int64_t V_ = 0, t_ = 0;
  size_t scratch_ = 0;
  std::vector<float> emb_, normf_;
  float epsf_ = 1e-5f;
  Linear head_;
  std::vector<std::vector<Block>> down_, up_;
  std::vector<Block> center_;
  std::vector<Linear> dpool_, upool_;
  std::vector<std::vector<float>> cond_, buf_, pending_;
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

int unet_step(void* h, const int64_t* tokens, float* logits, int threads) {
  return static_cast<UNetStep*>(h)->step(tokens, logits, threads);
}

int64_t unet_position(void* h) { return static_cast<UNetStep*>(h)->position(); }

void unet_destroy(void* h) { delete static_cast<UNetStep*>(h); }

}  // extern "C"
