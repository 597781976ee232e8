// bwd_f32.cu - backward kernels for float inputs (one file per input dtype, so the
// translation units compile in parallel).
#include "launch.cuh"
#include "scan_bwd.cuh"

namespace scanlib {

template <typename T, typename To>
const char* launch_bwd(const KernelArgs& a, unsigned blocks, unsigned threads, size_t smem,
                       void* stream) {
    return launch_kernel(scan_bwd_kernel<T, To>, blocks, threads, smem, stream, a);
}

#define SCANLIB_BWD(T, To) \
    template const char* launch_bwd<T, To>(const KernelArgs&, unsigned, unsigned, size_t, void*)
SCANLIB_BWD(float, float);

}  // namespace scanlib
