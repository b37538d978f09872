/*
 * The core's private structures: what a context, a compiled mod and a block
 * mask hold. Backends include this header; the public header never exposes
 * these layouts.
 */
#ifndef FLEXATTN_INTERNAL_H
#define FLEXATTN_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"
#include "backend.h"
#include "mod/ir.h"
#include "mod/eval.h"
#include "dtype.h"
#include "debug.h"
#include "mod_source.h"

/* ---- errors (core/error.c) ---- */

/* Records a printf-style message as the calling thread's last error on ctx
 * (or on no context when ctx is NULL) and returns status, so callers write
 * `return flex_fail(ctx, FLEX_ERR_SHAPE, "q has %d dims", n);`. Messages are
 * per thread (core/error.c), so threads sharing a context never see, or
 * free, each other's. */
flex_status flex_fail(flex_context *ctx, flex_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
flex_status flex_failv(flex_context *ctx, flex_status status, const char *fmt, va_list ap);
/* Clears the calling thread's message on ctx (or on no context). */
void flex_clear_error(const flex_context *ctx);

/* ---- logging (core/log.c): FLEXATTN_LOG=error|warn|info|debug ---- */
enum { FLEX_LOG_ERROR = 0, FLEX_LOG_WARN = 1, FLEX_LOG_INFO = 2, FLEX_LOG_DEBUG = 3 };
/* The level, read from the environment on the first call (which warns about
 * a value that is not a level). Context creation calls it, so that a bad
 * FLEXATTN_LOG is reported at once. */
int flex_log_level(void);
void flex_log(int level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- tensor views (core/tensor.c) ---- */

/*
 * The bytes a view reaches from t->data: (largest element offset + 1) times
 * the element size, for views whose sizes are >= 1 and strides >= 0 (callers
 * check those first). Every product and sum is checked: returns -1 with
 * *bytes set when the extent fits in ptrdiff_t and data + extent in the
 * address space, otherwise the index of the dim whose stride is to blame
 * (the first whose span overflows, else the one that reaches furthest).
 */
int flex_tensor_byte_extent(const flex_tensor *t, uint64_t *bytes);

/* ---- context ---- */

struct flex_mask_cache;

/*
 * A context may be used by several threads at once (include/flexattn.h says
 * which calls). What calls change is therefore either per thread (the error
 * messages, core/error.c) or behind a lock (the mask cache; a backend locks
 * its own state).
 */
struct flex_context {
    const flex_backend_iface *backend;
    void *backend_state; /* owned by the backend (init / release) */
    int device_index;
    uint64_t id;      /* unique in the process, never reused: keys error messages */
    flex_debug debug; /* FLEXATTN_DEBUG, read once at creation (core/debug.c) */
    /* block masks built for flex_attention_options.mask_mod; owned, locked */
    struct flex_mask_cache *mask_cache;
    /* the caller's work-space allocator (flex_context_set_allocator);
     * alloc == NULL: the backend's own */
    flex_device_allocator allocator;
};

/* ---- mods ---- */

struct flex_mod {
    ir_mod ir;
    char *canonical; /* owned */
    uint64_t hash;
    int bound[IR_MAX_BUFFERS];
    flex_tensor views[IR_MAX_BUFFERS];
    uint64_t binding_generation; /* bumped by every bind; keys mask caches */
    flex_mod_source *source;     /* owned; the text it was compiled from, for the tests */
};

/*
 * Host views of every buffer of mod for the evaluators. Buffers on a device
 * are copied to the host with ctx's backend; the copies are returned in
 * host_copies[IR_MAX_BUFFERS] (NULL where none) and freed by
 * flex_mod_release_host_views. Fails with FLEX_ERR_BUFFER_UNBOUND naming the
 * first unbound buffer.
 */
flex_status flex_mod_host_views(flex_context *ctx, const flex_mod *mod, mod_buffer_view *views,
                                void **host_copies);
void flex_mod_release_host_views(void **host_copies);

/* Turns a bounds error of an evaluator into FLEX_ERR_BUFFER_BOUNDS on ctx. */
flex_status flex_fail_bounds(flex_context *ctx, const flex_mod *mod, const mod_bounds_error *err);

/* ---- block masks (core/blockmask.c) ---- */

/*
 * Rows of the kv-major lists are indexed by (b * H + h) * num_q_blocks + i;
 * columns of the q-major lists by (b * H + h) * num_kv_blocks + j. Each list
 * is CSR: offsets has rows+1 entries, the indices of row r are
 * indices[offsets[r] .. offsets[r+1]), ascending. Partial and full blocks
 * are separate lists; an empty block is in neither.
 */
typedef struct flex_block_lists {
    int32_t *offsets;
    int32_t *indices;
} flex_block_lists;

struct flex_block_mask {
    flex_context *ctx;
    const flex_mod *mask_mod; /* decides elements of partial blocks */
    flex_mod *owned_mod;      /* set when the mask owns mask_mod (and/or) */
    int64_t B, H;             /* stored sizes: 1 when broadcast */
    int64_t q_len, kv_len;
    int q_block, kv_block;
    int64_t num_q_blocks, num_kv_blocks;
    flex_block_lists kv_partial, kv_full; /* per q-block row: kv blocks */
    flex_block_lists q_partial, q_full;   /* per kv-block column: q blocks */
    int64_t num_partial, num_full;
    /* A backend's copy of the lists on its device, made on first use. */
    void *device_copy;
    void (*device_copy_free)(flex_context *ctx, void *copy);
    double build_ms; /* time the build took */
    uint64_t serial; /* unique in the process, never reused: keys masks derived from it */
};

#endif /* FLEXATTN_INTERNAL_H */
