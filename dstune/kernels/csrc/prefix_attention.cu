// Prefix-KV attention: softmax(scale * q [prefix_k; k]^T + mask) [prefix_v; v], without copying the
// prefix per batch row and without materialising a mask.
//
// Keys form one virtual sequence per (batch row, KV head): j < P is prefix row j (shared by the batch),
// j >= P is sequence key t = j - P. Prefix keys are always visible. Sequence key t is visible to query
// i when key_valid[b][t] (padding; no tensor = all valid) and, if causal, t <= i + (Sk - Sq): causal
// aligned bottom-right, as when queries are the last Sq positions of a KV cache. Query head h reads KV
// head h / (Hq / Hkv) (grouped-query attention).
//
// Forward: FlashAttention tiling. A block owns BM queries of one (b, h) and walks the visible key
// tiles with an online softmax; scores live only in shared memory; matmuls on tensor cores (WMMA,
// bf16/fp16 in, fp32 accumulate). It also writes the row log-sum-exp for the backward.
// Backward (FlashAttention-2): a block owns BN keys of one (b, KV head), walks every query tile of
// every query head in the group and accumulates dK/dV in shared memory; dQ is added atomically in
// fp32. Prefix rows add their dK/dV atomically into fp32 [Hkv, P, D] buffers over the batch, so the
// prefix gradients come out already reduced.
// The caller passes the stream and has made q's device current (see prefix_cuda.py), so no c10/cuda
// headers are needed: the kernel builds against any torch, the CPU wheel's headers included.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/extension.h>

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace nvcuda;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kFrag = 16;  // WMMA tile: m = n = k = 16

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

struct Params {
  int B, Hq, Hkv, Sq, Sk, P;
  bool causal;
  float scale;
  const uint8_t* key_valid;  // [B, Sk], nonzero = a real token; nullptr = no padding
};

// May query i see virtual key j of batch row b?
__device__ __forceinline__ bool visible(const Params& p, int b, int i, int j) {
  if (i >= p.Sq || j >= p.P + p.Sk) return false;
  if (j < p.P) return true;
  const int t = j - p.P;
  if (p.key_valid != nullptr && p.key_valid[static_cast<int64_t>(b) * p.Sk + t] == 0) return false;
  return !p.causal || t <= i + (p.Sk - p.Sq);
}

// rows [r0, r0 + rows) of a row-major matrix with `stride` elements between rows; zeros past n_rows
template <typename T, int D>
__device__ void load_rows(T* dst, const T* src, int64_t stride, int r0, int rows, int n_rows) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D;
    dst[idx] = r0 + r < n_rows ? src[(r0 + r) * stride + c] : from_float<T>(0.f);
  }
}

// virtual keys (or values) [j0, j0 + rows): prefix rows from `prefix`, then sequence rows from `seq`
template <typename T, int D>
__device__ void load_virtual_rows(T* dst, const T* prefix, const T* seq, int j0, int rows, const Params& p) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D, j = j0 + r;
    T val = from_float<T>(0.f);
    if (j < p.P) {
      val = prefix[static_cast<int64_t>(j) * D + c];
    } else if (j - p.P < p.Sk) {
      val = seq[static_cast<int64_t>(j - p.P) * D + c];
    }
    dst[idx] = val;
  }
}

