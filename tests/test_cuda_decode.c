/*
 * The CUDA decode path (backends/cuda/flex_decode.cuh) against the CPU
 * decode path on the same inputs: out and lse of few query rows at
 * per-batch offsets against a cache with per-batch kv lengths (one of them
 * empty), contiguous or in shuffled pages, with GQA packing of every row
 * tile count, per-head block masks of small and large blocks, score mods
 * that read a buffer, unaligned head dims, D 256, more than one window of
 * block classes, forced and policy split counts, and offsets, lengths and
 * page tables on the host and on the device. The CPU decode is itself
 * checked against the fp64 oracle (test_decode, `flexattn check`). Also:
 * a paged cache gives the same bits as a contiguous one; device-resident
 * values out of range are clamped and named by flex_synchronize. Without a
 * usable CUDA backend the program prints "SKIPPED: <reason>" and exits 77.
 * It needs no test library (GPU machines may lack it).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "dtype.h"

#include "gpu_test.h"


typedef struct dec_case {
    const char *name;
    flex_dtype dt;
    int B, Hq, Hkv, Lq, D, Dv, cap;
    int page_size;      /* 0: contiguous */
    int kv_splits;      /* the hint (0: policy) */
    const char *mask;   /* NULL: none */
    int block;          /* the mask's q and kv block */
    const char *score;  /* NULL: none; may read slopes[h] */
    int args_on_device; /* offsets, lengths, page table on the GPU */
} dec_case;

static uint64_t rng = 0x2545f4914f6cdd1dull;
static float uniform(void) {
    return gpu_test_uniform(&rng);
}

static flex_mod *compile_mod(flex_context *ctx, flex_mod_kind kind, const char *text,
                             const flex_tensor *slopes) {
    const flex_buffer_decl decl = {"slopes", FLEX_F32, 1};
    const int reads = strstr(text, "slopes") != NULL; /* a declared buffer must be bound */
    const flex_mod_desc desc = {kind, text, NULL, 0, &decl, reads};
    flex_mod *m = NULL;
    if (flex_mod_compile(ctx, &desc, &m) != FLEX_OK ||
        (reads && flex_mod_bind_buffer(ctx, m, "slopes", slopes) != FLEX_OK)) {
        fprintf(stderr, "FAIL: mod '%s': %s\n", text, flex_error_message(ctx));
        exit(1);
    }
    return m;
}

/* The inputs of one case on the host: q rows, the contiguous cache, the
 * per-batch offsets and lengths, and a shuffled page pool of the cache. */
typedef struct dec_inputs {
    void *q, *k, *v, *kp, *vp;
    int32_t *offsets, *lengths, *table;
    int64_t pages, max_pages;
} dec_inputs;

static void make_inputs(const dec_case *c, dec_inputs *in) {
    const size_t es = flex_dtype_size(c->dt);
    const int64_t nq = (int64_t)c->B * c->Hq * c->Lq * c->D;
    const int64_t nk = (int64_t)c->B * c->Hkv * c->cap * c->D;
    const int64_t nv = (int64_t)c->B * c->Hkv * c->cap * c->Dv;
    in->q = malloc((size_t)nq * es);
    in->k = malloc((size_t)nk * es);
    in->v = malloc((size_t)nv * es);
    for (int64_t i = 0; i < nq; i++)
        flex_store_from_float(in->q, c->dt, i, uniform());
    for (int64_t i = 0; i < nk; i++)
        flex_store_from_float(in->k, c->dt, i, uniform());
    for (int64_t i = 0; i < nv; i++)
        flex_store_from_float(in->v, c->dt, i, uniform());
    in->offsets = malloc((size_t)c->B * 4);
    in->lengths = malloc((size_t)c->B * 4);
    for (int b = 0; b < c->B; b++) {
        /* the full cache, an uneven part, one key, none */
        const int len = b == 0 ? c->cap : b == 1 ? c->cap / 2 + 3 : b == 2 ? 1 : 0;
        in->lengths[b] = len;
        in->offsets[b] = len >= c->Lq ? len - c->Lq : 0;
    }
    in->kp = in->vp = NULL;
    in->table = NULL;
    if (!c->page_size) return;
    const int ps = c->page_size;
    in->max_pages = (c->cap + ps - 1) / ps;
    in->pages = c->B * in->max_pages + 1;
    in->table = malloc((size_t)(c->B * in->max_pages) * 4);
    const int64_t n = c->B * in->max_pages;
    for (int64_t i = 0; i < n; i++)
        in->table[i] = (int32_t)(i + 1);
    for (int64_t i = n - 1; i > 0; i--) {
        const int64_t j = (int64_t)((gpu_test_next(&rng) >> 11) % (uint64_t)(i + 1));
        const int32_t t = in->table[i];
        in->table[i] = in->table[j], in->table[j] = t;
    }
    /* pools (pages, page_size, Hkv, D), NaN where no key belongs */
    const size_t kbytes = (size_t)(in->pages * ps * c->Hkv * c->D) * es;
    const size_t vbytes = (size_t)(in->pages * ps * c->Hkv * c->Dv) * es;
    in->kp = malloc(kbytes);
    in->vp = malloc(vbytes);
    memset(in->kp, 0xff, kbytes);
    memset(in->vp, 0xff, vbytes);
    for (int b = 0; b < c->B; b++)
        for (int64_t p = 0; p < in->max_pages; p++) {
            if (p * ps >= in->lengths[b]) {
                in->table[b * in->max_pages + p] = -1; /* never read */
                continue;
            }
            const int64_t page = in->table[b * in->max_pages + p];
            for (int r = 0; r < ps && p * ps + r < c->cap; r++)
                for (int hk = 0; hk < c->Hkv; hk++) {
                    const int64_t src = (((int64_t)b * c->Hkv + hk) * c->cap + p * ps + r);
                    const int64_t dst = ((page * ps + r) * c->Hkv + hk);
                    memcpy((char *)in->kp + (size_t)(dst * c->D) * es,
                           (char *)in->k + (size_t)(src * c->D) * es, (size_t)c->D * es);
                    memcpy((char *)in->vp + (size_t)(dst * c->Dv) * es,
                           (char *)in->v + (size_t)(src * c->Dv) * es, (size_t)c->Dv * es);
                }
        }
}

