// One thread block of an emulated launch: its threads run as fibers on the calling OS thread,
// each until it waits (at __syncthreads or a warp shuffle) or ends; when all of them wait, the
// waits are settled: a warp's shuffle completes once every lane its mask names has reached it,
// a barrier once every thread of the block has. Whatever a GPU would punish or hide fails the
// launch with a message naming the kernel, the block and the threads: threads at different
// barriers, a barrier some threads exited before, a shuffle whose mask names a lane that exited
// or waits elsewhere, lanes that disagree on the mask, a device assert.
#pragma once

#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fiber.h"

namespace wl_emu {

constexpr int kWarpSize = 32;

// Where a thread waits: the source line of the __syncthreads or shuffle call.
struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const {
    const char* base = std::strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
  }
};

enum class Shfl { kIdx, kUp, kDown, kXor };

struct Thread {
  enum State { kRunnable, kBarrier, kShuffle, kDone };
  Context ctx;
  uint3 idx{};
  unsigned linear = 0;
  State state = kRunnable;
  Site site;
  // the shuffle it waits at: mask, kind, lane argument, width, its value and then the result
  unsigned mask = 0;
  Shfl kind = Shfl::kIdx;
  int arg = 0, width = kWarpSize;
  uint64_t value = 0, result = 0;
};

