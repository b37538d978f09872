/*
 * The host layer the GPU backends share (gpu_host.h): module list, kernel
 * cache and compiler in that order, mod-buffer mirrors, block-mask uploads,
 * the bounds flag, the in-range proofs, the backend table's memory slots,
 * and the forward's and backward's launch policy. Vendor calls go through
 * the backend's flex_gpu_ops table only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_host.h"
#include "gpu_partial_bits.h"
#include "clock.h"

flex_status flex_gpu_check(flex_context *ctx, const flex_gpu_state *st, int result,
                           const char *what) {
    if (result == 0) return FLEX_OK;
    char desc[256];
    st->ops->describe(st->api, result, desc, sizeof desc);
    return flex_fail(ctx, FLEX_ERR_DEVICE, "%s %s failed: %s", st->ops->vendor, what, desc);
}

#define GPU_TRY(ctx, st, call, what)                                                               \
    do {                                                                                           \
        flex_status gpu_try_status_ = flex_gpu_check((ctx), (st), (call), (what));                 \
        if (gpu_try_status_ != FLEX_OK) return gpu_try_status_;                                    \
    } while (0)

flex_status flex_gpu_enter(flex_context *ctx, const flex_gpu_state *st) {
    return flex_gpu_check(ctx, st, st->ops->enter(st->api, st->vendor_ctx), st->ops->enter_name);
}

void flex_gpu_leave(const flex_gpu_state *st) {
    st->ops->leave(st->api);
}

void flex_gpu_init(flex_gpu_state *st, const flex_gpu_ops *ops, const void *api,
                   void *vendor_ctx, flex_device_type device_type) {
    st->ops = ops;
    st->api = api;
    st->vendor_ctx = vendor_ctx;
    st->device_type = device_type;
    atomic_init(&st->bounds_pending, 0);
    atomic_init(&st->bounds_in_graph, 0);
    st->capturing = 0;
    pthread_mutex_init(&st->lock, NULL);
}

flex_status flex_gpu_alloc_bounds_flag(flex_context *ctx, flex_gpu_state *st) {
    char what[96];
    snprintf(what, sizeof what, "%s (bounds flag)", st->ops->mem_alloc_name);
    flex_status s = flex_gpu_check(ctx, st, st->ops->mem_alloc(st->api, &st->bounds_flag, 8), what);
    if (!s)
        s = flex_gpu_check(ctx, st, st->ops->mem_set(st->api, st->bounds_flag, 0, 8),
                           st->ops->mem_set_name);
    return s;
}

void flex_gpu_release(flex_gpu_state *st) {
    const flex_gpu_ops *ops = st->ops;
    if (ops->enter(st->api, st->vendor_ctx) == 0) {
        for (flex_gpu_module *m = st->modules; m;) {
            flex_gpu_module *next = m->next;
            ops->module_unload(st->api, m->module);
            free(m->key);
            free(m);
            m = next;
        }
        for (flex_gpu_buffer_copy *c = st->buffer_copies; c;) {
            flex_gpu_buffer_copy *next = c->next;
            ops->mem_free(st->api, c->dev);
            free(c);
            c = next;
        }
        ops->mem_free(st->api, st->bounds_flag);
        ops->leave(st->api);
    }
    st->modules = NULL;
    st->buffer_copies = NULL;
    pthread_mutex_destroy(&st->lock);
}

flex_status flex_gpu_take_bounds_flag(flex_context *ctx, flex_gpu_state *st) {
    const flex_gpu_ops *ops = st->ops;
    char what[96];
    uint32_t flag[2] = {0, 0};
    snprintf(what, sizeof what, "%s (bounds flag)", ops->copy_to_host_name);
    GPU_TRY(ctx, st, ops->copy_to_host(st->api, flag, st->bounds_flag, sizeof flag), what);
    if (!flag[0] && !flag[1]) return FLEX_OK;
    snprintf(what, sizeof what, "%s (bounds flag)", ops->mem_set_name);
    GPU_TRY(ctx, st, ops->mem_set(st->api, st->bounds_flag, 0, sizeof flag), what);
    if (flag[1]) {
        /* the decode word (flex_gpu_decode_flag): the first argument named */
        const char *arg = (flag[1] & 1u) ? "q_offsets" : (flag[1] & 2u) ? "kv_lengths" : "page_table";
        return flex_fail(ctx, FLEX_ERR_BUFFER_BOUNDS,
                         "a value of opts->%s on the GPU was out of range (it was clamped; "
                         "results of that call are not meaningful)",
                         arg);
    }
    int slot = 0;
    while (!(flag[0] & (1u << slot)))
        slot++;
    return flex_fail(ctx, FLEX_ERR_BUFFER_BOUNDS,
                     "a mod read buffer '%s' outside its sizes on the GPU (the index was "
                     "clamped; results of that call are not meaningful)",
                     st->slot_names[slot][0] ? st->slot_names[slot] : "?");
}

static flex_gpu_ptr gpu_ptr(const void *p) {
    return (flex_gpu_ptr)(uintptr_t)p;
}

/* Every GPU backend's state starts with its flex_gpu_state. */
static flex_gpu_state *state_of(flex_context *ctx) {
    return (flex_gpu_state *)ctx->backend_state;
}

flex_status flex_gpu_mem_alloc(flex_context *ctx, size_t bytes, void **ptr) {
    flex_gpu_state *st = state_of(ctx);
    flex_status s = flex_gpu_enter(ctx, st);
    if (s) return s;
    flex_gpu_ptr p = 0;
    const int r = st->ops->mem_alloc(st->api, &p, bytes ? bytes : 1);
    flex_gpu_leave(st);
    if (r == st->ops->out_of_memory)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "the GPU has no room for %zu bytes", bytes);
    s = flex_gpu_check(ctx, st, r, st->ops->mem_alloc_name);
    if (!s) *ptr = (void *)(uintptr_t)p;
    return s;
}

void flex_gpu_mem_free(flex_context *ctx, void *ptr) {
    const flex_gpu_state *st = state_of(ctx);
    if (!ptr || st->ops->enter(st->api, st->vendor_ctx) != 0) return;
    st->ops->mem_free(st->api, gpu_ptr(ptr));
    flex_gpu_leave(st);
}

flex_status flex_gpu_upload(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    const flex_gpu_state *st = state_of(ctx);
    flex_status s = flex_gpu_enter(ctx, st);
    if (s) return s;
    s = flex_gpu_check(ctx, st, st->ops->copy_to_device(st->api, gpu_ptr(dst), src, bytes),
                       st->ops->copy_to_device_name);
    flex_gpu_leave(st);
    return s;
}

flex_status flex_gpu_download(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    const flex_gpu_state *st = state_of(ctx);
    flex_status s = flex_gpu_enter(ctx, st);
    if (s) return s;
    s = flex_gpu_check(ctx, st, st->ops->copy_to_host(st->api, dst, gpu_ptr(src), bytes),
                       st->ops->copy_to_host_name);
    flex_gpu_leave(st);
    return s;
}

flex_status flex_gpu_memset(flex_context *ctx, void *dst, int value, size_t bytes) {
    const flex_gpu_state *st = state_of(ctx);
    flex_status s = flex_gpu_enter(ctx, st);
    if (s) return s;
    s = flex_gpu_check(ctx, st,
                       st->ops->mem_set(st->api, gpu_ptr(dst), (unsigned char)value, bytes),
                       st->ops->mem_set_name);
    flex_gpu_leave(st);
    return s;
}

flex_status flex_gpu_synchronize(flex_context *ctx) {
    flex_gpu_state *st = state_of(ctx);
    flex_status s = flex_gpu_enter(ctx, st);
    if (s) return s;
    /* Taken before the wait: a kernel launched after it sets the mark again
     * and is read by the next synchronize. Without mod buffers there is no
     * flag to read (a copy from the device costs ~10 us). */
    const int pending = atomic_exchange(&st->bounds_pending, 0) ||
                        atomic_load(&st->bounds_in_graph);
    s = flex_gpu_check(ctx, st, st->ops->synchronize(st->api), st->ops->synchronize_name);
    if (!s && pending) { /* under the lock: launches write the slot names */
        pthread_mutex_lock(&st->lock);
        s = flex_gpu_take_bounds_flag(ctx, st);
        pthread_mutex_unlock(&st->lock);
    }
    flex_gpu_leave(st);
    return s;
}

flex_gpu_ptr flex_gpu_decode_flag(const flex_gpu_state *st) {
    return st->bounds_flag + 4;
}

/* What a call would do that a capture into a graph does not allow, refused
 * before it is issued: the capture stays valid and the message says what
 * to do. */
