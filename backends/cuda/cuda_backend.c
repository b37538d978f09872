/*
 * The CUDA backend: the backend table, device memory, and the launches of
 * the forward, backward and mask-block kernels. What it shares with the HIP
 * backend (module list -> kernel cache -> compiler, mod-buffer mirrors,
 * block-mask uploads, the bounds flag, memory slots, kernel keys, the
 * backward's tiles and launches) is the GPU host layer
 * (backends/gpu/gpu_host.h), which reaches the driver through this file's
 * flex_gpu_ops table; this file keeps what only CUDA has. The driver API
 * is used through cuda_loader.h; every driver call's result is checked and
 * turned into FLEX_ERR_DEVICE with the driver's name and description of the
 * error.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"
#include "decode_args.h"
#include "cache.h"
#include "cuda_compile.h"
#include "cuda_loader.h"
#include "mod/derive.h"
#include "mod/diagonal.h"
#include "mod/emit.h"
#include "clock.h"
#include "../gpu/gpu_host.h"
#include "../gpu/gpu_partial_bits.h"

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
static int ops_synchronize(const void *api) {
    return cuda_api(api)->cuCtxSynchronize();
}
static flex_status launch_blob(flex_context *ctx, cuda_state *st, CUfunction fn, unsigned gx,
                               unsigned gy, unsigned threads, unsigned smem, CUstream stream,
                               void *blob, size_t size, void *second);
static flex_status ops_launch(flex_context *ctx, flex_gpu_state *gpu, void *fn, unsigned gx,
                              unsigned gy, unsigned threads, unsigned smem, void *stream,
                              void *blob, size_t size, void *second) {
    return launch_blob(ctx, (cuda_state *)gpu, (CUfunction)fn, gx, gy, threads, smem,
                       (CUstream)stream, blob, size, second);
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
    .synchronize = ops_synchronize,
    .synchronize_name = "cuCtxSynchronize",
    .out_of_memory = 2, /* CUDA_ERROR_OUT_OF_MEMORY */
    .launch = ops_launch,
    .mask_blocks_source = flex_cuda_mask_blocks_source,
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
    snprintf(st->gpu.compiler, sizeof st->gpu.compiler, "nvrtc%d.%d", api->nvrtc_major,
             api->nvrtc_minor);
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

/* Whether work queued on stream is being captured into a graph (an
 * invalidated capture counts: what follows fails there too). Without
 * cuStreamIsCapturing (drivers before CUDA 10) no stream can be. */
static int stream_capturing(cuda_state *st, CUstream stream) {
    int status = FLEX_CU_STREAM_CAPTURE_STATUS_NONE;
    if (!st->api->cuStreamIsCapturing || st->api->cuStreamIsCapturing(stream, &status) != 0)
        return 0;
    return status != FLEX_CU_STREAM_CAPTURE_STATUS_NONE;
}

/* Enters a call that queues work on `stream`: the state lock taken, the
 * context current and whether the stream is being captured noted. On
 * failure nothing is held. The call ends with pop_ctx and the unlock. */
static flex_status enter_call(flex_context *ctx, cuda_state *st, CUstream stream) {
    pthread_mutex_lock(&st->gpu.lock);
    const flex_status s = push_ctx(ctx, st);
    if (s) {
        pthread_mutex_unlock(&st->gpu.lock);
        return s;
    }
    st->gpu.capturing = stream_capturing(st, stream);
    return FLEX_OK;
}

/* Marks that kernels reading mod buffers were queued: the next synchronize
 * reads the bounds flag, and every one from now on when they went into a
 * graph, whose replays make no call here. */
static void note_buffer_reads(cuda_state *st) {
    atomic_store(&st->gpu.bounds_pending, 1);
    if (st->gpu.capturing) atomic_store(&st->gpu.bounds_in_graph, 1);
}

/* ---- kernels: memory list -> cache -> NVRTC (gpu_host.h) ---- */

/* The shared layer's names under this file's (and the decode and backward
 * paths') short ones. */
static int env_int(const flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi) {
    return flex_gpu_env_int(ctx, key, dflt, lo, hi);
}
static int env_switch(const flex_context *ctx, flex_debug_key key, int dflt) {
    return flex_gpu_env_switch(ctx, key, dflt);
}

/* flex_gpu_get_function for a CUfunction. The caller holds st->gpu.lock
 * and has the context current. */
