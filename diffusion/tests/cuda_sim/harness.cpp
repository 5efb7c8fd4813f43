// Runs the crate's own CUDA kernels (src/kernels/*.cu, unchanged) in the
// host simulation of sim.h and compares every result with a reference
// computed in f64 from the same rounded inputs: the softmax, the group norm
// (statistics split over blocks or not, 16-byte loads or not, with and
// without scale, shift and SiLU), GEGLU with its biases, the bias adds (over
// rows or pixels, with and without a residual, 16 bytes at a time or not),
// the transposing bias add to tokens, the convolutions' im2col, and the fused attention (the
// self-attention's interleaved q/k/v, cross-attention to 77 tokens, every
// padded head size the engine meets, partial query and key tiles) in f16,
// bf16 and (where the kernel has it) f32. Prints one line per check and
// exits non-zero when one is out of tolerance.
#include <stdio.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../src/kernels/attention.cu"
#include "../../src/kernels/fused.cu"
#include "../../src/kernels/softmax.cu"

static int failures = 0;
static std::mt19937 rng(20261203);

static void check(const std::string &what, double err, double tol) {
  const bool ok = err <= tol;  // false for NaN: an element never written
  failures += !ok;
  printf("%s %s: max error %.3g (tolerance %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(), err,
         tol);
}

template <typename T> static std::vector<T> randn(size_t n, float mean, float stddev) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<T> v(n);
  for (auto &x : v) {
    x = from_f32<T>(dist(rng));
  }
  return v;
}

template <typename T> static double at(const std::vector<T> &v, size_t i) { return to_f32(v[i]); }

// A buffer of NaNs (bits all ones), so an element the kernel never writes
// fails its comparison.
template <typename T> static std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  memset(v.data(), 0xff, n * sizeof(T));
  return v;
}

template <typename T> static const char *type_name() {
  if (sizeof(T) == 4) return "f32";
  return std::is_same<T, __half>::value ? "f16" : "bf16";
}

// Tolerance per unit of the output's scale: a few roundings of the type.
template <typename T> static double unit_tolerance() {
  if (sizeof(T) == 4) return 1e-5;
  return std::is_same<T, __half>::value ? 1e-3 : 8e-3;
}

template <typename T>
static void softmax_case(void (*kernel)(const T *, T *, int, int), int rows, int cols) {
  auto x = randn<T>((size_t)rows * cols, 0.f, 3.f);
  auto y = poisoned<T>(x.size());
  const int vec = cols % (16 / (int)sizeof(T)) == 0;
  sim::launch({(unsigned)rows, 1, 1}, {cols <= 256 ? 32u : 256u, 1, 1},
              [&] { kernel(x.data(), y.data(), cols, vec); });
  double err = 0;
  for (int r = 0; r < rows; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int c = 0; c < cols; ++c) mx = std::max(mx, at(x, (size_t)r * cols + c));
    for (int c = 0; c < cols; ++c) sum += std::exp(at(x, (size_t)r * cols + c) - mx);
    for (int c = 0; c < cols; ++c) {
      const size_t i = (size_t)r * cols + c;
      const double want = std::exp(at(x, i) - mx) / sum;
      err = std::max(err, std::isnan(at(y, i)) ? INFINITY : std::fabs(at(y, i) - want));
    }
  }
  check(std::string("softmax ") + type_name<T>() + " " + std::to_string(rows) + "x" +
            std::to_string(cols) + (vec ? " (16-byte)" : ""),
        err, unit_tolerance<T>() / 2);
}

