// scan_bwd.cuh - backward selective-scan kernel.
//
// Same grid as the forward (block = batch b x tile of nw channels of one group; warp = channel).
// Chunks are visited last to first. For a chunk and a state n the warp
//   * recomputes h_t from the chunk's saved starting state (forward warp scan of (a_t, x_t)),
//   * runs the adjoint backwards: with gg_t = a_t g_t (what step t passes to step t-1),
//       g_t = gg_{t+1} + dy_t C_t,   gg_t = a_t (gg_{t+1} + dy_t C_t),
//     a reverse warp scan of the maps gg -> a_t gg + a_t dy_t C_t; gg entering the last chunk
//     is dlast and gg leaving the first chunk is the gradient of the initial state;
//   * accumulates per step: dC_t += dy_t h_t, dB_t += g_t delta_t u_t,
//     d(delta u)_t += g_t B_t, ddelta_t += g_t a_t h_{t-1} A_n, and dA_n += g_t a_t h_{t-1} delta_t.
// dy_t = dout_t silu(z_t) (or dout_t). B/C staging is double-buffered with cp.async, as in the
// forward. Reductions are deterministic: per-step dB/dC of the nw channels are summed in shared
// memory in a fixed order and written as one partial per tile (the host sums the tiles of a
// group); dA, dD, ddelta_bias and constant dB/dC are summed over steps inside the block and
// written per (batch, channel) for the host to sum over the batch.
#pragma once

#include "common.cuh"