// C (M x N, fp32, row-major, ldc) = or += A (M x K) B (K x N), spread over the block's warps.
// A is row-major (lda) or, with ATrans, the transpose of a row-major K x M matrix; B likewise.
template <typename T, int M, int N, int K, bool ATrans, bool BTrans, bool Accumulate>
__device__ void block_matmul(float* C, int ldc, const T* A, int lda, const T* Bm, int ldb) {
  using ALayout = typename std::conditional<ATrans, wmma::col_major, wmma::row_major>::type;
  using BLayout = typename std::conditional<BTrans, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x / 32;
  constexpr int kCols = N / kFrag;
  for (int f = warp; f < (M / kFrag) * kCols; f += kWarps) {
    const int fm = f / kCols, fn = f % kCols;
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
    float* c_tile = C + fm * kFrag * ldc + fn * kFrag;
    if (Accumulate) {
      wmma::load_matrix_sync(acc, c_tile, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
    for (int kk = 0; kk < K; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, ALayout> a;
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, BLayout> b;
      // element (m, k) of A: row-major at A[m * lda + k]; transposed at A[k * lda + m]
      wmma::load_matrix_sync(a, ATrans ? A + kk * lda + fm * kFrag : A + fm * kFrag * lda + kk, lda);
      // element (k, n) of B: row-major at B[k * ldb + n]; transposed at B[n * ldb + k]
      wmma::load_matrix_sync(b, BTrans ? Bm + fn * kFrag * ldb + kk : Bm + kk * ldb + fn * kFrag, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(c_tile, acc, ldc, wmma::mem_row_major);
  }
}

template <typename T, int D, int BM, int BN>
struct ForwardSmem {
  static constexpr size_t bytes = sizeof(T) * (BM * D + 2 * BN * D + BM * BN) + sizeof(float) * (BM * BN + BM * D + 3 * BM);
};

// grid (ceil(Sq / BM), B * Hq); out is [B, Sq, Hq, D] (the layout attention layers return), lse [B, Hq, Sq]
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ pk, const T* __restrict__ pv, T* __restrict__ out, float* __restrict__ lse,
               Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // BM x D
  T* sK = sQ + BM * D;                 // BN x D
  T* sV = sK + BN * D;                 // BN x D
  T* sP = sV + BN * D;                 // BM x BN probabilities of this key tile
  float* sS = reinterpret_cast<float*>(sP + BM * BN);  // BM x BN scores
  float* sO = sS + BM * BN;            // BM x D unnormalised output
  float* sMax = sO + BM * D;           // BM running max of scaled scores
  float* sSum = sMax + BM;             // BM running sum of exp
  float* sCorr = sSum + BM;            // BM rescale of the old output by this tile

  const int q0 = blockIdx.x * BM;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq, hk = h / (p.Hq / p.Hkv);
  const T* qp = q + (static_cast<int64_t>(b) * p.Hq + h) * p.Sq * D;
  const int64_t kv_offset = (static_cast<int64_t>(b) * p.Hkv + hk) * p.Sk * D;
  const T* pkp = pk + static_cast<int64_t>(hk) * p.P * D;
  const T* pvp = pv + static_cast<int64_t>(hk) * p.P * D;

  load_rows<T, D>(sQ, qp, D, q0, BM, p.Sq);
  for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) sO[idx] = 0.f;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    sMax[r] = -INFINITY;
    sSum[r] = 0.f;
  }
  // causal: no query of this tile sees sequence keys past its last query's position
  int j_end = p.P + p.Sk;
  if (p.causal) j_end = min(j_end, p.P + max(0, q0 + BM + (p.Sk - p.Sq)));
  __syncthreads();

  for (int j0 = 0; j0 < j_end; j0 += BN) {
    load_virtual_rows<T, D>(sK, pkp, k + kv_offset, j0, BN, p);
    load_virtual_rows<T, D>(sV, pvp, v + kv_offset, j0, BN, p);
    __syncthreads();
    block_matmul<T, BM, BN, D, false, true, false>(sS, BN, sQ, D, sK, D);  // S = Q K^T
    __syncthreads();
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {  // online softmax, one thread per row
      const int i = q0 + r;
      const float old_max = sMax[r];
      float new_max = old_max;
      for (int c = 0; c < BN; ++c) {
        if (visible(p, b, i, j0 + c)) new_max = fmaxf(new_max, sS[r * BN + c] * p.scale);
      }
      float sum = 0.f;
      for (int c = 0; c < BN; ++c) {
        // a visible key makes new_max finite, so exp never sees (-inf) - (-inf)
        const float e = visible(p, b, i, j0 + c) ? __expf(sS[r * BN + c] * p.scale - new_max) : 0.f;
        sP[r * BN + c] = from_float<T>(e);
        sum += e;
      }
      const float corr = old_max == -INFINITY ? 0.f : __expf(old_max - new_max);
      sSum[r] = sSum[r] * corr + sum;
      sMax[r] = new_max;
      sCorr[r] = corr;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) sO[idx] *= sCorr[idx / D];
    __syncthreads();
    block_matmul<T, BM, D, BN, false, false, true>(sO, D, sP, BN, sV, D);  // O += P V
    __syncthreads();
  }

  for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D, i = q0 + r;
    if (i < p.Sq) {
      const float sum = sSum[r];
      out[((static_cast<int64_t>(b) * p.Sq + i) * p.Hq + h) * D + c] = from_float<T>(sum > 0.f ? sO[idx] / sum : 0.f);
    }
  }
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int i = q0 + r;
    // a row that sees nothing gets +inf, so the backward's exp(s - lse) is 0 for it
    if (i < p.Sq) lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Sq + i] = sSum[r] > 0.f ? sMax[r] + logf(sSum[r]) : INFINITY;
  }
}

