// Flash attention for training on tensor cores (mma.sync m16n8k16, sm_80+): forward, and backward as two kernels
// (dQ over query tiles; dK and dV over key tiles), so that no score matrix ever reaches device memory and no
// gradient needs atomics. q, k, v, o and the gradients stay in the projections' layout [B, N, H·d] (head h of
// row r at r·H·d + h·d; d even, ≤ DP, the padded head dim of the instantiation), so no head split or merge is
// copied; lse and delta = rowsum(dO ⊙ O) per head are [B, Nq, H] f32. Scores are scale·q·kᵀ. Arithmetic in f32.
//
// A block is 4 warps; each warp owns 16 rows (queries, or keys in dK/dV) whose operand fragments stay in
// registers, and the block steps through the other side in tiles staged in shared memory. Fragment
// layouts are those of the PTX ISA for mma.m16n8k16: with g = lane / 4 and t = lane % 4, a thread holds rows g and
// g + 8 and columns 2t, 2t + 1 (+ 8) of A and of the accumulator, and B's k = 2t, 2t + 1 (+ 8) at n = g. An
// accumulator tile pair is thus already an A fragment (P in P·V needs no shuffles); B comes from shared memory
// by ldmatrix (transposed where the staged rows are B's k).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if __CUDA_ARCH__ >= 800

constexpr int WARPS = 4, ROWS = 16 * WARPS;

// Rows of the other side staged per step: 64 while the fragments leave registers for it, else 32 (what keeps
// d ≤ 80 without spills and two stages of both staged tensors within 48 KB of shared memory).
template <int DP> __host__ __device__ constexpr int tile_rows() { return DP <= 64 ? 64 : 32; }

