/* A SQLite VFS that wraps the default one and fails xSync or xWrite on demand.
 * Every method is forwarded; only the armed operation is replaced by an error. */
#include "saga_faults.h"
#include <sqlite3.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct FaultFile {
    sqlite3_file base;   /* must be first: methods point at fault_io_methods */
    sqlite3_file *real;  /* the wrapped file, allocated right after this struct */
    const char *name;    /* valid until xClose (SQLite guarantees it) */
} FaultFile;

/* Power-loss simulation: while enabled, every write to a matching file is remembered with the
 * bytes it replaced (and the file size before it) until the file is synced. A simulated power
 * loss then walks the unsynced writes newest first and, per write, keeps it, drops it (puts the
 * old bytes back, shrinks the file again) or garbles it (random bytes), as a disk with a
 * volatile cache may. */
typedef struct PendingWrite {
    struct PendingWrite *next;   /* older write */
    sqlite3_file *real;          /* the file (open: SQLite closes files only after syncing them) */
    char *path;
    sqlite3_int64 offset;
    int length;
    int old_length;              /* bytes of old content that existed before the write */
    sqlite3_int64 old_size;      /* file size before the write */
    unsigned char *old;          /* old_length bytes */
} PendingWrite;

static pthread_mutex_t power_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int power_tracking;
static char power_prefix[4096];   /* guarded by power_lock */
static PendingWrite *pending;      /* newest first */
static long pending_count;
static void forget_pending(sqlite3_file *real);

static sqlite3_vfs fault_vfs;
static sqlite3_vfs *real_vfs;
static atomic_int armed_op;
static atomic_int countdown;
static atomic_int persistent_fault;
static atomic_int tripped;
static atomic_int failures;
static atomic_long syncs;
static pthread_mutex_t prefix_lock = PTHREAD_MUTEX_INITIALIZER;
static char prefix[4096];

static int path_matches(const char *name) {
    pthread_mutex_lock(&prefix_lock);
    int ok = prefix[0] == 0 || (name && strncmp(name, prefix, strlen(prefix)) == 0);
    pthread_mutex_unlock(&prefix_lock);
    return ok;
}

static int should_fail(int op, const char *name) {
    if (atomic_load(&armed_op) != op) return 0;
    if (!path_matches(name)) return 0;
    if (atomic_load(&tripped)) {
        if (atomic_load(&persistent_fault)) { atomic_fetch_add(&failures, 1); return 1; }
        return 0;
    }
    if (atomic_fetch_sub(&countdown, 1) == 1) {
        atomic_store(&tripped, 1);
        atomic_fetch_add(&failures, 1);
        return 1;
    }
    return 0;
}

void saga_fault_vfs_arm(int op, int n, int persistent, const char *path_prefix) {
    atomic_store(&armed_op, 0);
    pthread_mutex_lock(&prefix_lock);
    snprintf(prefix, sizeof prefix, "%s", path_prefix ? path_prefix : "");
    pthread_mutex_unlock(&prefix_lock);
    atomic_store(&countdown, n < 1 ? 1 : n);
    atomic_store(&persistent_fault, persistent);
    atomic_store(&tripped, 0);
    atomic_store(&failures, 0);
    atomic_store(&armed_op, op);
}
void saga_fault_vfs_disarm(void) { atomic_store(&armed_op, 0); atomic_store(&tripped, 0); }
int saga_fault_vfs_failures(void) { return atomic_load(&failures); }
long saga_fault_vfs_syncs(void) { return atomic_load(&syncs); }

#define REAL(f) (((FaultFile *)(f))->real)
#define NAME(f) (((FaultFile *)(f))->name)

void saga_fault_vfs_track_power(int on, const char *path_prefix) {
    pthread_mutex_lock(&power_lock);
    snprintf(power_prefix, sizeof power_prefix, "%s", path_prefix ? path_prefix : "");
    atomic_store(&power_tracking, on);
    if (!on) while (pending) forget_pending(pending->real);
    pthread_mutex_unlock(&power_lock);
}

long saga_fault_vfs_unsynced_writes(void) {
    pthread_mutex_lock(&power_lock);
    long n = pending_count;
    pthread_mutex_unlock(&power_lock);
    return n;
}

