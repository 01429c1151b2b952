/* fsync/fdatasync interposer. Defining these symbols in the executable makes every
 * dynamically linked caller (librocksdb among them) bind to them; unarmed, they forward to
 * the C library's own. Armed, the n-th sync of a file under a path prefix fails with EIO,
 * which is what a dying disk does. Used to make a real RocksDB synced write fail. A delay
 * (saga_fault_fsync_set_delay_ns) makes every sync that slower: a benchmark's slow disk. */
#define _GNU_SOURCE
#include "fsync_faults.h"
#include "powerloss_hooks.h"
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t prefix_lock = PTHREAD_MUTEX_INITIALIZER;
static char prefix[PATH_MAX];
static atomic_int fs_armed;
static atomic_int fs_countdown;
static atomic_int fs_persistent;
static atomic_int fs_tripped;
static atomic_int fs_failures;
static atomic_long fs_calls;
static atomic_long fs_delay_ns;

void saga_fault_fsync_arm(const char *path_prefix, int n, int persistent) {
    pthread_mutex_lock(&prefix_lock);
    snprintf(prefix, sizeof prefix, "%s", path_prefix);
    pthread_mutex_unlock(&prefix_lock);
    atomic_store(&fs_countdown, n < 1 ? 1 : n);
    atomic_store(&fs_persistent, persistent);
    atomic_store(&fs_tripped, 0);
    atomic_store(&fs_failures, 0);
    atomic_store(&fs_armed, 1);
}
void saga_fault_fsync_disarm(void) { atomic_store(&fs_armed, 0); }
int saga_fault_fsync_failures(void) { return atomic_load(&fs_failures); }
long saga_fault_fsync_calls(void) { return atomic_load(&fs_calls); }
void saga_fault_fsync_set_delay_ns(long ns) { atomic_store(&fs_delay_ns, ns < 0 ? 0 : ns); }

/* A slower disk: sleep before the real sync (benchmarks only; 0, the default, costs nothing). */
static void delay(void) {
    long ns = atomic_load_explicit(&fs_delay_ns, memory_order_relaxed);
    if (ns <= 0) return;
    struct timespec t = { ns / 1000000000L, ns % 1000000000L };
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

static int matches(int fd) {
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    pthread_mutex_lock(&prefix_lock);
    int ok = prefix[0] && strncmp(path, prefix, strlen(prefix)) == 0;
    pthread_mutex_unlock(&prefix_lock);
    return ok;
}

static int should_fail_fd(int fd) {
    if (!atomic_load(&fs_armed) || !matches(fd)) return 0;
    if (atomic_load(&fs_tripped)) {
        if (atomic_load(&fs_persistent)) { atomic_fetch_add(&fs_failures, 1); return 1; }
        return 0;
    }
    if (atomic_fetch_sub(&fs_countdown, 1) == 1) {
        atomic_store(&fs_tripped, 1);
        atomic_fetch_add(&fs_failures, 1);
        return 1;
    }
    return 0;
}

typedef int (*sync_fn)(int);

static sync_fn real_fsync, real_fdatasync;
static pthread_once_t resolve_once = PTHREAD_ONCE_INIT;
static void resolve(void) {
    real_fsync = (sync_fn)dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (sync_fn)dlsym(RTLD_NEXT, "fdatasync");
}

static int sync_with(sync_fn real, int fd) {
    atomic_fetch_add(&fs_calls, 1);
    if (should_fail_fd(fd)) { errno = EIO; return -1; }
    /* The benchmark's added latency, before the real sync. */
    delay();
    /* A successful sync makes the file's changes (a directory's entries) durable for the
     * power-loss simulation (powerloss_interposer.c). */
    saga_pl_ticket t;
    if (!saga_pl_sync_begin(fd, &t)) return real(fd);
    int rc = real(fd);
    int e = errno;
    saga_pl_sync_end(&t, rc);
    errno = e;
    return rc;
}

int fsync(int fd) {
    pthread_once(&resolve_once, resolve);
    return sync_with(real_fsync, fd);
}

int fdatasync(int fd) {
    pthread_once(&resolve_once, resolve);
    return sync_with(real_fdatasync, fd);
}