template <typename T> __device__ __forceinline__ void mma(float *d, const uint32_t *a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__half>(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 matrices of 16-bit elements from shared memory; lane i gives row i % 8 of matrix i / 8. Without TRANS a
// thread receives elements (g, 2t), (g, 2t + 1) of each matrix, with TRANS (2t, g), (2t + 1, g).
template <bool TRANS> __device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void *p) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p);
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Asynchronous copies global → shared of `bytes` (4 or 16), zero-filled when `valid` is false.
template <int BYTES> __device__ __forceinline__ void copy_async(void *dst, const void *src, bool valid) {
  unsigned a = (unsigned)__cvta_generic_to_shared(dst);
  if (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(valid ? 16 : 0));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(a), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits for all but the most recent group of copies.
__device__ __forceinline__ void wait_copies_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Two floats as a register of two elements (lo in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// Elements (r, c) and (r, c + 1) of a head x (n rows of d, `stride` apart) as one register; zero outside (c is
// even and d is even).
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T *x, int r, int c, int n, int d, int stride) {
  return r < n && c < d ? *reinterpret_cast<const uint32_t *>(x + (size_t)r * stride + c) : 0u;
}

// A fragments of rows row0 .. row0 + 16 of a head x for all DP / 16 column steps.
template <typename T, int DP>
__device__ __forceinline__ void load_a(const T *x, int n, int d, int stride, int row0, uint32_t (&a)[DP / 16][4]) {
  int lane = threadIdx.x & 31, r = row0 + (lane >> 2), c = 2 * (lane & 3);
#pragma unroll
  for (int kk = 0; kk < DP / 16; kk++) {
    a[kk][0] = load_pair(x, r, kk * 16 + c, n, d, stride);
    a[kk][1] = load_pair(x, r + 8, kk * 16 + c, n, d, stride);
    a[kk][2] = load_pair(x, r, kk * 16 + c + 8, n, d, stride);
    a[kk][3] = load_pair(x, r + 8, kk * 16 + c + 8, n, d, stride);
  }
}

// Starts copying rows row0 .. row0 + TILE of a head x into sm [TILE][DP + 8], zero outside (the row padding
// staggers ldmatrix's rows across banks). 16-byte copies when `wide` (d a multiple of 8 and the tensors 16-byte
// aligned: SD's and FLUX's head dims all are).
template <typename T, int DP, int TILE>
__device__ __forceinline__ void stage(T *sm, const T *x, int n, int d, int stride, bool wide, int row0) {
  if (wide) {
    for (int i = threadIdx.x; i < TILE * DP / 8; i += blockDim.x) {
      int r = i / (DP / 8), c = (i - r * (DP / 8)) * 8;
      bool valid = row0 + r < n && c < d;
      copy_async<16>(sm + r * (DP + 8) + c, valid ? x + (size_t)(row0 + r) * stride + c : x, valid);
    }
  } else {
    for (int i = threadIdx.x; i < TILE * DP / 2; i += blockDim.x) {
      int r = i / (DP / 2), c = (i - r * (DP / 2)) * 2;
      bool valid = row0 + r < n && c < d;
      copy_async<4>(sm + r * (DP + 8) + c, valid ? x + (size_t)(row0 + r) * stride + c : x, valid);
    }
  }
}

// Starts copying v[(row0 .. row0 + TILE) · stride] (zero past n rows) into sm.
template <int TILE>
__device__ __forceinline__ void stage_rows(float *sm, const float *v, int n, int stride, int row0) {
  for (int i = threadIdx.x; i < TILE; i += blockDim.x)
    copy_async<4>(sm + i, row0 + i < n ? v + (size_t)(row0 + i) * stride : v, row0 + i < n);
}

// Where a block's head starts: head h of batch b in rows of n, for the projections' layout and for [B, N, H].
struct Head {
  size_t b, h;
  int heads, stride;
  __device__ Head(int heads, int d) : b(blockIdx.y / heads), h(blockIdx.y % heads), heads(heads), stride(heads * d) {}
  template <typename T> __device__ T *of(T *x, int n, int d) const { return x + b * n * stride + h * d; }
  __device__ const float *rows(const float *x, int n) const { return x + b * n * heads + h; }
  __device__ float *rows(float *x, int n) const { return x + b * n * heads + h; }
};

// s [16 × TILE] += a [16 × DP] · smᵀ: the staged rows are B's columns.
template <typename T, int DP, int TILE>
__device__ __forceinline__ void scores(float (&s)[TILE / 8][4], const uint32_t (&a)[DP / 16][4], const T *sm) {
  int lane = threadIdx.x & 31;
  // Matrices: (rows j, cols kk·16), (rows j, +8), (rows j + 1, kk·16), (rows j + 1, +8).
  const T *base = sm + ((lane >> 4) * 8 + (lane & 7)) * (DP + 8) + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int j = 0; j < TILE / 8; j += 2)
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
      uint32_t b[4];
      ldsm4<false>(b, base + j * 8 * (DP + 8) + kk * 16);
      mma<T>(s[j], a[kk], b[0], b[1]);
      mma<T>(s[j + 1], a[kk], b[2], b[3]);
    }
}