static void free_inputs(dec_inputs *in) {
    free(in->q), free(in->k), free(in->v), free(in->kp), free(in->vp);
    free(in->offsets), free(in->lengths), free(in->table);
}

/* One decode call on ctx; out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) come back
 * to the host. paged: the page pool, else the contiguous cache. */
static flex_status decode_on(flex_context *ctx, const dec_case *c, const dec_inputs *in, int paged,
                             int args_on_device, const flex_tensor *slopes, void *out_host,
                             float *lse_host) {
    const int dev = ctx == gpu;
    const flex_device_type dt_dev = dev ? FLEX_DEVICE_CUDA : FLEX_DEVICE_CPU;
    const size_t es = flex_dtype_size(c->dt);
    const size_t qb = (size_t)(c->B * c->Hq * c->Lq * c->D) * es;
    const size_t ob = (size_t)(c->B * c->Hq * c->Lq * c->Dv) * es;
    const size_t lb = (size_t)(c->B * c->Hq * c->Lq) * 4;
    const int64_t rows = paged ? c->page_size : c->cap, kb = paged ? in->pages : c->B;
    const size_t kbytes = (size_t)(kb * c->Hkv * rows * c->D) * es;
    const size_t vbytes = (size_t)(kb * c->Hkv * rows * c->Dv) * es;
    const void *ksrc = paged ? in->kp : in->k, *vsrc = paged ? in->vp : in->v;
    void *q = dev ? to_gpu(in->q, qb) : in->q, *k = dev ? to_gpu(ksrc, kbytes) : (void *)ksrc;
    void *v = dev ? to_gpu(vsrc, vbytes) : (void *)vsrc;
    void *out = dev ? to_gpu(NULL, ob) : out_host, *lse = dev ? to_gpu(NULL, lb) : lse_host;
    if (dev) { /* poisoned: every element must be written */
        memset(out_host, 0x7f, ob);
        flex_copy_to_device(gpu, out, out_host, ob);
        flex_copy_to_device(gpu, lse, out_host, lb);
    }
    flex_tensor tq = flex_tensor_bhsd(q, c->dt, c->B, c->Hq, c->Lq, c->D, dt_dev);
    flex_tensor tk = paged ? flex_tensor_bshd(k, c->dt, in->pages, c->Hkv, rows, c->D, dt_dev)
                           : flex_tensor_bhsd(k, c->dt, c->B, c->Hkv, rows, c->D, dt_dev);
    flex_tensor tv = paged ? flex_tensor_bshd(v, c->dt, in->pages, c->Hkv, rows, c->Dv, dt_dev)
                           : flex_tensor_bhsd(v, c->dt, c->B, c->Hkv, rows, c->Dv, dt_dev);
    flex_tensor to = flex_tensor_bhsd(out, c->dt, c->B, c->Hq, c->Lq, c->Dv, dt_dev);
    flex_tensor tl = flex_tensor_bhsd(lse, FLEX_F32, c->B, c->Hq, c->Lq, 1, dt_dev);
    const int on_dev = dev && args_on_device;
    void *off = on_dev ? to_gpu(in->offsets, (size_t)c->B * 4) : in->offsets;
    void *len = on_dev ? to_gpu(in->lengths, (size_t)c->B * 4) : in->lengths;
    void *tab = paged && on_dev ? to_gpu(in->table, (size_t)(c->B * in->max_pages) * 4) : in->table;
    const flex_device_type arg_dev = on_dev ? FLEX_DEVICE_CUDA : FLEX_DEVICE_CPU;
    flex_tensor t_off = flex_tensor_contiguous(off, FLEX_I32, 1, (int64_t[]){c->B}, arg_dev);
    flex_tensor t_len = flex_tensor_contiguous(len, FLEX_I32, 1, (int64_t[]){c->B}, arg_dev);
    flex_tensor t_tab =
        flex_tensor_contiguous(tab, FLEX_I32, 2, (int64_t[]){c->B, in->max_pages}, arg_dev);
    flex_mod *mask_mod = c->mask ? compile_mod(ctx, FLEX_MOD_MASK, c->mask, slopes) : NULL;
    flex_mod *score = c->score ? compile_mod(ctx, FLEX_MOD_SCORE, c->score, slopes) : NULL;
    flex_block_mask *bm = NULL;
    flex_status s = FLEX_OK;
    /* in logical positions: a paged cache's length is whole pages */
    const int64_t kv_len = c->page_size ? in->max_pages * c->page_size : c->cap;
    if (mask_mod)
        s = flex_block_mask_create(ctx, mask_mod, 1, c->Hq, kv_len + c->Lq, kv_len, c->block,
                                   c->block, &bm);
    flex_attention_options o = {.q_offsets = &t_off, .kv_lengths = &t_len,
                                .page_table = paged ? &t_tab : NULL, .kv_splits = c->kv_splits};
    if (!s) s = flex_attention(ctx, &tq, &tk, &tv, score, bm, &o, &to, &tl);
    if (!s) s = flex_synchronize(ctx);
    if (!s && dev) s = flex_copy_to_host(gpu, out_host, out, ob);
    if (!s && dev) s = flex_copy_to_host(gpu, lse_host, lse, lb);
    if (s) fprintf(stderr, "  %s: %s\n", dev ? "cuda" : "cpu", flex_error_message(ctx));
    flex_block_mask_destroy(bm);
    flex_mod_destroy(mask_mod);
    flex_mod_destroy(score);
    if (dev) {
        flex_free(gpu, q), flex_free(gpu, k), flex_free(gpu, v), flex_free(gpu, out);
        flex_free(gpu, lse);
        if (on_dev) {
            flex_free(gpu, off), flex_free(gpu, len);
            if (paged) flex_free(gpu, tab);
        }
    }
    return s;
}

