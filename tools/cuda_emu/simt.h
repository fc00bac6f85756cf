// A CPU emulation of the CUDA execution model, so that csrc/cuda/kernels.cu
// compiles as host C++ (g++ -x c++) and its kernels run in CI under ASan,
// UBSan and TSan, on a machine without a GPU.
//
// - Each CUDA thread of a block is a fiber (ucontext) with its own stack,
//   run until it waits at a barrier or exits; blocks run one after another.
//   TSan sees each fiber as a thread (its fiber API) and ASan follows the
//   stack switches. Switches order no memory for TSan: only barriers do.
// - __syncthreads and __syncwarp are barriers that exited threads leave (as
//   on sm_70 and later). A __syncthreads reached from two places in one
//   round is an error, and so is a barrier that a live thread never reaches
//   (a deadlock: found when no fiber can run, not by a timeout).
// - __shfl_xor_sync goes through a per-warp exchange; a mask other than the
//   whole warp, an exited lane, or lanes at different shuffles is an error.
//   Under TSan the exchange creates no happens-before, since a hardware
//   shuffle does not order memory: a missing __syncwarp stays visible.
// - static __shared__ is static storage (blocks never overlap); the dynamic
//   shared memory is a heap block of exactly the launch's size, filled with
//   a nan pattern; more than 48 KB of it without the cudaFuncSetAttribute
//   opt-in is a launch error, as on the GPU.
// - The runtime subset the launchers use, over emulated devices (H100's
//   attributes unless configured), and fp16/bf16 rounding to nearest even.
// What it cannot show: races between blocks, timing, the GPU memory model,
// bank conflicts, occupancy and code generation (docs/cuda-emulation.md).
// Its types are in types.h, its runtime subset in runtime.h.
#pragma once
#include <math.h>  // the float overloads of exp, log, ... in the global namespace
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#include "runtime.h"
#include "types.h"

namespace fsce::emu {

// ---- sanitizer hooks: fibers and the happens-before TSan sees --------------

#if defined(__SANITIZE_THREAD__)
extern "C" void* __tsan_get_current_fiber();
extern "C" void* __tsan_create_fiber(unsigned flags);
extern "C" void __tsan_switch_to_fiber(void* fiber, unsigned flags);
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
extern "C" void AnnotateIgnoreReadsBegin(const char*, int);
extern "C" void AnnotateIgnoreReadsEnd(const char*, int);
extern "C" void AnnotateIgnoreWritesBegin(const char*, int);
extern "C" void AnnotateIgnoreWritesEnd(const char*, int);
inline void* tsan_current_fiber() { return __tsan_get_current_fiber(); }
inline void* tsan_create_fiber() { return __tsan_create_fiber(0); }
// Switches create no happens-before (flag 1): only barriers do, below.
inline void tsan_switch(void* f) { __tsan_switch_to_fiber(f, 1); }
inline void tsan_acquire(void* a) { __tsan_acquire(a); }
inline void tsan_release(void* a) { __tsan_release(a); }
// While alive, TSan does not see this fiber's memory accesses: the
// emulation's own bookkeeping (and the shuffle exchange) is invisible to it.
struct Internal {
  Internal() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Internal() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
};
#else
inline void* tsan_current_fiber() { return nullptr; }
inline void* tsan_create_fiber() { return nullptr; }
inline void tsan_switch(void*) {}
inline void tsan_acquire(void*) {}
inline void tsan_release(void*) {}
struct Internal {
  Internal() {}  // user-provided: no unused-variable warning
};
#endif

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
inline void asan_start_switch(void** save, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(save, bottom, size);
}
inline void asan_finish_switch(void* save, const void** bottom_old = nullptr, size_t* size_old = nullptr) {
  __sanitizer_finish_switch_fiber(save, bottom_old, size_old);
}
#else
inline void asan_start_switch(void**, const void*, size_t) {}
inline void asan_finish_switch(void*, const void** = nullptr, size_t* = nullptr) {}
#endif

// Where a thread called a barrier or a shuffle.
struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator!=(const Site& o) const { return line != o.line || std::strcmp(file, o.file) != 0; }
};

