// A host emulation of the few CUDA features csrc/fused_losses_cuda.cu uses, so that its unchanged kernels and
// host code run on a CPU (tests/test_cuda_emulated.py). Not a CUDA implementation: just enough to execute these
// kernels with CUDA's semantics for what they rely on.
//
// Each launch runs its blocks one after another. The threads of a block are cooperative fibers (ucontext) on
// this one OS thread, each with its own threadIdx, switched only at barriers:
//   __syncthreads()     waits until all blockDim.x threads of the block arrive;
//   __shfl_down_sync()  exchanges values among the 32 lanes of a warp, which must all arrive (full mask only).
// A barrier that cannot complete (a thread returned, or only part of a warp shuffles) is a deadlock on a GPU:
// here it throws. __shared__ variables are function statics: one copy, which the block's fibers share. A launch of
// 0 blocks, or of a block size that is not a multiple of 32, throws, as an invalid configuration would.
#pragma once

#include <ucontext.h>

#include <c10/core/Device.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

typedef int cudaStream_t;
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace c10

struct EmulatedDim3 {
  unsigned int x = 0, y = 1, z = 1;
};
inline EmulatedDim3 threadIdx, blockIdx, gridDim, blockDim;

namespace emulation {

constexpr int kNoBarrier = -1, kBlockBarrier = 0;  // warp w waits on barrier 1 + w
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  int waiting_on = kNoBarrier;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<int> arrived;  // per barrier: threads waiting on it
  unsigned current = 0;
  const std::function<void()>* kernel = nullptr;
  unsigned char lanes[32][32][8];  // per warp and lane: the value a shuffle offers
};

inline Block& block() {
  static Block b;
  return b;
}

inline void run_fiber() {
  Block& b = block();
  (*b.kernel)();
  b.fibers[b.current].done = true;  // returns to the scheduler through uc_link
}

inline void wait_on(int barrier) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.waiting_on = barrier;
  ++b.arrived[barrier];
  swapcontext(&f.context, &b.scheduler);
}

// Runs one block to completion: every runnable fiber until it finishes or waits; a barrier whose participants
// have all arrived releases them.
inline void run_block(unsigned threads) {
  Block& b = block();
  const unsigned warps = threads / 32;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.waiting_on = kNoBarrier;
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, run_fiber, 0);
  }
  b.arrived.assign(1 + warps, 0);
  for (;;) {
    bool ran = false, all_done = true;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      all_done = all_done && f.done;
      if (f.done || f.waiting_on != kNoBarrier) continue;
      b.current = t;
      threadIdx.x = t;
      swapcontext(&b.scheduler, &f.context);
      ran = true;
    }
    if (all_done) return;
    bool released = false;
    for (unsigned barrier = 0; barrier < b.arrived.size(); ++barrier) {
      const unsigned needed = barrier == kBlockBarrier ? threads : 32;
      if (static_cast<unsigned>(b.arrived[barrier]) != needed) continue;
      for (unsigned t = 0; t < threads; ++t)
        if (b.fibers[t].waiting_on == static_cast<int>(barrier)) b.fibers[t].waiting_on = kNoBarrier;
      b.arrived[barrier] = 0;
      released = true;
    }
    if (!ran && !released) {
      std::string waits;
      for (unsigned barrier = 0; barrier < b.arrived.size(); ++barrier)
        if (b.arrived[barrier])
          waits += (barrier == kBlockBarrier ? std::string(" __syncthreads: ")
                                             : " shuffle of warp " + std::to_string(barrier - 1) + ": ") +
                   std::to_string(b.arrived[barrier]) + " arrived;";
      throw std::runtime_error("emulated CUDA: deadlock in block " + std::to_string(blockIdx.x) + " (" + waits +
                               " the other threads returned or wait elsewhere)");
    }
  }
}

}  // namespace emulation

inline void __syncthreads() { emulation::wait_on(emulation::kBlockBarrier); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned offset) {
  static_assert(sizeof(T) <= 8, "emulated shuffles carry at most 8 bytes");
  if (mask != 0xffffffffu) throw std::runtime_error("emulated CUDA: only full-warp shuffles are emulated");
  auto& b = emulation::block();
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  std::memcpy(b.lanes[warp][lane], &value, sizeof(T));
  emulation::wait_on(1 + static_cast<int>(warp));  // every lane has offered its value
  T out = value;
  if (lane + offset < 32) std::memcpy(&out, b.lanes[warp][lane + offset], sizeof(T));
  emulation::wait_on(1 + static_cast<int>(warp));  // every lane has read before any offers again
  return out;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args) becomes emulated_launch(grid, block, shared_bytes, stream,
// [&] { kernel(args); }) (tests/test_cuda_emulated.py rewrites the source).
inline void emulated_launch(unsigned int grid, unsigned int threads, int, cudaStream_t,
                            const std::function<void()>& kernel) {
  if (grid == 0 || threads == 0 || threads > 1024 || threads % 32)
    throw std::runtime_error("emulated CUDA: invalid launch configuration (grid " + std::to_string(grid) +
                             ", block " + std::to_string(threads) + ")");
  auto& b = emulation::block();
  while (b.fibers.size() < threads) {
    b.fibers.emplace_back();
    b.fibers.back().stack.reset(new char[emulation::kStackBytes]);
  }
  b.kernel = &kernel;
  gridDim.x = grid;
  blockDim.x = threads;
  for (unsigned int i = 0; i < grid; ++i) {
    blockIdx.x = i;
    emulation::run_block(threads);
  }
}
