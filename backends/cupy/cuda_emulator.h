// A small CPU emulator for this backend's CUDA kernels (tests and kernel debugging without a GPU).
//
// Every CUDA thread of a block runs as a fiber (ucontext) on one OS thread. __syncthreads and the
// warp primitives are barriers: a fiber parks, and the scheduler releases a block barrier when
// every live thread of the block waits there, a warp barrier when all 32 lanes wait there with
// the same primitive (a random subset of the ready warps at a time, so warps drift apart as on
// hardware). Anything else (divergent barriers, a warp primitive with exited lanes or a
// mask other than 0xffffffff) is reported as an error instead of hanging. Runnable fibers are
// resumed in a seeded random order between barriers, and shared memory starts as NaN with a
// guard zone behind the launch's dynamic size, so a missing __syncthreads, a read of unwritten
// shared memory or an overflow of the requested size shows up in the results or as an error.
//
// Include this header, then the kernel sources, then instantiate EMU_KERNEL entries (emulator.py
// generates that translation unit). Host-only: compiled by g++/clang++, never by NVRTC.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __shared__
#define __shared__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

struct emu_uint3 {
  unsigned int x, y, z;
};

inline emu_uint3 threadIdx{0, 0, 0};
inline emu_uint3 blockIdx{0, 0, 0};
inline emu_uint3 blockDim{1, 1, 1};
inline emu_uint3 gridDim{1, 1, 1};

#define EMU_SMEM_BYTES (64 * 1024)
#define EMU_GUARD_BYTES 4096

namespace emu {

enum State { RUNNABLE, WAIT_WARP, WAIT_BLOCK, DONE };
enum Op { OP_NONE = 0, OP_SHFL = 1, OP_VOTE = 2 };

struct Fiber {
  ucontext_t ctx;
  State state;
  int op;
};

inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline ucontext_t sched_ctx;
inline int cur = -1;
inline void (*body)(void**) = nullptr;
inline void** body_args = nullptr;
inline std::string error;
inline unsigned int exch[1024];
inline unsigned char* smem = nullptr;  // the kernel's extern __shared__ array
inline const std::size_t stack_bytes = 128 * 1024;

inline void fail(const std::string& msg) {
  if (error.empty()) error = msg;
}

inline void park(State s, int op) {
  const int me = cur;
  fibers[me].state = s;
  fibers[me].op = op;
  swapcontext(&fibers[me].ctx, &sched_ctx);
}

inline void fiber_entry() {
  const int me = cur;
  body(body_args);
  fibers[me].state = DONE;  // returning resumes sched_ctx (uc_link)
}

inline unsigned int float_bits(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void check_mask(unsigned int mask) {
  if (mask != 0xffffffffu) fail("warp primitive with a partial mask (the emulator needs 0xffffffff)");
}

// publish `mine`, wait for the warp, read lane `src`, wait again so the slot can be reused
inline unsigned int warp_exchange(unsigned int mine, int src_lane, Op op) {
  const int me = cur;
  const int base = me & ~31;
  exch[me] = mine;
  park(WAIT_WARP, op);
  const unsigned int r = exch[base + src_lane];
  park(WAIT_WARP, op);
  return r;
}

inline bool warp_all(int pred) {
  const int me = cur;
  const int base = me & ~31;
  exch[me] = pred ? 1u : 0u;
  park(WAIT_WARP, OP_VOTE);
  bool all = true;
  for (int i = 0; i < 32; ++i) all = all && exch[base + i] != 0u;
  park(WAIT_WARP, OP_VOTE);
  return all;
}

// run every thread of the current block to completion; false on error
inline bool run_block(int nthreads, unsigned int seed) {
  fibers.assign(nthreads, Fiber{});
  if ((int)stacks.size() < nthreads) stacks.resize(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    if (stacks[i].size() != stack_bytes) stacks[i].assign(stack_bytes, 0);
    Fiber& f = fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[i].data();
    f.ctx.uc_stack.ss_size = stack_bytes;
    f.ctx.uc_link = &sched_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = RUNNABLE;
    f.op = OP_NONE;
  }
  std::mt19937 rng(seed);
  std::vector<int> order(nthreads);
  std::iota(order.begin(), order.end(), 0);
  while (true) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      if (fibers[i].state != RUNNABLE) continue;
      cur = i;
      threadIdx = emu_uint3{(unsigned int)i, 0u, 0u};
      swapcontext(&sched_ctx, &fibers[i].ctx);
      if (!error.empty()) return false;
    }
    bool all_done = true, all_block = true;
    for (const Fiber& f : fibers) {
      all_done = all_done && f.state == DONE;
      all_block = all_block && (f.state == WAIT_BLOCK || f.state == DONE);
    }
    if (all_done) return true;
    bool released = false;
    if (all_block) {  // exited threads count as arrived at __syncthreads
      for (Fiber& f : fibers)
        if (f.state == WAIT_BLOCK) f.state = RUNNABLE;
      released = true;
    } else {
      // release a random nonempty subset of the ready warps, so warps drift apart between
      // __syncthreads the way they may on hardware (a missing block barrier then shows)
      std::vector<int> ready;
      for (int w = 0; w * 32 < nthreads; ++w) {
        const int op = fibers[w * 32].op;
        bool ok = true;
        for (int i = w * 32; i < w * 32 + 32; ++i)
          ok = ok && fibers[i].state == WAIT_WARP && fibers[i].op == op;
        if (ok) ready.push_back(w);
      }
      if (!ready.empty()) {
        std::vector<int> pick;
        for (int w : ready)
          if (rng() & 1u) pick.push_back(w);
        if (pick.empty()) pick.push_back(ready[rng() % ready.size()]);
        for (int w : pick)
          for (int i = w * 32; i < w * 32 + 32; ++i) fibers[i].state = RUNNABLE;
        released = true;
      }
    }
    if (!released) {
      char msg[160];
      int nb = 0, nw = 0, nd = 0;
      for (const Fiber& f : fibers) {
        nb += f.state == WAIT_BLOCK;
        nw += f.state == WAIT_WARP;
        nd += f.state == DONE;
      }
      std::snprintf(msg, sizeof msg,
                    "deadlock in block %u: %d threads at __syncthreads, %d at warp primitives, "
                    "%d exited (divergent barrier or warp primitive)",
                    blockIdx.x, nb, nw, nd);
      fail(msg);
      return false;
    }
  }
}

