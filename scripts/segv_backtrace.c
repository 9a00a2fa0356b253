// A native backtrace for a crash with no debugger at hand (the GPU machine has no gdb): built as a shared object
// and preloaded, it installs a SIGSEGV/SIGBUS/SIGABRT handler that prints the faulting address and the frames
// (glibc's backtrace, symbolised from the dynamic symbol tables; with -g builds addr2line resolves the offsets)
// to stderr, then re-raises. Python's faulthandler prints only the Python frames; glibc >= 2.35 dropped libSegFault.
//   cc -shared -fPIC -O1 -o /tmp/segv_backtrace.so scripts/segv_backtrace.c
//   LD_PRELOAD=/tmp/segv_backtrace.so python3 -c "..."
// Used for the packaging test's SIGSEGV on the H200 (docs/python.md, "Known problems").
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_fault(int sig, siginfo_t* info, void* context) {
  (void)context;
  char line[128];
  const int n = snprintf(line, sizeof line, "segv_backtrace: signal %d (%s) at address %p\n", sig, strsignal(sig),
                         info->si_addr);
  if (n > 0) write(STDERR_FILENO, line, (size_t)n);
  void* frames[64];
  const int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, STDERR_FILENO);
  signal(sig, SIG_DFL);  // the default action (a core, the exit status) once the frames are out
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &action, NULL);
  sigaction(SIGBUS, &action, NULL);
  sigaction(SIGABRT, &action, NULL);
}
