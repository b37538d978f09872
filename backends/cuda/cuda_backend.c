/*
 * The CUDA backend: the backend table, device memory, kernel lookup (memory
 * module list -> kernel cache -> NVRTC), and the launches of the forward and
 * mask-block kernels. The driver API is used through cuda_loader.h; every
 * driver call's result is checked and turned into FLEX_ERR_DEVICE with the
 * driver's name and description of the error.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"
#include "cache.h"
#include "cuda_compile.h"
#include "cuda_loader.h"
#include "mod/derive.h"
#include "mod/emit.h"
#include "clock.h"

/* ---- state ---- */

typedef struct cuda_module {
    char *key; /* what the source is made of: configuration, mod hashes, arch */
    CUmodule module;
    CUfunction fn;
    struct cuda_module *next;
} cuda_module;

/* A device copy of a host-resident mod buffer, kept until release. */
typedef struct cuda_buffer_copy {
    const struct flex_mod *mod;
    int index;
    uint64_t generation;
    const void *host;
    CUdeviceptr dev;
    struct cuda_buffer_copy *next;
} cuda_buffer_copy;

typedef struct cuda_state {
    const flex_cuda_api *api;
    CUdevice dev;
    CUcontext cu;
    char name[256];
    char arch[16];
    int major, minor, sm_count, smem_optin;
    CUdeviceptr bounds_flag;   /* u32: bit i = buffer slot i was read out of range */
    atomic_int bounds_pending; /* a kernel that reads mod buffers ran since the last read */
    char slot_names[FLEX_EMIT_MAX_SLOTS][80];
    cuda_module *modules;
    cuda_buffer_copy *buffer_copies;
    pthread_mutex_t lock;
} cuda_state;

/* One cache for the whole process, so a second context reuses binaries. */
static flex_cache *process_cache;
static pthread_once_t process_cache_once = PTHREAD_ONCE_INIT;
static void process_cache_open(void) {
    process_cache = flex_cache_open(NULL, "cuda");
}

static cuda_state *state_of(flex_context *ctx) {
    return (cuda_state *)ctx->backend_state;
}

/* Checks a driver result; on failure records FLEX_ERR_DEVICE naming what. */
static flex_status check_cu(flex_context *ctx, const flex_cuda_api *api, CUresult r,
                            const char *what) {
    if (r == 0) return FLEX_OK;
    char desc[256];
    flex_cuda_describe(api, r, desc, sizeof desc);
    return flex_fail(ctx, FLEX_ERR_DEVICE, "CUDA %s failed: %s", what, desc);
}

#define CU_TRY(ctx, st, call, what)                                                                \
    do {                                                                                           \
        flex_status cu_try_status_ = check_cu((ctx), (st)->api, (call), (what));                   \
        if (cu_try_status_ != FLEX_OK) return cu_try_status_;                                      \
    } while (0)

/* Makes the device's context current for the duration of a call. */
static flex_status push_ctx(flex_context *ctx, cuda_state *st) {
    return check_cu(ctx, st->api, st->api->cuCtxPushCurrent(st->cu), "cuCtxPushCurrent");
}
static void pop_ctx(cuda_state *st) {
    CUcontext old;
    st->api->cuCtxPopCurrent(&old);
}

/* ---- table slots ---- */

static int cuda_score(char *why, size_t why_cap) {
    const flex_cuda_api *api;
    if (flex_cuda_load_driver(&api, why, why_cap) != 0) return 0;
    if (flex_cuda_load_nvrtc(&api, why, why_cap) != 0) return 0;
    int count = 0, version = 0;
    api->cuDeviceGetCount(&count);
    api->cuDriverGetVersion(&version);
    if (why && why_cap)
        snprintf(why, why_cap, "%d device%s, driver %d.%d, NVRTC %d.%d", count,
                 count == 1 ? "" : "s", version / 1000, (version % 1000) / 10, api->nvrtc_major,
                 api->nvrtc_minor);
    return 100;
}

static flex_status cuda_init(flex_context *ctx, int device_index) {
    char why[512];
    const flex_cuda_api *api;
    if (flex_cuda_load_driver(&api, why, sizeof why) != 0 ||
        flex_cuda_load_nvrtc(&api, why, sizeof why) != 0)
        return flex_fail(ctx, FLEX_ERR_BACKEND, "the CUDA backend is not usable: %s", why);
    int count = 0;
    flex_status s = check_cu(ctx, api, api->cuDeviceGetCount(&count), "cuDeviceGetCount");
    if (s) return s;
    if (device_index < 0 || device_index >= count)
        return flex_fail(ctx, FLEX_ERR_BACKEND, "CUDA device %d does not exist (%d device%s)",
                         device_index, count, count == 1 ? "" : "s");
    cuda_state *st = calloc(1, sizeof *st);
    if (!st) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for the CUDA state");
    st->api = api;
    atomic_init(&st->bounds_pending, 0);
    pthread_mutex_init(&st->lock, NULL);
    s = check_cu(ctx, api, api->cuDeviceGet(&st->dev, device_index), "cuDeviceGet");
    if (!s)
        s = check_cu(ctx, api, api->cuDeviceGetName(st->name, sizeof st->name, st->dev),
                     "cuDeviceGetName");
    if (!s)
        s = check_cu(ctx, api,
                     api->cuDeviceGetAttribute(
                         &st->major, FLEX_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, st->dev),
                     "cuDeviceGetAttribute");
    if (!s)
        s = check_cu(ctx, api,
                     api->cuDeviceGetAttribute(
                         &st->minor, FLEX_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, st->dev),
                     "cuDeviceGetAttribute");
    if (!s)
        s = check_cu(ctx, api,
                     api->cuDeviceGetAttribute(
                         &st->sm_count, FLEX_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, st->dev),
                     "cuDeviceGetAttribute");
    if (!s)
        s = check_cu(ctx, api,
                     api->cuDeviceGetAttribute(
                         &st->smem_optin,
                         FLEX_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, st->dev),
                     "cuDeviceGetAttribute");
    if (!s)
        s = check_cu(ctx, api, api->cuDevicePrimaryCtxRetain(&st->cu, st->dev),
                     "cuDevicePrimaryCtxRetain");
    if (s) {
        pthread_mutex_destroy(&st->lock);
        free(st);
        return s;
    }
    flex_cuda_arch_name(st->major, st->minor, st->arch, sizeof st->arch);
    s = push_ctx(ctx, st);
    if (!s) {
        s = check_cu(ctx, api, api->cuMemAlloc(&st->bounds_flag, 4), "cuMemAlloc (bounds flag)");
        if (!s) s = check_cu(ctx, api, api->cuMemsetD8(st->bounds_flag, 0, 4), "cuMemsetD8");
        pop_ctx(st);
    }
    if (s) {
        api->cuDevicePrimaryCtxRelease(st->dev);
        pthread_mutex_destroy(&st->lock);
        free(st);
        return s;
    }
    size_t len = strlen(st->name);
    snprintf(st->name + len, sizeof st->name - len, " (%s, %d SMs)", st->arch, st->sm_count);
    pthread_once(&process_cache_once, process_cache_open);
    ctx->backend_state = st;
    return FLEX_OK;
}

static void cuda_release(flex_context *ctx) {
    cuda_state *st = state_of(ctx);
    if (!st) return;
    const flex_cuda_api *api = st->api;
    if (api->cuCtxPushCurrent(st->cu) == 0) {
        for (cuda_module *m = st->modules; m;) {
            cuda_module *next = m->next;
            api->cuModuleUnload(m->module);
            free(m->key);
            free(m);
            m = next;
        }
        for (cuda_buffer_copy *c = st->buffer_copies; c;) {
            cuda_buffer_copy *next = c->next;
            api->cuMemFree(c->dev);
            free(c);
            c = next;
        }
        api->cuMemFree(st->bounds_flag);
        pop_ctx(st);
    }
    api->cuDevicePrimaryCtxRelease(st->dev);
    pthread_mutex_destroy(&st->lock);
    free(st);
    ctx->backend_state = NULL;
}

