/*
 * bench_cuda: times flexattn's CUDA forward on the seed patterns through the
 * public API only (built by bench/gpu/run.sh against the shared library).
 *
 *   bench_cuda [--len S] [-B N] [-H N] [-D N] [--iters N] [--json FILE]
 *
 * Patterns (bf16): noop, causal, sliding_window W=1024, document_causal,
 * alibi+causal, softcap C=30 + causal (exact tanh), softcap_approx C=30 +
 * causal. For each: the first call's time (kernel compile or cache load
 * included), then the median of --iters calls, each followed by
 * flex_synchronize. FLOPs as FlexAttention counts them: 4*B*H*S*S*D times
 * the density of the block mask (non-empty blocks / all blocks).
 * Documents: lengths cycle through 512, 1024, 1536, 2048, 768, 2304 tokens
 * (the last one cut at S); bench/gpu/torch_reference.py uses the same.
 *
 * After timing a pattern, the output of its last (batch, head) is compared
 * with the CPU backend's on the same inputs (a line "verify <pattern>
 * rel=<max |gpu - cpu| / max |cpu|> ok|FAILED"; the program then exits 1
 * if any failed): what is timed is also right. --no-verify skips it.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "flexattn.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        flex_status s_ = (call);                                                                   \
        if (s_ != FLEX_OK) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, flex_status_name(s_),           \
                    flex_error_message(ctx));                                                      \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A pattern's mods (sliding window W=1024, soft-cap C=30) and block mask
 * (blocks of 128) in ctx, with its buffers bound: doc for the document mask,
 * slopes for ALiBi. FLEX_OK or the first failure; what was made is returned
 * either way, for the caller to destroy. */
static flex_status make_pattern(flex_context *ctx, const char *mask_name, const char *score_name,
                                int64_t S, const flex_tensor *doc, const flex_tensor *slopes,
                                flex_mod **mask_mod, flex_mod **score_mod, flex_block_mask **mask) {
    const flex_param w = {"W", 0, 1024}, c = {"C", 1, 30.0};
    flex_status s = FLEX_OK;
    if (mask_name) {
        s = flex_preset_compile(ctx, mask_name, &w, !strcmp(mask_name, "sliding_window"), mask_mod);
        if (!s && !strcmp(mask_name, "document_causal"))
            s = flex_mod_bind_buffer(ctx, *mask_mod, "doc", doc);
        if (!s) s = flex_block_mask_create(ctx, *mask_mod, 1, 1, S, S, 128, 128, mask);
    }
    if (!s && score_name) {
        s = flex_preset_compile(ctx, score_name, &c, strncmp(score_name, "softcap", 7) == 0,
                                score_mod);
        if (!s && !strcmp(score_name, "alibi"))
            s = flex_mod_bind_buffer(ctx, *score_mod, "slopes", slopes);
    }
    return s;
}

/* The pattern on the CPU backend for one head (q, k, v, gpu: slice[0..3],
 * S x D bf16; the head's ALiBi slope as a one-element buffer): max |gpu -
 * cpu| / max |cpu|, or -1 when the CPU backend fails or either output has a
 * NaN. */
static double cpu_rel_error(const char *mask_name, const char *score_name, uint16_t *const *slice,
                            int64_t S, int64_t D, int32_t *doc, float slope) {
    flex_context *ctx = NULL;
    if (flex_context_create("cpu", &ctx) != FLEX_OK) return -1.0;
    uint16_t *out = malloc((size_t)(S * D) * 2);
    flex_mod *mask_mod = NULL, *score_mod = NULL;
    flex_block_mask *mask = NULL;
    int64_t doc_size = S, one = 1;
    flex_tensor doc_t = flex_tensor_contiguous(doc, FLEX_I32, 1, &doc_size, FLEX_DEVICE_CPU);
    flex_tensor slope_t = flex_tensor_contiguous(&slope, FLEX_F32, 1, &one, FLEX_DEVICE_CPU);
    flex_status s =
        make_pattern(ctx, mask_name, score_name, S, &doc_t, &slope_t, &mask_mod, &score_mod, &mask);
    flex_tensor t[4];
    for (int i = 0; i < 4; i++)
        t[i] = flex_tensor_bhsd(i < 3 ? slice[i] : out, FLEX_BF16, 1, 1, S, D, FLEX_DEVICE_CPU);
    if (!s && out) s = flex_attention(ctx, &t[0], &t[1], &t[2], score_mod, mask, NULL, &t[3], NULL);
    double rel = -1.0;
    if (!s && out) {
        double diff = 0.0, ref = 0.0;
        int nan = 0;
        for (int64_t i = 0; i < S * D; i++) {
            const double g = from_bf16(slice[3][i]), r = from_bf16(out[i]);
            nan |= g != g || r != r;
            diff = fmax(diff, fabs(g - r));
            ref = fmax(ref, fabs(r));
        }
        rel = nan ? -1.0 : diff / (ref > 0.0 ? ref : 1.0);
    } else {
        fprintf(stderr, "cpu reference: %s\n", flex_error_message(ctx));
    }
    flex_block_mask_destroy(mask);
    flex_mod_destroy(mask_mod);
    flex_mod_destroy(score_mod);
    free(out);
    flex_context_destroy(ctx);
    return rel;
}