static void run_case(const dec_case *c) {
    dec_inputs in;
    make_inputs(c, &in);
    const size_t es = flex_dtype_size(c->dt);
    const int64_t no = (int64_t)c->B * c->Hq * c->Lq * c->Dv, nl = (int64_t)c->B * c->Hq * c->Lq;
    float *slopes_h = malloc((size_t)c->Hq * 4);
    for (int h = 0; h < c->Hq; h++)
        slopes_h[h] = -0.05f * (float)(h + 1);
    void *slopes_d = to_gpu(slopes_h, (size_t)c->Hq * 4);
    const flex_tensor sl_cpu =
        flex_tensor_contiguous(slopes_h, FLEX_F32, 1, (int64_t[]){c->Hq}, FLEX_DEVICE_CPU);
    const flex_tensor sl_gpu =
        flex_tensor_contiguous(slopes_d, FLEX_F32, 1, (int64_t[]){c->Hq}, FLEX_DEVICE_CUDA);
    void *ref = malloc((size_t)no * es), *got = malloc((size_t)no * es),
         *flat = malloc((size_t)no * es);
    float *ref_l = malloc((size_t)nl * 4), *got_l = malloc((size_t)nl * 4),
          *flat_l = malloc((size_t)nl * 4);
    const int paged = c->page_size > 0;
    flex_status s = decode_on(cpu, c, &in, 0, 0, &sl_cpu, ref, ref_l);
    if (!s) s = decode_on(gpu, c, &in, paged, c->args_on_device, &sl_gpu, got, got_l);
    if (!s && paged) s = decode_on(gpu, c, &in, 0, c->args_on_device, &sl_gpu, flat, flat_l);
    int ok = s == FLEX_OK;
    double err = 0.0, ref_max = 0.0, lse_err = 0.0;
    for (int64_t i = 0; ok && i < no; i++) {
        const double a = flex_load_as_float(got, c->dt, i), b = flex_load_as_float(ref, c->dt, i);
        const double d = fabs(a - b);
        if (!(d <= err)) err = d;
        if (fabs(b) > ref_max) ref_max = fabs(b);
    }
    for (int64_t i = 0; ok && i < nl; i++) {
        if (isinf(ref_l[i]) && ref_l[i] < 0) {
            if (!(isinf(got_l[i]) && got_l[i] < 0)) lse_err = INFINITY;
            continue;
        }
        const double d = fabs((double)got_l[i] - ref_l[i]) / (1.0 + fabs(ref_l[i]));
        if (!(d <= lse_err)) lse_err = d;
    }
    const double rel = ref_max > 0 ? err / ref_max : err;
    const double tol = c->dt == FLEX_BF16 ? 1.6e-2 : c->dt == FLEX_F16 ? 2e-3 : 2e-5;
    const int same_bits = !paged || (memcmp(got, flat, (size_t)no * es) == 0 &&
                                     memcmp(got_l, flat_l, (size_t)nl * 4) == 0);
    free(ref), free(got), free(flat), free(ref_l), free(got_l), free(flat_l), free(slopes_h);
    flex_free(gpu, slopes_d);
    free_inputs(&in);
    EXPECT(ok, "%s: a call failed", c->name);
    EXPECT(rel <= tol, "%s: out differs from the CPU decode by %.3g (relative; tolerance %.3g)",
           c->name, rel, tol);
    EXPECT(lse_err <= 1e-4, "%s: lse differs from the CPU decode by %.3g", c->name, lse_err);
    EXPECT(same_bits, "%s: the paged cache and the contiguous one gave different bits", c->name);
    printf("  %-58s out %.2e  lse %.2e\n", c->name, rel, lse_err);
}