// One CUDA thread: a fiber with its own stack, run by the launch's scheduler
// until it waits at a barrier or exits.
struct Fiber {
  enum State { kReady, kWaiting, kDone };
  ucontext_t context;
  void* stack = nullptr;
  void* tsan = nullptr;
  void* asan_fake_stack = nullptr;
  uint3 index{0, 0, 0};
  State state = kReady;
};

// A barrier of `live` fibers that exited fibers leave. same_site: every
// fiber of a round must come from one place (__syncthreads, shuffles).
struct Barrier {
  int live = 0, arrived = 0;
  uint64_t round = 0;
  Site site;
  std::vector<Fiber*> waiting;
};

// One warp's shuffle exchange: two slot sets used alternately, since a lane
// can only reach the next shuffle once every lane has arrived at this one.
struct Exchange {
  Barrier barrier;
  uint64_t slot[2][32];
};

constexpr size_t kStackBytes = 256 * 1024;

// Fiber t of every launch runs on stack t (and is TSan's fiber t): mapped
// once per process, since mapping (and ASan's shadow of) 256 stacks per
// launch would cost more than the kernels.
inline std::vector<Fiber>& fiber_pool(int threads) {
  static std::vector<Fiber> pool;
  while (static_cast<int>(pool.size()) < threads) {
    Fiber f;
    f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (f.stack == MAP_FAILED) fail("cannot map a fiber stack");
    f.tsan = tsan_create_fiber();
    pool.push_back(f);
  }
  return pool;
}

