/*
 * The backend interface. A backend is one `static const flex_backend_iface`
 * table of function pointers with designated initializers; the registry
 * (core/registry.c) lists the tables compiled in. The core never calls a
 * slot directly: it goes through the wrappers in core/backend.c, which give
 * every slot marked (optional) its default when the table leaves it NULL.
 *
 * A backend never parses mod text: it receives compiled mods (core/mod.h)
 * and block masks (core/blockmask.h).
 */
#ifndef FLEXATTN_BACKEND_H
#define FLEXATTN_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"
#include "flexattn_config.h"

/* Bumped whenever a slot is added, removed or changes meaning; the registry
 * refuses a table whose abi_version differs. */
#define FLEX_BACKEND_ABI_VERSION 1

struct flex_mod;
struct flex_block_mask;
struct flex_plan;

/* Everything one forward call needs, already validated by the core. */
typedef struct flex_forward_args {
    flex_tensor q, k, v, out;
    const flex_tensor *lse;                   /* NULL: not wanted */
    const struct flex_mod *score_mod;         /* NULL: identity */
    const struct flex_block_mask *block_mask; /* NULL: every block full */
    float scale;
    void *stream;
    const struct flex_plan *plan;
    /* Decode and serving (flex_attention_options; docs/decode.md). NULL
     * when not given. When any is given, the core has checked every host
     * value and the block mask is in logical positions (its q_len and
     * kv_len may exceed Lq and the kv length). */
    const flex_tensor *q_offsets;  /* int32 (B,) */
    const flex_tensor *kv_lengths; /* int32 (B,) */
    const flex_tensor *page_table; /* int32 (B, max_pages); k, v are page pools */
    int64_t page_size;             /* k->sizes[2] when paged, else 0 */
    int64_t kv_len;                /* logical kv length: max_pages * page_size, else Lkv */
    int kv_splits;                 /* the caller's hint; 0 = the backend's policy */
} flex_forward_args;

typedef struct flex_backward_args {
    flex_tensor q, k, v, out, dout, lse;
    const flex_tensor *dq, *dk, *dv; /* NULL: not wanted */
    const struct flex_mod *score_mod;
    const struct flex_block_mask *block_mask;
    float scale;
    void *stream;
    const struct flex_plan *plan;
    const flex_buffer_grad *buffer_grads;
    int num_buffer_grads;
    int deterministic; /* opts->deterministic (0 or 1, checked) */
} flex_backward_args;

/* One block whose class interval analysis could not decide. */
typedef struct flex_block_ref {
    int32_t b, h; /* mask coordinates (0 when broadcast) */
    int32_t q_block, kv_block;
} flex_block_ref;

typedef struct flex_backend_iface {
    int abi_version; /* FLEX_BACKEND_ABI_VERSION */
    const char *name;
    flex_device_type device_type;

    /* Preference for "auto": 0 when unusable here, and then `why` says why.
     * Loads vendor libraries (dlopen) if needed; no other side effects. */
    int (*score)(char *why, size_t why_cap);

    /* Creates the backend state for device `device_index` in ctx->backend. */
    flex_status (*init)(flex_context *ctx, int device_index);
    /* Frees ctx->backend state. */
    void (*release)(flex_context *ctx);

    /* (optional) Device description; default: the backend name. */
    const char *(*device_name)(flex_context *ctx);

    /* Memory. (optional, all five) Defaults: host malloc/free/memcpy/memset,
     * right for backends whose device memory is host memory. */
    flex_status (*mem_alloc)(flex_context *ctx, size_t bytes, void **ptr);
    void (*mem_free)(flex_context *ctx, void *ptr);
    flex_status (*upload)(flex_context *ctx, void *dst, const void *src, size_t bytes);
    flex_status (*download)(flex_context *ctx, void *dst, const void *src, size_t bytes);
    flex_status (*mem_set)(flex_context *ctx, void *dst, int value, size_t bytes);

    /* Attention forward. */
    flex_status (*forward)(flex_context *ctx, const flex_forward_args *args);

    /* (optional) Attention backward. Default: FLEX_ERR_UNSUPPORTED naming the
     * backend. */
    flex_status (*backward)(flex_context *ctx, const flex_backward_args *args);

    /* (optional) Exact classes of undecided blocks: for each blocks[i] writes
     * FLEX_BLOCK_EMPTY, _PARTIAL or _FULL to classes[i], evaluating
     * mask_mod over the block's elements clipped to (q_len, kv_len).
     * Default: the core's host evaluator (core/blockmask_eval.c). */
    flex_status (*mask_blocks)(flex_context *ctx, const struct flex_mod *mask_mod, int64_t q_len,
                               int64_t kv_len, int q_block, int kv_block,
                               const flex_block_ref *blocks, int64_t count, uint8_t *classes);

    /* (optional) Waits for queued work; reports clamped buffer reads.
     * Default: FLEX_OK. */
    flex_status (*synchronize)(flex_context *ctx);
} flex_backend_iface;

/* The core's wrappers: each applies the default of an optional slot. */
const char *flex_backend_device_name(flex_context *ctx);
flex_status flex_backend_alloc(flex_context *ctx, size_t bytes, void **ptr);
void flex_backend_free(flex_context *ctx, void *ptr);
flex_status flex_backend_upload(flex_context *ctx, void *dst, const void *src, size_t bytes);
flex_status flex_backend_download(flex_context *ctx, void *dst, const void *src, size_t bytes);
flex_status flex_backend_memset(flex_context *ctx, void *dst, int value, size_t bytes);
flex_status flex_backend_forward(flex_context *ctx, const flex_forward_args *args);
flex_status flex_backend_backward(flex_context *ctx, const flex_backward_args *args);
flex_status flex_backend_mask_blocks(flex_context *ctx, const struct flex_mod *mask_mod,
                                     int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                     const flex_block_ref *blocks, int64_t count, uint8_t *classes);
flex_status flex_backend_synchronize(flex_context *ctx);

/* The tables compiled in (defined by each backend). */
extern const flex_backend_iface flex_backend_cpu;
#if FLEXATTN_HAVE_CUDA
extern const flex_backend_iface flex_backend_cuda;
#endif
#if FLEXATTN_HAVE_HIP
extern const flex_backend_iface flex_backend_hip;
#endif
#if defined(FLEXATTN_HAVE_HIP) && FLEXATTN_HAVE_HIP
extern const flex_backend_iface flex_backend_hip;
#endif

#endif /* FLEXATTN_BACKEND_H */
