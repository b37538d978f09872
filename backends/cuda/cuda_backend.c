/*
 * The CUDA backend: the backend table, device memory, and the launches of
 * the forward, backward and mask-block kernels. What it shares with the HIP
 * backend (module list -> kernel cache -> compiler, mod-buffer mirrors,
 * block-mask uploads, the bounds flag) is the GPU host layer
 * (backends/gpu/gpu_host.h), which reaches the driver through this file's
 * flex_gpu_ops table. The driver API is used through cuda_loader.h; every
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
#include "../gpu/gpu_host.h"

/* ---- state ---- */

typedef struct cuda_state {
    flex_gpu_state gpu; /* first: the shared layer finds it at ctx->backend_state */
    const flex_cuda_api *api;
    CUdevice dev;
    CUcontext cu;
    char name[256];
    int major, minor, sm_count, smem_optin;
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

/* ---- the driver as the GPU host layer sees it ---- */

static const flex_cuda_api *cuda_api(const void *api) {
    return (const flex_cuda_api *)api;
}
static void ops_describe(const void *api, int r, char *buf, size_t cap) {
    flex_cuda_describe(cuda_api(api), r, buf, cap);
}
static int ops_enter(const void *api, void *vendor_ctx) {
    return cuda_api(api)->cuCtxPushCurrent((CUcontext)vendor_ctx);
}
static void ops_leave(const void *api) {
    CUcontext old;
    cuda_api(api)->cuCtxPopCurrent(&old);
}
static int ops_mem_alloc(const void *api, flex_gpu_ptr *ptr, size_t bytes) {
    CUdeviceptr p = 0;
    const CUresult r = cuda_api(api)->cuMemAlloc(&p, bytes);
    *ptr = p;
    return r;
}
static int ops_mem_free(const void *api, flex_gpu_ptr ptr) {
    return cuda_api(api)->cuMemFree((CUdeviceptr)ptr);
}
static int ops_copy_to_device(const void *api, flex_gpu_ptr dst, const void *src, size_t bytes) {
    return cuda_api(api)->cuMemcpyHtoD((CUdeviceptr)dst, src, bytes);
}
static int ops_copy_to_host(const void *api, void *dst, flex_gpu_ptr src, size_t bytes) {
    return cuda_api(api)->cuMemcpyDtoH(dst, (CUdeviceptr)src, bytes);
}
static int ops_mem_set(const void *api, flex_gpu_ptr dst, unsigned char value, size_t bytes) {
    return cuda_api(api)->cuMemsetD8((CUdeviceptr)dst, value, bytes);
}
static int ops_module_load(const void *api, const void *image, size_t size, void **module) {
    (void)size; /* a cubin carries its own size */
    CUmodule m = NULL;
    const CUresult r = cuda_api(api)->cuModuleLoadData(&m, image);
    *module = m;
    return r;
}
static int ops_module_function(const void *api, void *module, const char *name, void **fn) {
    CUfunction f = NULL;
    const CUresult r = cuda_api(api)->cuModuleGetFunction(&f, (CUmodule)module, name);
    if (r == 0) *fn = f;
    return r;
}
static int ops_module_unload(const void *api, void *module) {
    return cuda_api(api)->cuModuleUnload((CUmodule)module);
}
static flex_status ops_compile(flex_context *ctx, const void *api, const char *source,
                               const char *program_name, const char *arch, void **image,
                               size_t *size) {
    return flex_cuda_compile(ctx, cuda_api(api), source, program_name, arch, image, size);
}

static const flex_gpu_ops cuda_gpu_ops = {
    .vendor = "CUDA",
    .describe = ops_describe,
    .enter = ops_enter,
    .leave = ops_leave,
    .enter_name = "cuCtxPushCurrent",
    .mem_alloc = ops_mem_alloc,
    .mem_free = ops_mem_free,
    .copy_to_device = ops_copy_to_device,
    .copy_to_host = ops_copy_to_host,
    .mem_set = ops_mem_set,
    .mem_alloc_name = "cuMemAlloc",
    .copy_to_device_name = "cuMemcpyHtoD",
    .copy_to_host_name = "cuMemcpyDtoH",
    .mem_set_name = "cuMemsetD8",
    .module_load = ops_module_load,
    .module_function = ops_module_function,
    .module_unload = ops_module_unload,
    .module_load_name = "cuModuleLoadData",
    .module_function_name = "cuModuleGetFunction",
    .compile = ops_compile,
};


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
    flex_gpu_init(&st->gpu, &cuda_gpu_ops, api, NULL, FLEX_DEVICE_CUDA);
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
        pthread_mutex_destroy(&st->gpu.lock);
        free(st);
        return s;
    }
    st->gpu.vendor_ctx = st->cu;
    flex_cuda_arch_name(st->major, st->minor, st->gpu.arch, sizeof st->gpu.arch);
    s = push_ctx(ctx, st);
    if (!s) {
        s = flex_gpu_alloc_bounds_flag(ctx, &st->gpu);
        pop_ctx(st);
    }
    if (s) {
        api->cuDevicePrimaryCtxRelease(st->dev);
        pthread_mutex_destroy(&st->gpu.lock);
        free(st);
        return s;
    }
    size_t len = strlen(st->name);
    snprintf(st->name + len, sizeof st->name - len, " (%s, %d SMs)", st->gpu.arch, st->sm_count);
    pthread_once(&process_cache_once, process_cache_open);
    st->gpu.cache = process_cache;
    ctx->backend_state = st;
    return FLEX_OK;
}

