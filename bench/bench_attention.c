/*
 * Forward attention benchmark: the seed's table of masks and score mods
 * (noop, causal, sliding_window, prefix_lm, document_causal, alibi, softcap)
 * on one backend, and the CPU speed items (f32, D=128, B=1, H=8, S=4096,
 * non-causal and causal, 1 and 2 threads, as a share of the FMA peak).
 *
 * FLOPs are counted on the non-empty part of the block mask, as
 * FlexAttention's benchmark does: 4 * B * H * Lq * Lkv * D * density
 * (2 * B * H * Lq * Lkv * (D + Dv) * density when Dv != D), density = 1 -
 * sparsity / 100. Times are the median of --iters runs after --warmup.
 *
 * The FMA peak is measured, not assumed: every thread runs a loop of
 * independent vector FMAs (12 accumulators, enough to cover the FMA latency
 * on two ports) and the achieved rate is taken as the machine's peak for
 * that thread count. On x86-64 with AVX-512F the loop uses 16-lane FMAs;
 * elsewhere the portable loop gives whatever the compiler makes of it.
 *
 * Output: a table per pattern for people; with --out FILE one JSON object
 * per line (appended) with the commit, the device and every number.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "bench_backward.h"
#include "clock.h"

typedef struct bench_opts {
    const char *backend, *out, *commit;
    int64_t B, H, len, D, iters, warmup;
    flex_dtype dtype;
    int speed, table, threads;
    int backward; /* also time flex_attention_backward (default on) */
} bench_opts;

typedef struct bench_result {
    const char *name;
    double ms, tflops, density;
    int threads;
    double bw_ms, bw_tflops; /* 0 when the backward was not timed */
} bench_result;

/* ---- FMA peak ---- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FMA_PEAK_AVX512 1
__attribute__((target("avx512f,fma"))) static double fma_loop_avx512(long iters) {
    __m512 a0 = _mm512_set1_ps(0.1f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
           a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    const __m512 x = _mm512_set1_ps(0.9999f), y = _mm512_set1_ps(1e-6f);
    for (long i = 0; i < iters; i++) {
        a0 = _mm512_fmadd_ps(a0, x, y), a1 = _mm512_fmadd_ps(a1, x, y);
        a2 = _mm512_fmadd_ps(a2, x, y), a3 = _mm512_fmadd_ps(a3, x, y);
        a4 = _mm512_fmadd_ps(a4, x, y), a5 = _mm512_fmadd_ps(a5, x, y);
        a6 = _mm512_fmadd_ps(a6, x, y), a7 = _mm512_fmadd_ps(a7, x, y);
        a8 = _mm512_fmadd_ps(a8, x, y), a9 = _mm512_fmadd_ps(a9, x, y);
        a10 = _mm512_fmadd_ps(a10, x, y), a11 = _mm512_fmadd_ps(a11, x, y);
        /* Keeps the twelve chains in registers and the loop from folding. */
        __asm__ volatile(""
                         : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),
                           "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return (double)_mm512_reduce_add_ps(s);
}
#endif

static double fma_loop_portable(long iters) {
    float a[12][8];
    for (int i = 0; i < 12; i++)
        for (int j = 0; j < 8; j++)
            a[i][j] = 0.1f;
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++)
            for (int j = 0; j < 8; j++)
                a[i][j] = a[i][j] * 0.9999f + 1e-6f;
    double s = 0.0;
    for (int i = 0; i < 12; i++)
        for (int j = 0; j < 8; j++)
            s += a[i][j];
    return s;
}

/* Aggregate FMA rate of `threads` threads in GFLOP/s (an FMA is 2 FLOPs);
 * the best of three runs. *lanes_out gets the vector width used. */
static double measure_fma_peak(int threads, int *lanes_out) {
    int avx512 = 0;
#ifdef FMA_PEAK_AVX512
    __builtin_cpu_init();
    avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
    long iters = 50000000;
    double flops_per_iter = avx512 ? 12.0 * 16 * 2 : 12.0 * 8 * 2;
    double best = 0.0, sink = 0.0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = flex_now_ms();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : sink)
