/* A power-loss simulation for the files of one directory (a RocksDB store's).
 *
 * Armed with a directory, it remembers what was changed under it and is not durable yet, and at
 * a simulated cut (saga_kv_powerloss_cut) rewrites the files to a state a real power loss could
 * leave, then SIGKILLs the process. Like the fsync and write interposers next to it, it works by
 * defining libc symbols in the executable (open, rename, ftruncate here; write, pwrite, writev,
 * pwritev, fallocate, posix_fallocate, fsync, fdatasync report to it from their own files), so
 * that librocksdb binds to them; unarmed, every one forwards after one atomic load.
 *
 * What librocksdb 7.8.3 (Debian 12) calls, from `nm -D` and strace of a workload with flushes
 * and compactions: open (O_CREAT|O_TRUNC for new WAL, SST, MANIFEST, OPTIONS and *.dbtmp files),
 * write for all data (WAL, SST, MANIFEST, CURRENT and OPTIONS temp files), fdatasync for WAL, SST
 * and MANIFEST, fsync for OPTIONS files and the directory, fallocate(FALLOC_FL_KEEP_SIZE) to
 * preallocate WAL and MANIFEST, ftruncate to the written size at close, rename to install
 * CURRENT, IDENTITY and OPTIONS-N, unlink of obsolete files, sync_file_range (writeback only,
 * never durability), no writable shared mmap (allow_mmap_writes is off), no link. pwrite,
 * pwrite64, writev and pwritev are tracked too (newer RocksDB releases and direct I/O use them).
 *
 * Model, per file under the directory (identified by device and inode):
 * - its durable size: its size when armed or at its last successful fsync/fdatasync (0 for a
 *   file created after arming);
 * - the changes since: every write (offset, length; for a write that replaces existing bytes,
 *   an overwrite, those old bytes are saved, appends save nothing) and every size change
 *   (ftruncate, O_TRUNC, fallocate that grows the file; a shrink saves the bytes it cut off).
 *   A successful fsync/fdatasync of the file makes every change made before it durable.
 * Per directory: creations (open with O_CREAT of a missing name) and renames onto a name under
 * it, in time order, until a successful fsync of the directory makes them durable. A rename
 * that replaces a file saves the replaced file's content (CURRENT is a few bytes; a target over
 * 16 MiB is not saved, and that rename counts as durable at once and as `unhandled`).
 *
 * At the cut (seed and mode choose; see kv_powerloss.h):
 * - directory entries: a prefix in time order of the pending creations and renames survives
 *   (default), or each independently (SAGA_KV_POWERLOSS_UNORDERED_DIRS); the others are undone
 *   newest first: a rename is moved back and the replaced file's old content restored, a
 *   created file is removed;
 * - file data: per file, a prefix in time order of its pending changes survives and the first
 *   lost write may be torn to a prefix (at a 512-byte boundary, or any byte) (default), or each
 *   change is kept, dropped or torn independently (SAGA_KV_POWERLOSS_HOLES: a dropped write
 *   below surviving data reads as zeros, a dropped append may leave zeros with the size kept,
 *   a torn write keeps a prefix or some of its 4 KiB blocks). A dropped overwrite gets its old
 *   bytes back, a dropped size change is undone. Nothing is garbled: torn or lost bytes read
 *   as zeros or are cut off.
 *
 * Honest limits:
 * - unlink is not tracked: a removal is durable at once (a real power loss could bring back an
 *   obsolete file; RocksDB ignores and deletes old WAL and SST files it no longer lists);
 * - a file that already exists when armed counts as durable, content and name; so does the
 *   directory itself;
 * - only calls through the interposed symbols are seen: writes made inside the C library
 *   (stdio: RocksDB's info LOG goes through fwrite) and writes through a shared mmap are not
 *   (RocksDB does not write its data that way here), nor are mkdir, link, renameat, openat,
 *   open64, or a file created under the directory by another process;
 * - O_APPEND writes are placed at the size read just before the call (single writer per file);
 * - fdatasync and fsync are both treated as making a file's data and size durable, never its
 *   name (only an fsync of the directory does that); sync_file_range makes nothing durable;
 * - fallocate that punches or zeroes a range changes content unseen (counted in `unhandled`);
 * - the rewrite happens on the live file system, so what survives is what this model chose,
 *   not what the disk would have had (no reordering inside a single write besides tearing, no
 *   damage to synced data, metadata blocks never torn).
 * A power cut does not wait for a sync to finish: a sync (of a file or the directory) still
 * running when the cut begins makes nothing durable, and neither it nor any other call that was
 * in flight returns to its caller (RocksDB must not acknowledge a write the cut may drop).
 * Thread-safe: calls that touch the directory hold a reader side of a writer-preferring lock
 * while they run, the cut takes the writer side and keeps it, so nothing under the directory
 * changes while (or after) it rewrites the files. Not async-signal-safe. */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE
