// emulation.h - run the scan kernels on the CPU, for testing on machines without a GPU.
//
// Compiled only with -DSCANLIB_EMULATE (g++ -x c++), never by the GPU build. Each CUDA thread of
// a block is a fiber on one OS thread; blocks run one after another. __syncthreads, __syncwarp
// and the warp shuffles are barriers on which a fiber yields until every thread of its block or
// warp has arrived, so the emulation follows CUDA's synchronisation rules exactly: a missing
// barrier shows up as a wrong result, a divergent one (some threads skip it) as a reported
// deadlock instead of a hang. Dynamic shared memory starts filled with NaN bytes so that reading
// shared memory before writing it shows up in the results.
#pragma once

#if !defined(SCANLIB_EMULATE)
#error "emulation.h is only for the CPU emulation build (-DSCANLIB_EMULATE)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

// the host side of CUDA's headers (cuda_fp16.h pulls in vector_types.h and host_defines.h)
// already supplies uint3/uint4/float4/dim3 and empty __device__/__global__/__shared__
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace scanlib_emu {

// Runs `body` for every thread of every block of `grid` x `block`; `smem` bytes of dynamic shared
// memory per block. Returns nullptr or an error message (deadlock, bad configuration).
const char* launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// record a fault (the first one is reported by launch; the kernel keeps running)
void fault(const char* what);
inline void check_aligned16(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fault("emulation: misaligned 16-byte access");
}

void sync_block();
void sync_warp();
// every lane of the calling warp passes `bits`; returns the bits lane `src` passed
uint64_t exchange(uint64_t bits, int src);
unsigned char* dynamic_smem();

}  // namespace scanlib_emu

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

inline void __syncthreads() { scanlib_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { scanlib_emu::sync_warp(); }

inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

namespace scanlib_emu {
template <typename T>
inline T shuffle(T v, int src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = exchange(bits, src);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
inline int lane_id() { return static_cast<int>(threadIdx.x % 32); }
}  // namespace scanlib_emu

// the kernels only use full-warp shuffles with width 32
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return scanlib_emu::shuffle(v, src & 31);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
    const int lane = scanlib_emu::lane_id();
    const int src = lane - static_cast<int>(delta);
    return scanlib_emu::shuffle(v, src < 0 ? lane : src);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    const int lane = scanlib_emu::lane_id();
    const int src = lane + static_cast<int>(delta);
    return scanlib_emu::shuffle(v, src > 31 ? lane : src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return scanlib_emu::shuffle(v, (scanlib_emu::lane_id() ^ mask) & 31);
}