int main(int argc, char **argv) {
    int64_t B = 4, H = 16, S = 8192, D = 128;
    int iters = 20, verify = 1, failed = 0;
    const char *json = NULL, *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--len") && i + 1 < argc)
            S = atoll(argv[++i]);
        else if (!strcmp(argv[i], "-B") && i + 1 < argc)
            B = atoll(argv[++i]);
        else if (!strcmp(argv[i], "-H") && i + 1 < argc)
            H = atoll(argv[++i]);
        else if (!strcmp(argv[i], "-D") && i + 1 < argc)
            D = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--no-verify"))
            verify = 0;
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    flex_context *ctx = NULL;
    CHECK(flex_context_create("cuda", &ctx));
    const size_t n = (size_t)(B * H * S * D);
    uint16_t *host = malloc(n * 2);
    void *dq, *dk, *dv, *dout, *ddoc;
    CHECK(flex_malloc(ctx, n * 2, &dq));
    CHECK(flex_malloc(ctx, n * 2, &dk));
    CHECK(flex_malloc(ctx, n * 2, &dv));
    CHECK(flex_malloc(ctx, n * 2, &dout));
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    void *bufs[3] = {dq, dk, dv};
    /* the last (batch, head) of q, k, v and of the output, for the check */
    const size_t head = (size_t)(S * D), last = n - head;
    uint16_t *slice[4];
    for (int t = 0; t < 4; t++)
        slice[t] = malloc(head * 2);
    for (int t = 0; t < 3; t++) {
        for (size_t i = 0; i < n; i++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            host[i] = to_bf16((float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0));
        }
        CHECK(flex_copy_to_device(ctx, bufs[t], host, n * 2));
        memcpy(slice[t], host + last, head * 2);
    }
    /* document ids and ALiBi slopes */
    int32_t *doc = malloc((size_t)S * 4);
    static const int lens[] = {512, 1024, 1536, 2048, 768, 2304};
    int64_t pos = 0;
    for (int d = 0; pos < S; d++)
        for (int j = 0; j < lens[d % 6] && pos < S; j++)
            doc[pos++] = d;
    CHECK(flex_malloc(ctx, (size_t)S * 4, &ddoc));
    CHECK(flex_copy_to_device(ctx, ddoc, doc, (size_t)S * 4));
    float *slopes = malloc((size_t)H * 4);
    for (int h = 0; h < H; h++)
        slopes[h] = exp2f(-8.0f * (h + 1) / (float)H);

    flex_tensor q = flex_tensor_bhsd(dq, FLEX_BF16, B, H, S, D, FLEX_DEVICE_CUDA);
    flex_tensor k = flex_tensor_bhsd(dk, FLEX_BF16, B, H, S, D, FLEX_DEVICE_CUDA);
    flex_tensor v = flex_tensor_bhsd(dv, FLEX_BF16, B, H, S, D, FLEX_DEVICE_CUDA);
    flex_tensor o = flex_tensor_bhsd(dout, FLEX_BF16, B, H, S, D, FLEX_DEVICE_CUDA);
    int64_t doc_size = S, slope_size = H;
    flex_tensor doc_t = flex_tensor_contiguous(ddoc, FLEX_I32, 1, &doc_size, FLEX_DEVICE_CUDA);
    flex_tensor slope_t = flex_tensor_contiguous(slopes, FLEX_F32, 1, &slope_size, FLEX_DEVICE_CPU);

    static const struct {
        const char *name, *mask, *score;
    } patterns[] = {
        {"noop", NULL, NULL},
        {"causal", "causal", NULL},
        {"sliding_window", "sliding_window", NULL},
        {"document_causal", "document_causal", NULL},
        {"alibi_causal", "causal", "alibi"},
        {"softcap_causal", "causal", "softcap"},
        {"softcap_approx_causal", "causal", "softcap_approx"},
    };
    FILE *jf = json ? fopen(json, "a") : NULL;
    printf("device: %s\n", flex_context_device_name(ctx));
    printf("%-24s %10s %10s %10s %8s\n", "pattern", "first_ms", "median_ms", "TFLOP/s", "density");
    for (size_t p = 0; p < sizeof patterns / sizeof patterns[0]; p++) {
        if (only && strcmp(only, patterns[p].name)) continue;
        flex_mod *mask_mod = NULL, *score_mod = NULL;
        flex_block_mask *mask = NULL;
        CHECK(make_pattern(ctx, patterns[p].mask, patterns[p].score, S, &doc_t, &slope_t, &mask_mod,
                           &score_mod, &mask));
        double density = mask ? 1.0 - flex_block_mask_sparsity(mask) / 100.0 : 1.0;
        double t0 = now_ms();
        CHECK(flex_attention(ctx, &q, &k, &v, score_mod, mask, NULL, &o, NULL));
        CHECK(flex_synchronize(ctx));
        double first = now_ms() - t0;
        double *times = malloc(sizeof(double) * (size_t)iters);
        for (int i = 0; i < iters; i++) {
            t0 = now_ms();
            CHECK(flex_attention(ctx, &q, &k, &v, score_mod, mask, NULL, &o, NULL));
            CHECK(flex_synchronize(ctx));
            times[i] = now_ms() - t0;
        }
        qsort(times, (size_t)iters, sizeof *times, cmp_double);
        double med = times[iters / 2];
        double flops = 4.0 * B * H * (double)S * S * D * density;
        double tflops = flops / (med * 1e-3) / 1e12;
        printf("%-24s %10.2f %10.3f %10.1f %8.4f\n", patterns[p].name, first, med, tflops, density);
        double rel = -1.0;
        if (verify) {
            CHECK(flex_copy_to_host(ctx, slice[3], (const uint16_t *)dout + last, head * 2));
            rel =
                cpu_rel_error(patterns[p].mask, patterns[p].score, slice, S, D, doc, slopes[H - 1]);
            const int ok = rel >= 0.0 && rel <= 1e-2;
            failed |= !ok;
            printf("verify %s rel=%.2e %s\n", patterns[p].name, rel, ok ? "ok" : "FAILED");
        }
        if (jf)
            fprintf(
                jf,
                "{\"impl\": \"flexattn\", \"pattern\": \"%s\", \"B\": %lld, \"H\": %lld, \"S\": "
                "%lld, "
                "\"D\": %lld, \"dtype\": \"bf16\", \"first_call_ms\": %.3f, \"median_ms\": %.4f, "
                "\"tflops\": %.2f, \"density\": %.5f, \"verify_rel\": %.3e, \"device\": "
                "\"%s\"}\n",
                patterns[p].name, (long long)B, (long long)H, (long long)S, (long long)D, first,
                med, tflops, density, rel, flex_context_device_name(ctx));
        fflush(stdout);
        free(times);
        flex_block_mask_destroy(mask);
        flex_mod_destroy(mask_mod);
        flex_mod_destroy(score_mod);
    }
    if (jf) fclose(jf);
    flex_free(ctx, dq);
    flex_free(ctx, dk);
    flex_free(ctx, dv);
    flex_free(ctx, dout);
    flex_free(ctx, ddoc);
    free(host);
    free(doc);
    free(slopes);
    for (int t = 0; t < 4; t++)
        free(slice[t]);
    flex_context_destroy(ctx);
    return failed;
}
