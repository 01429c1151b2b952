/* write-family interposer, the companion of fsync_interposer.c: defined in the executable,
 * write/pwrite/pwrite64/writev/pwritev/fallocate/posix_fallocate replace the C library's for
 * every dynamically linked caller (librocksdb calls write, pwrite, fallocate and
 * posix_fallocate; strace of a saga workload shows write for the WAL, MANIFEST and SST files).
 * Unarmed they forward after one atomic load. Armed, the countdown-th write-family call on a
 * file under a path prefix fails with the chosen errno (ENOSPC: a full disk; EIO: a dying
 * one), once or from then on.
 *
 * A descriptor's path is found through /proc/self/fd, only while armed: no table to keep in
 * step with open/close/dup. (A descriptor closed and reused by another thread between the
 * readlink and the call could be misattributed; for a test fault that is acceptable.) Calls
 * from inside glibc (stdio's buffered writes, RocksDB's info LOG through fwrite) do not go
 * through these symbols and are never failed.
 *
 * Every one of them also reports to the power-loss simulation (powerloss_interposer.c), which
 * does nothing unless armed. */
#define _GNU_SOURCE
#include "write_faults.h"
#include "powerloss_hooks.h"
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static pthread_mutex_t wf_prefix_lock = PTHREAD_MUTEX_INITIALIZER;
static char wf_prefix[PATH_MAX];
static atomic_int wf_armed;
static atomic_long wf_countdown;
static atomic_int wf_persistent;
static atomic_int wf_short_first;
static atomic_int wf_errno;
static atomic_int wf_tripped;
static atomic_int wf_failures;
static atomic_long wf_matched;
static atomic_int wf_log_fd = -1;

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef ssize_t (*pwritev_fn)(int, const struct iovec *, int, off_t);
typedef int (*fallocate_fn)(int, int, off_t, off_t);
typedef int (*posix_fallocate_fn)(int, off_t, off_t);

static write_fn real_write;
static pwrite_fn real_pwrite, real_pwrite64;
static writev_fn real_writev;
static pwritev_fn real_pwritev;
static fallocate_fn real_fallocate;
static posix_fallocate_fn real_posix_fallocate;
static pthread_once_t wf_resolve_once = PTHREAD_ONCE_INIT;

static void wf_resolve(void) {
    real_write = (write_fn)dlsym(RTLD_NEXT, "write");
    real_pwrite = (pwrite_fn)dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = (pwrite_fn)dlsym(RTLD_NEXT, "pwrite64");
    real_writev = (writev_fn)dlsym(RTLD_NEXT, "writev");
    real_pwritev = (pwritev_fn)dlsym(RTLD_NEXT, "pwritev");
    real_fallocate = (fallocate_fn)dlsym(RTLD_NEXT, "fallocate");
    real_posix_fallocate = (posix_fallocate_fn)dlsym(RTLD_NEXT, "posix_fallocate");
}
#define RESOLVE() pthread_once(&wf_resolve_once, wf_resolve)

void saga_fault_write_arm(const char *path_prefix, long countdown, int persistent, int error_number, int short_first) {
    atomic_store(&wf_armed, 0);
    pthread_mutex_lock(&wf_prefix_lock);
    /* /proc/self/fd names resolved paths: resolve the prefix's directory part too. */
    char resolved[PATH_MAX];
    const char *slash = strrchr(path_prefix, '/');
    int done = 0;
    if (slash && slash != path_prefix) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path_prefix), path_prefix);
        if (realpath(dir, resolved)) {
            snprintf(wf_prefix, sizeof wf_prefix, "%s%s", resolved, slash);
            done = 1;
        }
    }
    if (!done) snprintf(wf_prefix, sizeof wf_prefix, "%s", path_prefix);
    pthread_mutex_unlock(&wf_prefix_lock);
    atomic_store(&wf_countdown, countdown < 1 ? 1 : countdown);
    atomic_store(&wf_persistent, persistent);
    atomic_store(&wf_short_first, short_first);
    atomic_store(&wf_errno, error_number ? error_number : EIO);
    atomic_store(&wf_tripped, 0);
    atomic_store(&wf_failures, 0);
    atomic_store(&wf_matched, 0);
    atomic_store(&wf_armed, 1);
}
void saga_fault_write_disarm(void) { atomic_store(&wf_armed, 0); }
int saga_fault_write_failures(void) { return atomic_load(&wf_failures); }
long saga_fault_write_matched(void) { return atomic_load(&wf_matched); }
void saga_fault_write_log_to(int fd) { atomic_store(&wf_log_fd, fd); }

/* Whether fd names a file under the prefix; its path goes to `path` (for the log). */
static int wf_matches(int fd, char *path, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, size - 1);
    if (n < 0) return 0;
    path[n] = 0;
    pthread_mutex_lock(&wf_prefix_lock);
    int ok = wf_prefix[0] && strncmp(path, wf_prefix, strlen(wf_prefix)) == 0;
    pthread_mutex_unlock(&wf_prefix_lock);
    return ok;
}

static void wf_log(const char *op, int err, const char *path, const char *note) {
    int fd = atomic_load(&wf_log_fd);
    if (fd < 0) return;
    char line[PATH_MAX + 128];
    int len = snprintf(line, sizeof line, "%s errno=%d %s%s\n", op, err, path, note);
    if (len > (int)sizeof line - 1) len = (int)sizeof line - 1;
    if (len > 0) (void)real_write(fd, line, (size_t)len);
}

enum verdict { PASS, FAIL, SHORT };

/* Decides one write-family call: PASS, FAIL (return -1 with the errno), or SHORT (the tripping
 * call of a "disk full": write part of it for real and report a short count). */