// One launch: a fiber per thread of a block, blocks one after another, and
// the per-block barriers and dynamic shared memory.
class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body)
      : grid_(grid), block_(block), smem_(smem), body_(std::move(body)) {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    fibers_ = std::vector<Fiber>(threads);
    warp_sync_ = std::vector<Barrier>((threads + 31) / 32);
    exchange_ = std::vector<Exchange>((threads + 31) / 32);
    std::vector<Fiber>& pool = fiber_pool(threads);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      f.index = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      f.stack = pool[t].stack;
      f.tsan = pool[t].tsan;
    }
    main_tsan_ = tsan_current_fiber();
  }

  void run() {
    const Internal internal;  // the scheduler's bookkeeping (threadIdx included)
    Launch*& outer = current();
    Launch* const saved = outer;
    outer = this;
    blockDim = block_;
    gridDim = grid_;
    for (unsigned z = 0; z < grid_.z; ++z)
      for (unsigned y = 0; y < grid_.y; ++y)
        for (unsigned x = 0; x < grid_.x; ++x) run_block({x, y, z});
    outer = saved;
  }

  static Launch*& current() {
    static thread_local Launch* launch = nullptr;
    return launch;
  }

  void* dynamic_shared() const { return shared_; }

  // The emulation's calls from a kernel: their bookkeeping is Internal.
  void syncthreads(Site site) {
    const Internal internal;
    wait(block_sync_, "__syncthreads", site, true, true);
  }

  void syncwarp(unsigned mask, Site site) {
    const Internal internal;
    check_mask(mask, "__syncwarp", site);
    wait(warp_sync_[running_ / 32], "__syncwarp", site, false, true);
  }

  uint64_t shuffle(unsigned mask, uint64_t value, int src_lane, Site site) {
    const Internal internal;
    check_mask(mask, "__shfl_xor_sync", site);
    Exchange& ex = exchange_[running_ / 32];
    if (ex.barrier.live != 32)
      fail("__shfl_xor_sync at %s:%d names lanes that exited or do not exist", site.file, site.line);
    const uint64_t round = ex.barrier.round;
    ex.slot[round & 1][running_ % 32] = value;
    // A hardware shuffle orders no memory: no happens-before for TSan.
    wait(ex.barrier, "__shfl_xor_sync", site, true, false);
    return ex.slot[round & 1][src_lane];
  }

 private:
  static void check_mask(unsigned mask, const char* what, Site site) {
    if (mask != 0xffffffffu)
      fail("%s at %s:%d: the emulation takes whole-warp masks only, got %#x", what, site.file, site.line, mask);
  }

  // The running fiber arrives at b and waits for its round; `orders`: the
  // barrier orders memory (TSan: each arrival releases, each departure acquires).
  void wait(Barrier& b, const char* what, Site site, bool same_site, bool orders) {
    if (orders) tsan_release(&b);
    if (b.arrived == 0) {
      b.site = site;
    } else if (same_site && b.site != site) {
      fail("%s reached from %s:%d and from %s:%d in one round (divergent)", what, b.site.file, b.site.line,
           site.file, site.line);
    }
    if (++b.arrived == b.live) {
      release(b);
    } else {
      Fiber& self = fibers_[running_];
      self.state = Fiber::kWaiting;
      b.waiting.push_back(&self);
      to_scheduler(self);
    }
    if (orders) tsan_acquire(&b);
  }

  static void release(Barrier& b) {
    for (Fiber* f : b.waiting) f->state = Fiber::kReady;
    b.waiting.clear();
    b.arrived = 0;
    ++b.round;
  }

  // An exited fiber leaves its barriers; a shuffle must not be left waiting.
  void leave(int t) {
    for (Barrier* b : {&block_sync_, &warp_sync_[t / 32]}) {
      --b->live;
      if (b->arrived > 0 && b->arrived == b->live) release(*b);
    }
    Barrier& ex = exchange_[t / 32].barrier;
    --ex.live;
    if (ex.arrived > 0)
      fail("a lane exited while %d others wait at the shuffle at %s:%d", ex.arrived, ex.site.file, ex.site.line);
  }

  void run_block(uint3 index) {
    blockIdx = index;
    // Exactly the launch's size, so that ASan sees any access past it; the
    // nan pattern stands for the garbage a GPU leaves there.
    shared_ = std::malloc(smem_ > 0 ? smem_ : 1);
    std::memset(shared_, 0xff, smem_ > 0 ? smem_ : 1);
    const int threads = static_cast<int>(fibers_.size());
    block_sync_ = Barrier{threads};
    for (size_t w = 0; w < warp_sync_.size(); ++w) {
      const int lanes = std::min(32, threads - 32 * static_cast<int>(w));
      warp_sync_[w] = Barrier{lanes};
      exchange_[w].barrier = Barrier{lanes};
    }
    for (Fiber& f : fibers_) {
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &Launch::entry, 0);
      f.state = Fiber::kReady;
    }
    tsan_release(&block_order_);  // the host's writes (and the last block's) come first
    for (size_t next = 0;;) {
      size_t k = 0;
      while (k < fibers_.size() && fibers_[(next + k) % fibers_.size()].state != Fiber::kReady) ++k;
      if (k == fibers_.size()) break;
      running_ = static_cast<int>((next + k) % fibers_.size());
      next = running_ + 1;
      Fiber& f = fibers_[running_];
      threadIdx = f.index;
      void* fake_stack = nullptr;
      asan_start_switch(&fake_stack, f.stack, kStackBytes);
      tsan_switch(f.tsan);
      swapcontext(&scheduler_, &f.context);
      asan_finish_switch(fake_stack);
    }
    for (size_t t = 0; t < fibers_.size(); ++t) {
      if (fibers_[t].state == Fiber::kDone) continue;
      const Barrier& b = fibers_[t].state == Fiber::kWaiting ? find_wait(static_cast<int>(t)) : block_sync_;
      running_ = static_cast<int>(t);
      threadIdx = fibers_[t].index;
      fail("deadlock: this thread waits at %s:%d, which the other live threads never reach", b.site.file,
           b.site.line);
    }
    tsan_acquire(&block_order_);
    std::free(shared_);
    shared_ = nullptr;
  }

  const Barrier& find_wait(int t) const {
    for (const Barrier* b : {&block_sync_, &warp_sync_[t / 32], &exchange_[t / 32].barrier})
      for (const Fiber* f : b->waiting)
        if (f == &fibers_[t]) return *b;
    return block_sync_;
  }

  void to_scheduler(Fiber& self) {
    asan_start_switch(&self.asan_fake_stack, main_stack_, main_stack_size_);
    tsan_switch(main_tsan_);
    swapcontext(&self.context, &scheduler_);
    asan_finish_switch(self.asan_fake_stack);
  }

  static void entry() {
    Launch* l;
    {
      const Internal internal;
      l = current();
      asan_finish_switch(nullptr, &l->main_stack_, &l->main_stack_size_);  // ASan: the stack we left
    }
    tsan_acquire(&l->block_order_);
    l->body_();
    void* main_tsan;
    const void* main_stack;
    size_t main_stack_size;
    {
      const Internal internal;
      l->leave(l->running_);
      l->fibers_[l->running_].state = Fiber::kDone;
      main_tsan = l->main_tsan_, main_stack = l->main_stack_, main_stack_size = l->main_stack_size_;
    }
    tsan_release(&l->block_order_);  // after this fiber's last read of the launch
    // This fiber ends (its context is made anew for the next block): nullptr
    // tells ASan that its stack is gone.
    asan_start_switch(nullptr, main_stack, main_stack_size);
    tsan_switch(main_tsan);
    setcontext(&l->scheduler_);
  }

  dim3 grid_, block_;
  size_t smem_;
  std::function<void()> body_;
  std::vector<Fiber> fibers_;
  Barrier block_sync_;
  std::vector<Barrier> warp_sync_;
  std::vector<Exchange> exchange_;
  void* shared_ = nullptr;
  ucontext_t scheduler_;
  void* main_tsan_ = nullptr;
  const void* main_stack_ = nullptr;
  size_t main_stack_size_ = 0;
  int running_ = 0;
  char block_order_ = 0;  // the address TSan orders blocks by
};

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(Launch::current()->dynamic_shared());
}