static flex_status refuse_in_capture(flex_context *ctx, const char *what) {
    return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                     "%s is needed, but the stream is being captured into a graph, where that "
                     "is not allowed: make one call with the same mods, block mask, dtypes and "
                     "shapes before the capture",
                     what);
}

/* ---- kernels: memory list -> cache -> compiler ---- */

flex_status flex_gpu_get_function(flex_context *ctx, flex_gpu_state *st, const char *key,
                                  flex_gpu_source_builder build, const void *args,
                                  const char *fn_name, void **fn) {
    for (flex_gpu_module *m = st->modules; m; m = m->next)
        if (strcmp(m->key, key) == 0) {
            *fn = m->fn;
            return FLEX_OK;
        }
    if (st->capturing) return refuse_in_capture(ctx, "compiling and loading a kernel");
    char *source = build(args);
    if (!source)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory building kernel source");
    char cache_key[640];
    snprintf(cache_key, sizeof cache_key, "%s|src=%016llx", key,
             (unsigned long long)flex_cache_checksum(source, strlen(source)));
    void *bin = NULL;
    size_t size = 0;
    int from_disk = 0;
    double t0 = flex_now_ms();
    const int cached = flex_cache_get(st->cache, cache_key, &bin, &size, &from_disk);
    flex_status s = cached ? FLEX_OK
                           : st->ops->compile(ctx, st->api, source, fn_name, st->arch, &bin, &size);
    free(source);
    if (s) return s;
    if (cached) {
        flex_log(FLEX_LOG_DEBUG, "kernel %s from the %s cache", fn_name,
                 from_disk ? "disk" : "memory");
    } else {
        if (flex_cache_put(st->cache, cache_key, bin, size) != 0)
            flex_log(FLEX_LOG_WARN, "could not write the kernel cache in %s",
                     flex_cache_dir(st->cache));
        flex_log(FLEX_LOG_INFO, "compiled %s for %s in %.0f ms", fn_name, st->arch,
                 flex_now_ms() - t0);
    }
    flex_gpu_module *m = calloc(1, sizeof *m);
    char *k = strdup(key);
    if (!m || !k) {
        free(m);
        free(k);
        free(bin);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a %s module",
                         st->ops->vendor);
    }
    int r = st->ops->module_load(st->api, bin, size, &m->module);
    free(bin);
    if (r == 0) r = st->ops->module_function(st->api, m->module, fn_name, &m->fn);
    if (r != 0) {
        free(m);
        free(k);
        char what[96];
        snprintf(what, sizeof what, "loading a compiled kernel (%s)", st->ops->module_load_name);
        return flex_gpu_check(ctx, st, r, what);
    }
    m->key = k;
    m->next = st->modules;
    st->modules = m;
    *fn = m->fn;
    return FLEX_OK;
}

flex_status flex_gpu_module_function(flex_context *ctx, flex_gpu_state *st, const char *key,
                                     const char *name, void **fn) {
    for (flex_gpu_module *m = st->modules; m; m = m->next) {
        if (strcmp(m->key, key) != 0) continue;
        for (int i = 0; i < m->num_more; i++)
            if (strcmp(m->more[i].name, name) == 0) {
                *fn = m->more[i].fn;
                return FLEX_OK;
            }
        flex_status s = flex_gpu_check(ctx, st, st->ops->module_function(st->api, m->module, name,
                                                                         fn),
                                       st->ops->module_function_name);
        const int slots = (int)(sizeof m->more / sizeof m->more[0]);
        if (!s && m->num_more < slots && strlen(name) < sizeof m->more[0].name) {
            snprintf(m->more[m->num_more].name, sizeof m->more[0].name, "%s", name);
            m->more[m->num_more++].fn = *fn;
        }
        return s;
    }
    return flex_fail(ctx, FLEX_ERR_DEVICE, "the module of %s is not loaded", name);
}

/* ---- mod buffers ---- */

/* Device address of buffer i of mod, copying host data once per binding. */
static flex_status buffer_device_ptr(flex_context *ctx, flex_gpu_state *st,
                                     const struct flex_mod *mod, int i, flex_gpu_ptr *out) {
    const flex_tensor *v = &mod->views[i];
    if (v->device == st->device_type) {
        *out = (flex_gpu_ptr)(uintptr_t)v->data;
        return FLEX_OK;
    }
    for (flex_gpu_buffer_copy *c = st->buffer_copies; c; c = c->next)
        if (c->mod == mod && c->index == i && c->generation == mod->binding_generation &&
            c->host == v->data) {
            *out = c->dev;
            return FLEX_OK;
        }
    int64_t extent = 1;
    for (int d = 0; d < v->ndim; d++) {
        if (v->sizes[d] <= 0)
            extent = 0;
        else if (extent)
            extent += (v->sizes[d] - 1) * (v->strides[d] < 0 ? -v->strides[d] : v->strides[d]);
    }
    if (st->capturing) {
        char what[160];
        snprintf(what, sizeof what, "a first copy of mod buffer '%s' from the host to the GPU",
                 mod->ir.buffers[i].name);
        return refuse_in_capture(ctx, what);
    }
    size_t bytes = (size_t)extent * flex_dtype_size(v->dtype);
    flex_gpu_buffer_copy *c = calloc(1, sizeof *c);
    if (!c) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a buffer copy");
    int r = st->ops->mem_alloc(st->api, &c->dev, bytes ? bytes : 1);
    if (r == 0 && bytes) r = st->ops->copy_to_device(st->api, c->dev, v->data, bytes);
    if (r != 0) {
        if (c->dev) st->ops->mem_free(st->api, c->dev);
        free(c);
        return flex_gpu_check(ctx, st, r, "copying a mod buffer to the GPU");
    }
    c->mod = mod;
    c->index = i;
    c->generation = mod->binding_generation;
    c->host = v->data;
    c->next = st->buffer_copies;
    st->buffer_copies = c;
    *out = c->dev;
    return FLEX_OK;
}

flex_status flex_gpu_fill_buffers(flex_context *ctx, flex_gpu_state *st,
                                  const struct flex_mod *mod, int slot_base,
                                  flex_gpu_buffer_desc *descs) {
    if (!mod) return FLEX_OK;
    for (int i = 0; i < mod->ir.num_buffers; i++) {
        const ir_buffer *decl = &mod->ir.buffers[i];
        if (!mod->bound[i])
            return flex_fail(ctx, FLEX_ERR_BUFFER_UNBOUND, "buffer '%s' of a mod has no data bound",
                             decl->name);
        flex_gpu_ptr p = 0;
        flex_status s = buffer_device_ptr(ctx, st, mod, i, &p);
        if (s) return s;
        flex_gpu_buffer_desc *d = &descs[slot_base + i];
        const flex_tensor *v = &mod->views[i];
        d->data = p;
        for (int k = 0; k < 4; k++) {
            int64_t size = k < v->ndim ? v->sizes[k] : 1;
            d->sizes[k] = (int32_t)(size > INT32_MAX ? INT32_MAX : size);
            d->strides[k] = k < v->ndim ? v->strides[k] : 0;
        }
        snprintf(st->slot_names[slot_base + i], sizeof st->slot_names[0], "%s", decl->name);
    }
    return FLEX_OK;
}

size_t flex_gpu_append_buffers(unsigned char *blob, size_t at, const flex_gpu_buffer_desc *descs,
                               int slots, flex_gpu_ptr flag) {
    memcpy(blob + at, descs, FLEX_GPU_BUFFERS_FLAG_AT(slots));
    memcpy(blob + at + FLEX_GPU_BUFFERS_FLAG_AT(slots), &flag, sizeof flag);
    return at + FLEX_GPU_BUFFERS_BYTES(slots);
}

/* ---- block-mask lists on the device ---- */

/* The GPU state a mask copy was made with: a mask copy outlives no context
 * (internal.h), and the core passes that context to the free. */
static void mask_copy_free_arrays(const flex_gpu_state *st, flex_gpu_mask_copy *c) {
    const flex_gpu_ptr all[] = {c->full_off,  c->full_idx,  c->part_off,  c->part_idx, c->order,
                                c->qfull_off, c->qfull_idx, c->qpart_off, c->qpart_idx};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i]) st->ops->mem_free(st->api, all[i]);
    flex_gpu_partial_bits_free(st, c->partial_bits);
    c->partial_bits = NULL;
}

static void mask_copy_free(flex_context *ctx, void *copy) {
    flex_gpu_mask_copy *c = copy;
    if (!c) return;
    const flex_gpu_state *st = ctx ? state_of(ctx) : NULL;
    if (st && st->ops->enter(st->api, st->vendor_ctx) == 0) {
        mask_copy_free_arrays(st, c);
        st->ops->leave(st->api);
    }
    free(c);
}