static const char *cuda_device_name(flex_context *ctx) {
    return state_of(ctx)->name;
}

static flex_status cuda_alloc(flex_context *ctx, size_t bytes, void **ptr) {
    cuda_state *st = state_of(ctx);
    flex_status s = push_ctx(ctx, st);
    if (s) return s;
    CUdeviceptr p = 0;
    CUresult r = st->api->cuMemAlloc(&p, bytes ? bytes : 1);
    pop_ctx(st);
    if (r == 2 /* CUDA_ERROR_OUT_OF_MEMORY */)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "the GPU has no room for %zu bytes", bytes);
    s = check_cu(ctx, st->api, r, "cuMemAlloc");
    if (s) return s;
    *ptr = (void *)(uintptr_t)p;
    return FLEX_OK;
}

static void cuda_free(flex_context *ctx, void *ptr) {
    cuda_state *st = state_of(ctx);
    if (!ptr || st->api->cuCtxPushCurrent(st->cu) != 0) return;
    st->api->cuMemFree((CUdeviceptr)(uintptr_t)ptr);
    pop_ctx(st);
}

static flex_status cuda_upload(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    cuda_state *st = state_of(ctx);
    flex_status s = push_ctx(ctx, st);
    if (s) return s;
    s = check_cu(ctx, st->api, st->api->cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dst, src, bytes),
                 "cuMemcpyHtoD");
    pop_ctx(st);
    return s;
}

static flex_status cuda_download(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    cuda_state *st = state_of(ctx);
    flex_status s = push_ctx(ctx, st);
    if (s) return s;
    s = check_cu(ctx, st->api, st->api->cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, bytes),
                 "cuMemcpyDtoH");
    pop_ctx(st);
    return s;
}

static flex_status cuda_memset(flex_context *ctx, void *dst, int value, size_t bytes) {
    cuda_state *st = state_of(ctx);
    flex_status s = push_ctx(ctx, st);
    if (s) return s;
    s = check_cu(ctx, st->api,
                 st->api->cuMemsetD8((CUdeviceptr)(uintptr_t)dst, (unsigned char)value, bytes),
                 "cuMemsetD8");
    pop_ctx(st);
    return s;
}

/* Reads and clears the bounds flag; a set bit becomes FLEX_ERR_BUFFER_BOUNDS. */
static flex_status take_bounds_flag(flex_context *ctx, cuda_state *st) {
    uint32_t flag = 0;
    CU_TRY(ctx, st, st->api->cuMemcpyDtoH(&flag, st->bounds_flag, 4), "cuMemcpyDtoH (bounds flag)");
    if (!flag) return FLEX_OK;
    CU_TRY(ctx, st, st->api->cuMemsetD8(st->bounds_flag, 0, 4), "cuMemsetD8 (bounds flag)");
    int slot = 0;
    while (!(flag & (1u << slot)))
        slot++;
    return flex_fail(ctx, FLEX_ERR_BUFFER_BOUNDS,
                     "a mod read buffer '%s' outside its sizes on the GPU (the index was "
                     "clamped; results of that call are not meaningful)",
                     st->slot_names[slot][0] ? st->slot_names[slot] : "?");
}

static flex_status cuda_synchronize(flex_context *ctx) {
    cuda_state *st = state_of(ctx);
    flex_status s = push_ctx(ctx, st);
    if (s) return s;
    /* Taken before the wait: a kernel launched after it sets the mark again
     * and is read by the next synchronize. Without mod buffers there is no
     * flag to read (a copy from the device costs ~10 us). */
    const int pending = atomic_exchange(&st->bounds_pending, 0);
    s = check_cu(ctx, st->api, st->api->cuCtxSynchronize(), "cuCtxSynchronize");
    if (!s && pending) { /* under the lock: launches write the slot names */
        pthread_mutex_lock(&st->lock);
        s = take_bounds_flag(ctx, st);
        pthread_mutex_unlock(&st->lock);
    }
    pop_ctx(st);
    return s;
}

/* ---- kernels: memory list -> cache -> NVRTC ---- */

/* Builds the source of a kernel from its arguments (malloc'd; NULL: out of
 * memory). */
typedef char *(*source_builder)(const void *args);

/* The kernel settings FLEXATTN_DEBUG can force for comparison or testing
 * (read when ctx was created, core/debug.h): the key's value when it is a
 * whole decimal number in [lo, hi], otherwise dflt. */
static int env_int(const flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi) {
    return flex_debug_int(ctx, key, dflt, lo, hi);
}

/* A kernel choice forced by "0" or "1" in key, otherwise dflt. */
static int env_switch(const flex_context *ctx, flex_debug_key key, int dflt) {
    return env_int(ctx, key, dflt, 0, 1);
}

typedef struct forward_source_args {
    const flex_cuda_fwd_config *cfg;
    const ir_mod *mask, *score;
    const unsigned char *mask_in_range, *score_in_range;
} forward_source_args;

static char *build_forward_source(const void *args) {
    const forward_source_args *a = args;
    return flex_cuda_forward_source_in_range(a->cfg, a->mask, a->score, a->mask_in_range,
                                             a->score_in_range);
}

/* Which buffer reads of mod stay inside their buffers for every index the
 * forward kernel passes: b < B, h < H, and q, kv below the lengths plus
 * `margin` (0 for the mask mod, which the kernel evaluates at the last row
 * and column past the end; a tile for the score mod). Buffer values count as
 * any int. A malloc'd flag per node (caller frees), or NULL when none is
 * proved (or without memory: every read is then checked, as before).
 * FLEXATTN_DEBUG=cuda_reads_in_range=0 checks every read, for comparison. */
static unsigned char *ir_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                        const ir_mod *ir, int64_t B, int64_t H, int64_t Lq,
                                        int64_t Lkv, int64_t margin);
static unsigned char *reads_in_range(const flex_context *ctx, const struct flex_mod *mod, int64_t B,
                                     int64_t H, int64_t Lq, int64_t Lkv, int64_t margin) {
    return mod ? ir_reads_in_range(ctx, mod, &mod->ir, B, H, Lq, Lkv, margin) : NULL;
}

/* The same over ir, which is mod's IR or a copy of it with more nodes
 * (the backward's derivative). */
