/*
 * Block masks: classes equal an exhaustive element-wise evaluation, the
 * four CSR lists agree with the dense export, broadcasting, composition,
 * explicit classes, the printout, and argument errors.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <xmmintrin.h> /* MXCSR */
#endif

#include "blockmask.h"
#include "internal.h"

static flex_context *ctx;

/* Check records every ck_assert as it passes, which is slow in loops over
 * thousands of elements: those loops test with this, which costs nothing
 * until it fails. */
#define REQUIRE(cond, ...)                                                                         \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)

static void setup(void) {
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
}

static void teardown(void) {
    flex_context_destroy(ctx);
    ctx = NULL;
}

/* ---- helpers ---- */

static flex_mod *compile_mask(const char *text, const flex_param *params, int num_params,
                              const flex_buffer_decl *buffers, int num_buffers) {
    flex_mod_desc desc = {FLEX_MOD_MASK, text, params, num_params, buffers, num_buffers};
    flex_mod *mod = NULL;
    flex_status st = flex_mod_compile(ctx, &desc, &mod);
    ck_assert_msg(st == FLEX_OK, "compiling '%s': %s", text, flex_error_message(ctx));
    return mod;
}

static void bind_i32(flex_mod *mod, const char *name, int32_t *data, int ndim,
                     const int64_t *sizes) {
    flex_tensor t = flex_tensor_contiguous(data, FLEX_I32, ndim, sizes, FLEX_DEVICE_CPU);
    flex_status st = flex_mod_bind_buffer(ctx, mod, name, &t);
    ck_assert_msg(st == FLEX_OK, "binding %s: %s", name, flex_error_message(ctx));
}

/* Classes by evaluating every element with the scalar interpreter: the
 * definition the builder must meet. Layout as flex_block_mask_to_dense. */
static uint8_t *exhaustive_classes(const flex_mod *mod, int64_t Bm, int64_t Hm, int64_t q_len,
                                   int64_t kv_len, int qb, int kb) {
    int64_t nq = (q_len + qb - 1) / qb, nk = (kv_len + kb - 1) / kb;
    uint8_t *seen = calloc((size_t)(Bm * Hm * nq * nk), 1);
    ir_value *scratch = malloc(sizeof(ir_value) * (size_t)mod->ir.num_nodes + 1);
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(copies, 0, sizeof copies);
    ck_assert_int_eq(flex_mod_host_views(ctx, mod, views, copies), FLEX_OK);
    for (int64_t b = 0; b < Bm; b++)
        for (int64_t h = 0; h < Hm; h++)
            for (int64_t q = 0; q < q_len; q++)
                for (int64_t kv = 0; kv < kv_len; kv++) {
                    ir_value r;
                    mod_bounds_error err;
                    memset(&err, 0, sizeof err);
                    int rc = mod_eval_point(&mod->ir, views, 0.0f, (int32_t)b, (int32_t)h,
                                            (int32_t)q, (int32_t)kv, scratch, &r, &err);
                    REQUIRE(rc == 0, "evaluating at q %lld kv %lld failed", (long long)q,
                            (long long)kv);
                    seen[((b * Hm + h) * nq + q / qb) * nk + kv / kb] |= r.i ? 2 : 1;
                }
    flex_mod_release_host_views(copies);
    free(scratch);
    for (int64_t k = 0; k < Bm * Hm * nq * nk; k++)
        seen[k] = seen[k] == 3   ? FLEX_BLOCK_PARTIAL
                  : seen[k] == 2 ? FLEX_BLOCK_FULL
                                 : FLEX_BLOCK_EMPTY;
    return seen;
}

/* The kv-major lists, the q-major lists and the counts all say what the
 * dense export says. */