inline std::string str(const uint3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

// What the block's threads run, and where a failure is reported.
struct Kernel {
  const char* name;
  void (*invoke)(const void* args);  // the kernel body on the launch's arguments
  const void* args;
};

class Block {
 public:
  // Runs block `idx` of `grid` blocks of `dim` threads to completion. Returns "" or what failed.
  std::string run(const Kernel& k, const dim3& grid, const dim3& dim, const uint3& idx,
                  bool reverse_passes);

  // For the device functions: the running block and thread.
  static Block* current() { return current_; }
  Thread& thread() { return *running_; }
  const dim3& grid() const { return grid_; }
  const dim3& dim() const { return dim_; }
  const uint3& idx() const { return idx_; }

  // The running thread waits (a barrier or shuffle, its fields set) until settle() frees it.
  void wait() { Context::swap(running_->ctx, scheduler_); }
  // Why the launch fails (the first reason given wins); the thread then exit()s.
  void set_failure(std::string why) {
    if (failure_.empty()) failure_ = std::move(why);
  }
  // The running thread stops for good: it returned, or failed. Nothing that owns memory may be
  // alive on its stack, which is abandoned.
  [[noreturn]] void exit() {
    running_->state = Thread::kDone;
    Context::swap(running_->ctx, scheduler_, /*from_done=*/true);
    __builtin_unreachable();
  }
  std::string where(const Thread& t) const {
    return std::string(kernel_->name) + " block " + str(idx_) + " thread " + str(t.idx);
  }

 private:
  static void entry(void* self);
  std::string settle();
  std::string settle_warp(unsigned first, unsigned count, bool& released);

  static inline thread_local Block* current_ = nullptr;
  Context scheduler_;
  std::vector<std::unique_ptr<Stack>> stacks_;
  std::vector<Thread> threads_;
  Thread* running_ = nullptr;
  const Kernel* kernel_ = nullptr;
  dim3 grid_, dim_;
  uint3 idx_{};
  std::string failure_;
};

inline void Block::entry(void* self) {
  Context::started();
  auto* b = static_cast<Block*>(self);
  b->kernel_->invoke(b->kernel_->args);
  b->exit();
}

inline std::string Block::run(const Kernel& k, const dim3& grid, const dim3& dim,
                              const uint3& idx, bool reverse_passes) {
  const unsigned n = dim.x * dim.y * dim.z;
  while (stacks_.size() < n) stacks_.push_back(std::make_unique<Stack>());
  threads_.assign(n, Thread{});
  kernel_ = &k;
  grid_ = grid;
  dim_ = dim;
  idx_ = idx;
  failure_.clear();
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = threads_[i];
    t.linear = i;
    t.idx = uint3{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
    t.ctx.prepare(*stacks_[i], &Block::entry, this);
  }
  Block* outer = current_;
  current_ = this;
  unsigned pass = 0;
  std::string failed;
  for (;;) {
    // every runnable thread runs until it waits or ends; the order alternates between passes
    // when asked, so that a kernel relying on the order of threads between barriers shows it
    const bool down = reverse_passes && (pass++ & 1);
    for (unsigned j = 0; j < n && failure_.empty(); ++j) {
      Thread& t = threads_[down ? n - 1 - j : j];
      if (t.state != Thread::kRunnable) continue;
      running_ = &t;
      Context::swap(scheduler_, t.ctx);
    }
    running_ = nullptr;
    if (!failure_.empty()) {
      failed = failure_;
      break;
    }
    bool alive = false;
    for (const Thread& t : threads_) alive = alive || t.state != Thread::kDone;
    if (!alive) break;
    failed = settle();
    if (!failed.empty()) break;
  }
  current_ = outer;
  return failed;
}

// Every live thread waits. Completes the shuffles whose lanes have all arrived; failing that, the
// block's barrier; failing that, reports why nothing can go on.
inline std::string Block::settle() {
  const unsigned n = static_cast<unsigned>(threads_.size());
  bool released = false;
  for (unsigned w = 0; w < n; w += kWarpSize) {
    const unsigned count = n - w < kWarpSize ? n - w : kWarpSize;
    std::string err = settle_warp(w, count, released);
    if (!err.empty()) return err;
  }
  if (released) return "";
  const Thread* first = nullptr;
  for (const Thread& t : threads_) {
    if (t.state == Thread::kBarrier && first == nullptr) first = &t;
  }
  // no shuffle could complete, so every live thread waits at a barrier
  for (const Thread& t : threads_) {
    if (t.state == Thread::kDone) {
      return where(t) + " exited while thread " + str(first->idx) +
             " waits at __syncthreads() at " + first->site.str() +
             ": a barrier must be reached by every thread of the block";
    }
    if (!(t.site == first->site)) {
      return "barrier divergence in " + std::string(kernel_->name) + " block " + str(idx_) +
             ": thread " + str(first->idx) + " waits at __syncthreads() at " +
             first->site.str() + ", thread " + str(t.idx) + " at " + t.site.str();
    }
  }
  for (Thread& t : threads_) t.state = Thread::kRunnable;
  return "";
}

inline std::string Block::settle_warp(unsigned first, unsigned count, bool& released) {
  Thread* lanes = &threads_[first];
  int leader = -1;
  for (unsigned l = 0; l < count; ++l) {
    if (lanes[l].state == Thread::kShuffle) {
      leader = static_cast<int>(l);
      break;
    }
  }
  if (leader < 0) return "";
  const Thread& a = lanes[leader];
  const std::string op = "shuffle at " + a.site.str();
  for (unsigned l = 0; l < count; ++l) {
    const Thread& t = lanes[l];
    const bool named = (a.mask >> l) & 1u;
    if (t.state == Thread::kShuffle) {
      if (t.mask != a.mask || !(t.site == a.site)) {
        return where(t) + " (lane " + std::to_string(l) + ") waits at shuffle at " + t.site.str() +
               " with mask " + std::to_string(t.mask) + " while lane " + std::to_string(leader) +
               " waits at " + a.site.str() + " with mask " + std::to_string(a.mask);
      }
      if (!named) {
        return where(t) + ": shuffle at " + t.site.str() + " with a mask that leaves out the lane itself";
      }
    } else if (named) {
      return where(t) + " (lane " + std::to_string(l) + ") is named in the mask of the " + op +
             " but " +
             (t.state == Thread::kDone ? std::string("has exited")
                                       : "waits at __syncthreads() at " + t.site.str());
    }
  }
  for (unsigned l = count; l < static_cast<unsigned>(kWarpSize); ++l) {
    if ((a.mask >> l) & 1u) {
      return where(a) + ": the mask of the " + op + " names lane " + std::to_string(l) +
             ", but the warp has only " + std::to_string(count) + " threads";
    }
  }
  for (unsigned l = 0; l < count; ++l) {
    Thread& t = lanes[l];
    if (t.state != Thread::kShuffle) continue;
    const int w = t.width;
    const int seg = static_cast<int>(l) & ~(w - 1), in = static_cast<int>(l) - seg;
    int src = static_cast<int>(l);
    switch (t.kind) {
      case Shfl::kIdx: src = seg + ((t.arg % w) + w) % w; break;
      case Shfl::kUp: src = in - t.arg >= 0 ? static_cast<int>(l) - t.arg : static_cast<int>(l); break;
      case Shfl::kDown: src = in + t.arg < w ? static_cast<int>(l) + t.arg : static_cast<int>(l); break;
      case Shfl::kXor: {
        const int x = static_cast<int>(l) ^ t.arg;
        src = x >= seg + w ? static_cast<int>(l) : x;
        break;
      }
    }
    if (src < 0 || src >= static_cast<int>(count) || !((a.mask >> src) & 1u)) {
      return where(t) + ": the " + op + " reads lane " + std::to_string(src) +
             ", which is not in its mask";
    }
    t.result = lanes[src].value;
  }
  for (unsigned l = 0; l < count; ++l) {
    if (lanes[l].state == Thread::kShuffle) lanes[l].state = Thread::kRunnable;
  }
  released = true;
  return "";
}

}  // namespace wl_emu
