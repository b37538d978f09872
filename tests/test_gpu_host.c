/*
 * The GPU host layer (backends/gpu/gpu_host.h) without a GPU: a fake vendor
 * whose "device" memory is host memory and whose compiler and modules are
 * counters. It shows what the CUDA and HIP backends rely on: a key builds
 * and compiles its source once, a compile or load failure reaches the
 * caller with the vendor's words, host buffers are copied once per
 * binding, a block mask is uploaded once with its rows heaviest first, a
 * set bounds bit names the buffer, the backward's score mod, shared
 * memory and parameter block are made as both backends launch them, the
 * parameter blocks hold each value at the offset of the definition the
 * kernels share (flex_gpu_params.h), and
 * while a call is being captured into a graph what it would have to
 * upload, compile or load first is refused by name before the vendor is
 * asked for anything. The launch policy both backends take from it (tile
 * choice, kernel keys, the backward's launches) is checked here too.
 */
#include <check.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "../backends/cuda/cuda_compile.h"
#include "../backends/gpu/gpu_host.h"
#include "../backends/gpu/gpu_partial_bits.h"

static int allocs, frees, builds, compiles, loads, unloads, functions, fail_compile, fail_load,
    fail_alloc, syncs;
/* The launches made, in order. */
static struct {
    void *fn;
    unsigned gx, gy, threads, smem;
    void *second;
} launched[8];
static int num_launched;

static void fake_describe(const void *api, int r, char *buf, size_t cap) {
    (void)api;
    snprintf(buf, cap, "fakeError (%d): the fake device says no", r);
}
static int fake_enter(const void *api, void *c) {
    (void)api;
    (void)c;
    return 0;
}
static void fake_leave(const void *api) {
    (void)api;
}
static int fake_alloc(const void *api, flex_gpu_ptr *p, size_t bytes) {
    (void)api;
    allocs++;
    if (fail_alloc) return 2;
    *p = (flex_gpu_ptr)(uintptr_t)calloc(1, bytes);
    return *p ? 0 : 2;
}
static int fake_free(const void *api, flex_gpu_ptr p) {
    (void)api;
    frees++;
    free((void *)(uintptr_t)p);
    return 0;
}
static int fake_to_device(const void *api, flex_gpu_ptr dst, const void *src, size_t n) {
    (void)api;
    memcpy((void *)(uintptr_t)dst, src, n);
    return 0;
}
static int fake_to_host(const void *api, void *dst, flex_gpu_ptr src, size_t n) {
    (void)api;
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return 0;
}
static int fake_set(const void *api, flex_gpu_ptr dst, unsigned char v, size_t n) {
    (void)api;
    memset((void *)(uintptr_t)dst, v, n);
    return 0;
}
static int fake_load(const void *api, const void *image, size_t size, void **module) {
    (void)api;
    (void)size;
    loads++;
    if (fail_load) return 7;
    *module = strdup(image);
    return 0;
}
static int fake_function(const void *api, void *module, const char *name, void **fn) {
    (void)api;
    (void)name;
    functions++;
    *fn = module;
    return 0;
}
static int fake_unload(const void *api, void *module) {
    (void)api;
    unloads++;
    free(module);
    return 0;
}
static flex_status fake_compile(flex_context *ctx, const void *api, const char *source,
                                const char *name, const char *arch, void **image, size_t *size) {
    (void)api;
    compiles++;
    if (fail_compile)
        return flex_fail(ctx, FLEX_ERR_COMPILE, "fakecc could not compile %s for %s:\nLOG LINE",
                         name, arch);
    *image = strdup(source);
    *size = strlen(source) + 1;
    return FLEX_OK;
}

static int fake_synchronize(const void *api) {
    (void)api;
    syncs++;
    return 0;
}
static flex_status fake_launch(flex_context *ctx, flex_gpu_state *gpu, void *fn, unsigned gx,
                               unsigned gy, unsigned threads, unsigned smem, void *stream,
                               void *blob, size_t size, void *second) {
    (void)ctx, (void)gpu, (void)stream, (void)blob, (void)size;
    if (num_launched < 8) {
        launched[num_launched].fn = fn;
        launched[num_launched].second = second;
        launched[num_launched].gx = gx, launched[num_launched].gy = gy;
        launched[num_launched].threads = threads, launched[num_launched].smem = smem;
    }
    num_launched++;
    return FLEX_OK;
}

static const flex_gpu_ops fake_ops = {
    .vendor = "FAKE",
    .describe = fake_describe,
    .enter = fake_enter,
    .leave = fake_leave,
    .enter_name = "fakeEnter",
    .mem_alloc = fake_alloc,
    .mem_free = fake_free,
    .copy_to_device = fake_to_device,
    .copy_to_host = fake_to_host,
    .mem_set = fake_set,
    .mem_alloc_name = "fakeMalloc",
    .copy_to_device_name = "fakeCopyIn",
    .copy_to_host_name = "fakeCopyOut",
    .mem_set_name = "fakeMemset",
    .module_load = fake_load,
    .module_function = fake_function,
    .module_unload = fake_unload,
    .module_load_name = "fakeModuleLoad",
    .module_function_name = "fakeGetFunction",
    .compile = fake_compile,
    .synchronize = fake_synchronize,
    .synchronize_name = "fakeSync",
    .out_of_memory = 2,
    .launch = fake_launch,
};

static char *build_source(const void *args) {
    builds++;
    return strdup((const char *)args);
}

static flex_gpu_state st;
static struct flex_context fake_ctx;

static void setup(void) {
    allocs = frees = builds = compiles = loads = unloads = functions = fail_compile = fail_load = 0;
    fail_alloc = syncs = num_launched = 0;
    memset(&st, 0, sizeof st);
    flex_gpu_init(&st, &fake_ops, NULL, NULL, FLEX_DEVICE_HIP);
    snprintf(st.arch, sizeof st.arch, "fake1");
    snprintf(st.compiler, sizeof st.compiler, "fakecc1.2");
    st.cache = flex_cache_open(NULL, "fake");
    memset(&fake_ctx, 0, sizeof fake_ctx);
    fake_ctx.backend_state = &st;
    ck_assert_int_eq(flex_gpu_alloc_bounds_flag(NULL, &st), FLEX_OK);
}
static void teardown(void) {
    flex_gpu_release(&st);
    flex_cache_destroy(st.cache);
}

START_TEST(test_module_list_and_errors) {
    void *fn = NULL, *again = NULL;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k1", build_source, "source one", "kern",
                                           &fn),
                     FLEX_OK);
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k1", build_source, "source one", "kern",
                                           &again),
                     FLEX_OK);
    ck_assert_ptr_eq(fn, again);
    ck_assert_int_eq(builds, 1); /* a loaded key builds no source again */
    ck_assert_int_eq(compiles, 1);
    ck_assert_str_eq((const char *)fn, "source one");
    ck_assert_int_eq(flex_gpu_module_function(NULL, &st, "k1", "other", &again), FLEX_OK);
    ck_assert_int_eq(flex_gpu_module_function(NULL, &st, "k9", "other", &again), FLEX_ERR_DEVICE);

    fail_compile = 1;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k2", build_source, "two", "kern2", &fn),
                     FLEX_ERR_COMPILE);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "LOG LINE"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "fake1"));
    fail_compile = 0;
    fail_load = 1;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k3", build_source, "three", "kern3", &fn),
                     FLEX_ERR_DEVICE);
    ck_assert_str_eq(flex_error_message(NULL),
                     "FAKE loading a compiled kernel (fakeModuleLoad) failed: fakeError (7): the "
                     "fake device says no");
    fail_load = 0;
    /* Neither failure left a module behind: both keys build again. */
    const int before = builds;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k2", build_source, "two", "kern2", &fn),
                     FLEX_OK);
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k3", build_source, "three", "kern3", &fn),
                     FLEX_OK);
    ck_assert_int_eq(builds, before + 2);
}
END_TEST

START_TEST(test_buffers_copied_once_per_binding) {
    flex_mod_desc desc = {FLEX_MOD_MASK, "doc[q] == doc[kv]", NULL, 0,
                          (flex_buffer_decl[]){{"doc", FLEX_I32, 1}}, 1};
    flex_mod *mod = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 0, descs), FLEX_ERR_BUFFER_UNBOUND);
    int32_t doc[6] = {0, 0, 1, 1, 1, 2};
    const int64_t n = 6;
    flex_tensor t = flex_tensor_contiguous(doc, FLEX_I32, 1, &n, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, "doc", &t), FLEX_OK);
    const int a0 = allocs;
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 3, descs), FLEX_OK);
    ck_assert_int_eq(allocs, a0 + 1);
    ck_assert_int_eq(descs[3].sizes[0], 6);
    ck_assert_int_eq(descs[3].sizes[1], 1);
    ck_assert_int_eq(memcmp((const void *)(uintptr_t)descs[3].data, doc, sizeof doc), 0);
    ck_assert_str_eq(st.slot_names[3], "doc");
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 3, descs), FLEX_OK);
    ck_assert_int_eq(allocs, a0 + 1); /* the same binding: the same copy */
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, "doc", &t), FLEX_OK);
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 3, descs), FLEX_OK);
    ck_assert_int_eq(allocs, a0 + 2); /* a new binding: a new copy */
    /* Data already on this device is used where it is. */
    mod->views[0].device = FLEX_DEVICE_HIP; /* as a binding of device data leaves it */
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 0, descs), FLEX_OK);
    ck_assert_int_eq(allocs, a0 + 2);
    ck_assert_ptr_eq((void *)(uintptr_t)descs[0].data, doc);
    /* A set bounds bit names the slot's buffer, once. */
    unsigned char blob[256];
    const size_t size = flex_gpu_append_buffers(blob, 8, descs, 1, st.bounds_flag);
    ck_assert_uint_eq(size, 8 + sizeof(flex_gpu_buffer_desc) + 8);
    ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_OK);
    *(uint32_t *)(uintptr_t)st.bounds_flag = 1u << 3;
    ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_ERR_BUFFER_BOUNDS);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "'doc'"));
    ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_OK);
    flex_mod_destroy(mod);
}
END_TEST

/* The forward's score-mod reads: proved over a tile of margin past the
 * ends where that proves them all (no clamp); a buffer sized to the
 * sequence is proved over the sequences only, with the clamp; a read
 * proved neither way stays checked and asks for no clamp. */