static unsigned char *ir_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                        const ir_mod *ir, int64_t B, int64_t H, int64_t Lq,
                                        int64_t Lkv, int64_t margin) {
    if (!mod || mod->ir.num_buffers <= 0 || !env_switch(ctx, FLEX_DEBUG_CUDA_READS_IN_RANGE, 1))
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

/* Checksum of a mod's in-range flags for the kernel key (0: none). */
static uint64_t in_range_checksum(const unsigned char *flags, const ir_mod *ir) {
    return flags ? flex_cache_checksum(flags, (size_t)ir->num_nodes) : 0;
}

static char *build_mask_blocks_source(const void *args) {
    return flex_cuda_mask_blocks_source(args);
}

/* Finds or builds the function `fn_name` whose source `build(args)` makes.
 * key names everything that source is made of (configuration, mod hashes,
 * arch, NVRTC version): a module already loaded under key is returned
 * without building the source again, which takes longer than many a
 * kernel runs (~0.1 ms of text for a forward). Otherwise the source is
 * built, and the kernel caches are asked under key plus the source's
 * checksum, so that a changed template never finds a stale binary. The
 * caller holds st->lock and has the context current. */
static flex_status get_function(flex_context *ctx, cuda_state *st, const char *key,
                                source_builder build, const void *args, const char *fn_name,
                                CUfunction *fn) {
    for (cuda_module *m = st->modules; m; m = m->next)
        if (strcmp(m->key, key) == 0) {
            *fn = m->fn;
            return FLEX_OK;
        }
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
    const int cached = flex_cache_get(process_cache, cache_key, &bin, &size, &from_disk);
    flex_status s =
        cached ? FLEX_OK : flex_cuda_compile(ctx, st->api, source, fn_name, st->arch, &bin, &size);
    free(source);
    if (s) return s;
    if (cached) {
        flex_log(FLEX_LOG_DEBUG, "kernel %s from the %s cache", fn_name,
                 from_disk ? "disk" : "memory");
    } else {
        if (flex_cache_put(process_cache, cache_key, bin, size) != 0)
            flex_log(FLEX_LOG_WARN, "could not write the kernel cache in %s",
                     flex_cache_dir(process_cache));
        flex_log(FLEX_LOG_INFO, "compiled %s for %s in %.0f ms", fn_name, st->arch,
                 flex_now_ms() - t0);
    }
    cuda_module *m = calloc(1, sizeof *m);
    char *k = strdup(key);
    if (!m || !k) {
        free(m);
        free(k);
        free(bin);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a CUDA module");
    }
    CUresult r = st->api->cuModuleLoadData(&m->module, bin);
    free(bin);
    if (r == 0) r = st->api->cuModuleGetFunction(&m->fn, m->module, fn_name);
    if (r != 0) {
        free(m);
        free(k);
        return check_cu(ctx, st->api, r, "loading a compiled kernel (cuModuleLoadData)");
    }
    m->key = k;
    m->next = st->modules;
    st->modules = m;
    *fn = m->fn;
    return FLEX_OK;
}

/* ---- mod buffers ---- */

typedef struct cuda_buffer_desc {
    uint64_t data;
    int32_t sizes[4];
    int64_t strides[4];
} cuda_buffer_desc;

/* Device address of buffer i of mod, copying host data once per binding. */
static flex_status buffer_device_ptr(flex_context *ctx, cuda_state *st, const struct flex_mod *mod,
                                     int i, CUdeviceptr *out) {
    const flex_tensor *v = &mod->views[i];
    if (v->device == FLEX_DEVICE_CUDA) {
        *out = (CUdeviceptr)(uintptr_t)v->data;
        return FLEX_OK;
    }
    for (cuda_buffer_copy *c = st->buffer_copies; c; c = c->next)
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
    size_t bytes = (size_t)extent * flex_dtype_size(v->dtype);
    cuda_buffer_copy *c = calloc(1, sizeof *c);
    if (!c) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a buffer copy");
    CUresult r = st->api->cuMemAlloc(&c->dev, bytes ? bytes : 1);
    if (r == 0 && bytes) r = st->api->cuMemcpyHtoD(c->dev, v->data, bytes);
    if (r != 0) {
        if (c->dev) st->api->cuMemFree(c->dev);
        free(c);
        return check_cu(ctx, st->api, r, "copying a mod buffer to the GPU");
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

/* Fills descs[slot_base + i] for every buffer of mod. */
static flex_status fill_buffers(flex_context *ctx, cuda_state *st, const struct flex_mod *mod,
                                int slot_base, cuda_buffer_desc *descs) {
    if (!mod) return FLEX_OK;
    for (int i = 0; i < mod->ir.num_buffers; i++) {
        const ir_buffer *decl = &mod->ir.buffers[i];
        if (!mod->bound[i])
            return flex_fail(ctx, FLEX_ERR_BUFFER_UNBOUND, "buffer '%s' of a mod has no data bound",
                             decl->name);
        CUdeviceptr p = 0;
        flex_status s = buffer_device_ptr(ctx, st, mod, i, &p);
        if (s) return s;
        cuda_buffer_desc *d = &descs[slot_base + i];
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

/* Appends the flex_buffers block (descs then the flag pointer) to a kernel
 * parameter blob at offset `at` (8-aligned); returns the new size. */
static size_t append_buffers(unsigned char *blob, size_t at, const cuda_buffer_desc *descs,
                             int slots, CUdeviceptr flag) {
    int n = slots > 0 ? slots : 1;
    memcpy(blob + at, descs, (size_t)n * sizeof *descs);
    at += (size_t)n * sizeof *descs;
    uint64_t f = flag;
    memcpy(blob + at, &f, 8);
    return at + 8;
}

/* Launches fn with blob (size bytes) as its parameter block, or, with
 * second, as its first of two parameters (the driver then lays them out). */
static flex_status launch_blob(flex_context *ctx, cuda_state *st, CUfunction fn, unsigned gx,
                               unsigned gy, unsigned threads, unsigned smem, CUstream stream,
                               void *blob, size_t size, void *second) {
    void *extra[] = {(void *)(uintptr_t)1, blob, (void *)(uintptr_t)2, &size, (void *)(uintptr_t)0};
    void *params[2] = {blob, second};
    if (smem > 48 * 1024)
        CU_TRY(ctx, st,
               st->api->cuFuncSetAttribute(fn, FLEX_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           (int)smem),
               "cuFuncSetAttribute (shared memory)");
    const CUresult r = st->api->cuLaunchKernel(fn, gx, gy, 1, threads, 1, 1, smem, stream,
                                               second ? params : NULL, second ? NULL : extra);
    if (r != 0 && st->api->cuFuncGetAttribute) {
        /* Say what the launch asked for: registers, shared memory, block. */
        int regs = -1, static_smem = -1, max_threads = -1, local = -1;
        st->api->cuFuncGetAttribute(&regs, FLEX_CU_FUNC_ATTRIBUTE_NUM_REGS, fn);
        st->api->cuFuncGetAttribute(&static_smem, FLEX_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn);
        st->api->cuFuncGetAttribute(&max_threads, FLEX_CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn);
        st->api->cuFuncGetAttribute(&local, FLEX_CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, fn);
        char what[256];
        snprintf(what, sizeof what,
                 "cuLaunchKernel (%u threads of at most %d, %d registers, %d bytes local, %d + %u "
                 "bytes shared, %zu-byte parameters, grid %u x %u)",
                 threads, max_threads, regs, local, static_smem, smem, size, gx, gy);
        return check_cu(ctx, st->api, r, what);
    }
    return check_cu(ctx, st->api, r, "cuLaunchKernel");
}

/* ---- block-mask lists on the device ---- */

typedef struct cuda_mask_copy {
    CUdeviceptr full_off, full_idx, part_off, part_idx, order;
    /* the q-major (transposed) lists, for the backward */
    CUdeviceptr qfull_off, qfull_idx, qpart_off, qpart_idx;
} cuda_mask_copy;

static void mask_copy_free_arrays(const flex_cuda_api *api, cuda_mask_copy *c) {
    const CUdeviceptr all[] = {c->full_off,  c->full_idx,  c->part_off,  c->part_idx, c->order,
                               c->qfull_off, c->qfull_idx, c->qpart_off, c->qpart_idx};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i]) api->cuMemFree(all[i]);
}

static void mask_copy_free(flex_context *ctx, void *copy) {
    cuda_mask_copy *c = copy;
    if (!c) return;
    cuda_state *st = ctx ? state_of(ctx) : NULL;
    if (st && st->api->cuCtxPushCurrent(st->cu) == 0) {
        mask_copy_free_arrays(st->api, c);
        pop_ctx(st);
    }
    free(c);
}

static flex_status upload_array(flex_context *ctx, cuda_state *st, const void *src, size_t bytes,
                                CUdeviceptr *dst) {
    CU_TRY(ctx, st, st->api->cuMemAlloc(dst, bytes ? bytes : 4), "cuMemAlloc (block mask)");
    if (bytes)
        CU_TRY(ctx, st, st->api->cuMemcpyHtoD(*dst, src, bytes), "cuMemcpyHtoD (block mask)");
    return FLEX_OK;
}

/* Uploads one of a mask's block lists of n rows: its n + 1 offsets and the
 * indices they delimit. */
static flex_status upload_lists(flex_context *ctx, cuda_state *st, const flex_block_lists *l,
                                int64_t n, CUdeviceptr *off, CUdeviceptr *idx) {
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

/* Uploads the kv-major lists of mask, its q-major lists (the backward's)
 * and the heaviest-first order of its q-block rows (summed over batch and head), once per mask. */
static flex_status mask_device_copy(flex_context *ctx, cuda_state *st,
                                    const struct flex_block_mask *mask, cuda_mask_copy **out) {
    if (mask->device_copy) {
        *out = mask->device_copy;
        return FLEX_OK;
    }
    const int64_t rows = mask->B * mask->H * mask->num_q_blocks;
    const int64_t nq = mask->num_q_blocks;
    cuda_mask_copy *c = calloc(1, sizeof *c);
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
        mask_copy_free_arrays(st->api, c);
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

/* ---- forward ---- */

/* Mirrors struct flex_fwd_params of flex_forward.cuh up to `bufs`. */
typedef struct cuda_fwd_params {
    uint64_t q, k, v, out, lse;
    uint64_t full_off, full_idx, part_off, part_idx, row_order;
    int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss, l_sb, l_sh,
        l_ss;
    int32_t B, Hq, Hkv, Lq, Lkv, D, Dv;
    int32_t mask_B, mask_H, mask_nq, mask_nk, mask_qblock, mask_kvblock;
    int32_t dense, tiles_per_row, head_group;
    float scale, scale_log2;
} cuda_fwd_params;

static int pad64(int64_t d) {
    return (int)((d + 63) / 64 * 64);
}

static int aligned16(const void *p) {
    return ((uintptr_t)p & 15u) == 0;
}

/* Kernel and tile choice for 16-bit inputs, from the mask's block sizes, the
 * head dims and the GPU. On sm_90 the wgmma kernel (flex_forward_sm90.cuh)
 * takes every case it covers: 16-byte aligned rows, head dims up to 128, mask
 * blocks that are multiples of 128. Everything else, and every GPU before
 * Hopper, runs the mma.sync kernel. FLEXATTN_DEBUG=cuda_tile=WARPSxMTxBLOCK_N
 * selects the mma.sync kernel with those tiles (for tuning and comparison;
 * they must divide the mask's blocks). */
static void choose_tiles(const flex_context *ctx, flex_cuda_fwd_config *cfg, int q_block,
                         int kv_block, int hopper) {
    const int wide = cfg->dq > 128 || cfg->dv > 128;
    cfg->wgmma = 0;
    if (hopper && cfg->vec && !wide && q_block % 128 == 0 && kv_block % 128 == 0) {
        /* Two warpgroups x 64 rows, 128-key steps. */
        cfg->wgmma = 1;
        cfg->warps = 8;
        cfg->mt = 1;
        cfg->block_n = 128;
    } else if (!wide && q_block >= 128 && kv_block >= 64) {
        /* 4 warps x 32 rows: each K/V fragment feeds two m-tiles, and two
         * CTAs fit on an SM (96 KB of shared memory each). */
        cfg->warps = 4;
        cfg->mt = 2;
        cfg->block_n = 64;
    } else {
        /* One m-tile per warp, as many warps as the mask's q block holds
         * (4 at most for wide heads), kv steps no longer than its kv block. */
        const int max_n = wide ? 32 : 64;
        cfg->mt = 1;
        cfg->warps = q_block / 16 < (wide ? 4 : 8) ? q_block / 16 : (wide ? 4 : 8);
        cfg->block_n = kv_block < max_n ? kv_block : max_n;
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

/* TMA boxes need strides that are positive and grow from the sequence to
 * the head to the batch dimension (a size-1 dimension's stride is free);
 * the 16-byte rows and strides it also needs come with the wgmma kernel. */
static int tma_layout_ok(const flex_tensor *t) {
    const int64_t ss = t->strides[2], sh = t->strides[1], sb = t->strides[0];
    return ss > 0 && sh > 0 && sb > 0 && (t->sizes[1] == 1 || sh >= ss) &&
           (t->sizes[0] == 1 || sb >= sh);
}

/* A tiled tensor map of t (dims D, L, H, B) with 128-row boxes of 64
 * columns in the 128-byte swizzle, into map (128 bytes, 64-byte aligned).
 * The elements are copied as UINT16 bits; out-of-range ones read as zero. */
static flex_status encode_tensor_map(flex_context *ctx, cuda_state *st, const flex_tensor *t,
                                     unsigned char *map) {
    const unsigned long long dims[4] = {
        (unsigned long long)t->sizes[3], (unsigned long long)t->sizes[2],
        (unsigned long long)t->sizes[1], (unsigned long long)t->sizes[0]};
    const unsigned long long strides[3] = {(unsigned long long)t->strides[2] * 2,
                                           (unsigned long long)t->strides[1] * 2,
                                           (unsigned long long)t->strides[0] * 2};
    const unsigned box[4] = {64, 128, 1, 1}, unit[4] = {1, 1, 1, 1};
    return check_cu(ctx, st->api,
                    st->api->cuTensorMapEncodeTiled(
                        map, FLEX_CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, t->data, dims, strides, box,
                        unit, FLEX_CU_TENSOR_MAP_INTERLEAVE_NONE, FLEX_CU_TENSOR_MAP_SWIZZLE_128B,
                        FLEX_CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                        FLEX_CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                    "cuTensorMapEncodeTiled");
}

/* The persistent grid's CTAs: one per SM, or FLEXATTN_DEBUG=cuda_ctas=N of them
 * (1 <= N <= SMs), which makes every CTA walk many tiles even on the small
 * shapes of `flexattn check` (the tile hand-off and the pipeline across
 * tiles are tested that way). */
static int64_t persistent_ctas(const flex_context *ctx, int sm_count) {
    return env_int(ctx, FLEX_DEBUG_CUDA_CTAS, sm_count, 1, sm_count);
}

/* Whether the TMA kernel runs one CTA per SM, each walking its share of
 * the tiles (so the producer fills the next tile while the consumers finish
 * one), rather than one CTA per tile: for block-sparse masks with short
 * rows, a quarter of the blocks or more skipped and at most 16 kv steps of
 * block_n keys per tile on average: short rows gain from the overlap, while
 * on long rows the hardware's handing out of CTAs, which does not depend on
 * the tiles weighing what the fixed snake assumes, does as well (the
 * measurements are in docs/decisions.md). FLEXATTN_DEBUG=cuda_persistent=0
 * or 1 forces the choice. */
static int persistent_grid(const flex_context *ctx, const struct flex_block_mask *mask,
                           int kv_block, int block_n) {
    int persistent = 0;
    if (mask) {
        const int64_t rows = mask->B * mask->H * mask->num_q_blocks;
        const int64_t blocks = mask->num_full + mask->num_partial;
        const int64_t steps = blocks * (kv_block / block_n);
        persistent = 4 * blocks <= 3 * rows * mask->num_kv_blocks && steps <= 16 * rows;
    }
    return env_switch(ctx, FLEX_DEBUG_CUDA_PERSISTENT, persistent);
}

static flex_status cuda_forward(flex_context *ctx, const flex_forward_args *a) {
    cuda_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Lkv = k->sizes[2], Dv = v->sizes[3];
    /* Never ignored silently: a kernel that knew nothing of them would
     * attend the wrong keys at the wrong positions. */
    if (a->q_offsets || a->kv_lengths || a->page_table)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the CUDA backend does not implement opts->%s yet (decode and paged KV "
                         "run on the CPU backend only)",
                         a->q_offsets    ? "q_offsets"
                         : a->kv_lengths ? "kv_lengths"
                                         : "page_table");
    if (D > 256 || Dv > 256)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the CUDA backend supports head dims up to 256 (q has %lld, v has %lld)",
                         (long long)D, (long long)Dv);
    if (q->strides[3] != 1 || k->strides[3] != 1 || v->strides[3] != 1 || o->strides[3] != 1)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "the CUDA backend needs the last dimension of q, k, v and out contiguous");
    if (q->dtype != FLEX_F32 && st->major < 8)
        return flex_fail(
            ctx, FLEX_ERR_UNSUPPORTED,
            "f16/bf16 attention needs compute capability 8.0 or newer (this GPU is %d.%d)",
            st->major, st->minor);
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod = mask ? mask->mask_mod : NULL;
    if (mask && mask->num_partial > 0 && !mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "the block mask has partial blocks but no mask mod to decide them");
    if (mask && mask->num_partial == 0) mask_mod = NULL; /* never evaluated: keep kernels shared */
    const struct flex_mod *score_mod = a->score_mod;

    flex_cuda_fwd_config cfg = {
        .dtype = q->dtype,
        .dq = pad64(D),
        .dv = pad64(Dv),
        .dv_exact = pad64(Dv) == Dv,
        .scale_positive = a->scale > 0.0f,
        /* Kernels evaluate the mods up to a tile past the end too (and
         * discard those scores): 256 of margin keeps them in the bounds. */
        .short_indices = Lq <= FLEX_EMIT_SHORT_LEN - 256 && Lkv <= FLEX_EMIT_SHORT_LEN - 256 &&
                         B <= FLEX_EMIT_SHORT_HEADS && Hq <= FLEX_EMIT_SHORT_HEADS};
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
    if (q->dtype == FLEX_F32) {
        cfg.warps = 4;
        cfg.mt = 1;
        cfg.block_n = 0;
        cfg.vec = 0;
    } else {
        cfg.vec = D % 8 == 0 && Dv % 8 == 0 && aligned16(q->data) && aligned16(k->data) &&
                  aligned16(v->data) && aligned16(o->data);
        for (int d = 0; d < 3; d++)
            if (q->strides[d] % 8 || k->strides[d] % 8 || v->strides[d] % 8 || o->strides[d] % 8)
                cfg.vec = 0;
        /* wgmma is in the "a" target of sm_90 that flex_cuda_arch_name picks. */
        choose_tiles(ctx, &cfg, q_block, kv_block, strcmp(st->arch, "sm_90a") == 0);
    }
    const int block_m = cfg.warps * 16 * cfg.mt;
    /* Masked blocks take their keep bits from a rolled loop
     * (cuda_mask_bits=0: the mask mod unrolled per score, for
     * comparison). */
    cfg.mask_bits = env_switch(ctx, FLEX_DEBUG_CUDA_MASK_BITS, 1);
    /* The wgmma kernel takes its copies from a TMA producer warpgroup where
     * the driver and the layouts allow it (cuda_tma=0 turns that
     * off, for comparison); otherwise all its threads copy with cp.async. */
    cfg.tma = cfg.wgmma && env_switch(ctx, FLEX_DEBUG_CUDA_TMA, 1) &&
              st->api->cuTensorMapEncodeTiled && tma_layout_ok(q) && tma_layout_ok(k) &&
              tma_layout_ok(v);
    const int persistent = cfg.tma && persistent_grid(ctx, mask, kv_block, cfg.block_n);
    /* On a persistent grid the consumers run one product pipeline across
     * their CTA's tiles (cuda_chain=0: one per tile, for
     * comparison). With one tile per CTA it gains nothing, and its store
     * inside the step loop costs time there (docs/decisions.md). */
    cfg.chain = persistent && env_switch(ctx, FLEX_DEBUG_CUDA_CHAIN, 1);
    /* Q (two buffers for the TMA kernel: a tile's and the next one's), two
     * K/V stages; the wgmma kernels align their tiles to 1 KB themselves. */
    const size_t smem = q->dtype == FLEX_F32 ? 0
                                             : ((size_t)(cfg.tma ? 2 : 1) * block_m * cfg.dq +
                                                2u * cfg.block_n * (cfg.dq + cfg.dv)) *
                                                       2 +
                                                   (cfg.wgmma ? 1024u : 0u);
    if ((int64_t)smem > st->smem_optin)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the kernel for head dims %lld/%lld needs %zu bytes of shared memory; the "
                         "GPU allows %d",
                         (long long)D, (long long)Dv, smem, st->smem_optin);

    const ir_mod *mask_ir = mask_mod ? &mask_mod->ir : NULL;
    const ir_mod *score_ir = score_mod ? &score_mod->ir : NULL;
    const int slots = flex_emit_num_slots(mask_ir, score_ir);
    if (slots > FLEX_EMIT_MAX_SLOTS)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the mask and score mods read %d buffers together; at most %d", slots,
                         FLEX_EMIT_MAX_SLOTS);

    /* Buffer reads proved inside their buffers are compiled without checks:
     * the kernel key carries which (in_range_checksum). */
    unsigned char *mask_in_range = reads_in_range(ctx, mask_mod, B, Hq, Lq, Lkv, 0);
    unsigned char *score_in_range = reads_in_range(ctx, score_mod, B, Hq, Lq, Lkv, 256);

    pthread_mutex_lock(&st->lock);
    flex_status s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->lock);
        free(mask_in_range);
        free(score_in_range);
        return s;
    }
    CUfunction fn = NULL;
    {
        /* The key names every field of the configuration: a new field that
         * changes the source belongs in it too, or two kernels share a key. */
        _Static_assert(sizeof(flex_cuda_fwd_config) == 14 * sizeof(int),
                       "flex_cuda_fwd_config changed: update the forward kernel key");
        char key[512];
        snprintf(key, sizeof key,
                 "fwd|%s|dq%d|dv%d|dx%d|w%d|mt%d|n%d|vec%d|wg%d|tma%d|ch%d|mb%d|short%d|sp%d|mask=%"
                 "016llx|score=%016llx|inr=%016llx.%016llx|%s|nvrtc%d.%d",
                 flex_dtype_name(cfg.dtype), cfg.dq, cfg.dv, cfg.dv_exact, cfg.warps, cfg.mt,
                 cfg.block_n, cfg.vec, cfg.wgmma, cfg.tma, cfg.chain, cfg.mask_bits,
                 cfg.short_indices, cfg.scale_positive,
                 (unsigned long long)(mask_mod ? mask_mod->hash : 0),
                 (unsigned long long)(score_mod ? score_mod->hash : 0),
                 (unsigned long long)in_range_checksum(mask_in_range, mask_ir),
                 (unsigned long long)in_range_checksum(score_in_range, score_ir), st->arch,
                 st->api->nvrtc_major, st->api->nvrtc_minor);
        const forward_source_args args = {&cfg, mask_ir, score_ir, mask_in_range, score_in_range};
        s = get_function(ctx, st, key, build_forward_source, &args, "flex_forward_kernel", &fn);
    }
    free(mask_in_range);
    free(score_in_range);

    cuda_mask_copy *mc = NULL;
    if (!s && mask) s = mask_device_copy(ctx, st, mask, &mc);

    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    if (!s) s = fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s) s = fill_buffers(ctx, st, score_mod, mask_ir ? mask_ir->num_buffers : 0, descs);

    if (!s) {
        cuda_fwd_params p;
        memset(&p, 0, sizeof p);
        p.q = (uintptr_t)q->data;
        p.k = (uintptr_t)k->data;
        p.v = (uintptr_t)v->data;
        p.out = (uintptr_t)o->data;
        p.lse = a->lse ? (uintptr_t)a->lse->data : 0;
        p.q_sb = q->strides[0], p.q_sh = q->strides[1], p.q_ss = q->strides[2];
        p.k_sb = k->strides[0], p.k_sh = k->strides[1], p.k_ss = k->strides[2];
        p.v_sb = v->strides[0], p.v_sh = v->strides[1], p.v_ss = v->strides[2];
        p.o_sb = o->strides[0], p.o_sh = o->strides[1], p.o_ss = o->strides[2];
        if (a->lse)
            p.l_sb = a->lse->strides[0], p.l_sh = a->lse->strides[1], p.l_ss = a->lse->strides[2];
        p.B = (int32_t)B, p.Hq = (int32_t)Hq, p.Hkv = (int32_t)Hkv;
        p.Lq = (int32_t)Lq, p.Lkv = (int32_t)Lkv, p.D = (int32_t)D, p.Dv = (int32_t)Dv;
        p.mask_qblock = q_block;
        p.mask_kvblock = kv_block;
        if (mask) {
            p.full_off = mc->full_off, p.full_idx = mc->full_idx;
            p.part_off = mc->part_off, p.part_idx = mc->part_idx;
            p.row_order = mc->order;
            p.mask_B = (int32_t)mask->B, p.mask_H = (int32_t)mask->H;
            p.mask_nq = (int32_t)mask->num_q_blocks, p.mask_nk = (int32_t)mask->num_kv_blocks;
        } else {
            p.dense = 1;
            p.mask_B = p.mask_H = 1;
            p.mask_nq = (int32_t)((Lq + q_block - 1) / q_block);
            p.mask_nk = (int32_t)((Lkv + kv_block - 1) / kv_block);
        }
        p.tiles_per_row = q->dtype == FLEX_F32 ? 1 : q_block / block_m;
        /* Tiles in pairs of heads (flex_tile_of; docs/cuda-backend.md, "Tile
         * order"); cuda_head_group=N sets the group, for comparison. */
        p.head_group = env_int(ctx, FLEX_DEBUG_CUDA_HEAD_GROUP, 2, 0, 1 << 20);
        p.scale = a->scale;
        p.scale_log2 = a->scale * 1.4426950408889634f;

        unsigned char
            blob[sizeof(cuda_fwd_params) + (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(cuda_buffer_desc)];
        memcpy(blob, &p, sizeof p);
        size_t size = append_buffers(blob, sizeof p, descs, slots, st->bounds_flag);
        /* The TMA kernel takes the tensor maps as a second parameter. */
        _Alignas(64) unsigned char tensor_maps[3 * 128];
        if (cfg.tma) {
            const flex_tensor *ops[3] = {q, k, v};
            for (int t = 0; t < 3 && !s; t++)
                s = encode_tensor_map(ctx, st, ops[t], tensor_maps + 128 * t);
        }

        unsigned gx = (unsigned)(B * Hq), gy, threads;
        int too_many = 0;
        if (q->dtype == FLEX_F32) {
            gy = (unsigned)((Lq + 3) / 4);
            threads = 128;
        } else {
            gy = (unsigned)((int64_t)p.mask_nq * p.tiles_per_row);
            threads = (unsigned)cfg.warps * 32 + (cfg.tma ? 128u : 0u); /* + the producer */
        }
        if (cfg.tma) {
            /* A 1-D grid: one CTA per tile, or one per SM (persistent_grid). */
            const int64_t tiles = (int64_t)gx * gy;
            too_many = tiles > 0x7fffffff; /* the kernel's tile indices are ints */
            const int64_t ctas = persistent ? persistent_ctas(ctx, st->sm_count) : tiles;
            gx = (unsigned)(tiles > ctas ? ctas : tiles);
            gy = tiles > 0 ? 1 : 0;
        }
        if (s) {
            /* a tensor map could not be made: reported above */
        } else if (too_many || gy > 65535 || B * Hq > 0x7fffffff)
            s = flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                          "sequence too long for one launch (%lld query tiles)",
                          (long long)p.mask_nq * p.tiles_per_row);
        else if (gx > 0 && gy > 0)
            s = launch_blob(ctx, st, fn, gx, gy, threads, (unsigned)smem, (CUstream)a->stream, blob,
                            size, cfg.tma ? tensor_maps : NULL);
        if (!s && slots > 0) atomic_store(&st->bounds_pending, 1);
    }
    pop_ctx(st);
    pthread_mutex_unlock(&st->lock);
    return s;
}

/* ---- exact classes of undecided blocks ---- */

typedef struct cuda_mask_blocks_params {
    uint64_t blocks, classes;
    int64_t count;
    int32_t q_len, kv_len, q_block, kv_block;
} cuda_mask_blocks_params;

static flex_status cuda_mask_blocks(flex_context *ctx, const struct flex_mod *mask_mod,
                                    int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                    const flex_block_ref *blocks, int64_t count, uint8_t *classes) {
    if (count <= 0) return FLEX_OK;
    cuda_state *st = state_of(ctx);
    pthread_mutex_lock(&st->lock);
    flex_status s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->lock);
        return s;
    }
    CUfunction fn = NULL;
    CUdeviceptr dblocks = 0, dclasses = 0;
    {
        char key[256];
        snprintf(key, sizeof key, "maskblocks|mask=%016llx|%s|nvrtc%d.%d",
                 (unsigned long long)mask_mod->hash, st->arch, st->api->nvrtc_major,
                 st->api->nvrtc_minor);
        s = get_function(ctx, st, key, build_mask_blocks_source, &mask_mod->ir,
                         "flex_mask_blocks_kernel", &fn);
    }
    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    if (!s) s = fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s)
        s = check_cu(ctx, st->api, st->api->cuMemAlloc(&dblocks, (size_t)count * sizeof *blocks),
                     "cuMemAlloc");
    if (!s) s = check_cu(ctx, st->api, st->api->cuMemAlloc(&dclasses, (size_t)count), "cuMemAlloc");
    if (!s)
        s = check_cu(ctx, st->api,
                     st->api->cuMemcpyHtoD(dblocks, blocks, (size_t)count * sizeof *blocks),
                     "cuMemcpyHtoD");
    if (!s) {
        cuda_mask_blocks_params p = {.blocks = dblocks,
                                     .classes = dclasses,
                                     .count = count,
                                     .q_len = (int32_t)q_len,
                                     .kv_len = (int32_t)kv_len,
                                     .q_block = q_block,
                                     .kv_block = kv_block};
        unsigned char blob[sizeof p + (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(cuda_buffer_desc)];
        memcpy(blob, &p, sizeof p);
        size_t size =
            append_buffers(blob, sizeof p, descs, mask_mod->ir.num_buffers, st->bounds_flag);
        unsigned gx = (unsigned)(count < (1 << 20) ? count : (1 << 20));
        s = launch_blob(ctx, st, fn, gx, 1, 256, 0, NULL, blob, size, NULL);
    }
    if (!s) s = check_cu(ctx, st->api, st->api->cuCtxSynchronize(), "cuCtxSynchronize");
    if (!s)
        s = check_cu(ctx, st->api, st->api->cuMemcpyDtoH(classes, dclasses, (size_t)count),
                     "cuMemcpyDtoH");
    if (!s) s = take_bounds_flag(ctx, st);
    if (dblocks) st->api->cuMemFree(dblocks);
    if (dclasses) st->api->cuMemFree(dclasses);
    pop_ctx(st);
    pthread_mutex_unlock(&st->lock);
    return s;
}