#include "kv_powerloss.h"
#include "powerloss_hooks.h"
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PL_MAX_SAVED ((off_t)16 << 20)

enum { CH_WRITE, CH_RESIZE };

typedef struct change {
    int kind;
    off_t off, len;          /* write: where and how much */
    off_t size_before;       /* the file's size before it */
    off_t new_size;          /* resize: the size after it */
    unsigned char *old;      /* the bytes it replaced, at old_off */
    off_t old_off, old_len;
    unsigned long long seq;
} change;

typedef struct tracked_file {
    dev_t dev;
    ino_t ino;
    char path[PATH_MAX];     /* its last known name under the directory; "" if gone */
    off_t durable_size;
    change *changes;
    size_t n, cap;
} tracked_file;

enum { OP_CREATE, OP_RENAME };

typedef struct dir_op {
    int kind;
    dev_t dev;
    ino_t ino;
    char dir[PATH_MAX];      /* the directory whose fsync makes it durable */
    char from[PATH_MAX];     /* rename: the old name */
    char to[PATH_MAX];       /* create: the name; rename: the new name */
    int replaced;            /* rename: a file was there */
    unsigned char *old;      /* its content */
    size_t old_len;
    unsigned long long seq;
} dir_op;

static atomic_int pl_armed;
static pthread_rwlock_t pl_io;               /* readers: calls in flight; writer: the cut */
static pthread_once_t pl_init_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t pl_mu = PTHREAD_MUTEX_INITIALIZER;   /* guards everything below */
static char pl_dir[PATH_MAX];
static size_t pl_dir_len;
static tracked_file **pl_files;
static size_t pl_nfiles, pl_capfiles;
static dir_op **pl_ops;
static size_t pl_nops, pl_capops;
static unsigned long long pl_seq;
static saga_kv_powerloss_counters pl_count;

typedef int (*open_fn)(const char *, int, ...);
typedef int (*rename_fn)(const char *, const char *);
typedef int (*ftruncate_fn)(int, off_t);
typedef int (*unlink_fn)(const char *);
static open_fn real_open;
static unlink_fn real_unlink;
static rename_fn real_rename;
static ftruncate_fn real_ftruncate;

static void pl_init(void) {
    real_open = (open_fn)dlsym(RTLD_NEXT, "open");
    real_rename = (rename_fn)dlsym(RTLD_NEXT, "rename");
    real_unlink = (unlink_fn)dlsym(RTLD_NEXT, "unlink");
    real_ftruncate = (ftruncate_fn)dlsym(RTLD_NEXT, "ftruncate");
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    /* A waiting cut stops new calls from starting: it cannot be starved by a busy store. */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&pl_io, &a);
    pthread_rwlockattr_destroy(&a);
}
#define PL_INIT() pthread_once(&pl_init_once, pl_init)

/* Set when a cut begins. A call that was in flight then does not return: a sync that had not
 * returned when the power went off made nothing durable, and the caller must not go on as if it
 * had (a KV batch acknowledged after the cut dropped it could let its saga commit in SQL). */
static atomic_int pl_cutting;

/* Ends a call's hold on the I/O lock; during a cut, the call never returns. */
static void leave_io(void) {
    pthread_rwlock_unlock(&pl_io);
    if (atomic_load(&pl_cutting))
        for (;;) pause();
}

/* ---- paths ---- */

static int under_dir(const char *path) {
    return pl_dir_len > 0 && strncmp(path, pl_dir, pl_dir_len) == 0 && (path[pl_dir_len] == '/' || path[pl_dir_len] == 0);
}

/* The resolved path of fd, if it is under the directory (deleted files are not). */
static int fd_under_dir(int fd, char *path) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, PATH_MAX - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    if (n > 10 && strcmp(path + n - 10, " (deleted)") == 0) return 0;
    pthread_mutex_lock(&pl_mu);
    int ok = under_dir(path);
    pthread_mutex_unlock(&pl_mu);
    return ok;
}

/* `path` with its directory part resolved (the name itself may not exist), into out; whether
 * it is under the directory. */