START_TEST(test_score_reads_in_range) {
    static const struct {
        const char *text;
        int64_t size;            /* of the 1-D buffer */
        int clamp, proved_reads; /* expected */
    } cases[] = {
        {"score + float(t[h])", 16, 0, 1},            /* heads only: the margin proves it */
        {"score + float(t[q])", 400, 0, 1},           /* room for the margin */
        {"score + float(t[q])", 100, 1, 1},           /* sized to Lq: clamped */
        {"score + float(t[kv]) + float(t[h])", 100, 1, 2},
        {"score + float(t[q + 1])", 100, 0, 0},       /* past the end at q = Lq - 1 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        flex_mod_desc desc = {FLEX_MOD_SCORE, cases[i].text, NULL, 0,
                              (flex_buffer_decl[]){{"t", FLEX_I32, 1}}, 1};
        flex_mod *mod = NULL;
        ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
        int32_t data[400] = {0};
        flex_tensor t = flex_tensor_contiguous(data, FLEX_I32, 1, &cases[i].size,
                                               FLEX_DEVICE_CPU);
        ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, "t", &t), FLEX_OK);
        int clamp = -1;
        unsigned char *flags = flex_gpu_score_reads_in_range(NULL, mod, 2, 16, 100, 100, &clamp);
        int proved = 0;
        for (int n = 0; flags && n < mod->ir.num_nodes; n++)
            proved += mod->ir.nodes[n].op == IR_LOAD && flags[n];
        ck_assert_msg(clamp == cases[i].clamp && proved == cases[i].proved_reads,
                      "%s (size %lld): clamp %d, %d reads proved", cases[i].text,
                      (long long)cases[i].size, clamp, proved);
        free(flags);
        flex_mod_destroy(mod);
    }
}
END_TEST

/* The decode word of the bounds flag names the decode argument, and the
 * buffer slots' word is read beside it; both are cleared by the read. */
START_TEST(test_decode_word_names_the_argument) {
    ck_assert_uint_eq(flex_gpu_decode_flag(&st), st.bounds_flag + 4);
    static const char *const names[] = {"q_offsets", "kv_lengths", "page_table"};
    for (int bit = 0; bit < 3; bit++) {
        *(uint32_t *)(uintptr_t)flex_gpu_decode_flag(&st) = 1u << bit;
        ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_ERR_BUFFER_BOUNDS);
        ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), names[bit]));
        ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_OK);
    }
    /* both words at once: the decode argument is named, both are cleared */
    *(uint32_t *)(uintptr_t)st.bounds_flag = 1u;
    *(uint32_t *)(uintptr_t)flex_gpu_decode_flag(&st) = 4u;
    ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_ERR_BUFFER_BOUNDS);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "page_table"));
    ck_assert_int_eq(flex_gpu_take_bounds_flag(NULL, &st), FLEX_OK);
}
END_TEST

/* The decode split policy: the hint wins (at most one piece per 64-key
 * step), else about two CTAs per SM with at least 4 steps a piece. */
START_TEST(test_decode_split_policy) {
    ck_assert_int_eq(flex_gpu_decode_splits(132, 64, 16384, 0), 5);   /* B8 Hkv8, 16K keys */
    ck_assert_int_eq(flex_gpu_decode_splits(132, 8, 131072, 0), 33);  /* B1 Hkv8, 128K keys */
    ck_assert_int_eq(flex_gpu_decode_splits(132, 1024, 16384, 0), 1); /* the grid is full */
    ck_assert_int_eq(flex_gpu_decode_splits(132, 1, 1000, 0), 4);     /* 16 steps: 4 a piece */
    ck_assert_int_eq(flex_gpu_decode_splits(132, 1, 100, 0), 1);
    ck_assert_int_eq(flex_gpu_decode_splits(132, 1, 1 << 30, 0), 256);
    ck_assert_int_eq(flex_gpu_decode_splits(132, 64, 16384, 3), 3);   /* the hint */
    ck_assert_int_eq(flex_gpu_decode_splits(132, 64, 100, 9), 2);     /* 2 steps */
    ck_assert_int_eq(flex_gpu_decode_splits(132, 64, 0, 0), 1);
}
END_TEST

START_TEST(test_mask_uploaded_once_heaviest_first) {
    /* Causal over 4 x 4 blocks: q-block row 3 has the most blocks. */
    flex_mod_desc desc = {FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0};
    flex_mod *mod = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
    flex_context *cpu = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &cpu), FLEX_OK);
    flex_block_mask *mask = NULL;
    ck_assert_int_eq(flex_block_mask_create(cpu, mod, 1, 1, 64, 64, 16, 16, &mask), FLEX_OK);
    flex_gpu_mask_copy *c = NULL, *again = NULL;
    const int a0 = allocs;
    ck_assert_int_eq(flex_gpu_mask_device_copy(NULL, &st, mask, &c), FLEX_OK);
    ck_assert_int_eq(allocs, a0 + 9); /* four lists of offsets and indices, the order */
    ck_assert_int_eq(flex_gpu_mask_device_copy(NULL, &st, mask, &again), FLEX_OK);
    ck_assert_ptr_eq(c, again);
    ck_assert_int_eq(allocs, a0 + 9);
    const int *order = (const int *)(uintptr_t)c->order;
    ck_assert_int_eq(order[0], 3);
    ck_assert_int_eq(order[1], 2);
    ck_assert_int_eq(order[2], 1);
    ck_assert_int_eq(order[3], 0);
    const int *full_off = (const int *)(uintptr_t)c->full_off;
    ck_assert_int_eq(full_off[4], 6); /* blocks strictly below the diagonal */
    /* The copy goes with the mask, through the context that made it. */
    mask->ctx = &fake_ctx;
    const int f0 = frees;
    flex_block_mask_destroy(mask);
    ck_assert_int_eq(frees, f0 + 9);
    flex_mod_destroy(mod);
    flex_context_destroy(cpu);
}
END_TEST

/* The score mod of a backward: its derivative, the reads whose gradients
 * are wanted, and every way a gradient request can be wrong. */
static flex_status prepare(const flex_mod *score, const char *name, flex_device_type device,
                           int *num_loads, flex_gpu_buffer_desc *grad_descs) {
    float grad[4];
    const int64_t n = 4;
    flex_buffer_grad g = {name, flex_tensor_contiguous(grad, FLEX_F32, 1, &n, device)};
    flex_backward_args a;
    memset(&a, 0, sizeof a);
    a.score_mod = score;
    a.buffer_grads = &g;
    a.num_buffer_grads = name ? 1 : 0;
    ir_mod derived;
    int made = 0;
    mod_derivative der;
    flex_cuda_grad_load reads[MOD_DERIVE_MAX_LOADS];
    const flex_status s = flex_gpu_bwd_score_prepare(&fake_ctx, &st, &a, &derived, &made, &der,
                                                     reads, num_loads, grad_descs);
    if (s == FLEX_OK && name) {
        ck_assert_ptr_eq((void *)(uintptr_t)grad_descs[0].data, grad);
        ck_assert_int_eq(grad_descs[0].sizes[0], 4);
        ck_assert_int_eq(reads[0].grad, 0);
        ck_assert_int_eq(reads[0].ndim, 1);
    }
    if (s == FLEX_OK)
        ck_assert_int_eq(made, score && score->ir.nodes[score->ir.root].op != IR_SCORE);
    if (made) ir_free(&derived);
    return s;
}

START_TEST(test_backward_score_prepare) {
    flex_mod_desc desc = {FLEX_MOD_SCORE, "score + slopes[h] * (kv - q)", NULL,
                          0, (flex_buffer_decl[]){{"slopes", FLEX_F32, 1}, {"unused", FLEX_F32, 1}},
                          2};
    flex_mod *mod = NULL, *identity = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
    flex_mod_desc id_desc = {FLEX_MOD_SCORE, "score", NULL, 0, NULL, 0};
    ck_assert_int_eq(flex_mod_compile(NULL, &id_desc, &identity), FLEX_OK);
    flex_gpu_buffer_desc descs[IR_MAX_BUFFERS];
    int num_loads = -1;
    ck_assert_int_eq(prepare(mod, "slopes", FLEX_DEVICE_HIP, &num_loads, descs), FLEX_OK);
    ck_assert_int_eq(num_loads, 1);
    ck_assert_int_eq(prepare(mod, NULL, FLEX_DEVICE_HIP, &num_loads, descs), FLEX_OK);
    ck_assert_int_eq(num_loads, 0); /* the derivative, no gradient reads */
    ck_assert_int_eq(prepare(identity, NULL, FLEX_DEVICE_HIP, &num_loads, descs), FLEX_OK);
    ck_assert_int_eq(prepare(mod, "nope", FLEX_DEVICE_HIP, &num_loads, descs), FLEX_ERR_MOD_NAME);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&fake_ctx), "'nope'"));
    /* declared, never read */
    ck_assert_int_eq(prepare(mod, "unused", FLEX_DEVICE_HIP, &num_loads, descs),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&fake_ctx), "does not read it"));
    /* the gradient must be on this backend's GPU (the state says HIP) */
    ck_assert_int_eq(prepare(mod, "slopes", FLEX_DEVICE_CUDA, &num_loads, descs),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&fake_ctx), "context's GPU"));
    flex_mod_destroy(mod);
    flex_mod_destroy(identity);
}
END_TEST

/* Values in a parameter blob, read where the kernels read them. */
static uint64_t u64_at(const unsigned char *blob, size_t at) {
    uint64_t v;
    memcpy(&v, blob + at, sizeof v);
    return v;
}
static int32_t i32_at(const unsigned char *blob, size_t at) {
    int32_t v;
    memcpy(&v, blob + at, sizeof v);
    return v;
}
static float f32_at(const unsigned char *blob, size_t at) {
    float v;
    memcpy(&v, blob + at, sizeof v);
    return v;
}

/* The forward's and the decode's parameter blocks hold each value at the
 * offset the shared definition (flex_gpu_params.h) gives it, which is
 * where the kernels' structs, made from the same text, read it: the head,
 * then the mods' buffers and the bounds flag (FLEX_GPU_BUFFERS_*). */