/* ---- backward ---- */

/* Mirrors the head of struct flex_bwd_params of flex_backward.cuh; the
 * gradient tensors' descriptors (flex_buffer each), the forward's block
 * (cuda_fwd_params) and the mods' buffers follow it. */
typedef struct cuda_bwd_head {
    uint64_t dout, dq, dk, dv, delta, dq_acc;
    uint64_t qfull_off, qfull_idx, qpart_off, qpart_idx;
    int64_t do_sb, do_sh, do_ss, dq_sb, dq_sh, dq_ss, dk_sb, dk_sh, dk_ss, dv_sb, dv_sh, dv_ss;
} cuda_bwd_head;

typedef struct backward_source_args {
    const flex_cuda_bwd_config *cfg;
    const ir_mod *mask;
    const unsigned char *mask_in_range;
    const flex_cuda_bwd_score *score;
} backward_source_args;

static char *build_backward_source(const void *args) {
    const backward_source_args *a = args;
    return flex_cuda_backward_source(a->cfg, a->mask, a->mask_in_range, a->score);
}

/* Another kernel of the module loaded under key (get_function found or
 * built it just before). */
static flex_status module_function(flex_context *ctx, cuda_state *st, const char *key,
                                   const char *name, CUfunction *fn) {
    for (cuda_module *m = st->modules; m; m = m->next)
        if (strcmp(m->key, key) == 0)
            return check_cu(ctx, st->api, st->api->cuModuleGetFunction(fn, m->module, name),
                            "cuModuleGetFunction");
    return flex_fail(ctx, FLEX_ERR_DEVICE, "the module of %s is not loaded", name);
}

