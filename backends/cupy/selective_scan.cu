// Selective scan (Mamba S6) forward and backward for scanlib's "cupy" backend.
//
// Compiled at run time by NVRTC through cupy.RawModule, one instantiation per input dtype (the
// list lives in kernels.py: NAME_EXPRESSIONS). The file includes no header at all: NVRTC has no
// host headers and CuPy ships no bfloat16 header, so 16-bit values are carried as raw bits and
// converted by the helpers below (PTX cvt for fp16 on the device, integer rounding for bf16).
// Code outside __CUDA_ARCH__ only serves the CPU emulator used by the tests (cuda_emulator.h).
//
// Letters: B batch, D channels, L sequence length, N state size, G groups of B/C.
// Thread layout: spc = N rounded up to a power of two threads per (batch, channel); thread n of a
// channel owns state n and steps along L. spc <= 32 ("narrow"): 128 / spc channels per block, the
// sum over N is a shuffle reduction inside a segment of spc lanes. spc > 32 ("wide"): one channel
// per block of spc threads; per-warp partial sums meet in shared memory.
//
// Semantics: dt = softplus(delta + bias) (each part when asked), h_t = exp(dt A) h_{t-1} +
// dt u_t B_t, y_t = <C_t, h_t> + D u_t, out = y * silu(z). B and C are read through a
// [B, G, N, L] stride view (constant [D, N] B/C: G = D, batch and L strides 0); channel d uses
// group d / (D / G).

#define SCAN_CHUNK 32
#define SCAN_FULL_MASK 0xffffffffu

// 16-bit storage types (raw IEEE binary16 / bfloat16 bits)
struct scan_half {
  unsigned short bits;
};
struct scan_bfloat16 {
  unsigned short bits;
};

__device__ __forceinline__ int scan_imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float scan_bits_to_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  union {
    unsigned int u;
    float f;
  } v;
  v.u = u;
  return v.f;
#endif
}

__device__ __forceinline__ unsigned int scan_float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  union {
    unsigned int u;
    float f;
  } v;
  v.f = f;
  return v.u;
#endif
}

__device__ __forceinline__ float scan_half_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
  unsigned int e = ((unsigned int)h >> 10) & 0x1fu;
  unsigned int m = (unsigned int)h & 0x3ffu;
  if (e == 0x1fu) return scan_bits_to_float(sign | 0x7f800000u | (m << 13));  // inf / nan
  if (e == 0u) {
    if (m == 0u) return scan_bits_to_float(sign);
    e = 113u;  // subnormal: shift the mantissa up to its leading one
    while ((m & 0x400u) == 0u) {
      m <<= 1;
      --e;
    }
    return scan_bits_to_float(sign | (e << 23) | ((m & 0x3ffu) << 13));
  }
  return scan_bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

__device__ __forceinline__ unsigned short scan_float_to_half(float f) {
#ifdef __CUDA_ARCH__
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  // round to nearest even, as cvt.rn does
  unsigned int x = scan_float_to_bits(f);
  const unsigned int sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return (unsigned short)(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds past 65504
  if (x <= 0x33000000u) return (unsigned short)sign;              // <= 2^-25 rounds to zero
  const unsigned int e = x >> 23;
  if (e < 113u) {  // half subnormal
    const unsigned int m = (x & 0x7fffffu) | 0x800000u;
    const unsigned int shift = 126u - e;
    unsigned int r = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u);
    const unsigned int halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
  }
  unsigned int r = ((e - 112u) << 10) | ((x >> 13) & 0x3ffu);
  const unsigned int rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (unsigned short)(sign | r);
#endif
}