static void check_lists(const flex_block_mask *m, const uint8_t *dense) {
    int64_t nq = m->num_q_blocks, nk = m->num_kv_blocks, bh = m->B * m->H;
    int64_t full = 0, part = 0;
    for (int64_t k = 0; k < bh * nq * nk; k++) {
        full += dense[k] == FLEX_BLOCK_FULL;
        part += dense[k] == FLEX_BLOCK_PARTIAL;
    }
    ck_assert_int_eq(m->num_full, full);
    ck_assert_int_eq(m->num_partial, part);
    const flex_block_lists *kv_lists[2] = {&m->kv_partial, &m->kv_full};
    const flex_block_lists *q_lists[2] = {&m->q_partial, &m->q_full};
    const uint8_t cls[2] = {FLEX_BLOCK_PARTIAL, FLEX_BLOCK_FULL};
    for (int l = 0; l < 2; l++) {
        const flex_block_lists *kl = kv_lists[l], *ql = q_lists[l];
        ck_assert_int_eq(kl->offsets[0], 0);
        ck_assert_int_eq(ql->offsets[0], 0);
        ck_assert_int_eq(kl->offsets[bh * nq], l ? full : part);
        ck_assert_int_eq(ql->offsets[bh * nk], l ? full : part);
        for (int64_t s = 0; s < bh; s++) {
            for (int64_t i = 0; i < nq; i++) {
                int64_t r = s * nq + i, expect = 0;
                for (int64_t j = 0; j < nk; j++)
                    expect += dense[r * nk + j] == cls[l];
                REQUIRE(kl->offsets[r + 1] - kl->offsets[r] == expect, "row %lld count",
                        (long long)r);
                for (int32_t k = kl->offsets[r]; k < kl->offsets[r + 1]; k++) {
                    int32_t j = kl->indices[k];
                    REQUIRE(j >= 0 && j < nk, "row %lld: index %d outside", (long long)r, j);
                    REQUIRE(k == kl->offsets[r] || kl->indices[k - 1] < j, "row %lld not ascending",
                            (long long)r);
                    REQUIRE(dense[r * nk + j] == cls[l], "row %lld block %d class", (long long)r,
                            j);
                }
            }
            for (int64_t j = 0; j < nk; j++) {
                int64_t c = s * nk + j, expect = 0;
                for (int64_t i = 0; i < nq; i++)
                    expect += dense[(s * nq + i) * nk + j] == cls[l];
                REQUIRE(ql->offsets[c + 1] - ql->offsets[c] == expect, "column %lld count",
                        (long long)c);
                for (int32_t k = ql->offsets[c]; k < ql->offsets[c + 1]; k++) {
                    int32_t i = ql->indices[k];
                    REQUIRE(i >= 0 && i < nq, "column %lld: index %d outside", (long long)c, i);
                    REQUIRE(k == ql->offsets[c] || ql->indices[k - 1] < i,
                            "column %lld not ascending", (long long)c);
                    REQUIRE(dense[(s * nq + i) * nk + j] == cls[l], "column %lld block %d class",
                            (long long)c, i);
                }
            }
        }
    }
    double expect_sparsity = 100.0 * (1.0 - (double)(full + part) / (double)(bh * nq * nk));
    ck_assert_double_eq_tol(flex_block_mask_sparsity(m), expect_sparsity, 1e-9);
}

/* Builds the mask of mod and compares it block for block with the
 * exhaustive evaluation. */
static void check_mask(const char *what, const flex_mod *mod, int64_t B, int64_t H, int64_t q_len,
                       int64_t kv_len, int qb, int kb) {
    flex_block_mask *m = NULL;
    flex_status st = flex_block_mask_create(ctx, mod, B, H, q_len, kv_len, qb, kb, &m);
    ck_assert_msg(st == FLEX_OK, "%s: %s", what, flex_error_message(ctx));
    int64_t Bm = B > 1 ? B : 1, Hm = H > 1 ? H : 1;
    if (qb == 0) qb = 128;
    if (kb == 0) kb = 128;
    flex_block_mask_shape shape;
    ck_assert_int_eq(flex_block_mask_get_shape(m, &shape), FLEX_OK);
    ck_assert_int_eq(shape.B, Bm);
    ck_assert_int_eq(shape.H, Hm);
    ck_assert_int_eq(shape.num_q_blocks, (q_len + qb - 1) / qb);
    ck_assert_int_eq(shape.num_kv_blocks, (kv_len + kb - 1) / kb);
    int64_t total = Bm * Hm * shape.num_q_blocks * shape.num_kv_blocks;
    uint8_t *dense = malloc((size_t)total);
    ck_assert_int_eq(flex_block_mask_to_dense(m, dense), FLEX_OK);
    uint8_t *expect = exhaustive_classes(mod, Bm, Hm, q_len, kv_len, qb, kb);
    for (int64_t k = 0; k < total; k++)
        REQUIRE(dense[k] == expect[k],
                "%s (q_len %lld, kv_len %lld, blocks %d x %d, B %lld, H %lld): block %lld "
                "is %d, element-wise says %d",
                what, (long long)q_len, (long long)kv_len, qb, kb, (long long)B, (long long)H,
                (long long)k, dense[k], expect[k]);
    check_lists(m, dense);
    free(expect);
    free(dense);
    flex_block_mask_destroy(m);
}

typedef struct geometry {
    int64_t q_len, kv_len;
    int qb, kb;
} geometry;

static const geometry geometries[] = {
    {1, 1, 16, 16},       {17, 300, 16, 64},  {128, 128, 128, 128}, {300, 520, 128, 32},
    {1000, 200, 32, 128}, {257, 129, 64, 16}, {200, 200, 16, 16},   {100, 37, 0, 0},
};
#define NUM_GEOMETRIES ((int)(sizeof geometries / sizeof geometries[0]))

/* Document ids with uneven lengths (1 to 90 tokens) covering n tokens. */
static int32_t *make_doc_ids(int64_t n, int32_t **offsets_out, int *num_offsets) {
    static const int lengths[] = {37, 5, 90, 1, 64, 16, 33, 2, 70};
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *offs = malloc(sizeof(int32_t) * (size_t)(n + 2));
    int count = 0;
    int64_t pos = 0;
    offs[count++] = 0;
    for (int d = 0; pos < n; d++) {
        int64_t len = lengths[d % 9];
        if (pos + len > n) len = n - pos;
        pos += len;
        offs[count++] = (int32_t)pos;
    }
    ck_assert_int_eq(flex_sequence_ids_from_offsets(offs, count, ids, n), FLEX_OK);
    if (offsets_out) {
        *offsets_out = offs;
        *num_offsets = count;
    } else {
        free(offs);
    }
    return ids;
}

