#ifndef SAGA_WRITE_FAULTS_H
#define SAGA_WRITE_FAULTS_H
/* A write-family interposer for test programs only (write, pwrite, pwrite64, writev, pwritev,
 * and fallocate/posix_fallocate), linked like the fsync one: unarmed it forwards; armed, the
 * countdown-th write-family call on a file under path_prefix fails with error_number (ENOSPC
 * or EIO), and with persistent != 0 every later one too. A descriptor's path is read from
 * /proc/self/fd while armed. */
#ifdef __cplusplus
extern "C" {
#endif

/* Arms the fault. short_first (persistent only): the tripping call writes half of its bytes
 * for real and returns the short count, as a write() that fills the disk does; the calls after
 * it fail. Once a persistent ENOSPC has tripped, fallocate/posix_fallocate on those files fail
 * with ENOSPC too (they are never counted). path_prefix is copied; its directory part is
 * resolved with realpath. Re-arming resets the counts. */
void saga_fault_write_arm(const char *path_prefix, long countdown, int persistent, int error_number, int short_first);
void saga_fault_write_disarm(void);
/* Calls failed (or cut short) since the last arm. */
int saga_fault_write_failures(void);
/* Write-family calls on files under the prefix since the last arm (failed ones included). */
long saga_fault_write_matched(void);
/* Every injected failure appends one line "op errno=N path\n" to fd with a single write(2),
 * so the lines survive an abort right after it. -1 turns it off. */
void saga_fault_write_log_to(int fd);

#ifdef __cplusplus
}
#endif
#endif
