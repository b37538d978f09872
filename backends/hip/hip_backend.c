/*
 * The HIP backend for AMD GPUs: the backend table, device memory, and the
 * launches of the forward, backward and mask-block kernels. Kernels come from the
 * same templates as CUDA's (hip_compile.h); the module list, kernel cache,
 * buffer mirrors, block-mask uploads, bounds flag, memory slots, kernel
 * keys and the backward's launches are the GPU host layer
 * (backends/gpu/gpu_host.h), which reaches the HIP runtime through this
 * file's flex_gpu_ops table. The runtime and hiprtc are loaded with dlopen
 * (hip_loader.c).
 *
 * The project has no AMD GPU: this code is compiled, never run
 * (docs/hip-backend.md).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "cache.h"
#include "hip_compile.h"
#include "hip_loader.h"
#include "../gpu/gpu_host.h"

typedef struct hip_state {
    flex_gpu_state gpu; /* first: the shared layer finds it at ctx->backend_state */
    const flex_hip_api *api;
    int device;
    flex_hip_arch arch;
    char name[320];
} hip_state;

static flex_cache *process_cache;
static pthread_once_t process_cache_once = PTHREAD_ONCE_INIT;
static void process_cache_open(void) {
    process_cache = flex_cache_open(NULL, "hip");
}

static hip_state *state_of(flex_context *ctx) {
    return (hip_state *)ctx->backend_state;
}

/* ---- the runtime as the GPU host layer sees it ---- */

static const flex_hip_api *hip_api(const void *api) {
    return (const flex_hip_api *)api;
}
static void *dev_ptr(flex_gpu_ptr p) {
    return (void *)(uintptr_t)p;
}
static void ops_describe(const void *api, int r, char *buf, size_t cap) {
    flex_hip_describe(hip_api(api), r, buf, cap);
}
/* HIP has no context stack: the device is made current for the thread. */
static int ops_enter(const void *api, void *vendor_ctx) {
    return hip_api(api)->hipSetDevice((int)(intptr_t)vendor_ctx);
}
static void ops_leave(const void *api) {
    (void)api;
}
static int ops_mem_alloc(const void *api, flex_gpu_ptr *ptr, size_t bytes) {
    void *p = NULL;
    const hipError_t r = hip_api(api)->hipMalloc(&p, bytes);
    *ptr = (flex_gpu_ptr)(uintptr_t)p;
    return r;
}
static int ops_mem_free(const void *api, flex_gpu_ptr ptr) {
    return hip_api(api)->hipFree(dev_ptr(ptr));
}
static int ops_copy_to_device(const void *api, flex_gpu_ptr dst, const void *src, size_t bytes) {
    return hip_api(api)->hipMemcpyHtoD(dev_ptr(dst), src, bytes);
}
static int ops_copy_to_host(const void *api, void *dst, flex_gpu_ptr src, size_t bytes) {
    return hip_api(api)->hipMemcpyDtoH(dst, dev_ptr(src), bytes);
}
static int ops_mem_set(const void *api, flex_gpu_ptr dst, unsigned char value, size_t bytes) {
    return hip_api(api)->hipMemsetD8(dev_ptr(dst), value, bytes);
}
static int ops_module_load(const void *api, const void *image, size_t size, void **module) {
    (void)size; /* a code object carries its own size */
    hipModule_t m = NULL;
    const hipError_t r = hip_api(api)->hipModuleLoadData(&m, image);
    *module = m;
    return r;
}
static int ops_module_function(const void *api, void *module, const char *name, void **fn) {
    hipFunction_t f = NULL;
    const hipError_t r = hip_api(api)->hipModuleGetFunction(&f, (hipModule_t)module, name);
    if (r == 0) *fn = f;
    return r;
}
static int ops_module_unload(const void *api, void *module) {
    return hip_api(api)->hipModuleUnload((hipModule_t)module);
}
static flex_status ops_compile(flex_context *ctx, const void *api, const char *source,
                               const char *program_name, const char *arch, void **image,
                               size_t *size) {
    return flex_hip_compile(ctx, hip_api(api), source, program_name, arch, image, size);
}
static int ops_synchronize(const void *api) {
    return hip_api(api)->hipDeviceSynchronize();
}
/* Launches fn with blob (size bytes) as its parameter block; no HIP
 * kernel takes a second parameter. */
