#ifndef SAGA_KV_POWERLOSS_H
#define SAGA_KV_POWERLOSS_H
/* A power-loss simulation for the files of one directory (a RocksDB store's), for test
 * programs only: linked like the fsync and write interposers (it defines open, rename and
 * ftruncate in the executable and hooks into their write and fsync), it remembers what was
 * written under the directory and not yet made durable, and at a simulated cut rewrites the
 * files to a state a real power loss could leave, then SIGKILLs the process. What it models and
 * what it does not: the header comment of powerloss_interposer.c. */
#ifdef __cplusplus
extern "C" {
#endif

/* Damage models for saga_kv_powerloss_cut (bit flags; 0 is the default). */
enum {
    /* Default (0): per file, a prefix (in time order) of the unsynced writes survives, the
     * first lost one possibly torn to a prefix (at a 512-byte sector boundary or any byte);
     * directory entries (creations, renames) not yet made durable by an fsync of their
     * directory survive as a prefix in time order. A journaling file system (ext4
     * data=ordered) leaves states of this kind. */
    SAGA_KV_POWERLOSS_HOLES = 1,       /* each unsynced write kept, dropped (zeros if later data
                                          survives; sometimes zeros with the size kept) or torn
                                          (a prefix, or some 4 KiB blocks) independently */
    SAGA_KV_POWERLOSS_UNORDERED_DIRS = 2, /* each non-durable creation and rename kept or undone
                                          independently (POSIX promises no order) */
};

/* Starts tracking the directory (it must exist; its path is resolved with realpath). What is
 * in it now counts as durable. Re-arming forgets everything tracked. 0, or -1 with errno. */
int saga_kv_powerloss_arm(const char *directory);
/* Stops tracking and forgets what was tracked (waits for calls in flight). */
void saga_kv_powerloss_disarm(void);

typedef struct saga_kv_powerloss_counters {
    long writes;            /* write-family calls that wrote to a file under the directory */
    long bytes_written;
    long overwrites;        /* of them, writes that replaced existing bytes (old bytes saved) */
    long file_syncs;        /* successful fsync/fdatasync of a file under the directory */
    long dir_syncs;         /* successful fsync/fdatasync of the directory itself */
    long creates;           /* files created under it (open with O_CREAT of a missing name) */
    long renames;           /* renames onto a name under it */
    long resizes;           /* ftruncate, O_TRUNC of a file with content, size-changing fallocate */
    long unhandled;         /* calls that change content in ways not modelled (fallocate punching holes, a rename target too big to save) */
    long unsynced_changes;  /* writes and resizes not yet covered by a sync, now */
    long unsynced_bytes;    /* bytes of those writes, now */
    long pending_dir_ops;   /* creations and renames not yet made durable, now */
    long tracked_files;
} saga_kv_powerloss_counters;

void saga_kv_powerloss_get_counters(saga_kv_powerloss_counters *out);

/* The simulated power cut. Every later call that would touch the directory (a write, sync,
 * open with O_CREAT, rename, truncate of a file under it) blocks forever; calls in flight finish
 * their real work and then block forever too (a sync in flight makes nothing durable). Then the files are rewritten to a state chosen with `seed` and `mode` (the flags
 * above), one line describing it ("kv power loss: ...") is written to report_fd (if >= 0) with
 * a single write(2), and the process SIGKILLs itself. Never returns. */
void saga_kv_powerloss_cut(unsigned long long seed, int mode, int report_fd) __attribute__((noreturn));

#ifdef __cplusplus
}
#endif
#endif