static flex_status upload_array(flex_context *ctx, flex_gpu_state *st, const void *src,
                                size_t bytes, flex_gpu_ptr *dst) {
    char what[96];
    snprintf(what, sizeof what, "%s (block mask)", st->ops->mem_alloc_name);
    GPU_TRY(ctx, st, st->ops->mem_alloc(st->api, dst, bytes ? bytes : 4), what);
    if (bytes) {
        snprintf(what, sizeof what, "%s (block mask)", st->ops->copy_to_device_name);
        GPU_TRY(ctx, st, st->ops->copy_to_device(st->api, *dst, src, bytes), what);
    }
    return FLEX_OK;
}

/* Uploads one of a mask's block lists of n rows: its n + 1 offsets and the
 * indices they delimit. */
static flex_status upload_lists(flex_context *ctx, flex_gpu_state *st, const flex_block_lists *l,
                                int64_t n, flex_gpu_ptr *off, flex_gpu_ptr *idx) {
    flex_status s = upload_array(ctx, st, l->offsets, (size_t)(n + 1) * sizeof(int32_t), off);
    if (!s) s = upload_array(ctx, st, l->indices, (size_t)l->offsets[n] * sizeof(int32_t), idx);
    return s;
}

typedef struct row_weight {
    int64_t blocks;
    int row;
} row_weight;

static int cmp_heavier_first(const void *a, const void *b) {
    const row_weight *x = a, *y = b;
    if (x->blocks != y->blocks) return x->blocks > y->blocks ? -1 : 1;
    return x->row - y->row;
}

flex_status flex_gpu_mask_device_copy(flex_context *ctx, flex_gpu_state *st,
                                      const struct flex_block_mask *mask,
                                      flex_gpu_mask_copy **out) {
    if (mask->device_copy) {
        *out = mask->device_copy;
        return FLEX_OK;
    }
    if (st->capturing)
        return refuse_in_capture(ctx, "a first copy of the block mask's lists to the GPU");
    const int64_t rows = mask->B * mask->H * mask->num_q_blocks;
    const int64_t nq = mask->num_q_blocks;
    flex_gpu_mask_copy *c = calloc(1, sizeof *c);
    int *order = malloc((size_t)(nq ? nq : 1) * sizeof *order);
    row_weight *weights = calloc((size_t)(nq ? nq : 1), sizeof *weights);
    if (!c || !order || !weights) {
        free(c);
        free(order);
        free(weights);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for the block mask copy");
    }
    for (int64_t i = 0; i < nq; i++)
        weights[i].row = (int)i;
    for (int64_t r = 0; r < rows; r++)
        weights[r % nq].blocks += (mask->kv_full.offsets[r + 1] - mask->kv_full.offsets[r]) +
                                  (mask->kv_partial.offsets[r + 1] - mask->kv_partial.offsets[r]);
    qsort(weights, (size_t)nq, sizeof *weights, cmp_heavier_first);
    for (int64_t i = 0; i < nq; i++)
        order[i] = weights[i].row;
    free(weights);
    flex_status s = upload_lists(ctx, st, &mask->kv_full, rows, &c->full_off, &c->full_idx);
    if (!s) s = upload_lists(ctx, st, &mask->kv_partial, rows, &c->part_off, &c->part_idx);
    if (!s) s = upload_array(ctx, st, order, (size_t)nq * sizeof *order, &c->order);
    free(order);
    const int64_t cols = mask->B * mask->H * mask->num_kv_blocks;
    if (!s) s = upload_lists(ctx, st, &mask->q_full, cols, &c->qfull_off, &c->qfull_idx);
    if (!s) s = upload_lists(ctx, st, &mask->q_partial, cols, &c->qpart_off, &c->qpart_idx);
    if (s) {
        mask_copy_free_arrays(st, c);
        free(c);
        return s;
    }
    /* The device copy is a cache attached to a const mask by design
     * (internal.h: made on first use). */
    struct flex_block_mask *m = (struct flex_block_mask *)mask;
    m->device_copy = c;
    m->device_copy_free = mask_copy_free;
    *out = c;
    return FLEX_OK;
}

flex_status flex_gpu_bind_mods(flex_context *ctx, flex_gpu_state *st,
                               const struct flex_block_mask *mask,
                               const struct flex_mod *mask_mod, const struct flex_mod *score_mod,
                               flex_gpu_mask_copy **mc, flex_gpu_buffer_desc *descs) {
    *mc = NULL;
    flex_status s = mask ? flex_gpu_mask_device_copy(ctx, st, mask, mc) : FLEX_OK;
    memset(descs, 0, FLEX_EMIT_MAX_SLOTS * sizeof *descs);
    if (!s) s = flex_gpu_fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s) s = flex_gpu_fill_buffers(ctx, st, score_mod, mask_mod ? mask_mod->ir.num_buffers : 0,
                                      descs);
    return s;
}

/* ---- exact classes of undecided blocks ---- */

typedef struct mask_blocks_source_args {
    char *(*source)(const ir_mod *mask);
    const ir_mod *mask;
} mask_blocks_source_args;

static char *build_mask_blocks_source(const void *args) {
    const mask_blocks_source_args *a = args;
    return a->source(a->mask);
}

flex_status flex_gpu_mask_blocks(flex_context *ctx, const struct flex_mod *mask_mod,
                                 int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                 const flex_block_ref *blocks, int64_t count, uint8_t *classes) {
    if (count <= 0) return FLEX_OK;
    flex_gpu_state *st = state_of(ctx);
    const flex_gpu_ops *ops = st->ops;
    pthread_mutex_lock(&st->lock);
    flex_status s = flex_gpu_enter(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->lock);
        return s;
    }
    void *fn = NULL;
    flex_gpu_ptr dblocks = 0, dclasses = 0;
    char key[256];
    snprintf(key, sizeof key, "maskblocks|mask=%016llx|%s|%s", (unsigned long long)mask_mod->hash,
             st->arch, st->compiler);
    const mask_blocks_source_args args = {ops->mask_blocks_source, &mask_mod->ir};
    s = flex_gpu_get_function(ctx, st, key, build_mask_blocks_source, &args,
                              "flex_mask_blocks_kernel", &fn);
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    if (!s) s = flex_gpu_fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s)
        s = flex_gpu_check(ctx, st,
                           ops->mem_alloc(st->api, &dblocks, (size_t)count * sizeof *blocks),
                           ops->mem_alloc_name);
    if (!s)
        s = flex_gpu_check(ctx, st, ops->mem_alloc(st->api, &dclasses, (size_t)count),
                           ops->mem_alloc_name);
    if (!s)
        s = flex_gpu_check(
            ctx, st, ops->copy_to_device(st->api, dblocks, blocks, (size_t)count * sizeof *blocks),
            ops->copy_to_device_name);
    if (!s) {
        const flex_gpu_mask_blocks_head p = {.blocks = dblocks,
                                             .classes = dclasses,
                                             .count = count,
                                             .q_len = (int32_t)q_len,
                                             .kv_len = (int32_t)kv_len,
                                             .q_block = q_block,
                                             .kv_block = kv_block};
        unsigned char blob[sizeof p + FLEX_GPU_BUFFERS_BYTES(FLEX_EMIT_MAX_SLOTS)];
        memcpy(blob, &p, sizeof p);
        const size_t size = flex_gpu_append_buffers(blob, sizeof p, descs,
                                                    mask_mod->ir.num_buffers, st->bounds_flag);
        const unsigned gx = (unsigned)(count < (1 << 20) ? count : (1 << 20));
        s = ops->launch(ctx, st, fn, gx, 1, 256, 0, NULL, blob, size, NULL);
    }
    if (!s) s = flex_gpu_check(ctx, st, ops->synchronize(st->api), ops->synchronize_name);
    if (!s)
        s = flex_gpu_check(ctx, st, ops->copy_to_host(st->api, classes, dclasses, (size_t)count),
                           ops->copy_to_host_name);
    if (!s) s = flex_gpu_take_bounds_flag(ctx, st);
    if (dblocks) ops->mem_free(st->api, dblocks);
    if (dclasses) ops->mem_free(st->api, dclasses);
    flex_gpu_leave(st);
    pthread_mutex_unlock(&st->lock);
    return s;
}

/* ---- launch policy ---- */

int flex_gpu_env_int(const flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi) {
    return flex_debug_int(ctx, key, dflt, lo, hi);
}

int flex_gpu_env_switch(const flex_context *ctx, flex_debug_key key, int dflt) {
    return flex_gpu_env_int(ctx, key, dflt, 0, 1);
}

unsigned char *flex_gpu_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                       int64_t B, int64_t H, int64_t Lq, int64_t Lkv,
                                       int64_t margin) {
    return mod ? flex_gpu_ir_reads_in_range(ctx, mod, &mod->ir, B, H, Lq, Lkv, margin) : NULL;
}