// acc [16 × DP] += p [16 × TILE] · sm [TILE × DP], p being accumulator tiles (rounded to T).
template <typename T, int DP, int TILE>
__device__ __forceinline__ void product(float (&acc)[DP / 8][4], const float (&p)[TILE / 8][4], const T *sm) {
  int lane = threadIdx.x & 31;
  // Matrices (transposed): (rows kk·16, cols n), (rows +8, cols n), (rows kk·16, cols n + 1), (rows +8, n + 1).
  const T *base = sm + (((lane >> 3) & 1) * 8 + (lane & 7)) * (DP + 8) + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < TILE / 16; kk++) {
    const float *lo = p[2 * kk], *hi = p[2 * kk + 1];
    uint32_t a[4] = {pack<T>(lo[0], lo[1]), pack<T>(lo[2], lo[3]), pack<T>(hi[0], hi[1]), pack<T>(hi[2], hi[3])};
#pragma unroll
    for (int n = 0; n < DP / 8; n += 2) {
      uint32_t b[4];
      ldsm4<true>(b, base + kk * 16 * (DP + 8) + n * 8);
      mma<T>(acc[n], a, b[0], b[1]);
      mma<T>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// Rows row0 .. row0 + 16 of the accumulator into a head `out` (rows < n, columns < d), times scale[h] for row
// g + 8h.
template <typename T, int DP>
__device__ __forceinline__ void store(T *out, const float (&acc)[DP / 8][4], int n, int d, int stride, int row0,
                                      const float *scale) {
  int lane = threadIdx.x & 31, r = row0 + (lane >> 2), c = 2 * (lane & 3);
#pragma unroll
  for (int j = 0; j < DP / 8; j++) {
    int col = j * 8 + c;
#pragma unroll
    for (int h = 0; h < 2; h++)
      if (r + 8 * h < n && col < d)
        *reinterpret_cast<uint32_t *>(out + (size_t)(r + 8 * h) * stride + col) =
            pack<T>(acc[j][2 * h] * scale[h], acc[j][2 * h + 1] * scale[h]);
  }
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

// Double buffering over tiles of `rows` rows: starts copying tile i + 1 into the other buffers
// (`stage(buffer, first row)`), then waits until tile i is in place for the whole block.
template <int TILE, typename Stage> __device__ __forceinline__ void advance(Stage stage, int rows, int i) {
  int next = (i + 1) * TILE;
  if (next < rows) stage((i + 1) & 1, next);
  commit_copies();
  wait_copies_but_one();
  __syncthreads();
}

// o = softmax(scale·q·kᵀ)·v and lse = log Σ exp(scale·q·kᵀ) per query, with the running max and sum of the
// online softmax. Key tiles are double-buffered: the next one is copied while this one is computed.
template <typename T, int DP>
__device__ void flash_fwd(const T *q, const T *k, const T *v, T *o, float *lse, int nq, int nk, int d, int heads,
                          float scale, bool wide) {
  constexpr int TILE = tile_rows<DP>();
  __shared__ __align__(16) T ks[2][TILE * (DP + 8)], vs[2][TILE * (DP + 8)];
  Head hd(heads, d);
  int stride = hd.stride;
  q = hd.of(q, nq, d), k = hd.of(k, nk, d), v = hd.of(v, nk, d), o = hd.of(o, nq, d), lse = hd.rows(lse, nq);
  int lane = threadIdx.x & 31, c = 2 * (lane & 3), row0 = blockIdx.x * ROWS + (threadIdx.x >> 5) * 16;
  auto stage_kv = [&](int buf, int k0) {
    stage<T, DP, TILE>(ks[buf], k, nk, d, stride, wide, k0);
    stage<T, DP, TILE>(vs[buf], v, nk, d, stride, wide, k0);
  };
  stage_kv(0, 0);
  commit_copies();
  uint32_t qa[DP / 16][4];
  load_a<T, DP>(q, nq, d, stride, row0, qa);
  float acc[DP / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  int tiles = (nk + TILE - 1) / TILE;
  for (int i = 0; i < tiles; i++) {
    int cur = i & 1, k0 = i * TILE;
    advance<TILE>(stage_kv, nk, i);
    float s[TILE / 8][4] = {};
    scores<T, DP, TILE>(s, qa, ks[cur]);
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < TILE / 8; j++)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; e++) {
          s[j][e] = k0 + j * 8 + c + (e & 1) < nk ? s[j][e] * scale : -INFINITY;
          mx = fmaxf(mx, s[j][e]);
        }
      float mn = fmaxf(m[h], quad_max(mx)), shrink = __expf(m[h] - mn);
      m[h] = mn, l[h] *= shrink;
#pragma unroll
      for (int j = 0; j < DP / 8; j++) acc[j][2 * h] *= shrink, acc[j][2 * h + 1] *= shrink;
#pragma unroll
      for (int j = 0; j < TILE / 8; j++)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; e++) {
          s[j][e] = __expf(s[j][e] - mn);
          l[h] += s[j][e];
        }
    }
    product<T, DP, TILE>(acc, s, vs[cur]);
    __syncthreads();  // the next iteration's copies overwrite this buffer
  }
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    l[h] = quad_sum(l[h]);
    inv[h] = 1.f / l[h];
    int r = row0 + (lane >> 2) + 8 * h;
    if ((lane & 3) == 0 && r < nq) lse[(size_t)r * heads] = m[h] + __logf(l[h]);
  }
  store<T, DP>(o, acc, nq, d, stride, row0, inv);
}