static void cuda_release(flex_context *ctx) {
    cuda_state *st = state_of(ctx);
    if (!st) return;
    flex_gpu_release(&st->gpu);
    st->api->cuDevicePrimaryCtxRelease(st->dev);
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

/* Whether work queued on stream is being captured into a graph (an
 * invalidated capture counts: what follows fails there too). Without
 * cuStreamIsCapturing (drivers before CUDA 10) no stream can be. */
static int stream_capturing(cuda_state *st, CUstream stream) {
    int status = FLEX_CU_STREAM_CAPTURE_STATUS_NONE;
    if (!st->api->cuStreamIsCapturing || st->api->cuStreamIsCapturing(stream, &status) != 0)
        return 0;
    return status != FLEX_CU_STREAM_CAPTURE_STATUS_NONE;
}

/* Marks that kernels reading mod buffers were queued: the next synchronize
 * reads the bounds flag, and every one from now on when they went into a
 * graph, whose replays make no call here. */
static void note_buffer_reads(cuda_state *st) {
    atomic_store(&st->gpu.bounds_pending, 1);
    if (st->gpu.capturing) atomic_store(&st->gpu.bounds_in_graph, 1);
}

/* Reads and clears the bounds flag; a set bit becomes FLEX_ERR_BUFFER_BOUNDS. */
static flex_status take_bounds_flag(flex_context *ctx, cuda_state *st) {
    return flex_gpu_take_bounds_flag(ctx, &st->gpu);
}

static flex_status cuda_synchronize(flex_context *ctx) {
    cuda_state *st = state_of(ctx);
    flex_status s = push_ctx(ctx, st);
    if (s) return s;
    /* Taken before the wait: a kernel launched after it sets the mark again
     * and is read by the next synchronize. Without mod buffers there is no
     * flag to read (a copy from the device costs ~10 us). */
    const int pending = atomic_exchange(&st->gpu.bounds_pending, 0) ||
                        atomic_load(&st->gpu.bounds_in_graph);
    s = check_cu(ctx, st->api, st->api->cuCtxSynchronize(), "cuCtxSynchronize");
    if (!s && pending) { /* under the lock: launches write the slot names */
        pthread_mutex_lock(&st->gpu.lock);
        s = take_bounds_flag(ctx, st);
        pthread_mutex_unlock(&st->gpu.lock);
    }
    pop_ctx(st);
    return s;
}

/* ---- kernels: memory list -> cache -> NVRTC (gpu_host.h) ---- */

/* The shared layer's names under this file's (and the decode and backward
 * paths') short ones. */
typedef flex_gpu_source_builder source_builder;
static int env_int(const flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi) {
    return flex_gpu_env_int(ctx, key, dflt, lo, hi);
}
static int env_switch(const flex_context *ctx, flex_debug_key key, int dflt) {
    return flex_gpu_env_switch(ctx, key, dflt);
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

/* In-range proofs of buffer reads (flex_gpu_ir_reads_in_range): the mask
 * mod's over the sequences (margin 0: the kernel evaluates it at the last
 * row and column past the end), the score mod's over a tile past them. */
static unsigned char *ir_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                        const ir_mod *ir, int64_t B, int64_t H, int64_t Lq,
                                        int64_t Lkv, int64_t margin) {
    return flex_gpu_ir_reads_in_range(ctx, mod, ir, B, H, Lq, Lkv, margin);
}
static unsigned char *reads_in_range(const flex_context *ctx, const struct flex_mod *mod, int64_t B,
                                     int64_t H, int64_t Lq, int64_t Lkv, int64_t margin) {
    return flex_gpu_reads_in_range(ctx, mod, B, H, Lq, Lkv, margin);
}
static uint64_t in_range_checksum(const unsigned char *flags, const ir_mod *ir) {
    return flex_gpu_in_range_checksum(flags, ir);
}

static char *build_mask_blocks_source(const void *args) {
    return flex_cuda_mask_blocks_source(args);
}

/* flex_gpu_get_function for a CUfunction. The caller holds st->gpu.lock
 * and has the context current. */
static flex_status get_function(flex_context *ctx, cuda_state *st, const char *key,
                                source_builder build, const void *args, const char *fn_name,
                                CUfunction *fn) {
    void *f = NULL;
    const flex_status s = flex_gpu_get_function(ctx, &st->gpu, key, build, args, fn_name, &f);
    if (!s) *fn = (CUfunction)f;
    return s;
}

/* ---- mod buffers (gpu_host.h) ---- */

typedef flex_gpu_buffer_desc cuda_buffer_desc;

static flex_status fill_buffers(flex_context *ctx, cuda_state *st, const struct flex_mod *mod,
                                int slot_base, cuda_buffer_desc *descs) {
    return flex_gpu_fill_buffers(ctx, &st->gpu, mod, slot_base, descs);
}

static size_t append_buffers(unsigned char *blob, size_t at, const cuda_buffer_desc *descs,
                             int slots, CUdeviceptr flag) {
    return flex_gpu_append_buffers(blob, at, descs, slots, flag);
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

/* ---- block-mask lists on the device (gpu_host.h) ---- */

typedef flex_gpu_mask_copy cuda_mask_copy;

static flex_status mask_device_copy(flex_context *ctx, cuda_state *st,
                                    const struct flex_block_mask *mask, cuda_mask_copy **out) {
    return flex_gpu_mask_device_copy(ctx, &st->gpu, mask, out);
}

/* ---- forward ---- */

/* The parameter block of flex_common.cuh (gpu_host.h). */
typedef flex_gpu_fwd_params cuda_fwd_params;

static int pad64(int64_t d) {
    return flex_gpu_pad64(d);
}

static int aligned16(const void *p) {
    return flex_gpu_aligned16(p);
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

/* ---- decode (flex_decode.cuh, docs/decode.md) ---- */

static flex_status module_function(flex_context *ctx, cuda_state *st, const char *key,
                                   const char *name, CUfunction *fn);
static flex_status workspace_alloc(flex_context *ctx, cuda_state *st, size_t bytes, CUstream stream,
                                   CUdeviceptr *out);
static void workspace_free(flex_context *ctx, cuda_state *st, CUdeviceptr p, CUstream stream);

/* Mirrors the head of struct flex_dec_params; the forward's block
 * (cuda_fwd_params) and the mods' buffers follow it. */
typedef struct cuda_dec_head {
    uint64_t q_offsets, kv_lengths, page_table, part_out, part_lse, decode_flag;
    int64_t qo_stride, kl_stride, pt_sb, pt_sp;
    int32_t kv_len, page_size, num_pages, splits, group, rows, row_chunks, pad_;
} cuda_dec_head;
_Static_assert(sizeof(cuda_dec_head) == 112, "cuda_dec_head must match flex_dec_params");

typedef struct decode_source_args {
    const flex_cuda_dec_config *cfg;
    const ir_mod *mask, *score;
    const unsigned char *mask_in_range, *score_in_range;
} decode_source_args;

static char *build_decode_source(const void *args) {
    const decode_source_args *a = args;
    return flex_cuda_decode_source(a->cfg, a->mask, a->score, a->mask_in_range,
                                   a->score_in_range);
}

/* Calls that take the decode kernel: any decode argument or a kv_splits
 * hint above 1, and plain calls of at most 16 query rows (where a 128-row
 * tile per (batch, head) would leave most of the GPU idle). */
static int decode_wanted(const flex_forward_args *a) {
    return a->q_offsets || a->kv_lengths || a->page_table || a->kv_splits > 1 ||
           a->q.sizes[2] <= 16;
}

/* Element i of int32 tensor t (1-D, or row i of a 2-D one when cols > 0)
 * copied into dst, contiguous. Host tensors only. */
static void gather_host_ints(const flex_tensor *t, int64_t rows, int64_t cols, int32_t *dst) {
    const int32_t *src = t->data;
    for (int64_t r = 0; r < rows; r++)
        if (cols > 0)
            for (int64_t c = 0; c < cols; c++)
                dst[r * cols + c] = src[r * t->strides[0] + c * t->strides[1]];
        else
            dst[r] = src[r * t->strides[0]];
}

/* Shared memory of the f16/bf16 decode kernel: Q, two K/V stages, then
 * struct flex_dec_smem and the key groups' (m, l) (flex_decode.cuh). */
static size_t decode_smem(const flex_cuda_dec_config *cfg) {
    const size_t rows = 16u * (size_t)cfg->row_tiles, groups = 4u / (size_t)cfg->row_tiles;
    const size_t extra = rows * 4 * 2 + 4 + 64 + rows * (4096 / 16 + 1) + 16;
    return rows * (size_t)cfg->dq * 2 + 2u * 64 * (size_t)(cfg->dq + cfg->dv) * 2 + extra + 4 +
           groups * rows * 2 * 4 + 64;
}

static flex_status cuda_decode(flex_context *ctx, cuda_state *st, const flex_forward_args *a) {
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Dv = v->sizes[3];
    const int64_t kv_len = a->kv_len > 0 ? a->kv_len : k->sizes[2];
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod = mask ? mask->mask_mod : NULL;
    if (mask && mask->num_partial > 0 && !mask_mod)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "the block mask has partial blocks but no mask mod to decide them");
    if (mask && mask->num_partial == 0) mask_mod = NULL;
    const struct flex_mod *score_mod = a->score_mod;
    if (kv_len > 0x7fffffff - 4096 || B * Hkv > 65535 || B * Hq * Lq > 0x7fffffff)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "decode shape too large for one launch (B %lld, Hkv %lld, kv length %lld)",
                         (long long)B, (long long)Hkv, (long long)kv_len);

    const int64_t group = Hq / Hkv, rows = group * Lq;
    flex_cuda_dec_config cfg = {
        .dtype = q->dtype,
        .dq = pad64(D),
        .dv = pad64(Dv),
        .dv_exact = pad64(Dv) == Dv,
        .row_tiles = rows <= 16 ? 1 : rows <= 32 ? 2 : 4,
        .short_indices = kv_len + Lq <= FLEX_EMIT_SHORT_LEN - 256 &&
                         B <= FLEX_EMIT_SHORT_HEADS && Hq <= FLEX_EMIT_SHORT_HEADS};
    cfg.vec = q->dtype != FLEX_F32 && D % 8 == 0 && Dv % 8 == 0 && aligned16(q->data) &&
              aligned16(k->data) && aligned16(v->data);
    for (int d = 0; d < 3; d++)
        if (q->strides[d] % 8 || k->strides[d] % 8 || v->strides[d] % 8) cfg.vec = 0;
    const int f32 = q->dtype == FLEX_F32;
    const int64_t rows_per_cta = f32 ? 4 : 16 * cfg.row_tiles;
    const int64_t row_chunks = (rows + rows_per_cta - 1) / rows_per_cta;
    const size_t smem = f32 ? 0 : decode_smem(&cfg);
    if ((int64_t)smem > st->smem_optin)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the decode kernel for head dims %lld/%lld needs %zu bytes of shared "
                         "memory; the GPU allows %d",
                         (long long)D, (long long)Dv, smem, st->smem_optin);

    /* Host-resident lengths give the split policy the longest one. */
    int64_t longest = kv_len;
    if (a->kv_lengths && a->kv_lengths->device == FLEX_DEVICE_CPU) {
        longest = 0;
        for (int64_t b = 0; b < B; b++) {
            const int32_t n = ((const int32_t *)a->kv_lengths->data)[b * a->kv_lengths->strides[0]];
            if (n > longest) longest = n;
        }
    }
    const int splits =
        flex_gpu_decode_splits(st->sm_count, B * Hkv * row_chunks, longest, a->kv_splits);
    if ((int64_t)splits * row_chunks > 0x7fffffff)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED, "too many decode pieces for one launch");

    const ir_mod *mask_ir = mask_mod ? &mask_mod->ir : NULL;
    const ir_mod *score_ir = score_mod ? &score_mod->ir : NULL;
    const int slots = flex_emit_num_slots(mask_ir, score_ir);
    if (slots > FLEX_EMIT_MAX_SLOTS)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the mask and score mods read %d buffers together; at most %d", slots,
                         FLEX_EMIT_MAX_SLOTS);
    /* The kernel evaluates the mods at positions inside the cache: query
     * positions below kv length + Lq (an offset is at most its batch's kv
     * length), keys below the kv length. */
    const int64_t q_span = a->q_offsets ? kv_len + Lq : Lq;
    unsigned char *mask_in_range = reads_in_range(ctx, mask_mod, B, Hq, q_span, kv_len, 0);
    unsigned char *score_in_range = reads_in_range(ctx, score_mod, B, Hq, q_span, kv_len, 0);

    pthread_mutex_lock(&st->gpu.lock);
    flex_status s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->gpu.lock);
        free(mask_in_range);
        free(score_in_range);
        return s;
    }
    st->gpu.capturing = stream_capturing(st, (CUstream)a->stream);
    CUfunction fn = NULL, fn_combine = NULL;
    char key[512];
    {
        _Static_assert(sizeof(flex_cuda_dec_config) == 7 * sizeof(int),
                       "flex_cuda_dec_config changed: update the decode kernel key");
        snprintf(key, sizeof key,
                 "dec|%s|dq%d|dv%d|dx%d|rt%d|vec%d|short%d|mask=%016llx|score=%016llx|inr=%016llx."
                 "%016llx|%s|nvrtc%d.%d",
                 flex_dtype_name(cfg.dtype), cfg.dq, cfg.dv, cfg.dv_exact, cfg.row_tiles, cfg.vec,
                 cfg.short_indices, (unsigned long long)(mask_mod ? mask_mod->hash : 0),
                 (unsigned long long)(score_mod ? score_mod->hash : 0),
                 (unsigned long long)in_range_checksum(mask_in_range, mask_ir),
                 (unsigned long long)in_range_checksum(score_in_range, score_ir), st->gpu.arch,
                 st->api->nvrtc_major, st->api->nvrtc_minor);
        const decode_source_args args = {&cfg, mask_ir, score_ir, mask_in_range, score_in_range};
        s = get_function(ctx, st, key, build_decode_source, &args, "flex_decode_kernel", &fn);
    }
    free(mask_in_range);
    free(score_in_range);
    if (!s && splits > 1) s = module_function(ctx, st, key, "flex_splitkv_combine", &fn_combine);

    cuda_mask_copy *mc = NULL;
    if (!s && mask) s = mask_device_copy(ctx, st, mask, &mc);
    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    if (!s) s = fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s) s = fill_buffers(ctx, st, score_mod, mask_ir ? mask_ir->num_buffers : 0, descs);

    /* Workspace, in stream order: the pieces (splits > 1), then copies of
     * host-resident decode arguments. */
    const CUstream stream = (CUstream)a->stream;
    const int64_t max_pages = a->page_table ? a->page_table->sizes[1] : 0;
    const size_t piece_rows = splits > 1 ? (size_t)(B * Hq * splits * Lq) : 0;
    const size_t out_bytes = piece_rows * (size_t)cfg.dv * 4, lse_bytes = piece_rows * 4;
    const int host_qo = a->q_offsets && a->q_offsets->device == FLEX_DEVICE_CPU;
    const int host_kl = a->kv_lengths && a->kv_lengths->device == FLEX_DEVICE_CPU;
    const int host_pt = a->page_table && a->page_table->device == FLEX_DEVICE_CPU;
    const size_t ints = (size_t)((host_qo ? B : 0) + (host_kl ? B : 0) + (host_pt ? B * max_pages : 0));
    CUdeviceptr ws = 0;
    int32_t *staged = NULL;
    if (!s) s = workspace_alloc(ctx, st, out_bytes + lse_bytes + ints * 4, stream, &ws);
    if (!s && ints && st->gpu.capturing)
        s = flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                      "decode arguments in host memory need a copy, but the stream is being "
                      "captured into a graph: keep q_offsets, kv_lengths and page_table on the "
                      "device for a captured step");
    if (!s && ints) {
        staged = malloc(ints * 4);
        if (!staged) s = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory for the decode arguments");
    }
    if (!s) {
        cuda_dec_head hd;
        memset(&hd, 0, sizeof hd);
        CUdeviceptr at = ws + out_bytes + lse_bytes;
        size_t n = 0;
        const flex_tensor *args[3] = {a->q_offsets, a->kv_lengths, a->page_table};
        const int on_host[3] = {host_qo, host_kl, host_pt};
        uint64_t dev[3] = {0, 0, 0};
        int64_t s0[3] = {1, 1, max_pages}, s1 = 1;
        for (int i = 0; i < 3; i++) {
            if (!args[i]) continue;
            if (on_host[i]) {
                gather_host_ints(args[i], B, i == 2 ? max_pages : 0, staged + n);
                dev[i] = at + n * 4;
                n += (size_t)(i == 2 ? B * max_pages : B);
            } else {
                dev[i] = (uintptr_t)args[i]->data;
                s0[i] = args[i]->strides[0];
                if (i == 2) s1 = args[i]->strides[1];
            }
        }
        /* From pageable memory the copy returns once the values are staged
         * (the driver waits for the stream first): docs/decode.md. */
        if (n)
            s = check_cu(ctx, st->api,
                         st->api->cuMemcpyHtoDAsync(at, staged, n * 4, stream),
                         "cuMemcpyHtoDAsync (decode arguments)");
        hd.q_offsets = dev[0], hd.kv_lengths = dev[1], hd.page_table = dev[2];
        hd.qo_stride = s0[0], hd.kl_stride = s0[1], hd.pt_sb = s0[2], hd.pt_sp = s1;
        hd.part_out = splits > 1 ? ws : 0;
        hd.part_lse = splits > 1 ? ws + out_bytes : 0;
        hd.decode_flag = flex_gpu_decode_flag(&st->gpu);
        hd.kv_len = (int32_t)kv_len;
        hd.page_size = (int32_t)a->page_size;
        hd.num_pages = a->page_table ? (int32_t)k->sizes[0] : 0;
        hd.splits = splits;
        hd.group = (int32_t)group;
        hd.rows = (int32_t)rows;
        hd.row_chunks = (int32_t)row_chunks;

        const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
        cuda_fwd_params p;
        flex_gpu_fwd_params_fill(&p, a, mask, mc, q_block, kv_block, 16, 0);
        /* Keys are logical positions; a paged k's third size is a page's. */
        p.Lkv = (int32_t)kv_len;
        if (!mask) {
            p.mask_nq = (int32_t)((q_span + q_block - 1) / q_block);
            p.mask_nk = (int32_t)((kv_len + kv_block - 1) / kv_block);
        }
        (void)o;
        unsigned char blob[sizeof(cuda_dec_head) + sizeof(cuda_fwd_params) +
                           (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(cuda_buffer_desc)];
        memcpy(blob, &hd, sizeof hd);
        memcpy(blob + sizeof hd, &p, sizeof p);
        const size_t size =
            append_buffers(blob, sizeof hd + sizeof p, descs, slots, st->gpu.bounds_flag);
        if (!s)
            s = launch_blob(ctx, st, fn, (unsigned)(splits * row_chunks), (unsigned)(B * Hkv),
                            128, (unsigned)smem, stream, blob, size, NULL);
        if (!s && splits > 1)
            s = launch_blob(ctx, st, fn_combine, (unsigned)(B * Hq * Lq), 1, 128, 0, stream, blob,
                            size, NULL);
        /* Device-resident arguments are checked in the kernel: the flag is
         * read at the next synchronize. */
        if (!s && (slots > 0 || (a->q_offsets && !host_qo) || (a->kv_lengths && !host_kl) ||
                   (a->page_table && !host_pt)))
            note_buffer_reads(st);
    }
    free(staged);
    workspace_free(ctx, st, ws, stream);
    st->gpu.capturing = 0;
    pop_ctx(st);
    pthread_mutex_unlock(&st->gpu.lock);
    return s;
}