/* Device workspace for one call, in stream order where the driver has the
 * stream-ordered allocator (no synchronisation, capturable in a graph). */
static flex_status workspace_alloc(flex_context *ctx, cuda_state *st, size_t bytes, CUstream stream,
                                   CUdeviceptr *out) {
    *out = 0;
    if (!bytes) return FLEX_OK;
    CUresult r = st->api->cuMemAllocAsync ? st->api->cuMemAllocAsync(out, bytes, stream)
                                          : st->api->cuMemAlloc(out, bytes);
    if (r == 2 /* CUDA_ERROR_OUT_OF_MEMORY */)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "the GPU has no room for the backward's %zu-byte workspace", bytes);
    return check_cu(ctx, st->api, r, "allocating the backward's workspace");
}

/* Frees what workspace_alloc gave once the stream's work before is done. */
static void workspace_free(cuda_state *st, CUdeviceptr p, CUstream stream) {
    if (!p) return;
    if (st->api->cuMemFreeAsync) {
        st->api->cuMemFreeAsync(p, stream);
    } else {
        st->api->cuStreamSynchronize(stream);
        st->api->cuMemFree(p);
    }
}

/* Whether any node of m reads buffer `buffer`. */
static int ir_reads_buffer(const ir_mod *m, int buffer) {
    for (int i = 0; i < m->num_nodes; i++)
        if (m->nodes[i].op == IR_LOAD && m->nodes[i].buffer == buffer) return 1;
    return 0;
}