static flex_status ops_launch(flex_context *ctx, flex_gpu_state *gpu, void *fn, unsigned gx,
                              unsigned gy, unsigned threads, unsigned smem, void *stream,
                              void *blob, size_t size, void *second) {
    if (second)
        return flex_fail(ctx, FLEX_ERR_INTERNAL, "a HIP kernel was given a second parameter");
    void *extra[] = {(void *)(uintptr_t)FLEX_HIP_LAUNCH_PARAM_BUFFER_POINTER, blob,
                     (void *)(uintptr_t)FLEX_HIP_LAUNCH_PARAM_BUFFER_SIZE, &size,
                     (void *)(uintptr_t)FLEX_HIP_LAUNCH_PARAM_END};
    return flex_gpu_check(ctx, gpu,
                          hip_api(gpu->api)->hipModuleLaunchKernel((hipFunction_t)fn, gx, gy, 1,
                                                                   threads, 1, 1, smem,
                                                                   (hipStream_t)stream, NULL,
                                                                   extra),
                          "hipModuleLaunchKernel");
}

static const flex_gpu_ops hip_gpu_ops = {
    .vendor = "HIP",
    .describe = ops_describe,
    .enter = ops_enter,
    .leave = ops_leave,
    .enter_name = "hipSetDevice",
    .mem_alloc = ops_mem_alloc,
    .mem_free = ops_mem_free,
    .copy_to_device = ops_copy_to_device,
    .copy_to_host = ops_copy_to_host,
    .mem_set = ops_mem_set,
    .mem_alloc_name = "hipMalloc",
    .copy_to_device_name = "hipMemcpyHtoD",
    .copy_to_host_name = "hipMemcpyDtoH",
    .mem_set_name = "hipMemsetD8",
    .module_load = ops_module_load,
    .module_function = ops_module_function,
    .module_unload = ops_module_unload,
    .module_load_name = "hipModuleLoadData",
    .module_function_name = "hipModuleGetFunction",
    .compile = ops_compile,
    .synchronize = ops_synchronize,
    .synchronize_name = "hipDeviceSynchronize",
    .out_of_memory = FLEX_HIP_ERROR_OUT_OF_MEMORY,
    .launch = ops_launch,
    .mask_blocks_source = flex_hip_mask_blocks_source,
};

/* ---- table slots ---- */

/* gcnArchName of device d ("gfx90a:sramecc+:xnack-"): the first "gfx"
 * string in hipDeviceProp_t, whose layout differs between ROCm releases
 * (a buffer larger than every release's structure is passed). */
static int device_arch_name(const flex_hip_api *api, int d, char *out, size_t cap) {
    enum { PROPS_BYTES = 16384 };
    unsigned char *props = calloc(1, PROPS_BYTES);
    if (!props) return -1;
    int rc = api->hipGetDeviceProperties(props, d) == 0 ? 1 : -1;
    if (rc == 1) {
        rc = -1;
        for (size_t i = 0; i + 4 < PROPS_BYTES && rc < 0; i++)
            if (memcmp(props + i, "gfx", 3) == 0 && props[i + 3] >= '0' && props[i + 3] <= '9') {
                snprintf(out, cap, "%.*s", (int)strnlen((const char *)props + i, PROPS_BYTES - i),
                         (const char *)props + i);
                rc = 0;
            }
    }
    free(props);
    return rc;
}