template <typename T>
static void group_norm_case(void (*stats)(const T *, float *, int64_t, int64_t, int),
                            void (*apply)(const T *, const float *, const T *, const T *, T *,
                                          int64_t, int64_t, int, int, int, float, int, int, int),
                            int batch, int channels, int spatial, int groups, int splits,
                            int affine, int silu, float mean) {
  const int cpg = channels / groups;
  const int64_t n = (int64_t)cpg * spatial;
  const int lanes = 16 / (int)sizeof(T);
  const int vec = spatial % lanes == 0;
  // As the engine splits: whole 16-byte loads per chunk where it can.
  int64_t chunk = (n + splits - 1) / splits;
  if (vec) chunk = (chunk + lanes - 1) / lanes * lanes;
  const unsigned blocks_y = (unsigned)((n + chunk - 1) / chunk);
  auto x = randn<T>((size_t)batch * channels * spatial, mean, 2.f);
  auto gamma = randn<T>(channels, 1.f, 0.5f);
  auto beta = randn<T>(channels, 0.f, 1.f);
  std::vector<float> partial((size_t)batch * groups * blocks_y * 2, NAN);
  auto y = poisoned<T>(x.size());
  const float eps = 1e-5f;
  const dim3 grid{(unsigned)(batch * groups), blocks_y, 1};
  sim::launch(grid, {256, 1, 1}, [&] { stats(x.data(), partial.data(), n, chunk, vec); });
  sim::launch(grid, {256, 1, 1}, [&] {
    apply(x.data(), partial.data(), gamma.data(), beta.data(), y.data(), n, chunk, spatial,
          groups, cpg, eps, affine, silu, vec);
  });
  double err = 0, scale = 1;
  for (int b = 0; b < batch; ++b) {
    for (int g = 0; g < groups; ++g) {
      const size_t base = ((size_t)b * groups + g) * n;
      double s = 0, ss = 0;
      for (int64_t i = 0; i < n; ++i) s += at(x, base + i);
      const double m = s / n;
      for (int64_t i = 0; i < n; ++i) ss += (at(x, base + i) - m) * (at(x, base + i) - m);
      const double rstd = 1 / std::sqrt(ss / n + eps);
      for (int64_t i = 0; i < n; ++i) {
        const int c = g * cpg + (int)(i / spatial);
        double want = (at(x, base + i) - m) * rstd;
        if (affine) want = want * at(gamma, c) + at(beta, c);
        if (silu) want = want / (1 + std::exp(-want));
        scale = std::max(scale, std::fabs(want));
        const double got = at(y, base + i);
        err = std::max(err, std::isnan(got) ? INFINITY : std::fabs(got - want));
      }
    }
  }
  char what[200];
  snprintf(what, sizeof what,
           "group norm %s (%d, %d, %d) in %d groups, %u blocks per group%s%s%s, mean %.0f",
           type_name<T>(), batch, channels, spatial, groups, blocks_y, vec ? ", 16-byte" : "",
           affine ? ", affine" : "", silu ? ", SiLU" : "", mean);
  check(what, err, unit_tolerance<T>() * scale);
}

template <typename T>
static void geglu_case(void (*kernel)(const T *, const T *, const T *, const T *, T *, int64_t,
                                      int64_t, int),
                       int64_t rows, int64_t width, unsigned blocks) {
  const int64_t n = rows * width;
  auto value = randn<T>(n, 0.f, 2.f);
  auto gate = randn<T>(n, 0.f, 2.f);
  auto value_bias = randn<T>(width, 0.f, 1.f);
  auto gate_bias = randn<T>(width, 0.f, 1.f);
  auto y = poisoned<T>(n);
  const int vec = width % (16 / (int)sizeof(T)) == 0;
  sim::launch({blocks, 1, 1}, {256, 1, 1}, [&] {
    kernel(value.data(), gate.data(), value_bias.data(), gate_bias.data(), y.data(), n, width,
           vec);
  });
  double err = 0, scale = 1;
  for (int64_t i = 0; i < n; ++i) {
    const double g = at(gate, i) + at(gate_bias, i % width);
    const double v = at(value, i) + at(value_bias, i % width);
    const double want = v * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
    scale = std::max(scale, std::fabs(want));
    err = std::max(err, std::isnan(at(y, i)) ? INFINITY : std::fabs(at(y, i) - want));
  }
  check(std::string("GEGLU ") + type_name<T>() + " " + std::to_string(rows) + "x" +
            std::to_string(width) + (vec ? " (16-byte)" : ""),
        err, unit_tolerance<T>() * scale);
}

// x + bias (+ residual) over an (outer, period, inner) tensor, the bias
// indexed by the period, in the mode the engine picks for the shape.
template <typename T>
static void add_bias_case(void (*kernel)(const T *, const T *, const T *, T *, int64_t, int64_t,
                                         int64_t, int),
                          int64_t outer, int64_t period, int64_t inner, bool with_residual,
                          unsigned blocks) {
  const int64_t n = outer * period * inner;
  const int lanes = 16 / (int)sizeof(T);
  const int mode = inner == 1 && period % lanes == 0 ? 1 : inner % lanes == 0 ? 2 : 0;
  auto x = randn<T>(n, 0.f, 2.f);
  auto bias = randn<T>(period, 0.f, 1.f);
  auto residual = randn<T>(n, 0.f, 2.f);
  auto y = poisoned<T>(n);
  sim::launch({blocks, 1, 1}, {256, 1, 1}, [&] {
    kernel(x.data(), bias.data(), with_residual ? residual.data() : nullptr, y.data(), n, inner,
           period, mode);
  });
  double err = 0, scale = 1;
  for (int64_t i = 0; i < n; ++i) {
    double want = at(x, i) + at(bias, (i / inner) % period);
    if (with_residual) want += at(residual, i);
    scale = std::max(scale, std::fabs(want));
    err = std::max(err, std::isnan(at(y, i)) ? INFINITY : std::fabs(at(y, i) - want));
  }
  char what[200];
  snprintf(what, sizeof what, "bias add %s (%lld, %lld, %lld), mode %d%s", type_name<T>(),
           (long long)outer, (long long)period, (long long)inner, mode,
           with_residual ? ", with residual" : "");
  check(what, err, unit_tolerance<T>() * scale);
}