static unsigned long long next_random(unsigned long long *s) {
    unsigned long long z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

long saga_fault_vfs_power_loss(unsigned long long seed, long *dropped, long *garbled) {
    /* Holds the lock for good: the caller kills the process right after, and no other
     * thread may write to the files while (or after) they are rolled back. */
    pthread_mutex_lock(&power_lock);
    long d = 0, g = 0, n = 0;
    for (PendingWrite *w = pending; w; w = w->next, n++) {
        unsigned long long r = next_random(&seed) % 3;
        if (r == 1) {          /* dropped: the old bytes come back, the file shrinks back */
            if (w->old_length > 0) w->real->pMethods->xWrite(w->real, w->old, w->old_length, w->offset);
            sqlite3_int64 size = 0;
            if (w->real->pMethods->xFileSize(w->real, &size) == SQLITE_OK && size > w->old_size) {
                w->real->pMethods->xTruncate(w->real, w->old_size);
            }
            d++;
        } else if (r == 2) {   /* garbled: some sectors of it hold noise */
            unsigned char noise[512];
            for (int i = 0; i < (int)sizeof noise; i++) noise[i] = (unsigned char)next_random(&seed);
            int len = w->length < (int)sizeof noise ? w->length : (int)sizeof noise;
            sqlite3_int64 at = w->offset + (sqlite3_int64)(next_random(&seed) % (unsigned long long)(w->length - len + 1));
            w->real->pMethods->xWrite(w->real, noise, len, at);
            g++;
        }
    }
    if (dropped) *dropped = d;
    if (garbled) *garbled = g;
    return n;
}

static void forget_pending(sqlite3_file *real) {
    PendingWrite **p = &pending;
    while (*p) {
        if ((*p)->real == real) {
            PendingWrite *dead = *p;
            *p = dead->next;
            free(dead->old); free(dead->path); free(dead);
            pending_count--;
        } else {
            p = &(*p)->next;
        }
    }
}

/* Remembers what a write is about to replace. Called with power_lock held. */
static void remember_write(sqlite3_file *real, const char *name, sqlite3_int64 o, int n) {
    sqlite3_int64 size = 0;
    if (real->pMethods->xFileSize(real, &size) != SQLITE_OK) return;
    PendingWrite *w = calloc(1, sizeof *w);
    if (!w) return;
    w->real = real;
    w->path = strdup(name ? name : "");
    w->offset = o;
    w->length = n;
    w->old_size = size;
    sqlite3_int64 avail = size > o ? size - o : 0;
    w->old_length = (int)(avail < n ? avail : n);
    w->old = malloc((size_t)(w->old_length > 0 ? w->old_length : 1));
    if (w->old_length > 0 && real->pMethods->xRead(real, w->old, w->old_length, o) != SQLITE_OK) {
        w->old_length = 0;
    }
    w->next = pending;
    pending = w;
    pending_count++;
}

static int f_close(sqlite3_file *f) {
    pthread_mutex_lock(&power_lock);
    forget_pending(REAL(f));
    pthread_mutex_unlock(&power_lock);
    int rc = REAL(f)->pMethods ? REAL(f)->pMethods->xClose(REAL(f)) : SQLITE_OK;
    return rc;
}
static int f_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o) { return REAL(f)->pMethods->xRead(REAL(f), b, n, o); }
static int f_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o) {
    if (should_fail(SAGA_FAULT_WRITE, NAME(f))) return SQLITE_IOERR_WRITE;
    if (should_fail(SAGA_FAULT_FULL, NAME(f))) return SQLITE_FULL;
    if (!atomic_load(&power_tracking)) return REAL(f)->pMethods->xWrite(REAL(f), b, n, o);
    pthread_mutex_lock(&power_lock);
    if (NAME(f) && strncmp(NAME(f), power_prefix, strlen(power_prefix)) == 0) remember_write(REAL(f), NAME(f), o, n);
    int rc = REAL(f)->pMethods->xWrite(REAL(f), b, n, o);
    pthread_mutex_unlock(&power_lock);
    return rc;
}
static int f_truncate(sqlite3_file *f, sqlite3_int64 s) { return REAL(f)->pMethods->xTruncate(REAL(f), s); }
static int f_sync(sqlite3_file *f, int flags) {
    atomic_fetch_add(&syncs, 1);
    if (should_fail(SAGA_FAULT_SYNC, NAME(f))) return SQLITE_IOERR_FSYNC;
    int rc = REAL(f)->pMethods->xSync(REAL(f), flags);
    if (rc == SQLITE_OK && atomic_load(&power_tracking)) {
        pthread_mutex_lock(&power_lock);
        forget_pending(REAL(f));
        pthread_mutex_unlock(&power_lock);
    }
    return rc;
}
static int f_size(sqlite3_file *f, sqlite3_int64 *s) { return REAL(f)->pMethods->xFileSize(REAL(f), s); }
static int f_lock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xLock(REAL(f), l); }
static int f_unlock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xUnlock(REAL(f), l); }
static int f_check(sqlite3_file *f, int *r) { return REAL(f)->pMethods->xCheckReservedLock(REAL(f), r); }
static int f_fcntl(sqlite3_file *f, int op, void *a) { return REAL(f)->pMethods->xFileControl(REAL(f), op, a); }
static int f_sector(sqlite3_file *f) { return REAL(f)->pMethods->xSectorSize(REAL(f)); }
static int f_devchar(sqlite3_file *f) { return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f)); }
static int f_shmmap(sqlite3_file *f, int i, int sz, int e, void volatile **pp) { return REAL(f)->pMethods->xShmMap(REAL(f), i, sz, e, pp); }
static int f_shmlock(sqlite3_file *f, int o, int n, int fl) { return REAL(f)->pMethods->xShmLock(REAL(f), o, n, fl); }
static void f_shmbarrier(sqlite3_file *f) { REAL(f)->pMethods->xShmBarrier(REAL(f)); }
static int f_shmunmap(sqlite3_file *f, int d) { return REAL(f)->pMethods->xShmUnmap(REAL(f), d); }
static int f_fetch(sqlite3_file *f, sqlite3_int64 o, int n, void **pp) { return REAL(f)->pMethods->xFetch(REAL(f), o, n, pp); }
static int f_unfetch(sqlite3_file *f, sqlite3_int64 o, void *p) { return REAL(f)->pMethods->xUnfetch(REAL(f), o, p); }