/* A preset (with test-sized params) compiled and its buffers bound for
 * (q_len, kv_len). Buffers are returned in bufs for the caller to free. */
static flex_mod *preset_for(const char *name, int64_t q_len, int64_t kv_len, void **bufs) {
    flex_param params[4];
    int np = 0;
    if (!strcmp(name, "sliding_window") || !strcmp(name, "sliding_window_bidirectional"))
        params[np++] = (flex_param){"W", 0, 50};
    if (!strcmp(name, "prefix_lm")) params[np++] = (flex_param){"P", 0, 100};
    if (!strcmp(name, "sasa")) {
        params[np++] = (flex_param){"IW", 0, 16};
        params[np++] = (flex_param){"WIN", 0, 2};
    }
    if (!strcmp(name, "natten")) {
        params[np++] = (flex_param){"IH", 0, 20};
        params[np++] = (flex_param){"IW", 0, 16};
        params[np++] = (flex_param){"KH", 0, 5};
        params[np++] = (flex_param){"KW", 0, 3};
    }
    flex_mod *mod = NULL;
    flex_status st = flex_preset_compile(ctx, name, params, np, &mod);
    ck_assert_msg(st == FLEX_OK, "preset %s: %s", name, flex_error_message(ctx));
    int64_t n = q_len > kv_len ? q_len : kv_len;
    bufs[0] = bufs[1] = NULL;
    if (!strcmp(name, "document") || !strcmp(name, "document_causal")) {
        bufs[0] = make_doc_ids(n, NULL, NULL);
        bind_i32(mod, "doc", bufs[0], 1, &n);
    } else if (!strcmp(name, "jagged_causal")) {
        int32_t *offs;
        int count;
        bufs[0] = make_doc_ids(n, &offs, &count);
        bufs[1] = offs;
        int64_t noff = count;
        bind_i32(mod, "seq", bufs[0], 1, &n);
        bind_i32(mod, "off", offs, 1, &noff);
    } else if (!strcmp(name, "flamingo")) {
        int32_t *img_of = malloc(sizeof(int32_t) * (size_t)kv_len);
        int32_t *iv = malloc(sizeof(int32_t) * 8);
        for (int64_t k = 0; k < kv_len; k++)
            img_of[k] = (int32_t)((k / 3) % 4);
        for (int i = 0; i < 4; i++) {
            iv[2 * i] = (int32_t)(i * q_len / 5);
            int64_t e = (i + 2) * q_len / 4;
            iv[2 * i + 1] = (int32_t)(e < q_len ? e : q_len);
        }
        int64_t s1 = kv_len, s2[2] = {4, 2};
        bind_i32(mod, "img_of", img_of, 1, &s1);
        bind_i32(mod, "intervals", iv, 2, s2);
        bufs[0] = img_of;
        bufs[1] = iv;
    }
    return mod;
}

/* ---- tests ---- */

START_TEST(test_every_mask_preset) {
    for (int p = 0; p < flex_preset_count(); p++) {
        const flex_preset *preset = flex_preset_at(p);
        if (preset->kind != FLEX_MOD_MASK) continue;
        for (int g = 0; g < NUM_GEOMETRIES; g++) {
            const geometry *geo = &geometries[g];
            void *bufs[2];
            flex_mod *mod = preset_for(preset->name, geo->q_len, geo->kv_len, bufs);
            check_mask(preset->name, mod, 1, 1, geo->q_len, geo->kv_len, geo->qb, geo->kb);
            flex_mod_destroy(mod);
            free(bufs[0]);
            free(bufs[1]);
        }
    }
}
END_TEST

START_TEST(test_hand_written_masks) {
    static const char *texts[] = {
        "(q * 7 + kv * 3) % 5 != 0", /* partial nearly everywhere */
        "true",
        "false",
        "q < 0",
        "kv >= 64 && kv < 80 || q == 5",
        "abs(q - 2 * kv) <= 3",
        "(q // 40) == (kv // 24)",
        "sel[q % 4][kv % 3] && q >= kv",
    };
    flex_buffer_decl sel_decl = {"sel", FLEX_BOOL, 2};
    uint8_t sel[12] = {1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0};
    for (int t = 0; t < (int)(sizeof texts / sizeof texts[0]); t++) {
        int uses_sel = strstr(texts[t], "sel") != NULL;
        flex_mod *mod = compile_mask(texts[t], NULL, 0, uses_sel ? &sel_decl : NULL, uses_sel);
        if (uses_sel) {
            int64_t sizes[2] = {4, 3};
            flex_tensor view = flex_tensor_contiguous(sel, FLEX_BOOL, 2, sizes, FLEX_DEVICE_CPU);
            ck_assert_int_eq(flex_mod_bind_buffer(ctx, mod, "sel", &view), FLEX_OK);
        }
        for (int g = 0; g < NUM_GEOMETRIES; g++)
            check_mask(texts[t], mod, 1, 1, geometries[g].q_len, geometries[g].kv_len,
                       geometries[g].qb, geometries[g].kb);
        flex_mod_destroy(mod);
    }
}
END_TEST