START_TEST(test_parameter_blobs_at_shared_offsets) {
    static uint16_t data[4][2 * 4 * 40 * 64];
    float lse[2 * 4 * 40];
    const int64_t qs[4] = {2, 4, 40, 64}, ks[4] = {2, 2, 40, 64}, ls[3] = {2, 4, 40};
    flex_forward_args a;
    memset(&a, 0, sizeof a);
    a.q = flex_tensor_contiguous(data[0], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.k = flex_tensor_contiguous(data[1], FLEX_BF16, 4, ks, FLEX_DEVICE_HIP);
    a.v = flex_tensor_contiguous(data[2], FLEX_BF16, 4, ks, FLEX_DEVICE_HIP);
    a.out = flex_tensor_contiguous(data[3], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    const flex_tensor lt = flex_tensor_contiguous(lse, FLEX_F32, 3, ls, FLEX_DEVICE_HIP);
    a.lse = &lt;
    a.scale = 0.5f;
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    for (int i = 0; i < 2; i++) {
        descs[i].data = 0xd000 + (uint64_t)i;
        descs[i].sizes[1] = 7 + i;
        descs[i].strides[2] = -3 - i;
    }
    unsigned char blob[FLEX_GPU_DEC_BLOB_BYTES];
    memset(blob, 0xab, sizeof blob);
    flex_gpu_fwd_params p;
    size_t size = flex_gpu_fwd_blob(blob, &p, &a, NULL, NULL, NULL, 32, 64, 16, 4, descs, 2, 0xf1a6);
    ck_assert_uint_eq(size, sizeof(flex_gpu_fwd_params) + FLEX_GPU_BUFFERS_BYTES(2));
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_fwd_params, q)), (uintptr_t)data[0]);
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_fwd_params, v)), (uintptr_t)data[2]);
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_fwd_params, lse)), (uintptr_t)lse);
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_fwd_params, row_order)), 0);
    ck_assert_int_eq((int64_t)u64_at(blob, offsetof(flex_gpu_fwd_params, k_sh)), 40 * 64);
    ck_assert_int_eq((int64_t)u64_at(blob, offsetof(flex_gpu_fwd_params, l_ss)), 1);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_fwd_params, Hkv)), 2);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_fwd_params, Lkv)), 40);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_fwd_params, mask_nk)), 1);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_fwd_params, dense)), 1);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_fwd_params, tiles_per_row)), 2);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_fwd_params, head_group)), 4);
    ck_assert(f32_at(blob, offsetof(flex_gpu_fwd_params, scale)) == 0.5f);
    /* the buffers, then the flag */
    const size_t bufs = sizeof(flex_gpu_fwd_params);
    ck_assert_uint_eq(u64_at(blob, bufs + sizeof(flex_buffer) + offsetof(flex_buffer, data)),
                      0xd001);
    ck_assert_int_eq(i32_at(blob, bufs + sizeof(flex_buffer) + offsetof(flex_buffer, sizes) + 4),
                     8);
    ck_assert_int_eq((int64_t)u64_at(blob, bufs + offsetof(flex_buffer, strides) + 16), -3);
    ck_assert_uint_eq(u64_at(blob, bufs + FLEX_GPU_BUFFERS_FLAG_AT(2)), 0xf1a6);
    /* no buffers: one (empty) descriptor still, as the kernels declare it */
    size = flex_gpu_fwd_blob(blob, &p, &a, NULL, NULL, NULL, 32, 64, 16, 4, descs, 0, 0xf1a6);
    ck_assert_uint_eq(size, bufs + sizeof(flex_buffer) + 8);
    ck_assert_uint_eq(u64_at(blob, bufs + FLEX_GPU_BUFFERS_FLAG_AT(0)), 0xf1a6);

    /* The decode: its head, the forward's block, the buffers. */
    flex_gpu_dec_head hd;
    memset(&hd, 0, sizeof hd);
    hd.kv_lengths = 0x2200;
    hd.decode_flag = 0x6600;
    hd.pt_sp = 9;
    hd.splits = 3;
    hd.rows = 5;
    p.Lkv = 300;
    memset(blob, 0xab, sizeof blob);
    size = flex_gpu_dec_blob(blob, &hd, &p, descs, 1, 0x99);
    ck_assert_uint_eq(size, FLEX_GPU_DEC_FWD_AT + sizeof p + FLEX_GPU_BUFFERS_BYTES(1));
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_dec_head, q_offsets)), 0);
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_dec_head, kv_lengths)), 0x2200);
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_dec_head, decode_flag)), 0x6600);
    ck_assert_int_eq((int64_t)u64_at(blob, offsetof(flex_gpu_dec_head, pt_sp)), 9);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_dec_head, splits)), 3);
    ck_assert_int_eq(i32_at(blob, offsetof(flex_gpu_dec_head, rows)), 5);
    ck_assert_uint_eq(u64_at(blob, FLEX_GPU_DEC_FWD_AT + offsetof(flex_gpu_fwd_params, q)),
                      (uintptr_t)data[0]);
    ck_assert_int_eq(i32_at(blob, FLEX_GPU_DEC_FWD_AT + offsetof(flex_gpu_fwd_params, Lkv)), 300);
    ck_assert_uint_eq(u64_at(blob, FLEX_GPU_DEC_FWD_AT + sizeof p), 0xd000);
    ck_assert_uint_eq(u64_at(blob, size - 8), 0x99);
}
END_TEST

/* The backward's parameter block: the head (struct flex_bwd_params' start),
 * the gradient slots, the forward's block, then the mods' buffers. */
START_TEST(test_backward_blob) {
    static uint16_t data[6][2 * 3 * 40 * 64];
    float lse[2 * 3 * 40];
    const int64_t qs[4] = {2, 3, 40, 64}, ls[3] = {2, 3, 40};
    flex_backward_args a;
    memset(&a, 0, sizeof a);
    a.q = flex_tensor_contiguous(data[0], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.k = flex_tensor_contiguous(data[1], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.v = flex_tensor_contiguous(data[2], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.out = flex_tensor_contiguous(data[3], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.dout = flex_tensor_contiguous(data[4], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.lse = flex_tensor_contiguous(lse, FLEX_F32, 3, ls, FLEX_DEVICE_HIP);
    const flex_tensor dk = flex_tensor_contiguous(data[5], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.dk = &dk;
    a.scale = 0.125f;
    flex_gpu_buffer_desc grads[IR_MAX_BUFFERS], descs[FLEX_EMIT_MAX_SLOTS];
    memset(grads, 0, sizeof grads);
    memset(descs, 0, sizeof descs);
    grads[0].data = 0x1234;
    descs[0].data = 0x5678;
    unsigned char blob[FLEX_GPU_BWD_BLOB_BYTES];
    const size_t size = flex_gpu_bwd_blob(blob, &a, NULL, NULL, NULL, 16, 32, 8, 0x1000, 0, grads,
                                          0, descs, 1, 0x42);
    /* no gradient tensors: one slot still; one buffer and the flag */
    const size_t at_p = FLEX_GPU_BWD_FWD_AT(0);
    ck_assert_uint_eq(at_p, sizeof(flex_gpu_bwd_head) + sizeof(flex_gpu_buffer_desc));
    ck_assert_uint_eq(size, at_p + sizeof(flex_gpu_fwd_params) + FLEX_GPU_BUFFERS_BYTES(1));
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_bwd_head, dk)), (uintptr_t)data[5]);
    ck_assert_uint_eq(u64_at(blob, offsetof(flex_gpu_bwd_head, delta)), 0x1000);
    ck_assert_int_eq((int64_t)u64_at(blob, offsetof(flex_gpu_bwd_head, dk_ss)), 64);
    ck_assert_int_eq(i32_at(blob, at_p + offsetof(flex_gpu_fwd_params, mask_nq)), 3);
    ck_assert(f32_at(blob, at_p + offsetof(flex_gpu_fwd_params, scale)) == 0.125f);
    flex_gpu_bwd_head hd;
    memcpy(&hd, blob, sizeof hd);
    ck_assert_ptr_eq((void *)(uintptr_t)hd.dout, data[4]);
    ck_assert_ptr_eq((void *)(uintptr_t)hd.dk, data[5]);
    ck_assert_uint_eq(hd.dq, 0);
    ck_assert_uint_eq(hd.dv, 0);
    ck_assert_uint_eq(hd.delta, 0x1000);
    ck_assert_uint_eq(hd.dq_acc, 0);
    ck_assert_int_eq(hd.dk_ss, 64);
    ck_assert_int_eq(hd.dq_ss, 0);
    ck_assert_uint_eq(*(const uint64_t *)(blob + sizeof hd), 0x1234);
    flex_gpu_fwd_params p;
    memcpy(&p, blob + at_p, sizeof p);
    ck_assert_ptr_eq((void *)(uintptr_t)p.lse, lse);
    ck_assert_int_eq(p.dense, 1);
    ck_assert_int_eq(p.mask_nq, 3); /* 40 rows in 16-row blocks */
    ck_assert_int_eq(p.mask_nk, 2);
    ck_assert_int_eq(p.tiles_per_row, 1);
    ck_assert_int_eq(p.head_group, 8); /* the grid order's (flex_bwd_tile_of) */
    ck_assert_int_eq(p.l_ss, 1);
    ck_assert(p.scale == 0.125f);
    ck_assert_uint_eq(*(const uint64_t *)(blob + at_p + sizeof p), 0x5678);
    ck_assert_uint_eq(*(const uint64_t *)(blob + size - 8), 0x42);
}
END_TEST

/* The backward's shared memory: K and V of the kv tile, one or two Q/dO
 * stages, dS with at least 64 columns, lse and delta per stage. */
START_TEST(test_backward_smem) {
    flex_cuda_bwd_config c = {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 4, .block_m = 32};
    /* 64 kv rows x 256 dims + 32 query rows x 256 + 64 x 64 dS, 16-bit; 8 B a row */
    ck_assert_uint_eq(flex_gpu_bwd_smem(&c), 2 * (64 * 256 + 32 * 256 + 64 * 64) + 8 * 32);
    c.pipeline = 1;
    ck_assert_uint_eq(flex_gpu_bwd_smem(&c), 2 * (64 * 256 + 2 * 32 * 256 + 64 * 64) + 16 * 32);
    c.warps = 8;
    c.block_m = 128; /* dS as wide as the step */
    c.dq = c.dv = 64;
    ck_assert_uint_eq(flex_gpu_bwd_smem(&c),
                      2 * (128 * 128 + 2 * 128 * 128 + 128 * 128) + 16 * 128);
    /* the sm_90a kernel: 64-row steps, 128 x 64 dS, 1 KB to align its base */
    c.wgmma = 1;
    c.block_m = 64;
    c.dq = c.dv = 128;
    ck_assert_uint_eq(flex_gpu_bwd_smem(&c),
                      2 * (128 * 256 + 2 * 64 * 256 + 128 * 64) + 16 * 64 + 1024);
    /* with dQ through shared memory: 8 warps x 16 rows of 64 floats + 8
     * of padding; the largest case, head dims 128 with the pipeline, still
     * fits an sm_90 CTA's 227 KB */
    c.dq_bulk = 1;
    ck_assert_uint_eq(flex_gpu_bwd_smem(&c),
                      2 * (128 * 256 + 2 * 64 * 256 + 128 * 64) + 16 * 64 + 1024 + 8 * 16 * 288);
    ck_assert_uint_le(flex_gpu_bwd_smem(&c), 227 * 1024);
    c.wgmma = 0; /* the mma.sync kernel keeps dQ in registers */
    ck_assert_uint_eq(flex_gpu_bwd_smem(&c), 2 * (128 * 256 + 2 * 64 * 256 + 128 * 64) + 16 * 64);
}
END_TEST

/* While st.capturing, a call finds what an earlier call prepared and asks
 * the vendor for nothing; what would need a first compile, module load,
 * buffer copy or mask upload is refused with FLEX_ERR_UNSUPPORTED, naming
 * it, and nothing is allocated, copied or loaded. */
/* What a GPU backward refuses first, named for the vendor: head dims above
 * 256, sequences past one launch, and buffer gradients in deterministic
 * mode. */
START_TEST(test_backward_refusals) {
    static uint16_t data[1];
    float lse[1];
    int64_t qs[4] = {1, 2, 100, 64}, ls[3] = {1, 2, 100};
    flex_backward_args a;
    memset(&a, 0, sizeof a);
    a.q = flex_tensor_contiguous(data, FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.k = a.v = a.out = a.dout = a.q;
    a.lse = flex_tensor_contiguous(lse, FLEX_F32, 3, ls, FLEX_DEVICE_HIP);
    ck_assert_int_eq(flex_gpu_bwd_check(&fake_ctx, &st, &a), FLEX_OK);
    a.v.sizes[3] = 320;
    ck_assert_int_eq(flex_gpu_bwd_check(&fake_ctx, &st, &a), FLEX_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(flex_error_message(&fake_ctx),
                         "the FAKE backward supports head dims up to 256 (q has 64, v has 320)"),
                  "%s", flex_error_message(&fake_ctx));
    a.v.sizes[3] = 64;
    a.k.sizes[2] = 4 * 65535 + 1;
    ck_assert_int_eq(flex_gpu_bwd_check(&fake_ctx, &st, &a), FLEX_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&fake_ctx), "sequences too long"));
    a.k.sizes[2] = 100;
    const flex_buffer_grad g = {"bias", a.lse};
    a.buffer_grads = &g;
    a.num_buffer_grads = 1;
    ck_assert_int_eq(flex_gpu_bwd_check(&fake_ctx, &st, &a), FLEX_OK);
    a.deterministic = 1;
    ck_assert_int_eq(flex_gpu_bwd_check(&fake_ctx, &st, &a), FLEX_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(flex_error_message(&fake_ctx),
                         "the deterministic FAKE backward (opts->deterministic) has no gradients "
                         "of buffers, and one was asked for buffer 'bias'"),
                  "%s", flex_error_message(&fake_ctx));
}
END_TEST

/* The caller's allocator, when the context has one, gives and takes the
 * work space; without one the backend allocates; nothing given is
 * FLEX_ERR_OUT_OF_MEMORY. */
static int caller_allocs, caller_frees;
static void *caller_stream_seen;
static size_t caller_bytes_seen;
static _Alignas(256) char caller_pool[512];
static size_t caller_offset; /* where in the pool the allocator's memory starts */
static void *caller_alloc(void *user, size_t bytes, void *stream) {
    caller_stream_seen = stream;
    caller_bytes_seen = bytes;
    if (bytes > 256 || !user) return NULL;
    caller_allocs++;
    return caller_pool + caller_offset;
}
static void caller_free(void *user, void *ptr, void *stream) {
    (void)user;
    ck_assert_ptr_eq(ptr, caller_pool + caller_offset);
    ck_assert_ptr_eq(stream, caller_stream_seen);
    caller_frees++;
}

START_TEST(test_caller_workspace) {
    void *p = (void *)1, *stream = (void *)0x5;
    flex_status s = FLEX_ERR_DEVICE;
    const int vendor_allocs = allocs;
    ck_assert_int_eq(flex_gpu_caller_alloc(&fake_ctx, 64, stream, &p, &s), 0);
    ck_assert_int_eq(flex_gpu_caller_free(&fake_ctx, caller_pool, stream), 0);
    fake_ctx.allocator = (flex_device_allocator){caller_alloc, caller_free, &st};
    ck_assert_int_eq(flex_gpu_caller_alloc(&fake_ctx, 64, stream, &p, &s), 1);
    ck_assert_int_eq(s, FLEX_OK);
    ck_assert_ptr_eq(p, caller_pool);
    ck_assert_uint_eq(caller_bytes_seen, 64);
    ck_assert_ptr_eq(caller_stream_seen, stream);
    ck_assert_int_eq(flex_gpu_caller_free(&fake_ctx, p, stream), 1);
    ck_assert_int_eq(caller_allocs, 1);
    ck_assert_int_eq(caller_frees, 1);
    /* nothing asked, nothing given or taken back */
    ck_assert_int_eq(flex_gpu_caller_alloc(&fake_ctx, 0, stream, &p, &s), 1);
    ck_assert_ptr_null(p);
    ck_assert_int_eq(flex_gpu_caller_free(&fake_ctx, p, stream), 1);
    ck_assert_int_eq(caller_allocs + caller_frees, 2);
    /* refused */
    ck_assert_int_eq(flex_gpu_caller_alloc(&fake_ctx, 4096, stream, &p, &s), 1);
    ck_assert_int_eq(s, FLEX_ERR_OUT_OF_MEMORY);
    ck_assert_ptr_null(p);
    /* memory not aligned to 256 bytes is given back and refused by name */
    caller_offset = 16;
    ck_assert_int_eq(flex_gpu_caller_alloc(&fake_ctx, 64, stream, &p, &s), 1);
    ck_assert_int_eq(s, FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(p);
    ck_assert_int_eq(caller_allocs, 2);
    ck_assert_int_eq(caller_frees, 2);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&fake_ctx), "not aligned to 256 bytes"));
    caller_offset = 0;
    ck_assert_int_eq(allocs, vendor_allocs); /* the vendor's allocator was never asked */
    memset(&fake_ctx.allocator, 0, sizeof fake_ctx.allocator);
}
END_TEST

