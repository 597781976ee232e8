// common.cuh - device helpers shared by the forward and backward scan kernels.
//
// Layout used by both kernels: a thread block handles `nw` consecutive channels of one batch
// element (one warp per channel, all in the same B/C group). A warp walks its channel's sequence
// in chunks of kChunk = 32 lanes x kItems steps; lane i owns the kItems consecutive steps
// [l0 + i*kItems, l0 + (i+1)*kItems) of a chunk, so its loads are single 16-byte vectors for
// 16-bit data. Inside a chunk the recurrence h -> a*h + x is a warp scan over affine maps
// (a, x); the state is carried from chunk to chunk.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#if defined(SCANLIB_EMULATE)
#include "emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include "scanlib_cuda.h"

namespace scanlib {

constexpr int kWarp = 32;
constexpr int kItems = 8;                // steps per lane per chunk
constexpr int kChunk = kWarp * kItems;   // steps per chunk
constexpr int kMaxWarps = 8;             // channels per block
constexpr int kMaxTileN = 16;            // states of B/C staged in shared memory at once
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

static_assert(kChunk == SCANLIB_CHUNK, "chunk size differs from the C ABI's");

// Everything a kernel needs: the caller's parameters plus what the host derived from them.
struct KernelArgs {
    scanlib_scan_params p;
    int nchunks;   // ceil(L / kChunk)
    int nloop;     // N rounded up to the kernel's unroll width: states processed per chunk
    int nstride;   // row length of the per-warp arrays in shared memory (N rounded up to 4)
    int ntile;     // states of varying B/C staged per round (multiple of the unroll width)
    int tiles;     // D / channels per block
    // 16-byte vector access is allowed (base and row strides aligned; L-stride is always 1)
    bool vec_u, vec_delta, vec_z, vec_out, vec_B, vec_C, vec_dout, vec_du, vec_ddelta, vec_dz;
    // offsets (in floats) of the shared-memory sections; -1 where absent
    int off_A, off_state, off_Bc, off_Cc, off_Bs, off_Cs;  // forward and backward
    int off_dA, off_dBc, off_dCc, off_red;                  // backward only
};

// ------------------------------------------------------------------ shared memory
__device__ __forceinline__ float* dynamic_smem() {
#if defined(SCANLIB_EMULATE)
    return reinterpret_cast<float*>(scanlib_emu::dynamic_smem());
#else
    extern __shared__ __align__(16) float scanlib_dynamic_smem[];
    return scanlib_dynamic_smem;
#endif
}

// ------------------------------------------------------------------ conversions
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// 16-bit values packed two to a 32-bit word (element 2i in the low half: little endian)
__device__ __forceinline__ float lo_to_float(unsigned w, __half) {
    __half_raw r;
    r.x = static_cast<unsigned short>(w & 0xffffu);
    return __half2float(__half(r));
}
__device__ __forceinline__ float hi_to_float(unsigned w, __half) {
    __half_raw r;
    r.x = static_cast<unsigned short>(w >> 16);
    return __half2float(__half(r));
}
__device__ __forceinline__ float lo_to_float(unsigned w, __nv_bfloat16) {
    return __uint_as_float(w << 16);
}
__device__ __forceinline__ float hi_to_float(unsigned w, __nv_bfloat16) {
    return __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ unsigned bits16(float x, __half) {
    const __half_raw r = __float2half_rn(x);
    return r.x;
}
__device__ __forceinline__ unsigned bits16(float x, __nv_bfloat16) {
    const __nv_bfloat16_raw r = __float2bfloat16_rn(x);
    return r.x;
}

// Where step k of lane `lane` is kept in a [kChunk] row of shared memory: lane*kItems + k with
// k XOR-swizzled by the lane's group of four, so that a warp storing one k per lane hits 32
// distinct banks, and 32 threads reading 32 consecutive steps do too.
__device__ __forceinline__ int red_slot(int lane, int k) {
    return lane * kItems + (k ^ ((lane >> 2) & (kItems - 1)));
}

__device__ __forceinline__ int imin(int x, int y) { return x < y ? x : y; }

// number of valid steps among this lane's kItems starting at lt
__device__ __forceinline__ int valid_items(int64_t lt, int64_t L) {
    const int64_t left = L - lt;
    return static_cast<int>(left < 0 ? 0 : (left > kItems ? kItems : left));
}

// ------------------------------------------------------------------ loads and stores
// the CPU emulation reports the misaligned 16-byte accesses a GPU would fault on
__device__ __forceinline__ void check_aligned(const void* p) {
#if defined(SCANLIB_EMULATE)
    scanlib_emu::check_aligned16(p);
#else
    (void)p;
#endif
}

__device__ __forceinline__ unsigned raw_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned raw_bits(__half x) { return static_cast<__half_raw>(x).x; }
__device__ __forceinline__ unsigned raw_bits(__nv_bfloat16 x) {
    return static_cast<__nv_bfloat16_raw>(x).x;
}

// kItems elements of T as raw bits: one 16-byte word for 16-bit types, two for float. Loading
// into a Pack and converting later lets a kernel prefetch the next chunk into registers without
// waiting for the data.
template <typename T>
struct Pack {
    static constexpr int kWords = sizeof(T) == 4 ? 2 : 1;
    uint4 w[kWords];
};

// pk = row[l .. l + kItems), zero bits (= 0.0) for k >= valid. `vec`: 16-byte loads are allowed
// when all kItems steps are valid (row + l is then 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& pk, const T* row, int64_t l, int valid,
                                          bool vec) {
    if (vec && valid == kItems) {
        check_aligned(row + l);
#pragma unroll
        for (int i = 0; i < Pack<T>::kWords; ++i) pk.w[i] = reinterpret_cast<const uint4*>(row + l)[i];
        return;
    }
    unsigned bits[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) bits[k] = k < valid ? raw_bits(row[l + k]) : 0u;
    if constexpr (sizeof(T) == 4) {
        pk.w[0] = make_uint4(bits[0], bits[1], bits[2], bits[3]);
        pk.w[1] = make_uint4(bits[4], bits[5], bits[6], bits[7]);
    } else {
        pk.w[0] = make_uint4(bits[0] | (bits[1] << 16), bits[2] | (bits[3] << 16),
                             bits[4] | (bits[5] << 16), bits[6] | (bits[7] << 16));
    }
}

template <typename T>
__device__ __forceinline__ void unpack(const Pack<T>& pk, float (&v)[kItems]) {
    if constexpr (sizeof(T) == 4) {
        const unsigned words[8] = {pk.w[0].x, pk.w[0].y, pk.w[0].z, pk.w[0].w,
                                   pk.w[1].x, pk.w[1].y, pk.w[1].z, pk.w[1].w};
#pragma unroll
        for (int k = 0; k < kItems; ++k) v[k] = __uint_as_float(words[k]);
    } else {
        const unsigned words[4] = {pk.w[0].x, pk.w[0].y, pk.w[0].z, pk.w[0].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = lo_to_float(words[i], T());
            v[2 * i + 1] = hi_to_float(words[i], T());
        }
    }
}

// v[k] = row[l + k] for k < valid, 0 beyond
template <typename T>
__device__ __forceinline__ void load_items(const T* row, int64_t l, int valid, bool vec,
                                           float (&v)[kItems]) {
    Pack<T> pk;
    load_pack(pk, row, l, valid, vec);
    unpack(pk, v);
}

// row[l + k] = v[k] for k < valid
template <typename T>
__device__ __forceinline__ void store_items(T* row, int64_t l, int valid, bool vec,
                                            const float (&v)[kItems]) {
    if (vec && valid == kItems) {
        check_aligned(row + l);
        if constexpr (sizeof(T) == 4) {
            float4* p = reinterpret_cast<float4*>(row + l);
            p[0] = make_float4(v[0], v[1], v[2], v[3]);
            p[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            uint4 w;
            w.x = bits16(v[0], T()) | (bits16(v[1], T()) << 16);
            w.y = bits16(v[2], T()) | (bits16(v[3], T()) << 16);
            w.z = bits16(v[4], T()) | (bits16(v[5], T()) << 16);
            w.w = bits16(v[6], T()) | (bits16(v[7], T()) << 16);
            *reinterpret_cast<uint4*>(row + l) = w;
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k)
        if (k < valid) row[l + k] = from_float<T>(v[k]);
}

// ------------------------------------------------------------------ staging B/C in shared memory
// 16 bytes global -> shared without passing through registers (cp.async, sm_80+): the copy for
// the next stage runs while the block computes the current one.
__device__ __forceinline__ void copy_async16(void* smem_dst, const void* gmem_src) {
#if defined(SCANLIB_EMULATE)
    check_aligned(smem_dst);
    check_aligned(gmem_src);
    std::memcpy(smem_dst, gmem_src, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
    *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

// wait until this thread's cp.async copies have landed (a __syncthreads then publishes them)
__device__ __forceinline__ void copy_async_wait_all() {
#if !defined(SCANLIB_EMULATE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Stage rows n0 .. n0+tn-1 of a varying B or C for the chunk starting at l0 into
// dst[nn * kChunk + t] (raw T; zero for n >= N or l >= L). Every thread of the block takes part.
// Full aligned segments are copied asynchronously: copy_async_wait_all + __syncthreads before
// reading them.
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, const T* base, int64_t stride_n, int n0,
                                           int tn, int N, int64_t l0, int64_t L, bool vec) {
    constexpr int kSegs = kChunk / kItems;  // kItems-step segments per row
    for (int v = threadIdx.x; v < tn * kSegs; v += blockDim.x) {
        const int nn = v / kSegs, seg = v % kSegs;
        const int n = n0 + nn;
        const int64_t l = l0 + seg * kItems;
        const int valid = n < N ? valid_items(l, L) : 0;
        T* d = dst + nn * kChunk + seg * kItems;
        if (vec && valid == kItems) {
            const T* src = base + n * stride_n + l;
#pragma unroll
            for (int i = 0; i < Pack<T>::kWords; ++i)
                copy_async16(reinterpret_cast<uint4*>(d) + i, reinterpret_cast<const uint4*>(src) + i);
        } else {
            Pack<T> pk;
            if (valid > 0) {
                load_pack(pk, base + n * stride_n, l, valid, false);
            } else {
#pragma unroll
                for (int i = 0; i < Pack<T>::kWords; ++i) pk.w[i] = make_uint4(0u, 0u, 0u, 0u);
            }
            check_aligned(d);
#pragma unroll
            for (int i = 0; i < Pack<T>::kWords; ++i) reinterpret_cast<uint4*>(d)[i] = pk.w[i];
        }
    }
}

// The B or C values of one state for this lane's steps: a per-channel constant, or the lane's
// kItems steps of a row staged in shared memory.
template <typename T>
__device__ __forceinline__ void bc_items(bool is_const, float value, const T* staged_row, int lane,
                                         float (&v)[kItems]) {
    if (is_const) {
#pragma unroll
        for (int k = 0; k < kItems; ++k) v[k] = value;
    } else {
        const T* p = staged_row + lane * kItems;
        check_aligned(p);
        Pack<T> pk;
#pragma unroll
        for (int i = 0; i < Pack<T>::kWords; ++i) pk.w[i] = reinterpret_cast<const uint4*>(p)[i];
        unpack(pk, v);
    }
}

// ------------------------------------------------------------------ math
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float shfl_up(float v, int d) { return __shfl_up_sync(kFull, v, d); }
__device__ __forceinline__ float shfl_down(float v, int d) {
    return __shfl_down_sync(kFull, v, d);
}
__device__ __forceinline__ float shfl_idx(float v, int src) { return __shfl_sync(kFull, v, src); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFull, v, m);
    return v;
}

}  // namespace scanlib