// kernel<<<grid, block, smem, stream>>>(args...): FSCE_LAUNCH builds one,
// and its call runs the kernel to completion (streams are synchronous here).
template <typename Kernel>
class Launcher {
 public:
  Launcher(const char* name, Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t)
      : name_(name), kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    const uint64_t threads = uint64_t(block_.x) * block_.y * block_.z;
    if (threads == 0 || threads > 1024 || grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.x > 0x7fffffffu ||
        grid_.y > 65535 || grid_.z > 65535) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem_ > static_cast<size_t>(dynamic_smem_limit(reinterpret_cast<const void*>(kernel_)))) {
      last_error = cudaErrorInvalidValue;  // too much dynamic shared memory without the opt-in
      return;
    }
    count_launch();
    // Each thread calls the kernel with its own copy of the arguments.
    const auto packed = std::make_tuple(std::decay_t<Args>(std::forward<Args>(args))...);
    Launch launch(grid_, block_, smem_, [&] {
      auto copy = packed;
      std::apply(kernel_, copy);
    });
    launch.run();
  }

 private:
  void count_launch() const {
    // "(rows_kernel<T, 32, ...>)" or "kernel": the family is the first name.
    std::string family(name_);
    family.erase(0, family.find_first_not_of("( "));
    family = family.substr(0, family.find_first_of("<) "));
    Runtime& rt = runtime();
    std::lock_guard<std::mutex> lock(rt.m);
    ++rt.launches[family];
  }
  const char* name_;
  Kernel kernel_;
  dim3 grid_, block_;
  size_t smem_;
};

template <typename Kernel>
Launcher(const char*, Kernel, dim3, dim3, size_t, cudaStream_t) -> Launcher<Kernel>;

template <typename V>
V shuffle_xor(unsigned mask, V value, int lane_mask, int width, Site site) {
  static_assert(sizeof(V) <= 8, "shuffles move up to 8 bytes");
  if (width != 32) fail("__shfl_xor_sync at %s:%d: the emulation takes width 32 only", site.file, site.line);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  const int lane = static_cast<int>(threadIdx.x % 32);
  bits = Launch::current()->shuffle(mask, bits, (lane ^ lane_mask) & 31, site);
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}

}  // namespace fsce::emu

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  fsce::emu::Launch::current()->syncthreads({file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  fsce::emu::Launch::current()->syncwarp(mask, {file, line});
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return fsce::emu::shuffle_xor(mask, value, lane_mask, width, {file, line});
}