// dQ = scale·dS·K with P = exp(scale·q·kᵀ − lse) and dS = P ⊙ (dO·vᵀ − delta), over double-buffered key tiles.
template <typename T, int DP>
__device__ void flash_bwd_dq(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *delta,
                             T *dq, int nq, int nk, int d, int heads, float scale, bool wide) {
  constexpr int TILE = tile_rows<DP>();
  __shared__ __align__(16) T ks[2][TILE * (DP + 8)], vs[2][TILE * (DP + 8)];
  Head hd(heads, d);
  int stride = hd.stride;
  q = hd.of(q, nq, d), k = hd.of(k, nk, d), v = hd.of(v, nk, d), dout = hd.of(dout, nq, d), dq = hd.of(dq, nq, d);
  lse = hd.rows(lse, nq), delta = hd.rows(delta, nq);
  int lane = threadIdx.x & 31, c = 2 * (lane & 3), row0 = blockIdx.x * ROWS + (threadIdx.x >> 5) * 16;
  auto stage_kv = [&](int buf, int k0) {
    stage<T, DP, TILE>(ks[buf], k, nk, d, stride, wide, k0);
    stage<T, DP, TILE>(vs[buf], v, nk, d, stride, wide, k0);
  };
  stage_kv(0, 0);
  commit_copies();
  uint32_t qa[DP / 16][4], ga[DP / 16][4];
  load_a<T, DP>(q, nq, d, stride, row0, qa);
  load_a<T, DP>(dout, nq, d, stride, row0, ga);
  float rl[2], rd[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    int r = row0 + (lane >> 2) + 8 * h;
    rl[h] = r < nq ? lse[(size_t)r * heads] : 0.f;
    rd[h] = r < nq ? delta[(size_t)r * heads] : 0.f;
  }
  float acc[DP / 8][4] = {};
  int tiles = (nk + TILE - 1) / TILE;
  for (int i = 0; i < tiles; i++) {
    int cur = i & 1, k0 = i * TILE;
    advance<TILE>(stage_kv, nk, i);
    float s[TILE / 8][4] = {}, dp[TILE / 8][4] = {};
    scores<T, DP, TILE>(s, qa, ks[cur]);
    scores<T, DP, TILE>(dp, ga, vs[cur]);
#pragma unroll
    for (int j = 0; j < TILE / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float p = k0 + j * 8 + c + (e & 1) < nk ? __expf(s[j][e] * scale - rl[e >> 1]) : 0.f;
        s[j][e] = p * (dp[j][e] - rd[e >> 1]);
      }
    product<T, DP, TILE>(acc, s, ks[cur]);
    __syncthreads();
  }
  const float by[2] = {scale, scale};
  store<T, DP>(dq, acc, nq, d, stride, row0, by);
}

