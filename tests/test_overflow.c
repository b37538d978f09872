/*
 * Sizes and strides at the edge of the integer types: every one is refused
 * with FLEX_ERR_OVERFLOW and a message naming what overflowed, before any
 * arithmetic on it could wrap (the sanitizer build turns a signed overflow
 * into a failure, so these also prove that none happens on the way).
 */
#include <check.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flexattn.h"

#define POISON 777.0f
enum { B = 1, H = 2, S = 8, D = 4, N = B * H * S * D };

static int contains(const char *hay, const char *needle) {
    return strstr(hay, needle) != NULL;
}

START_TEST(malloc_size_that_wraps_when_rounded) {
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    const size_t sizes[] = {SIZE_MAX - 10, SIZE_MAX, SIZE_MAX - 62, (size_t)PTRDIFF_MAX - 62};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        void *p = (void *)1;
        ck_assert_int_eq(flex_malloc(ctx, sizes[i], &p), FLEX_ERR_OVERFLOW);
        ck_assert_ptr_null(p);
        ck_assert_msg(contains(flex_error_message(ctx), "overflows"), "message: %s",
                      flex_error_message(ctx));
    }
    void *p = NULL;
    ck_assert_int_eq(flex_malloc(ctx, 1, &p), FLEX_OK);
    flex_free(ctx, p);
    flex_context_destroy(ctx);
}
END_TEST

typedef struct fixture {
    flex_context *ctx;
    float q[N], k[N], v[N], out[N], lse[B * H * S];
    flex_tensor tq, tk, tv, to, tl;
} fixture;

static void fixture_init(fixture *f) {
    memset(f, 0, sizeof *f);
    ck_assert_int_eq(flex_context_create("cpu", &f->ctx), FLEX_OK);
    for (int i = 0; i < N; i++) {
        f->q[i] = f->k[i] = f->v[i] = 0.25f;
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
}

static void expect_overflow(fixture *f, flex_status got, const char *names) {
    ck_assert_msg(got == FLEX_ERR_OVERFLOW, "status %s (message: %s)", flex_status_name(got),
                  flex_error_message(f->ctx));
    ck_assert_msg(contains(flex_error_message(f->ctx), names), "message '%s' lacks '%s'",
                  flex_error_message(f->ctx), names);
    for (int i = 0; i < N; i++)
        ck_assert_float_eq(f->out[i], POISON);
    for (int i = 0; i < B * H * S; i++)
        ck_assert_float_eq(f->lse[i], POISON);
}

START_TEST(strides_near_2_pow_62) {
    fixture f;
    fixture_init(&f);
    const int64_t big = (int64_t)1 << 62;

    /* (H - 1) * 2^62 fits in int64, but times 4 bytes it does not. */
    flex_tensor bad = f.tq;
    bad.strides[1] = big;
    expect_overflow(&f, flex_attention(f.ctx, &bad, &f.tk, &f.tv, NULL, NULL, NULL, &f.to, NULL),
                    "q->strides[1]");
    /* (S - 1) * 2^62 itself overflows int64. */
    bad = f.tk;
    bad.strides[2] = big + 12345;
    expect_overflow(&f, flex_attention(f.ctx, &f.tq, &bad, &f.tv, NULL, NULL, NULL, &f.to, NULL),
                    "k->strides[2]");
    /* Each span fits, their sum does not. */
    bad = f.tv;
    bad.strides[1] = INT64_MAX / 2;
    bad.strides[3] = INT64_MAX / 4;
    expect_overflow(&f, flex_attention(f.ctx, &f.tq, &f.tk, &bad, NULL, NULL, NULL, &f.to, NULL),
                    "v->strides[3]");
    /* An output: refused before its self-overlap test multiplies them. */
    bad = f.to;
    bad.strides[0] = big; /* size 1: never stepped, yet checked with the rest */
    bad.strides[2] = big;
    expect_overflow(&f, flex_attention(f.ctx, &f.tq, &f.tk, &f.tv, NULL, NULL, NULL, &bad, NULL),
                    "out->strides[2]");
    bad = f.tl;
    bad.strides[2] = big;
    expect_overflow(&f, flex_attention(f.ctx, &f.tq, &f.tk, &f.tv, NULL, NULL, NULL, &f.to, &bad),
                    "lse->strides[2]");
    /* Elements that fit in int64 but whose bytes do not fit in ptrdiff_t. */
    bad = f.tq;
    bad.strides[2] = INT64_MAX / 16;
    expect_overflow(&f, flex_attention(f.ctx, &bad, &f.tk, &f.tv, NULL, NULL, NULL, &f.to, NULL),
                    "q->strides[2]");

    /* The backward checks its gradients the same way. */
    float dout[N], dq[N];
    for (int i = 0; i < N; i++)
        dout[i] = 1.0f, dq[i] = POISON;
    flex_tensor tdo = flex_tensor_bhsd(dout, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    flex_tensor tdq = flex_tensor_bhsd(dq, FLEX_F32, B, H, S, D, FLEX_DEVICE_CPU);
    tdq.strides[1] = big;
    ck_assert_int_eq(flex_attention_backward(f.ctx, &f.tq, &f.tk, &f.tv, &f.to, &tdo, &f.tl, NULL,
                                             NULL, NULL, &tdq, NULL, NULL, NULL, 0),
                     FLEX_ERR_OVERFLOW);
    ck_assert(contains(flex_error_message(f.ctx), "dq->strides[1]"));
    for (int i = 0; i < N; i++)
        ck_assert_float_eq(dq[i], POISON);

    /* The same views with sane strides run. */
    ck_assert_int_eq(flex_attention(f.ctx, &f.tq, &f.tk, &f.tv, NULL, NULL, NULL, &f.to, &f.tl),
                     FLEX_OK);
    flex_context_destroy(f.ctx);
}
END_TEST

START_TEST(buffer_strides_near_2_pow_62) {
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    flex_buffer_decl decl = {.name = "bias", .dtype = FLEX_F32, .ndim = 2};
    flex_mod *mod = NULL;
    ck_assert_int_eq(flex_mod_compile(ctx,
                                      &(flex_mod_desc){.kind = FLEX_MOD_SCORE,
                                                       .text = "score + bias[q, kv]",
                                                       .buffers = &decl,
                                                       .num_buffers = 1},
                                      &mod),
                     FLEX_OK);
    float data[16] = {0};
    const int64_t sizes[2] = {4, 4};
    flex_tensor t = flex_tensor_contiguous(data, FLEX_F32, 2, sizes, FLEX_DEVICE_CPU);
    t.strides[0] = (int64_t)1 << 62;
    ck_assert_int_eq(flex_mod_bind_buffer(ctx, mod, "bias", &t), FLEX_ERR_OVERFLOW);
    ck_assert_msg(contains(flex_error_message(ctx), "buffer 'bias'"), "message: %s",
                  flex_error_message(ctx));
    t.strides[0] = 4;
    ck_assert_int_eq(flex_mod_bind_buffer(ctx, mod, "bias", &t), FLEX_OK);
    flex_mod_destroy(mod);
    flex_context_destroy(ctx);
}
END_TEST

int main(void) {
    Suite *s = suite_create("overflow");
    TCase *tc = tcase_create("overflow");
    tcase_add_test(tc, malloc_size_that_wraps_when_rounded);
    tcase_add_test(tc, strides_near_2_pow_62);
    tcase_add_test(tc, buffer_strides_near_2_pow_62);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