static const dec_case cases[] = {
    {"bf16 q1 gqa 4:1 pages 16 causal+bias, 2 windows, 1 split", FLEX_BF16, 3, 8, 2, 1, 128, 128,
     5000, 16, 1, "q >= kv", 128, "score + slopes[h] * float(kv - q) * 0.01", 0},
    {"bf16 q1 gqa 4:1 pages 16 causal+bias, args on device", FLEX_BF16, 3, 8, 2, 1, 128, 128, 5000,
     16, 0, "q >= kv", 128, "score + slopes[h] * float(kv - q) * 0.01", 1},
    {"f16 q16 gqa 4:1 (4 row tiles) pages 64 per-head window, blocks 16", FLEX_F16, 3, 16, 4, 16,
     64, 64, 700, 64, 0, "q >= kv && q - kv < 40 * (h + 1)", 16, NULL, 1},
    {"bf16 q3 no gqa, D100/Dv72 (unaligned), no mask", FLEX_BF16, 4, 4, 4, 3, 100, 72, 300, 0, 0,
     NULL, 0, "score * 0.5", 0},
    {"bf16 q2 gqa 16:1 (2 row tiles) D256, documents, blocks 1024", FLEX_BF16, 3, 16, 1, 2, 256,
     256, 2100, 0, 3, "q >= kv && q / 300 == kv / 300", 1024, NULL, 0},
    {"bf16 q5 gqa 8:1 (40 packed rows) pages 48 softcap, splits 7", FLEX_BF16, 3, 8, 1, 5, 64,
     128, 1000, 48, 7, NULL, 0, "30.0 * tanh(score / 30.0)", 1},
    {"f32 q4 gqa 2:1 pages 32 causal+bias", FLEX_F32, 3, 4, 2, 4, 64, 64, 1500, 32, 0, "q >= kv",
     64, "score + slopes[h] * float(kv - q) * 0.01", 1},
    {"f32 q1 no mask, 1 split", FLEX_F32, 2, 2, 2, 1, 128, 64, 777, 0, 1, NULL, 0, NULL, 0},
};

/* Device-resident values out of range: the kernel clamps them and
 * flex_synchronize reports the argument by name. */