// dV = Pᵀ·dO and dK = scale·dSᵀ·q for a block's keys, over double-buffered query tiles (each warp's rows are 16
// keys, so the tiles computed are Pᵀ and dSᵀ directly).
template <typename T, int DP>
__device__ void flash_bwd_dkdv(const T *q, const T *k, const T *v, const T *dout, const float *lse,
                               const float *delta, T *dk, T *dv, int nq, int nk, int d, int heads, float scale,
                               bool wide) {
  constexpr int TILE = tile_rows<DP>();
  __shared__ __align__(16) T qs[2][TILE * (DP + 8)], gs[2][TILE * (DP + 8)];
  __shared__ __align__(16) float ls[2][TILE], ds[2][TILE];
  Head hd(heads, d);
  int stride = hd.stride;
  q = hd.of(q, nq, d), k = hd.of(k, nk, d), v = hd.of(v, nk, d), dout = hd.of(dout, nq, d);
  dk = hd.of(dk, nk, d), dv = hd.of(dv, nk, d), lse = hd.rows(lse, nq), delta = hd.rows(delta, nq);
  int lane = threadIdx.x & 31, c = 2 * (lane & 3), row0 = blockIdx.x * ROWS + (threadIdx.x >> 5) * 16;
  auto stage_all = [&](int buf, int q0) {
    stage<T, DP, TILE>(qs[buf], q, nq, d, stride, wide, q0);
    stage<T, DP, TILE>(gs[buf], dout, nq, d, stride, wide, q0);
    stage_rows<TILE>(ls[buf], lse, nq, heads, q0);
    stage_rows<TILE>(ds[buf], delta, nq, heads, q0);
  };
  stage_all(0, 0);
  commit_copies();
  uint32_t ka[DP / 16][4], va[DP / 16][4];
  load_a<T, DP>(k, nk, d, stride, row0, ka);
  load_a<T, DP>(v, nk, d, stride, row0, va);
  float dk_acc[DP / 8][4] = {}, dv_acc[DP / 8][4] = {};
  int tiles = (nq + TILE - 1) / TILE;
  for (int i = 0; i < tiles; i++) {
    int cur = i & 1, q0 = i * TILE;
    advance<TILE>(stage_all, nq, i);
    float s[TILE / 8][4] = {}, dp[TILE / 8][4] = {};
    scores<T, DP, TILE>(s, ka, qs[cur]);
    scores<T, DP, TILE>(dp, va, gs[cur]);
#pragma unroll
    for (int j = 0; j < TILE / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int col = j * 8 + c + (e & 1);
        float p = q0 + col < nq ? __expf(s[j][e] * scale - ls[cur][col]) : 0.f;
        s[j][e] = p;
        dp[j][e] = p * (dp[j][e] - ds[cur][col]);
      }
    product<T, DP, TILE>(dv_acc, s, gs[cur]);
    product<T, DP, TILE>(dk_acc, dp, qs[cur]);
    __syncthreads();
  }
  const float one[2] = {1.f, 1.f}, by[2] = {scale, scale};
  store<T, DP>(dk, dk_acc, nk, d, stride, row0, by);
  store<T, DP>(dv, dv_acc, nk, d, stride, row0, one);
}

#define FLASH_ENTRY_POINTS(T, SUFFIX, DP)                                                                          \
  extern "C" __global__ void __launch_bounds__(128) flash_fwd_##SUFFIX##_##DP(                                      \
      const T *q, const T *k, const T *v, T *o, float *lse, int nq, int nk, int d, int heads, float scale,        \
      int wide) {                                                                                                \
    flash_fwd<T, DP>(q, k, v, o, lse, nq, nk, d, heads, scale, wide != 0);                                             \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq_##SUFFIX##_##DP(                                   \
      const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *delta, T *dq, int nq,    \
      int nk, int d, int heads, float scale, int wide) {                                                         \
    flash_bwd_dq<T, DP>(q, k, v, dout, lse, delta, dq, nq, nk, d, heads, scale, wide != 0);                             \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkdv_##SUFFIX##_##DP(                                 \
      const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *delta, T *dk, T *dv,      \
      int nq, int nk, int d, int heads, float scale, int wide) {                                                 \
    flash_bwd_dkdv<T, DP>(q, k, v, dout, lse, delta, dk, dv, nq, nk, d, heads, scale, wide != 0);                       \
  }

// The padded head dims (src/model/fused.rs: FLASH_DIMS): SD1.5's 40, 80, 160; SD2/SDXL's 64; FLUX's 128.
#define FLASH_DIMS(T, SUFFIX)                                                                                      \
  FLASH_ENTRY_POINTS(T, SUFFIX, 48)                                                                               \
  FLASH_ENTRY_POINTS(T, SUFFIX, 64)                                                                               \
  FLASH_ENTRY_POINTS(T, SUFFIX, 80)                                                                               \
  FLASH_ENTRY_POINTS(T, SUFFIX, 128)                                                                              \
  FLASH_ENTRY_POINTS(T, SUFFIX, 160)

FLASH_DIMS(__nv_bfloat16, bf16)
FLASH_DIMS(__half, f16)

#endif