static const sqlite3_io_methods fault_io_methods = {
    3, f_close, f_read, f_write, f_truncate, f_sync, f_size, f_lock, f_unlock, f_check,
    f_fcntl, f_sector, f_devchar, f_shmmap, f_shmlock, f_shmbarrier, f_shmunmap, f_fetch, f_unfetch
};

static int v_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags, int *outFlags) {
    (void)vfs;
    FaultFile *ff = (FaultFile *)file;
    ff->real = (sqlite3_file *)&ff[1];
    ff->name = name;
    memset(ff->real, 0, (size_t)real_vfs->szOsFile);
    int rc = real_vfs->xOpen(real_vfs, name, ff->real, flags, outFlags);
    /* Only install our methods when the real open succeeded, so xClose is not called on failure. */
    ff->base.pMethods = (rc == SQLITE_OK && ff->real->pMethods) ? &fault_io_methods : 0;
    return rc;
}
static int v_delete(sqlite3_vfs *v, const char *n, int s) { (void)v; return real_vfs->xDelete(real_vfs, n, s); }
static int v_access(sqlite3_vfs *v, const char *n, int f, int *r) { (void)v; return real_vfs->xAccess(real_vfs, n, f, r); }
static int v_fullpath(sqlite3_vfs *v, const char *n, int o, char *out) { (void)v; return real_vfs->xFullPathname(real_vfs, n, o, out); }
static void *v_dlopen(sqlite3_vfs *v, const char *n) { (void)v; return real_vfs->xDlOpen(real_vfs, n); }
static void v_dlerror(sqlite3_vfs *v, int n, char *m) { (void)v; real_vfs->xDlError(real_vfs, n, m); }
static void (*v_dlsym(sqlite3_vfs *v, void *h, const char *s))(void) { (void)v; return real_vfs->xDlSym(real_vfs, h, s); }
static void v_dlclose(sqlite3_vfs *v, void *h) { (void)v; real_vfs->xDlClose(real_vfs, h); }
static int v_random(sqlite3_vfs *v, int n, char *o) { (void)v; return real_vfs->xRandomness(real_vfs, n, o); }
static int v_sleep(sqlite3_vfs *v, int us) { (void)v; return real_vfs->xSleep(real_vfs, us); }
static int v_time(sqlite3_vfs *v, double *t) { (void)v; return real_vfs->xCurrentTime(real_vfs, t); }
static int v_lasterr(sqlite3_vfs *v, int n, char *m) { (void)v; return real_vfs->xGetLastError ? real_vfs->xGetLastError(real_vfs, n, m) : 0; }
static int v_time64(sqlite3_vfs *v, sqlite3_int64 *t) { (void)v; return real_vfs->xCurrentTimeInt64(real_vfs, t); }

int saga_fault_vfs_register(void) {
    static atomic_int registered;
    if (atomic_exchange(&registered, 1)) return SQLITE_OK;
    int rc = sqlite3_initialize();
    if (rc != SQLITE_OK) return rc;
    real_vfs = sqlite3_vfs_find(0);
    if (!real_vfs) return SQLITE_ERROR;
    fault_vfs.iVersion = 2;
    fault_vfs.szOsFile = (int)sizeof(FaultFile) + real_vfs->szOsFile;
    fault_vfs.mxPathname = real_vfs->mxPathname;
    fault_vfs.zName = SAGA_FAULT_VFS_NAME;
    fault_vfs.xOpen = v_open;
    fault_vfs.xDelete = v_delete;
    fault_vfs.xAccess = v_access;
    fault_vfs.xFullPathname = v_fullpath;
    fault_vfs.xDlOpen = v_dlopen;
    fault_vfs.xDlError = v_dlerror;
    fault_vfs.xDlSym = v_dlsym;
    fault_vfs.xDlClose = v_dlclose;
    fault_vfs.xRandomness = v_random;
    fault_vfs.xSleep = v_sleep;
    fault_vfs.xCurrentTime = v_time;
    fault_vfs.xGetLastError = v_lasterr;
    fault_vfs.xCurrentTimeInt64 = v_time64;
    return sqlite3_vfs_register(&fault_vfs, 0);
}
