#ifndef SAGA_FAULTS_H
#define SAGA_FAULTS_H

/* Fault injection around a real SQLite, for tests and the demo: a SQLite VFS named "saga-fault" that wraps the default VFS and forwards every
 *    method; armed, it fails the n-th xSync or xWrite from now (once, or from then on).
 * The counters are process-global and atomic. */

#ifdef __cplusplus
extern "C" {
#endif

#define SAGA_FAULT_VFS_NAME "saga-fault"

enum saga_fault_op {
    SAGA_FAULT_SYNC = 1,  /* xSync fails with SQLITE_IOERR_FSYNC */
    SAGA_FAULT_WRITE = 2, /* xWrite fails with SQLITE_IOERR_WRITE */
    SAGA_FAULT_FULL = 3   /* xWrite fails with SQLITE_FULL */
};

/* Registers the VFS (not as the default). Idempotent. Returns an SQLite result code. */
int saga_fault_vfs_register(void);

/* Arms the VFS: the countdown-th matching operation from now fails (1 = the next one).
 * persistent != 0: every matching operation after that one fails too, until disarmed.
 * path_prefix: only files whose path starts with it match (NULL or "": every file). */
void saga_fault_vfs_arm(int op, int countdown, int persistent, const char *path_prefix);
void saga_fault_vfs_disarm(void);
/* How many operations the VFS has failed since it was last armed. */
int saga_fault_vfs_failures(void);
/* How many xSync calls went through the VFS (for counting fsyncs). */
long saga_fault_vfs_syncs(void);

/* Power-loss simulation for files whose path starts with path_prefix ("" or NULL: every file).
 * track_power(1, prefix): remember every write until its file is synced; track_power(0, _): forget.
 * power_loss(seed): for each unsynced write, newest first, keep it, drop it (old bytes back,
 * file shrunk) or garble it (noise over part of it), chosen by the seed. It then holds an
 * internal lock for good: kill the process right after. Returns how many writes were unsynced. */
void saga_fault_vfs_track_power(int on, const char *path_prefix);
long saga_fault_vfs_unsynced_writes(void);
long saga_fault_vfs_power_loss(unsigned long long seed, long *dropped, long *garbled);

#ifdef __cplusplus
}
#endif
#endif
