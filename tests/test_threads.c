/*
 * One context shared by many threads, as include/flexattn.h allows: calls
 * with opts.mask_mod build, share and replace block masks in the context's
 * cache while other threads still run with them, and failing calls each read
 * back their own error message. Run under AddressSanitizer (scripts/test.sh)
 * a missing lock or reference shows as a double free or a use after free;
 * in any build a shared message shows as a wrong one.
 */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flexattn.h"

enum { THREADS = 8, ROUNDS = 24, H = 2, D = 8, MAX_LEN = 64 };

typedef struct shared {
    flex_context *ctx;
    flex_mod *masks[2];
    pthread_barrier_t start;
} shared;

typedef struct worker {
    shared *sh;
    int index;
    int failures; /* what went wrong, counted; the main thread asserts 0 */
    char first_failure[256];
} worker;

static void note(worker *w, const char *what) {
    if (!w->failures++) snprintf(w->first_failure, sizeof w->first_failure, "%s", what);
}

/* A length for round r of worker i: 24 different lengths over the rounds,
 * with 2 mask mods more than the cache's 16 entries, so entries are replaced
 * while other threads hold them. */
static int length_of(int i, int r) {
    return 8 + 2 * ((i * 7 + r) % 24) + (r % 2);
}

static void *run_worker(void *arg) {
    worker *w = arg;
    shared *sh = w->sh;
    /* A private context computes the reference of every call. */
    flex_context *own = NULL;
    if (flex_context_create("cpu", &own) != FLEX_OK) note(w, "private context");
    const size_t n = (size_t)H * MAX_LEN * D;
    float *q = calloc(n, sizeof *q), *k = calloc(n, sizeof *k), *v = calloc(n, sizeof *v),
          *out = calloc(n, sizeof *out), *ref = calloc(n, sizeof *ref);
    const int rounds = own && q && k && v && out && ref ? ROUNDS : 0;
    if (!rounds) note(w, "out of memory");
    for (int i = 0; i < (rounds ? H * MAX_LEN * D : 0); i++) {
        q[i] = (float)sin(0.1 * i + w->index);
        k[i] = (float)cos(0.3 * i - w->index);
        v[i] = (float)sin(0.7 * i * (w->index + 1));
    }
    pthread_barrier_wait(&sh->start);
    for (int r = 0; r < rounds; r++) {
        const int L = length_of(w->index, r);
        flex_tensor tq = flex_tensor_bhsd(q, FLEX_F32, 1, H, L, D, FLEX_DEVICE_CPU);
        flex_tensor tk = flex_tensor_bhsd(k, FLEX_F32, 1, H, L, D, FLEX_DEVICE_CPU);
        flex_tensor tv = flex_tensor_bhsd(v, FLEX_F32, 1, H, L, D, FLEX_DEVICE_CPU);
        flex_tensor to = flex_tensor_bhsd(out, FLEX_F32, 1, H, L, D, FLEX_DEVICE_CPU);
        flex_tensor tr = flex_tensor_bhsd(ref, FLEX_F32, 1, H, L, D, FLEX_DEVICE_CPU);
        flex_attention_options opts = {.mask_mod = sh->masks[(w->index + r) % 2]};
        if (flex_attention(sh->ctx, &tq, &tk, &tv, NULL, NULL, &opts, &to, NULL) != FLEX_OK) {
            note(w, flex_error_message(sh->ctx));
            continue;
        }
        if (flex_attention(own, &tq, &tk, &tv, NULL, NULL, &opts, &tr, NULL) != FLEX_OK) {
            note(w, flex_error_message(own));
            continue;
        }
        for (int i = 0; i < H * L * D; i++)
            if (!(fabsf(out[i] - ref[i]) <= 1e-5f)) {
                note(w, "the shared context's output differs from the private one's");
                break;
            }

        /* A failing call whose message only this thread and round can give:
         * q's sequence size is negative and names both. */
        flex_tensor bad = tq;
        bad.sizes[2] = -(1000 * (w->index + 1) + r);
        if (flex_attention(sh->ctx, &bad, &tk, &tv, NULL, NULL, &opts, &to, NULL) !=
            FLEX_ERR_SHAPE) {
            note(w, "the bad call did not fail with FLEX_ERR_SHAPE");
            continue;
        }
        char mine[64];
        snprintf(mine, sizeof mine, "q->sizes[2] is %lld;", (long long)bad.sizes[2]);
        sched_yield(); /* let the other threads fail in between */
        const char *msg = flex_error_message(sh->ctx);
        if (!strstr(msg, mine)) {
            char what[256];
            snprintf(what, sizeof what, "read '%.150s', wanted '%s'", msg, mine);
            note(w, what);
        }
        /* A successful call clears this thread's message, and only its. */
        if (flex_attention(sh->ctx, &tq, &tk, &tv, NULL, NULL, &opts, &to, NULL) != FLEX_OK ||
            flex_error_message(sh->ctx)[0] != 0)
            note(w, "a successful call left a message");
    }
    flex_context_destroy(own);
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    return NULL;
}

