// Fused CUDA kernels of the training step. Each replaces a chain of candle ops whose launches (not their
// arithmetic) dominated a small-batch step: a norm's forward was ~13 kernels, its backward ~14, one AdamW update ~15
// per variable. Element types: f32, bf16, f16 (suffix of every entry point); arithmetic in f32 throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Sum (or max) over the block; every thread gets the result. `sh` holds 33 floats.
template <bool MAX> __device__ float block_reduce(float v, float *sh) {
  for (int o = 16; o > 0; o >>= 1) {
    float u = __shfl_xor_sync(0xffffffff, v, o);
    v = MAX ? fmaxf(v, u) : v + u;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // `sh` may still be read by a previous reduction
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? sh[lane] : (MAX ? -INFINITY : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
      float u = __shfl_xor_sync(0xffffffff, v, o);
      v = MAX ? fmaxf(v, u) : v + u;
    }
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  return sh[32];
}

// Normalisation of row `blockIdx.x` (n elements): y = (x − mean)·rstd·w[c] + b[c], with the channel of flat element
// e being (e / inner) % channels (GroupNorm: inner = H·W; LayerNorm: inner = 1). Saves each row's mean and rstd.
template <typename T>
__device__ void norm_fwd(const T *x, T *y, float *mean_out, float *rstd_out, const float *w, const float *b,
                         int n, int inner, int channels, float eps) {
  __shared__ float sh[33];
  size_t row = blockIdx.x, base = row * (size_t)n;
  const T *xr = x + base;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += to_f(xr[i]);
  float mean = block_reduce<false>(s, sh) / n;
  float q = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float d = to_f(xr[i]) - mean;
    q += d * d;
  }
  float rstd = rsqrtf(block_reduce<false>(q, sh) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int c = (int)(((base + i) / inner) % channels);
    y[base + i] = from_f<T>((to_f(xr[i]) - mean) * rstd * w[c] + b[c]);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Input gradient of `norm_fwd`: with d = g·w[c] and x̂ = (x − mean)·rstd, dx = rstd·(d − mean(d) − x̂·mean(d·x̂)).
template <typename T>
__device__ void norm_bwd(const T *x, const T *g, T *dx, const float *mean, const float *rstd, const float *w, int n,
                         int inner, int channels) {
  __shared__ float sh[33];
  size_t row = blockIdx.x, base = row * (size_t)n;
  float mu = mean[row], rs = rstd[row], s1 = 0.f, s2 = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int c = (int)(((base + i) / inner) % channels);
    float d = to_f(g[base + i]) * w[c];
    s1 += d;
    s2 += d * (to_f(x[base + i]) - mu) * rs;
  }
  float m1 = block_reduce<false>(s1, sh) / n;
  float m2 = block_reduce<false>(s2, sh) / n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int c = (int)(((base + i) / inner) % channels);
    float d = to_f(g[base + i]) * w[c];
    float xh = (to_f(x[base + i]) - mu) * rs;
    dx[base + i] = from_f<T>(rs * (d - m1 - xh * m2));
  }
}

// Softmax of row `blockIdx.x` of attention scores s (n keys): p = exp(s − lse), lse = log Σ exp(s).
template <typename T> __device__ void softmax_fwd(const T *s, T *p, float *lse_out, int n) {
  __shared__ float sh[33];
  size_t base = (size_t)blockIdx.x * n;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, to_f(s[base + i]));
  m = block_reduce<true>(m, sh);
  float l = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) l += __expf(to_f(s[base + i]) - m);
  float lse = m + __logf(block_reduce<false>(l, sh));
  for (int i = threadIdx.x; i < n; i += blockDim.x) p[base + i] = from_f<T>(__expf(to_f(s[base + i]) - lse));
  if (threadIdx.x == 0) lse_out[blockIdx.x] = lse;
}

// Attention backward through the softmax, elementwise: p = exp(s − lse[row]), ds = p·(dp − delta[row]).
template <typename T>
__device__ void softmax_bwd(const T *s, const T *dp, const float *lse, const float *delta, T *p_out, T *ds,
                            size_t total, int n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    size_t row = i / n;
    float p = __expf(to_f(s[i]) - lse[row]);
    p_out[i] = from_f<T>(p);
    ds[i] = from_f<T>(p * (to_f(dp[i]) - delta[row]));
  }
}

