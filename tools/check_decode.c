/*
 * Decode cases against the fp64 oracle (check_decode.h). The queries of
 * every position are drawn up front (host_q), so the oracle computes row
 * q_offsets[b] + i of full attention over batch b's first kv_lengths[b]
 * keys: exactly what the decode call must return, with mods at absolute
 * positions.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_decode.h"
#include "internal.h"
#include "oracle.h"
#include "tolerance.h"

static float rand_normalish(uint64_t *state) {
    double s = 0.0;
    for (int i = 0; i < 4; i++) {
        *state = *state * 6364136223846793005ull + 1442695040888963407ull;
        s += (double)(*state >> 11) / 9007199254740992.0;
    }
    return (float)((s - 2.0) * 1.7);
}

static int64_t off4(const flex_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return a * t->strides[0] + b * t->strides[1] + c * t->strides[2] + d * t->strides[3];
}

/* Copies n rows (all heads) of src batch sb from row sr to dst batch db,
 * row dr; same dtype, any strides. */
static void copy_rows(void *dst, const flex_tensor *dt, int64_t db, int64_t dr, const void *src,
                      const flex_tensor *st, int64_t sb, int64_t sr, int64_t n) {
    size_t es = flex_dtype_size(st->dtype);
    for (int64_t h = 0; h < st->sizes[1]; h++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t d = 0; d < st->sizes[3]; d++)
                memcpy((char *)dst + (size_t)off4(dt, db, h, dr + i, d) * es,
                       (const char *)src + (size_t)off4(st, sb, h, sr + i, d) * es, es);
}

void check_decode_free(check_decode_data *d) {
    for (int i = 0; i < 8; i++)
        if (d->dev[i]) flex_free(d->ctx, d->dev[i]);
    free(d->host_q);
    free(d->host_k);
    free(d->host_v);
    free(d->table);
    memset(d, 0, sizeof *d);
}

static int upload(check_decode_data *d, int i, const void *host, char *why, size_t cap) {
    if (flex_malloc(d->ctx, d->bytes[i] + 1, &d->dev[i]) != FLEX_OK ||
        (host && flex_copy_to_device(d->ctx, d->dev[i], host, d->bytes[i]) != FLEX_OK))
        return snprintf(why, cap, "device memory: %s", flex_error_message(d->ctx)), -1;
    return 0;
}