static void test_device_values_out_of_range(void) {
    const int B = 2, H = 2, L = 256, D = 64;
    const size_t qb = (size_t)B * H * D * 2, kb = (size_t)B * H * L * D * 2;
    void *zeros = calloc(1, kb);
    void *q = to_gpu(zeros, qb), *k = to_gpu(zeros, kb), *v = to_gpu(zeros, kb);
    void *out = to_gpu(zeros, qb), *lse = to_gpu(zeros, (size_t)B * H * 4);
    flex_tensor tq = flex_tensor_bhsd(q, FLEX_BF16, B, H, 1, D, FLEX_DEVICE_CUDA);
    flex_tensor tk = flex_tensor_bhsd(k, FLEX_BF16, B, H, L, D, FLEX_DEVICE_CUDA);
    flex_tensor tv = flex_tensor_bhsd(v, FLEX_BF16, B, H, L, D, FLEX_DEVICE_CUDA);
    flex_tensor to = flex_tensor_bhsd(out, FLEX_BF16, B, H, 1, D, FLEX_DEVICE_CUDA);
    flex_tensor tl = flex_tensor_bhsd(lse, FLEX_F32, B, H, 1, 1, FLEX_DEVICE_CUDA);
    /* pages of 64: (8 pages, H, 64, D) viewed over k's memory */
    flex_tensor pk = flex_tensor_bshd(k, FLEX_BF16, 8, H, 64, D, FLEX_DEVICE_CUDA);
    flex_tensor pv = flex_tensor_bshd(v, FLEX_BF16, 8, H, 64, D, FLEX_DEVICE_CUDA);
    static const struct {
        int32_t off[2], len[2], table[8];
        int paged;
        const char *name;
    } bad[] = {
        {{0, 0}, {L, L + 1}, {0}, 0, "kv_lengths"},
        {{0, L}, {L, 200}, {0}, 0, "q_offsets"},
        {{0, 0}, {256, 256}, {0, 1, 2, 3, 4, 5, 6, 9}, 1, "page_table"},
    };
    for (int i = 0; i < 3; i++) {
        void *off = to_gpu(bad[i].off, 8), *len = to_gpu(bad[i].len, 8);
        void *tab = to_gpu(bad[i].table, 32);
        flex_tensor t_off = flex_tensor_contiguous(off, FLEX_I32, 1, (int64_t[]){B}, FLEX_DEVICE_CUDA);
        flex_tensor t_len = flex_tensor_contiguous(len, FLEX_I32, 1, (int64_t[]){B}, FLEX_DEVICE_CUDA);
        flex_tensor t_tab =
            flex_tensor_contiguous(tab, FLEX_I32, 2, (int64_t[]){B, 4}, FLEX_DEVICE_CUDA);
        flex_attention_options o = {.q_offsets = &t_off, .kv_lengths = &t_len,
                                    .page_table = bad[i].paged ? &t_tab : NULL};
        const flex_status call = flex_attention(gpu, &tq, bad[i].paged ? &pk : &tk,
                                                bad[i].paged ? &pv : &tv, NULL, NULL, &o, &to, &tl);
        const flex_status sync = flex_synchronize(gpu);
        const char *msg = flex_error_message(gpu);
        const int named = msg && strstr(msg, bad[i].name) != NULL;
        const flex_status again = flex_synchronize(gpu); /* the flag was cleared */
        flex_free(gpu, off), flex_free(gpu, len), flex_free(gpu, tab);
        EXPECT(call == FLEX_OK, "%s: the call itself failed: %s", bad[i].name,
               flex_error_message(gpu));
        EXPECT(sync == FLEX_ERR_BUFFER_BOUNDS, "%s out of range: synchronize gave %d",
               bad[i].name, (int)sync);
        EXPECT(named, "%s out of range: the message does not name it: %s", bad[i].name, msg);
        EXPECT(again == FLEX_OK, "%s: the flag was not cleared", bad[i].name);
    }
    flex_free(gpu, q), flex_free(gpu, k), flex_free(gpu, v), flex_free(gpu, out);
    flex_free(gpu, lse);
    free(zeros);
}

int main(void) {
    gpu_test_open();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int before = failures;
        run_case(&cases[i]);
        printf("%s: %s\n", failures == before ? "PASS" : "FAIL", cases[i].name);
    }
    const int before = failures;
    test_device_values_out_of_range();
    printf("%s: device values out of range are clamped and named\n",
           failures == before ? "PASS" : "FAIL");
    flex_context_destroy(cpu);
    flex_context_destroy(gpu);
    return failures ? 1 : 0;
}
