/*
 * FLEXATTN_LOG=error|warn|info|debug: diagnostics on stderr. The level is
 * read once; the default is warn.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

static int log_level(void) {
    static _Atomic int level = -1;
    if (level < 0) {
        const char *env = getenv("FLEXATTN_LOG");
        int l = FLEX_LOG_WARN;
        if (env) {
            if (!strcasecmp(env, "error"))
                l = FLEX_LOG_ERROR;
            else if (!strcasecmp(env, "warn"))
                l = FLEX_LOG_WARN;
            else if (!strcasecmp(env, "info"))
                l = FLEX_LOG_INFO;
            else if (!strcasecmp(env, "debug"))
                l = FLEX_LOG_DEBUG;
        }
        level = l; /* every thread computes the same value */
    }
    return level;
}

void flex_log(int level, const char *fmt, ...) {
    static const char *const names[] = {"error", "warn", "info", "debug"};
    if (level > log_level()) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexattn %s: ", names[level < 0 ? 0 : level > 3 ? 3 : level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
