/*
 * The core's side of the backend interface: every call into a backend goes
 * through these wrappers, which give the slots marked (optional) in
 * core/backend.h their defaults. Backends stay small because of them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "blockmask.h"

const char *flex_backend_device_name(flex_context *ctx) {
    if (ctx->backend->device_name) return ctx->backend->device_name(ctx);
    return ctx->backend->name;
}

flex_status flex_backend_alloc(flex_context *ctx, size_t bytes, void **ptr) {
    if (ctx->backend->mem_alloc) return ctx->backend->mem_alloc(ctx, bytes, ptr);
    /* Host memory, aligned for the widest vector loads the CPU paths use.
     * Rounding up must not wrap (SIZE_MAX - 10 would become a 64-byte
     * block), and no object may be larger than PTRDIFF_MAX bytes. */
    if (bytes > (size_t)PTRDIFF_MAX - 63)
        return flex_fail(ctx, FLEX_ERR_OVERFLOW,
                         "%zu bytes cannot be allocated: rounded up to 64-byte alignment the size "
                         "overflows the largest object size (PTRDIFF_MAX)",
                         bytes);
    size_t rounded = (bytes + 63) / 64 * 64;
    *ptr = aligned_alloc(64, rounded ? rounded : 64);
    if (!*ptr)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of host memory allocating %zu bytes",
                         bytes);
    return FLEX_OK;
}

void flex_backend_free(flex_context *ctx, void *ptr) {
    if (!ptr) return;
    if (ctx->backend->mem_free) {
        ctx->backend->mem_free(ctx, ptr);
        return;
    }
    free(ptr);
}

flex_status flex_backend_upload(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    if (ctx->backend->upload) return ctx->backend->upload(ctx, dst, src, bytes);
    if (bytes) memmove(dst, src, bytes);
    return FLEX_OK;
}

flex_status flex_backend_download(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    if (ctx->backend->download) return ctx->backend->download(ctx, dst, src, bytes);
    if (bytes) memmove(dst, src, bytes);
    return FLEX_OK;
}

flex_status flex_backend_memset(flex_context *ctx, void *dst, int value, size_t bytes) {
    if (ctx->backend->mem_set) return ctx->backend->mem_set(ctx, dst, value, bytes);
    if (bytes) memset(dst, value, bytes);
    return FLEX_OK;
}

flex_status flex_backend_forward(flex_context *ctx, const flex_forward_args *args) {
    return ctx->backend->forward(ctx, args);
}

flex_status flex_backend_backward(flex_context *ctx, const flex_backward_args *args) {
    if (ctx->backend->backward) return ctx->backend->backward(ctx, args);
    return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                     "the '%s' backend has no backward pass yet; run the backward on the cpu "
                     "backend",
                     ctx->backend->name);
}

flex_status flex_backend_mask_blocks(flex_context *ctx, const struct flex_mod *mask_mod,
                                     int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                     const flex_block_ref *blocks, int64_t count,
                                     uint8_t *classes) {
    if (count == 0) return FLEX_OK;
    if (ctx->backend->mask_blocks)
        return ctx->backend->mask_blocks(ctx, mask_mod, q_len, kv_len, q_block, kv_block, blocks,
                                         count, classes);
    return flex_block_mask_eval_host(ctx, mask_mod, q_len, kv_len, q_block, kv_block, blocks, count,
                                     classes);
}

flex_status flex_backend_synchronize(flex_context *ctx) {
    if (ctx->backend->synchronize) return ctx->backend->synchronize(ctx);
    return FLEX_OK;
}

/* ---- public memory API: argument checks, then the wrappers ---- */

flex_status flex_malloc(flex_context *ctx, size_t bytes, void **ptr) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_malloc: ctx is NULL");
    if (!ptr) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "flex_malloc: ptr is NULL");
    *ptr = NULL;
    return flex_backend_alloc(ctx, bytes, ptr);
}

void flex_free(flex_context *ctx, void *ptr) {
    if (ctx) flex_backend_free(ctx, ptr);
}

flex_status flex_copy_to_device(flex_context *ctx, void *device_dst, const void *host_src,
                                size_t bytes) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_copy_to_device: ctx is NULL");
    if (bytes && (!device_dst || !host_src))
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "flex_copy_to_device: %s is NULL",
                         device_dst ? "host_src" : "device_dst");
    return flex_backend_upload(ctx, device_dst, host_src, bytes);
}

flex_status flex_copy_to_host(flex_context *ctx, void *host_dst, const void *device_src,
                              size_t bytes) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_copy_to_host: ctx is NULL");
    if (bytes && (!host_dst || !device_src))
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "flex_copy_to_host: %s is NULL",
                         host_dst ? "device_src" : "host_dst");
    return flex_backend_download(ctx, host_dst, device_src, bytes);
}

flex_status flex_synchronize(flex_context *ctx) {
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "flex_synchronize: ctx is NULL");
    return flex_backend_synchronize(ctx);
}