static flex_status get_function(flex_context *ctx, cuda_state *st, const char *key,
                                flex_gpu_source_builder build, const void *args,
                                const char *fn_name, CUfunction *fn) {
    void *f = NULL;
    const flex_status s = flex_gpu_get_function(ctx, &st->gpu, key, build, args, fn_name, &f);
    if (!s) *fn = (CUfunction)f;
    return s;
}

typedef flex_gpu_buffer_desc cuda_buffer_desc;

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

/* ---- forward ---- */

/* The head of the forward's parameter block (flex_gpu_params.h). */
typedef flex_gpu_fwd_params cuda_fwd_params;

/* TMA boxes need strides that are positive and grow from the sequence to
 * the head to the batch dimension (a size-1 dimension's stride is free);
 * the 16-byte rows and strides it also needs come with the wgmma kernel. */
static int tma_layout_ok(const flex_tensor *t) {
    const int64_t ss = t->strides[2], sh = t->strides[1], sb = t->strides[0];
    return ss > 0 && sh > 0 && sb > 0 && (t->sizes[1] == 1 || sh >= ss) &&
           (t->sizes[0] == 1 || sb >= sh);
}

/* A tiled tensor map of `data` (4 dims, innermost first; 3 strides in
 * bytes) with boxes of `box`, into map (128 bytes, 64-byte aligned). The
 * elements are copied as bits of their width; out-of-range ones read as
 * zero. */