/* Tiles of the f16/bf16 backward: 16 kv rows a warp, up to 64 a CTA (no
 * more than the mask's kv block), query steps no longer than the mask's q
 * block and short enough that Sᵀ and dPᵀ fit beside the dK and dV
 * accumulators (64 rows for head dims up to 64, 32 up to 128, 16 above). */
static void choose_backward_tiles(flex_cuda_bwd_config *cfg, int q_block, int kv_block) {
    const int block_n = kv_block < 64 ? kv_block : 64;
    const int widest = cfg->dq > cfg->dv ? cfg->dq : cfg->dv;
    const int want_m = widest <= 64 ? 64 : widest <= 128 ? 32 : 16;
    cfg->warps = block_n / 16;
    cfg->block_m = q_block < want_m ? q_block : want_m;
}

static flex_status cuda_backward(flex_context *ctx, const flex_backward_args *a) {
    cuda_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out, *dout = &a->dout;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Lkv = k->sizes[2], Dv = v->sizes[3];
    if (D > 256 || Dv > 256)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the CUDA backward supports head dims up to 256 (q has %lld, v has %lld)",
                         (long long)D, (long long)Dv);
    if (q->dtype != FLEX_F32 && st->major < 8)
        return flex_fail(
            ctx, FLEX_ERR_UNSUPPORTED,
            "the f16/bf16 backward needs compute capability 8.0 or newer (this GPU is %d.%d)",
            st->major, st->minor);
    if ((Lq + 3) / 4 > 65535 || (Lkv + 3) / 4 > 65535 || B * Hq > 0x7fffffff)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "sequences too long for one backward launch (q %lld, kv %lld)",
                         (long long)Lq, (long long)Lkv);
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod = mask ? mask->mask_mod : NULL;
    if (mask && mask->num_partial > 0 && !mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "the block mask has partial blocks but no mask mod to decide them");
    if (mask && mask->num_partial == 0) mask_mod = NULL;
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;

    /* The score mod and its derivative, on a private copy of its IR (the
     * identity needs neither). */
    const struct flex_mod *score_mod = a->score_mod;
    const int identity = score_mod && score_mod->ir.root >= 0 &&
                         score_mod->ir.nodes[score_mod->ir.root].op == IR_SCORE;
    ir_mod derived;
    memset(&derived, 0, sizeof derived);
    int derived_made = 0;
    mod_derivative der;
    memset(&der, 0, sizeof der);
    flex_cuda_grad_load loads[MOD_DERIVE_MAX_LOADS];
    int num_loads = 0;
    cuda_buffer_desc grad_descs[IR_MAX_BUFFERS];
    memset(grad_descs, 0, sizeof grad_descs);
    flex_status s = FLEX_OK;
    for (int i = 0; i < a->num_buffer_grads && !s; i++) {
        const flex_buffer_grad *g = &a->buffer_grads[i];
        int buffer = -1;
        for (int j = 0; score_mod && j < score_mod->ir.num_buffers; j++)
            if (!strcmp(score_mod->ir.buffers[j].name, g->name)) buffer = j;
        if (buffer < 0)
            s = flex_fail(ctx, FLEX_ERR_MOD_NAME, "the score mod has no buffer '%s'", g->name);
        else if (identity || !ir_reads_buffer(&score_mod->ir, buffer))
            s = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                          "a gradient for buffer '%s' was asked for, but the score mod does not "
                          "read it",
                          g->name);
        else if (g->grad.device != FLEX_DEVICE_CUDA || g->grad.device_index != ctx->device_index)
            s = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                          "the gradient of buffer '%s' must be on the context's GPU", g->name);
        else if (i >= IR_MAX_BUFFERS)
            s = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT, "more than %d buffer gradients asked for",
                          IR_MAX_BUFFERS);
        if (s) return s;
        cuda_buffer_desc *d = &grad_descs[i];
        d->data = (uint64_t)(uintptr_t)g->grad.data;
        for (int kd = 0; kd < 4; kd++) {
            const int64_t size = kd < g->grad.ndim ? g->grad.sizes[kd] : 1;
            d->sizes[kd] = (int32_t)(size > INT32_MAX ? INT32_MAX : size);
            d->strides[kd] = kd < g->grad.ndim ? g->grad.strides[kd] : 0;
        }
    }
    if (score_mod && !identity) {
        if (ir_copy(&derived, &score_mod->ir) != 0)
            return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory to copy the score mod");
        derived_made = 1;
        const int rc = mod_derive(&derived, &der);
        if (rc != 0) {
            ir_free(&derived);
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
        for (int l = 0; l < der.num_loads; l++)
            for (int i = 0; i < a->num_buffer_grads; i++) {
                if (strcmp(score_mod->ir.buffers[der.loads[l].buffer].name,
                           a->buffer_grads[i].name) != 0 ||
                    num_loads == MOD_DERIVE_MAX_LOADS)
                    continue;
                const ir_node *ld = &derived.nodes[der.loads[l].load];
                flex_cuda_grad_load *gl = &loads[num_loads++];
                gl->grad = i;
                gl->deriv = der.loads[l].node;
                gl->ndim = ld->nargs;
                for (int d = 0; d < 4; d++)
                    gl->index[d] = d < ld->nargs ? ld->args[d] : 0;
            }
    }
    const ir_mod *mask_ir = mask_mod ? &mask_mod->ir : NULL;
    const ir_mod *score_ir = derived_made ? &derived : NULL;
    const struct flex_mod *score_used = derived_made ? score_mod : NULL;
    const int slots = flex_emit_num_slots(mask_ir, score_ir);
    if (slots > FLEX_EMIT_MAX_SLOTS) {
        if (derived_made) ir_free(&derived);
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the mask and score mods read %d buffers together; at most %d", slots,
                         FLEX_EMIT_MAX_SLOTS);
    }

    flex_cuda_bwd_config cfg = {
        .dtype = q->dtype,
        .dq = pad64(D),
        .dv = pad64(Dv),
        .warps = 4,
        .block_m = 16,
        .vec = 0,
        /* the kernels pass the mods indices clamped into the sequences */
        .short_indices = Lq <= FLEX_EMIT_SHORT_LEN && Lkv <= FLEX_EMIT_SHORT_LEN &&
                         B <= FLEX_EMIT_SHORT_HEADS && Hq <= FLEX_EMIT_SHORT_HEADS,
        .grad_slots = a->num_buffer_grads,
    };
    if (q->dtype != FLEX_F32) {
        cfg.vec = D % 8 == 0 && Dv % 8 == 0 && aligned16(q->data) && aligned16(k->data) &&
                  aligned16(v->data) && aligned16(dout->data);
        for (int d = 0; d < 3; d++)
            if (q->strides[d] % 8 || k->strides[d] % 8 || v->strides[d] % 8 ||
                dout->strides[d] % 8)
                cfg.vec = 0;
        choose_backward_tiles(&cfg, q_block, kv_block);
    }
    const int block_n = cfg.warps * 16;
    const size_t smem = q->dtype == FLEX_F32
                            ? 0
                            : 2u * ((size_t)block_n * (cfg.dq + cfg.dv) +
                                    (size_t)cfg.block_m * (cfg.dq + cfg.dv + 64)) +
                                  8u * (size_t)cfg.block_m;
    if ((int64_t)smem > st->smem_optin) {
        if (derived_made) ir_free(&derived);
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the backward for head dims %lld/%lld needs %zu bytes of shared memory; "
                         "the GPU allows %d",
                         (long long)D, (long long)Dv, smem, st->smem_optin);
    }
    /* The kernels clamp the indices they pass to the mods into the
     * sequences, so the proofs need no margin. */
    unsigned char *mask_in_range = reads_in_range(ctx, mask_mod, B, Hq, Lq, Lkv, 0);
    unsigned char *score_in_range =
        score_ir ? ir_reads_in_range(ctx, score_mod, score_ir, B, Hq, Lq, Lkv, 0) : NULL;
    const flex_cuda_bwd_score score = {score_ir, der.value, der.dscore, loads, num_loads,
                                       score_in_range};

    pthread_mutex_lock(&st->lock);
    s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->lock);
        free(mask_in_range);
        free(score_in_range);
        if (derived_made) ir_free(&derived);
        return s;
    }
    CUfunction fn_pre = NULL, fn_main = NULL, fn_store = NULL;
    char key[512];
    {
        _Static_assert(sizeof(flex_cuda_bwd_config) == 8 * sizeof(int),
                       "flex_cuda_bwd_config changed: update the backward kernel key");
        snprintf(key, sizeof key,
                 "bwd|%s|dq%d|dv%d|w%d|bm%d|vec%d|short%d|gs%d|mask=%016llx|score=%016llx|"
                 "loads=%016llx|inr=%016llx.%016llx|%s|nvrtc%d.%d",
                 flex_dtype_name(cfg.dtype), cfg.dq, cfg.dv, cfg.warps, cfg.block_m, cfg.vec,
                 cfg.short_indices, cfg.grad_slots,
                 (unsigned long long)(mask_mod ? mask_mod->hash : 0),
                 (unsigned long long)(score_used ? score_used->hash : 0),
                 (unsigned long long)(num_loads ? flex_cache_checksum(loads, (size_t)num_loads *
                                                                                 sizeof loads[0])
                                                : 0),
                 (unsigned long long)in_range_checksum(mask_in_range, mask_ir),
                 (unsigned long long)(score_ir ? in_range_checksum(score_in_range, score_ir) : 0),
                 st->arch, st->api->nvrtc_major, st->api->nvrtc_minor);
        const backward_source_args args = {&cfg, mask_ir, mask_in_range, &score};
        s = get_function(ctx, st, key, build_backward_source, &args, "flex_bwd_kernel", &fn_main);
    }
    free(mask_in_range);
    free(score_in_range);
    if (derived_made) ir_free(&derived);
    if (!s) s = module_function(ctx, st, key, "flex_bwd_preprocess", &fn_pre);
    if (!s) s = module_function(ctx, st, key, "flex_bwd_dq_store", &fn_store);

    cuda_mask_copy *mc = NULL;
    if (!s && mask) s = mask_device_copy(ctx, st, mask, &mc);
    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    if (!s) s = fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s) s = fill_buffers(ctx, st, score_used, mask_ir ? mask_ir->num_buffers : 0, descs);

    CUstream stream = (CUstream)a->stream;
    CUdeviceptr ws = 0;
    const size_t delta_bytes = (size_t)(B * Hq * Lq) * sizeof(float);
    const size_t dq_bytes = a->dq ? (size_t)(B * Hq * Lq * D) * sizeof(float) : 0;
    if (!s) s = workspace_alloc(ctx, st, delta_bytes + dq_bytes, stream, &ws);
    if (!s) {
        cuda_bwd_head hd;
        memset(&hd, 0, sizeof hd);
        hd.dout = (uintptr_t)dout->data;
        hd.dq = a->dq ? (uintptr_t)a->dq->data : 0;
        hd.dk = a->dk ? (uintptr_t)a->dk->data : 0;
        hd.dv = a->dv ? (uintptr_t)a->dv->data : 0;
        hd.delta = ws;
        hd.dq_acc = a->dq ? ws + delta_bytes : 0;
        hd.do_sb = dout->strides[0], hd.do_sh = dout->strides[1], hd.do_ss = dout->strides[2];
        if (a->dq)
            hd.dq_sb = a->dq->strides[0], hd.dq_sh = a->dq->strides[1],
            hd.dq_ss = a->dq->strides[2];
        if (a->dk)
            hd.dk_sb = a->dk->strides[0], hd.dk_sh = a->dk->strides[1],
            hd.dk_ss = a->dk->strides[2];
        if (a->dv)
            hd.dv_sb = a->dv->strides[0], hd.dv_sh = a->dv->strides[1],
            hd.dv_ss = a->dv->strides[2];

        cuda_fwd_params p;
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
        p.scale = a->scale;
        p.scale_log2 = a->scale * 1.4426950408889634f;

        const int grad_slots = cfg.grad_slots > 0 ? cfg.grad_slots : 1;
        unsigned char blob[sizeof(cuda_bwd_head) + IR_MAX_BUFFERS * sizeof(cuda_buffer_desc) +
                           sizeof(cuda_fwd_params) +
                           (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(cuda_buffer_desc)];
        size_t at = 0;
        memcpy(blob, &hd, sizeof hd);
        at += sizeof hd;
        memcpy(blob + at, grad_descs, (size_t)grad_slots * sizeof(cuda_buffer_desc));
        at += (size_t)grad_slots * sizeof(cuda_buffer_desc);
        memcpy(blob + at, &p, sizeof p);
        at += sizeof p;
        const size_t size = append_buffers(blob, at, descs, slots, st->bounds_flag);

        const unsigned rows_y = (unsigned)((Lq + 3) / 4);
        s = launch_blob(ctx, st, fn_pre, (unsigned)(B * Hq), rows_y, 128, 0, stream, blob, size,
                        NULL);
        if (!s) {
            const int64_t per_cta = q->dtype == FLEX_F32 ? 4 : block_n;
            s = launch_blob(ctx, st, fn_main, (unsigned)(B * Hkv),
                            (unsigned)((Lkv + per_cta - 1) / per_cta),
                            q->dtype == FLEX_F32 ? 128u : (unsigned)cfg.warps * 32,
                            (unsigned)smem, stream, blob, size, NULL);
        }
        if (!s && a->dq)
            s = launch_blob(ctx, st, fn_store, (unsigned)(B * Hq), rows_y, 128, 0, stream, blob,
                            size, NULL);
        if (!s && slots > 0) atomic_store(&st->bounds_pending, 1);
    }
    workspace_free(st, ws, stream);
    pop_ctx(st);
    pthread_mutex_unlock(&st->lock);
    return s;
}

const flex_backend_iface flex_backend_cuda = {
    .abi_version = FLEX_BACKEND_ABI_VERSION,
    .name = "cuda",
    .device_type = FLEX_DEVICE_CUDA,
    .score = cuda_score,
    .init = cuda_init,
    .release = cuda_release,
    .device_name = cuda_device_name,
    .mem_alloc = cuda_alloc,
    .mem_free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .mem_set = cuda_memset,
    .forward = cuda_forward,
    .backward = cuda_backward,
    .mask_blocks = cuda_mask_blocks,
    .synchronize = cuda_synchronize,
};