static flex_status cuda_forward(flex_context *ctx, const flex_forward_args *a) {
    cuda_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->out;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Lkv = k->sizes[2], Dv = v->sizes[3];
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
    if (decode_wanted(a)) return cuda_decode(ctx, st, a);
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
        choose_tiles(ctx, &cfg, q_block, kv_block, strcmp(st->gpu.arch, "sm_90a") == 0);
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

    pthread_mutex_lock(&st->gpu.lock);
    flex_status s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->gpu.lock);
        free(mask_in_range);
        free(score_in_range);
        return s;
    }
    st->gpu.capturing = stream_capturing(st, (CUstream)a->stream);
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
                 (unsigned long long)in_range_checksum(score_in_range, score_ir), st->gpu.arch,
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
        /* Tiles in pairs of heads (flex_tile_of; docs/cuda-backend.md, "Tile
         * order"); cuda_head_group=N sets the group, for comparison. */
        flex_gpu_fwd_params_fill(&p, a, mask, mc, q_block, kv_block, block_m,
                                 env_int(ctx, FLEX_DEBUG_CUDA_HEAD_GROUP, 2, 0, 1 << 20));

        unsigned char
            blob[sizeof(cuda_fwd_params) + (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(cuda_buffer_desc)];
        memcpy(blob, &p, sizeof p);
        size_t size = append_buffers(blob, sizeof p, descs, slots, st->gpu.bounds_flag);
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
        if (!s && slots > 0) note_buffer_reads(st);
    }
    st->gpu.capturing = 0;
    pop_ctx(st);
    pthread_mutex_unlock(&st->gpu.lock);
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
    pthread_mutex_lock(&st->gpu.lock);
    flex_status s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->gpu.lock);
        return s;
    }
    CUfunction fn = NULL;
    CUdeviceptr dblocks = 0, dclasses = 0;
    {
        char key[256];
        snprintf(key, sizeof key, "maskblocks|mask=%016llx|%s|nvrtc%d.%d",
                 (unsigned long long)mask_mod->hash, st->gpu.arch, st->api->nvrtc_major,
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
            append_buffers(blob, sizeof p, descs, mask_mod->ir.num_buffers, st->gpu.bounds_flag);
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
    pthread_mutex_unlock(&st->gpu.lock);
    return s;
}

/* ---- backward ---- */

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
    void *f = NULL;
    const flex_status s = flex_gpu_module_function(ctx, &st->gpu, key, name, &f);
    if (!s) *fn = (CUfunction)f;
    return s;
}