/* Mods whose values are subnormal floats: the builder (interval analysis
 * and block evaluation) keeps subnormals like the element-wise definition,
 * also when the calling thread flushes them (x86 FTZ/DAZ, as programs built
 * with -ffast-math run), and restores the caller's state. */
START_TEST(test_subnormal_masks) {
    static const char *texts[] = {
        "float(q - kv) * 1e-40 >= 1e-40",         /* strictly below the diagonal */
        "float(kv) * 1e-44 > float(q) * 1e-44 + 1e-45", /* a few ulps of the smallest */
        "float(q) * 1e-39 - float(kv) * 1e-39 > 0.0",   /* subnormal differences */
        "float(q + kv) * 1.5e-45 < 40.0 * 1.5e-45",      /* the smallest subnormal, times */
    };
    for (int flush = 0; flush < 2; flush++)
        for (int t = 0; t < (int)(sizeof texts / sizeof texts[0]); t++) {
            flex_mod *mod = compile_mask(texts[t], NULL, 0, NULL, 0);
            for (int g = 0; g < NUM_GEOMETRIES; g++) {
                flex_block_mask *m = NULL;
#if defined(__x86_64__)
                unsigned saved = _mm_getcsr();
                if (flush) _mm_setcsr(saved | 0x8040u);
#endif
                flex_status st =
                    flex_block_mask_create(ctx, mod, 1, 1, geometries[g].q_len, geometries[g].kv_len,
                                           geometries[g].qb, geometries[g].kb, &m);
#if defined(__x86_64__)
                ck_assert_uint_eq(_mm_getcsr() & 0x8040u, flush ? 0x8040u : (saved & 0x8040u));
                _mm_setcsr(saved);
#endif
                ck_assert_int_eq(st, FLEX_OK);
                int64_t qb = geometries[g].qb ? geometries[g].qb : 128;
                int64_t kb = geometries[g].kb ? geometries[g].kb : 128;
                int64_t nq = (geometries[g].q_len + qb - 1) / qb;
                int64_t nk = (geometries[g].kv_len + kb - 1) / kb;
                uint8_t *dense = malloc((size_t)(nq * nk));
                ck_assert_int_eq(flex_block_mask_to_dense(m, dense), FLEX_OK);
                uint8_t *expect = exhaustive_classes(mod, 1, 1, geometries[g].q_len,
                                                     geometries[g].kv_len, (int)qb, (int)kb);
                for (int64_t k = 0; k < nq * nk; k++)
                    REQUIRE(dense[k] == expect[k],
                            "%s (%s caller, geometry %d): block %lld is %d, element-wise %d",
                            texts[t], flush ? "flushing" : "IEEE", g, (long long)k, dense[k],
                            expect[k]);
                free(dense);
                free(expect);
                flex_block_mask_destroy(m);
            }
            /* the first mask is the issue's: diagonal blocks partial at 64 x 64 / 16 */
            if (t == 0) {
                flex_block_mask *m = NULL;
                ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 64, 64, 16, 16, &m),
                                 FLEX_OK);
                ck_assert_int_eq(m->num_partial, 4);
                ck_assert_int_eq(m->num_full, 6);
                flex_block_mask_destroy(m);
            }
            flex_mod_destroy(mod);
        }
}
END_TEST

START_TEST(test_batch_and_head) {
    /* Masks that differ per (b, h), per b only, and not at all. */
    flex_buffer_decl lim_decl = {"lim", FLEX_I32, 1};
    int32_t lim[3] = {10, 100, 250};
    int64_t nlim = 3;
    flex_mod *per_bh = compile_mask("kv < lim[h] + b * 37 && q >= kv - 20", NULL, 0, &lim_decl, 1);
    bind_i32(per_bh, "lim", lim, 1, &nlim);
    flex_mod *per_b = compile_mask("b == 1 || q >= kv", NULL, 0, NULL, 0);
    flex_mod *same = compile_mask("q >= kv", NULL, 0, NULL, 0);
    const flex_mod *mods[3] = {per_bh, per_b, same};
    for (int k = 0; k < 3; k++) {
        check_mask("per (b, h)", mods[k], 2, 3, 300, 280, 32, 64);
        check_mask("broadcast B", mods[k], 0, 3, 300, 280, 32, 64);
        check_mask("broadcast H", mods[k], 2, 1, 300, 280, 32, 64);
        check_mask("broadcast both", mods[k], 1, 0, 300, 280, 32, 64);
    }
    /* Broadcast evaluates at b = h = 0: the (0, 0) slice of the full mask. */
    flex_block_mask *full = NULL, *bcast = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, per_bh, 2, 3, 300, 280, 32, 64, &full), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(ctx, per_bh, 1, 1, 300, 280, 32, 64, &bcast), FLEX_OK);
    int64_t grid = full->num_q_blocks * full->num_kv_blocks;
    uint8_t *dfull = malloc((size_t)(6 * grid)), *dbcast = malloc((size_t)grid);
    flex_block_mask_to_dense(full, dfull);
    flex_block_mask_to_dense(bcast, dbcast);
    ck_assert_mem_eq(dfull, dbcast, (size_t)grid);
    /* And the slices really differ, so the test above means something. */
    ck_assert(memcmp(dfull, dfull + 4 * grid, (size_t)grid) != 0);
    free(dfull);
    free(dbcast);
    flex_block_mask_destroy(full);
    flex_block_mask_destroy(bcast);
    flex_mod_destroy(per_bh);
    flex_mod_destroy(per_b);
    flex_mod_destroy(same);
}
END_TEST

