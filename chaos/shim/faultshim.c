/* memkv chaos fault shim: LD_PRELOAD'ed into a node (or client) process by chaos/faults.py.
 *
 * Two faults, both read from one small control file (MEMKV_FAULTS_FILE) so that the chaos
 * runner can turn them on and off while the process runs:
 *
 *   clock_offset_ms=N   the process's wall clock (CLOCK_REALTIME, gettimeofday, time) is N ms
 *                       ahead (negative: behind). Monotonic clocks are left alone, so timeouts,
 *                       sleeps and trio's clock behave; only what the process believes the date
 *                       is changes -- which is what a skewed host clock does to it.
 *   fsync_delay_ms=M    every fsync / fdatasync / syncfs / sync_file_range / msync(MS_SYNC)
 *                       sleeps M ms before doing the real call: a slow disk, as the writer of a
 *                       flash log sees it (the data still reaches the disk for real).
 *
 * Why not libfaketime (Debian's faketime 0.9.10): with its monotonic clock excluded it breaks
 * Python 3.11's time.sleep (clock_nanosleep TIMER_ABSTIME -> EINVAL, libfaketime issue 426),
 * and with it included an absolute monotonic sleep never returns. Why not dm-delay: the kernel
 * here has no device mapper. The file is re-read at most every 100 ms (monotonic), so a change
 * takes effect within that; a missing or unreadable file means no fault.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t offset_ns;      /* wall-clock offset */
static volatile int64_t fsync_delay_ns; /* sleep before every sync call */
static volatile int64_t next_read_ns;   /* monotonic time of the next control-file read */
static volatile int reading;

static int64_t mono_ns(void) {
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);  /* never our own wrapper */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t field(const char *buf, const char *name) {
    const char *p = strstr(buf, name);
    if (!p) return 0;
    p += strlen(name);
    if (*p != '=') return 0;
    return strtoll(p + 1, NULL, 10);
}

static void refresh(void) {
    int64_t now = mono_ns();
    if (now < next_read_ns || __sync_lock_test_and_set(&reading, 1)) return;
    const char *path = getenv("MEMKV_FAULTS_FILE");
    int64_t off = 0, delay = 0;
    if (path) {
        char buf[256];
        int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t n = syscall(SYS_read, fd, buf, sizeof buf - 1);
            syscall(SYS_close, fd);
            if (n > 0) {
                buf[n] = 0;
                off = field(buf, "clock_offset_ms") * 1000000LL;
                delay = field(buf, "fsync_delay_ms") * 1000000LL;
            }
        }
    }
    offset_ns = off;
    fsync_delay_ns = delay;
    next_read_ns = now + 100000000LL;
    __sync_lock_release(&reading);
}

static void shift(struct timespec *ts) {
    int64_t t = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
    ts->tv_sec = t / 1000000000LL;
    ts->tv_nsec = t % 1000000000LL;
    if (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000LL; ts->tv_sec -= 1; }
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(clk, ts);
    if (r == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE || clk == CLOCK_TAI)) {
        refresh();
        if (offset_ns) shift(ts);
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    (void)tz;
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}

static void slow(void) {
    refresh();
    int64_t d = fsync_delay_ns;
    if (d > 0) {
        struct timespec ts = {d / 1000000000LL, d % 1000000000LL};
        while (syscall(SYS_nanosleep, &ts, &ts) != 0 && errno == EINTR) {}
    }
}

#define SYNC_WRAPPER(ret, name, params, args)          \
    ret name params {                                  \
        static ret (*real) params;                     \
        if (!real) real = dlsym(RTLD_NEXT, #name);     \
        slow();                                        \
        return real args;                              \
    }

SYNC_WRAPPER(int, fsync, (int fd), (fd))
SYNC_WRAPPER(int, fdatasync, (int fd), (fd))
SYNC_WRAPPER(int, syncfs, (int fd), (fd))
SYNC_WRAPPER(int, sync_file_range, (int fd, off_t off, off_t n, unsigned int flags), (fd, off, n, flags))

int msync(void *addr, size_t len, int flags) {
    static int (*real)(void *, size_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "msync");
    if (flags & MS_SYNC) slow();
    return real(addr, len, flags);
}