/* Device workspace for one call, in stream order where the driver has the
 * stream-ordered allocator (no synchronisation, capturable in a graph). */
static flex_status workspace_alloc(flex_context *ctx, cuda_state *st, size_t bytes, CUstream stream,
                                   CUdeviceptr *out) {
    *out = 0;
    void *mine = NULL;
    flex_status s = FLEX_OK;
    if (flex_gpu_caller_alloc(ctx, bytes, stream, &mine, &s)) {
        *out = (CUdeviceptr)(uintptr_t)mine;
        return s;
    }
    if (!bytes) return FLEX_OK;
    if (!st->api->cuMemAllocAsync && st->gpu.capturing)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the backward's workspace needs the stream-ordered allocator (CUDA 11.2) "
                         "to be captured into a graph; this driver has none");
    CUresult r = st->api->cuMemAllocAsync ? st->api->cuMemAllocAsync(out, bytes, stream)
                                          : st->api->cuMemAlloc(out, bytes);
    if (r == 2 /* CUDA_ERROR_OUT_OF_MEMORY */)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "the GPU has no room for a %zu-byte workspace", bytes);
    return check_cu(ctx, st->api, r, "allocating a workspace");
}

/* Frees what workspace_alloc gave once the stream's work before is done. */
static void workspace_free(flex_context *ctx, cuda_state *st, CUdeviceptr p, CUstream stream) {
    if (flex_gpu_caller_free(ctx, (void *)(uintptr_t)p, stream) || !p) return;
    if (st->api->cuMemFreeAsync) {
        st->api->cuMemFreeAsync(p, stream);
    } else {
        st->api->cuStreamSynchronize(stream);
        st->api->cuMemFree(p);
    }
}