template <typename T, int D, int BM, int BN>
struct BackwardSmem {
  static constexpr size_t bytes = sizeof(T) * (2 * BN * D + 2 * BM * D + 2 * BM * BN) +
                                  sizeof(float) * (2 * BN * D + 2 * BM * BN + 2 * BM);
};

// grid (ceil((P + Sk) / BN), B * Hkv). dout/out are [B, Sq, Hq, D]; lse, delta [B, Hq, Sq];
// dq (fp32, zeroed) [B, Hq, Sq, D]; dk, dv [B, Hkv, Sk, D]; dpk, dpv (fp32, zeroed) [Hkv, P, D].
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const T* __restrict__ pk, const T* __restrict__ pv, const T* __restrict__ dout,
                const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq,
                T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dpk, float* __restrict__ dpv, Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // BN x D
  T* sV = sK + BN * D;                 // BN x D
  T* sQ = sV + BN * D;                 // BM x D
  T* sdO = sQ + BM * D;                // BM x D
  T* sP = sdO + BM * D;                // BM x BN
  T* sdS = sP + BM * BN;               // BM x BN
  float* sdK = reinterpret_cast<float*>(sdS + BM * BN);  // BN x D
  float* sdV = sdK + BN * D;           // BN x D
  float* sS = sdV + BN * D;            // BM x BN scores, then (with sdP) the BM x D dQ tile
  float* sdP = sS + BM * BN;           // BM x BN
  float* sLse = sdP + BM * BN;         // BM
  float* sDelta = sLse + BM;           // BM
  float* sdQ = sS;
  static_assert(2 * BM * BN >= BM * D, "the dQ tile reuses the score buffers");

  const int j0 = blockIdx.x * BN;
  const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t kv_offset = (static_cast<int64_t>(b) * p.Hkv + hk) * p.Sk * D;
  load_virtual_rows<T, D>(sK, pk + static_cast<int64_t>(hk) * p.P * D, k + kv_offset, j0, BN, p);
  load_virtual_rows<T, D>(sV, pv + static_cast<int64_t>(hk) * p.P * D, v + kv_offset, j0, BN, p);
  for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
    sdK[idx] = 0.f;
    sdV[idx] = 0.f;
  }
  // causal: queries before the first sequence key of this tile see none of it (prefix keys: all see them)
  int i_first = 0;
  if (p.causal && j0 >= p.P) i_first = max(0, (j0 - p.P) - (p.Sk - p.Sq));
  __syncthreads();

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Sq;
    for (int i0 = (i_first / BM) * BM; i0 < p.Sq; i0 += BM) {
      load_rows<T, D>(sQ, q + row_base * D, D, i0, BM, p.Sq);
      load_rows<T, D>(sdO, dout + (static_cast<int64_t>(b) * p.Sq * p.Hq + h) * D, static_cast<int64_t>(p.Hq) * D,
                      i0, BM, p.Sq);
      for (int r = threadIdx.x; r < BM; r += blockDim.x) {
        const bool in = i0 + r < p.Sq;
        sLse[r] = in ? lse[row_base + i0 + r] : INFINITY;
        sDelta[r] = in ? delta[row_base + i0 + r] : 0.f;
      }
      __syncthreads();
      block_matmul<T, BM, BN, D, false, true, false>(sS, BN, sQ, D, sK, D);    // S = Q K^T
      block_matmul<T, BM, BN, D, false, true, false>(sdP, BN, sdO, D, sV, D);  // dP = dO V^T
      __syncthreads();
      for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
        const int r = idx / BN, c = idx % BN;
        const float prob = visible(p, b, i0 + r, j0 + c) ? __expf(sS[idx] * p.scale - sLse[r]) : 0.f;
        sP[idx] = from_float<T>(prob);
        sdS[idx] = from_float<T>(prob * (sdP[idx] - sDelta[r]) * p.scale);  // d(raw score), scale folded in
      }
      __syncthreads();
      block_matmul<T, BN, D, BM, true, false, true>(sdV, D, sP, BN, sdO, D);  // dV += P^T dO
      block_matmul<T, BN, D, BM, true, false, true>(sdK, D, sdS, BN, sQ, D);  // dK += dS^T Q
      block_matmul<T, BM, D, BN, false, false, false>(sdQ, D, sdS, BN, sK, D);  // dQ tile = dS K
      __syncthreads();
      for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
        const int r = idx / D, c = idx % D;
        if (i0 + r < p.Sq) atomicAdd(dq + (row_base + i0 + r) * D + c, sdQ[idx]);
      }
      __syncthreads();
    }
  }

  for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D, j = j0 + r;
    if (j < p.P) {
      atomicAdd(dpk + (static_cast<int64_t>(hk) * p.P + j) * D + c, sdK[idx]);
      atomicAdd(dpv + (static_cast<int64_t>(hk) * p.P + j) * D + c, sdV[idx]);
    } else if (j - p.P < p.Sk) {
      dk[kv_offset + static_cast<int64_t>(j - p.P) * D + c] = from_float<T>(sdK[idx]);
      dv[kv_offset + static_cast<int64_t>(j - p.P) * D + c] = from_float<T>(sdV[idx]);
    }
  }
}