#endif
        {
#ifdef FMA_PEAK_AVX512
            if (avx512)
                sink += fma_loop_avx512(iters);
            else
#endif
                sink += fma_loop_portable(iters / 4);
        }
        double sec = (flex_now_ms() - t0) * 1e-3;
        double rate = (avx512 ? iters : iters / 4) * flops_per_iter * threads / sec / 1e9;
        if (rate > best) best = rate;
    }
    if (sink == 12345.0) printf(" ");
    *lanes_out = avx512 ? 16 : 8;
    return best;
}

/* ---- attention runs ---- */

typedef struct pattern {
    const char *name;  /* preset */
    const char *label; /* row label in the table */
} pattern;

static const pattern seed_patterns[] = {
    {"noop", "noop"},
    {"causal", "causal"},
    {"sliding_window", "sliding_window"},
    {"prefix_lm", "prefix_lm"},
    {"document_causal", "document_causal"},
    {"alibi", "alibi"},
    {"softcap", "softcap"},
};

static void fill_random(void *p, flex_dtype dt, size_t n, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) {
        double u = 0.0;
        for (int k = 0; k < 4; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            u += (double)(s >> 11) / 9007199254740992.0;
        }
        float v = (float)((u - 2.0) * 1.7);
        flex_store_from_float(p, dt, (int64_t)i, v);
    }
}

/* Binds the buffers the seed presets read: doc (4 equal documents) and
 * slopes (ALiBi). */
static flex_status bind_seed_buffers(flex_context *ctx, flex_mod *m, int64_t L, int64_t H,
                                     int32_t **doc, float **slopes) {
    for (int b = 0; b < m->ir.num_buffers; b++) {
        const char *name = m->ir.buffers[b].name;
        flex_tensor t;
        if (!strcmp(name, "doc")) {
            *doc = malloc((size_t)L * sizeof(int32_t));
            if (!*doc) return FLEX_ERR_OUT_OF_MEMORY;
            for (int64_t i = 0; i < L; i++)
                (*doc)[i] = (int32_t)(i * 4 / L);
            t = flex_tensor_contiguous(*doc, FLEX_I32, 1, &L, FLEX_DEVICE_CPU);
        } else if (!strcmp(name, "slopes")) {
            *slopes = malloc((size_t)H * sizeof(float));
            if (!*slopes) return FLEX_ERR_OUT_OF_MEMORY;
            for (int64_t h = 0; h < H; h++)
                (*slopes)[h] = (float)exp2(-8.0 * (h + 1) / H);
            t = flex_tensor_contiguous(*slopes, FLEX_F32, 1, &H, FLEX_DEVICE_CPU);
        } else {
            return flex_fail(ctx, FLEX_ERR_BUFFER_UNBOUND, "bench has no data for buffer '%s'",
                             name);
        }
        flex_status st = flex_mod_bind_buffer(ctx, m, name, &t);
        if (st != FLEX_OK) return st;
    }
    return FLEX_OK;
}