START_TEST(test_capture_refuses_first_uploads) {
    void *fn = NULL, *other = NULL, *again = NULL;
    st.capturing = 1;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k1", build_source, "one", "kern", &fn),
                     FLEX_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "compiling and loading a kernel"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "captured into a graph"));
    ck_assert_int_eq(builds + compiles + loads, 0);
    st.capturing = 0;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k1", build_source, "one", "kern", &fn),
                     FLEX_OK);
    ck_assert_int_eq(flex_gpu_module_function(NULL, &st, "k1", "other", &other), FLEX_OK);
    const int f0 = functions, l0 = loads;
    st.capturing = 1;
    ck_assert_int_eq(flex_gpu_get_function(NULL, &st, "k1", build_source, "one", "kern", &again),
                     FLEX_OK);
    ck_assert_ptr_eq(again, fn);
    ck_assert_int_eq(flex_gpu_module_function(NULL, &st, "k1", "other", &again), FLEX_OK);
    ck_assert_ptr_eq(again, other);
    ck_assert_int_eq(functions, f0); /* found without asking the vendor again */
    ck_assert_int_eq(loads, l0);

    /* a host-resident buffer */
    flex_mod_desc desc = {FLEX_MOD_MASK, "doc[q] == doc[kv]", NULL, 0,
                          (flex_buffer_decl[]){{"doc", FLEX_I32, 1}}, 1};
    flex_mod *mod = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
    int32_t doc[4] = {0, 0, 1, 1};
    const int64_t n = 4;
    flex_tensor t = flex_tensor_contiguous(doc, FLEX_I32, 1, &n, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, "doc", &t), FLEX_OK);
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    const int a0 = allocs;
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 0, descs), FLEX_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "mod buffer 'doc'"));
    ck_assert_int_eq(allocs, a0);
    st.capturing = 0;
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 0, descs), FLEX_OK);
    st.capturing = 1;
    ck_assert_int_eq(flex_gpu_fill_buffers(NULL, &st, mod, 0, descs), FLEX_OK);
    ck_assert_int_eq(allocs, a0 + 1);

    /* a block mask's lists */
    flex_context *cpu = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &cpu), FLEX_OK);
    flex_block_mask *mask = NULL;
    ck_assert_int_eq(flex_block_mask_create(cpu, mod, 1, 1, 4, 4, 16, 16, &mask), FLEX_OK);
    flex_gpu_mask_copy *c = NULL;
    ck_assert_int_eq(flex_gpu_mask_device_copy(NULL, &st, mask, &c), FLEX_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "block mask's lists"));
    ck_assert_int_eq(allocs, a0 + 1);
    st.capturing = 0;
    ck_assert_int_eq(flex_gpu_mask_device_copy(NULL, &st, mask, &c), FLEX_OK);
    st.capturing = 1;
    flex_gpu_mask_copy *same = NULL;
    ck_assert_int_eq(flex_gpu_mask_device_copy(NULL, &st, mask, &same), FLEX_OK);
    ck_assert_ptr_eq(same, c);
    st.capturing = 0;
    mask->ctx = &fake_ctx;
    flex_block_mask_destroy(mask);
    flex_mod_destroy(mod);
    flex_context_destroy(cpu);
}
END_TEST


/* Every (b, h) of a call of B x Hq heads finds, for every partial entry
 * of the row its walk reads, a bit block of the same q-block and kv-block
 * evaluated at its own b and h where the mod reads them (0 where not); so
 * does the backward's walk of every kv-block column. */
/* w, a table's word offset, names a bit block of q-block i and kv-block j
 * evaluated at b and h (0 where the mod does not read them). */
static void check_bit_block(const flex_gpu_bits_plan *plan, int32_t w, int64_t b, int64_t h,
                            int64_t i, int64_t j) {
    ck_assert_int_eq(w % plan->block_words, 0);
    const int64_t slot = w / plan->block_words;
    ck_assert_int_lt(slot, plan->num_blocks);
    const int32_t *blk = plan->blocks + 4 * slot;
    ck_assert_int_eq(blk[0], b);
    ck_assert_int_eq(blk[1], h);
    ck_assert_int_eq(blk[2], i);
    ck_assert_int_eq(blk[3], j);
}

