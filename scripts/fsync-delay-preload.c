/* LD_PRELOAD library for a database server under saga-bench: every fsync/fdatasync sleeps for
 * the delay stored in the file named by SAGA_FSYNC_DELAY_FILE (8 bytes, a native long in
 * nanoseconds, rewritten by the benchmark between rounds), then syncs for real. A slower disk
 * for mariadbd, changed without a restart. Built at bench time:
 *     cc -shared -fPIC -O2 -o fsync-delay.so scripts/fsync-delay-preload.c -ldl
 * and handed to scripts/mariadb.sh as MARIADBD_PRELOAD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef int (*sync_fn)(int);
static sync_fn real_fsync, real_fdatasync;
static volatile long *delay_ns;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void setup(void) {
    real_fsync = (sync_fn)dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (sync_fn)dlsym(RTLD_NEXT, "fdatasync");
    const char *path = getenv("SAGA_FSYNC_DELAY_FILE");
    if (!path || !*path) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    void *m = mmap(NULL, sizeof(long), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m != MAP_FAILED) delay_ns = (volatile long *)m;
}

static void delay(void) {
    long ns = delay_ns ? *delay_ns : 0;
    if (ns <= 0) return;
    struct timespec t = { ns / 1000000000L, ns % 1000000000L };
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

int fsync(int fd) {
    pthread_once(&once, setup);
    delay();
    return real_fsync(fd);
}

int fdatasync(int fd) {
    pthread_once(&once, setup);
    delay();
    return real_fdatasync(fd);
}
