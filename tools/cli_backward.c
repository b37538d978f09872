/*
 * The backward pass for the `flexattn` subcommands (see cli_backward.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_backward.h"
#include "internal.h"
#include "oracle.h"
#include "oracle_backward.h"
#include "tolerance.h"
#include "clock.h"

static void fill_dout(void *p, flex_dtype dt, size_t n) {
    uint64_t s = 0x5851f42d4c957f2dull;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        float v = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        flex_store_from_float(p, dt, (int64_t)i, v);
    }
}

int cli_backward_prepare(cli_backward_state *st, const cli_backward_problem *p, char *why,
                         size_t cap) {
    memset(st, 0, sizeof *st);
    st->p = *p;
    flex_context *ctx = p->ctx;
    int64_t B = p->q.sizes[0], Hq = p->q.sizes[1], Lq = p->q.sizes[2], D = p->q.sizes[3];
    int64_t Hkv = p->k.sizes[1], Lkv = p->k.sizes[2], Dv = p->v.sizes[3];
    flex_dtype dt = p->q.dtype;
    int64_t dims[CLI_BW_COUNT][4] = {{B, Hq, Lq, Dv}, {B, Hq, Lq, 1},   {B, Hq, Lq, Dv},
                                     {B, Hq, Lq, D},  {B, Hkv, Lkv, D}, {B, Hkv, Lkv, Dv}};
    for (int i = 0; i < CLI_BW_COUNT; i++) {
        flex_dtype t = i == CLI_BW_LSE ? FLEX_F32 : dt;
        st->bytes[i] =
            (size_t)(dims[i][0] * dims[i][1] * dims[i][2] * dims[i][3]) * flex_dtype_size(t);
        if (flex_malloc(ctx, st->bytes[i] + 1, &st->dev[i]) != FLEX_OK)
            return snprintf(why, cap, "device memory: %s", flex_error_message(ctx)), -1;
        st->t[i] = flex_tensor_bhsd(st->dev[i], t, dims[i][0], dims[i][1], dims[i][2], dims[i][3],
                                    p->q.device);
        st->t[i].device_index = p->q.device_index;
    }
    size_t n = st->bytes[CLI_BW_DOUT] / flex_dtype_size(dt);
    st->host_dout = malloc(st->bytes[CLI_BW_DOUT] + 1);
    if (!st->host_dout) return snprintf(why, cap, "out of host memory"), -1;
    fill_dout(st->host_dout, dt, n);
    if (flex_copy_to_device(ctx, st->dev[CLI_BW_DOUT], st->host_dout, st->bytes[CLI_BW_DOUT]) !=
        FLEX_OK)
        return snprintf(why, cap, "%s", flex_error_message(ctx)), -1;
    flex_status s = flex_attention(ctx, &p->q, &p->k, &p->v, p->score_mod, p->mask, NULL,
                                   &st->t[CLI_BW_OUT], &st->t[CLI_BW_LSE]);
    if (s == FLEX_OK) s = flex_synchronize(ctx);
    if (s != FLEX_OK) return snprintf(why, cap, "forward: %s", flex_error_message(ctx)), -1;
    return 0;
}

static flex_status run_backward_grads(cli_backward_state *st, const flex_buffer_grad *grads,
                                      int num_grads) {
    const cli_backward_problem *p = &st->p;
    const flex_attention_options opts = {.deterministic = p->deterministic};
    flex_status s = flex_attention_backward(p->ctx, &p->q, &p->k, &p->v, &st->t[CLI_BW_OUT],
                                            &st->t[CLI_BW_DOUT], &st->t[CLI_BW_LSE], p->score_mod,
                                            p->mask, &opts, &st->t[CLI_BW_DQ], &st->t[CLI_BW_DK],
                                            &st->t[CLI_BW_DV], grads, num_grads);
    if (s == FLEX_OK) s = flex_synchronize(p->ctx);
    return s;
}

static flex_status run_backward(cli_backward_state *st) {
    return run_backward_grads(st, NULL, 0);
}

int cli_backward_run_with_buffer_grads(cli_backward_state *st, const flex_buffer_grad *grads,
                                       int num_grads, char *why, size_t cap) {
    if (run_backward_grads(st, grads, num_grads) != FLEX_OK)
        return snprintf(why, cap, "backward: %s", flex_error_message(st->p.ctx)), -1;
    return 0;
}

int cli_backward_time(cli_backward_state *st, int warmup, int iters, double *ms, char *why,
                      size_t cap) {
    if (iters < 1) iters = 1;
    double *t = malloc((size_t)iters * sizeof *t);
    if (!t) return snprintf(why, cap, "out of host memory"), -1;
    for (int i = 0; i < warmup + iters; i++) {
        double t0 = flex_now_ms();
        flex_status s = run_backward(st);
        if (s != FLEX_OK) {
            snprintf(why, cap, "backward: %s", flex_error_message(st->p.ctx));
            free(t);
            return s == FLEX_ERR_UNSUPPORTED ? -2 : -1;
        }
        if (i >= warmup) t[i - warmup] = flex_now_ms() - t0;
    }
    qsort(t, (size_t)iters, sizeof *t, flex_compare_doubles);
    *ms = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
    free(t);
    return 0;
}

/* A (B, H, S, D) host tensor into dense doubles; a NaN (an element left
 * unwritten) makes the comparison fail. */