void check_cuda(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "prefix_attention: ", cudaGetErrorString(err));
}

constexpr int kForwardBM = 64, kForwardBN = 64, kBackwardBM = 32, kBackwardBN = 64;

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pk,
                   const c10::optional<at::Tensor>& key_valid, bool causal, double scale) {
  Params p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Sq = q.size(2);
  p.Hkv = k.size(1);
  p.Sk = k.size(2);
  p.P = pk.size(1);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.key_valid = key_valid.has_value() ? key_valid->data_ptr<uint8_t>() : nullptr;
  return p;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                  const at::Tensor& pv, const c10::optional<at::Tensor>& key_valid, bool causal) {
  for (const at::Tensor* t : {&q, &k, &v, &pk, &pv}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous(), "prefix_attention: inputs must be contiguous CUDA tensors");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "prefix_attention: inputs must share one dtype");
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "prefix_attention: bf16 or fp16 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && pk.dim() == 3 && pv.sizes() == pk.sizes(),
              "prefix_attention: q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D], prefix_k/v [Hkv,P,D]");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "prefix_attention: head dim 64 or 128, got ", D);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == D && pk.size(0) == k.size(1) && pk.size(2) == D,
              "prefix_attention: shapes disagree");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "prefix_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(!causal || k.size(2) >= q.size(2), "prefix_attention: causal needs Sk >= Sq");
  if (key_valid.has_value()) {
    TORCH_CHECK(key_valid->is_cuda() && key_valid->is_contiguous() && key_valid->scalar_type() == at::kByte &&
                    key_valid->dim() == 2 && key_valid->size(0) == q.size(0) && key_valid->size(1) == k.size(2),
                "prefix_attention: key_valid must be a contiguous uint8 CUDA tensor [B, Sk]");
  }
}

template <typename T, int D>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                    const at::Tensor& pv, at::Tensor& out, at::Tensor& lse, const Params& p,
                    cudaStream_t stream) {
  constexpr size_t smem = ForwardSmem<T, D, kForwardBM, kForwardBN>::bytes;
  auto kernel = forward_kernel<T, D, kForwardBM, kForwardBN>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.Sq + kForwardBM - 1) / kForwardBM, p.B * p.Hq);
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(pk.data_ptr()),
      reinterpret_cast<const T*>(pv.data_ptr()), reinterpret_cast<T*>(out.data_ptr()), lse.data_ptr<float>(), p);
  check_cuda(cudaGetLastError());
}