int check_decode_make(flex_context *ctx, const check_decode_case *c, uint64_t seed,
                      check_decode_data *d, char *why, size_t cap) {
    memset(d, 0, sizeof *d);
    d->ctx = ctx;
    flex_device_type dev = flex_context_device_type(ctx);
    int dev_index = flex_context_device_index(ctx);
    size_t es = flex_dtype_size(c->dtype);
    int64_t L = c->cap;
    size_t nq = (size_t)c->B * c->Hq * L * c->D, nk = (size_t)c->B * c->Hkv * L * c->D,
           nv = (size_t)c->B * c->Hkv * L * c->Dv;
    d->host_q = malloc(nq * es + 1);
    d->host_k = malloc(nk * es + 1);
    d->host_v = malloc(nv * es + 1);
    if (!d->host_q || !d->host_k || !d->host_v) return snprintf(why, cap, "out of memory"), -1;
    void *arrays[3] = {d->host_q, d->host_k, d->host_v};
    size_t counts[3] = {nq, nk, nv};
    for (int a = 0; a < 3; a++)
        for (size_t e = 0; e < counts[a]; e++)
            flex_store_from_float(arrays[a], c->dtype, (int64_t)e, rand_normalish(&seed));
    flex_tensor hq = flex_tensor_bhsd(d->host_q, c->dtype, c->B, c->Hq, L, c->D, FLEX_DEVICE_CPU);
    flex_tensor hk = flex_tensor_bhsd(d->host_k, c->dtype, c->B, c->Hkv, L, c->D, FLEX_DEVICE_CPU);
    flex_tensor hv = flex_tensor_bhsd(d->host_v, c->dtype, c->B, c->Hkv, L, c->Dv, FLEX_DEVICE_CPU);

    /* q: each batch's Lq rows from its offset. */
    flex_tensor q = flex_tensor_bhsd(NULL, c->dtype, c->B, c->Hq, c->Lq, c->D, FLEX_DEVICE_CPU);
    d->bytes[0] = (size_t)c->B * c->Hq * c->Lq * c->D * es;
    void *staging = malloc(d->bytes[0] + 1);
    if (!staging) return snprintf(why, cap, "out of memory"), -1;
    for (int b = 0; b < c->B; b++)
        copy_rows(staging, &q, b, 0, d->host_q, &hq, b, c->q_offsets[b], c->Lq);
    int rc = upload(d, 0, staging, why, cap);
    free(staging);
    if (rc) return -1;

    /* k and v: the cache, or pools of pages; NaN wherever no key belongs. */
    int64_t pages = 0, max_pages = 0, rows = L;
    int paged = c->page_size > 0;
    if (paged) {
        max_pages = (L + c->page_size - 1) / c->page_size;
        pages = (int64_t)c->B * max_pages + 1;
        rows = c->page_size;
    }
    int64_t kv_batch = paged ? pages : c->B;
    flex_tensor kt = paged ? flex_tensor_bshd(NULL, c->dtype, pages, c->Hkv, rows, c->D, dev)
                           : flex_tensor_bhsd(NULL, c->dtype, kv_batch, c->Hkv, rows, c->D, dev);
    flex_tensor vt = paged ? flex_tensor_bshd(NULL, c->dtype, pages, c->Hkv, rows, c->Dv, dev)
                           : flex_tensor_bhsd(NULL, c->dtype, kv_batch, c->Hkv, rows, c->Dv, dev);
    d->bytes[1] = (size_t)kv_batch * c->Hkv * rows * c->D * es;
    d->bytes[2] = (size_t)kv_batch * c->Hkv * rows * c->Dv * es;
    void *kc = malloc(d->bytes[1] + 1), *vc = malloc(d->bytes[2] + 1);
    if (paged) d->table = malloc((size_t)c->B * max_pages * sizeof(int32_t) + 1);
    if (!kc || !vc || (paged && !d->table)) {
        free(kc), free(vc);
        return snprintf(why, cap, "out of memory"), -1;
    }
    memset(kc, 0xff, d->bytes[1]);
    memset(vc, 0xff, d->bytes[2]);
    if (paged) {
        /* Page order: a fixed shuffle (or in order), page 0 left unused. */
        int64_t n = (int64_t)c->B * max_pages;
        for (int64_t i = 0; i < n; i++)
            d->table[i] = (int32_t)(i + 1);
        uint64_t s = seed ^ 0x5bd1e995u;
        for (int64_t i = n - 1; c->shuffle_pages && i > 0; i--) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            int64_t j = (int64_t)((s >> 11) % (uint64_t)(i + 1));
            int32_t t = d->table[i];
            d->table[i] = d->table[j], d->table[j] = t;
        }
        for (int b = 0; b < c->B; b++)
            for (int64_t p = 0; p < max_pages; p++) {
                int64_t first = p * c->page_size, left = c->kv_lengths[b] - first;
                int32_t *entry = &d->table[b * max_pages + p];
                if (left <= 0) {
                    *entry = -1; /* never read */
                    continue;
                }
                int64_t m = left < c->page_size ? left : c->page_size;
                copy_rows(kc, &kt, *entry, 0, d->host_k, &hk, b, first, m);
                copy_rows(vc, &vt, *entry, 0, d->host_v, &hv, b, first, m);
            }
        d->table_t = flex_tensor_contiguous(d->table, FLEX_I32, 2, (int64_t[]){c->B, max_pages},
                                            FLEX_DEVICE_CPU);
        d->opts.page_table = &d->table_t;
    } else {
        for (int b = 0; b < c->B; b++) {
            copy_rows(kc, &kt, b, 0, d->host_k, &hk, b, 0, c->kv_lengths[b]);
            copy_rows(vc, &vt, b, 0, d->host_v, &hv, b, 0, c->kv_lengths[b]);
        }
    }
    rc = upload(d, 1, kc, why, cap) || upload(d, 2, vc, why, cap);
    free(kc), free(vc);
    if (rc) return -1;
    d->bytes[3] = (size_t)c->B * c->Hq * c->Lq * c->Dv * es;
    d->bytes[4] = (size_t)c->B * c->Hq * c->Lq * sizeof(float);
    if (upload(d, 3, NULL, why, cap) || upload(d, 4, NULL, why, cap)) return -1;
    d->t[0] = flex_tensor_bhsd(d->dev[0], c->dtype, c->B, c->Hq, c->Lq, c->D, dev);
    d->t[1] = kt, d->t[1].data = d->dev[1];
    d->t[2] = vt, d->t[2].data = d->dev[2];
    d->t[3] = flex_tensor_bhsd(d->dev[3], c->dtype, c->B, c->Hq, c->Lq, c->Dv, dev);
    d->t[4] = flex_tensor_bhsd(d->dev[4], FLEX_F32, c->B, c->Hq, c->Lq, 1, dev);
    for (int i = 0; i < 5; i++)
        d->t[i].device_index = dev_index;
    d->offsets_t = flex_tensor_contiguous((void *)c->q_offsets, FLEX_I32, 1, (int64_t[]){c->B},
                                          FLEX_DEVICE_CPU);
    d->lengths_t = flex_tensor_contiguous((void *)c->kv_lengths, FLEX_I32, 1, (int64_t[]){c->B},
                                          FLEX_DEVICE_CPU);
    d->opts.q_offsets = &d->offsets_t;
    d->opts.kv_lengths = &d->lengths_t;
    d->opts.kv_splits = c->kv_splits;
    if (c->args_on_device && dev != FLEX_DEVICE_CPU) {
        /* The values where a serving loop keeps them: checked by the kernel. */
        flex_tensor *args[3] = {&d->offsets_t, &d->lengths_t, paged ? &d->table_t : NULL};
        for (int i = 0; i < 3; i++) {
            if (!args[i]) continue;
            d->bytes[5 + i] = (size_t)(args[i]->sizes[0] * (args[i]->ndim > 1 ? args[i]->sizes[1] : 1)) *
                              sizeof(int32_t);
            if (upload(d, 5 + i, args[i]->data, why, cap)) return -1;
            args[i]->data = d->dev[5 + i];
            args[i]->device = dev;
            args[i]->device_index = dev_index;
        }
    }
    return 0;
}

