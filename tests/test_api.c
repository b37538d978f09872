/*
 * The public API's contracts outside the math: backend selection, error
 * reporting, tensor views, dtype conversions, and argument checking of
 * flex_attention / flex_attention_backward (every misuse gives its named
 * error and leaves the caller's outputs untouched).
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flexattn.h"
#include "dtype.h"

static int contains(const char *hay, const char *needle) {
    return strstr(hay, needle) != NULL;
}

START_TEST(context_cpu_by_name) {
    const char *specs[] = {"cpu", "CPU", " cpu ", "Cpu:0"};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        flex_context *ctx = NULL;
        ck_assert_int_eq(flex_context_create(specs[i], &ctx), FLEX_OK);
        ck_assert_ptr_nonnull(ctx);
        ck_assert_str_eq(flex_context_backend(ctx), "cpu");
        ck_assert_int_eq(flex_context_device_type(ctx), FLEX_DEVICE_CPU);
        ck_assert_str_eq(flex_error_message(ctx), "");
        flex_context_destroy(ctx);
    }
}
END_TEST

START_TEST(context_errors_name_the_reason) {
    flex_context *ctx = (flex_context *)1;
    ck_assert_int_eq(flex_context_create("tpu", &ctx), FLEX_ERR_BACKEND);
    ck_assert_ptr_null(ctx);
    ck_assert(contains(flex_error_message(NULL), "unknown backend 'tpu'"));
    ck_assert(contains(flex_error_message(NULL), "cpu"));

    ck_assert_int_eq(flex_context_create("hip", &ctx), FLEX_ERR_BACKEND);
    ck_assert(contains(flex_error_message(NULL), "hip"));

    ck_assert_int_eq(flex_context_create("cpu:x", &ctx), FLEX_ERR_BACKEND);
    ck_assert(contains(flex_error_message(NULL), "device"));
    ck_assert_int_eq(flex_context_create("cpu:0:1", &ctx), FLEX_ERR_BACKEND);

    ck_assert_int_eq(flex_context_create("cpu", NULL), FLEX_ERR_NULL_POINTER);
    ck_assert(contains(flex_error_message(NULL), "out"));
}
END_TEST

/* A GPU backend is either usable and opens, or unusable and refuses with
 * the reason the registry gives: never a silent switch to the CPU. */
START_TEST(context_gpu_never_falls_back) {
    for (int i = 0; i < flex_backend_count(); i++) {
        flex_backend_info info;
        ck_assert_int_eq(flex_backend_get_info(i, &info), FLEX_OK);
        if (!strcmp(info.name, "cpu")) {
            ck_assert(info.built_in && info.usable && info.score > 0);
            continue;
        }
        flex_context *ctx = NULL;
        flex_status st = flex_context_create(info.name, &ctx);
        if (info.usable) {
            ck_assert_int_eq(st, FLEX_OK);
            ck_assert_str_eq(flex_context_backend(ctx), info.name);
            flex_context_destroy(ctx);
        } else {
            ck_assert_int_eq(st, FLEX_ERR_BACKEND);
            ck_assert_ptr_null(ctx);
            ck_assert(strlen(info.reason) > 0);
            ck_assert(contains(flex_error_message(NULL), info.reason));
        }
    }
    flex_backend_info info;
    ck_assert_int_eq(flex_backend_get_info(-1, &info), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_backend_get_info(flex_backend_count(), &info), FLEX_ERR_INVALID_ARGUMENT);
}
END_TEST

START_TEST(context_from_environment) {
    flex_context *ctx = NULL;
    setenv("FLEXATTN_BACKEND", "cpu", 1);
    ck_assert_int_eq(flex_context_create(NULL, &ctx), FLEX_OK);
    ck_assert_str_eq(flex_context_backend(ctx), "cpu");
    flex_context_destroy(ctx);

    setenv("FLEXATTN_BACKEND", "nonsense", 1);
    ck_assert_int_eq(flex_context_create(NULL, &ctx), FLEX_ERR_BACKEND);
    ck_assert(contains(flex_error_message(NULL), "FLEXATTN_BACKEND"));

    setenv("FLEXATTN_BACKEND", "", 1);
    ck_assert_int_eq(flex_context_create(NULL, &ctx), FLEX_OK); /* empty means auto */
    flex_context_destroy(ctx);
    ck_assert_int_eq(flex_context_create("auto", &ctx), FLEX_OK);
    flex_context_destroy(ctx);
    unsetenv("FLEXATTN_BACKEND");
    flex_context_destroy(NULL); /* accepted */
}
END_TEST