static flex_status encode_map(flex_context *ctx, cuda_state *st, void *data, int data_type,
                              const unsigned long long dims[4], const unsigned long long strides[3],
                              const unsigned box[4], int swizzle, unsigned char *map) {
    const unsigned unit[4] = {1, 1, 1, 1};
    return check_cu(ctx, st->api,
                    st->api->cuTensorMapEncodeTiled(map, data_type, 4, data, dims, strides, box,
                                                    unit, FLEX_CU_TENSOR_MAP_INTERLEAVE_NONE,
                                                    swizzle,
                                                    FLEX_CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                                    FLEX_CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                    "cuTensorMapEncodeTiled");
}

/* A tiled tensor map of t (dims D, L, H, B) with boxes of `rows` rows and
 * 64 columns in the 128-byte swizzle, into map: the kernel's tiles are
 * rows x 64-column blocks, of 16-bit elements. */
static flex_status encode_tensor_map(flex_context *ctx, cuda_state *st, const flex_tensor *t,
                                     unsigned rows, unsigned char *map) {
    const unsigned long long dims[4] = {
        (unsigned long long)t->sizes[3], (unsigned long long)t->sizes[2],
        (unsigned long long)t->sizes[1], (unsigned long long)t->sizes[0]};
    const unsigned long long strides[3] = {(unsigned long long)t->strides[2] * 2,
                                           (unsigned long long)t->strides[1] * 2,
                                           (unsigned long long)t->strides[0] * 2};
    const unsigned box[4] = {64, rows, 1, 1};
    return encode_map(ctx, st, t->data, FLEX_CU_TENSOR_MAP_DATA_TYPE_UINT16, dims, strides, box,
                      FLEX_CU_TENSOR_MAP_SWIZZLE_128B, map);
}

/* A tensor map of float rows (dims L, 1, H, B; strides sh and sb floats,
 * rows contiguous) with boxes of 64 floats, without swizzle: the
 * backward's lse and delta. */
static flex_status encode_row_map(flex_context *ctx, cuda_state *st, void *data, int64_t B,
                                  int64_t H, int64_t L, int64_t sh, int64_t sb,
                                  unsigned char *map) {
    const unsigned long long dims[4] = {(unsigned long long)L, 1, (unsigned long long)H,
                                        (unsigned long long)B};
    const unsigned long long strides[3] = {(unsigned long long)sh * 4, (unsigned long long)sh * 4,
                                           (unsigned long long)sb * 4};
    const unsigned box[4] = {64, 1, 1, 1};
    return encode_map(ctx, st, data, FLEX_CU_TENSOR_MAP_DATA_TYPE_UINT32, dims, strides, box,
                      FLEX_CU_TENSOR_MAP_SWIZZLE_NONE, map);
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

/* The first rows x cols values of int32 host tensor t (1-D: cols 1),
 * contiguous in dst. */
static void gather_host_ints(const flex_tensor *t, int64_t rows, int64_t cols, int32_t *dst) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            dst[r * cols + c] = flex_decode_load(t, r, c);
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
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Dv = v->sizes[3];
    const int64_t kv_len = a->kv_len > 0 ? a->kv_len : k->sizes[2];
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod;
    flex_status s = flex_gpu_mask_mod(ctx, mask, &mask_mod);
    if (s) return s;
    const struct flex_mod *score_mod = a->score_mod;
    if (kv_len > 0x7fffffff - 4096 || B * Hkv > 65535 || B * Hq * Lq > 0x7fffffff)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "decode shape too large for one launch (B %lld, Hkv %lld, kv length %lld)",
                         (long long)B, (long long)Hkv, (long long)kv_len);

    const int64_t group = Hq / Hkv, rows = group * Lq;
    flex_cuda_dec_config cfg = {
        .dtype = q->dtype,
        .dq = flex_gpu_pad64(D),
        .dv = flex_gpu_pad64(Dv),
        .dv_exact = flex_gpu_pad64(Dv) == Dv,
        .row_tiles = rows <= 16 ? 1 : rows <= 32 ? 2 : 4,
        .short_indices = flex_gpu_short_indices(B, Hq, kv_len + Lq, 0, 256)};
    const flex_tensor *qkv[3] = {q, k, v};
    cfg.vec = q->dtype != FLEX_F32 && flex_gpu_rows_vec(D, Dv, qkv, 3);
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
    int slots;
    s = flex_gpu_mod_slots(ctx, mask_ir, score_ir, &slots);
    if (s) return s;
    /* The kernel evaluates the mods at positions inside the cache: query
     * positions below kv length + Lq (an offset is at most its batch's kv
     * length), keys below the kv length. */
    const int64_t q_span = a->q_offsets ? kv_len + Lq : Lq;
    unsigned char *mask_in_range = flex_gpu_reads_in_range(ctx, mask_mod, B, Hq, q_span, kv_len, 0);
    unsigned char *score_in_range =
        flex_gpu_reads_in_range(ctx, score_mod, B, Hq, q_span, kv_len, 0);

    s = enter_call(ctx, st, (CUstream)a->stream);
    if (s) {
        free(mask_in_range);
        free(score_in_range);
        return s;
    }
    CUfunction fn = NULL, fn_combine = NULL;
    char key[512];
    {
        _Static_assert(sizeof(flex_cuda_dec_config) == 7 * sizeof(int),
                       "flex_cuda_dec_config changed: update the decode kernel key");
        snprintf(key, sizeof key,
                 "dec|%s|dq%d|dv%d|dx%d|rt%d|vec%d|short%d|mask=%016llx|score=%016llx|inr=%016llx."
                 "%016llx|%s|%s",
                 flex_dtype_name(cfg.dtype), cfg.dq, cfg.dv, cfg.dv_exact, cfg.row_tiles, cfg.vec,
                 cfg.short_indices, (unsigned long long)(mask_mod ? mask_mod->hash : 0),
                 (unsigned long long)(score_mod ? score_mod->hash : 0),
                 (unsigned long long)flex_gpu_in_range_checksum(mask_in_range, mask_ir),
                 (unsigned long long)flex_gpu_in_range_checksum(score_in_range, score_ir),
                 st->gpu.arch, st->gpu.compiler);
        const decode_source_args args = {&cfg, mask_ir, score_ir, mask_in_range, score_in_range};
        s = get_function(ctx, st, key, build_decode_source, &args, "flex_decode_kernel", &fn);
    }
    free(mask_in_range);
    free(score_in_range);
    if (!s && splits > 1) s = module_function(ctx, st, key, "flex_splitkv_combine", &fn_combine);

    flex_gpu_mask_copy *mc = NULL;
    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    if (!s) s = flex_gpu_bind_mods(ctx, &st->gpu, mask, mask_mod, score_mod, &mc, descs);

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
        flex_gpu_dec_head hd;
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
                gather_host_ints(args[i], B, i == 2 ? max_pages : 1, staged + n);
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

        const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
        cuda_fwd_params p;
        flex_gpu_fwd_params_fill(&p, a, mask, mc, q_block, kv_block, 16, 0);
        /* Keys are logical positions; a paged k's third size is a page's. */
        p.Lkv = (int32_t)kv_len;
        if (!mask) {
            p.mask_nq = (int32_t)((q_span + q_block - 1) / q_block);
            p.mask_nk = (int32_t)((kv_len + kv_block - 1) / kv_block);
        }
        unsigned char blob[FLEX_GPU_DEC_BLOB_BYTES];
        const size_t size = flex_gpu_dec_blob(blob, &hd, &p, descs, slots, st->gpu.bounds_flag);
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
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Lkv = k->sizes[2], Dv = v->sizes[3];
    flex_status s = flex_gpu_fwd_check(ctx, &st->gpu, a);
    if (s) return s;
    if (q->dtype != FLEX_F32 && st->major < 8)
        return flex_fail(
            ctx, FLEX_ERR_UNSUPPORTED,
            "f16/bf16 attention needs compute capability 8.0 or newer (this GPU is %d.%d)",
            st->major, st->minor);
    if (decode_wanted(a)) return cuda_decode(ctx, st, a);
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod;
    s = flex_gpu_mask_mod(ctx, mask, &mask_mod);
    if (s) return s;
    const struct flex_mod *score_mod = a->score_mod;

    flex_cuda_fwd_config cfg;
    flex_gpu_fwd_config(&cfg, a);
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
    /* wgmma is in the "a" target of sm_90 that flex_cuda_arch_name picks. */
    if (q->dtype != FLEX_F32)
        flex_gpu_fwd_tiles(ctx, &cfg, q_block, kv_block, strcmp(st->gpu.arch, "sm_90a") == 0);
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
    /* Cuts of the wgmma kernel's step (docs/decisions.md, "Where the Hopper
     * forward's step goes"); cuda_step_cuts=0 keeps the step without them,
     * for comparison. */
    cfg.step_cuts = cfg.wgmma && env_switch(ctx, FLEX_DEBUG_CUDA_STEP_CUTS, 1);
    /* Q (two buffers for the TMA kernel, a tile's and the next one's, where
     * they fit: not at head dims 256/256), two K/V stages; the wgmma
     * kernels align their tiles to 1 KB themselves. */
    flex_gpu_fwd_q_bufs(&cfg, (size_t)st->smem_optin);
    size_t smem = q->dtype == FLEX_F32 ? 0 : flex_gpu_fwd_smem(&cfg);
    if ((int64_t)smem > st->smem_optin)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the kernel for head dims %lld/%lld needs %zu bytes of shared memory; the "
                         "GPU allows %d",
                         (long long)D, (long long)Dv, smem, st->smem_optin);

    int slots;
    s = flex_gpu_mod_slots(ctx, mask_mod ? &mask_mod->ir : NULL,
                           score_mod ? &score_mod->ir : NULL, &slots);
    if (s) return s;

    /* Buffer reads proved inside their buffers are compiled without checks:
     * the kernel key carries which (flex_gpu_in_range_checksum). */
    unsigned char *mask_in_range = flex_gpu_reads_in_range(ctx, mask_mod, B, Hq, Lq, Lkv, 0);
    unsigned char *score_in_range =
        flex_gpu_score_reads_in_range(ctx, score_mod, B, Hq, Lq, Lkv, &cfg.score_clamp);
    /* The score mod's part that depends on kv - q only, once per diagonal
     * of a warp's step into a table in shared memory (core/mod/diagonal.h;
     * the TMA kernel, indices unclamped, where the tables fit): off until
     * measured on a GPU, cuda_diag=1 turns it on. */
    if (cfg.tma && score_mod && !cfg.score_clamp && env_switch(ctx, FLEX_DEBUG_CUDA_DIAG, 0)) {
        mod_diagonal_split split;
        if (mod_diagonal_split_find(&score_mod->ir, score_in_range, &split, NULL) == 0) {
            cfg.diag_values = split.rows;
            smem = flex_gpu_fwd_smem(&cfg);
            if ((int64_t)smem > st->smem_optin) { /* the tables do not fit: no split */
                cfg.diag_values = 0;
                smem = flex_gpu_fwd_smem(&cfg);
            }
        }
    }

    s = enter_call(ctx, st, (CUstream)a->stream);
    if (s) {
        free(mask_in_range);
        free(score_in_range);
        return s;
    }
    /* Partial blocks read bit masks made once per mask (and binding of its
     * mod) instead of evaluating the mask mod per score, where they fit
     * their memory budget (gpu_partial_bits.h; cuda_partial_bits=0: the
     * mask mod, for comparison). The f32 kernel evaluates it. */
    flex_gpu_mask_copy *mc = NULL;
    flex_gpu_partial_bits *bits = NULL;
    if (q->dtype != FLEX_F32 && mask_mod && env_switch(ctx, FLEX_DEBUG_CUDA_PARTIAL_BITS, 1)) {
        s = flex_gpu_mask_device_copy(ctx, &st->gpu, mask, &mc);
        if (!s) s = flex_gpu_partial_bits_prepare(ctx, &st->gpu, mask, mc, B, Hq, &bits);
    }
    cfg.partial_bits = bits && bits->usable;

    void *fn = NULL;
    char key[512];
    flex_gpu_fwd_key(key, sizeof key, &st->gpu, &cfg, 1, mask_mod, score_mod, mask_in_range,
                     score_in_range);
    if (!s)
        s = flex_gpu_fwd_function(ctx, &st->gpu, key, flex_cuda_forward_source_in_range, &cfg,
                                  mask_mod, score_mod, mask_in_range, score_in_range, &fn);
    free(mask_in_range);
    free(score_in_range);

    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    if (!s) s = flex_gpu_bind_mods(ctx, &st->gpu, mask, mask_mod, score_mod, &mc, descs);
    if (!s && cfg.partial_bits && !bits->made) {
        /* the bit kernel is in the forward's module */
        CUfunction make = NULL;
        s = module_function(ctx, st, key, "flex_partial_bits_kernel", &make);
        if (!s)
            s = flex_gpu_partial_bits_make(ctx, &st->gpu, mask, bits, make, descs, slots,
                                           a->stream);
    }

    if (!s) {
        cuda_fwd_params p;
        unsigned char blob[FLEX_GPU_FWD_BLOB_BYTES];
        /* Tiles in pairs of heads, or in groups that share a score mod's
         * large per-score reads (flex_gpu_fwd_head_group; docs/cuda-backend.md,
         * "Tile order"); cuda_head_group=N sets the group, for comparison. */
        const int head_group = env_int(ctx, FLEX_DEBUG_CUDA_HEAD_GROUP,
                                       flex_gpu_fwd_head_group(score_mod, persistent), 0, 1 << 20);
        const size_t size =
            flex_gpu_fwd_blob(blob, &p, a, mask, mc, cfg.partial_bits ? bits : NULL, q_block,
                              kv_block, block_m, head_group, descs, slots, st->gpu.bounds_flag);
        /* The TMA kernel takes the tensor maps as a second parameter. */
        _Alignas(64) unsigned char tensor_maps[3 * 128];
        if (cfg.tma) {
            const flex_tensor *ops[3] = {q, k, v};
            const unsigned rows[3] = {(unsigned)block_m, (unsigned)cfg.block_n,
                                      (unsigned)cfg.block_n};
            for (int t = 0; t < 3 && !s; t++)
                s = encode_tensor_map(ctx, st, ops[t], rows[t], tensor_maps + 128 * t);
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
            s = launch_blob(ctx, st, (CUfunction)fn, gx, gy, threads, (unsigned)smem,
                            (CUstream)a->stream, blob, size, cfg.tma ? tensor_maps : NULL);
        if (!s && slots > 0) note_buffer_reads(st);
    }
    st->gpu.capturing = 0;
    pop_ctx(st);
    pthread_mutex_unlock(&st->gpu.lock);
    return s;
}