static enum verdict wf_decide(int fd, const char *op) {
    if (!atomic_load(&wf_armed)) return PASS;
    char path[PATH_MAX];
    if (!wf_matches(fd, path, sizeof path)) return PASS;
    atomic_fetch_add(&wf_matched, 1);
    int err = atomic_load(&wf_errno);
    if (atomic_load(&wf_tripped)) {
        if (!atomic_load(&wf_persistent)) return PASS;
        atomic_fetch_add(&wf_failures, 1);
        wf_log(op, err, path, "");
        return FAIL;
    }
    if (atomic_fetch_sub(&wf_countdown, 1) != 1) return PASS;
    atomic_store(&wf_tripped, 1);
    atomic_fetch_add(&wf_failures, 1);
    if (atomic_load(&wf_short_first) && atomic_load(&wf_persistent)) {
        wf_log(op, err, path, " (short write first)");
        return SHORT;
    }
    wf_log(op, err, path, "");
    return FAIL;
}

/* Each exported write-family call reports to the power-loss simulation
 * (powerloss_interposer.c) around the fault logic: SAGA_PL_WRITE. */
static size_t iov_bytes(const struct iovec *iov, int count) {
    size_t n = 0;
    for (int i = 0; i < count; i++) n += iov[i].iov_len;
    return n;
}

static ssize_t fault_write(int fd, const void *buf, size_t n) {
    switch (wf_decide(fd, "write")) {
    case PASS: return real_write(fd, buf, n);
    case SHORT: if (n > 1) return real_write(fd, buf, n / 2); /* fall through */
    case FAIL: errno = atomic_load(&wf_errno); return -1;
    }
    return -1;
}

ssize_t write(int fd, const void *buf, size_t n) {
    RESOLVE();
    SAGA_PL_WRITE(fd, -1, n, ssize_t, fault_write(fd, buf, n));
}

static ssize_t fault_pwrite(int fd, const void *buf, size_t n, off_t off) {
    switch (wf_decide(fd, "pwrite")) {
    case PASS: return real_pwrite(fd, buf, n, off);
    case SHORT: if (n > 1) return real_pwrite(fd, buf, n / 2, off); /* fall through */
    case FAIL: errno = atomic_load(&wf_errno); return -1;
    }
    return -1;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    RESOLVE();
    SAGA_PL_WRITE(fd, off, n, ssize_t, fault_pwrite(fd, buf, n, off));
}

static ssize_t fault_pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    switch (wf_decide(fd, "pwrite64")) {
    case PASS: return real_pwrite64(fd, buf, n, off);
    case SHORT: if (n > 1) return real_pwrite64(fd, buf, n / 2, off); /* fall through */
    case FAIL: errno = atomic_load(&wf_errno); return -1;
    }
    return -1;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    RESOLVE();
    SAGA_PL_WRITE(fd, off, n, ssize_t, fault_pwrite64(fd, buf, n, off));
}

static ssize_t fault_writev(int fd, const struct iovec *iov, int count) {
    switch (wf_decide(fd, "writev")) {
    case PASS: return real_writev(fd, iov, count);
    case SHORT: if (count > 0 && iov[0].iov_len > 1) return real_write(fd, iov[0].iov_base, iov[0].iov_len / 2); /* fall through */
    case FAIL: errno = atomic_load(&wf_errno); return -1;
    }
    return -1;
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    RESOLVE();
    SAGA_PL_WRITE(fd, -1, iov_bytes(iov, count), ssize_t, fault_writev(fd, iov, count));
}

static ssize_t fault_pwritev(int fd, const struct iovec *iov, int count, off_t off) {
    switch (wf_decide(fd, "pwritev")) {
    case PASS: return real_pwritev(fd, iov, count, off);
    case SHORT: if (count > 0 && iov[0].iov_len > 1) return real_pwrite(fd, iov[0].iov_base, iov[0].iov_len / 2, off); /* fall through */
    case FAIL: errno = atomic_load(&wf_errno); return -1;
    }
    return -1;
}

ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t off) {
    RESOLVE();
    SAGA_PL_WRITE(fd, off, iov_bytes(iov, count), ssize_t, fault_pwritev(fd, iov, count, off));
}

/* Allocation is not counted; once a persistent ENOSPC has tripped, a full disk cannot
 * allocate either. */
static int wf_disk_full(int fd, const char *op) {
    if (!atomic_load(&wf_armed) || !atomic_load(&wf_tripped) || !atomic_load(&wf_persistent)) return 0;
    if (atomic_load(&wf_errno) != ENOSPC) return 0;
    char path[PATH_MAX];
    if (!wf_matches(fd, path, sizeof path)) return 0;
    atomic_fetch_add(&wf_failures, 1);
    wf_log(op, ENOSPC, path, "");
    return 1;
}

int fallocate(int fd, int mode, off_t off, off_t len) {
    RESOLVE();
    if (wf_disk_full(fd, "fallocate")) { errno = ENOSPC; return -1; }
    saga_pl_ticket t;
    if (!saga_pl_fallocate_begin(fd, mode, off, len, &t)) return real_fallocate(fd, mode, off, len);
    int rc = real_fallocate(fd, mode, off, len);
    int e = errno;
    saga_pl_resize_end(&t, rc);
    errno = e;
    return rc;
}

int posix_fallocate(int fd, off_t off, off_t len) {
    RESOLVE();
    if (wf_disk_full(fd, "posix_fallocate")) return ENOSPC;
    saga_pl_ticket t;
    if (!saga_pl_fallocate_begin(fd, 0, off, len, &t)) return real_posix_fallocate(fd, off, len);
    int rc = real_posix_fallocate(fd, off, len);
    saga_pl_resize_end(&t, rc);
    return rc;
}