static int hip_score(char *why, size_t why_cap) {
    const flex_hip_api *api;
    if (flex_hip_load_runtime(&api, why, why_cap) != 0) return 0;
    if (flex_hip_load_rtc(&api, why, why_cap) != 0) return 0;
    char gcn[64] = "";
    flex_hip_arch arch;
    if (device_arch_name(api, 0, gcn, sizeof gcn) != 0) {
        if (why && why_cap) snprintf(why, why_cap, "the architecture of HIP device 0 is unknown");
        return 0;
    }
    if (!flex_hip_arch_supported(gcn, &arch, why, why_cap)) return 0;
    int count = 0, version = 0;
    api->hipGetDeviceCount(&count);
    api->hipDriverGetVersion(&version);
    if (why && why_cap)
        snprintf(why, why_cap, "%d device%s (%s), HIP %d, hiprtc %d.%d; compiled, never run here",
                 count, count == 1 ? "" : "s", arch.name, version, api->hiprtc_major,
                 api->hiprtc_minor);
    return 90; /* after CUDA, before the CPU */
}

static flex_status hip_init(flex_context *ctx, int device_index) {
    char why[512];
    const flex_hip_api *api;
    if (flex_hip_load_runtime(&api, why, sizeof why) != 0 ||
        flex_hip_load_rtc(&api, why, sizeof why) != 0)
        return flex_fail(ctx, FLEX_ERR_BACKEND, "the HIP backend is not usable: %s", why);
    int count = 0;
    if (api->hipGetDeviceCount(&count) != 0 || device_index < 0 || device_index >= count)
        return flex_fail(ctx, FLEX_ERR_BACKEND, "HIP device %d does not exist (%d device%s)",
                         device_index, count, count == 1 ? "" : "s");
    char gcn[64] = "";
    flex_hip_arch arch;
    if (device_arch_name(api, device_index, gcn, sizeof gcn) != 0)
        return flex_fail(ctx, FLEX_ERR_BACKEND, "the architecture of HIP device %d is unknown",
                         device_index);
    if (!flex_hip_arch_supported(gcn, &arch, why, sizeof why))
        return flex_fail(ctx, FLEX_ERR_BACKEND, "the HIP backend is not usable: %s", why);
    hip_state *st = calloc(1, sizeof *st);
    if (!st) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for the HIP state");
    st->api = api;
    st->device = device_index;
    st->arch = arch;
    flex_gpu_init(&st->gpu, &hip_gpu_ops, api, (void *)(intptr_t)device_index, FLEX_DEVICE_HIP);
    snprintf(st->gpu.arch, sizeof st->gpu.arch, "%s", arch.name);
    snprintf(st->gpu.compiler, sizeof st->gpu.compiler, "hiprtc%d.%d", api->hiprtc_major,
             api->hiprtc_minor);
    char dev_name[256] = "AMD GPU";
    flex_status s = flex_gpu_enter(ctx, &st->gpu);
    if (!s) {
        api->hipDeviceGetName(dev_name, sizeof dev_name, device_index);
        s = flex_gpu_alloc_bounds_flag(ctx, &st->gpu);
        flex_gpu_leave(&st->gpu);
    }
    if (s) {
        pthread_mutex_destroy(&st->gpu.lock);
        free(st);
        return s;
    }
    snprintf(st->name, sizeof st->name, "%s (%s, %s, wave%d)", dev_name, arch.name, arch.family,
             arch.wave_size);
    pthread_once(&process_cache_once, process_cache_open);
    st->gpu.cache = process_cache;
    ctx->backend_state = st;
    return FLEX_OK;
}

static void hip_release(flex_context *ctx) {
    hip_state *st = state_of(ctx);
    if (!st) return;
    flex_gpu_release(&st->gpu);
    free(st);
    ctx->backend_state = NULL;
}

static const char *hip_device_name(flex_context *ctx) {
    return state_of(ctx)->name;
}

/* ---- forward ---- */

/* Tiles of the 16-bit kernel on AMD: one 16-row m-tile per 32-lane warp, as
 * many warps as the mask's q block holds (4 at most), kv steps of up to 64
 * keys (32 for head dims above 128) that divide the mask's kv block. */
/* The mma.sync forward's row tiles, shrunk to the arch's LDS (64 KB on
 * CDNA and RDNA3): head dim 128 takes 32-key steps, 256 takes 16. */
