// One recurrent step of the whole audio U-Net (apps/audio/model.py) in C++, no Python per layer.
//
// The network is handed over once (weights copied in), with the state after a prefill; then every call to
// step(tokens) consumes one µ-law sample per batch row and returns the logits of the next one. The maths is
// the Python step's: ssm_core's RMSNorm, Mamba decode step (conv update with SiLU, selective or LTI Δ/B/C,
// softplus(Δ + bias) with torch's threshold 20, exp(ΔA) state update, D skip, SiLU(z) gate), the gated MLP,
// DownPool / UpPool linears with the one-frame shift. Rows are independent and run in parallel
// (at::parallel_for, torch's intra-op threads). Checked against the Python step in tests/apps/audio.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

std::vector<float> vec(const torch::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  auto c = t.detach().to(torch::kFloat32).contiguous().cpu();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

struct Linear {
  int in = 0, out = 0;
  std::vector<float> Wt, b;  // Wt: (in, out), the transposed weight: the inner loop runs over outputs (SIMD)
  Linear() = default;
  Linear(const torch::Tensor& w, const torch::Tensor& bias)
      : in(w.size(1)), out(w.size(0)), Wt(vec(w.t())), b(vec(bias)) {}
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
  UNetStep(std::vector<int64_t> pool, std::vector<int64_t> width, int64_t batch)
      : pool_(pool.begin(), pool.end()), width_(width.begin(), width.end()), batch_(batch) {
    S_ = static_cast<int>(pool_.size());
    down_.resize(S_);
    up_.resize(S_);
    dpool_.resize(S_);
    upool_.resize(S_);
    cond_.resize(S_ + 1);
    buf_.resize(S_);
    pending_.resize(S_);
  }

  void set_io(torch::Tensor embedding, torch::Tensor norm_w, double eps, torch::Tensor head_w, torch::Tensor head_b) {
    emb_ = vec(embedding);
    V_ = head_w.size(0);
    normf_ = vec(norm_w);
    epsf_ = static_cast<float>(eps);
    head_ = Linear(head_w, head_b);
  }

  void set_pool(int64_t s, torch::Tensor dw, torch::Tensor db, torch::Tensor uw, torch::Tensor ub) {
    dpool_[s] = Linear(dw, db);
    upool_[s] = Linear(uw, ub);
  }

  void set_cond(int64_t s, torch::Tensor vectors) { cond_[s] = vec(vectors); }  // (batch, width) or empty

  // where: 0 down, 1 centre, 2 up. Blocks are added in the model's blocks_in_order() order.
  void add_block(int64_t where, int64_t level, bool selective, torch::Tensor norm_w, double eps, torch::Tensor in_w,
                 torch::Tensor in_b, torch::Tensor conv_w, torch::Tensor conv_b, torch::Tensor x_w,
                 torch::Tensor dt_w, torch::Tensor dt_b, torch::Tensor Bv, torch::Tensor Cv, torch::Tensor A,
                 torch::Tensor Dskip, torch::Tensor out_w, torch::Tensor out_b, torch::Tensor norm2_w, double eps2,
                 torch::Tensor fc1_w, torch::Tensor fc2_w, torch::Tensor conv_state, torch::Tensor ssm_state) {
    Block b;
    b.D = in_w.size(1);
    b.Di = in_w.size(0) / 2;
    b.N = A.size(1);
    b.K = conv_w.size(-1);
    b.selective = selective;
    b.eps = static_cast<float>(eps);
    b.norm_w = vec(norm_w);
    b.in_proj = Linear(in_w, in_b);
    b.conv_w = vec(conv_w);
    b.conv_b = vec(conv_b);
    if (selective) {
      b.x_proj = Linear(x_w, torch::Tensor());
      b.dt_proj = Linear(dt_w, dt_b);
      b.R = dt_w.size(1);
    } else {
      b.dt_bias = vec(dt_b);
      b.Bv = vec(Bv);
      b.Cv = vec(Cv);
    }
    b.A = vec(A);
    b.Dskip = vec(Dskip);
    b.out_proj = Linear(out_w, out_b);
    if (fc1_w.defined() && fc1_w.numel() > 0) {
      b.mlp = true;
      b.norm2_w = vec(norm2_w);
      b.eps2 = static_cast<float>(eps2);
      b.fc1 = Linear(fc1_w, torch::Tensor());
      b.fc2 = Linear(fc2_w, torch::Tensor());
    }
    TORCH_CHECK(conv_state.size(0) == batch_ && ssm_state.size(0) == batch_, "state batch size mismatch");
    b.conv_state = vec(conv_state);
    b.ssm_state = vec(ssm_state);
    scratch_ = std::max(scratch_, b.scratch());
    if (where == 0) down_[level].push_back(std::move(b));
    else if (where == 1) center_.push_back(std::move(b));
    else up_[level].push_back(std::move(b));
  }

  void set_position(int64_t t, std::vector<torch::Tensor> buffers, std::vector<torch::Tensor> pending) {
    t_ = t;
    for (int s = 0; s < S_; ++s) {
      buf_[s] = vec(buffers[s]);
      pending_[s] = vec(pending[s]);
    }
  }

  int64_t position() const { return t_; }

  torch::Tensor step(torch::Tensor tokens) {
    TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == batch_, "tokens must be (batch,)");
    auto tok = tokens.to(torch::kInt64).contiguous();
    const int64_t* tp = tok.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch_; ++b) TORCH_CHECK(tp[b] >= 0 && tp[b] * width_[0] < (int64_t)emb_.size(), "token out of range");
    auto logits = torch::empty({batch_, V_}, torch::kFloat32);
    float* lp = logits.data_ptr<float>();
    const int64_t t = t_;
    at::parallel_for(0, batch_, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work(work_size());
      for (int64_t b = begin; b < end; ++b) row_step(static_cast<int>(b), tp[b], t, lp + b * V_, work.data());
    });
    t_ += 1;
    return logits;
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
  int64_t batch_;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<UNetStep>(m, "UNetStep")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, int64_t>())
      .def("set_io", &UNetStep::set_io)
      .def("set_pool", &UNetStep::set_pool)
      .def("set_cond", &UNetStep::set_cond)
      .def("add_block", &UNetStep::add_block)
      .def("set_position", &UNetStep::set_position)
      .def("position", &UNetStep::position)
      .def("step", &UNetStep::step);
}