static void to_doubles(const flex_tensor *t, double *dst) {
    size_t at = 0;
    for (int64_t a = 0; a < t->sizes[0]; a++)
        for (int64_t b = 0; b < t->sizes[1]; b++)
            for (int64_t c = 0; c < t->sizes[2]; c++)
                for (int64_t d = 0; d < t->sizes[3]; d++)
                    dst[at++] = oracle_load(t, a, b, c, d);
}

int cli_backward_check(cli_backward_state *st, double *rel, char *why, size_t cap) {
    const cli_backward_problem *p = &st->p;
    flex_context *ctx = p->ctx;
    *rel = NAN;
    void *poison = NULL, *host[3] = {NULL, NULL, NULL};
    double *ref[3] = {NULL, NULL, NULL}, *naive[3] = {NULL, NULL, NULL}, *got = NULL;
    int rc = -1;
    size_t biggest = 0;
    for (int i = CLI_BW_DQ; i <= CLI_BW_DV; i++)
        if (st->bytes[i] > biggest) biggest = st->bytes[i];
    poison = malloc(biggest + 1);
    if (!poison) {
        snprintf(why, cap, "out of host memory");
        goto done;
    }
    memset(poison, 0xff, biggest + 1); /* NaN in f32, f16 and bf16 */
    for (int i = CLI_BW_DQ; i <= CLI_BW_DV; i++)
        if (flex_copy_to_device(ctx, st->dev[i], poison, st->bytes[i]) != FLEX_OK) {
            snprintf(why, cap, "%s", flex_error_message(ctx));
            goto done;
        }
    flex_status s = run_backward(st);
    if (s != FLEX_OK) {
        snprintf(why, cap, "backward: %s", flex_error_message(ctx));
        rc = s == FLEX_ERR_UNSUPPORTED ? -2 : -1;
        goto done;
    }
    size_t elems[3];
    for (int i = 0; i < 3; i++) {
        const flex_tensor *t = &st->t[CLI_BW_DQ + i];
        elems[i] = (size_t)(t->sizes[0] * t->sizes[1] * t->sizes[2] * t->sizes[3]);
        host[i] = malloc(st->bytes[CLI_BW_DQ + i] + 1);
        ref[i] = malloc((elems[i] + 1) * sizeof(double));
        if (!host[i] || !ref[i]) {
            snprintf(why, cap, "out of host memory");
            goto done;
        }
        if (flex_copy_to_host(ctx, host[i], st->dev[CLI_BW_DQ + i], st->bytes[CLI_BW_DQ + i]) !=
            FLEX_OK) {
            snprintf(why, cap, "%s", flex_error_message(ctx));
            goto done;
        }
    }
    oracle_problem op;
    memset(&op, 0, sizeof op);
    op.ctx = ctx;
    op.q = p->host_q, op.k = p->host_k, op.v = p->host_v;
    op.score_mod = p->score_mod;
    op.mask_mod = p->mask_mod;
    flex_tensor dout = st->t[CLI_BW_DOUT];
    dout.data = st->host_dout;
    dout.device = FLEX_DEVICE_CPU;
    if (oracle_backward(&op, &dout, ref[0], ref[1], ref[2], NULL, 0, why, cap) != 0) goto done;
    for (int i = 0; i < 3; i++) {
        naive[i] = malloc((elems[i] + 1) * sizeof(double));
        if (!naive[i]) {
            snprintf(why, cap, "out of host memory");
            goto done;
        }
    }
    if (oracle_backward_naive(&op, &dout, naive[0], naive[1], naive[2], NULL, 0, why, cap) != 0)
        goto done;
    static const char *const names[3] = {"dq", "dk", "dv"};
    double worst = 0.0;
    int pass = 1;
    for (int i = 0; i < 3; i++) {
        got = malloc((elems[i] + 1) * sizeof(double));
        if (!got) {
            snprintf(why, cap, "out of host memory");
            goto done;
        }
        flex_tensor t = st->t[CLI_BW_DQ + i];
        t.data = host[i];
        t.device = FLEX_DEVICE_CPU;
        to_doubles(&t, got);
        double e = oracle_rel_error(ref[i], got, elems[i]);
        if (!(e <= worst)) worst = e;
        tol_report r;
        if (pass && !tol_compare(p->q.dtype, TOL_GRADIENT, ref[i], naive[i], got, elems[i], 0.0,
                                 &r)) {
            pass = 0;
            snprintf(why, cap, "%s: %s", names[i], r.why);
        }
        free(got);
        got = NULL;
    }
    *rel = worst;
    rc = pass;
done:
    free(poison);
    free(got);
    for (int i = 0; i < 3; i++) {
        free(host[i]);
        free(ref[i]);
        free(naive[i]);
    }
    return rc;
}

void cli_backward_free(cli_backward_state *st) {
    for (int i = 0; i < CLI_BW_COUNT; i++)
        if (st->dev[i]) flex_free(st->p.ctx, st->dev[i]);
    free(st->host_dout);
    memset(st, 0, sizeof *st);
}
