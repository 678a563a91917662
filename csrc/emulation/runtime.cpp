// The emulation runtime: runs a kernel launch on the host, every CUDA thread of a block as a fiber
// (a stack of its own and a hand-written x86-64 context switch), blocks one after another, and checks
// what the GPU would not forgive (see cuda_emulation.h). A thread runs until it reaches a barrier or a
// warp collective, or exits; the scheduler then runs the next runnable thread in the chosen order
// (forward, reversed, or a fresh random permutation on every pass), so a kernel that relies on an
// order it does not enforce computes something else under one of the orders.
//
// Errors (a divergent barrier or collective, a shared-memory race, a misaligned vector access, shared
// memory over the limit) end the launch: the remaining fibers are abandoned, the launch returns
// cudaErrorLaunchFailure and last_error_message() says what happened, naming the kernel, the block,
// the thread and the source lines. A memory fault (a guard page behind every buffer, or a fiber's
// stack overflow) is reported by a signal handler with the same context, and the process exits.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_emulation.h"

extern "C" void loracuda_emu_switch(void** save_sp, void* new_sp);

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, and resumes the context whose stack pointer is new_sp (System V x86-64).
asm(R"(
.text
.globl loracuda_emu_switch
.type loracuda_emu_switch,@function
loracuda_emu_switch:
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
.size loracuda_emu_switch, .-loracuda_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace loracuda_emu {

uint3 thread_idx{0, 0, 0};
uint3 block_idx{0, 0, 0};
dim3 block_dim;
dim3 grid_dim;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = 256 * 1024;          // per fiber; the kernels' register arrays need a few KiB
constexpr size_t kStaticSharedLimit = 48 * 1024;    // static __shared__ per block (every sm_80 / sm_90 part)
constexpr size_t kArenaBytes = 227 * 1024;          // sm_90's opt-in limit: the arena can hold any request
constexpr int kMaxThreads = 1024;
constexpr int kCollectiveBytes = 64;
constexpr int kCollectiveBuffers = 4;

enum class State { kRunnable, kAtBarrier, kAtWarp, kDone };

struct Thread {
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // the mapping: one no-access page, then kStackBytes
  State state = State::kRunnable;
  uint3 idx{0, 0, 0};
  Site wait_site{nullptr, 0};
  const char* wait_what = nullptr;
  int shared_decls = 0;            // LORACUDA_SHARED declarations this thread has passed
  int barrier_result = 0;          // __syncthreads_and's answer
  int result_buffer = -1;          // the warp buffer of this lane's last collective (not yet released)
};

struct Warp {
  bool active = false;             // a collective is gathering
  Site site{nullptr, 0};
  const char* what = nullptr;
  unsigned mask = 0, arrived = 0;
  int buffer = 0;
  int pending[kCollectiveBuffers] = {0, 0, 0, 0};  // lanes that have not yet read each buffer
  alignas(16) unsigned char data[kCollectiveBuffers][32 * kCollectiveBytes];
};

struct SharedDecl {
  const char* name;
  Site site;
  size_t offset, bytes;
};

// Per 4-byte word of shared memory: who last wrote / read it in the current barrier interval.
struct Shadow {
  uint32_t write_epoch, read_epoch;
  int32_t writer, reader;  // linear thread index; reader -2: several threads
  Site write_site, read_site;
};

struct Schedule {
  int block_order = 0, thread_order = 0;  // 0 forward, 1 reversed, 2 random
  uint64_t seed = 1;
};

struct Launch {
  const char* name = "";
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  int nthreads = 0;
  int live = 0;
  int current = -1;
  Site barrier_site{nullptr, 0};
  int barrier_arrived = 0;
  int barrier_and = 1;
  uint32_t epoch = 1;
  size_t shared_used = 0;
  std::vector<SharedDecl> decls;
  bool failed = false;
};

Schedule g_schedule;
Launch g_launch;
std::vector<Thread> g_threads;
std::vector<Warp> g_warps;
void* g_scheduler_sp = nullptr;
unsigned char* g_arena = nullptr;
std::vector<Shadow> g_shadow;
std::string g_message;
cudaError_t g_sticky = cudaSuccess;
bool g_in_kernel = false;
bool g_handler_installed = false;
std::mt19937_64 g_rng;

const char* base_name(const char* file) {
  if (file == nullptr) return "?";
  const char* slash = std::strrchr(file, '/');
  return slash ? slash + 1 : file;
}

std::string site_text(Site s) { return std::string(base_name(s.file)) + ":" + std::to_string(s.line); }

std::string where_text() {
  char buf[160];
  const Thread* t = g_launch.current >= 0 ? &g_threads[g_launch.current] : nullptr;
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u), thread %u", block_idx.x, block_idx.y, block_idx.z,
                t ? t->idx.x : 0u);
  return buf;
}