/* ---- exact classes of undecided blocks ---- */

/* ---- backward ---- */

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

/* The strides a row map of a [B][H][L] float tensor takes (a size-1
 * dimension's stride is free: the dense one), or 0 where TMA cannot read
 * it: rows not contiguous, the base or a stride not a multiple of 16 bytes. */
static int row_map_strides(const void *data, int64_t B, int64_t H, int64_t L, int64_t ss,
                           int64_t sh, int64_t sb, int64_t *sh_out, int64_t *sb_out) {
    const int64_t dense_h = (L + 3) / 4 * 4;
    *sh_out = H > 1 ? sh : dense_h;
    *sb_out = B > 1 ? sb : *sh_out * H;
    return (L == 1 || ss == 1) && (uintptr_t)data % 16 == 0 && *sh_out > 0 && *sb_out > 0 &&
           *sh_out % 4 == 0 && *sb_out % 4 == 0;
}

/* Whether the backward's TMA copies can read a's Q, dO and lse and the
 * delta rows of the workspace ([B][Hq][Lq] floats, 256-byte aligned: rows
 * of 16-byte multiples where Lq % 4 == 0). */
static int backward_tma_ok(const cuda_state *st, const flex_backward_args *a) {
    const flex_tensor *q = &a->q, *lse = &a->lse;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2];
    int64_t sh, sb;
    return st->api->cuTensorMapEncodeTiled && tma_layout_ok(q) && tma_layout_ok(&a->dout) &&
           Lq % 4 == 0 &&
           row_map_strides(lse->data, B, Hq, Lq, lse->strides[2], lse->strides[1], lse->strides[0],
                           &sh, &sb);
}

