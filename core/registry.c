/*
 * The backend registry: the tables compiled in, the FLEXATTN_BACKEND
 * selection rule, and the life of a context.
 *
 * Selection never falls back silently: a named backend that is unknown, not
 * built in, or unusable is an error that says which and why. "auto" takes
 * the usable backend with the highest score.
 */
#include <ctype.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "flexattn_config.h"
#include "internal.h"
#include "blockmask_cache.h"
#include "cache.h"

/* Every backend the project knows of, built in or not, in "auto" order of
 * preference for equal scores. */
typedef struct backend_slot {
    const char *name;
    const flex_backend_iface *table; /* NULL: not built into this library */
    const char *not_built_reason;
} backend_slot;

static const backend_slot backend_slots[] = {
#if FLEXATTN_HAVE_CUDA
    {.name = "cuda", .table = &flex_backend_cuda},
#else
    {.name = "cuda",
     .not_built_reason = "this library was built without the CUDA backend (meson option cuda)"},
#endif
#if FLEXATTN_HAVE_HIP
    {.name = "hip", .table = &flex_backend_hip},
#else
    {.name = "hip",
     .not_built_reason = "this library was built without the HIP backend (meson option hip)"},
#endif
    {.name = "cpu", .table = &flex_backend_cpu},
};
enum { NUM_BACKEND_SLOTS = sizeof backend_slots / sizeof backend_slots[0] };

const char *flex_version(void) {
    return FLEXATTN_VERSION;
}

int flex_backend_count(void) {
    return NUM_BACKEND_SLOTS;
}

/* The table's ABI check lives here so every path that uses a table passes
 * through it. */
static int table_abi_ok(const flex_backend_iface *t, char *why, size_t cap) {
    if (t->abi_version != FLEX_BACKEND_ABI_VERSION) {
        snprintf(why, cap, "backend '%s' has ABI version %d, this core needs %d", t->name,
                 t->abi_version, FLEX_BACKEND_ABI_VERSION);
        return 0;
    }
    return 1;
}

flex_status flex_backend_get_info(int i, flex_backend_info *info) {
    if (!info) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_backend_get_info: info is NULL");
    if (i < 0 || i >= NUM_BACKEND_SLOTS)
        return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT,
                         "flex_backend_get_info: index %d is outside [0, %d)", i,
                         NUM_BACKEND_SLOTS);
    const backend_slot *s = &backend_slots[i];
    memset(info, 0, sizeof *info);
    info->name = s->name;
    if (!s->table) {
        snprintf(info->reason, sizeof info->reason, "%s", s->not_built_reason);
        return FLEX_OK;
    }
    info->built_in = 1;
    if (!table_abi_ok(s->table, info->reason, sizeof info->reason)) return FLEX_OK;
    info->score = s->table->score(info->reason, sizeof info->reason);
    info->usable = info->score > 0;
    if (info->score < 0) info->score = 0;
    return FLEX_OK;
}

/* Parses "name[:N]" into a lower-case name and a device index. */
static flex_status parse_spec(const char *spec, char *name, size_t cap, int *device) {
    while (isspace((unsigned char)*spec))
        spec++;
    size_t n = 0;
    const char *p = spec;
    while (*p && *p != ':' && !isspace((unsigned char)*p)) {
        if (n + 1 >= cap)
            return flex_fail(NULL, FLEX_ERR_BACKEND, "backend name in '%s' is too long", spec);
        name[n++] = (char)tolower((unsigned char)*p++);
    }
    name[n] = 0;
    *device = 0;
    if (*p == ':') {
        p++;
        char *end = NULL;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 1024)
            return flex_fail(NULL, FLEX_ERR_BACKEND,
                             "backend '%s': the device after ':' must be a number from 0, got '%s'",
                             spec, p);
        *device = (int)v;
        p = end;
    }
    while (isspace((unsigned char)*p))
        p++;
    if (*p)
        return flex_fail(NULL, FLEX_ERR_BACKEND,
                         "backend '%s' is not of the form NAME or NAME:DEVICE", spec);
    if (n == 0) snprintf(name, cap, "auto");
    return FLEX_OK;
}

/* Ids of contexts; 0 is "no context" (core/error.c). */
static _Atomic uint64_t last_context_id;