Thread& me() { return g_threads[g_launch.current]; }
int my_index() { return g_launch.current; }

void yield_to_scheduler() { loracuda_emu_switch(&me().sp, g_scheduler_sp); }

[[noreturn]] void fail(const std::string& what) {
  if (!g_launch.failed) {
    g_launch.failed = true;
    g_message = std::string("emulated kernel ") + g_launch.name + ", " + where_text() + ": " + what;
  }
  // Back to the scheduler for good: this fiber is never resumed.
  for (;;) yield_to_scheduler();
}

void fiber_entry() {
  g_launch.body(g_launch.context);
  Thread& t = me();
  if (t.result_buffer >= 0) g_warps[t.idx.x / 32].pending[t.result_buffer]--;
  t.result_buffer = -1;
  t.state = State::kDone;
  g_launch.live--;
  // A warp collective whose mask names this lane can no longer complete.
  Warp& w = g_warps[t.idx.x / 32];
  if (w.active && ((w.mask >> (t.idx.x & 31)) & 1u) && !((w.arrived >> (t.idx.x & 31)) & 1u)) {
    fail("lane " + std::to_string(t.idx.x & 31) + " exited while the lanes of its mask wait at " + w.what + " (" +
         site_text(w.site) + ")");
  }
  // A barrier that every other live thread has reached releases now.
  if (g_launch.barrier_arrived > 0 && g_launch.barrier_arrived == g_launch.live) {
    for (Thread& o : g_threads) {
      if (o.state == State::kAtBarrier) {
        o.state = State::kRunnable;
        o.barrier_result = g_launch.barrier_and;
      }
    }
    g_launch.barrier_arrived = 0;
    g_launch.barrier_site = Site{nullptr, 0};
    g_launch.epoch++;
  }
  for (;;) yield_to_scheduler();
}

void prepare_fiber(Thread& t) {
  if (t.stack == nullptr) {
    void* mem = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "emulation: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, kPage, PROT_NONE);  // an overflow faults instead of corrupting the next stack
    t.stack = static_cast<unsigned char*>(mem);
  }
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack + kPage + kStackBytes) & ~uintptr_t(15);
  uintptr_t* slot = reinterpret_cast<uintptr_t*>(top - 16);  // 16-aligned: fiber_entry starts as if called
  slot[0] = reinterpret_cast<uintptr_t>(&fiber_entry);
  uintptr_t* regs = slot - 6;  // r15 r14 r13 r12 rbx rbp
  for (int i = 0; i < 6; ++i) regs[i] = 0;
  uint32_t* control = reinterpret_cast<uint32_t*>(regs - 1);
  control[0] = 0x1F80u;  // MXCSR: round to nearest, exceptions masked
  control[1] = 0x037Fu;  // x87 control word: the default
  t.sp = regs - 1;
}

std::string shared_name(size_t offset) {
  for (const SharedDecl& d : g_launch.decls) {
    if (offset >= d.offset && offset < d.offset + d.bytes) {
      return std::string(d.name) + " + " + std::to_string(offset - d.offset) + " bytes";
    }
  }
  return "offset " + std::to_string(offset);
}

std::string thread_text(int linear) { return linear < 0 ? "several threads" : "thread " + std::to_string(linear); }

void release_barrier() {
  for (Thread& o : g_threads) {
    if (o.state == State::kAtBarrier) {
      o.state = State::kRunnable;
      o.barrier_result = g_launch.barrier_and;
    }
  }
  g_launch.barrier_arrived = 0;
  g_launch.barrier_site = Site{nullptr, 0};
  g_launch.epoch++;  // a new barrier interval for the race check
}