template <typename T, int D>
void launch_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                     const at::Tensor& pv, const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk, at::Tensor& dpv,
                     const Params& p, cudaStream_t stream) {
  constexpr size_t smem = BackwardSmem<T, D, kBackwardBM, kBackwardBN>::bytes;
  auto kernel = backward_kernel<T, D, kBackwardBM, kBackwardBN>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.P + p.Sk + kBackwardBN - 1) / kBackwardBN, p.B * p.Hkv);
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(pk.data_ptr()),
      reinterpret_cast<const T*>(pv.data_ptr()), reinterpret_cast<const T*>(dout.data_ptr()),
      lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(), reinterpret_cast<T*>(dk.data_ptr()),
      reinterpret_cast<T*>(dv.data_ptr()), dpk.data_ptr<float>(), dpv.data_ptr<float>(), p);
  check_cuda(cudaGetLastError());
}

// calls F<T, D>() for the tensor's dtype and head dim
template <template <typename, int> class F, typename... Args>
void dispatch(at::ScalarType dtype, int64_t D, Args&&... args) {
  if (dtype == at::kHalf) {
    if (D == 64) return F<__half, 64>::run(std::forward<Args>(args)...);
    return F<__half, 128>::run(std::forward<Args>(args)...);
  }
  if (D == 64) return F<__nv_bfloat16, 64>::run(std::forward<Args>(args)...);
  return F<__nv_bfloat16, 128>::run(std::forward<Args>(args)...);
}

template <typename T, int D>
struct Forward {
  template <typename... Args>
  static void run(Args&&... args) { launch_forward<T, D>(std::forward<Args>(args)...); }
};

template <typename T, int D>
struct Backward {
  template <typename... Args>
  static void run(Args&&... args) { launch_backward<T, D>(std::forward<Args>(args)...); }
};

}  // namespace

// returns (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)
std::vector<at::Tensor> prefix_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                 const c10::optional<at::Tensor>& key_valid, bool causal,
                                                 double scale, int64_t stream) {
  check_inputs(q, k, v, prefix_k, prefix_v, key_valid, causal);
  const Params p = make_params(q, k, prefix_k, key_valid, causal, scale);
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) dispatch<Forward>(q.scalar_type(), q.size(3), q, k, v, prefix_k, prefix_v, out, lse, p,
                                      reinterpret_cast<cudaStream_t>(stream));
  return {out, lse};
}

// returns (dq, dk, dv, dprefix_k, dprefix_v); dprefix is summed over the batch
std::vector<at::Tensor> prefix_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& prefix_k,
                                                  const at::Tensor& prefix_v, const at::Tensor& out,
                                                  const at::Tensor& lse, const c10::optional<at::Tensor>& key_valid,
                                                  bool causal, double scale, int64_t stream) {
  check_inputs(q, k, v, prefix_k, prefix_v, key_valid, causal);
  TORCH_CHECK(dout.sizes() == out.sizes() && dout.is_contiguous() && out.is_contiguous(),
              "prefix_attention: dout must be contiguous [B, Sq, Hq, D]");
  const Params p = make_params(q, k, prefix_k, key_valid, causal, scale);
  // delta_i = sum_d dO_id O_id, the softmax backward's row term, as [B, Hq, Sq]
  auto delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).transpose(1, 2).contiguous();
  auto dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  auto dpk = at::zeros(prefix_k.sizes(), prefix_k.options().dtype(at::kFloat));
  auto dpv = at::zeros(prefix_v.sizes(), prefix_v.options().dtype(at::kFloat));
  if (q.numel() > 0) {
    dispatch<Backward>(q.scalar_type(), q.size(3), q, k, v, prefix_k, prefix_v, dout, lse, delta, dq, dk, dv, dpk,
                       dpv, p, reinterpret_cast<cudaStream_t>(stream));
  }
  return {dq.to(q.scalar_type()), dk, dv, dpk.to(q.scalar_type()), dpv.to(q.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Prefix-KV attention (flash-style forward and backward) for dstune's prefix tuning.";
  m.def("forward", &prefix_attention_forward, "prefix attention forward: (out, lse)");
  m.def("backward", &prefix_attention_backward, "prefix attention backward: (dq, dk, dv, dprefix_k, dprefix_v)");
}
