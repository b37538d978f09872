/*
 * Status names and the last-error message of a context or a thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static _Thread_local char *thread_error;

static const char *const status_names[] = {
    [FLEX_OK] = "OK",
    [FLEX_ERR_INVALID_ARGUMENT] = "ERR_INVALID_ARGUMENT",
    [FLEX_ERR_NULL_POINTER] = "ERR_NULL_POINTER",
    [FLEX_ERR_SHAPE] = "ERR_SHAPE",
    [FLEX_ERR_DTYPE] = "ERR_DTYPE",
    [FLEX_ERR_UNSUPPORTED] = "ERR_UNSUPPORTED",
    [FLEX_ERR_BACKEND] = "ERR_BACKEND",
    [FLEX_ERR_OUT_OF_MEMORY] = "ERR_OUT_OF_MEMORY",
    [FLEX_ERR_MOD_SYNTAX] = "ERR_MOD_SYNTAX",
    [FLEX_ERR_MOD_TYPE] = "ERR_MOD_TYPE",
    [FLEX_ERR_MOD_NAME] = "ERR_MOD_NAME",
    [FLEX_ERR_BUFFER_BOUNDS] = "ERR_BUFFER_BOUNDS",
    [FLEX_ERR_BUFFER_UNBOUND] = "ERR_BUFFER_UNBOUND",
    [FLEX_ERR_COMPILE] = "ERR_COMPILE",
    [FLEX_ERR_DEVICE] = "ERR_DEVICE",
    [FLEX_ERR_IO] = "ERR_IO",
    [FLEX_ERR_INTERNAL] = "ERR_INTERNAL",
    [FLEX_ERR_OVERFLOW] = "ERR_OVERFLOW",
};

const char *flex_status_name(flex_status status) {
    if ((unsigned)status < sizeof status_names / sizeof status_names[0] && status_names[status])
        return status_names[status];
    return "ERR_UNKNOWN_STATUS";
}

/* Replaces *slot with a freshly formatted message. When memory is short the
 * old message is dropped rather than kept, so a stale message never
 * explains a new failure. */
static void set_message(char **slot, const char *fmt, va_list ap) {
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    free(*slot);
    *slot = NULL;
    if (n < 0) return;
    char *msg = malloc((size_t)n + 1);
    if (!msg) return;
    vsnprintf(msg, (size_t)n + 1, fmt, ap);
    *slot = msg;
}

flex_status flex_failv(flex_context *ctx, flex_status status, const char *fmt, va_list ap) {
    if (ctx) {
        set_message(&ctx->error, fmt, ap);
        ctx->last_status = status;
    } else {
        set_message(&thread_error, fmt, ap);
    }
    if (status != FLEX_OK) {
        flex_log(FLEX_LOG_DEBUG, "%s: %s", flex_status_name(status),
                 ctx ? (ctx->error ? ctx->error : "") : (thread_error ? thread_error : ""));
    }
    return status;
}

flex_status flex_fail(flex_context *ctx, flex_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    flex_failv(ctx, status, fmt, ap);
    va_end(ap);
    return status;
}

void flex_clear_error(flex_context *ctx) {
    char **slot = ctx ? &ctx->error : &thread_error;
    free(*slot);
    *slot = NULL;
    if (ctx) ctx->last_status = FLEX_OK;
}

const char *flex_error_message(const flex_context *ctx) {
    const char *msg = ctx ? ctx->error : thread_error;
    return msg ? msg : "";
}