/* and/or of two masks equals the masks of the element-wise and/or. */
static void check_composition(const char *ta, const char *tb, int64_t B, int64_t H, int64_t Bb,
                              int64_t Hb) {
    flex_mod *a = compile_mask(ta, NULL, 0, NULL, 0);
    flex_mod *b = compile_mask(tb, NULL, 0, NULL, 0);
    const int64_t q_len = 300, kv_len = 250;
    flex_block_mask *ma = NULL, *mb = NULL, *mand = NULL, *mor = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, a, B, H, q_len, kv_len, 32, 16, &ma), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(ctx, b, Bb, Hb, q_len, kv_len, 32, 16, &mb), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_and(ctx, ma, mb, &mand), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_or(ctx, ma, mb, &mor), FLEX_OK);
    int64_t Bm = B > Bb ? B : Bb, Hm = H > Hb ? H : Hb;
    if (Bm < 1) Bm = 1;
    if (Hm < 1) Hm = 1;
    char text_and[256], text_or[256];
    snprintf(text_and, sizeof text_and, "(%s) && (%s)", ta, tb);
    snprintf(text_or, sizeof text_or, "(%s) || (%s)", ta, tb);
    flex_mod *ea = compile_mask(text_and, NULL, 0, NULL, 0);
    flex_mod *eo = compile_mask(text_or, NULL, 0, NULL, 0);
    flex_block_mask *results[2] = {mand, mor};
    flex_mod *elementwise[2] = {ea, eo};
    for (int r = 0; r < 2; r++) {
        ck_assert_int_eq(results[r]->B, Bm);
        ck_assert_int_eq(results[r]->H, Hm);
        int64_t total = Bm * Hm * results[r]->num_q_blocks * results[r]->num_kv_blocks;
        uint8_t *dense = malloc((size_t)total);
        flex_block_mask_to_dense(results[r], dense);
        uint8_t *expect = exhaustive_classes(elementwise[r], Bm, Hm, q_len, kv_len, 32, 16);
        ck_assert_mem_eq(dense, expect, (size_t)total);
        check_lists(results[r], dense);
        ck_assert_ptr_nonnull(results[r]->mask_mod);
        free(dense);
        free(expect);
    }
    flex_block_mask_destroy(mand);
    flex_block_mask_destroy(mor);
    flex_block_mask_destroy(ma);
    flex_block_mask_destroy(mb);
    flex_mod_destroy(a);
    flex_mod_destroy(b);
    flex_mod_destroy(ea);
    flex_mod_destroy(eo);
}

START_TEST(test_and_or) {
    check_composition("q >= kv", "abs(q - kv) <= 40", 1, 1, 1, 1);
    check_composition("(q + kv) % 3 == 0", "q >= kv", 1, 1, 1, 1);
    check_composition("(q + 2 * kv) % 7 < 3", "(q * 5 + kv) % 4 != 1", 1, 1, 1, 1);
    check_composition("kv < 40 + 50 * h", "q >= kv + b * 30", 1, 3, 2, 1);
}
END_TEST

START_TEST(test_and_or_errors) {
    flex_mod *a = compile_mask("q >= kv", NULL, 0, NULL, 0);
    flex_block_mask *m1 = NULL, *m2 = NULL, *m3 = NULL, *out = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, a, 1, 1, 100, 100, 16, 16, &m1), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(ctx, a, 1, 1, 100, 101, 16, 16, &m2), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(ctx, a, 1, 1, 100, 100, 32, 16, &m3), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_and(ctx, m1, m2, &out), FLEX_ERR_SHAPE);
    ck_assert_ptr_null(out);
    ck_assert_int_eq(flex_block_mask_or(ctx, m1, m3, &out), FLEX_ERR_SHAPE);
    ck_assert_int_eq(flex_block_mask_and(ctx, m1, NULL, &out), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_block_mask_and(ctx, m1, m1, NULL), FLEX_ERR_NULL_POINTER);
    flex_block_mask *b2 = NULL, *b3 = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, a, 2, 1, 100, 100, 16, 16, &b2), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(ctx, a, 3, 1, 100, 100, 16, 16, &b3), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_or(ctx, b2, b3, &out), FLEX_ERR_SHAPE);
    ck_assert(strstr(flex_error_message(ctx), "broadcast") != NULL);
    flex_block_mask_destroy(m1);
    flex_block_mask_destroy(m2);
    flex_block_mask_destroy(m3);
    flex_block_mask_destroy(b2);
    flex_block_mask_destroy(b3);
    flex_mod_destroy(a);
}
END_TEST

/* PyTorch-style kv-block lists (counts + padded index rows) of a mask
 * built by analysis give back the same mask. */