// (batch, channels, pixels) + a per-channel bias, written as (batch,
// pixels, channels).
template <typename T>
static void tokens_case(void (*kernel)(const T *, const T *, T *, int, int), int batch,
                        int channels, int pixels) {
  const size_t n = (size_t)batch * channels * pixels;
  auto x = randn<T>(n, 0.f, 2.f);
  auto bias = randn<T>(channels, 0.f, 1.f);
  auto y = poisoned<T>(n);
  const dim3 grid{(unsigned)((pixels + 31) / 32), (unsigned)((channels + 31) / 32),
                  (unsigned)batch};
  sim::launch(grid, {256, 1, 1}, [&] { kernel(x.data(), bias.data(), y.data(), channels, pixels); });
  double err = 0, scale = 1;
  for (int b = 0; b < batch; ++b) {
    for (int c = 0; c < channels; ++c) {
      for (int p = 0; p < pixels; ++p) {
        const double want = at(x, ((size_t)b * channels + c) * pixels + p) + at(bias, c);
        const double got = at(y, ((size_t)b * pixels + p) * channels + c);
        scale = std::max(scale, std::fabs(want));
        err = std::max(err, std::isnan(got) ? INFINITY : std::fabs(got - want));
      }
    }
  }
  check(std::string("tokens ") + type_name<T>() + " (" + std::to_string(batch) + ", " +
            std::to_string(channels) + ", " + std::to_string(pixels) + ")",
        err, unit_tolerance<T>() * scale);
}

// The columns of a k x k convolution of a (batch, channels, height, width)
// map for output rows [row0, row0 + rows) (all when rows is 0): each column
// element is one input element or a padding zero, so they must agree
// exactly. Small blocks and two pixel chunks, so every thread loops.
template <typename T>
static void im2col_case(void (*kernel)(const T *, T *, int, int, int, int, int, int, int, int,
                                       int),
                        int batch, int channels, int height, int width, int k, int stride,
                        int pad, int row0, int rows) {
  const int out_h = (height + 2 * pad - k) / stride + 1;
  const int out_w = (width + 2 * pad - k) / stride + 1;
  if (rows == 0) rows = out_h;
  const int k_rows = channels * k * k;
  auto x = randn<T>((size_t)batch * channels * height * width, 0.f, 1.f);
  auto col = poisoned<T>((size_t)batch * k_rows * rows * out_w);
  sim::launch({(unsigned)(batch * k_rows), 2, 1}, {32, 1, 1}, [&] {
    kernel(x.data(), col.data(), channels, height, width, k, stride, pad, out_w, row0, rows);
  });
  double err = 0;
  for (int b = 0; b < batch; ++b) {
    for (int c = 0; c < channels; ++c) {
      for (int ky = 0; ky < k; ++ky) {
        for (int kx = 0; kx < k; ++kx) {
          const int r = (c * k + ky) * k + kx;
          for (int oy = 0; oy < rows; ++oy) {
            for (int ox = 0; ox < out_w; ++ox) {
              const int iy = (row0 + oy) * stride - pad + ky, ix = ox * stride - pad + kx;
              const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
              const double want =
                  inside ? at(x, (((size_t)b * channels + c) * height + iy) * width + ix) : 0.0;
              const double got = at(col, (((size_t)b * k_rows + r) * rows + oy) * out_w + ox);
              err = std::max(err, std::isnan(got) ? INFINITY : std::fabs(got - want));
            }
          }
        }
      }
    }
  }
  char what[160];
  snprintf(what, sizeof what, "im2col %s: (%d, %d, %d, %d), %dx%d stride %d pad %d, rows %d+%d",
           type_name<T>(), batch, channels, height, width, k, k, stride, pad, row0, rows);
  check(what, err, 0.0);
}

