// emulation.cu - the fiber scheduler behind emulation.h (CPU emulation build only).
//
// The GPU build (scanlib/build.py) skips this file; the emulation build compiles it with g++.
#if defined(SCANLIB_EMULATE)

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <cuda_fp16.h>

#include "emulation.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace scanlib_emu {
namespace {

// ------------------------------------------------------------------ context switching
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// resumes the context whose stack pointer is `to` (System V x86-64 ABI).
extern "C" void scanlib_emu_switch(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .type scanlib_emu_switch,@function
scanlib_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size scanlib_emu_switch, .-scanlib_emu_switch
)");

struct Context {
    void* sp = nullptr;
};

void context_init(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
    // top 16-byte aligned; `ret` pops `entry` leaving rsp % 16 == 8, as after a call
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~static_cast<uintptr_t>(15);
    auto* sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                           // entry's (never used) return address
    *--sp = reinterpret_cast<void*>(entry);    // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}

void context_switch(Context& from, Context& to) { scanlib_emu_switch(&from.sp, to.sp); }

#else  // portable, slower: ucontext
}  // namespace
}  // namespace scanlib_emu
#include <ucontext.h>
namespace scanlib_emu {
namespace {
struct Context {
    ucontext_t uc;
};
void context_init(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------ scheduler
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

struct Stack {
    unsigned char* base = nullptr;  // guard page at the low end
    unsigned char* usable() const { return base + kGuardBytes; }
};

struct Barrier {
    unsigned expected = 0, arrived = 0;
    uint64_t generation = 0;
};

struct Fiber {
    Context ctx;
    bool done = false;
    unsigned parity = 0;  // which half of the warp's shuffle slots this thread writes next
    const char* waiting = nullptr;
};

struct Scheduler {
    Context main;
    std::vector<Fiber> fibers;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<uint64_t> slots;  // [warp][2][32]
    std::vector<unsigned char> smem;
    const std::function<void()>* body = nullptr;
    unsigned current = 0;
    uint64_t progress = 0;
};

thread_local Scheduler* g_sched = nullptr;
thread_local std::vector<Stack> g_stacks;

Stack& stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            std::fprintf(stderr, "scanlib emulation: cannot allocate a fiber stack\n");
            std::abort();
        }
        mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
        g_stacks.push_back(Stack{static_cast<unsigned char*>(p)});
    }
    return g_stacks[i];
}

void yield_to_scheduler() {
    Scheduler* s = g_sched;
    context_switch(s->fibers[s->current].ctx, s->main);
}

void wait(Barrier& b, const char* what) {
    Scheduler* s = g_sched;
    const uint64_t gen = b.generation;
    ++s->progress;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    s->fibers[s->current].waiting = what;
    while (b.generation == gen) yield_to_scheduler();
    s->fibers[s->current].waiting = nullptr;
}

void fiber_entry() {
    Scheduler* s = g_sched;
    (*s->body)();
    s->fibers[s->current].done = true;
    ++s->progress;
    context_switch(s->fibers[s->current].ctx, s->main);
    std::abort();  // a finished fiber is never resumed
}

thread_local std::string g_message;

// SCANLIB_EMU_SCHEDULE picks the order in which runnable threads get the CPU:
//   "lockstep" (default): round-robin over all threads; since every shuffle is a barrier, the
//             warps of a block advance together;
//   "ahead":  the lowest warp runs as far as it can (until __syncthreads or its end) before the
//             next one starts; "behind": the same from the highest warp down;
//   "random:<seed>": like "ahead" with a fresh random order of warps and lanes every round.
// The ahead/behind/random orders expose a missing __syncthreads: a warp then reads shared
// memory that another warp has not written yet (or has already overwritten).
struct Schedule {
    bool greedy = false, reverse = false, random = false;
    std::mt19937 rng;
};

Schedule schedule_from_env() {
    Schedule s;
    const char* env = std::getenv("SCANLIB_EMU_SCHEDULE");
    const std::string v = env ? env : "";
    if (v == "ahead") s.greedy = true;
    if (v == "behind") s.greedy = s.reverse = true;
    if (v.rfind("random", 0) == 0) {
        s.greedy = s.random = true;
        const auto colon = v.find(':');
        s.rng.seed(colon == std::string::npos ? 0u
                                              : static_cast<unsigned>(std::atoi(v.c_str() + colon + 1)));
    }
    return s;
}

thread_local const char* g_fault = nullptr;

}  // namespace

void fault(const char* what) {
    if (g_fault == nullptr) g_fault = what;
}