namespace scanlib {

template <typename T, typename To>
__global__ void __launch_bounds__(kWarp* kMaxWarps, 2) scan_bwd_kernel(const KernelArgs a) {
    const scanlib_scan_params& p = a.p;
    float* smem = dynamic_smem();
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int nw = blockDim.x / kWarp;
    const int64_t b = blockIdx.x / a.tiles, tile = blockIdx.x % a.tiles;
    const int64_t d0 = tile * nw, d = d0 + warp;
    const int64_t bd = b * p.dim + d;
    const int N = static_cast<int>(p.dstate);
    const int64_t L = p.seqlen;
    const bool B_const = p.B_const != 0, C_const = p.C_const != 0;
    const bool stage = !B_const || !C_const;

    float* sA = smem + a.off_A + warp * a.nstride;      // A (unscaled)
    float* sG = smem + a.off_state + warp * a.nstride;  // gg carried to the previous chunk
    float* sdA = smem + a.off_dA + warp * a.nstride;    // dA summed over steps
    float* sBc = B_const ? smem + a.off_Bc + warp * a.nstride : nullptr;
    float* sCc = C_const ? smem + a.off_Cc + warp * a.nstride : nullptr;
    float* sdBc = B_const ? smem + a.off_dBc + warp * a.nstride : nullptr;
    float* sdCc = C_const ? smem + a.off_dCc + warp * a.nstride : nullptr;
    // [2][ntile][kChunk] staged chunk rows of varying B / C (raw T), double-buffered
    T* sBs = B_const ? nullptr : reinterpret_cast<T*>(smem + a.off_Bs);
    T* sCs = C_const ? nullptr : reinterpret_cast<T*>(smem + a.off_Cs);
    const int buf_elems = a.ntile * kChunk;
    // [2 parities][2: B, C][nw][kChunk]: per-channel dB/dC of one state, summed across warps
    float* sRed = stage ? smem + a.off_red : nullptr;

    for (int n = lane; n < a.nstride; n += kWarp) {
        const bool in = n < N;
        sA[n] = in ? p.A[d * N + n] : 0.f;
        sG[n] = in && p.dlast ? p.dlast[bd * N + n] : 0.f;
        sdA[n] = 0.f;
        if (B_const) {
            sBc[n] = in ? static_cast<const float*>(p.B)[d * N + n] : 0.f;
            sdBc[n] = 0.f;
        }
        if (C_const) {
            sCc[n] = in ? static_cast<const float*>(p.C)[d * N + n] : 0.f;
            sdCc[n] = 0.f;
        }
    }
    __syncwarp();

    const T* u_row = static_cast<const T*>(p.u) + b * p.u_stride_batch + d * p.u_stride_dim;
    const T* dl_row =
        static_cast<const T*>(p.delta) + b * p.delta_stride_batch + d * p.delta_stride_dim;
    const T* z_row =
        p.z ? static_cast<const T*>(p.z) + b * p.z_stride_batch + d * p.z_stride_dim : nullptr;
    const To* dout_row = p.dout ? static_cast<const To*>(p.dout) + b * p.dout_stride_batch +
                                      d * p.dout_stride_dim
                                : nullptr;
    T* du_row = static_cast<T*>(p.du) + b * p.du_stride_batch + d * p.du_stride_dim;
    T* ddl_row = static_cast<T*>(p.ddelta) + b * p.ddelta_stride_batch + d * p.ddelta_stride_dim;
    T* dz_row = z_row ? static_cast<T*>(p.dz) + b * p.dz_stride_batch + d * p.dz_stride_dim
                      : nullptr;
    const T* B_base = B_const ? nullptr
                              : static_cast<const T*>(p.B) + b * p.B_stride_batch +
                                    (d0 / (p.dim / p.B_groups)) * p.B_stride_group;
    const T* C_base = C_const ? nullptr
                              : static_cast<const T*>(p.C) + b * p.C_stride_batch +
                                    (d0 / (p.dim / p.C_groups)) * p.C_stride_group;
    // varying dB/dC partials: [B, tiles, N, L]
    float* dB_tile = B_const ? nullptr : p.dB + (b * a.tiles + tile) * N * L;
    float* dC_tile = C_const ? nullptr : p.dC + (b * a.tiles + tile) * N * L;
    const float Dd = p.D ? p.D[d] : 0.f;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const bool softplus_dt = p.delta_softplus != 0;

    float dD_acc = 0.f, dbias_acc = 0.f;  // this lane's share, over all chunks
    int parity = 0;

    // stages: (chunk, state tile ti) pairs, chunks last to first; s = (nchunks-1-c) * ntiles + ti
    const int ntiles = (a.nloop + a.ntile - 1) / a.ntile;
    const int nstages = a.nchunks * ntiles;
    auto issue = [&](int s) {
        const int64_t l0 = static_cast<int64_t>(a.nchunks - 1 - s / ntiles) * kChunk;
        const int nt0 = (s % ntiles) * a.ntile, tn = imin(a.ntile, a.nloop - nt0);
        const int off = (s & 1) * buf_elems;
        if (!B_const) stage_rows(sBs + off, B_base, p.B_stride_n, nt0, tn, N, l0, L, a.vec_B);
        if (!C_const) stage_rows(sCs + off, C_base, p.C_stride_n, nt0, tn, N, l0, L, a.vec_C);
    };
    if (stage) issue(0);

    for (int c = a.nchunks - 1; c >= 0; --c) {
        const int64_t l0 = static_cast<int64_t>(c) * kChunk;
        const int64_t lt = l0 + lane * kItems;
        const int valid = valid_items(lt, L);
        const float* h_start = p.chunk_states + (bd * a.nchunks + c) * N;

        // (no register prefetch here: the backward is compute-bound and short of registers)
        Pack<T> cur_u, cur_dl;
        Pack<To> cur_dout;
        float uu[kItems], dt[kItems], dy[kItems];
        load_pack(cur_u, u_row, lt, valid, a.vec_u);
        load_pack(cur_dl, dl_row, lt, valid, a.vec_delta);
        if (dout_row) load_pack(cur_dout, dout_row, lt, valid, a.vec_dout);
        unpack(cur_u, uu);
        unpack(cur_dl, dt);
        if (dout_row) {
            unpack(cur_dout, dy);
        } else {
#pragma unroll
            for (int k = 0; k < kItems; ++k) dy[k] = 0.f;
        }
        if (z_row) {  // dy = dout * silu(z); z and dout are loaded again for dz at the end
            float zz[kItems];
            load_items(z_row, lt, valid, a.vec_z, zz);
#pragma unroll
            for (int k = 0; k < kItems; ++k) dy[k] *= zz[k] * sigmoid(zz[k]);
        }
        float g_dtu[kItems], g_dt[kItems], ysum[kItems];
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            const float r = dt[k] + bias;
            // steps past L: delta = 0 (a = 1, x = 0) and dout = 0, so they pass gg through
            dt[k] = k < valid ? (softplus_dt ? softplus(r) : r) : 0.f;
            g_dtu[k] = 0.f;  // d loss / d(delta u), summed over states
            g_dt[k] = 0.f;   // d loss / d delta through the decay, summed over states
            ysum[k] = 0.f;   // sum_n C h (for dz)
        }

        for (int ti = 0; ti < ntiles; ++ti) {
            const int s = (a.nchunks - 1 - c) * ntiles + ti;
            const int nt0 = ti * a.ntile, tn = imin(a.ntile, a.nloop - nt0);
            if (stage) {
                copy_async_wait_all();  // this thread's copies for stage s have landed
                __syncthreads();        // everyone's have; and stage s-1's buffer is free
                if (s + 1 < nstages) issue(s + 1);
            }
            const T* Bs = B_const ? nullptr : sBs + (s & 1) * buf_elems;
            const T* Cs = C_const ? nullptr : sCs + (s & 1) * buf_elems;
            for (int nn = 0; nn < tn; ++nn) {
                const int n = nt0 + nn;  // < N: the backward does not unroll over states
                const float An = sA[n], A2 = An * kLog2e;
                float bv[kItems], cv[kItems], aa[kItems], hp[kItems];
                bc_items(B_const, B_const ? sBc[n] : 0.f, B_const ? nullptr : Bs + nn * kChunk,
                         lane, bv);
                bc_items(C_const, C_const ? sCc[n] : 0.f, C_const ? nullptr : Cs + nn * kChunk,
                         lane, cv);
                // this lane's maps: forward h -> P h + S, backward gg -> Q gg + R
                float P = 1.f, S = 0.f, Q = 1.f, R = 0.f;
#pragma unroll
                for (int k = 0; k < kItems; ++k) {
                    aa[k] = exp2f(dt[k] * A2);
                    S = fmaf(aa[k], S, dt[k] * uu[k] * bv[k]);
                    P *= aa[k];
                }
#pragma unroll
                for (int k = kItems - 1; k >= 0; --k) {
                    R = aa[k] * fmaf(dy[k], cv[k], R);
                    Q *= aa[k];
                }
#pragma unroll
                for (int off = 1; off < kWarp; off <<= 1) {
                    const float Pp = shfl_up(P, off), Sp = shfl_up(S, off);
                    const float Qn = shfl_down(Q, off), Rn = shfl_down(R, off);
                    if (lane >= off) {
                        S = fmaf(P, Sp, S);
                        P *= Pp;
                    }
                    if (lane + off < kWarp) {  // later lanes act first on gg
                        R = fmaf(Q, Rn, R);
                        Q *= Qn;
                    }
                }
                float eP = shfl_up(P, 1), eS = shfl_up(S, 1);
                float eQ = shfl_down(Q, 1), eR = shfl_down(R, 1);
                if (lane == 0) eP = 1.f, eS = 0.f;
                if (lane == kWarp - 1) eQ = 1.f, eR = 0.f;

                float h = fmaf(eP, h_start[n], eS);
#pragma unroll
                for (int k = 0; k < kItems; ++k) {
                    hp[k] = h;  // h_{t-1}
                    h = fmaf(aa[k], h, dt[k] * uu[k] * bv[k]);
                }
                float gg = fmaf(eQ, sG[n], eR);
                // per-step dB/dC go straight to shared memory (varying forms) or into a sum
                // (constant forms); red rows are [nw][kChunk] for B, then for C
                float* red = stage ? sRed + parity * 2 * nw * kChunk : nullptr;
                float dA_part = 0.f, dBc_part = 0.f, dCc_part = 0.f;
#pragma unroll
                for (int k = kItems - 1; k >= 0; --k) {
                    const float dtu = dt[k] * uu[k];
                    const float hk = fmaf(aa[k], hp[k], dtu * bv[k]);
                    const float g = fmaf(dy[k], cv[k], gg);
                    const float dB_t = g * dtu, dC_t = dy[k] * hk;
                    if (B_const) dBc_part += dB_t;
                    else red[warp * kChunk + red_slot(lane, k)] = dB_t;
                    if (C_const) dCc_part += dC_t;
                    else red[(nw + warp) * kChunk + red_slot(lane, k)] = dC_t;
                    g_dtu[k] = fmaf(g, bv[k], g_dtu[k]);
                    const float dlog_a = g * aa[k] * hp[k];
                    g_dt[k] = fmaf(dlog_a, An, g_dt[k]);
                    dA_part = fmaf(dlog_a, dt[k], dA_part);
                    ysum[k] = fmaf(cv[k], hk, ysum[k]);
                    gg = aa[k] * g;
                }
                const float gg_first = shfl_idx(gg, 0);
                dA_part = warp_sum(dA_part);
                if (B_const) dBc_part = warp_sum(dBc_part);
                if (C_const) dCc_part = warp_sum(dCc_part);
                __syncwarp();  // every lane has read sG[n]
                if (lane == 0) {
                    sG[n] = gg_first;
                    sdA[n] += dA_part;
                    if (B_const) sdBc[n] += dBc_part;
                    if (C_const) sdCc[n] += dCc_part;
                }
                __syncwarp();
                if (stage) {
                    // Sum the nw channels in a fixed order (deterministic). The other parity is
                    // written next time, so one barrier per state suffices: a warp comes back to
                    // this parity only after the next barrier, which every thread reaches after
                    // finishing these sums.
                    __syncthreads();
                    for (int t = threadIdx.x; t < kChunk; t += blockDim.x) {
                        if (l0 + t >= L) continue;
                        const int slot = red_slot(t / kItems, t % kItems);
                        if (!B_const) {
                            float s = 0.f;
                            for (int w = 0; w < nw; ++w) s += red[w * kChunk + slot];
                            dB_tile[n * L + l0 + t] = s;
                        }
                        if (!C_const) {
                            float s = 0.f;
                            for (int w = 0; w < nw; ++w) s += red[(nw + w) * kChunk + slot];
                            dC_tile[n * L + l0 + t] = s;
                        }
                    }
                    parity ^= 1;
                }
            }
        }

        if (z_row) {  // dz = dout * y * silu'(z), y = sum_n C h + D u
            float zz[kItems], dout[kItems];
            load_items(z_row, lt, valid, a.vec_z, zz);
            if (dout_row) {
                load_items(dout_row, lt, valid, a.vec_dout, dout);
            } else {
#pragma unroll
                for (int k = 0; k < kItems; ++k) dout[k] = 0.f;
            }
#pragma unroll
            for (int k = 0; k < kItems; ++k) {
                const float sg = sigmoid(zz[k]);
                const float yfull = fmaf(Dd, uu[k], ysum[k]);
                ysum[k] = dout[k] * yfull * sg * fmaf(zz[k], 1.f - sg, 1.f);
            }
            store_items(dz_row, lt, valid, a.vec_dz, ysum);
        }
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            float gd = fmaf(g_dtu[k], uu[k], g_dt[k]);
            // d softplus(r)/dr = sigmoid(r) = 1 - exp(-softplus(r))
            if (softplus_dt) gd *= -expm1f(-dt[k]);
            g_dt[k] = gd;                                   // now d loss / d raw delta
            g_dtu[k] = fmaf(g_dtu[k], dt[k], dy[k] * Dd);  // now d loss / du
            dD_acc = fmaf(dy[k], uu[k], dD_acc);            // zero past L (dout and u are)
            if (k < valid) dbias_acc += gd;
        }
        store_items(du_row, lt, valid, a.vec_du, g_dtu);
        store_items(ddl_row, lt, valid, a.vec_ddelta, g_dt);
    }

    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (lane == 0) {
        if (p.dD) p.dD[bd] = dD_acc;
        if (p.ddelta_bias) p.ddelta_bias[bd] = dbias_acc;
    }
    __syncwarp();
    for (int n = lane; n < N; n += kWarp) {
        p.dA[bd * N + n] = sdA[n];
        if (p.dinitial_state) p.dinitial_state[bd * N + n] = sG[n];
        if (B_const) p.dB[bd * N + n] = sdBc[n];
        if (C_const) p.dC[bd * N + n] = sdCc[n];
    }
}

}  // namespace scanlib
