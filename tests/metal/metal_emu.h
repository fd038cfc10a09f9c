// A small emulation of the Metal Shading Language subset used by ggml-metal/kernels/jlcm.metal, so the
// kernels compile as C++ and run on the CPU (tests/test_metal.py). What it models, and what it cannot,
// is written down in docs/METAL.md.
//  - address spaces (device, constant, thread, threadgroup) and the kernel keyword: erased;
//  - half: _Float16 (IEEE binary16, as Metal's half); half2: two of them;
//  - the thread model: every thread of a threadgroup is a real std::thread, so threadgroup memory,
//    threadgroup_barrier and simd_sum (32-lane simdgroups) behave as cross-thread operations.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define kernel
#define device
#define constant
#define thread
#define threadgroup

typedef _Float16 half;
struct half2 { half x, y; };
typedef unsigned int   uint;
typedef unsigned short ushort;
struct uint3   { uint x, y, z; };
struct ushort3 { ushort x, y, z; };

struct mem_flags { enum { mem_none = 0, mem_device = 1, mem_threadgroup = 2 }; };

namespace metal_emu {

constexpr int simd_width = 32;

struct threadgroup_state {
    explicit threadgroup_state(int n_threads) : group(n_threads) {
        for (int i = 0; i < (n_threads + simd_width - 1)/simd_width; ++i) {
            const int lanes = std::min(simd_width, n_threads - i*simd_width);
            simd.emplace_back(std::make_unique<std::barrier<>>(lanes));
            simd_vals.emplace_back(simd_width, 0.0f);
        }
    }
    std::barrier<> group;
    std::vector<std::unique_ptr<std::barrier<>>> simd;
    std::vector<std::vector<float>> simd_vals;
};

struct lane { threadgroup_state * tg; int simdgroup, index; };
inline thread_local lane current;

// the position of one thread, as the kernel attributes give it
struct thread_pos {
    uint3   tgpig;   // threadgroup_position_in_grid
    ushort  tiitg;   // thread_index_in_threadgroup
    ushort  tiisg;   // thread_index_in_simdgroup
    ushort  sgitg;   // simdgroup_index_in_threadgroup
    ushort  nsg;     // simdgroups_per_threadgroup
    ushort3 ntg;     // threads_per_threadgroup
};

// runs fn for every thread of every threadgroup of the grid; threadgroups one after another
inline void dispatch(uint3 grid, ushort3 ntg, const std::function<void(const thread_pos &)> & fn) {
    const int n = ntg.x*ntg.y*ntg.z;
    for (uint z = 0; z < grid.z; ++z) for (uint y = 0; y < grid.y; ++y) for (uint x = 0; x < grid.x; ++x) {
        threadgroup_state tg(n);
        std::vector<std::jthread> threads; // (the name `thread` is an erased address space here)
        for (int i = 0; i < n; ++i) {
            threads.emplace_back([&, i] {
                current = { &tg, i/simd_width, i%simd_width };
                const thread_pos p = { {x, y, z}, (ushort) i, (ushort) (i%simd_width), (ushort) (i/simd_width),
                                       (ushort) ((n + simd_width - 1)/simd_width), ntg };
                fn(p);
            });
        }
        threads.clear(); // joins
    }
}

} // namespace metal_emu

// sum over the lanes of the calling simdgroup (all of its lanes must call it, as on the GPU)
inline float simd_sum(float v) {
    auto & c = metal_emu::current;
    c.tg->simd_vals[c.simdgroup][c.index] = v;
    c.tg->simd[c.simdgroup]->arrive_and_wait();
    float s = 0.0f;
    for (float x : c.tg->simd_vals[c.simdgroup]) {
        s += x;
    }
    c.tg->simd[c.simdgroup]->arrive_and_wait();
    return s;
}

inline void threadgroup_barrier(int) {
    metal_emu::current.tg->group.arrive_and_wait();
}