bool same_site(Site a, Site b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

int barrier_wait(int pred, Site site) {
  if (g_launch.barrier_arrived > 0 && !same_site(g_launch.barrier_site, site)) {
    fail("divergent __syncthreads: this thread is at " + site_text(site) + ", " +
         std::to_string(g_launch.barrier_arrived) + " other thread(s) wait at " + site_text(g_launch.barrier_site));
  }
  if (g_launch.barrier_arrived == 0) {
    g_launch.barrier_site = site;
    g_launch.barrier_and = 1;
  }
  g_launch.barrier_arrived++;
  g_launch.barrier_and &= pred != 0;
  Thread& t = me();
  if (g_launch.barrier_arrived == g_launch.live) {
    const int result = g_launch.barrier_and;
    release_barrier();
    return result;
  }
  t.state = State::kAtBarrier;
  t.wait_site = site;
  t.wait_what = "__syncthreads";
  yield_to_scheduler();
  return t.barrier_result;
}

std::string describe_waits() {
  std::string out;
  int exited = 0;
  for (const Thread& t : g_threads) {
    if (t.state == State::kDone) {
      exited++;
      continue;
    }
    if (t.state == State::kAtBarrier || t.state == State::kAtWarp) {
      if (out.size() < 600) out += "; thread " + std::to_string(t.idx.x) + " waits at " + t.wait_what + " (" + site_text(t.wait_site) + ")";
    }
  }
  return out + "; " + std::to_string(exited) + " thread(s) exited";
}

void install_fault_handler();

}  // namespace

// ---- barriers and collectives --------------------------------------------------------------------

void syncthreads(Site site) { barrier_wait(1, site); }
int syncthreads_and(int pred, Site site) { return barrier_wait(pred, site); }

const unsigned char* warp_collective(unsigned mask, const void* mine, size_t bytes, const char* what, Site site) {
  Thread& t = me();
  const int lane = static_cast<int>(t.idx.x & 31u);
  Warp& w = g_warps[t.idx.x / 32];
  if (bytes > static_cast<size_t>(kCollectiveBytes)) fail("internal: collective payload too large");
  if (!((mask >> lane) & 1u)) fail(std::string(what) + " with a mask that does not name the calling lane at " + site_text(site));
  if (t.result_buffer >= 0) {  // the lane has read its previous results by now
    w.pending[t.result_buffer]--;
    t.result_buffer = -1;
  }
  if (w.active) {
    if (!same_site(w.site, site) || w.mask != mask || std::strcmp(w.what, what) != 0) {
      fail("divergent warp collective: lane " + std::to_string(lane) + " is at " + what + " (" + site_text(site) +
           ", mask " + std::to_string(mask) + ") while other lanes wait at " + w.what + " (" + site_text(w.site) +
           ", mask " + std::to_string(w.mask) + ")");
    }
  } else {
    int buffer = -1;
    for (int b = 0; b < kCollectiveBuffers; ++b) {
      if (w.pending[b] == 0) {
        buffer = b;
        break;
      }
    }
    if (buffer < 0) fail("internal: no free collective buffer");
    w.active = true;
    w.site = site;
    w.what = what;
    w.mask = mask;
    w.arrived = 0;
    w.buffer = buffer;
    // A lane of the mask that has already exited can never arrive.
    for (int l = 0; l < 32; ++l) {
      const int linear = static_cast<int>(t.idx.x & ~31u) + l;
      if (((mask >> l) & 1u) && (linear >= g_launch.nthreads || g_threads[linear].state == State::kDone)) {
        fail(std::string(what) + " at " + site_text(site) + ": lane " + std::to_string(l) +
             " of the mask has exited (or does not exist)");
      }
    }
  }
  unsigned char* data = w.data[w.buffer];
  std::memcpy(data + kCollectiveBytes * lane, mine, bytes);
  w.arrived |= 1u << lane;
  const int buffer = w.buffer;
  t.result_buffer = buffer;
  w.pending[buffer]++;
  if (w.arrived == w.mask) {
    w.active = false;
    for (int l = 0; l < 32; ++l) {
      const int linear = static_cast<int>(t.idx.x & ~31u) + l;
      if (((mask >> l) & 1u) && linear != my_index()) g_threads[linear].state = State::kRunnable;
    }
    return data;
  }
  t.state = State::kAtWarp;
  t.wait_site = site;
  t.wait_what = what;
  yield_to_scheduler();
  return data;
}

void syncwarp(unsigned mask, Site site) {
  const int nothing = 0;
  warp_collective(mask, &nothing, sizeof nothing, "__syncwarp", site);
}

// ---- memory checks -------------------------------------------------------------------------------

void check_vector_access(const void* p, const char* what, Site site) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " at address %p, not 16-byte aligned (", p);
    fail(std::string("misaligned ") + what + buf + site_text(site) + ")");
  }
}