/* The four tensor maps of the TMA backward into maps (4 x 128 bytes,
 * 64-byte aligned): Q and dO in 64-row boxes, lse and the workspace's
 * delta (at ws) in boxes of 64 floats. backward_tma_ok(a) holds. */
static flex_status encode_backward_maps(flex_context *ctx, cuda_state *st,
                                        const flex_backward_args *a, CUdeviceptr ws,
                                        unsigned char *maps) {
    const flex_tensor *q = &a->q, *lse = &a->lse;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2];
    int64_t sh, sb;
    row_map_strides(lse->data, B, Hq, Lq, lse->strides[2], lse->strides[1], lse->strides[0], &sh,
                    &sb);
    flex_status s = encode_tensor_map(ctx, st, q, 64, maps);
    if (!s) s = encode_tensor_map(ctx, st, &a->dout, 64, maps + 128);
    if (!s) s = encode_row_map(ctx, st, lse->data, B, Hq, Lq, sh, sb, maps + 256);
    if (!s) s = encode_row_map(ctx, st, (void *)(uintptr_t)ws, B, Hq, Lq, Lq, Hq * Lq, maps + 384);
    return s;
}

/* Tiles and variants of the f16/bf16 backward (docs/decisions.md, "CUDA
 * backward"). The tiles are flex_gpu_bwd_tiles' (query steps of 16 rows
 * above head dim 128). FLEXATTN_DEBUG=cuda_bwd_tile=WARPSxROWS replaces the
 * choice where it divides the mask's blocks; cuda_bwd_pipeline,
 * cuda_bwd_exp2, cuda_bwd_dq_red and cuda_bwd_kv_fastest turn the variants
 * off for comparison. On sm_90 the wgmma kernel (flex_backward_sm90.cuh)
 * takes its fixed tiles (8 warps, 64-row query steps) where it can:
 * 16-byte rows, head dims up to 128, mask blocks of 128 kv and 64 query
 * rows or multiples, no other cuda_bwd_tile asked for; cuda_bwd_wgmma=0
 * keeps the mma.sync kernel. It copies by TMA where tma_ok says the tensor
 * maps can be made (backward_tma_ok). Where shared memory (smem_limit, 99 KB on
 * sm_86; flex_gpu_bwd_smem) is short, the kv tile is halved down to 64
 * rows, then the pipeline goes, then the tile is halved further
 * (flex_gpu_bwd_fit; the query step stays: at most 99 KB is short only
 * with the pipeline). */