template <typename... P>
bool check_signature(void (*)(P...), int nargs, const int* sizes, std::string& err) {
  constexpr int n = (int)sizeof...(P);
  if (nargs != n) {
    err = "kernel takes " + std::to_string(n) + " arguments, got " + std::to_string(nargs);
    return false;
  }
  if constexpr (n > 0) {
    const int expect[] = {(int)sizeof(P)...};
    for (int i = 0; i < n; ++i)
      if (expect[i] != sizes[i]) {
        err = "argument " + std::to_string(i) + " has " + std::to_string(sizes[i]) +
              " bytes, the kernel expects " + std::to_string(expect[i]);
        return false;
      }
  }
  return true;
}

template <typename... P, std::size_t... I>
void invoke_impl(void (*f)(P...), void** a, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(a[I])...);
}

template <typename... P>
void invoke(void (*f)(P...), void** a) {
  invoke_impl(f, a, std::index_sequence_for<P...>{});
}

struct Kernel {
  const char* name;
  bool (*check)(int, const int*, std::string&);
  void (*call)(void**);
};

inline int launch(const Kernel* table, int ntable, const char* name, int grid, int block,
                  int smem_bytes, int nargs, void** args, const int* sizes, unsigned int seed,
                  char* errbuf, int errlen) {
  error.clear();
  const Kernel* k = nullptr;
  for (int i = 0; i < ntable; ++i)
    if (std::strcmp(table[i].name, name) == 0) k = &table[i];
  std::string err;
  if (!k) err = std::string("no kernel named ") + name;
  else if (block < 32 || block % 32 != 0 || block > 1024)
    err = "block size must be a multiple of 32 in [32, 1024]";
  else if (smem_bytes < 0 || smem_bytes > EMU_SMEM_BYTES - EMU_GUARD_BYTES)
    err = "dynamic shared memory request too large for the emulator";
  else
    k->check(nargs, sizes, err);
  if (err.empty()) {
    body = k->call;
    body_args = args;
    blockDim = emu_uint3{(unsigned int)block, 1u, 1u};
    gridDim = emu_uint3{(unsigned int)grid, 1u, 1u};
    const float nan = std::nanf("");
    for (int bx = 0; bx < grid && err.empty(); ++bx) {
      blockIdx = emu_uint3{(unsigned int)bx, 0u, 0u};
      float* s = reinterpret_cast<float*>(smem);
      for (int i = 0; i < EMU_SMEM_BYTES / 4; ++i) s[i] = nan;
      if (!run_block(block, seed * 2654435761u + (unsigned int)bx)) err = error;
      const unsigned char* guard = smem + smem_bytes;
      for (int i = 0; i < EMU_GUARD_BYTES && err.empty(); i += 4) {
        unsigned int v;
        std::memcpy(&v, guard + i, 4);
        if (v != float_bits(nan)) err = "write past the dynamic shared memory size";
      }
    }
  }
  if (!err.empty()) {
    std::snprintf(errbuf, (std::size_t)errlen, "%s", err.c_str());
    return 1;
  }
  return 0;
}

}  // namespace emu

// ---------------------------------------------------------------------- CUDA device built-ins
inline void __syncthreads() { emu::park(emu::WAIT_BLOCK, emu::OP_NONE); }

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask, int width = 32) {
  emu::check_mask(mask);
  const int lane = emu::cur & 31;
  int src = lane ^ lane_mask;
  if (src >= (lane / width + 1) * width) src = lane;  // CUDA: a later group yields the own value
  return emu::bits_float(emu::warp_exchange(emu::float_bits(v), src, emu::OP_SHFL));
}

inline int __shfl_sync(unsigned int mask, int v, int src_lane, int width = 32) {
  emu::check_mask(mask);
  const int lane = emu::cur & 31;
  const int src = (lane / width) * width + (src_lane % width);
  return (int)emu::warp_exchange((unsigned int)v, src, emu::OP_SHFL);
}

inline int __all_sync(unsigned int mask, int pred) {
  emu::check_mask(mask);
  return emu::warp_all(pred) ? 1 : 0;
}

inline float atomicAdd(float* p, float v) {  // fibers never interleave inside a call
  const float old = *p;
  *p = old + v;
  return old;
}

// one dispatch-table entry per kernel instantiation, e.g. EMU_KERNEL(scan_fwd<float>)
#define EMU_KERNEL(expr)                                          \
  emu::Kernel {                                                   \
    #expr,                                                        \
        [](int n, const int* s, std::string& e) {                 \
          return emu::check_signature(&expr, n, s, e);            \
        },                                                        \
        [](void** a) { emu::invoke(&expr, a); }                   \
  }