void* shared_array(size_t bytes, const char* name, Site site) {
  Thread& t = me();
  const int k = t.shared_decls++;
  if (k < static_cast<int>(g_launch.decls.size())) {
    const SharedDecl& d = g_launch.decls[k];
    if (!same_site(d.site, site)) {
      fail("shared-memory declaration " + std::string(name) + " at " + site_text(site) +
           " does not match the block's declaration " + d.name + " at " + site_text(d.site));
    }
    return g_arena + d.offset;
  }
  const size_t offset = (g_launch.shared_used + 15) & ~size_t(15);
  if (offset + bytes > kStaticSharedLimit) {
    fail("static shared memory of " + std::to_string(offset + bytes) + " bytes (" + name + " at " + site_text(site) +
         ") exceeds the 48 KiB limit");
  }
  g_launch.shared_used = offset + bytes;
  g_launch.decls.push_back(SharedDecl{name, site, offset, bytes});
  return g_arena + offset;
}

void shared_access(const void* p, size_t bytes, bool write, Site site) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < g_arena || c + bytes > g_arena + g_launch.shared_used) {
    fail(std::string(write ? "shared_store" : "shared_load") + " outside the block's shared memory at " +
         site_text(site));
  }
  const size_t offset = static_cast<size_t>(c - g_arena);
  if (offset % 4 != 0 || bytes % 4 != 0) fail("shared access not on 4-byte words at " + site_text(site));
  const int self = my_index();
  const uint32_t epoch = g_launch.epoch;
  for (size_t word = offset / 4; word < (offset + bytes) / 4; ++word) {
    Shadow& s = g_shadow[word];
    const bool written = s.write_epoch == epoch && s.writer != self;
    if (write) {
      if (written) {
        fail("shared-memory race (write after write) on " + shared_name(word * 4) + ": written at " + site_text(site) +
             " after " + thread_text(s.writer) + " wrote it at " + site_text(s.write_site) +
             " with no __syncthreads between");
      }
      if (s.read_epoch == epoch && s.reader != self) {
        fail("shared-memory race (write after read) on " + shared_name(word * 4) + ": written at " + site_text(site) +
             " after " + thread_text(s.reader) + " read it at " + site_text(s.read_site) +
             " with no __syncthreads between");
      }
      s.write_epoch = epoch;
      s.writer = self;
      s.write_site = site;
    } else {
      if (written) {
        fail("shared-memory race (read after write) on " + shared_name(word * 4) + ": read at " + site_text(site) +
             " after " + thread_text(s.writer) + " wrote it at " + site_text(s.write_site) +
             " with no __syncthreads between");
      }
      if (s.read_epoch != epoch) {
        s.read_epoch = epoch;
        s.reader = self;
        s.read_site = site;
      } else if (s.reader != self) {
        s.reader = -2;
      }
    }
  }
}

[[noreturn]] void kernel_error(const char* message, Site site) { fail(std::string(message) + " at " + site_text(site)); }

// ---- launch ----------------------------------------------------------------------------------------

namespace {

std::vector<int> ordering(int n, int policy) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = policy == 1 ? n - 1 - i : i;
  if (policy == 2) std::shuffle(order.begin(), order.end(), g_rng);
  return order;
}