/* Tiles and variants of the f16/bf16 backward (docs/decisions.md, "CUDA
 * backward"). 16 kv rows a warp: 128 a CTA (8 warps) for head dims up to
 * 128 where the mask's kv block is a multiple of 128, which halves the
 * atomic adds each dQ element gets and the reads of Q and dO per kv row;
 * otherwise up to 64, no more than the mask's kv block. Query steps no
 * longer than the mask's q block and short enough that Sᵀ and dPᵀ fit
 * beside the dK and dV accumulators: 64 rows for head dims up to 64, 32 up
 * to 128, 16 above. FLEXATTN_DEBUG=cuda_bwd_tile=WARPSxROWS replaces the
 * choice where it divides the mask's blocks; cuda_bwd_pipeline,
 * cuda_bwd_exp2, cuda_bwd_dq_red and cuda_bwd_kv_fastest turn the variants
 * off for comparison. On sm_90 the wgmma kernel (flex_backward_sm90.cuh)
 * takes its fixed tiles (8 warps, 64-row query steps) where it can:
 * 16-byte rows, head dims up to 128, mask blocks of 128 kv and 64 query
 * rows or multiples, no other cuda_bwd_tile asked for; cuda_bwd_wgmma=0
 * keeps the mma.sync kernel. Where shared memory (smem_limit, 99 KB on
 * sm_86; flex_gpu_bwd_smem) is short, the kv tile is halved down to 64
 * rows, then the pipeline goes, then the tile is halved further. */