static void choose_hip_tiles(flex_cuda_fwd_config *cfg, int q_block, int kv_block,
                             int lds_bytes) {
    cfg->mt = 1;
    flex_gpu_row_tiles(q_block, kv_block, cfg->dq > 128 || cfg->dv > 128, 4, &cfg->warps,
                       &cfg->block_n);
    flex_gpu_fwd_fit(cfg, (size_t)lds_bytes);
}

static flex_status hip_forward(flex_context *ctx, const flex_forward_args *a) {
    hip_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v;
    const int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    const int64_t Lkv = k->sizes[2], Dv = v->sizes[3];
    /* Never ignored silently: the shared forward knows nothing of them. */
    if (a->q_offsets || a->kv_lengths || a->page_table)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the HIP backend does not implement opts->%s yet (decode and paged KV "
                         "run on the CPU and CUDA backends)",
                         a->q_offsets    ? "q_offsets"
                         : a->kv_lengths ? "kv_lengths"
                                         : "page_table");
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod;
    flex_status s = flex_gpu_fwd_check(ctx, &st->gpu, a);
    if (!s) s = flex_gpu_mask_mod(ctx, mask, &mask_mod);
    if (s) return s;
    const struct flex_mod *score_mod = a->score_mod;
    flex_cuda_fwd_config cfg;
    flex_gpu_fwd_config(&cfg, a);
    cfg.mask_bits = 1;
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
    if (q->dtype != FLEX_F32) choose_hip_tiles(&cfg, q_block, kv_block, st->arch.lds_bytes);
    const int block_m = cfg.warps * 16 * cfg.mt;
    const size_t smem = q->dtype == FLEX_F32 ? 0 : flex_gpu_fwd_smem(&cfg);
    if ((int64_t)smem > st->arch.lds_bytes)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the kernel for head dims %lld/%lld needs %zu bytes of LDS; %s allows %d",
                         (long long)D, (long long)Dv, smem, st->arch.name, st->arch.lds_bytes);
    int slots;
    s = flex_gpu_mod_slots(ctx, mask_mod ? &mask_mod->ir : NULL,
                           score_mod ? &score_mod->ir : NULL, &slots);
    if (s) return s;
    unsigned char *mask_in_range = flex_gpu_reads_in_range(ctx, mask_mod, B, Hq, Lq, Lkv, 0);
    unsigned char *score_in_range =
        flex_gpu_score_reads_in_range(ctx, score_mod, B, Hq, Lq, Lkv, &cfg.score_clamp);

    pthread_mutex_lock(&st->gpu.lock);
    s = flex_gpu_enter(ctx, &st->gpu);
    void *fn = NULL;
    if (!s) {
        char key[512];
        flex_gpu_fwd_key(key, sizeof key, &st->gpu, &cfg, 0, mask_mod, score_mod, mask_in_range,
                         score_in_range);
        s = flex_gpu_fwd_function(ctx, &st->gpu, key, flex_hip_forward_source, &cfg, mask_mod,
                                  score_mod, mask_in_range, score_in_range, &fn);
    }
    free(mask_in_range);
    free(score_in_range);
    flex_gpu_mask_copy *mc = NULL;
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    if (!s) s = flex_gpu_bind_mods(ctx, &st->gpu, mask, mask_mod, score_mod, &mc, descs);
    if (!s) {
        flex_gpu_fwd_params p;
        unsigned char blob[FLEX_GPU_FWD_BLOB_BYTES];
        const size_t size = flex_gpu_fwd_blob(
            blob, &p, a, mask, mc, NULL, q_block, kv_block, block_m,
            flex_gpu_env_int(ctx, FLEX_DEBUG_CUDA_HEAD_GROUP, 2, 0, 1 << 20), descs, slots,
            st->gpu.bounds_flag);
        const unsigned gx = (unsigned)(B * Hq);
        const unsigned gy = q->dtype == FLEX_F32 ? (unsigned)((Lq + 3) / 4)
                                                 : (unsigned)((int64_t)p.mask_nq * p.tiles_per_row);
        const unsigned threads = q->dtype == FLEX_F32 ? 128u : (unsigned)cfg.warps * 32;
        if (gy > 65535 || B * Hq > 0x7fffffff)
            s = flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                          "sequence too long for one launch (%lld query tiles)",
                          (long long)p.mask_nq * p.tiles_per_row);
        else if (gx > 0 && gy > 0)
            s = ops_launch(ctx, &st->gpu, fn, gx, gy, threads, (unsigned)smem, a->stream, blob,
                           size, NULL);
        if (!s && slots > 0) atomic_store(&st->gpu.bounds_pending, 1);
    }
    pthread_mutex_unlock(&st->gpu.lock);
    return s;
}

