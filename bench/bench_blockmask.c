/*
 * Block-mask build time: flex_block_mask_create on the CPU backend, on one
 * thread, for causal, causal sliding window (W = 1024) and document-causal
 * (documents of ~1008 tokens: ~130 at 131072 tokens) masks, block 128,
 * B = H = 1. Reports the median of repeated builds as JSON lines (one per
 * case) and a table.
 *
 * usage: bench_blockmask [--runs N] [--tokens a,b,c] [--pattern NAME]
 *                        [--out FILE] [--commit SHA] [--threads N]
 * The commit may also come from FLEXATTN_COMMIT; the CPU model is read from
 * /proc/cpuinfo.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "clock.h"

static void cpu_model(char *out, size_t cap) {
    snprintf(out, cap, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        const char *v = strchr(line, ':');
        if (!v) continue;
        v++;
        while (*v == ' ' || *v == '\t')
            v++;
        snprintf(out, cap, "%s", v);
        out[strcspn(out, "\n")] = '\0';
        break;
    }
    fclose(f);
}

/* Escapes a string for a JSON value (quotes and backslashes only). */
static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', f);
        if ((unsigned char)*s >= 0x20) fputc(*s, f);
    }
    fputc('"', f);
}

/* Document ids with lengths varying around `mean` (a fixed pseudo-random
 * sequence, so every run builds the same mask). */
static int32_t *document_ids(int64_t n, int64_t mean, int *num_docs) {
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    uint32_t state = 12345;
    int64_t pos = 0;
    int d = 0;
    while (pos < n) {
        state = state * 1664525u + 1013904223u;
        int64_t len = mean / 2 + (int64_t)(state >> 8) % (mean + 1);
        if (len < 1) len = 1;
        if (pos + len > n) len = n - pos;
        for (int64_t t = pos; t < pos + len; t++)
            ids[t] = d;
        pos += len;
        d++;
    }
    *num_docs = d;
    return ids;
}

typedef struct result {
    const char *pattern;
    int64_t tokens;
    int docs;
    double median_ms, min_ms, sparsity;
    int64_t full, partial;
} result;

int main(int argc, char **argv) {
    int runs = 21, threads = 1;
    const char *out_path = NULL, *commit = getenv("FLEXATTN_COMMIT"), *only = NULL;
    int64_t tokens[8] = {8192, 32768, 131072};
    int num_tokens = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--runs") && i + 1 < argc) {
            runs = atoi(argv[++i]);
            if (runs < 1) runs = 1;
        } else if (!strcmp(argv[i], "--out") && i + 1 < argc) {
            out_path = argv[++i];
        } else if (!strcmp(argv[i], "--commit") && i + 1 < argc) {
            commit = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--pattern") && i + 1 < argc) {
            only = argv[++i];
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            num_tokens = 0;
            for (char *p = argv[++i]; *p && num_tokens < 8;) {
                tokens[num_tokens++] = strtoll(p, &p, 10);
                if (*p == ',') p++;
            }
        } else {
            fprintf(stderr, "usage: bench_blockmask [--runs N] [--tokens a,b,c] [--pattern NAME] "
                            "[--out FILE] [--commit SHA] [--threads N]\n");
            return 2;
        }
    }
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
    int used_threads = omp_get_max_threads();
#else
    int used_threads = 1;
    (void)threads; /* one thread without OpenMP */