/* A caller's allocator is checked and kept; the CPU backend, which needs
 * no device work space, never calls it, and its results do not change. */
static int alloc_calls;
static void *counting_alloc(void *user, size_t bytes, void *stream) {
    (void)user, (void)stream;
    alloc_calls++;
    return malloc(bytes);
}
static void counting_free(void *user, void *ptr, void *stream) {
    (void)user, (void)stream;
    free(ptr);
}

START_TEST(context_allocator) {
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    ck_assert_int_eq(flex_context_set_allocator(NULL, NULL), FLEX_ERR_NULL_POINTER);
    flex_device_allocator a = {counting_alloc, NULL, NULL};
    ck_assert_int_eq(flex_context_set_allocator(ctx, &a), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert(contains(flex_error_message(ctx), "free function is NULL"));
    a.alloc = NULL;
    a.free = counting_free;
    ck_assert_int_eq(flex_context_set_allocator(ctx, &a), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert(contains(flex_error_message(ctx), "alloc function is NULL"));
    a.alloc = counting_alloc;
    ck_assert_int_eq(flex_context_set_allocator(ctx, &a), FLEX_OK);

    enum { L = 40, D = 16 };
    static float q[L * D], k[L * D], v[L * D], out[L * D], lse[L], dout[L * D];
    static float dq[2][L * D], dk[2][L * D], dv[2][L * D];
    for (int i = 0; i < L * D; i++) {
        q[i] = (float)((i * 37) % 23) / 23.0f - 0.5f;
        k[i] = (float)((i * 11) % 19) / 19.0f - 0.5f;
        v[i] = (float)((i * 5) % 17) / 17.0f - 0.5f;
        dout[i] = (float)((i * 3) % 13) / 13.0f - 0.5f;
    }
    const flex_tensor tq = flex_tensor_bhsd(q, FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                      tk = flex_tensor_bhsd(k, FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                      tv = flex_tensor_bhsd(v, FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                      to = flex_tensor_bhsd(out, FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                      tdo = flex_tensor_bhsd(dout, FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                      tl = flex_tensor_bhsd(lse, FLEX_F32, 1, 1, L, 1, FLEX_DEVICE_CPU);
    for (int run = 0; run < 2; run++) {
        if (run == 1) ck_assert_int_eq(flex_context_set_allocator(ctx, NULL), FLEX_OK);
        const flex_tensor tdq = flex_tensor_bhsd(dq[run], FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                          tdk = flex_tensor_bhsd(dk[run], FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU),
                          tdv = flex_tensor_bhsd(dv[run], FLEX_F32, 1, 1, L, D, FLEX_DEVICE_CPU);
        ck_assert_int_eq(flex_attention(ctx, &tq, &tk, &tv, NULL, NULL, NULL, &to, &tl), FLEX_OK);
        ck_assert_int_eq(flex_attention_backward(ctx, &tq, &tk, &tv, &to, &tdo, &tl, NULL, NULL,
                                                 NULL, &tdq, &tdk, &tdv, NULL, 0),
                         FLEX_OK);
    }
    ck_assert_int_eq(alloc_calls, 0);
    ck_assert_mem_eq(dq[0], dq[1], sizeof dq[0]);
    ck_assert_mem_eq(dk[0], dk[1], sizeof dk[0]);
    ck_assert_mem_eq(dv[0], dv[1], sizeof dv[0]);
    flex_context_destroy(ctx);
}
END_TEST

START_TEST(status_names) {
    ck_assert_str_eq(flex_status_name(FLEX_OK), "OK");
    ck_assert_str_eq(flex_status_name(FLEX_ERR_SHAPE), "ERR_SHAPE");
    ck_assert_str_eq(flex_status_name(FLEX_ERR_INTERNAL), "ERR_INTERNAL");
    ck_assert_str_eq(flex_status_name((flex_status)999), "ERR_UNKNOWN_STATUS");
    for (int s = 0; s <= FLEX_ERR_OVERFLOW; s++)
        ck_assert(strncmp(flex_status_name((flex_status)s), "ERR_UNKNOWN", 11) != 0);
}
END_TEST

START_TEST(tensor_views) {
    float x;
    flex_tensor t = flex_tensor_bhsd(&x, FLEX_F16, 2, 3, 5, 7, FLEX_DEVICE_CPU);
    ck_assert_int_eq(t.ndim, 4);
    ck_assert_int_eq(t.strides[0], 3 * 5 * 7);
    ck_assert_int_eq(t.strides[1], 5 * 7);
    ck_assert_int_eq(t.strides[2], 7);
    ck_assert_int_eq(t.strides[3], 1);
    t = flex_tensor_bshd(&x, FLEX_F16, 2, 3, 5, 7, FLEX_DEVICE_CPU);
    ck_assert_int_eq(t.sizes[1], 3);
    ck_assert_int_eq(t.sizes[2], 5);
    ck_assert_int_eq(t.strides[0], 5 * 3 * 7);
    ck_assert_int_eq(t.strides[1], 7);
    ck_assert_int_eq(t.strides[2], 3 * 7);
    const int64_t sizes[2] = {4, 6};
    t = flex_tensor_contiguous(&x, FLEX_I32, 2, sizes, FLEX_DEVICE_CPU);
    ck_assert_int_eq(t.ndim, 2);
    ck_assert_int_eq(t.strides[0], 6);
    ck_assert_int_eq(t.strides[1], 1);
    t = flex_tensor_contiguous(&x, FLEX_I32, 5, sizes, FLEX_DEVICE_CPU);
    ck_assert_int_eq(t.ndim, 0);
    ck_assert_uint_eq(flex_dtype_size(FLEX_BF16), 2);
    ck_assert_uint_eq(flex_dtype_size(FLEX_I64), 8);
    ck_assert_str_eq(flex_dtype_name(FLEX_BF16), "bf16");
}
END_TEST

/* Every f16 bit pattern survives f16 -> f32 -> f16, and rounding on the way
 * down is to nearest even (checked against the compiler's _Float16 where it
 * has one, else against halfway cases built by hand). */
START_TEST(half_conversions) {
    for (uint32_t h = 0; h < 65536; h++) {
        float f = flex_f16_to_float((uint16_t)h);
        if (isnan(f)) {
            ck_assert(isnan(flex_f16_to_float(flex_float_to_f16(f))));
            continue;
        }
        ck_assert_uint_eq(flex_float_to_f16(f), h);
    }
    ck_assert_float_eq(flex_f16_to_float(0x3c00), 1.0f);
    ck_assert_float_eq(flex_f16_to_float(0x0001), ldexpf(1.0f, -24));
    ck_assert_uint_eq(flex_float_to_f16(65520.0f), 0x7c00); /* rounds to inf */
    ck_assert_uint_eq(flex_float_to_f16(65519.0f), 0x7bff);
    ck_assert_uint_eq(flex_float_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3c00); /* tie to even */
    ck_assert_uint_eq(flex_float_to_f16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
    ck_assert_uint_eq(flex_float_to_f16(ldexpf(1.0f, -25)), 0x0000); /* tie to even: 0 */
    ck_assert_uint_eq(flex_float_to_f16(ldexpf(1.5f, -25)), 0x0001);
#if defined(__FLT16_MAX__)
    uint32_t state = 12345;
    for (int i = 0; i < 200000; i++) {
        state = state * 1664525u + 1013904223u;
        uint32_t bits = state;
        float f;
        memcpy(&f, &bits, sizeof f);
        if (isnan(f)) continue;
        _Float16 ref = (_Float16)f;
        uint16_t rb;
        memcpy(&rb, &ref, sizeof rb);
        ck_assert_uint_eq(flex_float_to_f16(f), rb);
    }
#endif
    /* bf16: exact for its own values, ties to even, NaN kept */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = flex_bf16_to_float((uint16_t)h);
        if (isnan(f)) {
            ck_assert(isnan(flex_bf16_to_float(flex_float_to_bf16(f))));
            continue;
        }
        ck_assert_uint_eq(flex_float_to_bf16(f), h);
    }
    ck_assert_uint_eq(flex_float_to_bf16(1.0f + ldexpf(1.0f, -8)), 0x3f80);
    ck_assert_uint_eq(flex_float_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)), 0x3f82);
}
END_TEST

START_TEST(memory_api) {
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    void *p = NULL;
    ck_assert_int_eq(flex_malloc(ctx, 100, &p), FLEX_OK);
    ck_assert_ptr_nonnull(p);
    char src[100], dst[100];
    for (int i = 0; i < 100; i++)
        src[i] = (char)i;
    ck_assert_int_eq(flex_copy_to_device(ctx, p, src, 100), FLEX_OK);
    ck_assert_int_eq(flex_copy_to_host(ctx, dst, p, 100), FLEX_OK);
    ck_assert_int_eq(memcmp(src, dst, 100), 0);
    ck_assert_int_eq(flex_copy_to_device(ctx, NULL, src, 100), FLEX_ERR_NULL_POINTER);
    ck_assert(contains(flex_error_message(ctx), "device_dst"));
    ck_assert_int_eq(flex_malloc(ctx, 8, NULL), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_malloc(NULL, 8, &p), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_synchronize(ctx), FLEX_OK);
    flex_free(ctx, p);
    flex_free(ctx, NULL);
    flex_context_destroy(ctx);
}
END_TEST

/* ---- flex_attention misuse ---- */

enum { B = 1, H = 2, S = 20, D = 8 };
#define POISON 12345.0f

typedef struct fixture {
    flex_context *ctx;
    float q[B * H * S * D], k[B * H * S * D], v[B * H * S * D], out[B * H * S * D];
    float lse[B * H * S];
    flex_tensor tq, tk, tv, to, tl;
} fixture;

static fixture *fixture_new(void) {
    fixture *f = calloc(1, sizeof *f);
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(flex_context_create("cpu", &f->ctx), FLEX_OK);
    for (int i = 0; i < B * H * S * D; i++) {
        f->q[i] = (float)sin(i);
        f->k[i] = (float)cos(i);
        f->v[i] = (float)sin(0.5 * i);
        f->out[i] = POISON;
    }
    for (int i = 0; i < B * H * S; i++)
        f->lse[i] = POISON;
    f->tq = flex_tensor_bhsd(f->q, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    f->tk = flex_tensor_bhsd(f->k, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    f->tv = flex_tensor_bhsd(f->v, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    f->to = flex_tensor_bhsd(f->out, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    const int64_t ls[3] = {B, H, S};
    f->tl = flex_tensor_contiguous(f->lse, FLEX_F32, 3, ls, FLEX_DEVICE_CPU);
    return f;
}

static void fixture_free(fixture *f) {
    flex_context_destroy(f->ctx);
    free(f);
}

static void assert_untouched(const fixture *f) {
    for (int i = 0; i < B * H * S * D; i++)
        ck_assert_float_eq(f->out[i], POISON);
    for (int i = 0; i < B * H * S; i++)
        ck_assert_float_eq(f->lse[i], POISON);
}

/* Runs one bad call and checks the status, that the message names `what`,
 * and that nothing was written. */
static void expect_error(fixture *f, flex_status got, flex_status want, const char *what) {
    ck_assert_msg(got == want, "status %s, wanted %s (message: %s)", flex_status_name(got),
                  flex_status_name(want), flex_error_message(f->ctx));
    ck_assert_msg(contains(flex_error_message(f->ctx), what), "message '%s' lacks '%s'",
                  flex_error_message(f->ctx), what);
    assert_untouched(f);
}

START_TEST(attention_argument_errors) {
    fixture *f = fixture_new();
    flex_context *ctx = f->ctx;
    ck_assert_int_eq(flex_attention(NULL, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                     FLEX_ERR_NULL_POINTER);
    ck_assert(contains(flex_error_message(NULL), "ctx"));

    expect_error(f, flex_attention(ctx, NULL, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_NULL_POINTER, "q is NULL");
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, NULL, NULL),
                 FLEX_ERR_NULL_POINTER, "out is NULL");

    flex_tensor bad = f->tq;
    bad.data = NULL;
    expect_error(f, flex_attention(ctx, &bad, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_NULL_POINTER, "q->data");
    bad = f->tk;
    bad.ndim = 3;
    expect_error(f, flex_attention(ctx, &f->tq, &bad, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "k must have 4 dims");
    bad = f->tv;
    bad.dtype = FLEX_F16;
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &bad, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_DTYPE, "share a dtype");
    bad = f->tq;
    bad.dtype = FLEX_I32;
    expect_error(f, flex_attention(ctx, &bad, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_DTYPE, "i32");
    bad = f->tk;
    bad.sizes[3] = D - 1;
    expect_error(f, flex_attention(ctx, &f->tq, &bad, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "k has sizes");
    bad = f->tq;
    bad.sizes[2] = 0;
    expect_error(f, flex_attention(ctx, &bad, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "q->sizes[2]");
    bad = f->tq;
    bad.strides[1] = -1;
    expect_error(f, flex_attention(ctx, &bad, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "negative");
    bad = f->tq;
    bad.device = FLEX_DEVICE_CUDA;
    expect_error(f, flex_attention(ctx, &bad, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "device");

    /* Hq not a multiple of Hkv: q with 3 heads over k with 2 */
    float q3[B * 3 * S * D];
    flex_tensor tq3 = flex_tensor_bhsd(q3, FLEX_F32, B, 3, S, D, FLEX_DEVICE_CPU);
    expect_error(f, flex_attention(ctx, &tq3, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "multiple");

    /* out: wrong shape, aliasing an input, overlapping itself */
    bad = f->to;
    bad.sizes[2] = S - 1;
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, &bad, NULL),
                 FLEX_ERR_SHAPE, "out has sizes");
    flex_tensor alias = flex_tensor_bhsd(f->q, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, &alias, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "overlaps q");
    bad = f->to;
    bad.strides[2] = 1;
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, &bad, NULL),
                 FLEX_ERR_SHAPE, "share memory");

    /* lse: wrong dtype / shape */
    bad = f->tl;
    bad.dtype = FLEX_F16;
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, &bad),
                 FLEX_ERR_DTYPE, "lse must be f32");
    bad = f->tl;
    bad.sizes[2] = S + 1;
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, NULL, &f->to, &bad),
                 FLEX_ERR_SHAPE, "lse has sizes");

    /* options */
    flex_attention_options opts = {.scale = NAN};
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, &opts, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "scale");
    opts = (flex_attention_options){.kv_splits = -1};
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, &opts, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "kv_splits");
    /* the forward ignores opts->deterministic, but not a value it cannot have */
    opts = (flex_attention_options){.deterministic = 2};
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, &opts, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "opts->deterministic is 2");
    fixture_free(f);
}
END_TEST

START_TEST(attention_mod_errors) {
    fixture *f = fixture_new();
    flex_context *ctx = f->ctx;
    flex_mod *mask = NULL, *score = NULL, *alibi = NULL;
    flex_mod_desc md = {.kind = FLEX_MOD_MASK, .text = "q >= kv"};
    ck_assert_int_eq(flex_mod_compile(ctx, &md, &mask), FLEX_OK);
    flex_mod_desc sd = {.kind = FLEX_MOD_SCORE, .text = "score * 2"};
    ck_assert_int_eq(flex_mod_compile(ctx, &sd, &score), FLEX_OK);
    flex_buffer_decl slopes = {.name = "slopes", .dtype = FLEX_F32, .ndim = 1};
    flex_mod_desc ad = {.kind = FLEX_MOD_SCORE,
                        .text = "score + slopes[h] * (kv - q)",
                        .buffers = &slopes,
                        .num_buffers = 1};
    ck_assert_int_eq(flex_mod_compile(ctx, &ad, &alibi), FLEX_OK);

    /* a mask mod passed as the score mod */
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, mask, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "mask mod");
    /* a score mod passed as the mask mod */
    flex_attention_options opts = {.mask_mod = score};
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, NULL, &opts, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "score mod");
    /* an unbound buffer */
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, alibi, NULL, NULL, &f->to, NULL),
                 FLEX_ERR_BUFFER_UNBOUND, "slopes");

    /* a block mask for other sizes */
    flex_block_mask *bm = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, mask, 1, 1, S + 1, S, 16, 16, &bm), FLEX_OK);
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, bm, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "block mask");
    flex_block_mask_destroy(bm);
    ck_assert_int_eq(flex_block_mask_create(ctx, mask, 1, 3, S, S, 16, 16, &bm), FLEX_OK);
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, bm, NULL, &f->to, NULL),
                 FLEX_ERR_SHAPE, "heads");
    flex_block_mask_destroy(bm);

    /* a block mask from another context */
    flex_context *other = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &other), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(other, mask, 1, 1, S, S, 16, 16, &bm), FLEX_OK);
    expect_error(f, flex_attention(ctx, &f->tq, &f->tk, &f->tv, NULL, bm, NULL, &f->to, NULL),
                 FLEX_ERR_INVALID_ARGUMENT, "another context");
    flex_block_mask_destroy(bm);
    flex_context_destroy(other);

    /* and a good call does write, which shows the poison checks can fail */
    ck_assert_int_eq(flex_attention(ctx, &f->tq, &f->tk, &f->tv, score, NULL,
                                    &(flex_attention_options){.mask_mod = mask}, &f->to, &f->tl),
                     FLEX_OK);
    for (int i = 0; i < B * H * S * D; i++)
        ck_assert(f->out[i] != POISON && isfinite(f->out[i]));
    for (int i = 0; i < B * H * S; i++)
        ck_assert(isfinite(f->lse[i]));
    /* first row under a causal mask attends to key 0 only: out = v[0] */
    for (int d = 0; d < D; d++)
        ck_assert_float_eq_tol(f->out[d], f->v[d], 1e-6f);

    flex_mod_destroy(alibi);
    flex_mod_destroy(score);
    flex_mod_destroy(mask);
    fixture_free(f);
}
END_TEST