static flex_status open_table(const flex_backend_iface *t, int device, flex_context **out) {
    /* Settings of the environment that would make the context misbehave are
     * refused here, by name, rather than cut or ignored later. */
    char why[512];
    if (flex_cache_check_environment(why, sizeof why) != 0)
        return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT, "%s", why);
    flex_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return flex_fail(NULL, FLEX_ERR_OUT_OF_MEMORY, "out of memory creating a context");
    ctx->backend = t;
    ctx->device_index = device;
    ctx->id = ++last_context_id;
    flex_log_level();
    flex_debug_parse(getenv("FLEXATTN_DEBUG"), &ctx->debug);
    flex_status st = flex_mask_cache_create(ctx);
    if (st != FLEX_OK) {
        flex_fail(NULL, st, "%s", flex_error_message(ctx));
        flex_clear_error(ctx);
        free(ctx);
        return st;
    }
    st = t->init(ctx, device);
    if (st != FLEX_OK) {
        /* The backend wrote its reason on ctx; move it to no context. */
        flex_fail(NULL, st, "backend '%s' device %d could not be opened: %s", t->name, device,
                  flex_error_message(ctx));
        flex_clear_error(ctx);
        flex_mask_cache_destroy(ctx);
        free(ctx);
        return st;
    }
    *out = ctx;
    return FLEX_OK;
}

flex_status flex_context_create(const char *spec, flex_context **out) {
    if (!out) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_context_create: out is NULL");
    *out = NULL;
    const char *from = "argument";
    if (!spec) {
        spec = getenv("FLEXATTN_BACKEND");
        from = "FLEXATTN_BACKEND";
        if (!spec || !*spec) {
            spec = "auto";
            from = "default";
        }
    }
    char name[32];
    int device = 0;
    flex_status st = parse_spec(spec, name, sizeof name, &device);
    if (st != FLEX_OK) return st;

    if (!strcmp(name, "auto")) {
        const flex_backend_iface *best = NULL;
        int best_score = 0;
        char reasons[1024] = "";
        for (int i = 0; i < NUM_BACKEND_SLOTS; i++) {
            flex_backend_info info;
            flex_backend_get_info(i, &info);
            if (info.usable && info.score > best_score) {
                best = backend_slots[i].table;
                best_score = info.score;
            } else if (!info.usable) {
                size_t len = strlen(reasons);
                snprintf(reasons + len, sizeof reasons - len, "%s%s: %s", len ? "; " : "",
                         info.name, info.reason);
            }
        }
        if (!best) return flex_fail(NULL, FLEX_ERR_BACKEND, "no usable backend (%s)", reasons);
        flex_log(FLEX_LOG_INFO, "auto selected backend '%s'", best->name);
        return open_table(best, device, out);
    }

    for (int i = 0; i < NUM_BACKEND_SLOTS; i++) {
        const backend_slot *s = &backend_slots[i];
        if (strcmp(s->name, name)) continue;
        if (!s->table)
            return flex_fail(NULL, FLEX_ERR_BACKEND, "backend '%s' (from %s) is not built in: %s",
                             name, from, s->not_built_reason);
        char why[256] = "";
        if (!table_abi_ok(s->table, why, sizeof why))
            return flex_fail(NULL, FLEX_ERR_BACKEND, "%s", why);
        if (s->table->score(why, sizeof why) <= 0)
            return flex_fail(NULL, FLEX_ERR_BACKEND,
                             "backend '%s' (from %s) is not usable here: %s", name, from, why);
        return open_table(s->table, device, out);
    }
    char known[128] = "auto";
    for (int i = 0; i < NUM_BACKEND_SLOTS; i++) {
        size_t len = strlen(known);
        snprintf(known + len, sizeof known - len, ", %s", backend_slots[i].name);
    }
    return flex_fail(NULL, FLEX_ERR_BACKEND, "unknown backend '%s' (from %s); known: %s", name,
                     from, known);
}

void flex_context_destroy(flex_context *ctx) {
    if (!ctx) return;
    flex_mask_cache_destroy(ctx);
    ctx->backend->release(ctx);
    flex_clear_error(ctx); /* other threads' messages for it are never read again */
    free(ctx);
}

const char *flex_context_backend(const flex_context *ctx) {
    return ctx ? ctx->backend->name : "";
}

flex_status flex_context_set_allocator(flex_context *ctx, const flex_device_allocator *allocator) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_context_set_allocator: ctx is NULL");
    if (allocator && (!allocator->alloc || !allocator->free))
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "flex_context_set_allocator: the allocator's %s function is NULL",
                         allocator->alloc ? "free" : "alloc");
    if (allocator) {
        ctx->allocator = *allocator;
    } else {
        memset(&ctx->allocator, 0, sizeof ctx->allocator);
    }
    return FLEX_OK;
}

int flex_context_device_index(const flex_context *ctx) {
    return ctx ? ctx->device_index : -1;
}

flex_device_type flex_context_device_type(const flex_context *ctx) {
    return ctx ? ctx->backend->device_type : FLEX_DEVICE_CPU;
}

const char *flex_context_device_name(const flex_context *ctx) {
    return ctx ? flex_backend_device_name((flex_context *)ctx) : "";
}
