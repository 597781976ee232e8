// fwd_f16.cu - forward kernels for __half inputs (one file per input dtype, so the
// translation units compile in parallel).
#include "launch.cuh"
#include "scan_fwd.cuh"

namespace scanlib {

template <typename T, typename To, int NU>
const char* launch_fwd(const KernelArgs& a, unsigned blocks, unsigned threads, size_t smem,
                       void* stream) {
    return launch_kernel(scan_fwd_kernel<T, To, NU>, blocks, threads, smem, stream, a);
}

#define SCANLIB_FWD(T, To, NU)                                                             \
    template const char* launch_fwd<T, To, NU>(const KernelArgs&, unsigned, unsigned, size_t, \
                                               void*)
SCANLIB_FWD(__half, __half, 1);
SCANLIB_FWD(__half, __half, 4);
SCANLIB_FWD(__half, float, 1);
SCANLIB_FWD(__half, float, 4);

}  // namespace scanlib