START_TEST(test_from_kv_blocks_round_trip) {
    flex_mod *mod = compile_mask("(q // 30) == (kv // 50) || q >= kv + 90", NULL, 0, NULL, 0);
    flex_block_mask *m = NULL, *copy = NULL, *bad = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 2, 1, 333, 444, 16, 32, &m), FLEX_OK);
    const int64_t rows = 2 * m->num_q_blocks, nk = m->num_kv_blocks;
    int32_t *num = malloc(sizeof(int32_t) * rows), *idx = malloc(sizeof(int32_t) * rows * nk);
    int32_t *fnum = malloc(sizeof(int32_t) * rows), *fidx = malloc(sizeof(int32_t) * rows * nk);
    for (int64_t r = 0; r < rows; r++) {
        num[r] = m->kv_partial.offsets[r + 1] - m->kv_partial.offsets[r];
        fnum[r] = m->kv_full.offsets[r + 1] - m->kv_full.offsets[r];
        for (int64_t j = 0; j < nk; j++) {
            /* Padding past the counts is never read: fill it with junk. */
            idx[r * nk + j] = j < num[r] ? m->kv_partial.indices[m->kv_partial.offsets[r] + j] : -7;
            fidx[r * nk + j] = j < fnum[r] ? m->kv_full.indices[m->kv_full.offsets[r] + j] : 999;
        }
    }
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(ctx, mod, 2, 1, 333, 444, 16, 32, num, idx,
                                                    fnum, fidx, &copy),
                     FLEX_OK);
    const int64_t total = rows * nk;
    uint8_t *dense = malloc((size_t)total), *again = malloc((size_t)total);
    flex_block_mask_to_dense(m, dense);
    flex_block_mask_to_dense(copy, again);
    ck_assert_mem_eq(dense, again, (size_t)total);

    /* Without full lists every listed block is partial. */
    flex_block_mask_destroy(copy);
    copy = NULL;
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(ctx, mod, 2, 1, 333, 444, 16, 32, num, idx,
                                                    NULL, NULL, &copy),
                     FLEX_OK);
    ck_assert_int_eq(copy->num_full, 0);
    ck_assert_int_eq(copy->num_partial, m->num_partial);

    /* Named errors: index out of range, a block listed twice, a bad count,
     * one of the two full arrays missing. */
    int row = -1;
    for (int64_t r = 0; r < rows && row < 0; r++)
        if (num[r] > 0 && fnum[r] > 0) row = (int)r;
    ck_assert_int_ge(row, 0);
    const int32_t saved = idx[row * nk];
    idx[row * nk] = (int32_t)nk;
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(ctx, mod, 2, 1, 333, 444, 16, 32, num, idx,
                                                    fnum, fidx, &bad),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "kv_indices"));
    idx[row * nk] = fidx[row * nk];
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(ctx, mod, 2, 1, 333, 444, 16, 32, num, idx,
                                                    fnum, fidx, &bad),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "listed twice"));
    idx[row * nk] = saved;
    num[row] = (int32_t)nk + 1;
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(ctx, mod, 2, 1, 333, 444, 16, 32, num, idx,
                                                    fnum, fidx, &bad),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "kv_num_blocks"));
    ck_assert_int_eq(flex_block_mask_from_kv_blocks(ctx, mod, 2, 1, 333, 444, 16, 32, num, idx,
                                                    fnum, NULL, &bad),
                     FLEX_ERR_NULL_POINTER);
    ck_assert_ptr_null(bad);
    free(num);
    free(idx);
    free(fnum);
    free(fidx);
    free(dense);
    free(again);
    flex_block_mask_destroy(m);
    flex_block_mask_destroy(copy);
    flex_mod_destroy(mod);
}
END_TEST

START_TEST(test_from_classes_round_trip) {
    flex_mod *mod = compile_mask("(q // 30) == (kv // 50) || q >= kv + 90", NULL, 0, NULL, 0);
    flex_block_mask *m = NULL, *copy = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 2, 1, 333, 444, 16, 32, &m), FLEX_OK);
    int64_t total = 2 * m->num_q_blocks * m->num_kv_blocks;
    uint8_t *dense = malloc((size_t)total), *again = malloc((size_t)total);
    flex_block_mask_to_dense(m, dense);
    ck_assert_int_eq(flex_block_mask_from_classes(ctx, mod, 2, 1, 333, 444, 16, 32, dense, &copy),
                     FLEX_OK);
    flex_block_mask_to_dense(copy, again);
    ck_assert_mem_eq(dense, again, (size_t)total);
    check_lists(copy, again);
    int64_t rows = 2 * m->num_q_blocks, cols = 2 * m->num_kv_blocks;
    ck_assert_mem_eq(m->kv_full.offsets, copy->kv_full.offsets, sizeof(int32_t) * (rows + 1));
    ck_assert_mem_eq(m->q_partial.offsets, copy->q_partial.offsets, sizeof(int32_t) * (cols + 1));
    ck_assert_mem_eq(m->kv_full.indices, copy->kv_full.indices, sizeof(int32_t) * m->num_full);
    ck_assert_mem_eq(m->q_partial.indices, copy->q_partial.indices,
                     sizeof(int32_t) * m->num_partial);

    /* Bad classes and a partial block without a mod. */
    flex_block_mask *bad = NULL;
    dense[5] = 3;
    ck_assert_int_eq(flex_block_mask_from_classes(ctx, mod, 2, 1, 333, 444, 16, 32, dense, &bad),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(bad);
    dense[5] = FLEX_BLOCK_PARTIAL;
    ck_assert_int_eq(flex_block_mask_from_classes(ctx, NULL, 2, 1, 333, 444, 16, 32, dense, &bad),
                     FLEX_ERR_NULL_POINTER);
    memset(dense, FLEX_BLOCK_FULL, (size_t)total);
    ck_assert_int_eq(flex_block_mask_from_classes(ctx, NULL, 2, 1, 333, 444, 16, 32, dense, &bad),
                     FLEX_OK);
    ck_assert_double_eq(flex_block_mask_sparsity(bad), 0.0);
    flex_block_mask_destroy(bad);
    free(dense);
    free(again);
    flex_block_mask_destroy(m);
    flex_block_mask_destroy(copy);
    flex_mod_destroy(mod);
}
END_TEST