void fault_handler(int sig, siginfo_t* info, void*) {
  char buf[640];
  const void* addr = info->si_addr;
  const char* kind = "an access to a no-access page (past the end of a buffer: its guard page) or unmapped memory";
  if (g_launch.current >= 0) {
    const unsigned char* stack = g_threads[g_launch.current].stack;
    const unsigned char* a = static_cast<const unsigned char*>(addr);
    if (stack && a >= stack && a < stack + kPage) kind = "a fiber stack overflow";
  }
  int n;
  if (g_in_kernel) {
    n = std::snprintf(buf, sizeof buf,
                      "\nemulation: memory fault (signal %d) at address %p in emulated kernel %s, block (%u, %u, %u), "
                      "thread %u: %s\n",
                      sig, addr, g_launch.name, block_idx.x, block_idx.y, block_idx.z, thread_idx.x, kind);
  } else {
    n = std::snprintf(buf, sizeof buf, "\nemulation: memory fault (signal %d) at address %p outside any kernel: %s\n",
                      sig, addr, kind);
  }
  if (n > 0) {
    ssize_t ignored = write(2, buf, static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
    (void)ignored;
  }
  _exit(86);
}

void install_fault_handler() {
  if (g_handler_installed) return;
  g_handler_installed = true;
  static std::vector<unsigned char> alt(64 * 1024);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

cudaError_t launch(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* context) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > kMaxThreads || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 0x7fffffffu || block.y != 1 || block.z != 1) {
    g_message = std::string("emulated kernel ") + name + ": invalid launch configuration (grid " +
                std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " +
                std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z) + ")";
    g_sticky = cudaErrorInvalidConfiguration;
    return g_sticky;
  }
  install_fault_handler();
  if (g_arena == nullptr) {
    g_arena = static_cast<unsigned char*>(std::aligned_alloc(128, kArenaBytes));
    g_shadow.resize(kArenaBytes / 4);
  }
  const int n = static_cast<int>(threads);
  if (static_cast<int>(g_threads.size()) < n) g_threads.resize(n);
  g_warps.assign((n + 31) / 32, Warp());
  g_launch = Launch();
  g_launch.name = name;
  g_launch.body = body;
  g_launch.context = context;
  g_launch.nthreads = n;
  grid_dim = grid;
  block_dim = block;
  g_rng.seed(g_schedule.seed ^ (std::hash<std::string>()(name) * 0x9E3779B97F4A7C15ull));

  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) block_order[i] = g_schedule.block_order == 1 ? blocks - 1 - i : i;
  if (g_schedule.block_order == 2) std::shuffle(block_order.begin(), block_order.end(), g_rng);

  // The previous launch's shared words: poisoned and unmarked before this launch's first block.
  static size_t dirty = kArenaBytes;
  std::memset(g_arena, 0xFF, dirty);
  std::memset(g_shadow.data(), 0, sizeof(Shadow) * (dirty / 4));
  g_in_kernel = true;
  for (uint64_t b : block_order) {
    block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                      static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    // Fresh block state: NaN bytes in shared memory, a clean race shadow, no declarations yet.
    std::memset(g_arena, 0xFF, g_launch.shared_used);
    std::memset(g_shadow.data(), 0, sizeof(Shadow) * ((g_launch.shared_used + 3) / 4));
    g_launch.epoch = 1;
    for (Warp& w : g_warps) w = Warp();
    for (int i = 0; i < n; ++i) {
      Thread& t = g_threads[i];
      t.state = State::kRunnable;
      t.idx = uint3{static_cast<unsigned>(i), 0, 0};
      t.shared_decls = 0;
      t.result_buffer = -1;
      prepare_fiber(t);
    }
    g_launch.live = n;
    g_launch.barrier_arrived = 0;
    while (g_launch.live > 0 && !g_launch.failed) {
      bool ran = false;
      for (int i : ordering(n, g_schedule.thread_order)) {
        if (g_threads[i].state != State::kRunnable) continue;
        g_launch.current = i;
        thread_idx = g_threads[i].idx;
        loracuda_emu_switch(&g_scheduler_sp, g_threads[i].sp);
        ran = true;
        if (g_launch.failed) break;
      }
      if (!ran && g_launch.live > 0 && !g_launch.failed) {
        g_launch.current = -1;
        g_launch.failed = true;
        g_message = std::string("emulated kernel ") + name + ", block (" + std::to_string(block_idx.x) + ", " +
                    std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) +
                    "): deadlock: a barrier or warp collective that not every thread reaches" + describe_waits();
      }
    }
    g_launch.current = -1;
    if (g_launch.failed) break;
  }
  g_in_kernel = false;
  dirty = (g_launch.shared_used + 15) & ~size_t(15);
  if (g_launch.failed) {
    g_sticky = cudaErrorLaunchFailure;
    return g_sticky;
  }
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t e = g_sticky;
  g_sticky = cudaSuccess;
  return e;
}

}  // namespace loracuda_emu

// ---- the C interface of the kernel library (see csrc/emulation/kernel_library.cpp) --------------------

extern "C" {
void loracuda_emu_set_schedule(int block_order, int thread_order, uint64_t seed) {
  loracuda_emu::g_schedule.block_order = block_order;
  loracuda_emu::g_schedule.thread_order = thread_order;
  loracuda_emu::g_schedule.seed = seed;
}
const char* loracuda_emu_last_message() { return loracuda_emu::g_message.c_str(); }
void loracuda_emu_clear_message() { loracuda_emu::g_message.clear(); }
}