static void choose_backward_tiles(const flex_context *ctx, flex_cuda_bwd_config *cfg, int q_block,
                                  int kv_block, int major, int64_t D, int64_t kv_heads,
                                  size_t smem_limit) {
    const int widest = cfg->dq > cfg->dv ? cfg->dq : cfg->dv;
    const int want_m = widest <= 64 ? 64 : widest <= 128 ? 32 : 16;
    const int block_n = widest <= 128 && kv_block % 128 == 0 ? 128 : kv_block < 64 ? kv_block : 64;
    cfg->warps = block_n / 16;
    cfg->block_m = q_block < want_m ? q_block : want_m;
    const char *env = flex_debug_string(ctx, FLEX_DEBUG_CUDA_BWD_TILE);
    int w, bm, tile_set = 0;
    if (env && sscanf(env, "%dx%d", &w, &bm) == 2 && w >= 1 && w <= 8 && kv_block % (16 * w) == 0 &&
        (bm == 16 || bm == 32 || bm == 64) && q_block % bm == 0) {
        cfg->warps = w;
        cfg->block_m = bm;
        tile_set = w != 8 || bm != 64;
    }
    /* Q, dO, lse and delta of the next step copied while this one computes. */
    cfg->pipeline = env_switch(ctx, FLEX_DEBUG_CUDA_BWD_PIPELINE, 1);
    /* P = exp2(s scale log2(e) - lse log2(e)), the forward's form. */
    cfg->exp2 = env_switch(ctx, FLEX_DEBUG_CUDA_BWD_EXP2, 1);
    /* dQ by 16-byte reductions: sm_90 and later, and four-column groups
     * that stay inside the accumulator's rows (D % 4 == 0). */
    cfg->dq_red = major >= 9 && D % 4 == 0 && env_switch(ctx, FLEX_DEBUG_CUDA_BWD_DQ_RED, 1);
    /* The kv tiles of a head side by side in the grid, so the CTAs in flight
     * share their Q, dO and dQ rows in L2 (grid y is at most 65535). */
    cfg->kv_fastest = kv_heads <= 65535 && env_switch(ctx, FLEX_DEBUG_CUDA_BWD_KV_FASTEST, 1);
    flex_cuda_bwd_config wg = *cfg;
    wg.wgmma = 1;
    wg.warps = 8;
    wg.block_m = 64;
    if (major == 9 && cfg->vec && widest <= 128 && kv_block % 128 == 0 && q_block % 64 == 0 &&
        !tile_set && flex_gpu_bwd_smem(&wg) <= smem_limit &&
        env_switch(ctx, FLEX_DEBUG_CUDA_BWD_WGMMA, 1)) {
        *cfg = wg;
        return;
    }
    while (flex_gpu_bwd_smem(cfg) > smem_limit && cfg->warps > 4)
        cfg->warps /= 2;
    if (flex_gpu_bwd_smem(cfg) > smem_limit) cfg->pipeline = 0;
    while (flex_gpu_bwd_smem(cfg) > smem_limit && cfg->warps > 1)
        cfg->warps /= 2;
}