// Attention of `nq` queries to `nk` keys, `heads` heads of size d, scale
// `scale`. interleaved: q, k and v are views of one (batch, tokens, 3,
// heads, d) buffer, as the self-attention's projection writes them (nq ==
// nk); otherwise three contiguous (batch, tokens, heads, d) buffers.
template <typename T>
static void attention_case(const char *name, void (*kernel)(const T *, const T *, const T *, T *,
                                                            int, int, int, int, int64_t, int64_t,
                                                            int64_t, int64_t, int64_t, int64_t,
                                                            int64_t, int64_t, int64_t, float),
                           int dp, int batch, int nq, int nk, int heads, int d, float scale,
                           bool interleaved, float spread) {
  const int64_t hd = (int64_t)heads * d;
  std::vector<T> qkv, q, k, v;
  const T *qp, *kp, *vp;
  int64_t q_st, k_st, v_st, q_sb, k_sb, v_sb;
  if (interleaved) {
    qkv = randn<T>((size_t)batch * nq * 3 * hd, 0.f, spread);
    qp = qkv.data();
    kp = qkv.data() + hd;
    vp = qkv.data() + 2 * hd;
    q_st = k_st = v_st = 3 * hd;
    q_sb = k_sb = v_sb = 3 * hd * nq;
  } else {
    q = randn<T>((size_t)batch * nq * hd, 0.f, spread);
    k = randn<T>((size_t)batch * nk * hd, 0.f, spread);
    v = randn<T>((size_t)batch * nk * hd, 0.f, 1.f);
    qp = q.data();
    kp = k.data();
    vp = v.data();
    q_st = hd;
    k_st = v_st = hd;
    q_sb = hd * nq;
    k_sb = v_sb = hd * nk;
  }
  const size_t out_len = (size_t)batch * nq * hd;
  auto o = poisoned<T>(out_len + 64);  // 64 guard elements after the output
  const float scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid{(unsigned)((nq + 63) / 64), (unsigned)heads, (unsigned)batch};
  sim::launch(grid, {128, 1, 1}, [&] {
    kernel(qp, kp, vp, o.data(), nq, nk, d, heads, q_sb, q_st, d, k_sb, k_st, d, v_sb, v_st, d,
           scale_log2);
  });
  double err = 0, vmax = 1;
  std::vector<double> s(nk);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < nq; ++i) {
        const T *qi = qp + b * q_sb + i * q_st + h * d;
        double mx = -INFINITY;
        for (int j = 0; j < nk; ++j) {
          const T *kj = kp + b * k_sb + j * k_st + h * d;
          double dot = 0;
          for (int c = 0; c < d; ++c) dot += (double)to_f32(qi[c]) * to_f32(kj[c]);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int j = 0; j < nk; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int c = 0; c < d; ++c) {
          double want = 0;
          for (int j = 0; j < nk; ++j) {
            const double vj = to_f32(vp[b * v_sb + j * v_st + h * d + c]);
            vmax = std::max(vmax, std::fabs(vj));
            want += s[j] / sum * vj;
          }
          const double got = at(o, (((size_t)b * nq + i) * heads + h) * d + c);
          err = std::max(err, std::isnan(got) ? INFINITY : std::fabs(got - want));
        }
      }
    }
  }
  bool guard_intact = true;
  for (size_t i = out_len; i < o.size(); ++i) {
    uint16_t bits;
    memcpy(&bits, &o[i], 2);
    guard_intact &= bits == 0xffff;
  }
  char what[200];
  snprintf(what, sizeof what,
           "attention %s %s: batch %d, %d queries, %d keys, %d heads of %d (padded %d)%s", name,
           type_name<T>(), batch, nq, nk, heads, d, dp, interleaved ? ", interleaved q/k/v" : "");
  check(what, guard_intact ? err : INFINITY, unit_tolerance<T>() * vmax);
}