static void choose_backward_tiles(const flex_context *ctx, flex_cuda_bwd_config *cfg, int q_block,
                                  int kv_block, int major, int64_t D, int64_t kv_heads,
                                  size_t smem_limit, int tma_ok) {
    flex_gpu_bwd_tiles(cfg, q_block, kv_block, 16);
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
    /* ... in groups of (batch, kv head) pairs, tile by tile within a group
     * (flex_bwd_tile_of): off until timed; cuda_bwd_head_group=N sets it. */
    cfg->head_group = env_int(ctx, FLEX_DEBUG_CUDA_BWD_HEAD_GROUP, 0, 0, 1 << 20);
    const int widest = cfg->dq > cfg->dv ? cfg->dq : cfg->dv;
    flex_cuda_bwd_config wg = *cfg;
    wg.wgmma = 1;
    wg.warps = 8;
    wg.block_m = 64;
    /* P computed while dPᵀ is in flight; barrier C of the warpgroup only
     * where its dQ reads only its own dS rows (head dim 64); dQ added by
     * bulk reductions from shared memory (its regions counted in
     * flex_gpu_bwd_smem before the fit below). */
    wg.split_wait = env_switch(ctx, FLEX_DEBUG_CUDA_BWD_SPLIT_WAIT, 1);
    wg.wg_barrier = env_switch(ctx, FLEX_DEBUG_CUDA_BWD_WG_BARRIER, 1);
    wg.dq_bulk = env_switch(ctx, FLEX_DEBUG_CUDA_BWD_DQ_BULK, 1);
    if (major == 9 && cfg->vec && widest <= 128 && kv_block % 128 == 0 && q_block % 64 == 0 &&
        !tile_set && flex_gpu_bwd_smem(&wg) <= smem_limit &&
        env_switch(ctx, FLEX_DEBUG_CUDA_BWD_WGMMA, 1)) {
        /* Q, dO, lse and delta by TMA from one thread where the tensor maps
         * can be made (tma_ok) and the pipeline is on: three stages where
         * they fit, else two (cuda_bwd_tma=2 or 0 asks for fewer). */
        const int stages =
            wg.pipeline && tma_ok ? env_int(ctx, FLEX_DEBUG_CUDA_BWD_TMA, 3, 0, 3) : 0;
        for (int n = stages; n >= 2 && !wg.tma; n--) {
            flex_cuda_bwd_config t = wg;
            t.tma = n;
            if (flex_gpu_bwd_smem(&t) <= smem_limit) wg = t;
        }
        /* where the stage of a step is refilled: after the next step's
         * barrier C, or (cuda_bwd_refill_early=1) at its top */
        wg.refill_early = wg.tma && env_switch(ctx, FLEX_DEBUG_CUDA_BWD_REFILL_EARLY, 0);
        *cfg = wg;
        return;
    }
    flex_gpu_bwd_fit(cfg, smem_limit, 0);
}