/* Times one pattern; fills *r. threads > 0 sets the OpenMP thread count. */
static int bench_pattern(flex_context *ctx, const bench_opts *o, const char *preset, int threads,
                         bench_result *r) {
    int64_t B = o->B, H = o->H, L = o->len, D = o->D;
    const flex_preset *p = flex_preset_find(preset);
    if (!p) {
        fprintf(stderr, "bench_attention: unknown preset '%s'\n", preset);
        return -1;
    }
    flex_mod *mod = NULL;
    flex_block_mask *mask = NULL;
    int32_t *doc = NULL;
    float *slopes = NULL;
    void *host = NULL, *dev[4] = {0};
    double *ms = NULL;
    int rc = -1;
    flex_status st = flex_preset_compile(ctx, preset, NULL, 0, &mod);
    if (st == FLEX_OK) st = bind_seed_buffers(ctx, mod, L, H, &doc, &slopes);
    if (st == FLEX_OK && p->kind == FLEX_MOD_MASK)
        st = flex_block_mask_create(ctx, mod, 1, 1, L, L, 0, 0, &mask);
    if (st != FLEX_OK) goto fail;
    size_t n = (size_t)(B * H * L * D), bytes = n * flex_dtype_size(o->dtype);
    host = malloc(bytes);
    if (!host) goto done;
    flex_tensor t[4];
    for (int i = 0; i < 4; i++) {
        if (i < 3) fill_random(host, o->dtype, n, 0x1234567ull * (uint64_t)(i + 1));
        st = flex_malloc(ctx, bytes, &dev[i]);
        if (st == FLEX_OK && i < 3) st = flex_copy_to_device(ctx, dev[i], host, bytes);
        if (st != FLEX_OK) goto fail;
        t[i] = flex_tensor_bhsd(dev[i], o->dtype, B, H, L, D, ctx->backend->device_type);
        t[i].device_index = flex_context_device_index(ctx);
    }
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    if (threads > 0) omp_set_num_threads(threads);
#endif
    ms = malloc((size_t)o->iters * sizeof(double));
    if (!ms) goto done;
    const flex_mod *score = p->kind == FLEX_MOD_SCORE ? mod : NULL;
    for (int64_t i = 0; i < o->warmup + o->iters; i++) {
        double t0 = flex_now_ms();
        st = flex_attention(ctx, &t[0], &t[1], &t[2], score, mask, NULL, &t[3], NULL);
        if (st == FLEX_OK) st = flex_synchronize(ctx);
        if (st != FLEX_OK) break;
        if (i >= o->warmup) ms[i - o->warmup] = flex_now_ms() - t0;
    }
    r->bw_ms = r->bw_tflops = 0.0;
    if (st == FLEX_OK && o->backward) {
        /* Backward FLOPs are counted as 2.5 times the forward's. */
        st = bench_backward_ms(ctx, &t[0], &t[1], &t[2], score, mask, o->warmup, o->iters,
                               &r->bw_ms);
        if (st == FLEX_ERR_UNSUPPORTED) st = FLEX_OK, r->bw_ms = 0.0;
    }
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    if (st != FLEX_OK) goto fail;
    qsort(ms, (size_t)o->iters, sizeof *ms, flex_compare_doubles);
    int64_t k = o->iters;
    r->ms = k % 2 ? ms[k / 2] : 0.5 * (ms[k / 2 - 1] + ms[k / 2]);
    r->density = mask ? 1.0 - flex_block_mask_sparsity(mask) / 100.0 : 1.0;
    r->tflops = 4.0 * B * H * (double)L * (double)L * D * r->density / (r->ms * 1e-3) / 1e12;
    if (r->bw_ms > 0) r->bw_tflops = 2.5 * r->tflops * r->ms / r->bw_ms;
    r->name = preset;
    r->threads = threads;
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "bench_attention: %s: %s\n", preset, flex_error_message(ctx));
done:
    for (int i = 0; i < 4; i++)
        if (dev[i]) flex_free(ctx, dev[i]);
    free(host);
    free(ms);
    flex_block_mask_destroy(mask);
    flex_mod_destroy(mod);
    free(doc);
    free(slopes);
    return rc;
}

static void print_table(const bench_result *r) {
    if (r->bw_ms > 0) {
        const char *sep = "+---------------+----------------+-------------------+----------------+"
                          "-------------------+";
        printf("\nResults for %s:\n%s\n", r->name, sep);
        printf("| Operation     |   FW Time (ms) |   FW FLOPS (TF/s) |   BW Time (ms) |"
               "   BW FLOPS (TF/s) |\n");
        printf("+===============+================+===================+================+"
               "===================+\n");
        printf("| flexattention | %14.4f | %17.4f | %14.4f | %17.4f |\n%s\n", r->ms, r->tflops,
               r->bw_ms, r->bw_tflops, sep);
        return;
    }
    const char *sep = "+---------------+----------------+-------------------+";
    printf("\nResults for %s:\n%s\n", r->name, sep);
    printf("| Operation     |   FW Time (ms) |   FW FLOPS (TF/s) |\n");
    printf("+===============+================+===================+\n");
    printf("| flexattention | %14.4f | %17.4f |\n%s\n", r->ms, r->tflops, sep);
}