__device__ __forceinline__ unsigned short scan_float_to_bfloat16(float f) {
  unsigned int u = scan_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float scan_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float scan_load(const scan_half* p, long long i) {
  return scan_half_to_float(p[i].bits);
}
__device__ __forceinline__ float scan_load(const scan_bfloat16* p, long long i) {
  return scan_bits_to_float(((unsigned int)p[i].bits) << 16);
}

__device__ __forceinline__ void scan_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void scan_store(scan_half* p, long long i, float v) {
  scan_half h;
  h.bits = scan_float_to_half(v);
  p[i] = h;
}
__device__ __forceinline__ void scan_store(scan_bfloat16* p, long long i, float v) {
  scan_bfloat16 h;
  h.bits = scan_float_to_bfloat16(v);
  p[i] = h;
}

// a tensor that is either float32 (flag set) or the input dtype T
template <typename T>
__device__ __forceinline__ float scan_load_mixed(const void* p, long long i, int is_f32) {
  return is_f32 ? static_cast<const float*>(p)[i] : scan_load(static_cast<const T*>(p), i);
}

template <typename T>
__device__ __forceinline__ void scan_store_mixed(void* p, long long i, float v, int is_f32) {
  if (is_f32)
    static_cast<float*>(p)[i] = v;
  else
    scan_store(static_cast<T*>(p), i, v);
}

__device__ __forceinline__ float scan_softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float scan_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// sum over aligned groups of `width` lanes (power of two <= 32); every lane gets its group's sum
__device__ __forceinline__ float scan_group_sum(float v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(SCAN_FULL_MASK, v, off);
  return v;
}

// gradient of a B/C entry shared by several channels. merge: every channel of this warp has the
// same (batch, group), so lanes of equal n are summed first and one atomic per n is issued.
__device__ __forceinline__ void scan_atomic_bc(float* p, long long off, float v, bool act,
                                               bool merge, int spc) {
  if (merge) {
    for (int o = spc; o < 32; o <<= 1) v += __shfl_xor_sync(SCAN_FULL_MASK, v, o);
    if (act && (int)(threadIdx.x & 31u) < spc) atomicAdd(p + off, v);
  } else if (act) {
    atomicAdd(p + off, v);
  }
}

// Forward. out: [B, D, L] (T, or float32 when out_f32); last: [B, D, N] float32;
// ckpt (nullable): [B, D, K, N] float32 with the state before step k * nsub * SCAN_CHUNK.
// Dynamic shared memory: (blockDim / min(spc, 32)) * SCAN_CHUNK floats.
template <typename T>
__global__ void scan_fwd(const T* __restrict__ u, const T* __restrict__ delta,
                         const T* __restrict__ z, const float* __restrict__ A,
                         const void* __restrict__ Bm, const void* __restrict__ Cm,
                         const float* __restrict__ Dv, const float* __restrict__ dbias,
                         const float* __restrict__ h0, void* __restrict__ out,
                         float* __restrict__ last, float* __restrict__ ckpt, const int batch,
                         const int dim, const int seqlen, const int dstate, const int spc,
                         const int nsub, const int softplus, const int out_f32,
                         const long long su_b, const long long su_d, const long long su_l,
                         const long long sdt_b, const long long sdt_d, const long long sdt_l,
                         const long long sz_b, const long long sz_d, const long long sz_l,
                         const int gB, const int B_f32, const long long sB_b,
                         const long long sB_g, const long long sB_n, const long long sB_l,
                         const int gC, const int C_f32, const long long sC_b,
                         const long long sC_g, const long long sC_n, const long long sC_l) {
  extern __shared__ float scan_smem[];
  const int tid = (int)threadIdx.x;
  const int nthr = (int)blockDim.x;
  const int cpb = nthr / spc;             // channels per block
  const int W = spc < 32 ? spc : 32;      // lanes reduced together
  const int segs = spc / W;               // reduction groups per channel
  const int c = tid / spc;                // channel within the block
  const int n = tid - c * spc;            // state index
  const long long total = (long long)batch * dim;
  const long long ch = (long long)blockIdx.x * cpb + c;  // flat (b, d)
  const bool ch_ok = ch < total;
  const bool act = ch_ok && n < dstate;
  const int b = ch_ok ? (int)(ch / dim) : 0;
  const int d = ch_ok ? (int)(ch - (long long)b * dim) : 0;
  const int grp = tid / W;
  const bool lead = (tid % W) == 0;
  float* ybuf = scan_smem;  // [nthr / W][SCAN_CHUNK]: partial sums of C_t h_t

  const T* up = u + b * su_b + d * su_d;
  const T* dp = delta + b * sdt_b + d * sdt_d;
  const long long bo = b * sB_b + (long long)(d / (dim / gB)) * sB_g + n * sB_n;
  const long long co = b * sC_b + (long long)(d / (dim / gC)) * sC_g + n * sC_n;
  const float a = act ? A[(long long)d * dstate + n] : 0.f;
  const float bias = (ch_ok && dbias) ? dbias[d] : 0.f;
  float h = (act && h0) ? h0[ch * dstate + n] : 0.f;
  const int seglen = nsub * SCAN_CHUNK;
  const int K = (seqlen + seglen - 1) / seglen;

  for (int l0 = 0; l0 < seqlen; l0 += SCAN_CHUNK) {
    const int len = scan_imin(SCAN_CHUNK, seqlen - l0);
    if (ckpt && act && l0 % seglen == 0) ckpt[(ch * K + l0 / seglen) * dstate + n] = h;
    for (int t = 0; t < len; ++t) {
      const int l = l0 + t;
      float v = 0.f;
      if (act) {
        float dt = scan_load(dp, l * sdt_l) + bias;
        if (softplus) dt = scan_softplus(dt);
        const float x = dt * scan_load(up, l * su_l);
        h = expf(dt * a) * h + x * scan_load_mixed<T>(Bm, bo + l * sB_l, B_f32);
        v = h * scan_load_mixed<T>(Cm, co + l * sC_l, C_f32);
      }
      v = scan_group_sum(v, W);
      if (lead) ybuf[grp * SCAN_CHUNK + t] = v;
    }
    __syncthreads();
    // epilogue: consecutive threads take consecutive steps of one channel (coalesced)
    for (int i = tid; i < cpb * SCAN_CHUNK; i += nthr) {
      const int cc = i / SCAN_CHUNK;
      const int t = i - cc * SCAN_CHUNK;
      const long long ch2 = (long long)blockIdx.x * cpb + cc;
      if (t < len && ch2 < total) {
        const int b2 = (int)(ch2 / dim);
        const int d2 = (int)(ch2 - (long long)b2 * dim);
        const int l = l0 + t;
        float y = 0.f;
        for (int k = 0; k < segs; ++k) y += ybuf[(cc * segs + k) * SCAN_CHUNK + t];
        if (Dv) y += Dv[d2] * scan_load(u, b2 * su_b + d2 * su_d + l * su_l);
        if (z) {
          const float zz = scan_load(z, b2 * sz_b + d2 * sz_d + l * sz_l);
          y *= zz * scan_sigmoid(zz);
        }
        scan_store_mixed<T>(out, ch2 * seqlen + l, y, out_f32);
      }
    }
    __syncthreads();
  }
  if (act) last[ch * dstate + n] = h;
}

// Backward. Walks the checkpoint segments from the last; inside a segment it first rebuilds the
// state at every chunk start (sub), then per chunk (last first) recomputes the chunk's states
// (hbuf) and runs the reverse recurrence g_{t-1} = exp(dt_t A) g_t, with g = dL/dh.
// Outputs: du, ddelta, dz: [B, D, L] in T; dA_part, dh0: [B, D, N]; dD_part, dbias_part: [B, D]
// (summed over B by the caller); dB/dC: [B, D, N] partials when B/C is constant (B_f32 set),
// otherwise [B, G, N, L] float32 zero-filled by the caller and accumulated with atomics.
// Dynamic shared memory (floats): (SCAN_CHUNK + nsub) * blockDim, plus for spc > 32
// 2 * (blockDim / 32) * SCAN_CHUNK + SCAN_CHUNK.
template <typename T>
__global__ void scan_bwd(const T* __restrict__ u, const T* __restrict__ delta,
                         const T* __restrict__ z, const float* __restrict__ A,
                         const void* __restrict__ Bm, const void* __restrict__ Cm,
                         const float* __restrict__ Dv, const float* __restrict__ dbias,
                         const float* __restrict__ ckpt, const void* __restrict__ dout,
                         const float* __restrict__ dlast, T* __restrict__ du,
                         T* __restrict__ ddelta, T* __restrict__ dz, float* __restrict__ dA_part,
                         float* __restrict__ dD_part, float* __restrict__ dbias_part,
                         float* __restrict__ dh0, float* __restrict__ dB, float* __restrict__ dC,
                         const int batch, const int dim, const int seqlen, const int dstate,
                         const int spc, const int nsub, const int softplus, const int dout_f32,
                         const long long su_b, const long long su_d, const long long su_l,
                         const long long sdt_b, const long long sdt_d, const long long sdt_l,
                         const long long sz_b, const long long sz_d, const long long sz_l,
                         const long long so_b, const long long so_d, const long long so_l,
                         const int gB, const int B_f32, const long long sB_b,
                         const long long sB_g, const long long sB_n, const long long sB_l,
                         const int gC, const int C_f32, const long long sC_b,
                         const long long sC_g, const long long sC_n, const long long sC_l) {
  extern __shared__ float scan_smem[];
  const int tid = (int)threadIdx.x;
  const int nthr = (int)blockDim.x;
  const int cpb = nthr / spc;
  const int W = spc < 32 ? spc : 32;
  const int segs = spc / W;
  const bool wide = spc > 32;  // one channel per block; cross-warp sums go through smem
  const int c = tid / spc;
  const int n = tid - c * spc;
  const long long total = (long long)batch * dim;
  const long long ch = (long long)blockIdx.x * cpb + c;
  const bool ch_ok = ch < total;
  const bool act = ch_ok && n < dstate;
  const int b = ch_ok ? (int)(ch / dim) : 0;
  const int d = ch_ok ? (int)(ch - (long long)b * dim) : 0;
  const int grp = tid / W;
  const bool lead = (tid % W) == 0;

  float* hbuf = scan_smem;                      // [SCAN_CHUNK][nthr]: h_t of the current chunk
  float* sub = hbuf + SCAN_CHUNK * nthr;        // [nsub][nthr]: state before each chunk
  float* p1 = sub + nsub * nthr;                // wide only: [nthr / 32][SCAN_CHUNK]
  float* p2 = p1 + (nthr / W) * SCAN_CHUNK;     // wide only: [nthr / 32][SCAN_CHUNK]
  float* dyb = p2 + (nthr / W) * SCAN_CHUNK;    // wide only: [SCAN_CHUNK]: dL/dy_t

  const T* up = u + b * su_b + d * su_d;
  const T* dp = delta + b * sdt_b + d * sdt_d;
  const T* zp = z ? z + b * sz_b + d * sz_d : z;
  const long long oo = b * so_b + d * so_d;
  const int gidB = d / (dim / gB);
  const int gidC = d / (dim / gC);
  const long long bo = b * sB_b + (long long)gidB * sB_g + n * sB_n;
  const long long co = b * sC_b + (long long)gidC * sC_g + n * sC_n;
  const long long dBo = (((long long)b * gB + gidB) * dstate + n) * seqlen;  // non-constant dB
  const long long dCo = (((long long)b * gC + gidC) * dstate + n) * seqlen;
  const float a = act ? A[(long long)d * dstate + n] : 0.f;
  const float bias = (ch_ok && dbias) ? dbias[d] : 0.f;
  const float Dd = (ch_ok && Dv) ? Dv[d] : 0.f;

  bool mergeB = false, mergeC = false;
  if (!wide && spc < 32) {  // warp-uniform branch
    // every lane must reach each shuffle: no short-circuit around them
    const int keyB = ch_ok ? b * gB + gidB : -1;
    const int keyC = ch_ok ? b * gC + gidC : -1;
    const int keyB0 = __shfl_sync(SCAN_FULL_MASK, keyB, 0);
    const int keyC0 = __shfl_sync(SCAN_FULL_MASK, keyC, 0);
    mergeB = __all_sync(SCAN_FULL_MASK, keyB >= 0 && keyB == keyB0) != 0;
    mergeC = __all_sync(SCAN_FULL_MASK, keyC >= 0 && keyC == keyC0) != 0;
  }

  float g = (act && dlast) ? dlast[ch * dstate + n] : 0.f;  // dL/dh_t
  float dA_acc = 0.f, dBc = 0.f, dCc = 0.f, dD_acc = 0.f, dbias_acc = 0.f;
  const int seglen = nsub * SCAN_CHUNK;
  const int K = (seqlen + seglen - 1) / seglen;

  for (int k = K - 1; k >= 0; --k) {
    const int s0 = k * seglen;
    const int s1 = scan_imin(seqlen, s0 + seglen);
    const int nch = (s1 - s0 + SCAN_CHUNK - 1) / SCAN_CHUNK;
    // states at the chunk starts of this segment (each thread touches only its own column)
    float h = act ? ckpt[(ch * K + k) * dstate + n] : 0.f;
    for (int j = 0; j < nch; ++j) {
      sub[j * nthr + tid] = h;
      if (act && j + 1 < nch) {
        const int c0 = s0 + j * SCAN_CHUNK;
        for (int t = 0; t < SCAN_CHUNK; ++t) {
          const int l = c0 + t;
          float dt = scan_load(dp, l * sdt_l) + bias;
          if (softplus) dt = scan_softplus(dt);
          const float x = dt * scan_load(up, l * su_l);
          h = expf(dt * a) * h + x * scan_load_mixed<T>(Bm, bo + l * sB_l, B_f32);
        }
      }
    }
    for (int j = nch - 1; j >= 0; --j) {
      const int l0 = s0 + j * SCAN_CHUNK;
      const int len = scan_imin(SCAN_CHUNK, s1 - l0);
      // recompute the chunk's states
      h = sub[j * nthr + tid];
      for (int t = 0; t < len; ++t) {
        const int l = l0 + t;
        float v = 0.f;
        if (act) {
          float dt = scan_load(dp, l * sdt_l) + bias;
          if (softplus) dt = scan_softplus(dt);
          const float x = dt * scan_load(up, l * su_l);
          h = expf(dt * a) * h + x * scan_load_mixed<T>(Bm, bo + l * sB_l, B_f32);
          v = h * scan_load_mixed<T>(Cm, co + l * sC_l, C_f32);
        }
        hbuf[t * nthr + tid] = h;
        if (wide && z) {
          v = scan_group_sum(v, W);
          if (lead) p1[grp * SCAN_CHUNK + t] = v;
        }
      }
      if (wide) {
        // dL/dy_t for the chunk (gate and skip term), thread t takes step t
        __syncthreads();
        if (tid < len && ch_ok) {
          const int l = l0 + tid;
          float dy = dout ? scan_load_mixed<T>(dout, oo + l * so_l, dout_f32) : 0.f;
          const float uu = scan_load(up, l * su_l);
          if (z) {
            float y = Dd * uu;
            for (int q = 0; q < segs; ++q) y += p1[q * SCAN_CHUNK + tid];
            const float zz = scan_load(zp, l * sz_l);
            const float sg = scan_sigmoid(zz);
            scan_store(dz, ch * seqlen + l, dy * y * sg * (1.f + zz * (1.f - sg)));
            dy *= zz * sg;
          }
          dyb[tid] = dy;
          dD_acc += dy * uu;
        }
        __syncthreads();
      }
      // reverse sweep over the chunk
      for (int t = len - 1; t >= 0; --t) {
        const int l = l0 + t;
        float raw = 0.f, dt = 0.f, uu = 0.f, Bt = 0.f, Ct = 0.f;
        if (ch_ok) {
          raw = scan_load(dp, l * sdt_l) + bias;
          dt = softplus ? scan_softplus(raw) : raw;
          uu = scan_load(up, l * su_l);
        }
        if (act) {
          Bt = scan_load_mixed<T>(Bm, bo + l * sB_l, B_f32);
          Ct = scan_load_mixed<T>(Cm, co + l * sC_l, C_f32);
        }
        const float ht = hbuf[t * nthr + tid];
        const float hp = t > 0 ? hbuf[(t - 1) * nthr + tid] : sub[j * nthr + tid];
        float dy = 0.f, dzv = 0.f;
        if (wide) {
          dy = dyb[t];
        } else {
          if (ch_ok && dout) dy = scan_load_mixed<T>(dout, oo + l * so_l, dout_f32);
          if (z) {
            const float y = scan_group_sum(ht * Ct, W) + Dd * uu;
            const float zz = ch_ok ? scan_load(zp, l * sz_l) : 0.f;
            const float sg = scan_sigmoid(zz);
            dzv = dy * y * sg * (1.f + zz * (1.f - sg));
            dy *= zz * sg;
          }
        }
        float s1v = 0.f, s2v = 0.f, dBv = 0.f, dCv = 0.f;
        if (act) {
          g += dy * Ct;                     // dL/dh_t complete
          const float ea = expf(dt * a);
          dBv = g * (dt * uu);
          dCv = dy * ht;
          s1v = g * Bt;                     // -> d(dt * u)
          const float gla = g * hp * ea;    // dL/d(dt * A)
          s2v = gla * a;                    // -> d dt
          dA_acc += gla * dt;
          g *= ea;                          // dL/dh_{t-1} through the recurrence
          if (B_f32) dBc += dBv;
          if (C_f32) dCc += dCv;
        }
        if (!B_f32) scan_atomic_bc(dB, dBo + l, dBv, act, mergeB, spc);
        if (!C_f32) scan_atomic_bc(dC, dCo + l, dCv, act, mergeC, spc);
        s1v = scan_group_sum(s1v, W);
        s2v = scan_group_sum(s2v, W);
        if (wide) {
          if (lead) {
            p1[grp * SCAN_CHUNK + t] = s1v;
            p2[grp * SCAN_CHUNK + t] = s2v;
          }
        } else if (ch_ok && n == 0) {
          float ddv = uu * s1v + s2v;
          if (softplus) ddv *= scan_sigmoid(raw);
          scan_store(du, ch * seqlen + l, dt * s1v + Dd * dy);
          scan_store(ddelta, ch * seqlen + l, ddv);
          if (z) scan_store(dz, ch * seqlen + l, dzv);
          dD_acc += dy * uu;
          dbias_acc += ddv;
        }
      }
      if (wide) {
        __syncthreads();
        if (tid < len && ch_ok) {
          const int l = l0 + tid;
          float S1 = 0.f, S2 = 0.f;
          for (int q = 0; q < segs; ++q) {
            S1 += p1[q * SCAN_CHUNK + tid];
            S2 += p2[q * SCAN_CHUNK + tid];
          }
          const float raw = scan_load(dp, l * sdt_l) + bias;
          const float dt = softplus ? scan_softplus(raw) : raw;
          const float uu = scan_load(up, l * su_l);
          float ddv = uu * S1 + S2;
          if (softplus) ddv *= scan_sigmoid(raw);
          scan_store(du, ch * seqlen + l, dt * S1 + Dd * dyb[tid]);
          scan_store(ddelta, ch * seqlen + l, ddv);
          dbias_acc += ddv;
        }
        __syncthreads();
      }
    }
  }
  if (act) {
    dA_part[ch * dstate + n] = dA_acc;
    if (dh0) dh0[ch * dstate + n] = g;
    if (B_f32) dB[ch * dstate + n] = dBc;
    if (C_f32) dC[ch * dstate + n] = dCc;
  }
  if (wide) {
    // fixed-order block sum of the per-step partials of dD and dbias
    __syncthreads();
    hbuf[tid] = dD_acc;
    hbuf[nthr + tid] = dbias_acc;
    __syncthreads();
    if (tid == 0 && ch_ok) {
      float sD = 0.f, sb = 0.f;
      for (int i = 0; i < nthr; ++i) {
        sD += hbuf[i];
        sb += hbuf[nthr + i];
      }
      if (dD_part) dD_part[ch] = sD;
      if (dbias_part) dbias_part[ch] = sb;
    }
  } else if (ch_ok && n == 0) {
    if (dD_part) dD_part[ch] = dD_acc;
    if (dbias_part) dbias_part[ch] = dbias_acc;
  }
}
