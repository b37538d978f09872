/*
 * flexattn-emit: prints the CUDA backward (or, with --forward, forward)
 * source the backend would hand NVRTC for one configuration, so that its
 * machine code can be read without a GPU (nvcc -arch=sm_90a -cubin
 * -Xptxas -v, then cuobjdump -sass; scripts/kernel_sass.sh does both).
 * Not installed.
 *
 *   flexattn-emit [--forward [--in-range]] [--mask TEXT|PRESET] [--score TEXT|PRESET]
 *                 [--buf NAME:DTYPE:NDIM]... [--grads] [FIELD=VALUE]...
 *
 * --forward starts from the sm_90a forward's configuration (bf16, head
 * dims 128, two warpgroups of 64 rows, 128-key steps, the TMA producer,
 * rolled keep bits); its FIELD=VALUE set flex_cuda_fwd_config (dtype, dq,
 * dv, warps, mt, block_n, vec, scale_positive, wgmma, short_indices, tma,
 * mask_bits, chain, dv_exact, partial_bits, q_bufs, score_clamp). --in-range
 * reads every buffer of the mods unchecked, as the backend does where it
 * proves the reads in range.
 *
 * The configuration starts as the sm_90a wgmma kernel's (bf16, head dims
 * 128, 8 warps, 64-row steps, every lever on, the TMA copies in two
 * stages); FIELD=VALUE sets a field of flex_cuda_bwd_config
 * (dtype=bf16|f16|f32, dq, dv, warps, block_m, ..., tma).
 * --buf declares a buffer of mods given as text (presets bring their own);
 * --grads wants the gradient of every float buffer the score mod reads;
 * grad_smem=N sums them in a shared region of N floats (the gradient
 * tensors' elements together, e.g. 8208 for a 16 x 513 table).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/derive.h"
#include "mod/parse.h"
#include "../backends/cuda/cuda_compile.h"

#define MAX_BUFS 8

static int parse_mod(flex_mod_kind kind, const char *arg, const flex_buffer_decl *bufs, int nb,
                     ir_mod *out) {
    const flex_preset *p = flex_preset_find(arg);
    flex_mod_desc desc = {kind, arg, NULL, 0, bufs, nb};
    if (p) {
        if (p->kind != kind) {
            fprintf(stderr, "preset %s is not a %s mod\n", arg,
                    kind == FLEX_MOD_MASK ? "mask" : "score");
            return -1;
        }
        desc = (flex_mod_desc){p->kind,   p->text,    p->params,
                               p->num_params, p->buffers, p->num_buffers};
    }
    char err[1024];
    if (mod_parse(&desc, out, err, sizeof err) != FLEX_OK) {
        fprintf(stderr, "cannot parse '%s': %s\n", arg, err);
        return -1;
    }
    return 0;
}

static int parse_dtype(const char *s, flex_dtype *dt) {
    const struct {
        const char *name;
        flex_dtype dt;
    } names[] = {{"bf16", FLEX_BF16}, {"f16", FLEX_F16}, {"f32", FLEX_F32}, {"i32", FLEX_I32}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(s, names[i].name)) {
            *dt = names[i].dt;
            return 0;
        }
    return -1;
}

typedef struct named_int {
    const char *name;
    int *field;
} named_int;

/* FIELD=VALUE onto a config: "dtype" onto *dtype, the other names onto
 * their int fields; -1 for an unknown field or value. */
static int set_named(const char *arg, flex_dtype *dtype, const named_int *fields, size_t count) {
    const char *eq = strchr(arg, '=');
    if (!eq) return -1;
    const size_t n = (size_t)(eq - arg);
    if (n == 5 && !strncmp(arg, "dtype", 5)) return parse_dtype(eq + 1, dtype);
    for (size_t i = 0; i < count; i++)
        if (strlen(fields[i].name) == n && !strncmp(arg, fields[i].name, n)) {
            char *end;
            const long v = strtol(eq + 1, &end, 10);
            if (*end || end == eq + 1) return -1;
            *fields[i].field = (int)v;
            return 0;
        }
    return -1;
}

static int set_field(flex_cuda_bwd_config *cfg, const char *arg) {
    const named_int fields[] = {{"dq", &cfg->dq},
                                {"dv", &cfg->dv},
                                {"warps", &cfg->warps},
                                {"block_m", &cfg->block_m},
                                {"vec", &cfg->vec},
                                {"short_indices", &cfg->short_indices},
                                {"pipeline", &cfg->pipeline},
                                {"exp2", &cfg->exp2},
                                {"dq_red", &cfg->dq_red},
                                {"kv_fastest", &cfg->kv_fastest},
                                {"wgmma", &cfg->wgmma},
                                {"split_wait", &cfg->split_wait},
                                {"wg_barrier", &cfg->wg_barrier},
                                {"dq_bulk", &cfg->dq_bulk},
                                {"tma", &cfg->tma},
                                {"refill_early", &cfg->refill_early},
                                {"dq_warps", &cfg->dq_warps},
                                {"dq_block_n", &cfg->dq_block_n},
                                {"grad_smem", &cfg->grad_smem},
                                {"partial_bits", &cfg->partial_bits}};
    return set_named(arg, &cfg->dtype, fields, sizeof fields / sizeof fields[0]);
}