static int path_under_dir(const char *path, char *out) {
    char abs[PATH_MAX], dir[PATH_MAX], resolved[PATH_MAX];
    if (path[0] == '/') {
        snprintf(abs, sizeof abs, "%s", path);
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) return 0;
        if (snprintf(abs, sizeof abs, "%s/%s", cwd, path) >= (int)sizeof abs) return 0;
    }
    char *slash = strrchr(abs, '/');
    if (!slash) return 0;
    snprintf(dir, sizeof dir, "%.*s", (int)(slash - abs), abs);
    if (dir[0] == 0) snprintf(dir, sizeof dir, "/");
    if (!realpath(dir, resolved)) return 0;
    if (snprintf(out, PATH_MAX, "%s/%s", strcmp(resolved, "/") == 0 ? "" : resolved, slash + 1) >= PATH_MAX) return 0;
    pthread_mutex_lock(&pl_mu);
    int ok = under_dir(out);
    pthread_mutex_unlock(&pl_mu);
    return ok;
}

static void parent_of(const char *path, char *out) {
    const char *slash = strrchr(path, '/');
    snprintf(out, PATH_MAX, "%.*s", slash ? (int)(slash - path) : 0, path);
}

/* ---- tables (pl_mu held) ---- */

/* Makes room for one more element in a growable array (aborts when memory runs out). */
static void *room_for_one(void *items, size_t n, size_t *cap, size_t size) {
    if (n < *cap) return items;
    size_t grown_cap = *cap ? *cap * 2 : 64;
    void *grown = realloc(items, grown_cap * size);
    if (!grown) abort();
    *cap = grown_cap;
    return grown;
}

static tracked_file *find_file(dev_t dev, ino_t ino) {
    for (size_t i = 0; i < pl_nfiles; i++)
        if (pl_files[i]->dev == dev && pl_files[i]->ino == ino) return pl_files[i];
    return NULL;
}

/* The file's record; a file not seen before counts as durable as it is now (`size`). */
static tracked_file *file_for(dev_t dev, ino_t ino, const char *path, off_t size) {
    tracked_file *f = find_file(dev, ino);
    if (!f) {
        pl_files = room_for_one(pl_files, pl_nfiles, &pl_capfiles, sizeof *pl_files);
        f = calloc(1, sizeof *f);
        if (!f) abort();
        f->dev = dev;
        f->ino = ino;
        f->durable_size = size;
        pl_files[pl_nfiles++] = f;
    }
    if (path) snprintf(f->path, sizeof f->path, "%s", path);
    return f;
}

static void add_change(tracked_file *f, change c) {
    f->changes = room_for_one(f->changes, f->n, &f->cap, sizeof *f->changes);
    c.seq = ++pl_seq;
    f->changes[f->n++] = c;
    pl_count.unsynced_changes++;
    if (c.kind == CH_WRITE) pl_count.unsynced_bytes += c.len;
}

static void add_op(dir_op *op) {
    pl_ops = room_for_one(pl_ops, pl_nops, &pl_capops, sizeof *pl_ops);
    op->seq = ++pl_seq;
    pl_ops[pl_nops++] = op;
    pl_count.pending_dir_ops++;
}

static void forget_changes(tracked_file *f, size_t upto) {
    for (size_t i = 0; i < upto; i++) {
        pl_count.unsynced_changes--;
        if (f->changes[i].kind == CH_WRITE) pl_count.unsynced_bytes -= f->changes[i].len;
        free(f->changes[i].old);
    }
    memmove(f->changes, f->changes + upto, (f->n - upto) * sizeof *f->changes);
    f->n -= upto;
}

/* Forgets a file that is gone (removed, or replaced by a rename): its inode may be reused. */
static void drop_file(dev_t dev, ino_t ino) {
    for (size_t i = 0; i < pl_nfiles; i++) {
        tracked_file *f = pl_files[i];
        if (f->dev != dev || f->ino != ino) continue;
        forget_changes(f, f->n);
        free(f->changes);
        free(f);
        pl_files[i] = pl_files[--pl_nfiles];
        return;
    }
}

static void forget_all(void) {
    for (size_t i = 0; i < pl_nfiles; i++) {
        forget_changes(pl_files[i], pl_files[i]->n);
        free(pl_files[i]->changes);
        free(pl_files[i]);
    }
    for (size_t i = 0; i < pl_nops; i++) {
        free(pl_ops[i]->old);
        free(pl_ops[i]);
    }
    pl_nfiles = pl_nops = 0;
}