static void check_plan_maps(const flex_block_mask *mask, int reads_b, int reads_h, int64_t B,
                            int64_t Hq, const flex_gpu_bits_plan *plan) {
    const int64_t nq = mask->num_q_blocks;
    const int32_t *off = mask->kv_partial.offsets, *idx = mask->kv_partial.indices;
    ck_assert_int_eq(plan->entries, mask->num_partial);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++) {
            const int64_t mb = mask->B > 1 ? b : 0, mh = mask->H > 1 ? h : 0;
            const int64_t plane = (plan->planes_b > 1 ? b : 0) * plan->planes_h +
                                  (plan->planes_h > 1 ? h : 0);
            for (int64_t i = 0; i < nq; i++) {
                const int64_t r = (mb * mask->H + mh) * nq + i;
                for (int64_t e = off[r]; e < off[r + 1]; e++)
                    check_bit_block(plan, plan->entry_words[plane * plan->entries + e],
                                    reads_b ? b : 0, reads_h ? h : 0, i, idx[e]);
            }
            /* the backward's table, by its q-major walk over kv blocks */
            const int64_t nk = mask->num_kv_blocks;
            const int32_t *qoff = mask->q_partial.offsets, *qidx = mask->q_partial.indices;
            for (int64_t j = 0; j < nk; j++) {
                const int64_t col = (mb * mask->H + mh) * nk + j;
                for (int64_t e = qoff[col]; e < qoff[col + 1]; e++)
                    check_bit_block(plan, plan->q_entry_words[plane * plan->entries + e],
                                    reads_b ? b : 0, reads_h ? h : 0, qidx[e], j);
            }
        }
}

/* The plan of the partial blocks' bit masks: one bit block per distinct
 * (b, h the mod reads, q-block, kv-block), however the mask stores its
 * lists; bit planes where a broadcast mask's mod reads h; the budget. */
START_TEST(test_partial_bits_plan) {
    flex_context *cpu = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &cpu), FLEX_OK);
    flex_mod_desc strided = {FLEX_MOD_MASK, "q >= kv && (q - kv) % 3 == 0", NULL, 0, NULL, 0};
    flex_mod_desc per_head = {FLEX_MOD_MASK, "q >= kv && (q - kv) % (h + 2) == 0", NULL, 0, NULL,
                              0};
    flex_mod *m_strided = NULL, *m_head = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &strided, &m_strided), FLEX_OK);
    ck_assert_int_eq(flex_mod_compile(NULL, &per_head, &m_head), FLEX_OK);
    flex_gpu_bits_plan plan;

    /* A copy of the lists per (b, h), a mod that reads neither: the blocks
     * of one grid, shared by all six. 100 x 90 in 16 x 32 blocks. */
    flex_block_mask *copies = NULL;
    ck_assert_int_eq(flex_block_mask_create(cpu, m_strided, 2, 3, 100, 90, 16, 32, &copies),
                     FLEX_OK);
    ck_assert_int_eq(copies->B * copies->H, 6);
    ck_assert_int_eq(flex_gpu_bits_plan_make(copies, 0, 0, 2, 3, (size_t)1 << 30, &plan), 0);
    ck_assert_int_eq(plan.planes_b * plan.planes_h, 1);
    ck_assert_int_eq(plan.row_words, 1);
    ck_assert_int_eq(plan.block_words, 16);
    ck_assert_int_eq(plan.num_blocks, copies->num_partial / 6);
    check_plan_maps(copies, 0, 0, 2, 3, &plan);
    /* the bits and their tables: a budget a byte short of them is refused */
    const size_t bytes = flex_gpu_bits_plan_bytes(&plan);
    flex_gpu_bits_plan_free(&plan);
    ck_assert_int_eq(flex_gpu_bits_plan_make(copies, 0, 0, 2, 3, bytes, &plan), 0);
    flex_gpu_bits_plan_free(&plan);
    ck_assert_int_eq(flex_gpu_bits_plan_make(copies, 0, 0, 2, 3, bytes - 1, &plan), 1);

    /* A broadcast mask whose mod reads h: a plane per head. */
    flex_block_mask *broadcast = NULL;
    ck_assert_int_eq(flex_block_mask_create(cpu, m_head, 1, 1, 100, 90, 16, 32, &broadcast),
                     FLEX_OK);
    ck_assert_int_eq(flex_gpu_bits_plan_make(broadcast, 0, 1, 2, 3, (size_t)1 << 30, &plan), 0);
    ck_assert_int_eq(plan.planes_b, 1);
    ck_assert_int_eq(plan.planes_h, 3);
    ck_assert_int_eq(plan.num_blocks, 3 * broadcast->num_partial);
    check_plan_maps(broadcast, 0, 1, 2, 3, &plan);
    flex_gpu_bits_plan_free(&plan);

    /* The same mod with the lists per head: each head its own blocks,
     * shared by the batches. */
    flex_block_mask *heads = NULL;
    ck_assert_int_eq(flex_block_mask_create(cpu, m_head, 1, 3, 100, 90, 16, 32, &heads), FLEX_OK);
    ck_assert_int_eq(flex_gpu_bits_plan_make(heads, 0, 1, 2, 3, (size_t)1 << 30, &plan), 0);
    ck_assert_int_eq(plan.planes_b * plan.planes_h, 1);
    ck_assert_int_eq(plan.num_blocks, heads->num_partial);
    check_plan_maps(heads, 0, 1, 2, 3, &plan);
    flex_gpu_bits_plan_free(&plan);

    /* Explicit lists that differ per batch (2 q-blocks of 3 kv-blocks, all
     * partial where listed) under a mod that reads neither: a block listed
     * for both batches is one bit block. 128-key blocks: 4 words a row. */
    const int32_t num[4] = {2, 1, 2, 2};
    const int32_t lists[12] = {0, 2, 0, 1, 0, 0, 1, 2, 0, 0, 1, 0};
    flex_block_mask *custom = NULL;
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(cpu, m_strided, 2, 1, 40, 300, 32, 128, num,
                                                    lists, NULL, NULL, &custom),
                     FLEX_OK);
    ck_assert_int_eq(flex_gpu_bits_plan_make(custom, 0, 0, 2, 1, (size_t)1 << 30, &plan), 0);
    ck_assert_int_eq(plan.row_words, 4);
    /* row 0: {0, 2} and {1, 2}; row 1: {1} and {0, 1} */
    ck_assert_int_eq(plan.num_blocks, 3 + 2);
    check_plan_maps(custom, 0, 0, 2, 1, &plan);
    flex_gpu_bits_plan_free(&plan);

    flex_block_mask_destroy(copies);
    flex_block_mask_destroy(broadcast);
    flex_block_mask_destroy(heads);
    flex_block_mask_destroy(custom);
    flex_mod_destroy(m_strided);
    flex_mod_destroy(m_head);
    flex_context_destroy(cpu);
}
END_TEST

/* Which mask mods the backward evaluates rather than read bits: a few
 * integer operations on the indices; not a buffer read, a division, a
 * modulo, float arithmetic or a long expression. */
START_TEST(test_mask_mod_cheap) {
    static const struct {
        const char *text;
        int cheap;
    } cases[] = {
        {"q >= kv", 1},
        {"q >= kv && q - kv < 1024", 1},
        {"abs(q - kv) <= 64 || kv < 4", 1},
        {"q >= kv && (q - kv) % 4 == 0", 0},
        {"q / 64 == kv / 64", 0},
        {"(q - kv) * 0.5 < 3.0", 0},
        {"keep[kv] && q >= kv", 0},
        /* cheap operations, but more of them than reading the bits costs */
        {"(q >= kv && q - kv < 10) || (q >= kv + 20 && q - kv < 30) || (q >= kv + 40 && q - kv < "
         "50) || (q >= kv + 60 && q - kv < 70)",
         0},
    };
    const flex_buffer_decl keep = {"keep", FLEX_BOOL, 1};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int reads = strstr(cases[i].text, "keep[") != NULL;
        const flex_mod_desc d = {FLEX_MOD_MASK, cases[i].text, NULL, 0, &keep, reads};
        flex_mod *m = NULL;
        ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_OK);
        ck_assert_msg(flex_gpu_mask_mod_cheap(&m->ir) == cases[i].cheap, "%s", cases[i].text);
        flex_mod_destroy(m);
    }
}
END_TEST

/* The bit masks on the device: planned and uploaded at a first use, made
 * once by one launch and a wait, found again by later calls, refused by
 * name during a capture until made, replaced when the mod is bound anew,
 * freed with the mask. */
START_TEST(test_partial_bits_device) {
    flex_context *cpu = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &cpu), FLEX_OK);
    flex_mod_desc desc = {FLEX_MOD_MASK, "q >= kv && keep[kv]", NULL, 0,
                          (flex_buffer_decl[]){{"keep", FLEX_BOOL, 1}}, 1};
    flex_mod *mod = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
    uint8_t keep[64];
    for (int i = 0; i < 64; i++)
        keep[i] = i % 5 != 0;
    const int64_t n = 64;
    flex_tensor t = flex_tensor_contiguous(keep, FLEX_BOOL, 1, &n, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, "keep", &t), FLEX_OK);
    flex_block_mask *mask = NULL;
    ck_assert_int_eq(flex_block_mask_create(cpu, mod, 1, 1, 64, 64, 16, 16, &mask), FLEX_OK);
    ck_assert_int_gt(mask->num_partial, 0);
    flex_gpu_mask_copy *mc = NULL;
    ck_assert_int_eq(flex_gpu_mask_device_copy(NULL, &st, mask, &mc), FLEX_OK);

    flex_gpu_partial_bits *pb = NULL;
    st.capturing = 1;
    ck_assert_int_eq(flex_gpu_partial_bits_prepare(NULL, &st, mask, mc, 2, 4, &pb),
                     FLEX_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "partial blocks"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "captured into a graph"));
    st.capturing = 0;
    const int a0 = allocs;
    ck_assert_int_eq(flex_gpu_partial_bits_prepare(NULL, &st, mask, mc, 2, 4, &pb), FLEX_OK);
    ck_assert_ptr_nonnull(pb);
    ck_assert_int_eq(pb->usable, 1);
    ck_assert_int_eq(pb->made, 0);
    ck_assert_int_eq(allocs, a0 + 1);
    ck_assert_int_eq(pb->num_blocks, mask->num_partial);
    /* the bounds word starts at 0; the tables are uploaded */
    ck_assert_uint_eq(*(const uint32_t *)(uintptr_t)pb->oob, 0);
    const int32_t *blocks = (const int32_t *)(uintptr_t)pb->blocks;
    ck_assert_int_eq(blocks[2], 0); /* the first partial block is on the first row */

    st.capturing = 1;
    ck_assert_int_eq(flex_gpu_partial_bits_make(NULL, &st, mask, pb, (void *)0x77, NULL, 0, NULL),
                     FLEX_ERR_UNSUPPORTED);
    st.capturing = 0;
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    const int s0 = syncs;
    ck_assert_int_eq(flex_gpu_partial_bits_make(NULL, &st, mask, pb, (void *)0x77, descs, 1, NULL),
                     FLEX_OK);
    ck_assert_int_eq(num_launched, 1);
    ck_assert_ptr_eq(launched[0].fn, (void *)0x77);
    ck_assert_uint_eq(launched[0].gx, (unsigned)mask->num_partial);
    ck_assert_uint_eq(launched[0].threads, 256);
    ck_assert_int_eq(syncs, s0 + 1);
    ck_assert_int_eq(pb->made, 1);
    ck_assert_int_eq(atomic_load(&st.bounds_pending), 1);
    ck_assert_int_eq(flex_gpu_partial_bits_make(NULL, &st, mask, pb, (void *)0x77, descs, 1, NULL),
                     FLEX_OK);
    ck_assert_int_eq(num_launched, 1);

    /* found again, also during a capture */
    flex_gpu_partial_bits *again = NULL;
    st.capturing = 1;
    ck_assert_int_eq(flex_gpu_partial_bits_prepare(NULL, &st, mask, mc, 2, 4, &again), FLEX_OK);
    ck_assert_ptr_eq(again, pb);
    st.capturing = 0;
    ck_assert_int_eq(allocs, a0 + 1);

    flex_gpu_fwd_params p;
    memset(&p, 0, sizeof p);
    flex_gpu_fwd_params_set_bits(&p, pb);
    ck_assert_uint_eq(p.bits_oob, pb->oob);
    ck_assert_uint_eq(p.bit_words, pb->entry_words);
    ck_assert_uint_eq(p.bits, pb->bits);
    ck_assert_uint_eq(p.bits % 16, 0);
    ck_assert_int_eq(p.bit_planes_b * p.bit_planes_h, 1);
    ck_assert_int_eq(p.bit_row_words, 1);
    ck_assert_int_eq(p.bit_entries, mask->num_partial);

    /* a new binding: new bits, the old ones freed after a wait */
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, "keep", &t), FLEX_OK);
    const int f0 = frees, s1 = syncs;
    ck_assert_int_eq(flex_gpu_partial_bits_prepare(NULL, &st, mask, mc, 2, 4, &again), FLEX_OK);
    ck_assert_ptr_nonnull(again);
    ck_assert_int_eq(again->made, 0);
    ck_assert_int_eq(frees, f0 + 1);
    ck_assert_int_eq(syncs, s1 + 1);
    ck_assert_int_eq(allocs, a0 + 2);

    /* freed with the mask's copy: its nine lists and the bits */
    mask->ctx = &fake_ctx;
    const int f1 = frees;
    flex_block_mask_destroy(mask);
    ck_assert_int_eq(frees, f1 + 10);
    flex_mod_destroy(mod);
    flex_context_destroy(cpu);
}
END_TEST