int main() {
  softmax_case<__half>(hallmark_softmax_f16, 3, 4096);
  softmax_case<__half>(hallmark_softmax_f16, 3, 77);
  softmax_case<__nv_bfloat16>(hallmark_softmax_bf16, 2, 1000);
  softmax_case<float>(hallmark_softmax_f32, 2, 1030);

  for (int splits : {1, 3}) {
    for (int act = 0; act < 3; ++act) {
      const int affine = act < 2, silu = act == 0;
      group_norm_case<__half>(hallmark_group_norm_stats_f16, hallmark_group_norm_apply_f16, 2,
                              16, 64, 4, splits, affine, silu, 0.5f);
      group_norm_case<__half>(hallmark_group_norm_stats_f16, hallmark_group_norm_apply_f16, 2, 8,
                              35, 4, splits, affine, silu, 0.5f);
    }
    group_norm_case<__nv_bfloat16>(hallmark_group_norm_stats_bf16,
                                   hallmark_group_norm_apply_bf16, 1, 32, 64, 8, splits, 1, 1,
                                   -1.f);
    group_norm_case<float>(hallmark_group_norm_stats_f32, hallmark_group_norm_apply_f32, 2, 8,
                           36, 2, splits, 1, 1, 0.f);
    // A large mean: the variance must not come from two large sums.
    group_norm_case<float>(hallmark_group_norm_stats_f32, hallmark_group_norm_apply_f32, 1, 4,
                           1024, 2, splits, 1, 0, 300.f);
  }

  geglu_case<__half>(hallmark_geglu_f16, 64, 128, 2);
  geglu_case<__half>(hallmark_geglu_f16, 7, 11, 1);
  geglu_case<__nv_bfloat16>(hallmark_geglu_bf16, 10, 100, 1);
  geglu_case<float>(hallmark_geglu_f32, 9, 111, 3);
  geglu_case<float>(hallmark_geglu_f32, 5, 40, 2);

  // A linear layer's bias over its rows (tokens), with and without the
  // residual connection after it; a per-channel bias over a map's pixels;
  // a per-sample-and-channel one (a resnet's time embedding); shapes that
  // take no 16-byte loads.
  for (bool residual : {false, true}) {
    add_bias_case<__half>(hallmark_add_bias_f16, 50, 320, 1, residual, 3);
    add_bias_case<__half>(hallmark_add_bias_f16, 2, 16, 64, residual, 2);
    add_bias_case<__half>(hallmark_add_bias_f16, 1, 6, 35, residual, 1);
    add_bias_case<__nv_bfloat16>(hallmark_add_bias_bf16, 12, 40, 1, residual, 2);
    add_bias_case<float>(hallmark_add_bias_f32, 3, 10, 1, residual, 1);
    add_bias_case<float>(hallmark_add_bias_f32, 1, 2 * 8, 36, residual, 2);
  }
  tokens_case<__half>(hallmark_tokens_add_bias_f16, 2, 64, 96);
  tokens_case<__half>(hallmark_tokens_add_bias_f16, 1, 40, 77);
  tokens_case<__nv_bfloat16>(hallmark_tokens_add_bias_bf16, 1, 33, 31);
  tokens_case<float>(hallmark_tokens_add_bias_f32, 2, 8, 70);

  // A resnet's 3x3 convolution, a downsampler's stride 2 (odd sizes), a
  // band of output rows, a 1x1 convolution.
  im2col_case<__half>(hallmark_im2col_f16, 2, 3, 9, 7, 3, 1, 1, 0, 0);
  im2col_case<__half>(hallmark_im2col_f16, 1, 4, 11, 9, 3, 2, 1, 0, 0);
  im2col_case<__nv_bfloat16>(hallmark_im2col_bf16, 2, 2, 8, 8, 3, 1, 1, 3, 4);
  im2col_case<float>(hallmark_im2col_f32, 1, 5, 6, 5, 1, 1, 0, 0, 0);

  const float r40 = 1 / std::sqrt(40.f), r64 = 0.125f, r80 = 1 / std::sqrt(80.f),
              r160 = 1 / std::sqrt(160.f);
  // SD 1.5's self-attention at the first level (heads of 40, q/k/v out of
  // one projection), two key tiles and a partial query tile.
  attention_case<__half>("48", hallmark_attention_f16_48, 48, 2, 100, 100, 2, 40, r40, true, 1.f);
  // Its cross-attention: 77 text tokens, heads of 80.
  attention_case<__half>("80", hallmark_attention_f16_80, 80, 1, 70, 77, 2, 80, r80, false, 1.f);
  attention_case<__half>("160", hallmark_attention_f16_160, 160, 1, 64, 77, 1, 160, r160, false,
                         1.f);
  // SDXL / SD 2.x heads of 64; large scores, so the running maximum moves
  // from tile to tile.
  attention_case<__half>("64", hallmark_attention_f16_64, 64, 1, 130, 200, 2, 64, r64, false,
                         3.f);
  attention_case<__nv_bfloat16>("48", hallmark_attention_bf16_48, 48, 1, 80, 80, 2, 40, r40, true,
                                1.f);
  attention_case<__nv_bfloat16>("64", hallmark_attention_bf16_64, 64, 1, 65, 77, 1, 64, r64,
                                false, 2.f);
  // A head size a padded tile serves, and the two not met in SD (96, 128).
  attention_case<__half>("96", hallmark_attention_f16_96, 96, 1, 40, 70, 1, 88, 0.1f, false, 1.f);
  attention_case<__half>("128", hallmark_attention_f16_128, 128, 1, 64, 64, 1, 128, 0.09f, false,
                         1.f);

  printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
