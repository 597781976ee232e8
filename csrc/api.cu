// api.cu - the extern "C" entry points: validate the parameters, plan the launch (block shape,
// shared-memory layout, which accesses may be 16-byte vectors) and dispatch on dtypes.
#include <cstdarg>
#include <cstdio>
#include <exception>

#include "launch.cuh"

namespace scanlib {
namespace {

thread_local char g_error[1024] = "";

int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 16-byte accesses need a 16-byte aligned base and rows that stay aligned
bool vec_ok(const void* ptr, int64_t elem, int64_t s1, int64_t s2, int64_t s3 = 0) {
    if (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
    return (s1 * elem) % 16 == 0 && (s2 * elem) % 16 == 0 && (s3 * elem) % 16 == 0;
}

int64_t elem_size(int64_t dtype) { return dtype == SCANLIB_F32 ? 4 : 2; }

struct Plan {
    KernelArgs a;
    unsigned blocks = 0, threads = 0;
    size_t smem = 0;
    int nu = 1;
};

int check_bc(const char* name, int64_t is_const, int64_t groups, int64_t dim, int64_t cpb,
             const void* ptr) {
    if (ptr == nullptr) return fail(SCANLIB_ERR_INVALID, "%s: NULL pointer", name);
    if (is_const) return SCANLIB_OK;
    if (groups < 1 || dim % groups != 0)
        return fail(SCANLIB_ERR_INVALID, "%s: D=%lld is not divisible by G=%lld", name,
                    (long long)dim, (long long)groups);
    if ((dim / groups) % cpb != 0)
        return fail(SCANLIB_ERR_INVALID,
                    "%s: channels_per_block=%lld does not divide the group size D/G=%lld", name,
                    (long long)cpb, (long long)(dim / groups));
    return SCANLIB_OK;
}

int plan(const scanlib_scan_params* pp, bool bwd, Plan& pl) {
    if (pp == nullptr) return fail(SCANLIB_ERR_INVALID, "params: NULL pointer");
    const scanlib_scan_params& p = *pp;
    if (p.abi_version != SCANLIB_ABI_VERSION)
        return fail(SCANLIB_ERR_INVALID, "ABI version %lld, but the library implements %d",
                    (long long)p.abi_version, SCANLIB_ABI_VERSION);
    if (p.struct_size != static_cast<int64_t>(sizeof(scanlib_scan_params)))
        return fail(SCANLIB_ERR_INVALID, "params struct of %lld bytes, the library expects %lld",
                    (long long)p.struct_size, (long long)sizeof(scanlib_scan_params));
    if (p.batch < 1 || p.dim < 1 || p.seqlen < 1 || p.dstate < 1)
        return fail(SCANLIB_ERR_INVALID, "sizes must be >= 1: B=%lld D=%lld L=%lld N=%lld",
                    (long long)p.batch, (long long)p.dim, (long long)p.seqlen,
                    (long long)p.dstate);
    if (p.dstate > SCANLIB_MAX_DSTATE)
        return fail(SCANLIB_ERR_INVALID, "N=%lld exceeds the supported maximum %d",
                    (long long)p.dstate, SCANLIB_MAX_DSTATE);
    if (p.in_dtype < SCANLIB_F32 || p.in_dtype > SCANLIB_BF16)
        return fail(SCANLIB_ERR_INVALID, "unknown input dtype code %lld", (long long)p.in_dtype);
    if (p.out_dtype != SCANLIB_F32 && p.out_dtype != p.in_dtype)
        return fail(SCANLIB_ERR_INVALID, "output dtype code %lld must be float32 or the input's",
                    (long long)p.out_dtype);
    const int64_t cpb = p.channels_per_block;
    if (cpb != 1 && cpb != 2 && cpb != 4 && cpb != 8)
        return fail(SCANLIB_ERR_INVALID, "channels_per_block=%lld must be 1, 2, 4 or 8",
                    (long long)cpb);
    if (p.dim % cpb != 0)
        return fail(SCANLIB_ERR_INVALID, "channels_per_block=%lld does not divide D=%lld",
                    (long long)cpb, (long long)p.dim);
    if (int rc = check_bc("B", p.B_const, p.B_groups, p.dim, cpb, p.B)) return rc;
    if (int rc = check_bc("C", p.C_const, p.C_groups, p.dim, cpb, p.C)) return rc;
    if (!p.u || !p.delta || !p.A) return fail(SCANLIB_ERR_INVALID, "u, delta and A are required");
    if (!bwd && !p.out) return fail(SCANLIB_ERR_INVALID, "out is required");
    if (bwd) {
        if (!p.chunk_states)
            return fail(SCANLIB_ERR_INVALID, "the backward needs the forward's chunk_states");
        if (!p.du || !p.ddelta || !p.dA || !p.dB || !p.dC)
            return fail(SCANLIB_ERR_INVALID, "du, ddelta, dA, dB and dC are required");
        if (p.z && !p.dz) return fail(SCANLIB_ERR_INVALID, "dz is required when z is given");
    }
    const int64_t tiles = p.dim / cpb;
    if (p.batch * tiles > 0x7fffffffLL)
        return fail(SCANLIB_ERR_INVALID, "B * D / channels_per_block = %lld blocks is too many",
                    (long long)(p.batch * tiles));

    KernelArgs& a = pl.a;
    a = KernelArgs{};
    a.p = p;
    pl.nu = (!bwd && p.dstate >= 4) ? 4 : 1;
    const int64_t nw = cpb;
    const int64_t es = elem_size(p.in_dtype), os = elem_size(p.out_dtype);
    a.nchunks = static_cast<int>((p.seqlen + kChunk - 1) / kChunk);
    a.nloop = static_cast<int>(round_up(p.dstate, pl.nu));
    a.nstride = static_cast<int>(round_up(a.nloop, 4));
    a.ntile = a.nloop < kMaxTileN ? a.nloop : kMaxTileN;
    a.tiles = static_cast<int>(tiles);

    a.vec_u = vec_ok(p.u, es, p.u_stride_batch, p.u_stride_dim);
    a.vec_delta = vec_ok(p.delta, es, p.delta_stride_batch, p.delta_stride_dim);
    a.vec_z = vec_ok(p.z, es, p.z_stride_batch, p.z_stride_dim);
    a.vec_out = vec_ok(p.out, os, p.out_stride_batch, p.out_stride_dim);
    a.vec_B = !p.B_const && vec_ok(p.B, es, p.B_stride_batch, p.B_stride_group, p.B_stride_n);
    a.vec_C = !p.C_const && vec_ok(p.C, es, p.C_stride_batch, p.C_stride_group, p.C_stride_n);
    a.vec_dout = vec_ok(p.dout, os, p.dout_stride_batch, p.dout_stride_dim);
    a.vec_du = vec_ok(p.du, es, p.du_stride_batch, p.du_stride_dim);
    a.vec_ddelta = vec_ok(p.ddelta, es, p.ddelta_stride_batch, p.ddelta_stride_dim);
    a.vec_dz = vec_ok(p.dz, es, p.dz_stride_batch, p.dz_stride_dim);

    // shared memory, in floats; every section a multiple of 4 floats (16 bytes)
    int64_t off = 0;
    const int64_t row = nw * a.nstride;
    auto take = [&off](int64_t n) {
        const int64_t at = off;
        off += n;
        return static_cast<int>(at);
    };
    a.off_A = take(row);
    a.off_state = take(row);
    a.off_Bc = p.B_const ? take(row) : -1;
    a.off_Cc = p.C_const ? take(row) : -1;
    // staged B/C rows: [2 buffers][ntile][kChunk] elements of the input dtype
    const int64_t staged = 2 * static_cast<int64_t>(a.ntile) * kChunk * es / 4;
    a.off_Bs = p.B_const ? -1 : take(staged);
    a.off_Cs = p.C_const ? -1 : take(staged);
    a.off_dA = bwd ? take(row) : -1;
    a.off_dBc = bwd && p.B_const ? take(row) : -1;
    a.off_dCc = bwd && p.C_const ? take(row) : -1;
    a.off_red = bwd && !(p.B_const && p.C_const) ? take(4 * nw * kChunk) : -1;
    pl.smem = static_cast<size_t>(off) * sizeof(float);
    pl.blocks = static_cast<unsigned>(p.batch * tiles);
    pl.threads = static_cast<unsigned>(nw * kWarp);

#if !defined(SCANLIB_EMULATE)
    int device = 0, limit = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess)
        return fail(SCANLIB_ERR_CUDA, "CUDA device query failed: %s", cudaGetErrorString(err));
    if (pl.smem > static_cast<size_t>(limit))
        return fail(SCANLIB_ERR_INVALID,
                    "needs %zu bytes of shared memory per block, the device allows %d; use a "
                    "smaller channels_per_block",
                    pl.smem, limit);
#endif
    return SCANLIB_OK;
}

template <typename T>
const char* dispatch_fwd(const Plan& pl, void* stream) {
    const bool f32_out = pl.a.p.out_dtype == SCANLIB_F32;
    if (pl.nu == 4)
        return f32_out ? launch_fwd<T, float, 4>(pl.a, pl.blocks, pl.threads, pl.smem, stream)
                       : launch_fwd<T, T, 4>(pl.a, pl.blocks, pl.threads, pl.smem, stream);
    return f32_out ? launch_fwd<T, float, 1>(pl.a, pl.blocks, pl.threads, pl.smem, stream)
                   : launch_fwd<T, T, 1>(pl.a, pl.blocks, pl.threads, pl.smem, stream);
}

template <typename T>
const char* dispatch_bwd(const Plan& pl, void* stream) {
    return pl.a.p.out_dtype == SCANLIB_F32
               ? launch_bwd<T, float>(pl.a, pl.blocks, pl.threads, pl.smem, stream)
               : launch_bwd<T, T>(pl.a, pl.blocks, pl.threads, pl.smem, stream);
}

int run(const scanlib_scan_params* params, void* stream, bool bwd) {
    try {
        g_error[0] = '\0';
        Plan pl;
        if (int rc = plan(params, bwd, pl)) return rc;
        const char* err = nullptr;
        switch (pl.a.p.in_dtype) {
            case SCANLIB_F32:
                err = bwd ? launch_bwd<float, float>(pl.a, pl.blocks, pl.threads, pl.smem, stream)
                          : (pl.nu == 4 ? launch_fwd<float, float, 4>(pl.a, pl.blocks, pl.threads,
                                                                      pl.smem, stream)
                                        : launch_fwd<float, float, 1>(pl.a, pl.blocks, pl.threads,
                                                                      pl.smem, stream));
                break;
            case SCANLIB_F16:
                err = bwd ? dispatch_bwd<__half>(pl, stream) : dispatch_fwd<__half>(pl, stream);
                break;
            default:
                err = bwd ? dispatch_bwd<__nv_bfloat16>(pl, stream)
                          : dispatch_fwd<__nv_bfloat16>(pl, stream);
                break;
        }
        if (err) return fail(SCANLIB_ERR_CUDA, "%s launch failed: %s", bwd ? "backward" : "forward",
                             err);
        return SCANLIB_OK;
    } catch (const std::exception& e) {
        return fail(SCANLIB_ERR_CUDA, "unexpected error: %s", e.what());
    } catch (...) {
        return fail(SCANLIB_ERR_CUDA, "unexpected error");
    }
}

}  // namespace
}  // namespace scanlib

extern "C" {

int64_t scanlib_abi_version(void) { return SCANLIB_ABI_VERSION; }
int64_t scanlib_params_size(void) { return static_cast<int64_t>(sizeof(scanlib_scan_params)); }
int64_t scanlib_chunk_size(void) { return SCANLIB_CHUNK; }
int64_t scanlib_max_dstate(void) { return SCANLIB_MAX_DSTATE; }

const char* scanlib_build_kind(void) {
#if defined(SCANLIB_EMULATE)
    return "emulation";
#else
    return "cuda";
#endif
}

int scanlib_selective_scan_fwd(const scanlib_scan_params* params, void* stream) {
    return scanlib::run(params, stream, false);
}

int scanlib_selective_scan_bwd(const scanlib_scan_params* params, void* stream) {
    return scanlib::run(params, stream, true);
}

const char* scanlib_last_error(void) { return scanlib::g_error; }

}  // extern "C"