/* The backend table's memory slots and synchronize: the vendor's
 * out-of-memory result is FLEX_ERR_OUT_OF_MEMORY, other failures name the
 * call; synchronize reads the bounds flag only after buffer reads. */
START_TEST(test_memory_slots) {
    void *p = NULL;
    ck_assert_int_eq(flex_gpu_mem_alloc(&fake_ctx, 16, &p), FLEX_OK);
    const unsigned char in[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    unsigned char out[16];
    ck_assert_int_eq(flex_gpu_upload(&fake_ctx, p, in, 16), FLEX_OK);
    ck_assert_int_eq(flex_gpu_memset(&fake_ctx, p, 7, 4), FLEX_OK);
    ck_assert_int_eq(flex_gpu_download(&fake_ctx, out, p, 16), FLEX_OK);
    ck_assert_int_eq(out[3], 7);
    ck_assert_int_eq(out[4], 5);
    const int f0 = frees;
    flex_gpu_mem_free(&fake_ctx, p);
    flex_gpu_mem_free(&fake_ctx, NULL);
    ck_assert_int_eq(frees, f0 + 1);
    fail_alloc = 1;
    ck_assert_int_eq(flex_gpu_mem_alloc(&fake_ctx, 1000, &p), FLEX_ERR_OUT_OF_MEMORY);
    ck_assert_str_eq(flex_error_message(&fake_ctx), "the GPU has no room for 1000 bytes");
    fail_alloc = 0;
    ck_assert_int_eq(flex_gpu_synchronize(&fake_ctx), FLEX_OK);
    ck_assert_int_eq(syncs, 1);
    *(uint32_t *)(uintptr_t)st.bounds_flag = 1u; /* not read: nothing was pending */
    ck_assert_int_eq(flex_gpu_synchronize(&fake_ctx), FLEX_OK);
    atomic_store(&st.bounds_pending, 1);
    ck_assert_int_eq(flex_gpu_synchronize(&fake_ctx), FLEX_ERR_BUFFER_BOUNDS);
    ck_assert_int_eq(flex_gpu_synchronize(&fake_ctx), FLEX_OK); /* read and cleared */
}
END_TEST

/* One m-tile per warp (the forward's fallback, HIP's forward, the dQ
 * kernel): warps up to the q block and the cap, kv steps of 64 (32 wide). */
START_TEST(test_row_tiles) {
    int w = 0, n = 0;
    flex_gpu_row_tiles(128, 128, 0, 8, &w, &n);
    ck_assert_int_eq(w, 8);
    ck_assert_int_eq(n, 64);
    flex_gpu_row_tiles(128, 128, 1, 4, &w, &n);
    ck_assert_int_eq(w, 4);
    ck_assert_int_eq(n, 32);
    flex_gpu_row_tiles(32, 16, 0, 4, &w, &n);
    ck_assert_int_eq(w, 2);
    ck_assert_int_eq(n, 16);
}
END_TEST

/* The CUDA forward's kernel and tiles: the wgmma kernel on sm_90a for
 * aligned rows and 128-row query blocks, 128-key steps up to head dim 128
 * where the kv blocks allow, 64-key steps above and for kv blocks of 64;
 * the mma.sync kernel otherwise; the debug overrides; and how many Q tiles
 * the TMA kernel keeps. */
START_TEST(test_forward_tiles) {
    static const struct {
        int dq, dv, vec, q_block, kv_block, hopper;
        int wgmma, warps, mt, block_n; /* expected */
    } cases[] = {
        {128, 128, 1, 128, 128, 1, 1, 8, 1, 128},
        {64, 64, 1, 128, 128, 1, 1, 8, 1, 128},
        {256, 256, 1, 128, 128, 1, 1, 8, 1, 64},
        {192, 256, 1, 256, 128, 1, 1, 8, 1, 64},
        {256, 64, 1, 128, 128, 1, 1, 8, 1, 64},
        {128, 128, 1, 128, 64, 1, 1, 8, 1, 64},  /* kv blocks of 64 */
        {128, 128, 1, 64, 64, 1, 0, 4, 1, 64},   /* query blocks of 64 */
        {128, 128, 0, 128, 128, 1, 0, 4, 2, 64}, /* unaligned rows */
        {128, 128, 1, 128, 128, 0, 0, 4, 2, 64}, /* before Hopper */
        {256, 256, 1, 128, 128, 0, 0, 4, 1, 32},
        {128, 128, 1, 128, 32, 1, 0, 8, 1, 32},  /* kv blocks of 32 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        flex_cuda_fwd_config c = {.dtype = FLEX_BF16, .dq = cases[i].dq, .dv = cases[i].dv,
                                  .vec = cases[i].vec};
        flex_gpu_fwd_tiles(NULL, &c, cases[i].q_block, cases[i].kv_block, cases[i].hopper);
        ck_assert_msg(c.wgmma == cases[i].wgmma && c.warps == cases[i].warps &&
                          c.mt == cases[i].mt && c.block_n == cases[i].block_n,
                      "case %zu: wgmma %d, %dx%dx%d", i, c.wgmma, c.warps, c.mt, c.block_n);
    }
    /* Q tiles of the TMA kernel within an sm_90 CTA's 232,448 bytes */
    flex_cuda_fwd_config c = {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .vec = 1};
    flex_gpu_fwd_tiles(NULL, &c, 128, 128, 1);
    flex_gpu_fwd_q_bufs(&c, 232448);
    ck_assert_int_eq(c.q_bufs, 0); /* no TMA */
    c.tma = 1;
    flex_gpu_fwd_q_bufs(&c, 232448);
    ck_assert_int_eq(c.q_bufs, 2);
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 256, .dv = 128, .vec = 1, .tma = 1};
    flex_gpu_fwd_tiles(NULL, &c, 128, 128, 1);
    flex_gpu_fwd_q_bufs(&c, 232448);
    ck_assert_int_eq(c.q_bufs, 2); /* 230,400 bytes */
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 256, .dv = 256, .vec = 1, .tma = 1};
    flex_gpu_fwd_tiles(NULL, &c, 128, 128, 1);
    flex_gpu_fwd_q_bufs(&c, 232448);
    ck_assert_int_eq(c.q_bufs, 1);
    ck_assert_uint_le(flex_gpu_fwd_smem(&c), 232448);
    /* FLEXATTN_DEBUG: cuda_wgmma_step=64, and cuda_tile, which must divide the blocks */
    static const struct {
        const char *debug;
        int wgmma, warps, mt, block_n;
    } overrides[] = {
        {"cuda_wgmma_step=64", 1, 8, 1, 64},
        {"cuda_tile=4x1x32", 0, 4, 1, 32},
        {"cuda_tile=4x1x48", 1, 8, 1, 128}, /* 48 does not divide 128: ignored */
    };
    for (size_t i = 0; i < sizeof overrides / sizeof overrides[0]; i++) {
        setenv("FLEXATTN_DEBUG", overrides[i].debug, 1);
        flex_context *cpu = NULL;
        ck_assert_int_eq(flex_context_create("cpu", &cpu), FLEX_OK);
        unsetenv("FLEXATTN_DEBUG");
        c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 128, .dv = 128, .vec = 1};
        flex_gpu_fwd_tiles(cpu, &c, 128, 128, 1);
        ck_assert_msg(c.wgmma == overrides[i].wgmma && c.warps == overrides[i].warps &&
                          c.mt == overrides[i].mt && c.block_n == overrides[i].block_n,
                      "%s: wgmma %d, %dx%dx%d", overrides[i].debug, c.wgmma, c.warps, c.mt,
                      c.block_n);
        flex_context_destroy(cpu);
    }
}
END_TEST

/* The forward's shared memory, and its tiles shrunk to 64 KB of LDS (the
 * HIP backend's): head dim 128 keeps 4 warps with 32-key steps, 256 takes
 * 16-key steps; what fits is left alone; the CUDA kernels' sizes. */