START_TEST(backward_argument_errors) {
    fixture *f = fixture_new();
    flex_context *ctx = f->ctx;
    float dout[B * H * S * D], dq[B * H * S * D];
    for (int i = 0; i < B * H * S * D; i++)
        dout[i] = 1.0f, dq[i] = POISON;
    flex_tensor tdo = flex_tensor_bhsd(dout, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    flex_tensor tdq = flex_tensor_bhsd(dq, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_attention_backward(ctx, &f->tq, &f->tk, &f->tv, &f->to, &tdo, NULL, NULL,
                                             NULL, NULL, &tdq, NULL, NULL, NULL, 0),
                     FLEX_ERR_NULL_POINTER);
    ck_assert(contains(flex_error_message(ctx), "lse"));
    flex_tensor alias = flex_tensor_bhsd(dout, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_attention_backward(ctx, &f->tq, &f->tk, &f->tv, &f->to, &tdo, &f->tl,
                                             NULL, NULL, NULL, &alias, NULL, NULL, NULL, 0),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert(contains(flex_error_message(ctx), "dq overlaps dout"));
    flex_buffer_grad g = {.name = "nope"};
    ck_assert_int_eq(flex_attention_backward(ctx, &f->tq, &f->tk, &f->tv, &f->to, &tdo, &f->tl,
                                             NULL, NULL, NULL, &tdq, NULL, NULL, &g, 1),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert(contains(flex_error_message(ctx), "nope"));
    for (int i = 0; i < B * H * S * D; i++)
        ck_assert_float_eq(dq[i], POISON);
    fixture_free(f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("api");
    TCase *tc = tcase_create("api");
    tcase_add_test(tc, context_cpu_by_name);
    tcase_add_test(tc, context_errors_name_the_reason);
    tcase_add_test(tc, context_gpu_never_falls_back);
    tcase_add_test(tc, context_from_environment);
    tcase_add_test(tc, context_allocator);
    tcase_add_test(tc, status_names);
    tcase_add_test(tc, tensor_views);
    tcase_add_test(tc, half_conversions);
    tcase_add_test(tc, memory_api);
    tcase_add_test(tc, attention_argument_errors);
    tcase_add_test(tc, attention_mod_errors);
    tcase_add_test(tc, backward_argument_errors);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
