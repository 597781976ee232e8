// emulation_asan_driver.cpp - developer check, not part of any build: runs both launchers of the
// CPU emulation on exact-size heap buffers for 600 configurations (every dtype pair, L in
// {1, 7, 64, 255, 257, 300}, N in {1, 3, 4, 17, 256}, four B/C form mixes, with and without z,
// delta_bias, initial_state, dout) under AddressSanitizer + UBSan, so any out-of-bounds access of
// global or shared memory (the emulation allocates shared memory at its exact size) is reported.
//
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
//       -fno-strict-aliasing -DSCANLIB_EMULATE -x c++ -I csrc -I <cuda>/include \
//       csrc/*.cu -x c++ csrc/emulation_asan_driver.cpp -o /tmp/scanlib_asan
//   ASAN_OPTIONS=detect_stack_use_after_return=0 /tmp/scanlib_asan
//
// (detect_stack_use_after_return is off because the emulation switches stacks between fibers.)
// Values are not checked here; tests/test_cuda_build.py compares results with the reference.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "scanlib_cuda.h"

static void* buf(size_t bytes, unsigned seed) {
    void* p = malloc(bytes ? bytes : 1);
    unsigned char* c = (unsigned char*)p;
    // small finite values for every dtype: fill 16-bit words with 0x3800 (f16 0.5) / floats with 0.25
    for (size_t i = 0; i + 1 < bytes; i += 2) { c[i] = 0x00; c[i + 1] = (seed & 1) ? 0x38 : 0x3e; }
    return p;
}
static float* fbuf(size_t n) { float* p = (float*)malloc(n ? n * 4 : 4); for (size_t i = 0; i < n; ++i) p[i] = 0.25f - 0.01f * (i % 7); return p; }

int main() {
    int runs = 0, fails = 0;
    const int Ls[] = {1, 7, 64, 255, 257, 300};
    const int Ns[] = {1, 3, 4, 17, 256};
    for (int dt = 0; dt < 3; ++dt)
    for (int of = 0; of < 2; ++of) {
        if (dt == 0 && of == 1) continue;
        for (int L : Ls) for (int N : Ns) for (int form = 0; form < 4; ++form) {
            const int batch = 2, dim = 8;
            const int Bg = form == 0 ? 2 : form == 1 ? 1 : 8, Cg = form == 3 ? 4 : 2;
            const bool Bc = form == 2, Cc = form == 3 && L % 2;
            const int cpb = Bc ? (Cc ? 8 : 4) : (form == 0 ? 4 : 1);
            if (N > 64 && cpb > 4) continue;
            const size_t es = dt == 0 ? 4 : 2, os = (dt == 0 || of) ? 4 : 2;
            const size_t bdl = (size_t)batch * dim * L, nch = (L + 255) / 256;
            scanlib_scan_params p; memset(&p, 0, sizeof p);
            p.abi_version = SCANLIB_ABI_VERSION; p.struct_size = sizeof p;
            p.batch = batch; p.dim = dim; p.seqlen = L; p.dstate = N;
            p.in_dtype = dt; p.out_dtype = of ? 0 : dt; p.delta_softplus = L % 2; p.channels_per_block = cpb;
            p.B_const = Bc; p.B_groups = Bc ? dim : Bg; p.B_stride_batch = (int64_t)Bg * N * L; p.B_stride_group = (int64_t)N * L; p.B_stride_n = L;
            p.C_const = Cc; p.C_groups = Cc ? dim : Cg; p.C_stride_batch = (int64_t)Cg * N * L; p.C_stride_group = (int64_t)N * L; p.C_stride_n = L;
            int64_t* rows[] = {&p.u_stride_batch, &p.delta_stride_batch, &p.z_stride_batch, &p.out_stride_batch, &p.dout_stride_batch, &p.du_stride_batch, &p.ddelta_stride_batch, &p.dz_stride_batch};
            for (auto r : rows) { r[0] = (int64_t)dim * L; r[1] = L; }
            std::vector<void*> owned;
            auto own = [&](void* q) { owned.push_back(q); return q; };
            p.u = own(buf(bdl * es, 0)); p.delta = own(buf(bdl * es, 1)); p.z = (L % 3) ? own(buf(bdl * es, 0)) : nullptr;
            p.B = Bc ? own(fbuf((size_t)dim * N)) : own(buf((size_t)batch * Bg * N * L * es, 1));
            p.C = Cc ? own(fbuf((size_t)dim * N)) : own(buf((size_t)batch * Cg * N * L * es, 0));
            float* A = (float*)own(fbuf((size_t)dim * N)); for (int i = 0; i < dim * N; ++i) A[i] = -0.5f;
            p.A = A; p.D = (float*)own(fbuf(dim)); p.delta_bias = (N % 2) ? (float*)own(fbuf(dim)) : nullptr;
            p.initial_state = (L % 2) ? (float*)own(fbuf((size_t)batch * dim * N)) : nullptr;
            p.out = own(malloc(bdl * os)); p.last_state = (float*)own(malloc((size_t)batch * dim * N * 4));
            p.chunk_states = (float*)own(malloc((size_t)batch * dim * nch * N * 4));
            runs++;
            if (scanlib_selective_scan_fwd(&p, nullptr)) { fails++; printf("fwd: %s\n", scanlib_last_error()); }
            p.dout = (L % 4 != 1) ? own(buf(bdl * os, 1)) : nullptr;
            p.dlast = (float*)own(fbuf((size_t)batch * dim * N));
            p.du = own(malloc(bdl * es)); p.ddelta = own(malloc(bdl * es)); p.dz = p.z ? own(malloc(bdl * es)) : nullptr;
            p.dA = (float*)own(malloc((size_t)batch * dim * N * 4)); p.dD = (float*)own(malloc((size_t)batch * dim * 4));
            p.ddelta_bias = p.delta_bias ? (float*)own(malloc((size_t)batch * dim * 4)) : nullptr;
            p.dinitial_state = p.initial_state ? (float*)own(malloc((size_t)batch * dim * N * 4)) : nullptr;
            p.dB = (float*)own(malloc(Bc ? (size_t)batch * dim * N * 4 : (size_t)batch * (dim / cpb) * N * L * 4));
            p.dC = (float*)own(malloc(Cc ? (size_t)batch * dim * N * 4 : (size_t)batch * (dim / cpb) * N * L * 4));
            if (scanlib_selective_scan_bwd(&p, nullptr)) { fails++; printf("bwd: %s\n", scanlib_last_error()); }
            for (void* q : owned) free(q);
        }
    }
    printf("%d configurations, %d failures\n", runs, fails);
    return fails != 0;
}