static int count_str(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + strlen(needle), needle))
        n++;
    return n;
}

START_TEST(test_format) {
    flex_mod *mod = compile_mask("q >= kv", NULL, 0, NULL, 0);
    flex_block_mask *m = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 64, 64, 16, 16, &m), FLEX_OK);
    size_t need = flex_block_mask_format(m, 0, 0, 0, NULL, 0);
    char *text = malloc(need + 1);
    ck_assert_uint_eq(flex_block_mask_format(m, 0, 0, 0, text, need + 1), need);
    ck_assert_uint_eq(strlen(text), need);
    /* 4 x 4 blocks: 4 partial on the diagonal, 6 full below it. */
    ck_assert_int_eq(count_str(text, "\xe2\x96\x88\xe2\x96\x88"), 6);
    ck_assert_int_eq(count_str(text, "\xe2\x96\x91\xe2\x96\x91"), 4);
    ck_assert_ptr_nonnull(strstr(text, "sparsity=37.50%"));
    int lines = count_str(text, "\n");
    ck_assert_int_eq(lines, 2 + 4); /* header, (b, h) line, one per row */
    /* A short buffer truncates but reports the full length. */
    char small[10];
    ck_assert_uint_eq(flex_block_mask_format(m, 0, 0, 0, small, sizeof small), need);
    ck_assert_uint_eq(strlen(small), sizeof small - 1);
    free(text);
    flex_block_mask_destroy(m);

    /* Shrinking: 64 x 64 blocks shown in 8 x 8 cells, densest class wins,
     * so the diagonal cells show full (each covers full blocks). */
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 1024, 1024, 16, 16, &m), FLEX_OK);
    need = flex_block_mask_format(m, 0, 0, 8, NULL, 0);
    text = malloc(need + 1);
    flex_block_mask_format(m, 0, 0, 8, text, need + 1);
    ck_assert_int_eq(count_str(text, "\n"), 2 + 8);
    ck_assert_int_eq(count_str(text, "\xe2\x96\x88\xe2\x96\x88"), 36);
    ck_assert_int_eq(count_str(text, "\xe2\x96\x91\xe2\x96\x91"), 0);
    free(text);
    flex_block_mask_destroy(m);
    flex_mod_destroy(mod);
}
END_TEST

START_TEST(test_misuse) {
    flex_mod *mod = compile_mask("q >= kv", NULL, 0, NULL, 0);
    flex_block_mask *m = NULL;
    ck_assert_int_eq(flex_block_mask_create(ctx, NULL, 1, 1, 64, 64, 0, 0, &m),
                     FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 64, 64, 0, 0, NULL),
                     FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_block_mask_create(NULL, mod, 1, 1, 64, 64, 0, 0, &m),
                     FLEX_ERR_NULL_POINTER);
    const int bad_blocks[] = {8, 48, 2048, -16, 1};
    for (int k = 0; k < 5; k++) {
        ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 64, 64, bad_blocks[k], 0, &m),
                         FLEX_ERR_INVALID_ARGUMENT);
        ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "q_block"));
        ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 64, 64, 16, bad_blocks[k], &m),
                         FLEX_ERR_INVALID_ARGUMENT);
        ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "kv_block"));
    }
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 0, 64, 0, 0, &m),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, 64, -3, 0, 0, &m),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, -1, 1, 64, 64, 0, 0, &m),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 65536, 65536, 4096, 4096, 16, 16, &m),
                     FLEX_ERR_UNSUPPORTED);
    ck_assert_ptr_null(m);

    flex_mod_desc sdesc = {FLEX_MOD_SCORE, "score * 2.0", NULL, 0, NULL, 0};
    flex_mod *score = NULL;
    ck_assert_int_eq(flex_mod_compile(ctx, &sdesc, &score), FLEX_OK);
    ck_assert_int_eq(flex_block_mask_create(ctx, score, 1, 1, 64, 64, 0, 0, &m),
                     FLEX_ERR_INVALID_ARGUMENT);

    flex_buffer_decl doc = {"doc", FLEX_I32, 1};
    flex_mod *unbound = compile_mask("doc[q] == doc[kv]", NULL, 0, &doc, 1);
    ck_assert_int_eq(flex_block_mask_create(ctx, unbound, 1, 1, 64, 64, 0, 0, &m),
                     FLEX_ERR_BUFFER_UNBOUND);
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "doc"));
    /* A buffer shorter than the sequence: reading it is out of range. */
    int32_t ids[40] = {0};
    int64_t n = 40;
    bind_i32(unbound, "doc", ids, 1, &n);
    ck_assert_int_eq(flex_block_mask_create(ctx, unbound, 1, 1, 64, 64, 16, 16, &m),
                     FLEX_ERR_BUFFER_BOUNDS);
    ck_assert_ptr_null(m);

    ck_assert_int_eq(flex_block_mask_get_shape(NULL, NULL), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_block_mask_to_dense(NULL, NULL), FLEX_ERR_NULL_POINTER);
    flex_block_mask_destroy(NULL);

    /* The host evaluator rejects blocks outside the grid. */
    flex_block_ref ref = {0, 0, 5, 0};
    uint8_t cls;
    ck_assert_int_eq(flex_block_mask_eval_host(ctx, mod, 64, 64, 16, 16, &ref, 1, &cls),
                     FLEX_ERR_INVALID_ARGUMENT);
    flex_mod_destroy(mod);
    flex_mod_destroy(score);
    flex_mod_destroy(unbound);
}
END_TEST

