// scan_fwd.cuh - forward selective-scan kernel.
//
// Grid: one block per (batch b, tile of nw consecutive channels inside one B/C group); warp w
// owns channel d = tile*nw + w. Per chunk of kChunk steps:
//   1. each lane loads its kItems steps of u, delta (and z) with 16-byte loads and applies
//      delta_bias and softplus;
//   2. the block stages the chunk of varying B/C rows for up to kMaxTileN states in shared
//      memory (shared by the nw channels of the group). Staging is double-buffered: the
//      cp.async copy of the next (chunk, state tile) runs while the current one is computed,
//      and one barrier per stage publishes the data and frees the other buffer; the next
//      chunk's u and delta are likewise prefetched into registers;
//   3. per state n (NU states at once, for instruction-level parallelism): a_t = exp2(delta_t *
//      A_n*log2 e), x_t = delta_t u_t B_t; each lane composes its steps into one affine map,
//      a warp scan composes the maps across lanes, the state carried in from the previous chunk
//      gives every lane its starting state, and the lane replays its steps accumulating
//      y_t += C_t h_t; lane 31's final state is the next chunk's carry;
//   4. out = (y + D u) * silu(z) is stored with 16-byte stores.
// The state before each chunk is written to chunk_states for the backward.
#pragma once

#include "common.cuh"

