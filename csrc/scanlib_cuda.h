/* scanlib_cuda.h - C ABI of scanlib's compiled selective-scan kernels.
 *
 * Plain C: no torch, no pybind, no C++ types cross this boundary. The library is built once per
 * CUDA toolkit and GPU architecture (python -m scanlib.build) and loaded with ctypes, so it works
 * with any torch version. Python mirrors scanlib_scan_params in backends/cuda/_abi.py; every
 * field is 8 bytes wide so the layout has no padding to get wrong, and the library checks
 * abi_version and the struct size the caller passes.
 *
 * Letters: B batch, D channels, L sequence length, N state size, G groups of B/C.
 * Every [.., L] tensor must have stride 1 along L; the other strides are given in elements.
 * Tensors named "contiguous float32" must be exactly that.
 *
 * Forward:  delta <- softplus(delta + delta_bias) (each part when asked)
 *           h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t      (h_{-1} = initial_state or 0)
 *           y_t = <C_t, h_t> + D u_t;   out = y * silu(z) when z is given
 * Backward: gradients of every input, recomputing the states from the chunk states that the
 *           forward saved every SCANLIB_CHUNK steps.
 */
#ifndef SCANLIB_CUDA_H
#define SCANLIB_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SCANLIB_ABI_VERSION 1

/* steps of L per chunk: chunk_states holds the state at every multiple of this */
#define SCANLIB_CHUNK 256
/* largest supported state size N */
#define SCANLIB_MAX_DSTATE 256

/* dtype codes */
#define SCANLIB_F32 0
#define SCANLIB_F16 1
#define SCANLIB_BF16 2

/* return codes: 0 success; otherwise scanlib_last_error() says why. Nothing aborts. */
#define SCANLIB_OK 0
#define SCANLIB_ERR_INVALID 1 /* bad sizes, dtypes, pointers or strides */
#define SCANLIB_ERR_CUDA 2    /* the CUDA runtime refused (launch, shared memory, device) */

typedef struct scanlib_scan_params {
    int64_t abi_version; /* SCANLIB_ABI_VERSION */
    int64_t struct_size; /* sizeof(scanlib_scan_params) as the caller sees it */

    int64_t batch, dim, seqlen, dstate; /* B, D, L, N */
    int64_t in_dtype;  /* u, delta, z, varying B/C; also du, ddelta, dz */
    int64_t out_dtype; /* out and dout: SCANLIB_F32 or in_dtype */
    int64_t delta_softplus;
    /* channels handled by one thread block, one warp each: 1, 2, 4 or 8. Must divide D and,
     * for every varying B/C, D / G (a block never straddles two groups). Also fixes the layout
     * of the dB/dC partial sums below. */
    int64_t channels_per_block;

    /* B and C. const != 0: [D, N] contiguous float32 (the constant form).
     * const == 0: varying, element (b, g, n, l) at b*stride_batch + g*stride_group +
     * n*stride_n + l, with G = groups; channel d reads group d / (D / G). The per-sequence
     * form [B, N, L] is G = 1, stride_group = 0. */
    int64_t B_const, B_groups, B_stride_batch, B_stride_group, B_stride_n;
    int64_t C_const, C_groups, C_stride_batch, C_stride_group, C_stride_n;

    /* [B, D, L] tensors: (stride_batch, stride_dim) */
    int64_t u_stride_batch, u_stride_dim;
    int64_t delta_stride_batch, delta_stride_dim;
    int64_t z_stride_batch, z_stride_dim;
    int64_t out_stride_batch, out_stride_dim;
    int64_t dout_stride_batch, dout_stride_dim;
    int64_t du_stride_batch, du_stride_dim;
    int64_t ddelta_stride_batch, ddelta_stride_dim;
    int64_t dz_stride_batch, dz_stride_dim;

    /* inputs (NULL where absent) */
    const void *u, *delta, *z;          /* [B, D, L] in_dtype */
    const void *B, *C;                  /* see above */
    const float *A;                     /* [D, N] contiguous float32 */
    const float *D, *delta_bias;        /* [D] float32, optional */
    const float *initial_state;         /* [B, D, N] contiguous float32, optional */

    /* forward outputs */
    void *out;           /* [B, D, L] out_dtype */
    float *last_state;   /* [B, D, N] contiguous float32, optional */
    float *chunk_states; /* [B, D, ceil(L / SCANLIB_CHUNK), N] contiguous float32: the state
                          * before each chunk; written by the forward when not NULL, read by
                          * the backward (required there) */

    /* backward inputs */
    const void *dout;   /* [B, D, L] out_dtype, optional (NULL: zero) */
    const float *dlast; /* [B, D, N] contiguous float32, optional (NULL: zero) */

    /* backward outputs (every one needed for the inputs present) */
    void *du, *ddelta, *dz; /* [B, D, L] in_dtype; ddelta is the gradient of the raw delta */
    float *dA;              /* [B, D, N] partial sums: dA = sum over B */
    float *dD;              /* [B, D] partial sums, when D is given */
    float *ddelta_bias;     /* [B, D] partial sums, when delta_bias is given */
    float *dinitial_state;  /* [B, D, N], when initial_state is given */
    /* dB, dC partial sums, contiguous float32:
     *   constant form: [B, D, N]; dB = sum over B
     *   varying form:  [B, D / channels_per_block, N, L]; viewed as [B, G, D / G /
     *                  channels_per_block, N, L], dB = sum over the third dim */
    float *dB, *dC;
} scanlib_scan_params;

int64_t scanlib_abi_version(void);
int64_t scanlib_params_size(void);
int64_t scanlib_chunk_size(void);
int64_t scanlib_max_dstate(void);
/* "cuda" for the GPU build, "emulation" for the CPU emulation used by the tests */
const char *scanlib_build_kind(void);

/* Enqueue the kernels on `stream` (a cudaStream_t; NULL is the legacy default stream).
 * Asynchronous: returns once launched. Returns SCANLIB_OK or an error code. */
int scanlib_selective_scan_fwd(const scanlib_scan_params *params, void *stream);
int scanlib_selective_scan_bwd(const scanlib_scan_params *params, void *stream);

/* The message of this thread's last failed call ("" if none). */
const char *scanlib_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SCANLIB_CUDA_H */