unsigned char *flex_gpu_ir_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                          const ir_mod *ir, int64_t B, int64_t H, int64_t Lq,
                                          int64_t Lkv, int64_t margin) {
    if (!mod || mod->ir.num_buffers <= 0 ||
        !flex_gpu_env_switch(ctx, FLEX_DEBUG_CUDA_READS_IN_RANGE, 1))
        return NULL;
    int64_t sizes[IR_MAX_BUFFERS][4];
    for (int i = 0; i < mod->ir.num_buffers; i++) {
        const flex_tensor *v = &mod->views[i];
        for (int k = 0; k < 4; k++) /* an unbound buffer proves nothing (and fails later) */
            sizes[i][k] = mod->bound[i] && k < v->ndim ? v->sizes[k] : 0;
    }
    const mod_box box = {{0, 0, 0, 0}, {B - 1, H - 1, Lq - 1 + margin, Lkv - 1 + margin}};
    unsigned char *flags = malloc((size_t)ir->num_nodes);
    int any = 0;
    if (flags &&
        mod_interval_loads_in_range(ir, &box, (const int64_t(*)[4])sizes, flags) == 0)
        for (int i = 0; i < ir->num_nodes; i++)
            any |= flags[i];
    if (!any) {
        free(flags);
        return NULL;
    }
    return flags;
}

/* Reads proved by flags (NULL: none). */
static int proved_reads(const unsigned char *flags, const ir_mod *ir) {
    int n = 0;
    for (int i = 0; flags && i < ir->num_nodes; i++)
        n += ir->nodes[i].op == IR_LOAD && flags[i];
    return n;
}

unsigned char *flex_gpu_score_reads_in_range(const flex_context *ctx,
                                             const struct flex_mod *mod, int64_t B, int64_t H,
                                             int64_t Lq, int64_t Lkv, int *clamp) {
    *clamp = 0;
    unsigned char *margin = flex_gpu_reads_in_range(ctx, mod, B, H, Lq, Lkv, 256);
    if (!mod) return margin;
    int reads = 0;
    for (int i = 0; i < mod->ir.num_nodes; i++)
        reads += mod->ir.nodes[i].op == IR_LOAD;
    const int by_margin = proved_reads(margin, &mod->ir);
    if (by_margin == reads) return margin;
    unsigned char *inside = flex_gpu_reads_in_range(ctx, mod, B, H, Lq, Lkv, 0);
    if (proved_reads(inside, &mod->ir) > by_margin) {
        free(margin);
        *clamp = 1;
        return inside;
    }
    free(inside);
    return margin;
}

uint64_t flex_gpu_in_range_checksum(const unsigned char *flags, const ir_mod *ir) {
    return flags ? flex_cache_checksum(flags, (size_t)ir->num_nodes) : 0;
}

int flex_gpu_ir_reads_buffer(const ir_mod *m, int buffer) {
    for (int i = 0; i < m->num_nodes; i++)
        if (m->nodes[i].op == IR_LOAD && m->nodes[i].buffer == buffer) return 1;
    return 0;
}

int flex_gpu_pad64(int64_t d) {
    return (int)((d + 63) / 64 * 64);
}

int flex_gpu_aligned16(const void *p) {
    return ((uintptr_t)p & 15u) == 0;
}

flex_status flex_gpu_fwd_check(flex_context *ctx, const flex_gpu_state *st,
                               const flex_forward_args *a) {
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out;
    const int64_t D = q->sizes[3], Dv = v->sizes[3];
    if (D > 256 || Dv > 256)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the %s backend supports head dims up to 256 (q has %lld, v has %lld)",
                         st->ops->vendor, (long long)D, (long long)Dv);
    if (q->strides[3] != 1 || k->strides[3] != 1 || v->strides[3] != 1 || o->strides[3] != 1)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "the %s backend needs the last dimension of q, k, v and out contiguous",
                         st->ops->vendor);
    return FLEX_OK;
}

flex_status flex_gpu_bwd_check(flex_context *ctx, const flex_gpu_state *st,
                               const flex_backward_args *a) {
    const int64_t B = a->q.sizes[0], Hq = a->q.sizes[1], Lq = a->q.sizes[2];
    const int64_t D = a->q.sizes[3], Lkv = a->k.sizes[2], Dv = a->v.sizes[3];
    if (D > 256 || Dv > 256)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the %s backward supports head dims up to 256 (q has %lld, v has %lld)",
                         st->ops->vendor, (long long)D, (long long)Dv);
    if ((Lq + 3) / 4 > 65535 || (Lkv + 3) / 4 > 65535 || B * Hq > 0x7fffffff)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "sequences too long for one backward launch (q %lld, kv %lld)",
                         (long long)Lq, (long long)Lkv);
    if (a->deterministic && a->num_buffer_grads > 0)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the deterministic %s backward (opts->deterministic) has no gradients "
                         "of buffers, and one was asked for buffer '%s'; leave opts->deterministic "
                         "0 for it, or run the backward on the CPU backend",
                         st->ops->vendor, a->buffer_grads[0].name);
    return FLEX_OK;
}

flex_status flex_gpu_mask_mod(flex_context *ctx, const struct flex_block_mask *mask,
                              const struct flex_mod **mask_mod) {
    *mask_mod = mask ? mask->mask_mod : NULL;
    if (mask && mask->num_partial > 0 && !*mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "the block mask has partial blocks but no mask mod to decide them");
    if (mask && mask->num_partial == 0) *mask_mod = NULL; /* never evaluated: keep kernels shared */
    return FLEX_OK;
}

flex_status flex_gpu_mod_slots(flex_context *ctx, const ir_mod *mask, const ir_mod *score,
                               int *slots) {
    *slots = flex_emit_num_slots(mask, score);
    if (*slots > FLEX_EMIT_MAX_SLOTS)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the mask and score mods read %d buffers together; at most %d", *slots,
                         FLEX_EMIT_MAX_SLOTS);
    return FLEX_OK;
}

int flex_gpu_rows_vec(int64_t D, int64_t Dv, const flex_tensor *const *t, int n) {
    int vec = D % 8 == 0 && Dv % 8 == 0;
    for (int i = 0; i < n; i++) {
        vec = vec && flex_gpu_aligned16(t[i]->data);
        for (int d = 0; d < 3; d++)
            if (t[i]->strides[d] % 8) vec = 0;
    }
    return vec;
}

/* Bytes from a view's first element to past its last (0 when empty). */
static int64_t view_extent_bytes(const flex_tensor *v) {
    int64_t extent = 1;
    for (int d = 0; d < v->ndim; d++) {
        if (v->sizes[d] <= 0) return 0;
        extent += (v->sizes[d] - 1) * (v->strides[d] < 0 ? -v->strides[d] : v->strides[d]);
    }
    return extent * (int64_t)flex_dtype_size(v->dtype);
}

int flex_gpu_fwd_head_group(const struct flex_mod *score_mod, int persistent) {
    if (!score_mod || persistent || score_mod->ir.num_buffers == 0) return 2;
    const ir_mod *ir = &score_mod->ir;
    uint8_t *deps = malloc((size_t)ir->num_nodes);
    if (!deps) return 2;
    ir_dependencies(ir, deps);
    int shared = 0;
    for (int i = 0; i < ir->num_nodes && !shared; i++) {
        const ir_node *n = &ir->nodes[i];
        const int per_score = (deps[i] & (IR_DEP_Q | IR_DEP_KV)) == (IR_DEP_Q | IR_DEP_KV);
        shared = n->op == IR_LOAD && per_score && !(deps[i] & IR_DEP_H) &&
                 score_mod->bound[n->buffer] &&
                 view_extent_bytes(&score_mod->views[n->buffer]) >= FLEX_GPU_SHARED_READ_BYTES;
    }
    free(deps);
    return shared ? FLEX_GPU_SHARED_READ_GROUP : 2;
}

int flex_gpu_short_indices(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t margin) {
    return Lq <= FLEX_EMIT_SHORT_LEN - margin && Lkv <= FLEX_EMIT_SHORT_LEN - margin &&
           B <= FLEX_EMIT_SHORT_HEADS && H <= FLEX_EMIT_SHORT_HEADS;
}

void flex_gpu_row_tiles(int q_block, int kv_block, int wide, int max_warps, int *warps,
                        int *block_n) {
    const int max_n = wide ? 32 : 64;
    *warps = q_block / 16 < max_warps ? q_block / 16 : max_warps;
    *block_n = kv_block < max_n ? kv_block : max_n;
}

