// Fibers for the emulator: each GPU thread of a block runs on a stack of its own, and control
// passes between them only where the thread waits (a barrier, a warp shuffle) or ends. On x86-64
// the switch is a few instructions of our own (callee-saved registers, the SSE and x87 control
// words, the stack pointer): no system call, unlike swapcontext, which saves the signal mask.
// Elsewhere, or with WL_EMU_UCONTEXT defined, ucontext does the same job. Under AddressSanitizer
// every switch is announced to it (__sanitizer_start/finish_switch_fiber) so it tracks the stack
// in use.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#define WL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define WL_EMU_ASAN 1
#endif
#endif
#ifdef WL_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) && !defined(WL_EMU_UCONTEXT)
#define WL_EMU_UCONTEXT 1
#endif
#ifdef WL_EMU_UCONTEXT
#include <ucontext.h>
#endif

namespace wl_emu {

// A fiber's stack: mmap'ed, with an inaccessible guard page below it so that an overflow faults
// instead of writing into a neighbour. Sized for the kernels' frames (larger under ASan, whose
// red zones grow every frame).
struct Stack {
#ifdef WL_EMU_ASAN
  static constexpr size_t kBytes = size_t(512) << 10;
#else
  static constexpr size_t kBytes = size_t(128) << 10;
#endif
  char* base = nullptr;  // lowest usable address
  size_t size = 0;

  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);
    base = static_cast<char*>(p) + page;
    size = kBytes;
  }
  ~Stack() {
    if (base) munmap(base - sysconf(_SC_PAGESIZE), size + sysconf(_SC_PAGESIZE));
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return base + size; }
};

#ifndef WL_EMU_UCONTEXT
// wl_emu_swap(save, to): pushes the callee-saved registers and the control words, stores the
// stack pointer in *save, loads `to` and pops what was pushed there. A new fiber's stack is laid
// out as if it had called wl_emu_swap, with wl_emu_start as the return address; wl_emu_start calls
// r13(r12), which never returns. One comdat copy per process, as for an inline function.
asm(R"(
  .pushsection .text.wl_emu_swap,"axG",@progbits,wl_emu_swap,comdat
  .globl wl_emu_swap
  .hidden wl_emu_swap
  .type wl_emu_swap,@function
wl_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size wl_emu_swap, .-wl_emu_swap
  .popsection
  .pushsection .text.wl_emu_start,"axG",@progbits,wl_emu_start,comdat
  .globl wl_emu_start
  .hidden wl_emu_start
  .type wl_emu_start,@function
wl_emu_start:
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%r13
  ud2
  .size wl_emu_start, .-wl_emu_start
  .popsection
)");
extern "C" void wl_emu_swap(void** save, void* to);
extern "C" void wl_emu_start();
#endif

// One execution context: the scheduler's (made by the first switch out of it) or a fiber's.
class Context {
 public:
  using Entry = void (*)(void*);

  // Makes this context start entry(arg) on `stack` when first switched to.
  void prepare(Stack& stack, Entry entry, void* arg) {
    stack_base_ = stack.base;
    stack_size_ = stack.size;
#ifdef WL_EMU_ASAN
    // a fiber abandoned mid-way (a device assert) leaves its frames' red zones behind
    ASAN_UNPOISON_MEMORY_REGION(stack.base, stack.size);
#endif
#ifdef WL_EMU_UCONTEXT
    getcontext(&uc_);
    uc_.uc_stack.ss_sp = stack.base;
    uc_.uc_stack.ss_size = stack.size;
    uc_.uc_link = nullptr;
    const auto bits = reinterpret_cast<uintptr_t>(arg);
    const auto fn = reinterpret_cast<uintptr_t>(entry);
    makecontext(&uc_, reinterpret_cast<void (*)()>(&trampoline), 4,
                static_cast<unsigned>(fn >> 32), static_cast<unsigned>(fn),
                static_cast<unsigned>(bits >> 32), static_cast<unsigned>(bits));
#else
    // the frame wl_emu_swap pops: control words, r15, r14, r13 (entry), r12 (arg), rbx, rbp,
    // return address (wl_emu_start)
    auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15));
    *--sp = 0;  // keeps the frame 16-byte aligned
    *--sp = reinterpret_cast<uint64_t>(&wl_emu_start);
    *--sp = 0;                                   // rbp
    *--sp = 0;                                   // rbx
    *--sp = reinterpret_cast<uint64_t>(arg);     // r12
    *--sp = reinterpret_cast<uint64_t>(entry);   // r13
    *--sp = 0;                                   // r14
    *--sp = 0;                                   // r15
    uint32_t words[2];                           // the current SSE and x87 control words
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(words[0]), "=m"(words[1]));
    *--sp = uint64_t(words[0]) | uint64_t(words[1]) << 32;
    sp_ = sp;
#endif
  }

  // Leaves `from` (which resumes here later) for `to`. `from_done`: `from` never resumes.
  static void swap(Context& from, Context& to, bool from_done = false) {
#ifdef WL_EMU_ASAN
    void* fake = nullptr;
    const bool to_main = to.stack_base_ == nullptr;
    __sanitizer_start_switch_fiber(from_done ? nullptr : &fake,
                                   to_main ? main_stack().base : to.stack_base_,
                                   to_main ? main_stack().size : to.stack_size_);
#else
    (void)from_done;
#endif
#ifdef WL_EMU_UCONTEXT
    swapcontext(&from.uc_, &to.uc_);
#else
    wl_emu_swap(&from.sp_, to.sp_);
#endif
#ifdef WL_EMU_ASAN
    arrived(from.stack_base_ != nullptr, fake);
#endif
  }

  // The first thing a fiber's entry does.
  static void started() {
#ifdef WL_EMU_ASAN
    arrived(true, nullptr);
#endif
  }

 private:
#ifdef WL_EMU_ASAN
  struct Bounds {
    const void* base = nullptr;
    size_t size = 0;
  };
  // The scheduler's stack (the OS thread's): learnt when a fiber is first entered from it.
  static Bounds& main_stack() {
    static thread_local Bounds b;
    return b;
  }
  // In a fiber, every switch comes from the scheduler: ASan reports the stack it left.
  static void arrived(bool in_fiber, void* fake) {
    Bounds left;
    __sanitizer_finish_switch_fiber(fake, &left.base, &left.size);
    if (in_fiber) main_stack() = left;
  }
#endif

#ifdef WL_EMU_UCONTEXT
  static void trampoline(unsigned f_hi, unsigned f_lo, unsigned a_hi, unsigned a_lo) {
    const auto fn = reinterpret_cast<Entry>((uintptr_t(f_hi) << 32) | f_lo);
    fn(reinterpret_cast<void*>((uintptr_t(a_hi) << 32) | a_lo));
    std::abort();  // entries never return
  }
  ucontext_t uc_{};
#else
  void* sp_ = nullptr;
#endif
  // the stack this context runs on: a fiber's; null for the scheduler, whose own stack ASan
  // already knows
  void* stack_base_ = nullptr;
  size_t stack_size_ = 0;
};

}  // namespace wl_emu