START_TEST(test_forward_fit) {
    flex_cuda_fwd_config c = {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 4, .mt = 1,
                              .block_n = 64};
    ck_assert_uint_eq(flex_gpu_fwd_smem(&c), 81920);
    flex_gpu_fwd_fit(&c, 65536);
    ck_assert_int_eq(c.warps, 4);
    ck_assert_int_eq(c.block_n, 32);
    ck_assert_uint_eq(flex_gpu_fwd_smem(&c), 49152);
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 256, .dv = 256, .warps = 4, .mt = 1,
                               .block_n = 32};
    flex_gpu_fwd_fit(&c, 65536);
    ck_assert_int_eq(c.warps, 4);
    ck_assert_int_eq(c.block_n, 16);
    ck_assert_uint_le(flex_gpu_fwd_smem(&c), 65536);
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 64, .dv = 64, .warps = 4, .mt = 1,
                               .block_n = 64};
    flex_gpu_fwd_fit(&c, 65536);
    ck_assert_int_eq(c.block_n, 64);
    /* sm_90a TMA kernel: two Q buffers of 128 rows, two stages, 1 KB */
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .mt = 1,
                               .block_n = 128, .wgmma = 1, .tma = 1, .q_bufs = 2};
    ck_assert_uint_eq(flex_gpu_fwd_smem(&c), (2 * 128 * 128 + 2 * 128 * 256) * 2 + 1024);
    /* and two diagonal values: 8 warps' tables of 2 x (128 + 16) floats */
    c.diag_values = 2;
    ck_assert_uint_eq(flex_gpu_fwd_smem(&c),
                      (2 * 128 * 128 + 2 * 128 * 256) * 2 + 1024 + 8 * 2 * 144 * 4);
    /* head dims 256: one Q buffer, 64-key stages */
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 256, .dv = 256, .warps = 8, .mt = 1,
                               .block_n = 64, .wgmma = 1, .tma = 1, .q_bufs = 1};
    ck_assert_uint_eq(flex_gpu_fwd_smem(&c), (128 * 256 + 2 * 64 * 512) * 2 + 1024);
    /* nothing fits: as small as it gets */
    c = (flex_cuda_fwd_config){.dtype = FLEX_BF16, .dq = 256, .dv = 256, .warps = 4, .mt = 1,
                               .block_n = 32};
    flex_gpu_fwd_fit(&c, 1024);
    ck_assert_int_eq(c.block_n, 16);
    ck_assert_int_eq(c.warps, 1);
}
END_TEST

static flex_cuda_bwd_config bwd_tiles(int d, int q_block, int kv_block, int wide_m, int pipeline,
                                      size_t limit, int shrink_m) {
    flex_cuda_bwd_config c = {.dtype = FLEX_BF16, .dq = d, .dv = d};
    flex_gpu_bwd_tiles(&c, q_block, kv_block, wide_m);
    c.pipeline = pipeline;
    flex_gpu_bwd_fit(&c, limit, shrink_m);
    return c;
}

/* The backward's tiles and their fit into shared memory: CUDA's on 99 KB
 * (sm_86) and HIP's on 64 KB of LDS (docs/hip-backend.md gives these). */
START_TEST(test_backward_tiles) {
    /* CUDA, head dim 64: 8 warps of 16 kv rows, 64-row steps, pipelined */
    flex_cuda_bwd_config c = bwd_tiles(64, 128, 128, 16, 1, 101376, 0);
    ck_assert_int_eq(c.warps, 8);
    ck_assert_int_eq(c.block_m, 64);
    ck_assert_int_eq(c.pipeline, 1);
    /* CUDA, head dim 256: 16-row steps; the pipeline goes, the tile stays */
    c = bwd_tiles(256, 128, 128, 16, 1, 101376, 0);
    ck_assert_int_eq(c.warps, 4);
    ck_assert_int_eq(c.block_m, 16);
    ck_assert_int_eq(c.pipeline, 0);
    /* a small limit without shrinking the step: the kv tile goes down to 1 warp */
    c = bwd_tiles(256, 128, 128, 32, 0, 60000, 0);
    ck_assert_int_eq(c.block_m, 32);
    ck_assert_int_eq(c.warps, 1);
    /* HIP: 4 warps and 64-row steps for 64 (8 warps need 66,048 bytes) */
    c = bwd_tiles(64, 128, 128, 32, 0, 65536, 1);
    ck_assert_int_eq(c.warps, 4);
    ck_assert_int_eq(c.block_m, 64);
    ck_assert_uint_eq(flex_gpu_bwd_smem(&(flex_cuda_bwd_config){.dq = 64, .dv = 64, .warps = 8,
                                                                .block_m = 64}),
                      66048);
    c = bwd_tiles(128, 128, 128, 32, 0, 65536, 1);
    ck_assert_int_eq(c.warps, 4);
    ck_assert_int_eq(c.block_m, 32);
    /* 256: the step halves to 16 rows before the kv tile goes below 64 */
    c = bwd_tiles(256, 128, 128, 32, 0, 65536, 1);
    ck_assert_int_eq(c.warps, 2);
    ck_assert_int_eq(c.block_m, 16);
    ck_assert_uint_le(flex_gpu_bwd_smem(&c), 65536);
    /* small mask blocks bound both tiles */
    c = bwd_tiles(64, 32, 32, 16, 0, 101376, 0);
    ck_assert_int_eq(c.warps, 2);
    ck_assert_int_eq(c.block_m, 32);
    /* the shared gradient region follows the tiles: 4 bytes a float, and
     * at its largest beside the sm_90 wgmma kernel's tiles (head dim 128,
     * pipelined) within sm_90's 227 KB */
    ck_assert_uint_eq(flex_gpu_bwd_smem(&(flex_cuda_bwd_config){.dq = 64, .dv = 64, .warps = 8,
                                                                .block_m = 64,
                                                                .grad_smem = 8208}),
                      66048 + 4 * 8208);
    const flex_cuda_bwd_config wg = {.dq = 128, .dv = 128, .warps = 8, .block_m = 64,
                                     .pipeline = 1, .wgmma = 1,
                                     .grad_smem = FLEX_GPU_BWD_GRAD_SMEM_MAX};
    ck_assert_uint_le(flex_gpu_bwd_smem(&wg), 232448);
    /* TMA copies: `tma` stages of Q, dO, lse and delta, a second dS tile
     * and 128 bytes of mbarriers and slots. At head dim 128 the dQ regions
     * leave room for two stages, not three; at 64 three fit beside them,
     * and at 128 two fit beside the largest gradient region once dQ's
     * staging has given way (cuda_backward's order). */
    flex_cuda_bwd_config t = {.dq = 128, .dv = 128, .warps = 8, .block_m = 64, .pipeline = 1,
                              .wgmma = 1, .dq_bulk = 1, .tma = 2};
    ck_assert_uint_eq(flex_gpu_bwd_smem(&t), 2 * (128 * 256 + 2 * 64 * 256 + 2 * 128 * 64) +
                                                 8 * 2 * 64 + 1024 + 8 * 16 * 288 + 128);
    ck_assert_uint_le(flex_gpu_bwd_smem(&t), 232448);
    t.tma = 3;
    ck_assert_uint_gt(flex_gpu_bwd_smem(&t), 232448);
    t.dq_bulk = 0;
    ck_assert_uint_le(flex_gpu_bwd_smem(&t), 232448);
    t.tma = 2;
    t.grad_smem = FLEX_GPU_BWD_GRAD_SMEM_MAX;
    ck_assert_uint_le(flex_gpu_bwd_smem(&t), 232448);
    t = (flex_cuda_bwd_config){.dq = 64, .dv = 64, .warps = 8, .block_m = 64, .pipeline = 1,
                               .wgmma = 1, .dq_bulk = 1, .tma = 3};
    ck_assert_uint_le(flex_gpu_bwd_smem(&t), 232448);
}
END_TEST

/* The shared gradient region's size: every gradient tensor's elements
 * together, 0 past FLEX_GPU_BWD_GRAD_SMEM_MAX or for an empty tensor. */
START_TEST(test_backward_grad_floats) {
    flex_backward_args a;
    memset(&a, 0, sizeof a);
    ck_assert_int_eq(flex_gpu_bwd_grad_floats(&a), 0);
    const int64_t table[2] = {16, 513}, slopes[1] = {16}, big[2] = {24, 513}, empty[1] = {0};
    flex_buffer_grad g[2] = {{"rel", flex_tensor_contiguous(NULL, FLEX_F32, 2, table,
                                                            FLEX_DEVICE_CUDA)},
                             {"slopes", flex_tensor_contiguous(NULL, FLEX_F32, 1, slopes,
                                                               FLEX_DEVICE_CUDA)}};
    a.buffer_grads = g;
    a.num_buffer_grads = 2;
    ck_assert_int_eq(flex_gpu_bwd_grad_floats(&a), 16 * 513 + 16);
    g[0].grad = flex_tensor_contiguous(NULL, FLEX_F32, 2, big, FLEX_DEVICE_CUDA);
    ck_assert_int_eq(flex_gpu_bwd_grad_floats(&a), 0); /* 12328 floats */
    g[0].grad = flex_tensor_contiguous(NULL, FLEX_F32, 1, empty, FLEX_DEVICE_CUDA);
    ck_assert_int_eq(flex_gpu_bwd_grad_floats(&a), 0);
}
END_TEST

/* The kernel keys name every field (a changed field is a new key), the
 * arch and the compiler; the sm_90 fields only where the vendor has them. */