void sync_block() { wait(g_sched->block_barrier, "__syncthreads"); }

void sync_warp() { wait(g_sched->warp_barriers[threadIdx.x / 32], "a warp barrier"); }

uint64_t exchange(uint64_t bits, int src) {
    Scheduler* s = g_sched;
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    Fiber& f = s->fibers[t];
    uint64_t* slot = &s->slots[(warp * 2 + f.parity) * 32];
    slot[lane] = bits;
    wait(s->warp_barriers[warp], "a warp shuffle");
    // the other half is written next time, so a slow reader never sees the next exchange
    f.parity ^= 1;
    return slot[src];
}

unsigned char* dynamic_smem() { return g_sched->smem.data(); }

const char* launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32 != 0 || block.x > 1024)
        return "emulation: blocks must be 1-D with a multiple of 32 threads (at most 1024)";
    if (smem > 228 * 1024) return "emulation: more than 228 KiB of dynamic shared memory";
    const unsigned n = block.x, warps = n / 32;
    Scheduler s;
    s.fibers.resize(n);
    s.warp_barriers.resize(warps);
    s.slots.assign(static_cast<size_t>(warps) * 64, 0);
    s.smem.resize(smem);  // exact: an address sanitizer sees any overrun
    s.body = &body;
    for (unsigned i = 0; i < n; ++i) stack_for(i);
    g_fault = nullptr;
    Schedule sched = schedule_from_env();
    Scheduler* outer = g_sched;
    g_sched = &s;
    gridDim = grid;
    blockDim = block;
    const char* error = nullptr;
    for (unsigned bz = 0; bz < grid.z && !error; ++bz)
        for (unsigned by = 0; by < grid.y && !error; ++by)
            for (unsigned bx = 0; bx < grid.x && !error; ++bx) {
                blockIdx = uint3{bx, by, bz};
                std::memset(s.smem.data(), 0xff, s.smem.size());  // NaN floats
                s.block_barrier = Barrier{n, 0, 0};
                for (auto& wb : s.warp_barriers) wb = Barrier{32, 0, 0};
                for (unsigned i = 0; i < n; ++i) {
                    s.fibers[i].done = false;
                    s.fibers[i].parity = 0;
                    s.fibers[i].waiting = nullptr;
                    context_init(s.fibers[i].ctx, g_stacks[i].usable(), kStackBytes, fiber_entry);
                }
                unsigned live = n;
                std::vector<unsigned> warp_order(warps), lane_order(32);
                for (unsigned w = 0; w < warps; ++w) warp_order[w] = sched.reverse ? warps - 1 - w : w;
                for (unsigned l = 0; l < 32; ++l) lane_order[l] = l;
                while (live > 0) {
                    const uint64_t before = s.progress;
                    if (sched.random) {
                        std::shuffle(warp_order.begin(), warp_order.end(), sched.rng);
                        std::shuffle(lane_order.begin(), lane_order.end(), sched.rng);
                    }
                    for (unsigned w : warp_order) {
                        uint64_t warp_before;
                        do {  // greedy: this warp again while it gets anywhere
                            warp_before = s.progress;
                            for (unsigned l : lane_order) {
                                const unsigned i = w * 32 + l;
                                if (s.fibers[i].done) continue;
                                s.current = i;
                                threadIdx = uint3{i, 0, 0};
                                context_switch(s.main, s.fibers[i].ctx);
                                if (s.fibers[i].done) --live;
                            }
                        } while (sched.greedy && s.progress != warp_before);
                    }
                    if (live > 0 && s.progress == before) {
                        unsigned at_block = 0, at_warp = 0;
                        for (auto& f : s.fibers)
                            if (!f.done && f.waiting && f.waiting[0] == '_') ++at_block;
                            else if (!f.done) ++at_warp;
                        g_message = "emulation: the kernel deadlocked in block (" +
                                    std::to_string(bx) + "," + std::to_string(by) + "," +
                                    std::to_string(bz) + "): " + std::to_string(at_block) +
                                    " threads wait at __syncthreads, " + std::to_string(at_warp) +
                                    " at a warp barrier or shuffle, " +
                                    std::to_string(n - live) +
                                    " finished; some thread skips a barrier the others reach";
                        error = g_message.c_str();
                        break;
                    }
                }
            }
    g_sched = outer;
    if (error == nullptr && g_fault != nullptr) error = g_fault;
    g_fault = nullptr;
    return error;
}

}  // namespace scanlib_emu

#endif  // SCANLIB_EMULATE