START_TEST(test_large_grid_is_exact) {
    /* Many blocks with few undecided ones: the subdivision's rectangles,
     * checked against the dense export and a direct per-block check of
     * the causal rule. */
    flex_mod *mod = compile_mask("q >= kv && q - kv <= 1000", NULL, 0, NULL, 0);
    flex_block_mask *m = NULL;
    const int64_t len = 20000;
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, 1, len, len, 16, 64, &m), FLEX_OK);
    int64_t nq = m->num_q_blocks, nk = m->num_kv_blocks;
    uint8_t *dense = malloc((size_t)(nq * nk));
    flex_block_mask_to_dense(m, dense);
    for (int64_t i = 0; i < nq; i++)
        for (int64_t j = 0; j < nk; j++) {
            int64_t q0 = i * 16, q1 = q0 + 15 < len - 1 ? q0 + 15 : len - 1;
            int64_t k0 = j * 64, k1 = k0 + 63 < len - 1 ? k0 + 63 : len - 1;
            /* every (q, kv) attends iff q - kv in [0, 1000] */
            int64_t dmin = q0 - k1, dmax = q1 - k0;
            int expect = dmax < 0 || dmin > 1000       ? FLEX_BLOCK_EMPTY
                         : (dmin >= 0 && dmax <= 1000) ? FLEX_BLOCK_FULL
                                                       : FLEX_BLOCK_PARTIAL;
            REQUIRE(dense[i * nk + j] == expect, "block (%lld, %lld) is %d, expected %d",
                    (long long)i, (long long)j, dense[i * nk + j], expect);
        }
    check_lists(m, dense);
    ck_assert(m->build_ms >= 0.0);
    free(dense);
    flex_block_mask_destroy(m);
    flex_mod_destroy(mod);
}
END_TEST

START_TEST(test_many_grids) {
    /* A per-head pattern that interval analysis decides block by block but
     * only at the finest level: enough work per grid that the grids may be
     * walked by several threads. Checked against the rule itself. */
    flex_mod *mod = compile_mask("(q // 16 + kv // 16 + h) % 3 != 0", NULL, 0, NULL, 0);
    flex_block_mask *m = NULL;
    const int64_t H = 4, len = 2048;
    ck_assert_int_eq(flex_block_mask_create(ctx, mod, 1, H, len, len, 16, 16, &m), FLEX_OK);
    int64_t nq = m->num_q_blocks, nk = m->num_kv_blocks;
    uint8_t *dense = malloc((size_t)(H * nq * nk));
    flex_block_mask_to_dense(m, dense);
    for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < nq; i++)
            for (int64_t j = 0; j < nk; j++) {
                int expect = (i + j + h) % 3 != 0 ? FLEX_BLOCK_FULL : FLEX_BLOCK_EMPTY;
                REQUIRE(dense[(h * nq + i) * nk + j] == expect, "h %lld block (%lld, %lld)",
                        (long long)h, (long long)i, (long long)j);
            }
    check_lists(m, dense);
    free(dense);
    flex_block_mask_destroy(m);
    flex_mod_destroy(mod);
}
END_TEST

static Suite *blockmask_suite(void) {
    Suite *s = suite_create("blockmask");
    TCase *tc = tcase_create("blockmask");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_every_mask_preset);
    tcase_add_test(tc, test_hand_written_masks);
    tcase_add_test(tc, test_subnormal_masks);
    tcase_add_test(tc, test_batch_and_head);
    tcase_add_test(tc, test_and_or);
    tcase_add_test(tc, test_and_or_errors);
    tcase_add_test(tc, test_from_classes_round_trip);
    tcase_add_test(tc, test_from_kv_blocks_round_trip);
    tcase_add_test(tc, test_format);
    tcase_add_test(tc, test_misuse);
    tcase_add_test(tc, test_large_grid_is_exact);
    tcase_add_test(tc, test_many_grids);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(blockmask_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
