/*
 * The GPU host layer (backends/gpu/gpu_host.h) without a GPU: a fake vendor
 * whose "device" memory is host memory and whose compiler and modules are
 * counters. It shows what the CUDA and HIP backends rely on: a key builds
 * and compiles its source once, a compile or load failure reaches the
 * caller with the vendor's words, host buffers are copied once per
 * binding, a block mask is uploaded once with its rows heaviest first, a
 * set bounds bit names the buffer, and while a call is being captured into
 * a graph what it would have to upload, compile or load first is refused
 * by name before the vendor is asked for anything.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "../backends/gpu/gpu_host.h"

static int allocs, frees, builds, compiles, loads, unloads, functions, fail_compile, fail_load;

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
};

static char *build_source(const void *args) {
    builds++;
    return strdup((const char *)args);
}

static flex_gpu_state st;
static struct flex_context fake_ctx;

static void setup(void) {
    allocs = frees = builds = compiles = loads = unloads = functions = fail_compile = fail_load = 0;
    memset(&st, 0, sizeof st);
    flex_gpu_init(&st, &fake_ops, NULL, NULL, FLEX_DEVICE_HIP);
    snprintf(st.arch, sizeof st.arch, "fake1");
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

/* While st.capturing, a call finds what an earlier call prepared and asks
 * the vendor for nothing; what would need a first compile, module load,
 * buffer copy or mask upload is refused with FLEX_ERR_UNSUPPORTED, naming
 * it, and nothing is allocated, copied or loaded. */
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

int main(void) {
    Suite *suite = suite_create("gpu_host");
    TCase *tc = tcase_create("fake_vendor");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_module_list_and_errors);
    tcase_add_test(tc, test_buffers_copied_once_per_binding);
    tcase_add_test(tc, test_mask_uploaded_once_heaviest_first);
    tcase_add_test(tc, test_decode_word_names_the_argument);
    tcase_add_test(tc, test_decode_split_policy);
    tcase_add_test(tc, test_capture_refuses_first_uploads);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}