/* ---- exact classes of undecided blocks ---- */

/* ---- backward ---- */

/* Tiles and variants of the f16/bf16 backward on AMD: CUDA's choice
 * (flex_gpu_bwd_tiles) within the LDS a workgroup has (64 KB), with query
 * steps of 32 rows above head dim 128 where CUDA takes 16, since an even
 * number of 16-row dQ tiles is what lets a wave64 GPU run the products on
 * MFMA (flex_mma_hip.cuh). P by exp2, as on CUDA. No pipeline:
 * AMD's form of cp.async is a synchronous copy, so a second Q/dO stage
 * would overlap nothing and only take LDS. dQ by per-element atomics (the
 * 16-byte reductions are sm_90's). The kv tiles of a head side by side in
 * the grid where the heads fit in its y (65535). Where the LDS is short
 * (flex_gpu_bwd_fit) the kv tile is halved down to 64 rows, then the query
 * step, which CUDA keeps, then the kv tile further (head dims above 128:
 * such kernels take the scalar products on CDNA). Buffer gradients by
 * global atomics: the shared gradient region is CUDA's only (it would take
 * a 64 KB LDS from the tiles, and nothing here has been run on AMD). */
static void choose_hip_backward_tiles(flex_cuda_bwd_config *cfg, int q_block, int kv_block,
                                      int64_t kv_heads, int lds_bytes) {
    flex_gpu_bwd_tiles(cfg, q_block, kv_block, 32);
    cfg->pipeline = 0;
    cfg->exp2 = 1;
    cfg->dq_red = 0;
    cfg->kv_fastest = kv_heads <= 65535;
    cfg->grad_smem = 0;
    flex_gpu_bwd_fit(cfg, (size_t)lds_bytes, 1);
}

/* Device workspace for one call: stream-ordered where the runtime has it
 * (hipMallocAsync), else hipMalloc, freed after the stream's work. */
typedef struct hip_workspace {
    void *ptr;
    int async;
} hip_workspace;

static flex_status workspace_alloc(flex_context *ctx, hip_state *st, size_t bytes,
                                   hipStream_t stream, hip_workspace *w) {
    w->ptr = NULL;
    w->async = 0;
    flex_status s = FLEX_OK;
    if (flex_gpu_caller_alloc(ctx, bytes, stream, &w->ptr, &s)) return s;
    if (!bytes) return FLEX_OK;
    hipError_t r = -1;
    if (st->api->hipMallocAsync) {
        r = st->api->hipMallocAsync(&w->ptr, bytes, stream);
        w->async = r == 0;
    }
    /* Not every device has memory pools: the plain allocation then. */
    if (r != 0 && r != FLEX_HIP_ERROR_OUT_OF_MEMORY) r = st->api->hipMalloc(&w->ptr, bytes);
    if (r == FLEX_HIP_ERROR_OUT_OF_MEMORY)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                         "the GPU has no room for the backward's %zu-byte workspace", bytes);
    return flex_gpu_check(ctx, &st->gpu, r, "allocating the backward's workspace");
}

static void workspace_free(flex_context *ctx, hip_state *st, const hip_workspace *w,
                           hipStream_t stream) {
    if (flex_gpu_caller_free(ctx, w->ptr, stream) || !w->ptr) return;
    if (w->async) {
        st->api->hipFreeAsync(w->ptr, stream);
    } else {
        st->api->hipStreamSynchronize(stream);
        st->api->hipFree(w->ptr);
    }
}

