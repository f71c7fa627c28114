/* LD_PRELOAD shim for bench/sync-cost: times every fsync, fdatasync and syncfs the
 * process makes, without ptrace (strace -f slows a pull of many small files several
 * times over, which would dilute the share the syncs take). One line per call is
 * appended to $SYNCTIME_LOG: "call start end thread-name" (CLOCK_MONOTONIC seconds). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static int log_fd = -1;

__attribute__((constructor)) static void open_log(void)
{
    const char *path = getenv("SYNCTIME_LOG");
    if (path)
        log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void note(const char *call, double start, double end)
{
    char name[17] = {0}, line[128];
    if (log_fd < 0)
        return;
    prctl(PR_GET_NAME, name);
    int n = snprintf(line, sizeof line, "%s %.6f %.6f %s\n", call, start, end, name);
    if (n > 0)
        (void)!write(log_fd, line, (size_t)n);  /* O_APPEND: one line, whole, per call */
}

#define TIMED(call)                                                   \
    int call(int fd)                                                  \
    {                                                                 \
        static int (*real)(int);                                      \
        if (!real)                                                    \
            real = (int (*)(int))dlsym(RTLD_NEXT, #call);             \
        double start = now();                                         \
        int result = real(fd);                                        \
        note(#call, start, now());                                    \
        return result;                                                \
    }

TIMED(fsync)
TIMED(fdatasync)
TIMED(syncfs)