static int set_fwd_field(flex_cuda_fwd_config *cfg, const char *arg) {
    const named_int fields[] = {{"dq", &cfg->dq},
                                {"dv", &cfg->dv},
                                {"warps", &cfg->warps},
                                {"mt", &cfg->mt},
                                {"block_n", &cfg->block_n},
                                {"vec", &cfg->vec},
                                {"scale_positive", &cfg->scale_positive},
                                {"wgmma", &cfg->wgmma},
                                {"short_indices", &cfg->short_indices},
                                {"tma", &cfg->tma},
                                {"mask_bits", &cfg->mask_bits},
                                {"chain", &cfg->chain},
                                {"dv_exact", &cfg->dv_exact},
                                {"partial_bits", &cfg->partial_bits},
                                {"q_bufs", &cfg->q_bufs},
                                {"score_clamp", &cfg->score_clamp},
                                {"step_cuts", &cfg->step_cuts},
                                {"diag_values", &cfg->diag_values}};
    return set_named(arg, &cfg->dtype, fields, sizeof fields / sizeof fields[0]);
}

/* A flag per node of m, all set: every buffer read taken as proved in range
 * (flags on other nodes are unused). Caller frees; NULL without memory. */
static unsigned char *every_read_proved(const ir_mod *m) {
    unsigned char *flags = malloc((size_t)m->num_nodes);
    if (flags) memset(flags, 1, (size_t)m->num_nodes);
    return flags;
}

int main(int argc, char **argv) {
    flex_cuda_bwd_config cfg = {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8,
                                .block_m = 64, .vec = 1, .short_indices = 1, .pipeline = 1,
                                .exp2 = 1, .dq_red = 1, .kv_fastest = 1, .wgmma = 1,
                                .split_wait = 1, .wg_barrier = 1, .dq_bulk = 1, .tma = 2};
    const char *mask_arg = NULL, *score_arg = NULL;
    flex_buffer_decl bufs[MAX_BUFS];
    char buf_names[MAX_BUFS][64];
    int nb = 0, grads = 0, forward = 0, in_range = 0;
    for (int i = 1; i < argc; i++) /* FIELD=VALUE names a forward field wherever --forward is */
        forward |= !strcmp(argv[i], "--forward");
    flex_cuda_fwd_config fwd = {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .mt = 1,
                                .block_n = 128, .vec = 1, .scale_positive = 1, .wgmma = 1,
                                .short_indices = 1, .tma = 1, .mask_bits = 1, .dv_exact = 1,
                                .q_bufs = 2};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--forward")) {
            continue;
        } else if (!strcmp(argv[i], "--mask") && i + 1 < argc) {
            mask_arg = argv[++i];
        } else if (!strcmp(argv[i], "--score") && i + 1 < argc) {
            score_arg = argv[++i];
        } else if (!strcmp(argv[i], "--grads")) {
            grads = 1;
        } else if (!strcmp(argv[i], "--in-range")) {
            in_range = 1;
        } else if (!strcmp(argv[i], "--buf") && i + 1 < argc && nb < MAX_BUFS) {
            char dt[16];
            int ndim;
            if (sscanf(argv[++i], "%63[^:]:%15[^:]:%d", buf_names[nb], dt, &ndim) != 3 ||
                parse_dtype(dt, &bufs[nb].dtype) != 0) {
                fprintf(stderr, "--buf wants NAME:DTYPE:NDIM, not '%s'\n", argv[i]);
                return 2;
            }
            bufs[nb].name = buf_names[nb];
            bufs[nb].ndim = ndim;
            nb++;
        } else if (forward ? set_fwd_field(&fwd, argv[i]) != 0 : set_field(&cfg, argv[i]) != 0) {
            fprintf(stderr, "usage: %s [--forward [--in-range]] [--mask M] [--score S] "
                            "[--buf NAME:DTYPE:NDIM]... [--grads] [FIELD=VALUE]...\n", argv[0]);
            return 2;
        }
    }
    ir_mod mask, score;
    if (mask_arg && parse_mod(FLEX_MOD_MASK, mask_arg, bufs, nb, &mask) != 0) return 1;
    if (score_arg && parse_mod(FLEX_MOD_SCORE, score_arg, bufs, nb, &score) != 0) return 1;
    char *src = NULL;
    if (forward) {
        unsigned char *mask_flags = mask_arg && in_range ? every_read_proved(&mask) : NULL;
        unsigned char *score_flags = score_arg && in_range ? every_read_proved(&score) : NULL;
        src = flex_cuda_forward_source_in_range(&fwd, mask_arg ? &mask : NULL,
                                                score_arg ? &score : NULL, mask_flags, score_flags);
        free(mask_flags);
        free(score_flags);
    } else if (!score_arg) {
        const flex_cuda_bwd_score none = {0};
        src = flex_cuda_backward_source(&cfg, mask_arg ? &mask : NULL, NULL, &none);
    } else {
        mod_derivative der;
        if (mod_derive(&score, &der) != 0) {
            fprintf(stderr, "the score mod has no derivative\n");
            return 1;
        }
        flex_cuda_grad_load loads[MOD_DERIVE_MAX_LOADS];
        int nl = 0;
        for (int l = 0; grads && l < der.num_loads; l++)
            loads[nl++] = flex_cuda_grad_load_of(&score, &der.loads[l], der.loads[l].buffer);
        if (grads) cfg.grad_slots = score.num_buffers;
        const flex_cuda_bwd_score sc = {&score, der.value, der.dscore, loads, nl, NULL};
        src = flex_cuda_backward_source(&cfg, mask_arg ? &mask : NULL, NULL, &sc);
    }
    if (!src) {
        fprintf(stderr, "no source for this configuration\n");
        return 1;
    }
    fputs(src, stdout);
    free(src);
    if (mask_arg) ir_free(&mask);
    if (score_arg) ir_free(&score);
    return 0;
}