void flex_gpu_fwd_tiles(const flex_context *ctx, flex_cuda_fwd_config *cfg, int q_block,
                        int kv_block, int hopper) {
    const int wide = cfg->dq > 128 || cfg->dv > 128;
    cfg->wgmma = 0;
    /* cuda_wgmma_step=64 takes 64-key steps at any head dim (comparison) */
    const int step_asked = flex_gpu_env_int(ctx, FLEX_DEBUG_CUDA_WGMMA_STEP, 128, 64, 128);
    const int wgmma_step = wide || kv_block % 128 || step_asked < 128 ? 64 : 128;
    if (hopper && cfg->vec && q_block % 128 == 0 && kv_block % wgmma_step == 0) {
        /* Two warpgroups x 64 rows. */
        cfg->wgmma = 1;
        cfg->warps = 8;
        cfg->mt = 1;
        cfg->block_n = wgmma_step;
    } else if (!wide && q_block >= 128 && kv_block >= 64) {
        /* 4 warps x 32 rows: each K/V fragment feeds two m-tiles, and two
         * CTAs fit on an SM (96 KB of shared memory each). */
        cfg->warps = 4;
        cfg->mt = 2;
        cfg->block_n = 64;
    } else {
        /* One m-tile per warp, up to 8 warps (4 for wide heads). */
        cfg->mt = 1;
        flex_gpu_row_tiles(q_block, kv_block, wide, wide ? 4 : 8, &cfg->warps, &cfg->block_n);
    }
    const char *env = flex_debug_string(ctx, FLEX_DEBUG_CUDA_TILE);
    int w, mt, bn;
    if (env && sscanf(env, "%dx%dx%d", &w, &mt, &bn) == 3 && w > 0 && mt > 0 && bn >= 16 &&
        w * 16 * mt <= q_block && q_block % (w * 16 * mt) == 0 && kv_block % bn == 0 &&
        bn % 16 == 0) {
        cfg->wgmma = 0;
        cfg->warps = w;
        cfg->mt = mt;
        cfg->block_n = bn;
    }
}

void flex_gpu_fwd_q_bufs(flex_cuda_fwd_config *cfg, size_t limit) {
    cfg->q_bufs = cfg->tma ? 2 : 0;
    if (cfg->tma && flex_gpu_fwd_smem(cfg) > limit) cfg->q_bufs = 1;
}

size_t flex_gpu_fwd_smem(const flex_cuda_fwd_config *cfg) {
    const size_t block_m = (size_t)cfg->warps * 16 * (size_t)cfg->mt;
    /* the diagonal tables: FLEX_DIAG_ROWS x FLEX_DIAG_STRIDE floats a warp */
    const size_t diag =
        (size_t)cfg->warps * (size_t)cfg->diag_values * (size_t)(cfg->block_n + 16) * sizeof(float);
    return ((size_t)(cfg->tma ? cfg->q_bufs : 1) * block_m * (size_t)cfg->dq +
            2u * (size_t)cfg->block_n * (size_t)(cfg->dq + cfg->dv)) *
               2 +
           (cfg->wgmma ? 1024u : 0u) + diag;
}

void flex_gpu_fwd_fit(flex_cuda_fwd_config *cfg, size_t limit) {
    while (flex_gpu_fwd_smem(cfg) > limit && cfg->block_n > 16)
        cfg->block_n /= 2;
    while (flex_gpu_fwd_smem(cfg) > limit && cfg->warps > 1)
        cfg->warps /= 2;
}

void flex_gpu_fwd_params_fill(flex_gpu_fwd_params *p, const flex_forward_args *a,
                              const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                              int q_block, int kv_block, int block_m, int head_group) {
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Lkv = k->sizes[2], Dv = v->sizes[3];
    memset(p, 0, sizeof *p);
    p->q = (uintptr_t)q->data;
    p->k = (uintptr_t)k->data;
    p->v = (uintptr_t)v->data;
    p->out = (uintptr_t)o->data;
    p->lse = a->lse ? (uintptr_t)a->lse->data : 0;
    p->q_sb = q->strides[0], p->q_sh = q->strides[1], p->q_ss = q->strides[2];
    p->k_sb = k->strides[0], p->k_sh = k->strides[1], p->k_ss = k->strides[2];
    p->v_sb = v->strides[0], p->v_sh = v->strides[1], p->v_ss = v->strides[2];
    p->o_sb = o->strides[0], p->o_sh = o->strides[1], p->o_ss = o->strides[2];
    if (a->lse)
        p->l_sb = a->lse->strides[0], p->l_sh = a->lse->strides[1], p->l_ss = a->lse->strides[2];
    p->B = (int32_t)B, p->Hq = (int32_t)Hq, p->Hkv = (int32_t)Hkv;
    p->Lq = (int32_t)Lq, p->Lkv = (int32_t)Lkv, p->D = (int32_t)D, p->Dv = (int32_t)Dv;
    p->mask_qblock = q_block;
    p->mask_kvblock = kv_block;
    if (mask) {
        p->full_off = mc->full_off, p->full_idx = mc->full_idx;
        p->part_off = mc->part_off, p->part_idx = mc->part_idx;
        p->row_order = mc->order;
        p->mask_B = (int32_t)mask->B, p->mask_H = (int32_t)mask->H;
        p->mask_nq = (int32_t)mask->num_q_blocks, p->mask_nk = (int32_t)mask->num_kv_blocks;
    } else {
        p->dense = 1;
        p->mask_B = p->mask_H = 1;
        p->mask_nq = (int32_t)((Lq + q_block - 1) / q_block);
        p->mask_nk = (int32_t)((Lkv + kv_block - 1) / kv_block);
    }
    p->tiles_per_row = q->dtype == FLEX_F32 ? 1 : q_block / block_m;
    p->head_group = head_group;
    p->scale = a->scale;
    p->scale_log2 = a->scale * 1.4426950408889634f;
}

size_t flex_gpu_fwd_blob(unsigned char *blob, flex_gpu_fwd_params *p, const flex_forward_args *a,
                         const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                         const struct flex_gpu_partial_bits *bits, int q_block, int kv_block,
                         int block_m, int head_group, const flex_gpu_buffer_desc *descs,
                         int slots, flex_gpu_ptr flag) {
    flex_gpu_fwd_params_fill(p, a, mask, mc, q_block, kv_block, block_m, head_group);
    if (bits) flex_gpu_fwd_params_set_bits(p, bits);
    memcpy(blob, p, sizeof *p);
    return flex_gpu_append_buffers(blob, sizeof *p, descs, slots, flag);
}

size_t flex_gpu_dec_blob(unsigned char *blob, const flex_gpu_dec_head *hd,
                         const flex_gpu_fwd_params *p, const flex_gpu_buffer_desc *descs,
                         int slots, flex_gpu_ptr flag) {
    memcpy(blob, hd, sizeof *hd);
    memcpy(blob + FLEX_GPU_DEC_FWD_AT, p, sizeof *p);
    return flex_gpu_append_buffers(blob, FLEX_GPU_DEC_FWD_AT + sizeof *p, descs, slots, flag);
}

void flex_gpu_fwd_config(flex_cuda_fwd_config *cfg, const flex_forward_args *a) {
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Lkv = k->sizes[2], Dv = v->sizes[3];
    memset(cfg, 0, sizeof *cfg);
    cfg->dtype = q->dtype;
    cfg->dq = flex_gpu_pad64(D);
    cfg->dv = flex_gpu_pad64(Dv);
    cfg->dv_exact = flex_gpu_pad64(Dv) == Dv;
    cfg->scale_positive = a->scale > 0.0f;
    /* Kernels evaluate the mods up to a tile past the end too (and discard
     * those scores): 256 of margin keeps them in the bounds. */
    cfg->short_indices = flex_gpu_short_indices(B, Hq, Lq, Lkv, 256);
    if (q->dtype == FLEX_F32) {
        cfg->warps = 4;
        cfg->mt = 1;
    } else {
        const flex_tensor *rows[4] = {q, k, v, o};
        cfg->vec = flex_gpu_rows_vec(D, Dv, rows, 4);
    }
}

static uint64_t mod_hash(const struct flex_mod *mod) {
    return mod ? mod->hash : 0;
}