START_TEST(test_kernel_keys) {
    flex_cuda_fwd_config f = {.dtype = FLEX_BF16, .dq = 128, .dv = 64, .warps = 4, .mt = 2,
                              .block_n = 64, .vec = 1, .scale_positive = 1, .wgmma = 1, .tma = 1,
                              .chain = 0, .mask_bits = 1, .short_indices = 1, .dv_exact = 1,
                              .partial_bits = 1, .q_bufs = 2};
    char key[512];
    flex_gpu_fwd_key(key, sizeof key, &st, &f, 1, NULL, NULL, NULL, NULL);
    ck_assert_str_eq(key, "fwd|bf16|dq128|dv64|dx1|w4|mt2|n64|vec1|wg1|tma1|qb2|ch0|sc0|dg0|mb1|"
                          "pb1|short1|scl0|sp1|"
                          "mask=0000000000000000|score=0000000000000000|inr=0000000000000000."
                          "0000000000000000|fake1|fakecc1.2");
    f.step_cuts = 1; /* cuda_step_cuts: another kernel */
    flex_gpu_fwd_key(key, sizeof key, &st, &f, 1, NULL, NULL, NULL, NULL);
    ck_assert_ptr_nonnull(strstr(key, "|ch0|sc1|dg0|mb1|"));
    f.step_cuts = 0;
    f.diag_values = 2; /* cuda_diag: the diagonal tables, another kernel */
    flex_gpu_fwd_key(key, sizeof key, &st, &f, 1, NULL, NULL, NULL, NULL);
    ck_assert_ptr_nonnull(strstr(key, "|sc0|dg2|mb1|"));
    f.diag_values = 0;
    flex_gpu_fwd_key(key, sizeof key, &st, &f, 0, NULL, NULL, NULL, NULL);
    ck_assert_str_eq(key, "fwd|bf16|dq128|dv64|dx1|w4|mt2|n64|vec1|mb1|pb1|short1|scl0|sp1|"
                          "mask=0000000000000000|score=0000000000000000|inr=0000000000000000."
                          "0000000000000000|fake1|fakecc1.2");
    flex_cuda_bwd_config b = {.dtype = FLEX_F16, .dq = 64, .dv = 128, .warps = 8, .block_m = 32,
                              .vec = 1, .short_indices = 0, .grad_slots = 2, .pipeline = 1,
                              .exp2 = 1, .dq_red = 0, .kv_fastest = 1, .wgmma = 1,
                              .split_wait = 1, .wg_barrier = 0, .dq_bulk = 1, .dq_warps = 4,
                              .dq_block_n = 32, .grad_smem = 8208, .partial_bits = 1};
    flex_gpu_bwd_mods m;
    memset(&m, 0, sizeof m);
    flex_gpu_bwd_key(key, sizeof key, &st, &b, &m, NULL, NULL);
    ck_assert_str_eq(key, "bwd|f16|dq64|dv128|w8|bm32|vec1|short0|gs2|pipe1|exp21|red0|kvf1|wg1|"
                          "sw1|wgb0|dqb1|tma0.0|dqw4|dqn32|gsm8208|pb1|mask=0000000000000000|"
                          "score=0000000000000000|loads=0000000000000000|inr=0000000000000000."
                          "0000000000000000|fake1|"
                          "fakecc1.2");
}
END_TEST

/* The backward's launches: preprocess over (batch x head, 4-row groups),
 * the main kernel with the kv tiles fastest or the heads, then the dQ
 * store, or the deterministic dQ kernel over its 16-row tiles. */
START_TEST(test_backward_launches) {
    static uint16_t data[5][2 * 4 * 100 * 64];
    float lse[2 * 4 * 100];
    const int64_t qs[4] = {2, 4, 100, 64}, ks[4] = {2, 2, 100, 64}, ls[3] = {2, 4, 100};
    flex_backward_args a;
    memset(&a, 0, sizeof a);
    a.q = flex_tensor_contiguous(data[0], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.k = flex_tensor_contiguous(data[1], FLEX_BF16, 4, ks, FLEX_DEVICE_HIP);
    a.v = flex_tensor_contiguous(data[2], FLEX_BF16, 4, ks, FLEX_DEVICE_HIP);
    a.out = flex_tensor_contiguous(data[3], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.dout = flex_tensor_contiguous(data[4], FLEX_BF16, 4, qs, FLEX_DEVICE_HIP);
    a.lse = flex_tensor_contiguous(lse, FLEX_F32, 3, ls, FLEX_DEVICE_HIP);
    a.dq = &a.out; /* any tensor: dq wanted */
    flex_cuda_bwd_config c;
    flex_gpu_bwd_config(&c, &a);
    ck_assert_int_eq(c.vec, 1);
    ck_assert_int_eq(c.short_indices, 1);
    c.warps = 4;
    c.kv_fastest = 1;
    flex_gpu_bwd_mods m;
    memset(&m, 0, sizeof m);
    flex_gpu_buffer_desc descs[FLEX_EMIT_MAX_SLOTS];
    memset(descs, 0, sizeof descs);
    int k0, k1, k2, k3;
    flex_gpu_bwd_kernels k = {&k0, &k1, &k2, NULL, NULL};
    size_t delta, dq;
    flex_gpu_bwd_workspace(&a, &c, &delta, &dq);
    ck_assert_uint_eq(delta, 3328); /* 800 floats, rounded up to 256 bytes */
    ck_assert_uint_eq(dq, 2 * 4 * 100 * 64 * 4);
    unsigned char maps[512];
    ck_assert_int_eq(flex_gpu_bwd_launch(NULL, &st, &a, &c, &m, NULL, &k, descs, 0x1000, 5000, 0,
                                         NULL, maps),
                     FLEX_OK);
    ck_assert_int_eq(num_launched, 3);
    /* the second parameter (the tensor maps) goes to the main kernel only */
    ck_assert_ptr_null(launched[0].second);
    ck_assert_ptr_eq(launched[1].second, maps);
    ck_assert_ptr_null(launched[2].second);
    ck_assert_ptr_eq(launched[0].fn, &k0);
    ck_assert_uint_eq(launched[0].gx, 8);
    ck_assert_uint_eq(launched[0].gy, 25);
    ck_assert_ptr_eq(launched[1].fn, &k1);
    ck_assert_uint_eq(launched[1].gx, 2); /* 100 kv rows in 64-row tiles */
    ck_assert_uint_eq(launched[1].gy, 4); /* batch x kv heads */
    ck_assert_uint_eq(launched[1].threads, 128);
    ck_assert_uint_eq(launched[1].smem, 5000);
    ck_assert_ptr_eq(launched[2].fn, &k2);
    /* heads first; the deterministic dQ kernel instead of the store */
    c.kv_fastest = 0;
    c.dq_warps = 2;
    k.store = NULL;
    k.dq = &k3;
    flex_gpu_bwd_workspace(&a, &c, &delta, &dq);
    ck_assert_uint_eq(dq, 0); /* the main kernel leaves dQ alone */
    num_launched = 0;
    ck_assert_int_eq(flex_gpu_bwd_launch(NULL, &st, &a, &c, &m, NULL, &k, descs, 0x1000, 5000, 700,
                                         NULL, NULL),
                     FLEX_OK);
    ck_assert_int_eq(num_launched, 3);
    ck_assert_uint_eq(launched[1].gx, 4);
    ck_assert_uint_eq(launched[1].gy, 2);
    ck_assert_ptr_eq(launched[2].fn, &k3);
    ck_assert_uint_eq(launched[2].gy, 4); /* 100 rows in 32-row tiles */
    ck_assert_uint_eq(launched[2].threads, 64);
    ck_assert_uint_eq(launched[2].smem, 700);
}
END_TEST

/* The forward's head group: 16 only where the score mod reads, per score,
 * a bound buffer of 8 MB or more that no head index enters; pairs
 * otherwise, and always on the persistent grid. */
static flex_mod *score_mod_over(const char *text, const char *name, int ndim, const int64_t *sizes,
                                void *data) {
    const flex_buffer_decl decl = {name, FLEX_F32, ndim};
    const flex_mod_desc desc = {FLEX_MOD_SCORE, text, NULL, 0, &decl, 1};
    flex_mod *mod = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &desc, &mod), FLEX_OK);
    if (data) {
        const flex_tensor t = flex_tensor_contiguous(data, FLEX_F32, ndim, sizes, FLEX_DEVICE_CPU);
        ck_assert_int_eq(flex_mod_bind_buffer(NULL, mod, name, &t), FLEX_OK);
    }
    return mod;
}

START_TEST(test_forward_head_group) {
    /* 2 x 1024 x 1024 floats: 8 MB, the threshold */
    float *big = calloc((size_t)2 << 20, sizeof *big);
    ck_assert_ptr_nonnull(big);
    const int64_t bqk[3] = {2, 1024, 1024}, small_bqk[3] = {2, 1024, 1023};
    const int64_t rows[1] = {(int64_t)2 << 20};
    const struct {
        const char *text;
        int ndim;
        const int64_t *sizes;
        int bound, persistent, group;
    } cases[] = {
        {"score + t[b][q][kv]", 3, bqk, 1, 0, FLEX_GPU_SHARED_READ_GROUP},
        {"score + t[b][q][kv]", 3, bqk, 1, 1, 2},       /* the persistent grid keeps pairs */
        {"score + t[b][q][kv]", 3, small_bqk, 1, 0, 2}, /* a byte under 8 MB: L2 holds it */
        {"score + t[b][q][kv]", 3, bqk, 0, 0, 2},       /* unbound: nothing to size */
        {"score + t[h][q][kv]", 3, bqk, 1, 0, 2},       /* each head its own rows */
        {"score + t[(q * 1024 + kv) % 2097152]", 1, rows, 1, 0, FLEX_GPU_SHARED_READ_GROUP},
        {"score + t[q] * t[kv]", 1, rows, 1, 0, 2}, /* per row and per column only */
        {"score + t[q] * t[kv + h]", 1, rows, 1, 0, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        flex_mod *mod = score_mod_over(cases[i].text, "t", cases[i].ndim, cases[i].sizes,
                                       cases[i].bound ? big : NULL);
        ck_assert_msg(flex_gpu_fwd_head_group(mod, cases[i].persistent) == cases[i].group,
                      "case %zu: %s", i, cases[i].text);
        flex_mod_destroy(mod);
    }
    ck_assert_int_eq(flex_gpu_fwd_head_group(NULL, 0), 2);
    free(big);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("gpu_host");
    TCase *tc = tcase_create("fake_vendor");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_module_list_and_errors);
    tcase_add_test(tc, test_buffers_copied_once_per_binding);
    tcase_add_test(tc, test_score_reads_in_range);
    tcase_add_test(tc, test_forward_tiles);
    tcase_add_test(tc, test_forward_head_group);
    tcase_add_test(tc, test_mask_uploaded_once_heaviest_first);
    tcase_add_test(tc, test_backward_score_prepare);
    tcase_add_test(tc, test_backward_blob);
    tcase_add_test(tc, test_parameter_blobs_at_shared_offsets);
    tcase_add_test(tc, test_backward_smem);
    tcase_add_test(tc, test_decode_word_names_the_argument);
    tcase_add_test(tc, test_decode_split_policy);
    tcase_add_test(tc, test_capture_refuses_first_uploads);
    tcase_add_test(tc, test_caller_workspace);
    tcase_add_test(tc, test_backward_refusals);
    tcase_add_test(tc, test_memory_slots);
    tcase_add_test(tc, test_row_tiles);
    tcase_add_test(tc, test_forward_fit);
    tcase_add_test(tc, test_partial_bits_plan);
    tcase_add_test(tc, test_mask_mod_cheap);
    tcase_add_test(tc, test_partial_bits_device);
    tcase_add_test(tc, test_backward_tiles);
    tcase_add_test(tc, test_backward_grad_floats);
    tcase_add_test(tc, test_kernel_keys);
    tcase_add_test(tc, test_backward_launches);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}
