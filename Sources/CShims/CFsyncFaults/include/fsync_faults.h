#ifndef SAGA_FSYNC_FAULTS_H
#define SAGA_FSYNC_FAULTS_H
/* An fsync/fdatasync interposer for test and benchmark programs only: linked into an
 * executable, it replaces the C library's functions for every dynamically linked caller
 * (librocksdb, libsqlite3 among them). Unarmed it forwards (and counts); armed, the n-th sync
 * of a file under a path prefix fails with EIO. */
/* The write-family companion (write, pwrite, writev, fallocate...). */
#include "write_faults.h"
/* The power-loss simulation for a directory's files (open, rename, ftruncate, unlink...). */
#include "kv_powerloss.h"

#ifdef __cplusplus
extern "C" {
#endif

/* fsync interposer: the countdown-th fsync/fdatasync of a file under path_prefix fails
 * with EIO. persistent != 0: every later one fails too. path_prefix is copied. */
void saga_fault_fsync_arm(const char *path_prefix, int countdown, int persistent);
void saga_fault_fsync_disarm(void);
int saga_fault_fsync_failures(void);
/* fsync + fdatasync calls made by this process so far. */
long saga_fault_fsync_calls(void);
/* Every fsync/fdatasync sleeps this long before syncing (benchmarks: a slower disk); 0 turns it
 * off. Applies to this process only (librocksdb, libsqlite3), not to a database server. */
void saga_fault_fsync_set_delay_ns(long ns);

#ifdef __cplusplus
}
#endif
#endif