void flex_gpu_fwd_key(char *key, size_t cap, const flex_gpu_state *st,
                      const flex_cuda_fwd_config *cfg, int sm90, const struct flex_mod *mask_mod,
                      const struct flex_mod *score_mod, const unsigned char *mask_in_range,
                      const unsigned char *score_in_range) {
    /* The key names every field of the configuration: a new field that
     * changes the source belongs in it too, or two kernels share a key. */
    _Static_assert(sizeof(flex_cuda_fwd_config) == 19 * sizeof(int),
                   "flex_cuda_fwd_config changed: update the forward kernel key");
    char sm90_fields[64] = "";
    if (sm90)
        snprintf(sm90_fields, sizeof sm90_fields, "wg%d|tma%d|qb%d|ch%d|sc%d|dg%d|", cfg->wgmma,
                 cfg->tma, cfg->q_bufs, cfg->chain, cfg->step_cuts, cfg->diag_values);
    snprintf(key, cap,
             "fwd|%s|dq%d|dv%d|dx%d|w%d|mt%d|n%d|vec%d|%smb%d|pb%d|short%d|scl%d|sp%d|mask=%016llx|"
             "score=%016llx|inr=%016llx.%016llx|%s|%s",
             flex_dtype_name(cfg->dtype), cfg->dq, cfg->dv, cfg->dv_exact, cfg->warps, cfg->mt,
             cfg->block_n, cfg->vec, sm90_fields, cfg->mask_bits, cfg->partial_bits,
             cfg->short_indices, cfg->score_clamp,
             cfg->scale_positive, (unsigned long long)mod_hash(mask_mod),
             (unsigned long long)mod_hash(score_mod),
             (unsigned long long)flex_gpu_in_range_checksum(mask_in_range,
                                                            mask_mod ? &mask_mod->ir : NULL),
             (unsigned long long)flex_gpu_in_range_checksum(score_in_range,
                                                            score_mod ? &score_mod->ir : NULL),
             st->arch, st->compiler);
}

typedef struct fwd_source_args {
    flex_gpu_fwd_source_fn source;
    const flex_cuda_fwd_config *cfg;
    const ir_mod *mask, *score;
    const unsigned char *mask_in_range, *score_in_range;
} fwd_source_args;

static char *build_fwd_source(const void *args) {
    const fwd_source_args *a = args;
    return a->source(a->cfg, a->mask, a->score, a->mask_in_range, a->score_in_range);
}

flex_status flex_gpu_fwd_function(flex_context *ctx, flex_gpu_state *st, const char *key,
                                  flex_gpu_fwd_source_fn source, const flex_cuda_fwd_config *cfg,
                                  const struct flex_mod *mask_mod,
                                  const struct flex_mod *score_mod,
                                  const unsigned char *mask_in_range,
                                  const unsigned char *score_in_range, void **fn) {
    const fwd_source_args args = {source,
                                  cfg,
                                  mask_mod ? &mask_mod->ir : NULL,
                                  score_mod ? &score_mod->ir : NULL,
                                  mask_in_range,
                                  score_in_range};
    return flex_gpu_get_function(ctx, st, key, build_fwd_source, &args, "flex_forward_kernel", fn);
}

int flex_gpu_decode_splits(int sm_count, int64_t units, int64_t longest_kv, int hint) {
    int64_t steps = (longest_kv + 63) / 64;
    if (steps < 1) steps = 1;
    if (hint > 0) return (int)(hint < steps ? hint : steps);
    if (units < 1) units = 1;
    const int64_t want = 2 * (int64_t)(sm_count > 0 ? sm_count : 1);
    int64_t splits = (want + units - 1) / units;
    if (splits > steps / 4) splits = steps / 4;
    if (splits > 256) splits = 256;
    return splits < 1 ? 1 : (int)splits;
}

/* ---- backward ---- */

size_t flex_gpu_bwd_smem(const flex_cuda_bwd_config *cfg) {
    const size_t bn = (size_t)cfg->warps * 16, bm = (size_t)cfg->block_m;
    const size_t stages = cfg->tma ? (size_t)cfg->tma : cfg->pipeline ? 2 : 1;
    const size_t ds_cols = bm > 64 ? bm : 64, ds_tiles = cfg->tma ? 2 : 1;
    const size_t dims = (size_t)cfg->dq + (size_t)cfg->dv;
    /* the sm_90a kernel rounds its base up to 1024 bytes (wgmma's swizzle)
     * and, with dq_bulk, stages dQ in a region per warp: 16 rows of 64
     * floats padded to 72 (flex_backward_sm90.cuh's FLEX_BWD90_SDQ); the
     * shared gradient region follows lse, delta and the dQ regions. With
     * tma, the stages' mbarriers and step slots take 128 bytes after delta
     * and dS has two tiles. */
    const size_t dq_regions = cfg->wgmma && cfg->dq_bulk ? (size_t)cfg->warps * 16 * 288 : 0;
    return 2 * (bn * dims + stages * bm * dims + ds_tiles * bn * ds_cols) + 8 * stages * bm +
           (cfg->wgmma ? 1024 : 0) + dq_regions + 4 * (size_t)cfg->grad_smem + (cfg->tma ? 128 : 0);
}

int flex_gpu_bwd_grad_floats(const flex_backward_args *a) {
    int64_t total = 0;
    for (int i = 0; i < a->num_buffer_grads; i++) {
        const flex_tensor *g = &a->buffer_grads[i].grad;
        int64_t n = 1;
        for (int d = 0; d < g->ndim && n <= FLEX_GPU_BWD_GRAD_SMEM_MAX; d++)
            n *= g->sizes[d];
        /* an empty tensor has no element a clamped index could name */
        if (n < 1 || g->ndim > 4) return 0;
        total += n;
        if (total > FLEX_GPU_BWD_GRAD_SMEM_MAX) return 0;
    }
    return (int)total;
}

void flex_gpu_bwd_config(flex_cuda_bwd_config *cfg, const flex_backward_args *a) {
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *dout = &a->dout;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Lkv = k->sizes[2], Dv = v->sizes[3];
    memset(cfg, 0, sizeof *cfg);
    cfg->dtype = q->dtype;
    cfg->dq = flex_gpu_pad64(D);
    cfg->dv = flex_gpu_pad64(Dv);
    cfg->warps = 4;
    cfg->block_m = 16;
    /* the kernels pass the mods indices clamped into the sequences */
    cfg->short_indices = flex_gpu_short_indices(B, Hq, Lq, Lkv, 0);
    cfg->grad_slots = a->num_buffer_grads;
    if (q->dtype != FLEX_F32) {
        const flex_tensor *rows[4] = {q, k, v, dout};
        cfg->vec = flex_gpu_rows_vec(D, Dv, rows, 4);
    }
}

void flex_gpu_bwd_tiles(flex_cuda_bwd_config *cfg, int q_block, int kv_block, int wide_block_m) {
    const int widest = cfg->dq > cfg->dv ? cfg->dq : cfg->dv;
    const int want_m = widest <= 64 ? 64 : widest <= 128 ? 32 : wide_block_m;
    const int block_n = widest <= 128 && kv_block % 128 == 0 ? 128 : kv_block < 64 ? kv_block : 64;
    cfg->warps = block_n / 16;
    cfg->block_m = q_block < want_m ? q_block : want_m;
}

void flex_gpu_bwd_fit(flex_cuda_bwd_config *cfg, size_t smem_limit, int shrink_block_m) {
    while (flex_gpu_bwd_smem(cfg) > smem_limit && cfg->warps > 4)
        cfg->warps /= 2;
    if (flex_gpu_bwd_smem(cfg) > smem_limit) cfg->pipeline = 0;
    while (shrink_block_m && flex_gpu_bwd_smem(cfg) > smem_limit && cfg->block_m > 16)
        cfg->block_m /= 2;
    while (flex_gpu_bwd_smem(cfg) > smem_limit && cfg->warps > 1)
        cfg->warps /= 2;
}

