/*
 * FLEXATTN_LOG=error|warn|info|debug: diagnostics on stderr. The level is
 * read once; the default is warn, and any other value is warned about (once)
 * and read as warn.
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int flex_log_level(void) {
    static _Atomic int level = -1;
    static atomic_flag warned = ATOMIC_FLAG_INIT;
    if (level < 0) {
        const char *env = getenv("FLEXATTN_LOG");
        int l = -1;
        for (int i = 0; env && *env && i < 4; i++)
            if (!strcasecmp(env, level_names[i])) l = i;
        if (l < 0 && env && *env && !atomic_flag_test_and_set(&warned))
            fprintf(stderr,
                    "flexattn warn: FLEXATTN_LOG=%.64s is not a level (error, warn, info, debug); "
                    "using warn\n",
                    env);
        level = l < 0 ? FLEX_LOG_WARN : l; /* every thread computes the same value */
    }
    return level;
}

void flex_log(int level, const char *fmt, ...) {
    if (level > flex_log_level()) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexattn %s: ", level_names[level < 0 ? 0 : level > 3 ? 3 : level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
