/*
 * Status names and the last-error messages, kept per thread.
 *
 * A context may be shared between threads, so its last error cannot live in
 * the context: two threads failing at once would overwrite (and free) each
 * other's message. Each thread keeps the last message of each of the few
 * contexts it used most recently, keyed by the context's id, which (unlike
 * its address) is never reused. Calls made with ctx == NULL, and context
 * creation, use id 0. A thread's messages are freed when it exits.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

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

/* Contexts a thread remembers a message for; the least recently failed one
 * is forgotten first. A thread rarely drives more contexts than this. */
enum { THREAD_ERROR_SLOTS = 8 };

typedef struct error_slot {
    uint64_t ctx_id; /* 0: no context */
    uint64_t stamp;  /* when the slot was last written; 0 = free */
    char *message;   /* malloc'd, or NULL */
} error_slot;

typedef struct thread_errors {
    error_slot slots[THREAD_ERROR_SLOTS];
    uint64_t clock;
} thread_errors;

/* The pointer lives in thread-local storage for speed; the key only gives
 * the block a destructor that runs when the thread exits. */
static _Thread_local thread_errors *this_thread;
static pthread_key_t exit_key;
static pthread_once_t exit_key_once = PTHREAD_ONCE_INIT;

/* Runs in the exiting thread, so it can forget the block: a failure in a
 * later destructor of the same thread then starts a new one. */
static void free_thread_errors(void *p) {
    thread_errors *t = p;
    if (this_thread == t) this_thread = NULL;
    for (int i = 0; i < THREAD_ERROR_SLOTS; i++)
        free(t->slots[i].message);
    free(t);
}

static void make_exit_key(void) {
    pthread_key_create(&exit_key, free_thread_errors);
}

/* The calling thread's block, made on first use; NULL without memory. */
static thread_errors *thread_block(void) {
    if (this_thread) return this_thread;
    pthread_once(&exit_key_once, make_exit_key);
    thread_errors *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    pthread_setspecific(exit_key, t);
    this_thread = t;
    return t;
}

static uint64_t id_of(const flex_context *ctx) {
    return ctx ? ctx->id : 0;
}

static error_slot *find_slot(thread_errors *t, uint64_t id) {
    if (!t) return NULL;
    for (int i = 0; i < THREAD_ERROR_SLOTS; i++)
        if (t->slots[i].stamp && t->slots[i].ctx_id == id) return &t->slots[i];
    return NULL;
}

/* The slot of id, or the free or least recently written one, emptied. */
static error_slot *claim_slot(thread_errors *t, uint64_t id) {
    error_slot *s = find_slot(t, id);
    if (!s) {
        s = &t->slots[0];
        for (int i = 1; i < THREAD_ERROR_SLOTS; i++)
            if (t->slots[i].stamp < s->stamp) s = &t->slots[i];
    }
    free(s->message);
    s->message = NULL;
    s->ctx_id = id;
    s->stamp = ++t->clock;
    return s;
}

/* A freshly formatted message, or NULL when memory is short: the old one is
 * then dropped rather than kept, so a stale message never explains a new
 * failure. */
static char *format_message(const char *fmt, va_list ap) {
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (n < 0) return NULL;
    char *msg = malloc((size_t)n + 1);
    if (msg) vsnprintf(msg, (size_t)n + 1, fmt, ap);
    return msg;
}

flex_status flex_failv(flex_context *ctx, flex_status status, const char *fmt, va_list ap) {
    thread_errors *t = thread_block();
    char *msg = format_message(fmt, ap);
    if (t) {
        claim_slot(t, id_of(ctx))->message = msg;
    }
    if (status != FLEX_OK)
        flex_log(FLEX_LOG_DEBUG, "%s: %s", flex_status_name(status), msg ? msg : "");
    if (!t) free(msg);
    return status;
}

flex_status flex_fail(flex_context *ctx, flex_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    flex_failv(ctx, status, fmt, ap);
    va_end(ap);
    return status;
}

void flex_clear_error(const flex_context *ctx) {
    error_slot *s = find_slot(this_thread, id_of(ctx));
    if (!s) return;
    free(s->message);
    *s = (error_slot){0};
}

const char *flex_error_message(const flex_context *ctx) {
    error_slot *s = find_slot(this_thread, id_of(ctx));
    return s && s->message ? s->message : "";
}