static void write_json(FILE *f, const bench_opts *o, flex_context *ctx, const char *kind,
                       const bench_result *r, double peak_gflops) {
    fprintf(f,
            "{\"bench\": \"%s\", \"commit\": \"%s\", \"backend\": \"%s\", \"device\": \"%s\", "
            "\"pattern\": \"%s\", \"dtype\": \"%s\", \"B\": %lld, \"H\": %lld, \"S\": %lld, "
            "\"D\": %lld, \"threads\": %d, \"density\": %.6f, \"fw_ms\": %.4f, "
            "\"fw_tflops\": %.6f",
            kind, o->commit, flex_context_backend(ctx), flex_context_device_name(ctx), r->name,
            flex_dtype_name(o->dtype), (long long)o->B, (long long)o->H, (long long)o->len,
            (long long)o->D, r->threads, r->density, r->ms, r->tflops);
    if (r->bw_ms > 0) fprintf(f, ", \"bw_ms\": %.4f, \"bw_tflops\": %.6f", r->bw_ms, r->bw_tflops);
    if (peak_gflops > 0)
        fprintf(f, ", \"fma_peak_gflops\": %.2f, \"pct_of_peak\": %.1f", peak_gflops,
                100.0 * r->tflops * 1e3 / peak_gflops);
    fprintf(f, "}\n");
}

static void usage(FILE *f) {
    fprintf(f, "usage: bench_attention [options]\n"
               "  --backend SPEC   backend (default cpu)\n"
               "  -B N -H N        batch and heads (default 1, 8)\n"
               "  --len N          sequence length (default 2048)\n"
               "  -D N             head dim (default 64)\n"
               "  --dtype T        f32, f16 or bf16 (default f32)\n"
               "  --iters N        timed runs (default 5); --warmup N (default 1)\n"
               "  --threads N      OpenMP threads for the table (default: OMP_NUM_THREADS)\n"
               "  --speed          only the CPU speed items (f32 D=128 B=1 H=8 S=4096,\n"
               "                   non-causal and causal, 1 and 2 threads, %% of FMA peak)\n"
               "  --no-table       skip the seed table\n"
               "  --no-backward    time the forward only (default: the backward too, with\n"
               "                   BW FLOPs = 2.5 x FW FLOPs)\n"
               "  --commit ID      commit to record (default: FLEXATTN_COMMIT or unknown)\n"
               "  --out FILE       append JSON lines to FILE\n");
}