flex_status flex_gpu_bwd_score_prepare(flex_context *ctx, const flex_gpu_state *st,
                                       const flex_backward_args *a, ir_mod *derived,
                                       int *derived_made, mod_derivative *der,
                                       struct flex_cuda_grad_load *loads, int *num_loads,
                                       flex_gpu_buffer_desc *grad_descs) {
    const struct flex_mod *score_mod = a->score_mod;
    const int identity = score_mod && score_mod->ir.root >= 0 &&
                         score_mod->ir.nodes[score_mod->ir.root].op == IR_SCORE;
    memset(derived, 0, sizeof *derived);
    *derived_made = 0;
    memset(der, 0, sizeof *der);
    *num_loads = 0;
    memset(grad_descs, 0, IR_MAX_BUFFERS * sizeof *grad_descs);
    flex_status s = FLEX_OK;
    for (int i = 0; i < a->num_buffer_grads && !s; i++) {
        const flex_buffer_grad *g = &a->buffer_grads[i];
        int buffer = -1;
        for (int j = 0; score_mod && j < score_mod->ir.num_buffers; j++)
            if (!strcmp(score_mod->ir.buffers[j].name, g->name)) buffer = j;
        if (buffer < 0)
            s = flex_fail(ctx, FLEX_ERR_MOD_NAME, "the score mod has no buffer '%s'", g->name);
        else if (identity || !flex_gpu_ir_reads_buffer(&score_mod->ir, buffer))
            s = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                          "a gradient for buffer '%s' was asked for, but the score mod does not "
                          "read it",
                          g->name);
        else if (g->grad.device != st->device_type || g->grad.device_index != ctx->device_index)
            s = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                          "the gradient of buffer '%s' must be on the context's GPU", g->name);
        else if (i >= IR_MAX_BUFFERS)
            s = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT, "more than %d buffer gradients asked for",
                          IR_MAX_BUFFERS);
        if (s) return s;
        flex_gpu_buffer_desc *d = &grad_descs[i];
        d->data = (uint64_t)(uintptr_t)g->grad.data;
        for (int kd = 0; kd < 4; kd++) {
            const int64_t size = kd < g->grad.ndim ? g->grad.sizes[kd] : 1;
            d->sizes[kd] = (int32_t)(size > INT32_MAX ? INT32_MAX : size);
            d->strides[kd] = kd < g->grad.ndim ? g->grad.strides[kd] : 0;
        }
    }
    if (!score_mod || identity) return FLEX_OK;
    if (ir_copy(derived, &score_mod->ir) != 0)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory to copy the score mod");
    const int rc = mod_derive(derived, der);
    if (rc != 0) {
        ir_free(derived);
        if (rc == MOD_DERIVE_TOO_MANY_LOADS)
            return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                             "the score mod reads float buffers at more than %d places; the "
                             "backward supports at most that many",
                             MOD_DERIVE_MAX_LOADS);
        if (rc == MOD_DERIVE_NOT_SCORE)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "score_mod does not return a float score");
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "no memory (or too many IR nodes) for the score mod's derivative");
    }
    *derived_made = 1;
    for (int l = 0; l < der->num_loads; l++)
        for (int i = 0; i < a->num_buffer_grads; i++) {
            if (strcmp(score_mod->ir.buffers[der->loads[l].buffer].name,
                       a->buffer_grads[i].name) != 0 ||
                *num_loads == MOD_DERIVE_MAX_LOADS)
                continue;
            loads[(*num_loads)++] = flex_cuda_grad_load_of(derived, &der->loads[l], i);
        }
    return FLEX_OK;
}

size_t flex_gpu_bwd_blob(unsigned char *blob, const flex_backward_args *a,
                         const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                         const struct flex_gpu_partial_bits *bits, int q_block, int kv_block,
                         int head_group, flex_gpu_ptr delta, flex_gpu_ptr dq_acc,
                         const flex_gpu_buffer_desc *grad_descs, int grad_slots,
                         const flex_gpu_buffer_desc *descs, int slots, flex_gpu_ptr flag) {
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out, *dout = &a->dout;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Lkv = k->sizes[2], Dv = v->sizes[3];
    flex_gpu_bwd_head hd;
    memset(&hd, 0, sizeof hd);
    hd.dout = (uintptr_t)dout->data;
    hd.dq = a->dq ? (uintptr_t)a->dq->data : 0;
    hd.dk = a->dk ? (uintptr_t)a->dk->data : 0;
    hd.dv = a->dv ? (uintptr_t)a->dv->data : 0;
    hd.delta = delta;
    hd.dq_acc = dq_acc;
    hd.do_sb = dout->strides[0], hd.do_sh = dout->strides[1], hd.do_ss = dout->strides[2];
    if (a->dq)
        hd.dq_sb = a->dq->strides[0], hd.dq_sh = a->dq->strides[1], hd.dq_ss = a->dq->strides[2];
    if (a->dk)
        hd.dk_sb = a->dk->strides[0], hd.dk_sh = a->dk->strides[1], hd.dk_ss = a->dk->strides[2];
    if (a->dv)
        hd.dv_sb = a->dv->strides[0], hd.dv_sh = a->dv->strides[1], hd.dv_ss = a->dv->strides[2];

    flex_gpu_fwd_params p;
    memset(&p, 0, sizeof p);
    p.q = (uintptr_t)q->data;
    p.k = (uintptr_t)k->data;
    p.v = (uintptr_t)v->data;
    p.out = (uintptr_t)o->data;
    p.lse = (uintptr_t)a->lse.data;
    p.q_sb = q->strides[0], p.q_sh = q->strides[1], p.q_ss = q->strides[2];
    p.k_sb = k->strides[0], p.k_sh = k->strides[1], p.k_ss = k->strides[2];
    p.v_sb = v->strides[0], p.v_sh = v->strides[1], p.v_ss = v->strides[2];
    p.o_sb = o->strides[0], p.o_sh = o->strides[1], p.o_ss = o->strides[2];
    p.l_sb = a->lse.strides[0], p.l_sh = a->lse.strides[1], p.l_ss = a->lse.strides[2];
    p.B = (int32_t)B, p.Hq = (int32_t)Hq, p.Hkv = (int32_t)Hkv;
    p.Lq = (int32_t)Lq, p.Lkv = (int32_t)Lkv, p.D = (int32_t)D, p.Dv = (int32_t)Dv;
    p.mask_qblock = q_block;
    p.mask_kvblock = kv_block;
    if (mask) {
        p.full_off = mc->full_off, p.full_idx = mc->full_idx;
        p.part_off = mc->part_off, p.part_idx = mc->part_idx;
        hd.qfull_off = mc->qfull_off, hd.qfull_idx = mc->qfull_idx;
        hd.qpart_off = mc->qpart_off, hd.qpart_idx = mc->qpart_idx;
        p.mask_B = (int32_t)mask->B, p.mask_H = (int32_t)mask->H;
        p.mask_nq = (int32_t)mask->num_q_blocks, p.mask_nk = (int32_t)mask->num_kv_blocks;
    } else {
        p.dense = 1;
        p.mask_B = p.mask_H = 1;
        p.mask_nq = (int32_t)((Lq + q_block - 1) / q_block);
        p.mask_nk = (int32_t)((Lkv + kv_block - 1) / kv_block);
    }
    p.tiles_per_row = 1;
    p.head_group = head_group;
    p.scale = a->scale;
    p.scale_log2 = a->scale * 1.4426950408889634f;
    if (bits) {
        /* the main kernel walks the q-major lists: their table */
        flex_gpu_fwd_params_set_bits(&p, bits);
        hd.qbit_words = bits->q_entry_words;
    }

    /* The kernels' grads[] has at least one entry (FLEX_GPU_BWD_FWD_AT). */
    const size_t at_fwd = FLEX_GPU_BWD_FWD_AT(grad_slots);
    memcpy(blob, &hd, sizeof hd);
    memcpy(blob + sizeof hd, grad_descs, at_fwd - sizeof hd);
    memcpy(blob + at_fwd, &p, sizeof p);
    return flex_gpu_append_buffers(blob, at_fwd + sizeof p, descs, slots, flag);
}

flex_status flex_gpu_bwd_mods_prepare(flex_context *ctx, const flex_gpu_state *st,
                                      const flex_backward_args *a,
                                      const struct flex_mod *mask_mod, flex_gpu_bwd_mods *m) {
    flex_status s = flex_gpu_bwd_score_prepare(ctx, st, a, &m->derived, &m->derived_made, &m->der,
                                               m->loads, &m->num_loads, m->grad_descs);
    if (s) return s;
    m->mask_mod = mask_mod;
    m->mask_ir = mask_mod ? &mask_mod->ir : NULL;
    m->score_ir = m->derived_made ? &m->derived : NULL;
    m->score_used = m->derived_made ? a->score_mod : NULL;
    s = flex_gpu_mod_slots(ctx, m->mask_ir, m->score_ir, &m->slots);
    if (s) flex_gpu_bwd_mods_free(m);
    return s;
}

void flex_gpu_bwd_mods_free(flex_gpu_bwd_mods *m) {
    if (m->derived_made) ir_free(&m->derived);
    m->derived_made = 0;
    m->score_ir = NULL;
}