/* The CUDA backward's steps (cuda_backend.c) on the shared host layer:
 * preprocess (delta, dQ accumulator cleared), the main kernel per (batch,
 * kv head, kv tile), the dQ store, on the caller's stream. The
 * deterministic mode's dQ kernel (flex_backward_dq.cuh) is not built for
 * AMD: a deterministic call that wants dq or buffer gradients is refused by
 * name; one that wants only dk and dv is deterministic as it is (each of
 * their rows has one owner). */
static flex_status hip_backward(flex_context *ctx, const flex_backward_args *a) {
    hip_state *st = state_of(ctx);
    const flex_tensor *q = &a->q, *k = &a->k, *v = &a->v;
    const int64_t B = q->sizes[0], D = q->sizes[3];
    const int64_t Hkv = k->sizes[1], Dv = v->sizes[3];
    const struct flex_block_mask *mask = a->block_mask;
    const struct flex_mod *mask_mod;
    flex_status s = flex_gpu_bwd_check(ctx, &st->gpu, a);
    if (!s) s = flex_gpu_mask_mod(ctx, mask, &mask_mod);
    if (s) return s;
    const int q_block = mask ? mask->q_block : 128, kv_block = mask ? mask->kv_block : 128;
    if (a->deterministic && a->dq)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the HIP backward has no deterministic dq (opts->deterministic; it sums "
                         "dq with atomics): leave opts->deterministic 0 for it, pass dq NULL, or "
                         "run the backward on the CPU or CUDA backend");

    /* The score mod and its derivative (the shared layer checks the buffer
     * gradients asked for). */
    flex_gpu_bwd_mods m;
    s = flex_gpu_bwd_mods_prepare(ctx, &st->gpu, a, mask_mod, &m);
    if (s) return s;

    flex_cuda_bwd_config cfg;
    flex_gpu_bwd_config(&cfg, a);
    if (q->dtype != FLEX_F32)
        choose_hip_backward_tiles(&cfg, q_block, kv_block, B * Hkv, st->arch.lds_bytes);
    const size_t smem = q->dtype == FLEX_F32 ? 0 : flex_gpu_bwd_smem(&cfg);
    if ((int64_t)smem > st->arch.lds_bytes) {
        flex_gpu_bwd_mods_free(&m);
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the backward for head dims %lld/%lld needs %zu bytes of LDS; %s allows "
                         "%d",
                         (long long)D, (long long)Dv, smem, st->arch.name, st->arch.lds_bytes);
    }

    pthread_mutex_lock(&st->gpu.lock);
    s = flex_gpu_enter(ctx, &st->gpu);
    flex_gpu_bwd_kernels kernels;
    if (!s)
        s = flex_gpu_bwd_kernels_get(ctx, &st->gpu, a, &cfg, &m, flex_hip_backward_source,
                                     &kernels);
    flex_gpu_bwd_mods_free(&m);
    flex_gpu_mask_copy *mc = NULL;
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    if (!s) s = flex_gpu_bind_mods(ctx, &st->gpu, mask, m.mask_mod, m.score_used, &mc, descs);

    hipStream_t stream = (hipStream_t)a->stream;
    hip_workspace ws = {NULL, 0};
    size_t delta_bytes, dq_bytes;
    flex_gpu_bwd_workspace(a, &cfg, &delta_bytes, &dq_bytes);
    if (!s) s = workspace_alloc(ctx, st, delta_bytes + dq_bytes, stream, &ws);
    if (!s)
        s = flex_gpu_bwd_launch(ctx, &st->gpu, a, &cfg, &m, mc, &kernels, descs,
                                (flex_gpu_ptr)(uintptr_t)ws.ptr, smem, 0, stream, NULL);
    workspace_free(ctx, st, &ws, stream);
    pthread_mutex_unlock(&st->gpu.lock);
    return s;
}

const flex_backend_iface flex_backend_hip = {
    .abi_version = FLEX_BACKEND_ABI_VERSION,
    .name = "hip",
    .device_type = FLEX_DEVICE_HIP,
    .score = hip_score,
    .init = hip_init,
    .release = hip_release,
    .device_name = hip_device_name,
    .forward = hip_forward,
    .backward = hip_backward,
    FLEX_GPU_BACKEND_SLOTS,
};