int main(int argc, char **argv) {
    bench_opts o = {"cpu", NULL, NULL, 1, 8, 2048, 64, 5, 1, FLEX_F32, 0, 1, 0, 1};
    o.commit = getenv("FLEXATTN_COMMIT") ? getenv("FLEXATTN_COMMIT") : "unknown";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NUM(flag, dst)                                                                             \
    if (!strcmp(a, flag) && v) {                                                                   \
        dst = atoll(v);                                                                            \
        i++;                                                                                       \
        continue;                                                                                  \
    }
        NUM("-B", o.B)
        NUM("-H", o.H)
        NUM("--len", o.len)
        NUM("-D", o.D)
        NUM("--iters", o.iters)
        NUM("--warmup", o.warmup)
#undef NUM
        if (!strcmp(a, "--threads") && v) {
            o.threads = atoi(v), i++;
        } else if (!strcmp(a, "--backend") && v) {
            o.backend = v, i++;
        } else if (!strcmp(a, "--out") && v) {
            o.out = v, i++;
        } else if (!strcmp(a, "--commit") && v) {
            o.commit = v, i++;
        } else if (!strcmp(a, "--dtype") && v) {
            o.dtype = !strcmp(v, "f16") ? FLEX_F16 : !strcmp(v, "bf16") ? FLEX_BF16 : FLEX_F32;
            i++;
        } else if (!strcmp(a, "--speed")) {
            o.speed = 1, o.table = 0;
        } else if (!strcmp(a, "--no-table")) {
            o.table = 0;
        } else if (!strcmp(a, "--no-backward")) {
            o.backward = 0;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "bench_attention: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (o.B < 1 || o.H < 1 || o.len < 1 || o.D < 1 || o.iters < 1 || o.warmup < 0) {
        fprintf(stderr, "bench_attention: sizes and --iters must be positive\n");
        return 2;
    }
    flex_context *ctx = NULL;
    if (flex_context_create(o.backend, &ctx) != FLEX_OK) {
        fprintf(stderr, "bench_attention: %s\n", flex_error_message(NULL));
        return 1;
    }
    FILE *out = NULL;
    if (o.out && !(out = fopen(o.out, "a"))) {
        fprintf(stderr, "bench_attention: cannot open %s\n", o.out);
        flex_context_destroy(ctx);
        return 1;
    }
    printf("backend %s: %s\n", flex_context_backend(ctx), flex_context_device_name(ctx));
    printf("B=%lld H=%lld S=%lld D=%lld %s, median of %lld runs\n", (long long)o.B, (long long)o.H,
           (long long)o.len, (long long)o.D, flex_dtype_name(o.dtype), (long long)o.iters);
    int rc = 0;
    if (o.table) {
        for (size_t i = 0; i < sizeof seed_patterns / sizeof seed_patterns[0]; i++) {
            bench_result r;
            if (bench_pattern(ctx, &o, seed_patterns[i].name, o.threads, &r)) {
                rc = 1;
                continue;
            }
            print_table(&r);
            if (out) write_json(out, &o, ctx, "seed-table", &r, 0.0);
        }
    }
    if (o.speed) {
        bench_opts s = o;
        s.B = 1, s.H = 8, s.len = 4096, s.D = 128, s.dtype = FLEX_F32;
        printf("\nCPU speed items: f32 D=128 B=1 H=8 S=4096\n");
        printf("%-8s %-8s %12s %12s %14s %10s %12s %12s %8s\n", "pattern", "threads", "FW ms",
               "GFLOP/s", "FMA peak", "% of peak", "BW ms", "BW GFLOP/s", "BW/FW");
        double base_ms[2] = {0, 0};
        for (int threads = 1; threads <= 2; threads++) {
            int lanes;
            double peak = measure_fma_peak(threads, &lanes);
            const char *pats[2] = {"noop", "causal"};
            for (int k = 0; k < 2; k++) {
                bench_result r;
                if (bench_pattern(ctx, &s, pats[k], threads, &r)) {
                    rc = 1;
                    continue;
                }
                double gf = r.tflops * 1e3;
                printf("%-8s %-8d %12.1f %12.1f %9.1f GF/s %9.1f%%", pats[k], threads, r.ms, gf,
                       peak, 100.0 * gf / peak);
                if (r.bw_ms > 0)
                    printf(" %12.1f %12.1f %8.2f", r.bw_ms, r.bw_tflops * 1e3, r.bw_ms / r.ms);
                printf("\n");
                if (threads == 1)
                    base_ms[k] = r.ms;
                else if (base_ms[k] > 0)
                    printf("         speed-up 1 -> 2 threads: %.2fx\n", base_ms[k] / r.ms);
                if (k == 1 && base_ms[0] > 0 && threads == 1)
                    printf("         causal / non-causal time: %.2f\n", r.ms / base_ms[0]);
                if (out) write_json(out, &s, ctx, "cpu-speed", &r, peak);
            }
            printf("(FMA peak: %d threads x %d-lane FMA loop, measured)\n", threads, lanes);
        }
    }
    if (out) fclose(out);
    flex_context_destroy(ctx);
    return rc;
}