void flex_gpu_bwd_key(char *key, size_t cap, const flex_gpu_state *st,
                      const flex_cuda_bwd_config *cfg, const flex_gpu_bwd_mods *m,
                      const unsigned char *mask_in_range, const unsigned char *score_in_range) {
    /* every field but head_group, a parameter of the launch */
    _Static_assert(sizeof(flex_cuda_bwd_config) == 23 * sizeof(int),
                   "flex_cuda_bwd_config changed: update the backward kernel key");
    snprintf(key, cap,
             "bwd|%s|dq%d|dv%d|w%d|bm%d|vec%d|short%d|gs%d|pipe%d|exp2%d|red%d|kvf%d|wg%d|sw%d|"
             "wgb%d|dqb%d|tma%d.%d|dqw%d|dqn%d|gsm%d|pb%d|mask=%016llx|score=%016llx|"
             "loads=%016llx|inr=%016llx.%016llx|%s|%s",
             flex_dtype_name(cfg->dtype), cfg->dq, cfg->dv, cfg->warps, cfg->block_m, cfg->vec,
             cfg->short_indices, cfg->grad_slots, cfg->pipeline, cfg->exp2, cfg->dq_red,
             cfg->kv_fastest, cfg->wgmma, cfg->split_wait, cfg->wg_barrier, cfg->dq_bulk,
             cfg->tma, cfg->refill_early, cfg->dq_warps, cfg->dq_block_n, cfg->grad_smem,
             cfg->partial_bits, (unsigned long long)mod_hash(m->mask_mod),
             (unsigned long long)mod_hash(m->score_used),
             (unsigned long long)(m->num_loads ? flex_cache_checksum(m->loads,
                                                                    (size_t)m->num_loads *
                                                                        sizeof m->loads[0])
                                               : 0),
             (unsigned long long)flex_gpu_in_range_checksum(mask_in_range, m->mask_ir),
             (unsigned long long)(m->score_ir ? flex_gpu_in_range_checksum(score_in_range,
                                                                           m->score_ir)
                                              : 0),
             st->arch, st->compiler);
}

typedef struct bwd_source_args {
    flex_gpu_bwd_source_fn source;
    const flex_cuda_bwd_config *cfg;
    const ir_mod *mask;
    const unsigned char *mask_in_range;
    const flex_cuda_bwd_score *score;
} bwd_source_args;

static char *build_bwd_source(const void *args) {
    const bwd_source_args *a = args;
    return a->source(a->cfg, a->mask, a->mask_in_range, a->score);
}

flex_status flex_gpu_bwd_kernels_get(flex_context *ctx, flex_gpu_state *st,
                                     const flex_backward_args *a, const flex_cuda_bwd_config *cfg,
                                     const flex_gpu_bwd_mods *m, flex_gpu_bwd_source_fn source,
                                     flex_gpu_bwd_kernels *k) {
    const int64_t B = a->q.sizes[0], Hq = a->q.sizes[1], Lq = a->q.sizes[2];
    const int64_t Lkv = a->k.sizes[2];
    memset(k, 0, sizeof *k);
    /* The kernels clamp the indices they pass to the mods into the
     * sequences, so the proofs need no margin. */
    unsigned char *mask_in_range = flex_gpu_reads_in_range(ctx, m->mask_mod, B, Hq, Lq, Lkv, 0);
    unsigned char *score_in_range =
        m->score_ir
            ? flex_gpu_ir_reads_in_range(ctx, a->score_mod, m->score_ir, B, Hq, Lq, Lkv, 0)
            : NULL;
    const flex_cuda_bwd_score score = {m->score_ir, m->der.value, m->der.dscore,
                                       m->loads,    m->num_loads, score_in_range};
    char key[512];
    flex_gpu_bwd_key(key, sizeof key, st, cfg, m, mask_in_range, score_in_range);
    const bwd_source_args args = {source, cfg, m->mask_ir, mask_in_range, &score};
    flex_status s =
        flex_gpu_get_function(ctx, st, key, build_bwd_source, &args, "flex_bwd_kernel", &k->main);
    free(mask_in_range);
    free(score_in_range);
    if (!s) s = flex_gpu_module_function(ctx, st, key, "flex_bwd_preprocess", &k->pre);
    if (!s && a->dq && !cfg->dq_warps)
        s = flex_gpu_module_function(ctx, st, key, "flex_bwd_dq_store", &k->store);
    if (!s && cfg->dq_warps)
        s = flex_gpu_module_function(ctx, st, key, "flex_bwd_dq_kernel", &k->dq);
    if (!s && cfg->partial_bits)
        s = flex_gpu_module_function(ctx, st, key, "flex_partial_bits_kernel", &k->bits);
    return s;
}

void flex_gpu_bwd_workspace(const flex_backward_args *a, const flex_cuda_bwd_config *cfg,
                            size_t *delta_bytes, size_t *dq_bytes) {
    const int64_t B = a->q.sizes[0], Hq = a->q.sizes[1], Lq = a->q.sizes[2], D = a->q.sizes[3];
    *delta_bytes = ((size_t)(B * Hq * Lq) * sizeof(float) + 255) & ~(size_t)255;
    *dq_bytes = a->dq && !cfg->dq_warps ? (size_t)(B * Hq * Lq * D) * sizeof(float) : 0;
}

flex_status flex_gpu_bwd_launch(flex_context *ctx, flex_gpu_state *st,
                                const flex_backward_args *a, const flex_cuda_bwd_config *cfg,
                                const flex_gpu_bwd_mods *m, const flex_gpu_mask_copy *mc,
                                const flex_gpu_bwd_kernels *k, const flex_gpu_buffer_desc *descs,
                                flex_gpu_ptr ws, size_t smem, size_t smem_dq, void *stream,
                                void *main_second) {
    const struct flex_block_mask *mask = a->block_mask;
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
    const int64_t B = a->q.sizes[0], Hq = a->q.sizes[1], Lq = a->q.sizes[2];
    const int64_t Hkv = a->k.sizes[1], Lkv = a->k.sizes[2];
    const int f32 = a->q.dtype == FLEX_F32;
    size_t delta_bytes, dq_bytes;
    flex_gpu_bwd_workspace(a, cfg, &delta_bytes, &dq_bytes);
    unsigned char blob[FLEX_GPU_BWD_BLOB_BYTES];
    /* dQ accumulator 0: the main kernel leaves dQ alone */
    const size_t size =
        flex_gpu_bwd_blob(blob, a, mask, mc, cfg->partial_bits && mc ? mc->partial_bits : NULL,
                          q_block, kv_block, cfg->head_group, ws, dq_bytes ? ws + delta_bytes : 0,
                          m->grad_descs, cfg->grad_slots, descs, m->slots, st->bounds_flag);
    const unsigned rows_y = (unsigned)((Lq + 3) / 4);
    flex_status s = st->ops->launch(ctx, st, k->pre, (unsigned)(B * Hq), rows_y, 128, 0, stream,
                                    blob, size, NULL);
    if (!s) {
        const int64_t per_cta = f32 ? 4 : (int64_t)cfg->warps * 16;
        const unsigned heads = (unsigned)(B * Hkv);
        const unsigned tiles = (unsigned)((Lkv + per_cta - 1) / per_cta);
        s = st->ops->launch(ctx, st, k->main, cfg->kv_fastest ? tiles : heads,
                            cfg->kv_fastest ? heads : tiles,
                            f32 ? 128u : (unsigned)cfg->warps * 32, (unsigned)smem, stream, blob,
                            size, main_second);
    }
    if (!s && k->store)
        s = st->ops->launch(ctx, st, k->store, (unsigned)(B * Hq), rows_y, 128, 0, stream, blob,
                            size, NULL);
    if (!s && k->dq) {
        const int64_t rows = f32 ? 4 : (int64_t)cfg->dq_warps * 16;
        s = st->ops->launch(ctx, st, k->dq, (unsigned)(B * Hq), (unsigned)((Lq + rows - 1) / rows),
                            (unsigned)cfg->dq_warps * 32, (unsigned)smem_dq, stream, blob, size,
                            NULL);
    }
    if (!s && m->slots > 0) {
        atomic_store(&st->bounds_pending, 1);
        /* a graph's replays launch the kernels with no call here */
        if (st->capturing) atomic_store(&st->bounds_in_graph, 1);
    }
    return s;
}

/* ---- per-call work space ---- */

int flex_gpu_caller_alloc(flex_context *ctx, size_t bytes, void *stream, void **ptr,
                          flex_status *status) {
    const flex_device_allocator *a = &ctx->allocator;
    *ptr = NULL;
    *status = FLEX_OK;
    if (!a->alloc) return 0;
    if (!bytes) return 1;
    *ptr = a->alloc(a->user, bytes, stream);
    if (!*ptr)
        *status = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                            "the caller's allocator gave no %zu-byte work space", bytes);
    else if ((uintptr_t)*ptr % 256 != 0) {
        /* the kernels' bulk copies and tensor maps read it in aligned rows */
        a->free(a->user, *ptr, stream);
        *ptr = NULL;
        *status = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                            "the caller's allocator gave a work space that is not aligned to 256 "
                            "bytes");
    }
    return 1;
}

int flex_gpu_caller_free(flex_context *ctx, void *ptr, void *stream) {
    const flex_device_allocator *a = &ctx->allocator;
    if (!a->alloc) return 0;
    if (ptr) a->free(a->user, ptr, stream);
    return 1;
}