// out[row] = Σ a·b over rows of n elements, one warp per row.
template <typename T> __device__ void row_dot(const T *a, const T *b, float *out, int rows, int n) {
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  size_t base = (size_t)row * n;
  float s = 0.f;
  for (int i = lane; i < n; i += 32) s += to_f(a[base + i]) * to_f(b[base + i]);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  if (lane == 0) out[row] = s;
}

// acc += x (acc in f32).
template <typename T> __device__ void acc_add(float *acc, const T *x, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    acc[i] += to_f(x[i]);
}

// *acc += Σ x² (one atomic add per block).
template <typename T> __device__ void sum_squares(const T *x, float *acc, size_t n) {
  __shared__ float sh[33];
  float s = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v = to_f(x[i]);
    s += v * v;
  }
  s = block_reduce<false>(s, sh);
  if (threadIdx.x == 0) atomicAdd(acc, s);
}

// One AdamW update in place. Everything that changes between steps is read from device memory, so that a
// captured step (CUDA graph) replays with the current values: `sumsq` is Σ g² over all variables (the global
// gradient norm before unscaling) and `h` the group's hyper-parameters, in the order of `Hyper` in
// src/train/optim.rs: lr, bias corrections 1/(1 − β₁ᵗ) and 1/(1 − β₂ᵗ), decay factor 1 − lr·wd, 1/loss scale,
// max norm (0 = no clipping), β₁, β₂, eps. A non-finite norm skips the update, as the host does.
extern "C" __global__ void adamw_f32(float *p, const float *g, float *m, float *v, size_t n, const float *sumsq,
                                     const float *h) {
  float lr = h[0], c1 = h[1], c2 = h[2], decay = h[3], unscale = h[4], max_norm = h[5];
  float beta1 = h[6], beta2 = h[7], eps = h[8];
  float norm = sqrtf(*sumsq) * unscale;
  if (!isfinite(norm)) return;
  float scale = (max_norm > 0.f && norm > max_norm ? max_norm / (norm + 1e-6f) : 1.f) * unscale;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i] * scale;
    float mi = beta1 * m[i] + (1.f - beta1) * gi;
    float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - lr * (mi * c1) / (sqrtf(vi * c2) + eps);
  }
}

// x[0..n) = value.
extern "C" __global__ void fill_f32(float *x, float value, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    x[i] = value;
}

// The columns of a 2-D convolution as one matrix col [C·kh·kw, B·oh·ow]: row k = (c·kh + ky)·kw + kx (the
// order of a [N, C, kh, kw] weight), column b·oh·ow + oy·ow + ox; zero where the window leaves the padded input.
// Then weight [N, C·kh·kw] · col is the output in [N, B, oh, ow] order. Grid rows (blockIdx.y) are input
// channels; a thread finds its output position once (integer division is what bounded a thread-per-element
// form) and writes the kh·kw rows of its channel, each write coalesced across the block.
template <typename T>
__device__ void im2col(const T *x, T *col, int b, int c, int h, int w, int kh, int kw, int stride, int pad, int oh,
                       int ow) {
  int ci = blockIdx.y, positions = oh * ow, cols = b * positions;
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < cols; r += gridDim.x * blockDim.x) {
    int bi = r / positions, p = r - bi * positions;
    int oy = p / ow, ox = p - oy * ow;
    const T *plane = x + ((size_t)bi * c + ci) * h * w;
    T *out = col + (size_t)ci * kh * kw * cols + r;
    for (int ky = 0; ky < kh; ky++) {
      int iy = oy * stride - pad + ky;
      for (int kx = 0; kx < kw; kx++) {
        int ix = ox * stride - pad + kx;
        bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
        out[(size_t)(ky * kw + kx) * cols] = inside ? plane[iy * w + ix] : from_f<T>(0.f);
      }
    }
  }
}

// A conv's matmul output y [N, B, P] to [B, N, P], plus the bias of each output channel when `bias` is set.
template <typename T>
__device__ void conv_output(const T *y, const float *bias, T *out, int n, int b, int positions) {
  size_t total = (size_t)n * b * positions;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    int p = (int)(i % positions);
    size_t rest = i / positions;
    int ni = (int)(rest % n), bi = (int)(rest / n);
    float v = to_f(y[((size_t)ni * b + bi) * positions + p]);
    out[i] = from_f<T>(bias ? v + bias[ni] : v);
  }
}

// GEGLU of p [rows, 2f] (value | gate): out[r, j] = p[r, j] · gelu(p[r, f + j]), the exact (erf) GELU. candle's
// form is a gelu and a product over strided halves, the slowest of its elementwise kernels.
template <typename T> __device__ void geglu_fwd(const T *p, T *out, size_t total, int f) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    size_t r = i / f, j = i - r * f;
    const T *row = p + r * 2 * f;
    float v = to_f(row[j]), x = to_f(row[f + j]);
    out[i] = from_f<T>(v * 0.5f * x * (1.f + erff(x * 0.70710678f)));
  }
}