namespace scanlib {

// NU == 1 (N < 4, e.g. VMamba's N = 1) fits 80 registers: 3 blocks of 8 warps per SM
template <typename T, typename To, int NU>
__global__ void __launch_bounds__(kWarp* kMaxWarps, NU == 1 ? 3 : 2)
    scan_fwd_kernel(const KernelArgs a) {
    const scanlib_scan_params& p = a.p;
    float* smem = dynamic_smem();
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int nw = blockDim.x / kWarp;
    const int64_t b = blockIdx.x / a.tiles, tile = blockIdx.x % a.tiles;
    const int64_t d0 = tile * nw, d = d0 + warp;
    const int64_t bd = b * p.dim + d;  // row of [B, D, ...] tensors
    const int N = static_cast<int>(p.dstate);
    const int64_t L = p.seqlen;
    const bool B_const = p.B_const != 0, C_const = p.C_const != 0;
    const bool stage = !B_const || !C_const;

    // per-warp rows of shared memory (length nstride >= nloop, zero-padded past N)
    float* sA = smem + a.off_A + warp * a.nstride;        // A * log2(e)
    float* sH = smem + a.off_state + warp * a.nstride;    // state carried between chunks
    float* sBc = B_const ? smem + a.off_Bc + warp * a.nstride : nullptr;
    float* sCc = C_const ? smem + a.off_Cc + warp * a.nstride : nullptr;
    // [2][ntile][kChunk] staged chunk rows of varying B / C (raw T), double-buffered
    T* sBs = B_const ? nullptr : reinterpret_cast<T*>(smem + a.off_Bs);
    T* sCs = C_const ? nullptr : reinterpret_cast<T*>(smem + a.off_Cs);
    const int buf_elems = a.ntile * kChunk;

    for (int n = lane; n < a.nstride; n += kWarp) {
        const bool in = n < N;
        sA[n] = in ? p.A[d * N + n] * kLog2e : 0.f;
        sH[n] = in && p.initial_state ? p.initial_state[bd * N + n] : 0.f;
        if (B_const) sBc[n] = in ? static_cast<const float*>(p.B)[d * N + n] : 0.f;
        if (C_const) sCc[n] = in ? static_cast<const float*>(p.C)[d * N + n] : 0.f;
    }
    __syncwarp();

    const T* u_row = static_cast<const T*>(p.u) + b * p.u_stride_batch + d * p.u_stride_dim;
    const T* dl_row =
        static_cast<const T*>(p.delta) + b * p.delta_stride_batch + d * p.delta_stride_dim;
    const T* z_row =
        p.z ? static_cast<const T*>(p.z) + b * p.z_stride_batch + d * p.z_stride_dim : nullptr;
    To* out_row = static_cast<To*>(p.out) + b * p.out_stride_batch + d * p.out_stride_dim;
    // the whole tile lies in one group, so the block shares one row base for B and for C
    const T* B_base = B_const ? nullptr
                              : static_cast<const T*>(p.B) + b * p.B_stride_batch +
                                    (d0 / (p.dim / p.B_groups)) * p.B_stride_group;
    const T* C_base = C_const ? nullptr
                              : static_cast<const T*>(p.C) + b * p.C_stride_batch +
                                    (d0 / (p.dim / p.C_groups)) * p.C_stride_group;
    const float Dd = p.D ? p.D[d] : 0.f;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const bool softplus_dt = p.delta_softplus != 0;

    // stages: (chunk c, state tile ti) pairs in order; s = c * ntiles + ti
    const int ntiles = (a.nloop + a.ntile - 1) / a.ntile;
    const int nstages = a.nchunks * ntiles;
    auto issue = [&](int s) {
        const int64_t l0 = static_cast<int64_t>(s / ntiles) * kChunk;
        const int nt0 = (s % ntiles) * a.ntile, tn = imin(a.ntile, a.nloop - nt0);
        const int off = (s & 1) * buf_elems;
        if (!B_const) stage_rows(sBs + off, B_base, p.B_stride_n, nt0, tn, N, l0, L, a.vec_B);
        if (!C_const) stage_rows(sCs + off, C_base, p.C_stride_n, nt0, tn, N, l0, L, a.vec_C);
    };
    if (stage) issue(0);
    Pack<T> next_u, next_dl;  // raw u and delta of the next chunk
    {
        const int64_t lt = lane * kItems;
        load_pack(next_u, u_row, lt, valid_items(lt, L), a.vec_u);
        load_pack(next_dl, dl_row, lt, valid_items(lt, L), a.vec_delta);
    }

    for (int c = 0; c < a.nchunks; ++c) {
        const int64_t l0 = static_cast<int64_t>(c) * kChunk;
        const int64_t lt = l0 + lane * kItems;  // this lane's first step
        const int valid = valid_items(lt, L);

        float uu[kItems], dt[kItems], y[kItems];
        unpack(next_u, uu);
        unpack(next_dl, dt);
        if (c + 1 < a.nchunks) {  // prefetch: nothing waits for these loads until next chunk
            const int64_t ln = lt + kChunk;
            load_pack(next_u, u_row, ln, valid_items(ln, L), a.vec_u);
            load_pack(next_dl, dl_row, ln, valid_items(ln, L), a.vec_delta);
        }
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            const float r = dt[k] + bias;
            // steps past L get delta = 0: a = 1, x = 0 leaves the carried state unchanged
            dt[k] = k < valid ? (softplus_dt ? softplus(r) : r) : 0.f;
            y[k] = 0.f;
        }
        if (p.chunk_states) {
            float* cs = p.chunk_states + (bd * a.nchunks + c) * N;
            for (int n = lane; n < N; n += kWarp) cs[n] = sH[n];
        }

        for (int ti = 0; ti < ntiles; ++ti) {
            const int s = c * ntiles + ti;
            const int nt0 = ti * a.ntile, tn = imin(a.ntile, a.nloop - nt0);
            if (stage) {
                copy_async_wait_all();  // this thread's copies for stage s have landed
                __syncthreads();        // everyone's have; and stage s-1's buffer is free
                if (s + 1 < nstages) issue(s + 1);
            }
            const T* Bs = B_const ? nullptr : sBs + (s & 1) * buf_elems;
            const T* Cs = C_const ? nullptr : sCs + (s & 1) * buf_elems;
            for (int nn = 0; nn < tn; nn += NU) {
                float aa[NU][kItems], xx[NU][kItems], P[NU], S[NU];
#pragma unroll
                for (int j = 0; j < NU; ++j) {
                    const int n = nt0 + nn + j;
                    const float A2 = sA[n];
                    float bv[kItems];
                    bc_items(B_const, B_const ? sBc[n] : 0.f,
                             B_const ? nullptr : Bs + (nn + j) * kChunk, lane, bv);
                    P[j] = 1.f;
                    S[j] = 0.f;
#pragma unroll
                    for (int k = 0; k < kItems; ++k) {
                        aa[j][k] = exp2f(dt[k] * A2);
                        xx[j][k] = dt[k] * uu[k] * bv[k];
                        S[j] = fmaf(aa[j][k], S[j], xx[j][k]);
                        P[j] *= aa[j][k];
                    }
                }
                // inclusive warp scan: lane i holds the map of lanes 0..i (earlier lanes first)
#pragma unroll
                for (int off = 1; off < kWarp; off <<= 1) {
#pragma unroll
                    for (int j = 0; j < NU; ++j) {
                        const float Pp = shfl_up(P[j], off), Sp = shfl_up(S[j], off);
                        if (lane >= off) {
                            S[j] = fmaf(P[j], Sp, S[j]);
                            P[j] *= Pp;
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < NU; ++j) {
                    const int n = nt0 + nn + j;
                    // exclusive: the map of lanes 0..i-1
                    float eP = shfl_up(P[j], 1), eS = shfl_up(S[j], 1);
                    if (lane == 0) eP = 1.f, eS = 0.f;
                    float h = fmaf(eP, sH[n], eS);
                    float cv[kItems];
                    bc_items(C_const, C_const ? sCc[n] : 0.f,
                             C_const ? nullptr : Cs + (nn + j) * kChunk, lane, cv);
#pragma unroll
                    for (int k = 0; k < kItems; ++k) {
                        h = fmaf(aa[j][k], h, xx[j][k]);
                        y[k] = fmaf(cv[k], h, y[k]);
                    }
                    const float h_end = shfl_idx(h, kWarp - 1);
                    __syncwarp();  // every lane has read sH[n]
                    if (lane == 0) sH[n] = h_end;
                }
                __syncwarp();  // sH visible to the whole warp
            }
        }

#pragma unroll
        for (int k = 0; k < kItems; ++k) y[k] = fmaf(Dd, uu[k], y[k]);
        if (z_row) {
            float zz[kItems];
            load_items(z_row, lt, valid, a.vec_z, zz);
#pragma unroll
            for (int k = 0; k < kItems; ++k) y[k] *= zz[k] * sigmoid(zz[k]);
        }
        store_items(out_row, lt, valid, a.vec_out, y);
    }

    if (p.last_state) {
        for (int n = lane; n < N; n += kWarp) p.last_state[bd * N + n] = sH[n];
    }
}

}  // namespace scanlib