#endif
    char cpu[256];
    cpu_model(cpu, sizeof cpu);

    flex_context *ctx = NULL;
    if (flex_context_create("cpu", &ctx) != FLEX_OK) {
        fprintf(stderr, "bench_blockmask: %s\n", flex_error_message(NULL));
        return 1;
    }
    FILE *out = NULL;
    if (out_path && !(out = fopen(out_path, "w"))) {
        fprintf(stderr, "bench_blockmask: cannot write %s\n", out_path);
        return 1;
    }
    static const char *patterns[3] = {"causal", "sliding_window", "document_causal"};
    result results[32];
    int num_results = 0;
    double *times = malloc(sizeof(double) * (size_t)runs);
    for (int t = 0; t < num_tokens; t++) {
        for (int p = 0; p < 3; p++) {
            if (only && strcmp(only, patterns[p]) != 0) continue;
            int64_t n = tokens[t];
            flex_param w = {"W", 0, 1024};
            flex_mod *mod = NULL;
            if (flex_preset_compile(ctx, patterns[p], p == 1 ? &w : NULL, p == 1, &mod) !=
                FLEX_OK) {
                fprintf(stderr, "bench_blockmask: %s\n", flex_error_message(ctx));
                return 1;
            }
            int32_t *ids = NULL;
            int docs = 0;
            if (p == 2) {
                ids = document_ids(n, 1008, &docs);
                flex_tensor view = flex_tensor_contiguous(ids, FLEX_I32, 1, &n, FLEX_DEVICE_CPU);
                flex_mod_bind_buffer(ctx, mod, "doc", &view);
            }
            flex_block_mask *mask = NULL;
            /* one warm-up build, then the timed ones */
            for (int r = -1; r < runs; r++) {
                double t0 = flex_now_ms();
                flex_status st = flex_block_mask_create(ctx, mod, 1, 1, n, n, 128, 128, &mask);
                double dt = flex_now_ms() - t0;
                if (st != FLEX_OK) {
                    fprintf(stderr, "bench_blockmask: %s\n", flex_error_message(ctx));
                    return 1;
                }
                if (r >= 0) times[r] = dt;
                if (r < runs - 1) flex_block_mask_destroy(mask);
            }
            qsort(times, (size_t)runs, sizeof *times, flex_compare_doubles);
            result *res = &results[num_results++];
            res->pattern = patterns[p];
            res->tokens = n;
            res->docs = docs;
            res->median_ms = times[runs / 2];
            res->min_ms = times[0];
            res->sparsity = flex_block_mask_sparsity(mask);
            res->full = mask->num_full;
            res->partial = mask->num_partial;
            flex_block_mask_destroy(mask);
            flex_mod_destroy(mod);
            free(ids);

            FILE *sinks[2] = {stdout, out};
            for (int s = 0; s < 2; s++) {
                FILE *f = sinks[s];
                if (!f) continue;
                fprintf(f,
                        "{\"bench\":\"block_mask\",\"pattern\":\"%s\",\"tokens\":%lld,"
                        "\"block\":128,\"docs\":%d,\"runs\":%d,\"median_ms\":%.4f,"
                        "\"min_ms\":%.4f,\"sparsity\":%.4f,\"full\":%lld,\"partial\":%lld,"
                        "\"threads\":%d,\"backend\":\"cpu\",\"cpu\":",
                        res->pattern, (long long)n, docs, runs, res->median_ms, res->min_ms,
                        res->sparsity, (long long)res->full, (long long)res->partial, used_threads);
                json_string(f, cpu);
                fprintf(f, ",\"commit\":");
                json_string(f, commit ? commit : "unknown");
                fprintf(f, "}\n");
                fflush(f);
            }
        }
    }
    printf("\nblock-mask build, block 128, B = H = 1, %d thread(s), median of %d runs\n",
           used_threads, runs);
    printf("cpu: %s\n\n", cpu);
    printf("%-18s %8s %6s %10s %10s %9s %9s %8s\n", "pattern", "tokens", "docs", "median ms",
           "min ms", "sparsity", "full", "partial");
    for (int k = 0; k < num_results; k++) {
        const result *r = &results[k];
        printf("%-18s %8lld %6d %10.3f %10.3f %8.2f%% %9lld %8lld\n", r->pattern,
               (long long)r->tokens, r->docs, r->median_ms, r->min_ms, r->sparsity,
               (long long)r->full, (long long)r->partial);
    }
    free(times);
    if (out) fclose(out);
    flex_context_destroy(ctx);
    return 0;
}
