/*
 * Backward timing for the attention benchmark (see bench_backward.h).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_backward.h"
#include "internal.h"
#include "clock.h"

enum { T_OUT = 0, T_LSE, T_DOUT, T_DQ, T_DK, T_DV, T_COUNT };

flex_status bench_backward_ms(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                              const flex_tensor *v, const flex_mod *score_mod,
                              const flex_block_mask *mask, int64_t warmup, int64_t iters,
                              double *ms) {
    int64_t B = q->sizes[0], Hq = q->sizes[1], Lq = q->sizes[2], D = q->sizes[3];
    int64_t Hkv = k->sizes[1], Lkv = k->sizes[2], Dv = v->sizes[3];
    int64_t dims[T_COUNT][4] = {{B, Hq, Lq, Dv}, {B, Hq, Lq, 1},   {B, Hq, Lq, Dv},
                                {B, Hq, Lq, D},  {B, Hkv, Lkv, D}, {B, Hkv, Lkv, Dv}};
    void *dev[T_COUNT] = {0};
    flex_tensor t[T_COUNT];
    double *times = NULL;
    void *host = NULL;
    flex_status st = FLEX_OK;
    if (iters < 1) iters = 1;
    for (int i = 0; i < T_COUNT && st == FLEX_OK; i++) {
        flex_dtype dt = i == T_LSE ? FLEX_F32 : q->dtype;
        size_t n = (size_t)(dims[i][0] * dims[i][1] * dims[i][2] * dims[i][3]);
        size_t bytes = n * flex_dtype_size(dt);
        st = flex_malloc(ctx, bytes + 1, &dev[i]);
        if (st == FLEX_OK && i == T_DOUT) {
            host = malloc(bytes + 1);
            if (!host) {
                st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no host memory for dout");
                break;
            }
            uint64_t s = 0x853c49e6748fea9bull;
            for (size_t e = 0; e < n; e++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                float x = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
                flex_store_from_float(host, dt, (int64_t)e, x);
            }
            st = flex_copy_to_device(ctx, dev[i], host, bytes);
        }
        t[i] =
            flex_tensor_bhsd(dev[i], dt, dims[i][0], dims[i][1], dims[i][2], dims[i][3], q->device);
        t[i].device_index = q->device_index;
    }
    if (st == FLEX_OK)
        st = flex_attention(ctx, q, k, v, score_mod, mask, NULL, &t[T_OUT], &t[T_LSE]);
    if (st == FLEX_OK) st = flex_synchronize(ctx);
    if (st == FLEX_OK && !(times = malloc((size_t)iters * sizeof *times)))
        st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no host memory for the timings");
    for (int64_t i = 0; st == FLEX_OK && i < warmup + iters; i++) {
        double t0 = flex_now_ms();
        st = flex_attention_backward(ctx, q, k, v, &t[T_OUT], &t[T_DOUT], &t[T_LSE], score_mod,
                                     mask, NULL, &t[T_DQ], &t[T_DK], &t[T_DV], NULL, 0);
        if (st == FLEX_OK) st = flex_synchronize(ctx);
        if (st == FLEX_OK && i >= warmup) times[i - warmup] = flex_now_ms() - t0;
    }
    if (st == FLEX_OK) {
        qsort(times, (size_t)iters, sizeof *times, flex_compare_doubles);
        *ms = iters % 2 ? times[iters / 2] : 0.5 * (times[iters / 2 - 1] + times[iters / 2]);
    }
    for (int i = 0; i < T_COUNT; i++)
        if (dev[i]) flex_free(ctx, dev[i]);
    free(host);
    free(times);
    return st;
}