flex_status check_decode_forward(check_decode_data *d, const flex_mod *score,
                                 const flex_mod *mask_mod, const flex_block_mask *mask) {
    d->opts.mask_mod = mask ? NULL : mask_mod;
    flex_status st = flex_attention(d->ctx, &d->t[0], &d->t[1], &d->t[2], score, mask, &d->opts,
                                    &d->t[3], &d->t[4]);
    return st == FLEX_OK ? flex_synchronize(d->ctx) : st;
}

int check_decode_compare(check_decode_data *d, const check_decode_case *c, const flex_mod *score,
                         const flex_mod *mask_mod, double *rel, double *lse_err, char *why,
                         size_t cap) {
    size_t es = flex_dtype_size(c->dtype);
    size_t rows = (size_t)c->B * c->Hq * c->Lq;
    void *out = malloc(d->bytes[3] + 1);
    float *lse = malloc(d->bytes[4] + 1);
    double *buf = malloc(rows * ((size_t)c->Dv * 3 + 3) * sizeof(double) + 1);
    int64_t *row_ids = malloc((size_t)c->Lq * sizeof(int64_t) + 1);
    int rc = -1;
    if (!out || !lse || !buf || !row_ids) {
        snprintf(why, cap, "out of memory");
        goto done;
    }
    if (flex_copy_to_host(d->ctx, out, d->dev[3], d->bytes[3]) != FLEX_OK ||
        flex_copy_to_host(d->ctx, lse, d->dev[4], d->bytes[4]) != FLEX_OK) {
        snprintf(why, cap, "%s", flex_error_message(d->ctx));
        goto done;
    }
    double *ref = buf, *naive = ref + rows * c->Dv, *got = naive + rows * c->Dv;
    double *ref_lse = got + rows * c->Dv, *naive_lse = ref_lse + rows, *got_lse = naive_lse + rows;
    flex_tensor ot = flex_tensor_bhsd(out, c->dtype, c->B, c->Hq, c->Lq, c->Dv, FLEX_DEVICE_CPU);
    double slack = 0.0, max_v = 0.0;
    for (int b = 0; b < c->B; b++) {
        /* Batch b alone: its queries at every position, its keys cut to
         * its kv length. */
        oracle_problem p;
        memset(&p, 0, sizeof p);
        p.ctx = d->ctx;
        p.q = flex_tensor_bhsd((char *)d->host_q + (size_t)b * c->Hq * c->cap * c->D * es, c->dtype,
                               1, c->Hq, c->cap, c->D, FLEX_DEVICE_CPU);
        p.k = flex_tensor_bhsd((char *)d->host_k + (size_t)b * c->Hkv * c->cap * c->D * es,
                               c->dtype, 1, c->Hkv, c->cap, c->D, FLEX_DEVICE_CPU);
        p.v = flex_tensor_bhsd((char *)d->host_v + (size_t)b * c->Hkv * c->cap * c->Dv * es,
                               c->dtype, 1, c->Hkv, c->cap, c->Dv, FLEX_DEVICE_CPU);
        p.k.sizes[2] = p.v.sizes[2] = c->kv_lengths[b];
        p.score_mod = score;
        p.mask_mod = mask_mod;
        for (int i = 0; i < c->Lq; i++)
            row_ids[i] = c->q_offsets[b] + i;
        p.rows = row_ids;
        p.num_rows = c->Lq;
        size_t at = (size_t)b * c->Hq * c->Lq;
        if (c->kv_lengths[b] == 0) {
            /* No key at all: out 0, lse -inf (the oracle needs one key). */
            for (size_t r = at; r < at + (size_t)c->Hq * c->Lq; r++) {
                ref_lse[r] = naive_lse[r] = -INFINITY;
                for (int e = 0; e < c->Dv; e++)
                    ref[r * c->Dv + e] = naive[r * c->Dv + e] = 0.0;
            }
        } else {
            double s = 0.0;
            if (oracle_forward(&p, ref + at * c->Dv, ref_lse + at, why, cap) != 0 ||
                oracle_forward_naive(&p, naive + at * c->Dv, naive_lse + at, why, cap) != 0 ||
                oracle_approx_score_error(&p, &s, why, cap) != 0)
                goto done;
            if (s > slack) slack = s;
        }
        for (int h = 0; h < c->Hkv; h++)
            for (int j = 0; j < c->kv_lengths[b]; j++)
                for (int e = 0; e < c->Dv; e++) {
                    double x = fabs(oracle_load(&p.v, 0, h, j, e));
                    if (x > max_v) max_v = x;
                }
        for (int h = 0; h < c->Hq; h++)
            for (int i = 0; i < c->Lq; i++) {
                size_t r = at + (size_t)h * c->Lq + i;
                for (int e = 0; e < c->Dv; e++)
                    got[r * c->Dv + e] = oracle_load(&ot, b, h, i, e);
                got_lse[r] = lse[r];
            }
    }
    tol_report tr;
    int pass = tol_compare(c->dtype, TOL_OUTPUT, ref, naive, got, rows * (size_t)c->Dv,
                           2.0 * slack * max_v, &tr);
    *rel = tol_margin(&tr);
    if (!pass) snprintf(why, cap, "%s", tr.why);
    int lse_pass = tol_compare(c->dtype, TOL_LSE, ref_lse, naive_lse, got_lse, rows, slack, &tr);
    *lse_err = tol_margin(&tr);
    if (pass && !lse_pass) snprintf(why, cap, "%s", tr.why);
    rc = pass && lse_pass;
done:
    free(out);
    free(lse);
    free(buf);
    free(row_ids);
    return rc;
}
