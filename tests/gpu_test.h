/*
 * What the GPU test programs (test_cuda_backward, test_cuda_decode) share:
 * the CPU and GPU contexts (gpu_test_open), the failure count and the EXPECT macro that
 * counts a failure and leaves the case, a reproducible uniform generator,
 * and device copies that end the program when the GPU refuses memory. Each
 * program includes it once; it needs no test library, so the programs
 * build where the check library is missing (GPU machines).
 */
#ifndef FLEXATTN_GPU_TEST_H
#define FLEXATTN_GPU_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flexattn.h"

static flex_context *cpu, *gpu;
static int failures;

/* On a false condition: the message, a failure counted, and the case left. */
#define EXPECT(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                  \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            failures++;                                                                            \
            return;                                                                                \
        }                                                                                          \
    } while (0)

/* The next state of a 64-bit linear congruential generator; its high bits
 * are the random ones. */
static inline uint64_t gpu_test_next(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return *state;
}

/* Uniform in [-1, 1) from *state. */
static inline float gpu_test_uniform(uint64_t *state) {
    return (float)((double)(gpu_test_next(state) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* A device allocation of bytes (at least one) on gpu, holding host's bytes
 * when host is not NULL; the caller frees it with flex_free. */
static inline void *to_gpu(const void *host, size_t bytes) {
    void *d = NULL;
    if (flex_malloc(gpu, bytes ? bytes : 1, &d) != FLEX_OK ||
        (host && bytes && flex_copy_to_device(gpu, d, host, bytes) != FLEX_OK)) {
        fprintf(stderr, "FAIL: device memory: %s\n", flex_error_message(gpu));
        exit(1);
    }
    return d;
}

/* Opens gpu and cpu; without a usable CUDA backend the program says why
 * and exits 77 (meson's skip). */
static inline void gpu_test_open(void) {
    if (flex_context_create("cuda", &gpu) != FLEX_OK) {
        printf("SKIPPED: no usable CUDA backend (%s)\n", flex_error_message(NULL));
        exit(77);
    }
    if (flex_context_create("cpu", &cpu) != FLEX_OK) exit(1);
}

/* A CUDA context whose FLEXATTN_DEBUG is the environment's plus `add`
 * (later keys win), for a test that runs a lever both ways; the
 * environment is restored before it returns. NULL when the context cannot
 * be made (the library's message says why). The caller owns the context. */
static inline flex_context *gpu_test_open_with(const char *add) {
    const char *env = getenv("FLEXATTN_DEBUG");
    char *saved = env ? strdup(env) : NULL;
    char value[512];
    snprintf(value, sizeof value, "%s%s%s", saved ? saved : "", saved && *saved && *add ? "," : "",
             add);
    setenv("FLEXATTN_DEBUG", value, 1);
    flex_context *ctx = NULL;
    const flex_status s = flex_context_create("cuda", &ctx);
    if (saved)
        setenv("FLEXATTN_DEBUG", saved, 1);
    else
        unsetenv("FLEXATTN_DEBUG");
    free(saved);
    return s == FLEX_OK ? ctx : NULL;
}

#endif /* FLEXATTN_GPU_TEST_H */