/* Reads [off, off+len) of fd (bytes past the end are left out); NULL if len is 0. */
static unsigned char *read_range(int fd, off_t off, off_t len, off_t *got) {
    *got = 0;
    if (len <= 0) return NULL;
    unsigned char *buf = malloc((size_t)len);
    if (!buf) abort();
    while (*got < len) {
        ssize_t r = pread(fd, buf + *got, (size_t)(len - *got), off + *got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        *got += r;
    }
    return buf;
}

/* ---- arming, counters ---- */

int saga_kv_powerloss_arm(const char *directory) {
    PL_INIT();
    char resolved[PATH_MAX];
    if (!realpath(directory, resolved)) return -1;
    pthread_rwlock_wrlock(&pl_io);
    pthread_mutex_lock(&pl_mu);
    forget_all();
    snprintf(pl_dir, sizeof pl_dir, "%s", resolved);
    pl_dir_len = strlen(pl_dir);
    memset(&pl_count, 0, sizeof pl_count);
    atomic_store(&pl_armed, 1);
    pthread_mutex_unlock(&pl_mu);
    pthread_rwlock_unlock(&pl_io);
    return 0;
}

void saga_kv_powerloss_disarm(void) {
    PL_INIT();
    pthread_rwlock_wrlock(&pl_io);
    pthread_mutex_lock(&pl_mu);
    atomic_store(&pl_armed, 0);
    forget_all();
    pl_dir[0] = 0;
    pl_dir_len = 0;
    pthread_mutex_unlock(&pl_mu);
    pthread_rwlock_unlock(&pl_io);
}

void saga_kv_powerloss_get_counters(saga_kv_powerloss_counters *out) {
    pthread_mutex_lock(&pl_mu);
    *out = pl_count;
    out->tracked_files = (long)pl_nfiles;
    pthread_mutex_unlock(&pl_mu);
}

/* ---- hooks for the write-family and fsync interposers ---- */

/* Whether fd is a regular file or directory under the directory; if so, holds the I/O lock
 * and fills st. */
static int enter_fd(int fd, struct stat *st, char *path) {
    if (!atomic_load(&pl_armed)) return 0;
    PL_INIT();
    if (!fd_under_dir(fd, path)) return 0;
    pthread_rwlock_rdlock(&pl_io);
    if (!atomic_load(&pl_armed) || fstat(fd, st) != 0 || !(S_ISREG(st->st_mode) || S_ISDIR(st->st_mode))) {
        leave_io();
        return 0;
    }
    return 1;
}

int saga_pl_write_begin(int fd, off_t off, size_t len, saga_pl_ticket *t) {
    struct stat st;
    char path[PATH_MAX];
    if (!enter_fd(fd, &st, path)) return 0;
    if (!S_ISREG(st.st_mode)) { leave_io(); return 0; }
    if (off < 0) off = (fcntl(fd, F_GETFL) & O_APPEND) ? st.st_size : lseek(fd, 0, SEEK_CUR);
    memset(t, 0, offsetof(saga_pl_ticket, dir));
    t->off = off < 0 ? 0 : off;
    t->size_before = st.st_size;
    /* An overwrite: save what it replaces (an append saves nothing). */
    if (t->off < st.st_size && len > 0) {
        off_t want = (off_t)len < st.st_size - t->off ? (off_t)len : st.st_size - t->off;
        t->old_off = t->off;
        t->old = read_range(fd, t->off, want, &t->old_len);
    }
    pthread_mutex_lock(&pl_mu);
    t->file = file_for(st.st_dev, st.st_ino, path, st.st_size);
    pthread_mutex_unlock(&pl_mu);
    return 1;
}

void saga_pl_write_end(saga_pl_ticket *t, ssize_t written) {
    pthread_mutex_lock(&pl_mu);
    if (written > 0) {
        change c = {.kind = CH_WRITE, .off = t->off, .len = written, .size_before = t->size_before,
                    .old = t->old, .old_off = t->old_off, .old_len = t->old_len < written ? t->old_len : written};
        if (!c.old_len) { free(c.old); c.old = NULL; }
        add_change(t->file, c);
        pl_count.writes++;
        pl_count.bytes_written += written;
        if (c.old_len) pl_count.overwrites++;
    } else {
        free(t->old);
    }
    pthread_mutex_unlock(&pl_mu);
    leave_io();
}

int saga_pl_sync_begin(int fd, saga_pl_ticket *t) {
    struct stat st;
    char path[PATH_MAX];
    if (!enter_fd(fd, &st, path)) return 0;
    memset(t, 0, offsetof(saga_pl_ticket, dir));
    t->is_dir = S_ISDIR(st.st_mode);
    t->new_size = st.st_size;
    if (t->is_dir) snprintf(t->dir, sizeof t->dir, "%s", path);
    pthread_mutex_lock(&pl_mu);
    t->seq = pl_seq;
    if (!t->is_dir) t->file = file_for(st.st_dev, st.st_ino, path, st.st_size);
    pthread_mutex_unlock(&pl_mu);
    return 1;
}

void saga_pl_sync_end(saga_pl_ticket *t, int rc) {
    if (atomic_load(&pl_cutting)) leave_io();   /* cut before it returned: nothing made durable */
    pthread_mutex_lock(&pl_mu);
    if (rc == 0 && t->is_dir) {
        /* Creations and renames in this directory made before the sync are durable now. */
        size_t kept = 0;
        for (size_t i = 0; i < pl_nops; i++) {
            dir_op *op = pl_ops[i];
            if (op->seq <= t->seq && strcmp(op->dir, t->dir) == 0) {
                free(op->old);
                free(op);
                pl_count.pending_dir_ops--;
            } else {
                pl_ops[kept++] = op;
            }
        }
        pl_nops = kept;
        pl_count.dir_syncs++;
    } else if (rc == 0) {
        /* Every change made before the sync is durable now (a change from a call that ran
         * concurrently with it stays pending: the harsher choice). */
        tracked_file *f = t->file;
        size_t upto = 0;
        while (upto < f->n && f->changes[upto].seq <= t->seq) upto++;
        forget_changes(f, upto);
        f->durable_size = t->new_size;
        pl_count.file_syncs++;
    }
    pthread_mutex_unlock(&pl_mu);
    leave_io();
}

/* A size change of a tracked file from size_before to new_size; a shrink saves what it cuts. */
static void begin_resize(int fd, const struct stat *st, const char *path, off_t new_size, saga_pl_ticket *t) {
    memset(t, 0, offsetof(saga_pl_ticket, dir));
    t->size_before = st->st_size;
    t->new_size = new_size;
    if (new_size < st->st_size) {
        if (st->st_size - new_size <= PL_MAX_SAVED) {
            t->old_off = new_size;
            t->old = read_range(fd, new_size, st->st_size - new_size, &t->old_len);
        } else {
            t->new_size = -1;   /* not undoable: counted, treated as durable */
        }
    }
    pthread_mutex_lock(&pl_mu);
    t->file = file_for(st->st_dev, st->st_ino, path, st->st_size);
    pthread_mutex_unlock(&pl_mu);
}

int saga_pl_fallocate_begin(int fd, int mode, off_t off, off_t len, saga_pl_ticket *t) {
    struct stat st;
    char path[PATH_MAX];
    if (!enter_fd(fd, &st, path)) return 0;
    if (!S_ISREG(st.st_mode)) { leave_io(); return 0; }
    if (mode & ~FALLOC_FL_KEEP_SIZE) {
        /* Punching or zeroing a range: not modelled. */
        pthread_mutex_lock(&pl_mu);
        pl_count.unhandled++;
        pthread_mutex_unlock(&pl_mu);
    }
    off_t grown = (mode & FALLOC_FL_KEEP_SIZE) || off + len <= st.st_size ? st.st_size : off + len;
    begin_resize(fd, &st, path, grown, t);
    return 1;
}

/* Records a size change (the I/O lock stays held). */
static void finish_resize(saga_pl_ticket *t, int rc) {
    pthread_mutex_lock(&pl_mu);
    if (rc == 0 && t->new_size < 0) {
        pl_count.unhandled++;
    } else if (rc == 0 && t->new_size != t->size_before) {
        change c = {.kind = CH_RESIZE, .size_before = t->size_before, .new_size = t->new_size,
                    .old = t->old, .old_off = t->old_off, .old_len = t->old_len};
        add_change(t->file, c);
        pl_count.resizes++;
        t->old = NULL;
    }
    free(t->old);
    pthread_mutex_unlock(&pl_mu);
}

void saga_pl_resize_end(saga_pl_ticket *t, int rc) {
    finish_resize(t, rc);
    leave_io();
}

/* ---- interposed here: open, ftruncate, rename ---- */

int ftruncate(int fd, off_t length) {
    PL_INIT();
    struct stat st;
    char path[PATH_MAX];
    saga_pl_ticket t;
    if (!enter_fd(fd, &st, path)) return real_ftruncate(fd, length);
    if (!S_ISREG(st.st_mode)) {
        leave_io();
        return real_ftruncate(fd, length);
    }
    begin_resize(fd, &st, path, length, &t);
    int rc = real_ftruncate(fd, length);
    int e = errno;
    saga_pl_resize_end(&t, rc);
    errno = e;
    return rc;
}

int open(const char *path, int flags, ...) {
    PL_INIT();
    mode_t mode = 0;
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    char full[PATH_MAX];
    if (!atomic_load(&pl_armed) || !(flags & (O_CREAT | O_TRUNC)) || (flags & O_TMPFILE) == O_TMPFILE
        || !path_under_dir(path, full))
        return real_open(path, flags, mode);
    pthread_rwlock_rdlock(&pl_io);
    struct stat before;
    int existed = stat(full, &before) == 0;
    saga_pl_ticket t;
    int resizing = 0;
    int fd;
    if (existed && S_ISREG(before.st_mode) && (flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY && before.st_size > 0) {
        /* Truncating a file with content: a size change like ftruncate's. */
        int rfd = real_open(full, O_RDONLY | O_CLOEXEC);
        if (rfd >= 0) {
            begin_resize(rfd, &before, full, 0, &t);
            close(rfd);
            resizing = 1;
        }
    }
    fd = real_open(path, flags, mode);
    int e = errno;
    if (resizing) finish_resize(&t, fd >= 0 ? 0 : -1);
    struct stat st;
    if (fd >= 0 && !existed && fstat(fd, &st) == 0) {
        dir_op *op = calloc(1, sizeof *op);
        if (!op) abort();
        op->kind = OP_CREATE;
        op->dev = st.st_dev;
        op->ino = st.st_ino;
        snprintf(op->to, sizeof op->to, "%s", full);
        parent_of(full, op->dir);
        pthread_mutex_lock(&pl_mu);
        tracked_file *f = file_for(st.st_dev, st.st_ino, full, 0);
        forget_changes(f, f->n);   /* a stale record of a reused inode */
        f->durable_size = 0;
        add_op(op);
        pl_count.creates++;
        pthread_mutex_unlock(&pl_mu);
    }
    leave_io();
    errno = e;
    return fd;
}

/* The whole content of a file, at most PL_MAX_SAVED bytes; -1 if bigger or unreadable. */
static int save_file(const char *path, off_t size, unsigned char **out, size_t *len) {
    if (size > PL_MAX_SAVED) return -1;
    int fd = real_open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    off_t got = 0;
    *out = read_range(fd, 0, size, &got);
    *len = (size_t)got;
    close(fd);
    return 0;
}

int rename(const char *from, const char *to) {
    PL_INIT();
    char full_from[PATH_MAX], full_to[PATH_MAX];
    if (!atomic_load(&pl_armed) || !path_under_dir(to, full_to)) return real_rename(from, to);
    int from_under = path_under_dir(from, full_from);
    pthread_rwlock_rdlock(&pl_io);
    struct stat moved, target;
    int have_moved = stat(from, &moved) == 0;
    int have_target = stat(full_to, &target) == 0 && S_ISREG(target.st_mode);
    dir_op *op = calloc(1, sizeof *op);
    if (!op) abort();
    int undoable = have_moved && from_under && S_ISREG(moved.st_mode);
    if (undoable && have_target && save_file(full_to, target.st_size, &op->old, &op->old_len) != 0) undoable = 0;
    op->replaced = have_target;
    int rc = real_rename(from, to);
    int e = errno;
    pthread_mutex_lock(&pl_mu);
    if (rc == 0) {
        pl_count.renames++;
        if (have_target) {
            drop_file(target.st_dev, target.st_ino);   /* replaced: its content lives in the saved copy */
        }
        if (have_moved) {
            tracked_file *f = find_file(moved.st_dev, moved.st_ino);
            if (f) snprintf(f->path, sizeof f->path, "%s", full_to);
        }
    }
    if (rc == 0 && undoable) {
        op->kind = OP_RENAME;
        op->dev = moved.st_dev;
        op->ino = moved.st_ino;
        snprintf(op->from, sizeof op->from, "%s", full_from);
        snprintf(op->to, sizeof op->to, "%s", full_to);
        parent_of(full_to, op->dir);
        add_op(op);
        op = NULL;
    } else if (rc == 0) {
        pl_count.unhandled++;
    }
    pthread_mutex_unlock(&pl_mu);
    if (op) {
        free(op->old);
        free(op);
    }
    leave_io();
    errno = e;
    return rc;
}

/* Removal counts as durable at once (see the limits above); the file's record is forgotten,
 * as its inode may be reused. */
int unlink(const char *path) {
    PL_INIT();
    char full[PATH_MAX];
    if (!atomic_load(&pl_armed) || !path_under_dir(path, full)) return real_unlink(path);
    pthread_rwlock_rdlock(&pl_io);
    struct stat st;
    int known = stat(full, &st) == 0;
    int rc = real_unlink(path);
    int e = errno;
    if (rc == 0 && known) {
        pthread_mutex_lock(&pl_mu);
        drop_file(st.st_dev, st.st_ino);
        pthread_mutex_unlock(&pl_mu);
    }
    leave_io();
    errno = e;
    return rc;
}

/* ---- the cut ---- */

static unsigned long long pl_rng;
static unsigned long long rnd(void) {
    unsigned long long z = (pl_rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static off_t below(off_t n) { return n <= 0 ? 0 : (off_t)(rnd() % (unsigned long long)n); }

typedef struct {
    long files, changes, kept, dropped, torn, zero_sized, bytes_lost, ops, ops_undone, creates_undone, renames_undone, skipped;
    char names[256];   /* "name:changes " per file, for the report (cut short if long) */
} cut_stats;

static int same_file(const char *path, dev_t dev, ino_t ino) {
    struct stat st;
    return stat(path, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
}

static void write_all(int fd, const unsigned char *buf, off_t len, off_t off) {
    while (len > 0) {
        ssize_t w = (ssize_t)syscall(SYS_pwrite64, fd, buf, (size_t)len, off);   /* never through the interposers */
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        buf += w;
        len -= w;
        off += w;
    }
}

static void undo_dir_ops(int mode, cut_stats *s) {
    s->ops = (long)pl_nops;
    size_t keep_prefix = (size_t)below((off_t)pl_nops + 1);
    for (size_t j = pl_nops; j-- > 0;) {
        dir_op *op = pl_ops[j];
        int keep = (mode & SAGA_KV_POWERLOSS_UNORDERED_DIRS) ? (int)(rnd() & 1) : j < keep_prefix;
        if (keep) continue;
        if (!same_file(op->to, op->dev, op->ino)) { s->skipped++; continue; }
        tracked_file *f = find_file(op->dev, op->ino);
        if (op->kind == OP_RENAME) {
            if (real_rename(op->to, op->from) != 0) { s->skipped++; continue; }
            if (f) snprintf(f->path, sizeof f->path, "%s", op->from);
            if (op->replaced) {
                int fd = real_open(op->to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd >= 0) {
                    write_all(fd, op->old, (off_t)op->old_len, 0);
                    close(fd);
                }
            }
            s->renames_undone++;
        } else {
            if (real_unlink(op->to) != 0) { s->skipped++; continue; }
            if (f) f->path[0] = 0;
            s->creates_undone++;
        }
        s->ops_undone++;
    }
}

/* What survives of a file's changes, walked newest first: the spans of surviving writes
 * (older lost bytes must not overwrite them), the lowest of their offsets, the size they need
 * (`floor`, never past a surviving shrink made after them: `cap`). */
typedef struct { off_t a, b; } span;
typedef struct {
    span *spans;
    size_t n, cap_spans;
    off_t min_off, floor, cap;
} survivors;

static void survive(survivors *v, off_t a, off_t b) {
    if (a >= b) return;
    v->spans = room_for_one(v->spans, v->n, &v->cap_spans, sizeof *v->spans);
    v->spans[v->n++] = (span){a, b};
    if (a < v->min_off) v->min_off = a;
    off_t end = b < v->cap ? b : v->cap;
    if (end > v->floor) v->floor = end;
}

/* Writes old bytes (zeros where src is NULL) over [a, b), except where a surviving write lies. */
static void restore_masked(int fd, off_t a, off_t b, const unsigned char *src, const survivors *v) {
    if (a >= b) return;
    unsigned char *mask = NULL;
    if (b > v->min_off) {
        mask = calloc((size_t)(b - a), 1);
        if (!mask) abort();
        for (size_t i = 0; i < v->n; i++) {
            off_t x = v->spans[i].a > a ? v->spans[i].a : a, y = v->spans[i].b < b ? v->spans[i].b : b;
            if (x < y) memset(mask + (x - a), 1, (size_t)(y - x));
        }
    }
    static const unsigned char zeros[65536];
    off_t i = a;
    while (i < b) {
        if (mask && mask[i - a]) { i++; continue; }
        off_t j = i;
        while (j < b && !(mask && mask[j - a]) && j - i < (off_t)sizeof zeros) j++;
        write_all(fd, src ? src + (i - a) : zeros, j - i, i);
        i = j;
    }
    free(mask);
}

enum { KEPT, DROPPED, TORN };

/* Puts one file in the state the cut leaves it in (see the header comment). */
static void cut_file(tracked_file *f, int mode, cut_stats *s) {
    if (f->n == 0 || !f->path[0]) return;
    if (!same_file(f->path, f->dev, f->ino)) { s->skipped++; return; }
    int fd = real_open(f->path, O_RDWR | O_CLOEXEC);
    if (fd < 0) { s->skipped++; return; }
    struct stat st;
    if (fstat(fd, &st) != 0) { close(fd); s->skipped++; return; }
    s->files++;
    s->changes += (long)f->n;
    size_t used = strlen(s->names);
    const char *base = strrchr(f->path, '/');
    snprintf(s->names + used, sizeof s->names - used, "%s%s:%zu", used ? " " : "", base ? base + 1 : f->path, f->n);
    int holes = mode & SAGA_KV_POWERLOSS_HOLES;
    size_t cut = (size_t)below((off_t)f->n + 1);      /* default: changes [0, cut) survive */
    survivors v = {.min_off = st.st_size + 1, .cap = st.st_size};
    off_t size = st.st_size;
    for (size_t j = f->n; j-- > 0;) {
        change *c = &f->changes[j];
        int fate = holes ? (int)(below(5) % 3) : j < cut ? KEPT : j == cut && (rnd() & 1) ? TORN : DROPPED;
        if (c->kind == CH_RESIZE) {
            if (fate == KEPT) {
                if (c->new_size < v.cap) v.cap = c->new_size;
                if (v.cap > v.floor) v.floor = v.cap < c->new_size ? v.cap : c->new_size;
                s->kept++;
            } else {
                if (c->old) restore_masked(fd, c->old_off, c->old_off + c->old_len, c->old, &v);
                size = c->size_before > v.floor ? c->size_before : v.floor;
                s->dropped++;
            }
            continue;
        }
        off_t a = c->off, b = c->off + c->len;
        if (fate == KEPT) {
            survive(&v, a, b);
            s->kept++;
            continue;
        }
        if (fate == TORN && holes && (rnd() & 1)) {
            /* Some of its 4 KiB blocks reached the disk, the others did not. */
            for (off_t blk = a & ~(off_t)4095; blk < b; blk += 4096) {
                off_t x = blk > a ? blk : a, y = blk + 4096 < b ? blk + 4096 : b;
                if (rnd() & 1) survive(&v, x, y); else s->bytes_lost += y - x;
            }
        } else if (fate == TORN) {
            /* A prefix reached the disk: up to a 512-byte sector boundary, or any byte. */
            off_t k = below(c->len);
            if (rnd() & 1) k = ((a + k) & ~(off_t)511) - a;
            if (k > 0) survive(&v, a, a + k);
            s->bytes_lost += b - a - (k > 0 ? k : 0);
        } else {
            s->bytes_lost += b - a;
        }
        if (fate == TORN) s->torn++; else s->dropped++;
        restore_masked(fd, a, b, NULL, &v);
        if (c->old) restore_masked(fd, c->old_off, c->old_off + c->old_len, c->old, &v);
        if (holes && fate == DROPPED && below(4) == 0) {
            s->zero_sized++;   /* the size reached the disk, the data did not: zeros */
        } else {
            size = c->size_before > v.floor ? c->size_before : v.floor;
        }
    }
    if (size != st.st_size) real_ftruncate(fd, size);
    free(v.spans);
    close(fd);
}

void saga_kv_powerloss_cut(unsigned long long seed, int mode, int report_fd) {
    PL_INIT();
    /* Calls in flight finish their real work but never return (syncs among them make nothing
     * durable); every later one waits for good. */
    atomic_store(&pl_cutting, 1);
    pthread_rwlock_wrlock(&pl_io);
    pthread_mutex_lock(&pl_mu);
    pl_rng = seed;
    cut_stats s;
    memset(&s, 0, sizeof s);
    long pending_changes = pl_count.unsynced_changes;
    undo_dir_ops(mode, &s);
    for (size_t i = 0; i < pl_nfiles; i++) cut_file(pl_files[i], mode, &s);
    if (report_fd >= 0) {
        char line[1024];
        int n = snprintf(line, sizeof line,
                         "kv power loss (seed %llu, mode %d): %ld unsynced change(s) in %ld file(s) [%s]: %ld kept, %ld dropped, %ld torn, %ld zeroed with the size kept, %ld bytes lost; %ld directory op(s) pending, %ld undone (%ld creations, %ld renames); %ld skipped\n",
                         seed, mode, pending_changes, s.files, s.names, s.kept, s.dropped, s.torn, s.zero_sized, s.bytes_lost,
                         s.ops, s.ops_undone, s.creates_undone, s.renames_undone, s.skipped);
        if (n > (int)sizeof line - 1) n = (int)sizeof line - 1;
        if (n > 0) (void)syscall(SYS_write, report_fd, line, (size_t)n);
    }
    kill(getpid(), SIGKILL);
    for (;;) pause();
}