/* Tiles of the deterministic dQ kernel (flex_backward_dq.cuh) for 16-bit
 * inputs: 16 query rows a warp, up to 4 warps, no more rows than the
 * mask's q block (a tile walks one row of mask blocks); kv steps of up to
 * 64 keys (32 for head dims over 128, so S, dP and the dQ accumulator fit
 * in registers), no more than the mask's kv block, halved while the two
 * K/V stages do not fit in shared memory. Returns the shared memory the
 * kernel needs. */
static size_t choose_dq_tiles(flex_cuda_bwd_config *cfg, int q_block, int kv_block,
                              int smem_optin) {
    const int widest = cfg->dq > cfg->dv ? cfg->dq : cfg->dv;
    const int want_n = widest <= 128 ? 64 : 32;
    cfg->dq_warps = q_block / 16 < 4 ? q_block / 16 : 4;
    cfg->dq_block_n = kv_block < want_n ? kv_block : want_n;
    for (;;) {
        const size_t smem = 2u * ((size_t)cfg->dq_warps * 16 * (cfg->dq + cfg->dv) +
                                  2u * (size_t)cfg->dq_block_n * (cfg->dq + cfg->dv));
        if ((int64_t)smem <= smem_optin || cfg->dq_block_n <= 16) return smem;
        cfg->dq_block_n /= 2;
    }
}