START_TEST(one_context_many_threads) {
    shared sh;
    ck_assert_int_eq(flex_context_create("cpu", &sh.ctx), FLEX_OK);
    const char *texts[2] = {"q >= kv", "q >= kv && q - kv <= 5"};
    for (int m = 0; m < 2; m++)
        ck_assert_int_eq(flex_mod_compile(sh.ctx,
                                          &(flex_mod_desc){.kind = FLEX_MOD_MASK, .text = texts[m]},
                                          &sh.masks[m]),
                         FLEX_OK);
    pthread_barrier_init(&sh.start, NULL, THREADS);
    worker workers[THREADS];
    pthread_t ids[THREADS];
    for (int i = 0; i < THREADS; i++) {
        workers[i] = (worker){.sh = &sh, .index = i};
        ck_assert_int_eq(pthread_create(&ids[i], NULL, run_worker, &workers[i]), 0);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(ids[i], NULL);
    for (int i = 0; i < THREADS; i++)
        ck_assert_msg(workers[i].failures == 0, "thread %d: %d failures, first: %s", i,
                      workers[i].failures, workers[i].first_failure);
    pthread_barrier_destroy(&sh.start);
    /* Messages of this thread on this context are its own too. */
    ck_assert_str_eq(flex_error_message(sh.ctx), "");
    ck_assert_int_eq(flex_attention(sh.ctx, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                     FLEX_ERR_NULL_POINTER);
    ck_assert_ptr_nonnull(strstr(flex_error_message(sh.ctx), "q is NULL"));
    for (int m = 0; m < 2; m++)
        flex_mod_destroy(sh.masks[m]);
    flex_context_destroy(sh.ctx);
}
END_TEST

/* Messages are kept per context too: a failure on one context leaves the
 * other's message alone, and a destroyed context's message is gone. */
START_TEST(messages_per_context) {
    flex_context *a = NULL, *b = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &a), FLEX_OK);
    ck_assert_int_eq(flex_context_create("cpu", &b), FLEX_OK);
    void *p = NULL;
    ck_assert_int_eq(flex_malloc(a, 8, NULL), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_copy_to_host(b, NULL, &p, 8), FLEX_ERR_NULL_POINTER);
    ck_assert_ptr_nonnull(strstr(flex_error_message(a), "ptr is NULL"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(b), "host_dst is NULL"));
    flex_context_destroy(a);
    flex_context *c = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &c), FLEX_OK);
    ck_assert_str_eq(flex_error_message(c), ""); /* even at a's old address */
    ck_assert_ptr_nonnull(strstr(flex_error_message(b), "host_dst is NULL"));
    flex_context_destroy(b);
    flex_context_destroy(c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("threads");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, one_context_many_threads);
    tcase_add_test(tc, messages_per_context);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