/* Tiles of the deterministic dQ kernel (flex_backward_dq.cuh) for 16-bit
 * inputs: flex_gpu_row_tiles' with up to 4 warps (a tile walks one row of
 * mask blocks; S, dP and the dQ accumulator in registers), the kv step
 * halved while the two K/V stages do not fit in shared memory. Returns the
 * shared memory the kernel needs. */
static size_t choose_dq_tiles(flex_cuda_bwd_config *cfg, int q_block, int kv_block,
                              int smem_optin) {
    flex_gpu_row_tiles(q_block, kv_block, cfg->dq > 128 || cfg->dv > 128, 4, &cfg->dq_warps,
                       &cfg->dq_block_n);
    for (;;) {
        const size_t smem = 2u * ((size_t)cfg->dq_warps * 16 * (cfg->dq + cfg->dv) +
                                  2u * (size_t)cfg->dq_block_n * (cfg->dq + cfg->dv));
        if ((int64_t)smem <= smem_optin || cfg->dq_block_n <= 16) return smem;
        cfg->dq_block_n /= 2;
    }
}

static flex_status cuda_backward(flex_context *ctx, const flex_backward_args *a) {
    cuda_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Dv = v->sizes[3];
    flex_status s = flex_gpu_bwd_check(ctx, &st->gpu, a);
    if (!s && q->dtype != FLEX_F32 && st->major < 8)
        s = flex_fail(
            ctx, FLEX_ERR_UNSUPPORTED,
            "the f16/bf16 backward needs compute capability 8.0 or newer (this GPU is %d.%d)",
            st->major, st->minor);
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod;
    if (!s) s = flex_gpu_mask_mod(ctx, mask, &mask_mod);
    if (s) return s;
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;

    /* The score mod and its derivative, on a private copy of its IR (the
     * identity needs neither). */
    flex_gpu_bwd_mods m;
    s = flex_gpu_bwd_mods_prepare(ctx, &st->gpu, a, mask_mod, &m);
    if (s) return s;

    flex_cuda_bwd_config cfg;
    flex_gpu_bwd_config(&cfg, a);
    if (q->dtype != FLEX_F32)
        choose_backward_tiles(ctx, &cfg, q_block, kv_block, st->major, D, B * Hkv,
                              (size_t)st->smem_optin, backward_tma_ok(st, a));
    /* Deterministic: dQ from its own kernel, each row written by one CTA,
     * instead of the main kernel's atomics (docs/decisions.md). Without dq
     * wanted there is nothing to change: dK and dV have one owner anyway. */
    const int dq_pass = a->deterministic && a->dq;
    size_t smem_dq = 0;
    if (dq_pass && q->dtype == FLEX_F32)
        cfg.dq_warps = 4; /* one query row a warp; no tiles in shared memory */
    else if (dq_pass)
        smem_dq = choose_dq_tiles(&cfg, q_block, kv_block, st->smem_optin);
    /* Buffer gradients summed per CTA in shared memory where the gradient
     * tensors are small enough and the region fits beside the tiles chosen
     * without it (it never costs the wgmma kernel or a larger tile);
     * otherwise, on f32 and with cuda_bwd_grad_smem=0 one global atomic per
     * score and gradient (docs/decisions.md, "CUDA backward"). */
    if (q->dtype != FLEX_F32 && m.num_loads > 0 &&
        env_switch(ctx, FLEX_DEBUG_CUDA_BWD_GRAD_SMEM, 1)) {
        flex_cuda_bwd_config gs = cfg;
        gs.grad_smem = flex_gpu_bwd_grad_floats(a);
        /* the region saves one global atomic per score; dQ's staging and a
         * third TMA stage save far less, so they give way where all do not
         * fit */
        if (gs.grad_smem > 0 && gs.dq_bulk && (int64_t)flex_gpu_bwd_smem(&gs) > st->smem_optin)
            gs.dq_bulk = 0;
        if (gs.grad_smem > 0 && gs.tma == 3 && (int64_t)flex_gpu_bwd_smem(&gs) > st->smem_optin)
            gs.tma = 2;
        if (gs.grad_smem > 0 && (int64_t)flex_gpu_bwd_smem(&gs) <= st->smem_optin) cfg = gs;
    }
    const size_t smem = q->dtype == FLEX_F32 ? 0 : flex_gpu_bwd_smem(&cfg);
    if ((int64_t)smem > st->smem_optin || (int64_t)smem_dq > st->smem_optin) {
        flex_gpu_bwd_mods_free(&m);
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the %sbackward for head dims %lld/%lld needs %zu bytes of shared memory; "
                         "the GPU allows %d",
                         smem_dq > smem ? "deterministic " : "", (long long)D, (long long)Dv,
                         smem_dq > smem ? smem_dq : smem, st->smem_optin);
    }

    CUstream stream = (CUstream)a->stream;
    s = enter_call(ctx, st, stream);
    if (s) {
        flex_gpu_bwd_mods_free(&m);
        return s;
    }
    /* Partial blocks read the mask's bit masks, as the forward's do (the
     * same ones, made by whichever call comes first), unless the mask mod
     * is a few integer operations on the indices, which cost less than the
     * bits' loads (flex_gpu_mask_mod_cheap; docs/decisions.md);
     * cuda_partial_bits=0 or 1 decides instead, for comparison. The f32
     * kernel evaluates it. */
    flex_gpu_mask_copy *mc = NULL;
    flex_gpu_partial_bits *bits = NULL;
    const int bits_asked = env_int(ctx, FLEX_DEBUG_CUDA_PARTIAL_BITS, -1, 0, 1);
    if (q->dtype != FLEX_F32 && mask_mod &&
        (bits_asked < 0 ? !flex_gpu_mask_mod_cheap(&mask_mod->ir) : bits_asked)) {
        s = flex_gpu_mask_device_copy(ctx, &st->gpu, mask, &mc);
        if (!s) s = flex_gpu_partial_bits_prepare(ctx, &st->gpu, mask, mc, B, Hq, &bits);
    }
    cfg.partial_bits = bits && bits->usable;
    flex_gpu_bwd_kernels kernels;
    memset(&kernels, 0, sizeof kernels);
    if (!s)
        s = flex_gpu_bwd_kernels_get(ctx, &st->gpu, a, &cfg, &m, flex_cuda_backward_source,
                                     &kernels);
    flex_gpu_bwd_mods_free(&m);
    cuda_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    if (!s) s = flex_gpu_bind_mods(ctx, &st->gpu, mask, m.mask_mod, m.score_used, &mc, descs);
    if (!s && cfg.partial_bits) /* once: made bits return at once */
        s = flex_gpu_partial_bits_make(ctx, &st->gpu, mask, bits, kernels.bits, descs, m.slots,
                                       a->stream);

    CUdeviceptr ws = 0;
    size_t delta_bytes, dq_bytes;
    flex_gpu_bwd_workspace(a, &cfg, &delta_bytes, &dq_bytes);
    if (!s) s = workspace_alloc(ctx, st, delta_bytes + dq_bytes, stream, &ws);
    /* The TMA kernel's tensor maps (Q, dO, lse, delta), its second parameter. */
    _Alignas(64) unsigned char tensor_maps[4 * 128];
    if (!s && cfg.tma) s = encode_backward_maps(ctx, st, a, ws, tensor_maps);
    if (!s)
        s = flex_gpu_bwd_launch(ctx, &st->gpu, a, &cfg, &m, mc, &kernels, descs, ws, smem, smem_dq,
                                stream, cfg.tma ? tensor_maps : NULL);
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
    .forward = cuda_forward,
    .backward = cuda_backward,
    FLEX_GPU_BACKEND_SLOTS,
};
