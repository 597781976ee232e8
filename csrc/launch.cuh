// launch.cuh - host-side launch of one kernel instantiation (CUDA runtime or CPU emulation).
#pragma once

#include "common.cuh"

namespace scanlib {

// Each returns nullptr once the kernel is enqueued, or an error message. Defined (and explicitly
// instantiated, one translation unit per input dtype) in fwd_*.cu / bwd_*.cu.
template <typename T, typename To, int NU>
const char* launch_fwd(const KernelArgs& a, unsigned blocks, unsigned threads, size_t smem,
                       void* stream);
template <typename T, typename To>
const char* launch_bwd(const KernelArgs& a, unsigned blocks, unsigned threads, size_t smem,
                       void* stream);

template <typename Kernel>
inline const char* launch_kernel(Kernel kernel, unsigned blocks, unsigned threads, size_t smem,
                                 void* stream, const KernelArgs& a) {
#if defined(SCANLIB_EMULATE)
    (void)stream;
    return scanlib_emu::launch(dim3(blocks), dim3(threads), smem, [&] { kernel(a); });
#else
    cudaError_t err;
    if (smem > 48 * 1024) {
        err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem));
        if (err != cudaSuccess) return cudaGetErrorString(err);
    }
    void* args[] = {const_cast<KernelArgs*>(&a)};
    err = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(threads),
                           args, smem, static_cast<cudaStream_t>(stream));
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
#endif
}

}  // namespace scanlib
