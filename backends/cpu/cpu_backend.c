/*
 * The CPU backend's table. Device memory is host memory, so the memory slots
 * keep the core's defaults (malloc/free/memcpy/memset); block masks use the
 * core's host evaluator for undecided blocks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "cpu.h"

typedef struct cpu_state {
    char device_name[256];
} cpu_state;

/* Always usable; the lowest preference so that "auto" takes a GPU first. */
static int cpu_score(char *why, size_t why_cap) {
    if (why && why_cap) snprintf(why, why_cap, "host CPU");
    return 1;
}

/* The "model name" line of /proc/cpuinfo, or "" when there is none. */
static void read_cpu_model(char *dst, size_t cap) {
    dst[0] = '\0';
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        const char *colon = strchr(line, ':');
        if (!colon) continue;
        colon++;
        while (*colon == ' ' || *colon == '\t')
            colon++;
        snprintf(dst, cap, "%s", colon);
        size_t n = strlen(dst);
        while (n && (dst[n - 1] == '\n' || dst[n - 1] == ' '))
            dst[--n] = '\0';
        break;
    }
    fclose(f);
}

static flex_status cpu_init(flex_context *ctx, int device_index) {
    if (device_index != 0)
        return flex_fail(ctx, FLEX_ERR_BACKEND, "the cpu backend has only device 0, not %d",
                         device_index);
    cpu_state *st = calloc(1, sizeof *st);
    if (!st) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory for the cpu backend state");
    char model[192];
    read_cpu_model(model, sizeof model);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    const cpu_kernels *k = flex_cpu_select_kernels(0);
    snprintf(st->device_name, sizeof st->device_name, "%s (%d thread%s, %s kernels)",
             model[0] ? model : "CPU", threads, threads == 1 ? "" : "s", k->name);
    ctx->backend_state = st;
    return FLEX_OK;
}

static void cpu_release(flex_context *ctx) {
    free(ctx->backend_state);
    ctx->backend_state = NULL;
}

static const char *cpu_device_name(flex_context *ctx) {
    cpu_state *st = ctx->backend_state;
    return st ? st->device_name : "cpu";
}

const flex_backend_iface flex_backend_cpu = {
    .abi_version = FLEX_BACKEND_ABI_VERSION,
    .name = "cpu",
    .device_type = FLEX_DEVICE_CPU,
    .score = cpu_score,
    .init = cpu_init,
    .release = cpu_release,
    .device_name = cpu_device_name, /* optional */
    /* mem_alloc, mem_free, upload, download, mem_set: optional, core defaults */
    .forward = flex_cpu_forward,
    .backward = flex_cpu_backward, /* optional */
    /* mask_blocks: optional, the core's host evaluator */
    /* synchronize: optional, nothing is queued */
};