// Its gradient from the output gradient g: dp[r, j] = g · gelu(x), dp[r, f + j] = g · v · gelu'(x), with
// gelu'(x) = Φ(x) + x · φ(x).
template <typename T> __device__ void geglu_bwd(const T *p, const T *g, T *dp, size_t total, int f) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    size_t r = i / f, j = i - r * f;
    const T *row = p + r * 2 * f;
    float v = to_f(row[j]), x = to_f(row[f + j]), gi = to_f(g[i]);
    float cdf = 0.5f * (1.f + erff(x * 0.70710678f));
    dp[r * 2 * f + j] = from_f<T>(gi * x * cdf);
    dp[r * 2 * f + f + j] = from_f<T>(gi * v * (cdf + x * 0.39894228f * __expf(-0.5f * x * x)));
  }
}

// y[r, c] += b[c] in place over rows of `cols` (a linear layer's bias; candle's broadcast add indexes strides).
template <typename T> __device__ void add_bias(T *y, const T *b, size_t total, int cols) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(to_f(y[i]) + to_f(b[i % cols]));
}

#define ENTRY_POINTS(T, SUFFIX)                                                                                     \
  extern "C" __global__ void norm_fwd_##SUFFIX(const T *x, T *y, float *mean, float *rstd, const float *w,         \
                                               const float *b, int n, int inner, int channels, float eps) {       \
    norm_fwd<T>(x, y, mean, rstd, w, b, n, inner, channels, eps);                                                 \
  }                                                                                                               \
  extern "C" __global__ void norm_bwd_##SUFFIX(const T *x, const T *g, T *dx, const float *mean, const float *rstd, \
                                               const float *w, int n, int inner, int channels) {                  \
    norm_bwd<T>(x, g, dx, mean, rstd, w, n, inner, channels);                                                     \
  }                                                                                                               \
  extern "C" __global__ void softmax_fwd_##SUFFIX(const T *s, T *p, float *lse, int n) {                          \
    softmax_fwd<T>(s, p, lse, n);                                                                                  \
  }                                                                                                               \
  extern "C" __global__ void softmax_bwd_##SUFFIX(const T *s, const T *dp, const float *lse, const float *delta,  \
                                                  T *p, T *ds, size_t total, int n) {                              \
    softmax_bwd<T>(s, dp, lse, delta, p, ds, total, n);                                                            \
  }                                                                                                               \
  extern "C" __global__ void row_dot_##SUFFIX(const T *a, const T *b, float *out, int rows, int n) {             \
    row_dot<T>(a, b, out, rows, n);                                                                                \
  }                                                                                                               \
  extern "C" __global__ void acc_add_##SUFFIX(float *acc, const T *x, size_t n) { acc_add<T>(acc, x, n); }        \
  extern "C" __global__ void sum_squares_##SUFFIX(const T *x, float *acc, size_t n) { sum_squares<T>(x, acc, n); } \
  extern "C" __global__ void im2col_##SUFFIX(const T *x, T *col, int b, int c, int h, int w, int kh, int kw,       \
                                             int stride, int pad, int oh, int ow) {                              \
    im2col<T>(x, col, b, c, h, w, kh, kw, stride, pad, oh, ow);                                                   \
  }                                                                                                               \
  extern "C" __global__ void conv_output_##SUFFIX(const T *y, const float *bias, T *out, int n, int b,             \
                                                  int positions) {                                                \
    conv_output<T>(y, bias, out, n, b, positions);                                                                \
  }                                                                                                               \
  extern "C" __global__ void geglu_fwd_##SUFFIX(const T *p, T *out, size_t total, int f) {                        \
    geglu_fwd<T>(p, out, total, f);                                                                                \
  }                                                                                                               \
  extern "C" __global__ void geglu_bwd_##SUFFIX(const T *p, const T *g, T *dp, size_t total, int f) {             \
    geglu_bwd<T>(p, g, dp, total, f);                                                                              \
  }                                                                                                               \
  extern "C" __global__ void add_bias_##SUFFIX(T *y, const T *b, size_t total, int cols) {                        \
    add_bias<T>(y, b, total, cols);                                                                                \
  }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(__nv_bfloat16, bf16)
ENTRY_POINTS(__half, f16)