static flex_status cuda_backward(flex_context *ctx, const flex_backward_args *a) {
    cuda_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v, *dout = &a->dout;
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
    ir_mod derived;
    int derived_made = 0;
    mod_derivative der;
    flex_cuda_grad_load loads[MOD_DERIVE_MAX_LOADS];
    int num_loads = 0;
    cuda_buffer_desc grad_descs[IR_MAX_BUFFERS];
    /* Buffer gradients are scattered with fp32 atomics, in an order that
     * depends on the scheduling (docs/decisions.md, "CUDA backward"). */
    if (a->deterministic && a->num_buffer_grads > 0)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the deterministic CUDA backward (opts->deterministic) has no gradients "
                         "of buffers, and one was asked for buffer '%s'; leave opts->deterministic "
                         "0 for it, or run the backward on the CPU backend",
                         a->buffer_grads[0].name);
    flex_status s = flex_gpu_bwd_score_prepare(ctx, &st->gpu, a, &derived, &derived_made, &der,
                                               loads, &num_loads, grad_descs);
    if (s) return s;
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
        choose_backward_tiles(ctx, &cfg, q_block, kv_block, st->major, D, B * Hkv,
                              (size_t)st->smem_optin);
    }
    /* Deterministic: dQ from its own kernel, each row written by one CTA,
     * instead of the main kernel's atomics (docs/decisions.md). Without dq
     * wanted there is nothing to change: dK and dV have one owner anyway. */
    const int dq_pass = a->deterministic && a->dq;
    size_t smem_dq = 0;
    if (dq_pass && q->dtype == FLEX_F32)
        cfg.dq_warps = 4; /* one query row a warp; no tiles in shared memory */
    else if (dq_pass)
        smem_dq = choose_dq_tiles(&cfg, q_block, kv_block, st->smem_optin);
    const int block_n = cfg.warps * 16;
    const size_t smem = q->dtype == FLEX_F32 ? 0 : flex_gpu_bwd_smem(&cfg);
    if ((int64_t)smem > st->smem_optin || (int64_t)smem_dq > st->smem_optin) {
        if (derived_made) ir_free(&derived);
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the %sbackward for head dims %lld/%lld needs %zu bytes of shared memory; "
                         "the GPU allows %d",
                         smem_dq > smem ? "deterministic " : "", (long long)D, (long long)Dv,
                         smem_dq > smem ? smem_dq : smem, st->smem_optin);
    }
    /* The kernels clamp the indices they pass to the mods into the
     * sequences, so the proofs need no margin. */
    unsigned char *mask_in_range = reads_in_range(ctx, mask_mod, B, Hq, Lq, Lkv, 0);
    unsigned char *score_in_range =
        score_ir ? ir_reads_in_range(ctx, score_mod, score_ir, B, Hq, Lq, Lkv, 0) : NULL;
    const flex_cuda_bwd_score score = {score_ir, der.value, der.dscore, loads, num_loads,
                                       score_in_range};

    pthread_mutex_lock(&st->gpu.lock);
    s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->gpu.lock);
        free(mask_in_range);
        free(score_in_range);
        if (derived_made) ir_free(&derived);
        return s;
    }
    CUstream stream = (CUstream)a->stream;
    st->gpu.capturing = stream_capturing(st, stream);
    CUfunction fn_pre = NULL, fn_main = NULL, fn_store = NULL, fn_dq = NULL;
    char key[512];
    {
        _Static_assert(sizeof(flex_cuda_bwd_config) == 15 * sizeof(int),
                       "flex_cuda_bwd_config changed: update the backward kernel key");
        snprintf(key, sizeof key,
                 "bwd|%s|dq%d|dv%d|w%d|bm%d|vec%d|short%d|gs%d|pipe%d|exp2%d|red%d|kvf%d|wg%d|"
                 "dqw%d|dqn%d|mask=%016llx|score=%016llx|loads=%016llx|inr=%016llx.%016llx|%s|"
                 "nvrtc%d.%d",
                 flex_dtype_name(cfg.dtype), cfg.dq, cfg.dv, cfg.warps, cfg.block_m, cfg.vec,
                 cfg.short_indices, cfg.grad_slots, cfg.pipeline, cfg.exp2, cfg.dq_red,
                 cfg.kv_fastest, cfg.wgmma, cfg.dq_warps, cfg.dq_block_n,
                 (unsigned long long)(mask_mod ? mask_mod->hash : 0),
                 (unsigned long long)(score_used ? score_used->hash : 0),
                 (unsigned long long)(num_loads ? flex_cache_checksum(loads, (size_t)num_loads *
                                                                                 sizeof loads[0])
                                                : 0),
                 (unsigned long long)in_range_checksum(mask_in_range, mask_ir),
                 (unsigned long long)(score_ir ? in_range_checksum(score_in_range, score_ir) : 0),
                 st->gpu.arch, st->api->nvrtc_major, st->api->nvrtc_minor);
        const backward_source_args args = {&cfg, mask_ir, mask_in_range, &score};
        s = get_function(ctx, st, key, build_backward_source, &args, "flex_bwd_kernel", &fn_main);
    }
    free(mask_in_range);
    free(score_in_range);
    if (derived_made) ir_free(&derived);
    if (!s) s = module_function(ctx, st, key, "flex_bwd_preprocess", &fn_pre);
    if (!s && a->dq && !dq_pass) s = module_function(ctx, st, key, "flex_bwd_dq_store", &fn_store);
    if (!s && dq_pass) s = module_function(ctx, st, key, "flex_bwd_dq_kernel", &fn_dq);

    cuda_mask_copy *mc = NULL;
    if (!s && mask) s = mask_device_copy(ctx, st, mask, &mc);
    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    if (!s) s = fill_buffers(ctx, st, mask_mod, 0, descs);
    if (!s) s = fill_buffers(ctx, st, score_used, mask_ir ? mask_ir->num_buffers : 0, descs);

    CUdeviceptr ws = 0;
    /* the dQ accumulator 256-byte aligned (16-byte vector reductions) */
    const size_t delta_bytes = ((size_t)(B * Hq * Lq) * sizeof(float) + 255) & ~(size_t)255;
    const size_t dq_bytes = a->dq && !dq_pass ? (size_t)(B * Hq * Lq * D) * sizeof(float) : 0;
    if (!s) s = workspace_alloc(ctx, st, delta_bytes + dq_bytes, stream, &ws);
    if (!s) {
        unsigned char blob[FLEX_GPU_BWD_BLOB_BYTES];
        /* dQ accumulator 0: the main kernel leaves dQ alone */
        const size_t size = flex_gpu_bwd_blob(blob, a, mask, mc, q_block, kv_block, ws,
                                              dq_bytes ? ws + delta_bytes : 0, grad_descs,
                                              cfg.grad_slots, descs, slots, st->gpu.bounds_flag);

        const unsigned rows_y = (unsigned)((Lq + 3) / 4);
        s = launch_blob(ctx, st, fn_pre, (unsigned)(B * Hq), rows_y, 128, 0, stream, blob, size,
                        NULL);
        if (!s) {
            const int64_t per_cta = q->dtype == FLEX_F32 ? 4 : block_n;
            const unsigned heads = (unsigned)(B * Hkv);
            const unsigned tiles = (unsigned)((Lkv + per_cta - 1) / per_cta);
            s = launch_blob(ctx, st, fn_main, cfg.kv_fastest ? tiles : heads,
                            cfg.kv_fastest ? heads : tiles,
                            q->dtype == FLEX_F32 ? 128u : (unsigned)cfg.warps * 32, (unsigned)smem,
                            stream, blob, size, NULL);
        }
        if (!s && fn_store)
            s = launch_blob(ctx, st, fn_store, (unsigned)(B * Hq), rows_y, 128, 0, stream, blob,
                            size, NULL);
        if (!s && fn_dq) {
            const int64_t rows = q->dtype == FLEX_F32 ? 4 : (int64_t)cfg.dq_warps * 16;
            s = launch_blob(ctx, st, fn_dq, (unsigned)(B * Hq), (unsigned)((Lq + rows - 1) / rows),
                            (unsigned)cfg.dq_warps * 32, (unsigned)smem_dq, stream, blob, size,
                            NULL);
        }
        if (!s && slots > 0) note_buffer_reads(st);
    }
    workspace_free(ctx, st, ws, stream);
    st->gpu.capturing = 0;
    pop_ctx(st);
    pthread_mutex_unlock(&st->gpu.lock);
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
