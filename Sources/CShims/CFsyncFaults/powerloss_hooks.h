#ifndef SAGA_POWERLOSS_HOOKS_H
#define SAGA_POWERLOSS_HOOKS_H
/* Internal: how the write-family and fsync interposers (write_interposer.c,
 * fsync_interposer.c) report to the power-loss simulation (powerloss_interposer.c). Each
 * *_begin returns 0 at once when the simulation is unarmed or the descriptor is not under its
 * directory; otherwise it returns 1 holding the simulation's I/O lock (so that a cut waits for
 * the call), and the matching *_end must follow the real call. */
#include <sys/types.h>

typedef struct saga_pl_ticket {
    void *file;                 /* the tracked file */
    off_t off;                  /* write: where it starts */
    off_t size_before;          /* the file's size before the call */
    off_t new_size;             /* resize: the size after it */
    unsigned char *old;         /* write/resize: the bytes it replaces (an overwrite) */
    off_t old_off;
    off_t old_len;
    unsigned long long seq;     /* sync: changes before it are covered */
    int is_dir;                 /* sync: of a directory */
    char dir[4096];             /* sync of a directory: its path */
} saga_pl_ticket;

/* write/pwrite/writev...: `off` is where the call writes, -1 for the file position. */
int saga_pl_write_begin(int fd, off_t off, size_t len, saga_pl_ticket *t);
void saga_pl_write_end(saga_pl_ticket *t, ssize_t written);
/* fsync/fdatasync of a file or a directory. */
int saga_pl_sync_begin(int fd, saga_pl_ticket *t);
void saga_pl_sync_end(saga_pl_ticket *t, int rc);
/* fallocate (mode as fallocate's; posix_fallocate is mode 0). */
int saga_pl_fallocate_begin(int fd, int mode, off_t off, off_t len, saga_pl_ticket *t);
void saga_pl_resize_end(saga_pl_ticket *t, int rc);

/* The pattern every interposer follows: `call` is the real call (an expression of type
 * ssize_t or int, evaluated once). */
#define SAGA_PL_WRITE(fd, off, len, type, call) do { \
        saga_pl_ticket pl_t_; \
        if (!saga_pl_write_begin((fd), (off), (len), &pl_t_)) return (call); \
        type pl_r_ = (call); \
        int pl_e_ = errno; \
        saga_pl_write_end(&pl_t_, (ssize_t)pl_r_); \
        errno = pl_e_; \
        return pl_r_; \
    } while (0)
#endif
