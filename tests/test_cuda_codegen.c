/*
 * CUDA code generation without a GPU: every preset and the seed mods are
 * emitted into the forward template (and mask mods into the mask-block
 * template) and compiled with NVRTC for sm_80 and sm_90a. When NVRTC cannot
 * be loaded the compile cases print "SKIPPED: <reason>" and the program
 * exits with 77, which meson reports as a skipped test, never as a pass.
 */
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/derive.h"
#include "mod/emit.h"
#include "mod/parse.h"
#include "../backends/cuda/cuda_compile.h"
#include "../backends/cuda/cuda_loader.h"
#include "../backends/gpu/flex_gpu_params.h"

static int nvrtc_skipped;

/* Seed mods beyond the presets, and one that touches every op kind. */
static const flex_buffer_decl bias_buf[] = {{"bias", FLEX_BF16, 2},
                                            {"mask8", FLEX_U8, 1},
                                            {"ids64", FLEX_I64, 1},
                                            {"hb", FLEX_F16, 1},
                                            {"keep", FLEX_BOOL, 1}};
static const flex_param seed_params[] = {{"W", 0, 256}, {"T", 1, 0.5}};
static const struct {
    flex_mod_kind kind;
    const char *text;
} seed_mods[] = {
    {FLEX_MOD_MASK, "q >= kv && q - kv <= W"},
    {FLEX_MOD_SCORE, "where(abs(kv - q) % 2 == 0, score * 2.0, score * 0.5)"},
    {FLEX_MOD_SCORE,
     "let a = (q * 2147483) // (kv - 7) + q % -3 - ~kv;\n"
     "let f = float(a) / 3.0 + pow(abs(score), T) + sigmoid(score) - rsqrt(1.0 + score * score);\n"
     "let g = min(f, max(score, -1.0)) + exp(-abs(score)) + log(2.0 + abs(score)) + sqrt(abs(f));\n"
     "let i = int(g * 1e9) ^ (a | 5) & 255;\n"
     "let bb = float(bias[h][q % 7]) + float(hb[kv % 3]) + float(mask8[q % 5] + ids64[kv % 2]);\n"
     "where(keep[q % 4] && i != 0, g + floor(f) - ceil(f) + sin(g) * cos(g) + tan(0.1) + "
     "tanh_approx(g) + exp2(-2.0) + log2(8.0) + bb, -inf)"},
};

static int parse_text(flex_mod_kind kind, const char *text, const flex_param *params, int np,
                      const flex_buffer_decl *bufs, int nb, ir_mod *out) {
    flex_mod_desc desc = {kind, text, params, np, bufs, nb};
    char err[1024];
    flex_status s = mod_parse(&desc, out, err, sizeof err);
    if (s != FLEX_OK) fprintf(stderr, "parse failed for '%s': %s\n", text, err);
    return s == FLEX_OK ? 0 : -1;
}

static int parse_preset(const flex_preset *p, ir_mod *out) {
    return parse_text(p->kind, p->text, p->params, p->num_params, p->buffers, p->num_buffers, out);
}

/* Every case to compile: a mask, a score (either may be absent), a config. */
typedef struct compile_case {
    char name[96];
    ir_mod mask, score;
    int has_mask, has_score;
    flex_cuda_fwd_config cfg;
    const char *arch;
    int mask_blocks; /* compile the mask-block evaluator instead */
    int backward;    /* compile the backward kernels (bwd_cfg) instead */
    flex_cuda_bwd_config bwd_cfg;
    int in_range;    /* every buffer read compiled unchecked (flex_load_*_in) */
    flex_status status;
    size_t cubin_size;
    char message[512];
} compile_case;

static compile_case cases[512];
static int num_cases;
static int next_case;
static pthread_mutex_t case_lock = PTHREAD_MUTEX_INITIALIZER;
static const flex_cuda_api *api;

/* The mma.sync kernel's tiles: warps, m-tiles per warp, keys per step. */
#define MMA_CONFIG(w, m, n, ...)                                                                   \
    { .warps = w, .mt = m, .block_n = n, __VA_ARGS__ }
/* The wgmma kernel's tiles are two warpgroups x 64 rows with 16-byte rows,
 * 128-key steps up to head dim 128 (WGMMA_CONFIG) and 64-key steps above
 * (WGMMA_WIDE_CONFIG); what varies is the dtype, head dims and copies. The
 * TMA kernel keeps two Q tiles unless q_bufs says one. */
#define WGMMA_CONFIG(...)                                                                          \
    { .warps = 8, .mt = 1, .block_n = 128, .vec = 1, .wgmma = 1, .q_bufs = 2, __VA_ARGS__ }
#define WGMMA_WIDE_CONFIG(...)                                                                     \
    { .warps = 8, .mt = 1, .block_n = 64, .vec = 1, .wgmma = 1, __VA_ARGS__ }

/* Small tiles keep the many mod compiles quick (the mods are what differs);
 * the production tile sizes are compiled for a few mods below. */
static const flex_cuda_fwd_config configs[] = {
    MMA_CONFIG(4, 1, 16, .dtype = FLEX_BF16, .dq = 64, .dv = 64, .vec = 1, .scale_positive = 1,
               .short_indices = 1),
    MMA_CONFIG(4, 1, 16, .dtype = FLEX_F16, .dq = 64, .dv = 64),
    {.dtype = FLEX_F32, .dq = 64, .dv = 64, .warps = 4, .mt = 1, .scale_positive = 1},
};
/* The production tiles and the machine code each is compiled to (NULL:
 * both sm_80 and sm_90a; the wgmma kernels exist on sm_90a only). */
static const struct {
    flex_cuda_fwd_config cfg;
    const char *arch;
} full_configs[] = {
    {MMA_CONFIG(4, 2, 64, .dtype = FLEX_BF16, .dq = 128, .dv = 128, .vec = 1, .scale_positive = 1),
     NULL},
    {MMA_CONFIG(4, 1, 32, .dtype = FLEX_F16, .dq = 256, .dv = 192, .vec = 1), "sm_90a"},
    {MMA_CONFIG(8, 1, 64, .dtype = FLEX_BF16, .dq = 128, .dv = 128, .vec = 1, .scale_positive = 1),
     "sm_90a"},
    {MMA_CONFIG(4, 2, 64, .dtype = FLEX_F16, .dq = 128, .dv = 64, .scale_positive = 1), "sm_80"},
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1,
                  .short_indices = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_F16, .dq = 64, .dv = 128), "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1, .tma = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_F16, .dq = 64, .dv = 128, .tma = 1), "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1, .tma = 1,
                  .mask_bits = 1, .short_indices = 1),
     "sm_90a"},
    {MMA_CONFIG(4, 2, 64, .dtype = FLEX_F16, .dq = 64, .dv = 64, .mask_bits = 1), "sm_80"},
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1, .tma = 1,
                  .short_indices = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_F16, .dq = 64, .dv = 64, .tma = 1, .chain = 1, .mask_bits = 1),
     "sm_90a"},
    /* head dims over 128: 64-key steps; 256/256 keeps one Q tile */
    {WGMMA_WIDE_CONFIG(.dtype = FLEX_BF16, .dq = 256, .dv = 256, .scale_positive = 1, .tma = 1,
                       .q_bufs = 1, .mask_bits = 1, .short_indices = 1, .dv_exact = 1),
     "sm_90a"},
    {WGMMA_WIDE_CONFIG(.dtype = FLEX_F16, .dq = 192, .dv = 192, .tma = 1, .q_bufs = 2,
                       .chain = 1, .mask_bits = 1),
     "sm_90a"},
    {WGMMA_WIDE_CONFIG(.dtype = FLEX_BF16, .dq = 256, .dv = 64, .scale_positive = 1,
                       .mask_bits = 1),
     "sm_90a"},
    /* the cuts of the step (cuda_step_cuts=1): TMA, chained, cp.async, wide */
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 64, .dv = 64, .scale_positive = 1, .tma = 1,
                  .mask_bits = 1, .short_indices = 1, .step_cuts = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_F16, .dq = 128, .dv = 128, .tma = 1, .chain = 1, .mask_bits = 1,
                  .step_cuts = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 64, .scale_positive = 1, .step_cuts = 1),
     "sm_90a"},
    {WGMMA_WIDE_CONFIG(.dtype = FLEX_BF16, .dq = 256, .dv = 256, .scale_positive = 1, .tma = 1,
                       .q_bufs = 1, .mask_bits = 1, .step_cuts = 1),
     "sm_90a"},
    /* last: the chained TMA kernel (the unchecked-reads cases below take it) */
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1, .tma = 1,
                  .chain = 1, .mask_bits = 1, .short_indices = 1, .dv_exact = 1),
     "sm_90a"},
};

static void add_case(const char *label, const ir_mod *mask, const ir_mod *score,
                     const flex_cuda_fwd_config *cfg, const char *arch, int mask_blocks) {
    ck_assert_int_lt(num_cases, (int)(sizeof cases / sizeof cases[0]));
    compile_case *c = &cases[num_cases++];
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s/%s/%s", label, mask_blocks ? "mask_blocks" : "forward",
             arch);
    if (mask) {
        ck_assert_int_eq(ir_copy(&c->mask, mask), 0);
        c->has_mask = 1;
    }
    if (score) {
        ck_assert_int_eq(ir_copy(&c->score, score), 0);
        c->has_score = 1;
    }
    c->cfg = *cfg;
    c->arch = arch;
    c->mask_blocks = mask_blocks;
}

/* Backward kernels: small tiles for the many mods (two of 16-row steps,
 * one with the pipeline and exp2, one without, and the f32 path), the
 * production tiles of choose_backward_tiles and their variants for a few
 * mods down to machine code (even entries for sm_80, odd ones for sm_90a,
 * where the 16-byte dQ reductions are). */
static const flex_cuda_bwd_config bwd_configs[] = {
    {.dtype = FLEX_BF16, .dq = 64, .dv = 64, .warps = 2, .block_m = 16, .vec = 1,
     .short_indices = 1, .pipeline = 1, .exp2 = 1, .kv_fastest = 1},
    {.dtype = FLEX_F16, .dq = 64, .dv = 128, .warps = 1, .block_m = 32},
    {.dtype = FLEX_F32, .dq = 64, .dv = 64, .warps = 4, .block_m = 16},
};
static const flex_cuda_bwd_config bwd_full_configs[] = {
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .block_m = 32, .vec = 1,
     .short_indices = 1, .pipeline = 1, .exp2 = 1, .kv_fastest = 1},
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .block_m = 32, .vec = 1,
     .short_indices = 1, .pipeline = 1, .exp2 = 1, .dq_red = 1, .kv_fastest = 1},
    {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 8, .block_m = 64, .vec = 1, .pipeline = 1,
     .exp2 = 1, .kv_fastest = 1},
    {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 8, .block_m = 64, .vec = 1, .pipeline = 1,
     .exp2 = 1, .dq_red = 1},
    {.dtype = FLEX_BF16, .dq = 256, .dv = 192, .warps = 4, .block_m = 16, .pipeline = 1,
     .exp2 = 1, .kv_fastest = 1},
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 4, .block_m = 32, .vec = 1,
     .short_indices = 1},
    {.dtype = FLEX_F32, .dq = 128, .dv = 64, .warps = 4, .block_m = 16},
    {.dtype = FLEX_BF16, .dq = 128, .dv = 64, .warps = 2, .block_m = 32, .vec = 1, .pipeline = 1,
     .exp2 = 1, .dq_red = 1},
    /* buffer gradients summed in a shared region (of more floats than
     * ALiBi's slopes need: the kernel reads the sizes from the tensors) */
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .block_m = 32, .vec = 1,
     .short_indices = 1, .pipeline = 1, .exp2 = 1, .kv_fastest = 1, .grad_smem = 8208},
    {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 8, .block_m = 64, .vec = 1, .pipeline = 1,
     .exp2 = 1, .dq_red = 1, .grad_smem = 16},
};

/* The sm_90a wgmma main kernel (flex_backward_sm90.cuh) at the tiles
 * choose_backward_tiles gives it (8 warps, 64-row steps, 16-byte rows):
 * head dims 64 and 128 and mixed, both 16-bit types, with and without the
 * pipeline, dQ by bulk reductions from shared memory or by the 16-byte
 * ones from registers, beside the deterministic dQ kernel, and with the
 * copies by TMA (2 or 3 stages) or by cp.async. Machine code for sm_90a
 * only (wgmma). */
static const flex_cuda_bwd_config bwd_wgmma_configs[] = {
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .block_m = 64, .vec = 1,
     .short_indices = 1, .pipeline = 1, .exp2 = 1, .dq_red = 1, .kv_fastest = 1, .wgmma = 1,
     .split_wait = 1, .wg_barrier = 1, .dq_bulk = 1, .tma = 2},
    {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 8, .block_m = 64, .vec = 1, .pipeline = 1,
     .exp2 = 1, .dq_red = 1, .kv_fastest = 1, .wgmma = 1, .split_wait = 1, .wg_barrier = 1,
     .dq_bulk = 1, .tma = 3},
    {.dtype = FLEX_BF16, .dq = 64, .dv = 128, .warps = 8, .block_m = 64, .vec = 1, .exp2 = 1,
     .wgmma = 1},
    {.dtype = FLEX_F16, .dq = 128, .dv = 64, .warps = 8, .block_m = 64, .vec = 1, .pipeline = 1,
     .exp2 = 1, .dq_red = 1, .kv_fastest = 1, .wgmma = 1, .split_wait = 1, .wg_barrier = 1,
     .dq_bulk = 1, .dq_warps = 4, .dq_block_n = 64},
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 8, .block_m = 64, .vec = 1,
     .short_indices = 1, .pipeline = 1, .exp2 = 1, .dq_red = 1, .kv_fastest = 1, .wgmma = 1,
     .split_wait = 1, .wg_barrier = 1, .dq_bulk = 1, .grad_smem = 8208, .tma = 2,
     .refill_early = 1},
    {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 8, .block_m = 64, .vec = 1, .pipeline = 1,
     .exp2 = 1, .dq_red = 1, .kv_fastest = 1, .wgmma = 1, .split_wait = 1, .wg_barrier = 1,
     .grad_smem = 16, .tma = 3},
};

static void add_backward_case(const char *label, const ir_mod *mask, const ir_mod *score,
                              const flex_cuda_bwd_config *cfg, const char *arch) {
    const flex_cuda_fwd_config unused = {0};
    add_case(label, mask, score, &unused, arch, 0);
    compile_case *c = &cases[num_cases - 1];
    snprintf(c->name, sizeof c->name, "%s/backward/%s/%s", label, flex_dtype_name(cfg->dtype),
             arch);
    c->backward = 1;
    c->bwd_cfg = *cfg;
}

/* A flag per node of m, set on its buffer reads (malloc'd). */
static unsigned char *every_read(const ir_mod *m) {
    unsigned char *f = malloc((size_t)m->num_nodes);
    for (int i = 0; f && i < m->num_nodes; i++)
        f[i] = m->nodes[i].op == IR_LOAD;
    return f;
}

/* The backward source of case c: the score mod derived (mod_derive) with
 * the gradient of every float buffer it reads wanted, one gradient slot per
 * buffer. NULL when the derivative or the source cannot be made. */
static char *backward_source(const compile_case *c) {
    const ir_mod *m = c->has_mask ? &c->mask : NULL;
    flex_cuda_bwd_config cfg = c->bwd_cfg;
    if (!c->has_score) {
        const flex_cuda_bwd_score none = {0};
        return flex_cuda_backward_source(&cfg, m, NULL, &none);
    }
    ir_mod derived;
    if (ir_copy(&derived, &c->score) != 0) return NULL;
    mod_derivative der;
    if (mod_derive(&derived, &der) != 0) {
        ir_free(&derived);
        return NULL;
    }
    flex_cuda_grad_load loads[MOD_DERIVE_MAX_LOADS];
    for (int l = 0; l < der.num_loads; l++)
        loads[l] = flex_cuda_grad_load_of(&derived, &der.loads[l], der.loads[l].buffer);
    cfg.grad_slots = derived.num_buffers;
    const flex_cuda_bwd_score sc = {&derived, der.value, der.dscore, loads, der.num_loads, NULL};
    char *src = flex_cuda_backward_source(&cfg, m, NULL, &sc);
    ir_free(&derived);
    return src;
}

static void *compile_worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&case_lock);
        int i = next_case < num_cases ? next_case++ : -1;
        pthread_mutex_unlock(&case_lock);
        if (i < 0) return NULL;
        compile_case *c = &cases[i];
        const ir_mod *m = c->has_mask ? &c->mask : NULL, *s = c->has_score ? &c->score : NULL;
        unsigned char *mask_in = c->in_range && m ? every_read(m) : NULL;
        unsigned char *score_in = c->in_range && s ? every_read(s) : NULL;
        char *src = c->backward      ? backward_source(c)
                    : c->mask_blocks ? flex_cuda_mask_blocks_source(m)
                                     : flex_cuda_forward_source_in_range(&c->cfg, m, s, mask_in,
                                                                         score_in);
        free(mask_in);
        free(score_in);
        if (!src) {
            c->status = FLEX_ERR_OUT_OF_MEMORY;
            continue;
        }
        void *bin = NULL;
        c->status =
            flex_cuda_compile(NULL, api, src,
                              c->backward      ? "flex_backward"
                              : c->mask_blocks ? "flex_mask_blocks"
                                               : "flex_forward",
                              c->arch, &bin, &c->cubin_size);
        if (c->status != FLEX_OK)
            snprintf(c->message, sizeof c->message, "%.500s", flex_error_message(NULL));
        free(bin);
        free(src);
    }
}

/* Compiles cases[next_case..num_cases) on two threads, then checks and
 * frees them all. */
static void compile_cases(void) {
    pthread_t threads[2];
    for (int t = 0; t < 2; t++)
        pthread_create(&threads[t], NULL, compile_worker, NULL);
    for (int t = 0; t < 2; t++)
        pthread_join(threads[t], NULL);
    int failed = 0;
    for (int i = 0; i < num_cases; i++) {
        if (cases[i].status != FLEX_OK || cases[i].cubin_size == 0) {
            fprintf(stderr, "%s: %s\n", cases[i].name, cases[i].message);
            failed++;
        }
        ir_free(&cases[i].mask);
        ir_free(&cases[i].score);
    }
    ck_assert_msg(failed == 0, "%d of %d NVRTC compiles failed", failed, num_cases);
    int backward = 0;
    for (int i = 0; i < num_cases; i++)
        backward += cases[i].backward;
    printf("%d NVRTC compiles for sm_80 and sm_90a passed (%d of them backward kernels)\n",
           num_cases, backward);
}

START_TEST(test_emit_every_preset) {
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        ir_mod m;
        ck_assert_msg(parse_preset(p, &m) == 0, "preset %s parses", p->name);
        const int is_mask = p->kind == FLEX_MOD_MASK;
        char *text = flex_emit_mods(is_mask ? &m : NULL, is_mask ? NULL : &m);
        ck_assert_ptr_nonnull(text);
        ck_assert_ptr_nonnull(strstr(text, "flex_mask_mod(int b, int h, int q, int kv"));
        ck_assert_ptr_nonnull(strstr(text, "flex_score_mod(float score"));
        ck_assert_ptr_nonnull(
            strstr(text, is_mask ? "#define FLEX_HAS_MASK_MOD 1" : "#define FLEX_HAS_SCORE_MOD 1"));
        /* Buffer reads become typed, checked loads of the right slot. */
        for (int b = 0; b < p->num_buffers; b++) {
            char want[64];
            snprintf(want, sizeof want, "bufs.buf[%d], oob, %d", b, b);
            ck_assert_msg(strstr(text, want) != NULL, "%s reads slot %d", p->name, b);
        }
        free(text);
        ir_free(&m);
    }
}
END_TEST

static int count_occurrences(const char *text, const char *what) {
    int n = 0;
    for (const char *at = strstr(text, what); at; at = strstr(at + 1, what))
        n++;
    return n;
}

START_TEST(test_emit_exact_constants_and_slots) {
    ir_mod mask, score;
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "doc[q] == doc[kv]", NULL, 0,
                                (const flex_buffer_decl[]){{"doc", FLEX_I32, 1}}, 1, &mask),
                     0);
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "score * 0.1 + slopes[h]", NULL, 0,
                                (const flex_buffer_decl[]){{"slopes", FLEX_F32, 1}}, 1, &score),
                     0);
    char *text = flex_emit_mods(&mask, &score);
    ck_assert_ptr_nonnull(text);
    /* 0.1f as exact bits, and the score mod's buffer after the mask's. */
    ck_assert_ptr_nonnull(strstr(text, "__int_as_float(0x3dcccccd)"));
    ck_assert_ptr_nonnull(strstr(text, "flex_load_f32(bufs.buf[1], oob, 1, 1"));
    ck_assert_ptr_nonnull(strstr(text, "flex_load_i32(bufs.buf[0], oob, 0, 1"));
    ck_assert_ptr_nonnull(strstr(text, "#define FLEX_NUM_BUFFERS 2"));
    /* Float arithmetic is never contracted. */
    ck_assert_ptr_nonnull(strstr(text, "__fmul_rn("));
    ck_assert_int_eq(flex_emit_num_slots(&mask, &score), 2);
    free(text);
    ir_free(&mask);
    ir_free(&score);
}
END_TEST

/* Any IR function: the derivative of a score mod, its outputs by
 * reference, the forward's tanh shared by the value and the derivative,
 * and a buffer's slot after the mask's. */
START_TEST(test_emit_ir_function) {
    ir_mod m;
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "30.0 * tanh(score / 30.0) + slopes[h] * (kv - q)",
                                NULL, 0, (const flex_buffer_decl[]){{"slopes", FLEX_F32, 1}}, 1,
                                &m),
                     0);
    mod_derivative der;
    ck_assert_int_eq(mod_derive(&m, &der), 0);
    ck_assert_int_eq(der.num_loads, 1);
    const ir_node *load = &m.nodes[der.loads[0].load];
    const int outputs[] = {der.value, der.dscore, der.loads[0].node, load->args[0]};
    char *text = flex_emit_ir_function(&m, "grad_fn", outputs, 4, 3, NULL);
    ck_assert_ptr_nonnull(text);
    ck_assert_ptr_nonnull(strstr(text, "void grad_fn(float score, int b, int h, int q, int kv, "
                                       "const flex_buffers &bufs, unsigned &oob, float &out0, "
                                       "float &out1, float &out2, int &out3)"));
    ck_assert_int_eq(count_occurrences(text, "tanhf("), 1);
    ck_assert_ptr_nonnull(strstr(text, "flex_load_f32(bufs.buf[3], oob, 3, 1"));
    char want[32];
    snprintf(want, sizeof want, "out1 = v%d;", der.dscore);
    ck_assert_ptr_nonnull(strstr(text, want));
    free(text);
    /* an output that is no node of m */
    const int bad[] = {m.num_nodes};
    ck_assert_ptr_null(flex_emit_ir_function(&m, "f", bad, 1, 0, NULL));
    ir_free(&m);
}
END_TEST

/* Which reads the interval analysis proves inside their buffers over a box
 * of indices, and what the emitter makes of the proof. */
START_TEST(test_reads_in_range) {
    static const flex_buffer_decl doc_buf[] = {{"doc", FLEX_I32, 1}};
    ir_mod m;
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv] && doc[q - 1] >= 0",
                                NULL, 0, doc_buf, 1, &m),
                     0);
    const int64_t sizes[1][4] = {{100, 0, 0, 0}};
    unsigned char *in = malloc((size_t)m.num_nodes);
    ck_assert_ptr_nonnull(in);
    int loads = 0, proved = 0;
    /* b, h, q, kv: the lengths equal to the buffer's size */
    const mod_box inside = {{0, 0, 0, 0}, {3, 7, 99, 99}};
    ck_assert_int_eq(mod_interval_loads_in_range(&m, &inside, sizes, in), 0);
    for (int i = 0; i < m.num_nodes; i++) {
        loads += m.nodes[i].op == IR_LOAD;
        proved += in[i];
        if (in[i]) ck_assert_int_eq(m.nodes[i].op, IR_LOAD);
    }
    /* doc[q] and doc[kv], not doc[q - 1] (index -1 at q = 0) */
    ck_assert_int_eq(loads, 3);
    ck_assert_int_eq(proved, 2);
    char *text = flex_emit_mods_in_range(&m, NULL, in, NULL);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(count_occurrences(text, "flex_load_i32_in(bufs.buf[0], v"), 2);
    ck_assert_int_eq(count_occurrences(text, "flex_load_i32(bufs.buf[0], oob, 0, 1, v"), 1);
    ck_assert_ptr_nonnull(strstr(text, "#define FLEX_MASK_READS_IN_RANGE 1"));
    free(text);
    /* one row past the buffer: nothing proved */
    const mod_box past = {{0, 0, 0, 0}, {3, 7, 100, 99}};
    ck_assert_int_eq(mod_interval_loads_in_range(&m, &past, sizes, in), 0);
    proved = 0;
    for (int i = 0; i < m.num_nodes; i++)
        proved += in[i] && m.nodes[m.nodes[i].args[0]].op == IR_Q;
    ck_assert_int_eq(proved, 0);
    /* without flags every read is checked */
    text = flex_emit_mods(&m, NULL);
    ck_assert_int_eq(count_occurrences(text, "_in(bufs"), 0);
    ck_assert_ptr_nonnull(strstr(text, "#define FLEX_MASK_READS_IN_RANGE 0"));
    free(text);
    free(in);
    ir_free(&m);
    /* an index read from a buffer proves nothing about the outer read */
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "doc[doc[kv]] == 0", NULL, 0, doc_buf, 1, &m), 0);
    in = malloc((size_t)m.num_nodes);
    ck_assert_int_eq(mod_interval_loads_in_range(&m, &inside, sizes, in), 0);
    for (int i = 0; i < m.num_nodes; i++)
        if (m.nodes[i].op == IR_LOAD)
            ck_assert_int_eq(in[i], m.nodes[m.nodes[i].args[0]].op == IR_KV);
    free(in);
    ir_free(&m);
}
END_TEST

/* Host models of the emitted flex_fdiv_const and flex_i2f (core/mod/emit.c),
 * operation for operation. */
static float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static float fdiv_const_model(float a, float c, float rc) {
    if (fabsf(c) >= 1.0f) { /* flex_fdiv_const_ge1, negated for c < 0 */
        const float sign = c < 0.0f ? -1.0f : 1.0f, ac = fabsf(c), arc = fabsf(rc);
        const float q = a * arc;
        const float e = fmaxf(-fmaf(q, ac, -a), -FLT_MAX);
        return sign * fmaf(e, arc, q);
    }
    const float aa = fabsf(a);
    const int big = aa > 0x1p60f, small = aa < 0x1p-60f;
    const float a2 = a * (big ? 0x1p-68f : small ? 0x1p90f : 1.0f);
    const float q = a2 * rc;
    const float r = fmaf(fmaf(-q, c, a2), rc, q) * (big ? 0x1p68f : small ? 0x1p-90f : 1.0f);
    return (aa == 0.0f || aa == INFINITY) ? a * rc : r;
}
static float i2f_short_model(int i) {
    return bits_to_float(0x4b400000u + (uint32_t)i) - 12582912.0f;
}
static float i2f_model(int i) {
    const float hi = bits_to_float(0x4b400000u + (uint32_t)(i >> 16)) - 12582912.0f;
    const float lo = bits_to_float(0x4b400000u + ((uint32_t)i & 0xffffu)) - 12582912.0f;
    return fmaf(hi, 65536.0f, lo);
}

START_TEST(test_division_by_constant) {
    ir_mod score;
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE,
                                "score / 30.0 + score / 0.25 + score / 1e-30 + score / q", NULL, 0,
                                NULL, 0, &score),
                     0);
    char *text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    /* 1/30 correctly rounded is 0x3d088889 (a constant >= 1: the
     * four-operation form); 1e-30 is outside the fast range and a divisor
     * that is not a constant always takes the full division. */
    ck_assert_ptr_nonnull(strstr(
        text, "flex_fdiv_const_ge1(v0, __int_as_float(0x41f00000), __int_as_float(0x3d088889))"));
    ck_assert_int_eq(count_occurrences(text, "flex_fdiv_const_ge1(v"), 1);
    ck_assert_int_eq(count_occurrences(text, "flex_fdiv_const(v"), 1);
    ck_assert_int_ge(count_occurrences(text, "__fdiv_rn(v"), 2);
    free(text);
    ir_free(&score);
    /* A negative constant: the quotient by its magnitude, negated. */
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "score / -30.0", NULL, 0, NULL, 0, &score), 0);
    text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    ck_assert_ptr_nonnull(strstr(
        text, "-flex_fdiv_const_ge1(v0, __int_as_float(0x41f00000), __int_as_float(0x3d088889))"));
    free(text);
    ir_free(&score);
    /* Feeding only tanh_approx, the division is the product with the
     * reciprocal; used anywhere else as well, it stays exact. */
    ck_assert_int_eq(
        parse_text(FLEX_MOD_SCORE, "30.0 * tanh_approx(score / 30.0)", NULL, 0, NULL, 0, &score),
        0);
    text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    ck_assert_ptr_nonnull(strstr(text, "__fmul_rn(v1, __int_as_float(0x3d088889))"));
    ck_assert_int_eq(count_occurrences(text, "flex_fdiv_const_ge1(v"), 0);
    free(text);
    ir_free(&score);
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "let x = score / 30.0; 30.0 * tanh_approx(x) + x",
                                NULL, 0, NULL, 0, &score),
                     0);
    text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(count_occurrences(text, "flex_fdiv_const_ge1(v"), 1);
    free(text);
    ir_free(&score);
    /* The device formula (power-of-two scaling into range, product with the
     * reciprocal, one fused correction) is the correctly rounded quotient
     * for every numerator whose quotient is not subnormal: checked here with
     * a host model of the emitted function (the host's fused multiply-add)
     * on random constants and numerators of every exponent, zeros,
     * infinities and NaN. */
    uint32_t state = 12345u;
    for (int i = 0; i < 400000; i++) {
        state = state * 1664525u + 1013904223u;
        const uint32_t cb =
            (state & 0x807fffffu) | ((uint32_t)(127 - 20 + (state >> 24) % 41) << 23);
        state = state * 1664525u + 1013904223u;
        uint32_t ab = (state & 0x807fffffu) | ((uint32_t)((state >> 23) % 256) << 23);
        if (i % 1000 == 1) ab = (state & 0x80000000u) | 0x7f800000u; /* +-inf */
        if (i % 1000 == 2) ab = state & 0x80000000u;                 /* +-0 */
        if (i % 1000 == 3) ab = 0x7fc00001u;                         /* NaN */
        float c, a;
        memcpy(&c, &cb, sizeof c);
        memcpy(&a, &ab, sizeof a);
        volatile float one = 1.0f;
        const float rc = one / c;
        const float got = fdiv_const_model(a, c, rc);
        const float want = a / c;
        if (want != want) {
            ck_assert_msg(got != got, "%a / %a: %a, want NaN", (double)a, (double)c, (double)got);
            continue;
        }
        /* Subnormal quotients are not asserted; for |c| >= 1 quotients
         * below 2^-103 are within one ulp. */
        if (want != 0.0f && fabsf(want) < FLT_MIN) continue;
        if (fabsf(c) >= 1.0f && want != 0.0f && fabsf(want) < 0x1p-103f) {
            ck_assert_msg(fabsf(got - want) <= nextafterf(fabsf(want), INFINITY) - fabsf(want),
                          "%a / %a: %a, want %a", (double)a, (double)c, (double)got, (double)want);
            continue;
        }
        ck_assert_msg(memcmp(&got, &want, sizeof got) == 0, "%a / %a: %a, want %a", (double)a,
                      (double)c, (double)got, (double)want);
    }
}
END_TEST

/* The emitted int -> float conversion (two halves through the mantissa) is
 * (float)i for every int: edges and random values. */
START_TEST(test_int_to_float) {
    const int edges[] = {
        0,        1,        -1,        65535,      65536,           -65536,    -65537,    4194303,
        -4194304, 16777217, -16777217, 2147483647, -2147483647 - 1, 123456789, -987654321};
    for (int i = 0; i < (int)(sizeof edges / sizeof edges[0]); i++) {
        const float got = i2f_model(edges[i]), want = (float)edges[i];
        ck_assert_msg(memcmp(&got, &want, sizeof got) == 0, "%d: %a, want %a", edges[i],
                      (double)got, (double)want);
    }
    /* The short form (emitted where |i| <= 2^22 is proved): every such i. */
    for (int x = -(1 << 22); x <= (1 << 22); x++) {
        const float got = i2f_short_model(x), want = (float)x;
        if (memcmp(&got, &want, sizeof got) != 0)
            ck_abort_msg("short %d: %a, want %a", x, (double)got, (double)want);
    }
    uint32_t state = 777u;
    for (int i = 0; i < 1000000; i++) {
        state = state * 1664525u + 1013904223u;
        int32_t x;
        memcpy(&x, &state, sizeof x);
        const float got = i2f_model(x), want = (float)x;
        ck_assert_msg(memcmp(&got, &want, sizeof got) == 0, "%d: %a, want %a", x, (double)got,
                      (double)want);
    }
}
END_TEST

/* The short conversion is emitted exactly where the interval analysis
 * bounds the int by 2^22 with b, h below 2^16 and q, kv below 2^20. */
static int emits_short(const char *score_text) {
    ir_mod score;
    static const flex_buffer_decl bufs[] = {{"slopes", FLEX_F32, 1}, {"doc", FLEX_I32, 1}};
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, score_text, NULL, 0, bufs, 2, &score), 0);
    char *text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    const int shorts = count_occurrences(text, "flex_i2f_short(v");
    const int longs = count_occurrences(text, "flex_i2f(v");
    ck_assert_int_eq(shorts + longs, 1);
    free(text);
    ir_free(&score);
    return shorts;
}

START_TEST(test_short_int_to_float) {
    ck_assert(emits_short("score + slopes[h] * (kv - q)"));  /* |kv - q| < 2^20 */
    ck_assert(emits_short("score - float(q + kv + b + h)")); /* < 2^22 */
    ck_assert(emits_short("score + (kv - q) * 4"));          /* 2^22 - 4 at most */
    ck_assert(!emits_short("score + (kv - q) * 8"));         /* up to 2^23 */
    ck_assert(!emits_short("score + doc[kv]"));              /* buffer values: any int */
    ck_assert(!emits_short("score + (q - kv) * (h + 1)"));   /* may wrap */
    ck_assert(!emits_short("score + int(score) * 2"));       /* from a float */
}
END_TEST

/* Int floor division and remainder are emitted as unsigned C operations
 * exactly where the interval analysis proves the dividend >= 0 and the
 * divisor >= 1 for any indices; the count of such operations in the mod. */
static int unsigned_divisions(const char *score_text) {
    ir_mod score;
    static const flex_buffer_decl bufs[] = {{"doc", FLEX_I32, 1}};
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, score_text, NULL, 0, bufs, 1, &score), 0);
    char *text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    const int n = count_occurrences(text, " % (unsigned)v") + count_occurrences(text, " / (unsigned)v");
    const int helpers = count_occurrences(text, "flex_imod(v") + count_occurrences(text, "flex_ifloordiv(v");
    free(text);
    ir_free(&score);
    return helpers ? -n - 1 : n; /* negative: some left to the helpers */
}

START_TEST(test_unsigned_division_where_proved) {
    ck_assert_int_eq(unsigned_divisions("where(abs(kv - q) % 2 == 0, score * 2.0, score)"), 1);
    ck_assert_int_eq(unsigned_divisions("score + float(kv // 64 + q % 7)"), 2);
    ck_assert_int_eq(unsigned_divisions("score + float((kv - q) % 3)"), -1);  /* may be < 0 */
    ck_assert_int_eq(unsigned_divisions("score + float(kv % (q % 3))"), -2); /* divisor may be 0 */
    ck_assert_int_eq(unsigned_divisions("score + float(kv % (h + 1))"), -1);  /* h + 1 may wrap */
    ck_assert_int_eq(unsigned_divisions("score + float(doc[kv] // 4)"), -1);  /* any int */
    ck_assert_int_eq(unsigned_divisions("score + float(kv // 4 + (q - 9) // 4)"), -2);
}
END_TEST

/* Loads NVRTC into api; without it, says which cases (`what`) are skipped,
 * marks the program's run as skipped and returns 0. */
static int nvrtc_loaded(const char *what) {
    char why[512];
    if (flex_cuda_load_nvrtc(&api, why, sizeof why) == 0) return 1;
    printf("SKIPPED: %s (%s)\n", what, why);
    nvrtc_skipped = 1;
    return 0;
}

START_TEST(test_nvrtc_compiles_presets_and_seeds) {
    if (!nvrtc_loaded("NVRTC compile cases")) return;
    /* Every mod for both targets as PTX (the NVRTC front end and optimiser:
     * what the emitted code can break), and the production tiles down to
     * machine code for both. */
    static const char *const archs[] = {"compute_80", "compute_90a"};
    static const char *const real_archs[] = {"sm_80", "sm_90a"};
    int k = 0;
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        ir_mod m;
        ck_assert_int_eq(parse_preset(p, &m), 0);
        const int is_mask = p->kind == FLEX_MOD_MASK;
        for (int a = 0; a < 2; a++, k++)
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m,
                     &configs[k % (int)(sizeof configs / sizeof configs[0])], archs[a], 0);
        if (is_mask) add_case(p->name, &m, NULL, &configs[0], real_archs[i % 2], 1);
        if (!strcmp(p->name, "document_causal") || !strcmp(p->name, "softcap_approx")) {
            for (size_t f = 0; f < sizeof full_configs / sizeof full_configs[0]; f++)
                for (int a = 0; a < 2; a++)
                    if (!full_configs[f].arch || !strcmp(full_configs[f].arch, real_archs[a]))
                        add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m,
                                 &full_configs[f].cfg, real_archs[a], 0);
            /* unchecked reads: the chained TMA kernel and the mma.sync one */
            const size_t last = sizeof full_configs / sizeof full_configs[0] - 1;
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, &full_configs[last].cfg,
                     "sm_90a", 0);
            cases[num_cases - 1].in_range = 1;
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, &full_configs[0].cfg,
                     "sm_80", 0);
            cases[num_cases - 1].in_range = 1;
            /* the score mod at the last row and column past the ends
             * (FLEX_SCORE_CLAMP), in the TMA kernel and the mma.sync one */
            if (!is_mask) {
                flex_cuda_fwd_config clamped = full_configs[last].cfg;
                clamped.score_clamp = 1;
                add_case(p->name, NULL, &m, &clamped, "sm_90a", 0);
                cases[num_cases - 1].in_range = 1;
                clamped = full_configs[0].cfg;
                clamped.score_clamp = 1;
                add_case(p->name, NULL, &m, &clamped, "sm_80", 0);
                cases[num_cases - 1].in_range = 1;
            }
        }
        ir_free(&m);
    }
    /* The backward of every score preset (its derivative emitted, every
     * float buffer's gradient wanted) under a causal mask, and of every mask
     * preset; the production tiles for ALiBi and the document mask. */
    {
        ir_mod causal;
        ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &causal), 0);
        int kb = 0;
        for (int i = 0; i < flex_preset_count(); i++) {
            const flex_preset *p = flex_preset_at(i);
            ir_mod m;
            ck_assert_int_eq(parse_preset(p, &m), 0);
            const int is_mask = p->kind == FLEX_MOD_MASK;
            for (int a = 0; a < 2; a++, kb++)
                add_backward_case(p->name, is_mask ? &m : &causal, is_mask ? NULL : &m,
                                  &bwd_configs[kb % 3], archs[a]);
            if (!strcmp(p->name, "alibi") || !strcmp(p->name, "document_causal")) {
                for (size_t f = 0; f < sizeof bwd_full_configs / sizeof bwd_full_configs[0]; f++)
                    add_backward_case(p->name, is_mask ? &m : &causal, is_mask ? NULL : &m,
                                      &bwd_full_configs[f], real_archs[f % 2]);
                for (size_t f = 0; f < sizeof bwd_wgmma_configs / sizeof bwd_wgmma_configs[0];
                     f++)
                    add_backward_case(p->name, is_mask ? &m : &causal, is_mask ? NULL : &m,
                                      &bwd_wgmma_configs[f], "sm_90a");
            }
            ir_free(&m);
        }
        add_backward_case("dense", NULL, NULL, &bwd_full_configs[0], "sm_80");
        add_backward_case("dense", NULL, NULL, &bwd_wgmma_configs[1], "sm_90a");
        ir_free(&causal);
    }
    for (size_t i = 0; i < sizeof seed_mods / sizeof seed_mods[0]; i++) {
        ir_mod m, causal;
        ck_assert_int_eq(
            parse_text(seed_mods[i].kind, seed_mods[i].text, seed_params, 2, bias_buf, 5, &m), 0);
        ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &causal), 0);
        const int is_mask = seed_mods[i].kind == FLEX_MOD_MASK;
        char label[32];
        snprintf(label, sizeof label, "seed%zu", i);
        for (int a = 0; a < 2; a++, k++)
            add_case(label, is_mask ? &m : &causal, is_mask ? NULL : &m,
                     &configs[k % (int)(sizeof configs / sizeof configs[0])], archs[a], 0);
        if (!is_mask)
            add_backward_case(label, &causal, &m, &bwd_configs[i % 3], archs[i % 2]);
        ir_free(&m);
        ir_free(&causal);
    }
    compile_cases();
}
END_TEST

/* The deterministic backward's dQ kernel (flex_backward_dq.cuh) beside the
 * main kernels, at tiles choose_dq_tiles picks: 4 warps and 64-key steps
 * (head dims up to 128), 1 warp and 16 keys (mask blocks of 16), 2 warps
 * and 32 keys, 4 warps and 32 keys for head dims over 128, without
 * 16-byte rows, and the f32 path. */
static const flex_cuda_bwd_config bwd_det_configs[] = {
    {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .warps = 4, .block_m = 32, .vec = 1,
     .short_indices = 1, .dq_warps = 4, .dq_block_n = 64},
    {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 1, .block_m = 16, .vec = 1, .dq_warps = 1,
     .dq_block_n = 16},
    {.dtype = FLEX_F16, .dq = 64, .dv = 128, .warps = 2, .block_m = 32, .vec = 1, .dq_warps = 2,
     .dq_block_n = 32},
    {.dtype = FLEX_BF16, .dq = 256, .dv = 192, .warps = 4, .block_m = 16, .dq_warps = 4,
     .dq_block_n = 32},
    {.dtype = FLEX_F32, .dq = 128, .dv = 64, .warps = 4, .block_m = 16, .dq_warps = 4},
};

START_TEST(test_nvrtc_compiles_deterministic_backward) {
    if (!nvrtc_loaded("NVRTC deterministic backward cases")) return;
    num_cases = next_case = 0;
    static const char *const real_archs[] = {"sm_80", "sm_90a"};
    ir_mod causal;
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &causal), 0);
    static const char *const presets[] = {"alibi", "document_causal", "softcap"};
    const int n_cfg = (int)(sizeof bwd_det_configs / sizeof bwd_det_configs[0]);
    for (int i = 0; i < 3; i++) {
        const flex_preset *p = flex_preset_find(presets[i]);
        ck_assert_ptr_nonnull(p);
        ir_mod m;
        ck_assert_int_eq(parse_preset(p, &m), 0);
        const int is_mask = p->kind == FLEX_MOD_MASK;
        /* every config once, on alternating targets, and the first on both */
        for (int f = 0; f < n_cfg; f++)
            add_backward_case(p->name, is_mask ? &m : &causal, is_mask ? NULL : &m,
                              &bwd_det_configs[f], real_archs[(f + i) % 2]);
        add_backward_case(p->name, is_mask ? &m : &causal, is_mask ? NULL : &m,
                          &bwd_det_configs[0], real_archs[(i + 1) % 2]);
        ir_free(&m);
    }
    add_backward_case("dense", NULL, NULL, &bwd_det_configs[1], "sm_90a");
    ir_free(&causal);
    /* The source has the kernel only when it is asked for. */
    for (int i = 0; i < num_cases; i++)
        ck_assert_int_gt(cases[i].bwd_cfg.dq_warps, 0);
    const flex_cuda_bwd_score none = {0};
    flex_cuda_bwd_config plain = bwd_det_configs[0];
    char *with = flex_cuda_backward_source(&plain, NULL, NULL, &none);
    plain.dq_warps = plain.dq_block_n = 0;
    char *without = flex_cuda_backward_source(&plain, NULL, NULL, &none);
    ck_assert_ptr_nonnull(with);
    ck_assert_ptr_nonnull(without);
    ck_assert_ptr_nonnull(strstr(with, "flex_bwd_dq_kernel"));
    ck_assert_ptr_nonnull(strstr(with, "#define FLEX_BWD_DQ_BLOCK_N 64"));
    ck_assert_ptr_null(strstr(without, "flex_bwd_dq_kernel"));
    ck_assert_ptr_null(strstr(without, "FLEX_BWD_DQ_WARPS"));
    free(with);
    free(without);
    compile_cases();
}
END_TEST

/* Forwards whose partial blocks read bit masks (flex_partial_bits.cuh):
 * the wgmma kernels (TMA, chained TMA, cp.async), the mma.sync kernel with
 * 32-key sub-steps (two m-tiles), 128-key steps (a row's four words at
 * once) and 16-key steps (half a word), each down to machine code; and the
 * backward's main kernels (test_nvrtc_compiles_partial_bits). */
static const struct {
    flex_cuda_fwd_config cfg;
    const char *arch;
} bits_configs[] = {
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1, .tma = 1,
                  .mask_bits = 1, .short_indices = 1, .dv_exact = 1, .partial_bits = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_F16, .dq = 64, .dv = 64, .tma = 1, .chain = 1, .mask_bits = 1,
                  .partial_bits = 1),
     "sm_90a"},
    {WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 64, .scale_positive = 1, .mask_bits = 1,
                  .partial_bits = 1),
     "sm_90a"},
    {MMA_CONFIG(4, 2, 64, .dtype = FLEX_BF16, .dq = 128, .dv = 128, .vec = 1, .scale_positive = 1,
                .mask_bits = 1, .partial_bits = 1),
     "sm_80"},
    {MMA_CONFIG(4, 1, 128, .dtype = FLEX_F16, .dq = 64, .dv = 64, .vec = 1, .partial_bits = 1),
     "sm_80"},
    {MMA_CONFIG(4, 1, 16, .dtype = FLEX_BF16, .dq = 64, .dv = 64, .scale_positive = 1,
                .mask_bits = 1, .partial_bits = 1),
     "sm_90a"},
};

START_TEST(test_nvrtc_compiles_partial_bits) {
    if (!nvrtc_loaded("NVRTC partial-bit forward and backward cases")) return;
    num_cases = next_case = 0;
    /* a mask that reads a buffer, one that reads h, and a score mod beside
     * a mask (the split softmax path), each with every config */
    static const char *const masks[] = {"document_causal", "sliding_window"};
    ir_mod per_head, softcap, causal;
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv && (q - kv) % (h + 2) == 0", NULL, 0,
                                NULL, 0, &per_head),
                     0);
    ck_assert_int_eq(parse_preset(flex_preset_find("softcap"), &softcap), 0);
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &causal), 0);
    const int n_cfg = (int)(sizeof bits_configs / sizeof bits_configs[0]);
    for (int f = 0; f < n_cfg; f++) {
        for (int i = 0; i < 2; i++) {
            ir_mod m;
            ck_assert_int_eq(parse_preset(flex_preset_find(masks[i]), &m), 0);
            add_case(masks[i], &m, NULL, &bits_configs[f].cfg, bits_configs[f].arch, 0);
            ir_free(&m);
        }
        add_case("per_head", &per_head, NULL, &bits_configs[f].cfg, bits_configs[f].arch, 0);
        add_case("causal+softcap", &causal, &softcap, &bits_configs[f].cfg, bits_configs[f].arch,
                 0);
    }
    /* unchecked reads */
    add_case("causal+softcap", &causal, &softcap, &bits_configs[0].cfg, "sm_90a", 0);
    cases[num_cases - 1].in_range = 1;
    /* The backward's main kernels reading the bits: the wgmma one with TMA
     * (2 and 3 stages), with cp.async and beside the deterministic dQ
     * kernel; the mma.sync one at 64-, 32- and 16-row steps. */
    const struct {
        const flex_cuda_bwd_config *cfg;
        const char *arch;
    } bwd_bits[] = {{&bwd_wgmma_configs[0], "sm_90a"}, {&bwd_wgmma_configs[1], "sm_90a"},
                    {&bwd_wgmma_configs[2], "sm_90a"}, {&bwd_wgmma_configs[3], "sm_90a"},
                    {&bwd_full_configs[2], "sm_80"},   {&bwd_full_configs[0], "sm_80"},
                    {&bwd_configs[0], "sm_90a"}};
    for (size_t f = 0; f < sizeof bwd_bits / sizeof bwd_bits[0]; f++) {
        flex_cuda_bwd_config cfg = *bwd_bits[f].cfg;
        cfg.partial_bits = 1;
        ir_mod m;
        ck_assert_int_eq(parse_preset(flex_preset_find("document_causal"), &m), 0);
        add_backward_case("document_causal", &m, NULL, &cfg, bwd_bits[f].arch);
        ir_free(&m);
        add_backward_case("per_head", &per_head, NULL, &cfg, bwd_bits[f].arch);
        add_backward_case("causal+softcap", &causal, &softcap, &cfg, bwd_bits[f].arch);
    }
    /* The source has the bit kernel only when it is asked for. */
    flex_cuda_fwd_config plain = bits_configs[0].cfg;
    char *with = flex_cuda_forward_source(&plain, &causal, NULL);
    plain.partial_bits = 0;
    char *without = flex_cuda_forward_source(&plain, &causal, NULL);
    ck_assert_ptr_nonnull(with);
    ck_assert_ptr_nonnull(without);
    ck_assert_ptr_nonnull(strstr(with, "flex_partial_bits_kernel"));
    ck_assert_ptr_nonnull(strstr(with, "#define FLEX_PARTIAL_BITS 1"));
    ck_assert_ptr_null(strstr(without, "flex_partial_bits_kernel"));
    ck_assert_ptr_nonnull(strstr(without, "#define FLEX_PARTIAL_BITS 0"));
    free(with);
    free(without);
    /* So has the backward's, and never the f32 one's (which evaluates). */
    const flex_cuda_bwd_score none = {0};
    flex_cuda_bwd_config bwd = bwd_wgmma_configs[0];
    bwd.partial_bits = 1;
    with = flex_cuda_backward_source(&bwd, &causal, NULL, &none);
    bwd.partial_bits = 0;
    without = flex_cuda_backward_source(&bwd, &causal, NULL, &none);
    flex_cuda_bwd_config f32 = bwd_configs[2];
    f32.partial_bits = 1;
    char *exact = flex_cuda_backward_source(&f32, &causal, NULL, &none);
    ck_assert_ptr_nonnull(with);
    ck_assert_ptr_nonnull(without);
    ck_assert_ptr_nonnull(exact);
    ck_assert_ptr_nonnull(strstr(with, "flex_partial_bits_kernel"));
    ck_assert_ptr_nonnull(strstr(with, "#define FLEX_BWD_BITS 1"));
    ck_assert_ptr_null(strstr(without, "flex_partial_bits_kernel"));
    ck_assert_ptr_nonnull(strstr(without, "#define FLEX_BWD_BITS 0"));
    ck_assert_ptr_null(strstr(exact, "flex_partial_bits_kernel"));
    ck_assert_ptr_nonnull(strstr(exact, "#define FLEX_BWD_BITS 0"));
    free(with);
    free(without);
    free(exact);
    ir_free(&per_head);
    ir_free(&softcap);
    ir_free(&causal);
    compile_cases();
}
END_TEST

/* The backward source brings the wgmma main kernel and its primitives only
 * when the config asks for it, and then leaves the mma.sync one out. */
START_TEST(test_backward_source_wgmma) {
    const flex_cuda_bwd_score none = {0};
    flex_cuda_bwd_config cfg = bwd_wgmma_configs[0];
    char *with = flex_cuda_backward_source(&cfg, NULL, NULL, &none);
    cfg.wgmma = 0;
    char *without = flex_cuda_backward_source(&cfg, NULL, NULL, &none);
    ck_assert_ptr_nonnull(with);
    ck_assert_ptr_nonnull(without);
    ck_assert_ptr_nonnull(strstr(with, "#define FLEX_BWD_WGMMA 1"));
    ck_assert_ptr_nonnull(strstr(with, "flex_bwd90_dkdv"));
    ck_assert_ptr_nonnull(strstr(with, "flex_wgmma_ss_n64"));
    ck_assert_ptr_nonnull(strstr(with, "#define FLEX_BWD_DQ_BULK 1"));
    ck_assert_ptr_nonnull(strstr(with, "cp.reduce.async.bulk.global.shared::cta"));
    ck_assert_ptr_nonnull(strstr(with, "#define FLEX_BWD_TMA 2"));
    ck_assert_ptr_nonnull(strstr(with, "cp.async.bulk.tensor.4d"));
    ck_assert_ptr_nonnull(strstr(without, "#define FLEX_BWD_WGMMA 0"));
    ck_assert_ptr_null(strstr(without, "cp.async.bulk.tensor.4d"));
    ck_assert_ptr_null(strstr(without, "flex_bwd90_dkdv"));
    ck_assert_ptr_null(strstr(without, "flex_wgmma_ss_n64"));
    free(with);
    free(without);
}
END_TEST

/* The parameter heads as NVRTC lays them out are the host's: the embedded
 * flex_gpu_params.h, compiled as the kernels compile it, must agree with
 * the sizes this C compile gives it, and every kernel source starts with
 * it. The kernels assert their own structs against these heads. */
START_TEST(test_nvrtc_parameter_layout) {
    if (!nvrtc_loaded("NVRTC parameter layout")) return;
    const char *vendor = flex_cuda_template("vendor.cuh");
    const char *params = flex_cuda_template("flex_gpu_params.h");
    ck_assert_ptr_nonnull(vendor);
    ck_assert_ptr_nonnull(params);
    char checks[2048];
    snprintf(checks, sizeof checks,
             "static_assert(sizeof(flex_buffer) == %zu, \"flex_buffer\");\n"
             "static_assert(sizeof(flex_gpu_fwd_params) == %zu, \"flex_gpu_fwd_params\");\n"
             "static_assert(sizeof(flex_gpu_bwd_head) == %zu, \"flex_gpu_bwd_head\");\n"
             "static_assert(sizeof(flex_gpu_dec_head) == %zu, \"flex_gpu_dec_head\");\n"
             "static_assert(sizeof(flex_gpu_mask_blocks_head) == %zu, \"mask_blocks_head\");\n"
             "static_assert(FLEX_GPU_BWD_FWD_AT(3) == %zu, \"FLEX_GPU_BWD_FWD_AT\");\n"
             "static_assert(sizeof(flex_gpu_buffers<5>) == %zu, \"flex_gpu_buffers\");\n"
             "extern \"C\" __global__ void flex_layout_probe() {}\n",
             sizeof(flex_buffer), sizeof(flex_gpu_fwd_params), sizeof(flex_gpu_bwd_head),
             sizeof(flex_gpu_dec_head), sizeof(flex_gpu_mask_blocks_head),
             (size_t)FLEX_GPU_BWD_FWD_AT(3), (size_t)FLEX_GPU_BUFFERS_BYTES(5));
    const size_t len = strlen(vendor) + strlen(params) + strlen(checks) + 3;
    char *src = malloc(len);
    ck_assert_ptr_nonnull(src);
    snprintf(src, len, "%s\n%s\n%s", vendor, params, checks);
    void *bin = NULL;
    size_t size = 0;
    const flex_status s = flex_cuda_compile(NULL, api, src, "flex_layout", "compute_80", &bin,
                                            &size);
    ck_assert_msg(s == FLEX_OK, "NVRTC disagrees with the host's layout:\n%s",
                  flex_error_message(NULL));
    free(bin);
    free(src);
    /* Every kernel source has the header before the emitted mods. */
    const flex_cuda_fwd_config cfg = {.dtype = FLEX_F32, .dq = 64, .dv = 64, .warps = 4, .mt = 1};
    char *fwd = flex_cuda_forward_source(&cfg, NULL, NULL);
    char *mb = flex_cuda_mask_blocks_source(NULL);
    ck_assert_ptr_nonnull(fwd);
    ck_assert_ptr_nonnull(mb);
    for (int i = 0; i < 2; i++) {
        const char *text = i ? mb : fwd;
        const char *head = strstr(text, "#define FLEX_GPU_PARAMS_H");
        const char *mods = strstr(text, "/* mods emitted from the IR */");
        ck_assert_msg(head && mods && head < mods, "the parameter header precedes the mods");
    }
    free(fwd);
    free(mb);
}
END_TEST

START_TEST(test_nvrtc_error_carries_log) {
    if (!nvrtc_loaded("NVRTC error-log case")) return;
    void *bin = NULL;
    size_t size = 0;
    flex_status s = flex_cuda_compile(NULL, api, "__global__ void k() { undefined_name(); }",
                                      "broken", "sm_80", &bin, &size);
    ck_assert_int_eq(s, FLEX_ERR_COMPILE);
    ck_assert_ptr_null(bin);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "undefined_name"));
}
END_TEST

/* CUDA's exact sin, cos and tan are called, not inlined: inlined, they
 * bring their far-argument reduction (a local-memory table walk) to each of
 * the 64 scores a thread of the sm_90a forward holds, and the kernel grew
 * 5x (316 KB of machine code for sin(cos(score)) + tan(b), against 57 KB
 * for an ALiBi-like mod; 2.8x slower on an H100). sin and cos take
 * core/mod/sincos.h's inline path near zero, with no branch where the
 * argument is proved near (sin of a cosine) and a call of the library's
 * beyond it otherwise (cos of the score, of a head index). The production
 * sm_90a forward with the trigonometric mod must stay within three times
 * the ALiBi-like one's size. */
START_TEST(test_nvrtc_trig_out_of_line) {
    if (!nvrtc_loaded("NVRTC trigonometric size case")) return;
    static const char *const mods[2] = {"score + 0.5 * float(kv - q)",
                                        "sin(cos(score)) + tan(float(b)) * cos(float(h))"};
    const flex_cuda_fwd_config cfg =
        WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = 128, .dv = 128, .scale_positive = 1, .tma = 1,
                     .mask_bits = 1, .short_indices = 1, .dv_exact = 1);
    size_t sizes[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        ir_mod score;
        ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, mods[i], NULL, 0, NULL, 0, &score), 0);
        char *src = flex_cuda_forward_source(&cfg, NULL, &score);
        ck_assert_ptr_nonnull(src);
        if (i == 1)
            ck_assert(strstr(src, "= flex_sincos_near(v") && !strstr(src, "= flex_sinf(v") &&
                      strstr(src, "= flex_cosf(v") && strstr(src, "= flex_tanf(v"));
        void *bin = NULL;
        const flex_status st = flex_cuda_compile(NULL, api, src, "flex_forward", "sm_90a", &bin,
                                                 &sizes[i]);
        ck_assert_msg(st == FLEX_OK, "%s: %.600s", mods[i], flex_error_message(NULL));
        free(bin);
        free(src);
        ir_free(&score);
    }
    printf("sm_90a forward machine code: %zu bytes with ALiBi, %zu with sin/cos/tan\n", sizes[0],
           sizes[1]);
    ck_assert_msg(sizes[1] <= 3 * sizes[0],
                  "the trigonometric forward is %zu bytes, the ALiBi "
                  "one %zu: are the library's sinf/cosf/tanf inlined again?",
                  sizes[1], sizes[0]);
}
END_TEST

/* The sm_90a TMA forward with the score mod's diagonal tables
 * (core/mod/diagonal.h, cfg.diag_values): T5's bucketed bias (its read
 * proved in range, and not: the table's second row then holds the bounds
 * bits), a float and an int value, two bools, at head dims 64 and 128,
 * compile to machine code; with T5's log, float conversions and read in the
 * table's fill, the kernel is smaller than the one that evaluates the whole
 * mod per score. */
START_TEST(test_nvrtc_diagonal_tables) {
    if (!nvrtc_loaded("NVRTC diagonal table cases")) return;
    static const flex_buffer_decl tab_buf[] = {{"tab", FLEX_F32, 2}};
    static const struct {
        const char *text;
        int rows, proved;
    } mods[] = {
        {"let rel = kv - q; let n = abs(rel); let large = clamp(8 + int(log(float(n) / 8.0 + "
         "0.000001) / 2.7725887 * 8.0), 0, 15); score + tab[h][where(rel > 0, 16, 0) + "
         "where(n < 8, n, large)]",
         1, 1},
        {"let rel = kv - q; let n = abs(rel); let large = clamp(8 + int(log(float(n) / 8.0 + "
         "0.000001) / 2.7725887 * 8.0), 0, 15); score + tab[h][where(rel > 0, 16, 0) + "
         "where(n < 8, n, large)]",
         2, 0},
        {"score + 0.5 * log(1.0 + float(abs(kv - q))) * where(kv > q, 1.0, -0.5) + "
         "float(where(kv > q, (q - kv) % 3, 1))",
         2, 1},
        {"let s = where(abs(kv - q) % 3 == 1, score * 0.5, score); "
         "where(abs(kv - q) % 2 == 0, s * 2.0, s)",
         2, 1},
    };
    for (int d = 64; d <= 128; d += 64)
        for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
            ir_mod score;
            ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, mods[i].text, NULL, 0, tab_buf, 1, &score),
                             0);
            unsigned char *proved = mods[i].proved ? every_read(&score) : NULL;
            size_t sizes[2] = {0, 0};
            for (int with = 0; with < 2; with++) {
                const flex_cuda_fwd_config cfg =
                    WGMMA_CONFIG(.dtype = FLEX_BF16, .dq = d, .dv = d, .scale_positive = 1,
                                 .tma = 1, .mask_bits = 1, .short_indices = 1, .dv_exact = 1,
                                 .diag_values = with ? mods[i].rows : 0);
                char *src = flex_cuda_forward_source_in_range(&cfg, NULL, &score, NULL, proved);
                ck_assert_ptr_nonnull(src);
                ck_assert_int_eq(strstr(src, "void flex_score_diag_fill(") != NULL, with);
                void *bin = NULL;
                const flex_status st =
                    flex_cuda_compile(NULL, api, src, "flex_forward", "sm_90a", &bin, &sizes[with]);
                ck_assert_msg(st == FLEX_OK, "%s: %.600s", mods[i].text, flex_error_message(NULL));
                free(bin);
                free(src);
                /* a count the emitter would not find: no source */
                if (with) {
                    flex_cuda_fwd_config wrong = cfg;
                    wrong.diag_values = mods[i].rows + 1;
                    ck_assert_ptr_null(
                        flex_cuda_forward_source_in_range(&wrong, NULL, &score, NULL, proved));
                }
            }
            printf("sm_90a forward D%d, diagonal case %zu: %zu bytes, %zu with the table\n", d, i,
                   sizes[0], sizes[1]);
            if (i < 2)
                ck_assert_msg(sizes[1] < sizes[0], "D%d T5: %zu bytes with the table, %zu without",
                              d, sizes[1], sizes[0]);
            free(proved);
            ir_free(&score);
        }
}
END_TEST

/* The other kernels that emit the mods call the same out-of-line functions
 * (the backward's derivative of sin(cos(score)) too): the trigonometric
 * mod compiles to machine code in the sm_90a and sm_80 backward and in the
 * decode kernel. */
START_TEST(test_nvrtc_trig_other_kernels) {
    if (!nvrtc_loaded("NVRTC trigonometric backward and decode cases")) return;
    compile_case c;
    memset(&c, 0, sizeof c);
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "sin(cos(score)) + tan(float(b)) * cos(float(h))",
                                NULL, 0, NULL, 0, &c.score),
                     0);
    c.has_score = 1;
    const struct {
        const flex_cuda_bwd_config *cfg;
        const char *arch;
    } bwd[] = {{&bwd_wgmma_configs[0], "sm_90a"}, {&bwd_full_configs[0], "sm_80"}};
    for (size_t i = 0; i < sizeof bwd / sizeof bwd[0]; i++) {
        c.bwd_cfg = *bwd[i].cfg;
        char *src = backward_source(&c);
        ck_assert_ptr_nonnull(src);
        ck_assert_ptr_nonnull(strstr(src, "= flex_sinf(v"));
        void *bin = NULL;
        size_t size = 0;
        const flex_status st = flex_cuda_compile(NULL, api, src, "flex_backward", bwd[i].arch,
                                                 &bin, &size);
        ck_assert_msg(st == FLEX_OK, "backward %s: %.600s", bwd[i].arch, flex_error_message(NULL));
        free(bin);
        free(src);
    }
    const flex_cuda_dec_config dec = {.dtype = FLEX_BF16, .dq = 128, .dv = 128, .dv_exact = 1,
                                      .row_tiles = 1, .vec = 1, .short_indices = 1};
    char *src = flex_cuda_decode_source(&dec, NULL, &c.score, NULL, NULL);
    ck_assert_ptr_nonnull(src);
    void *bin = NULL;
    size_t size = 0;
    const flex_status st = flex_cuda_compile(NULL, api, src, "flex_decode", "sm_90a", &bin, &size);
    ck_assert_msg(st == FLEX_OK, "decode: %.600s", flex_error_message(NULL));
    free(bin);
    free(src);
    ir_free(&c.score);
}
END_TEST

/* The decode kernel and its split-KV combine (flex_decode.cuh, on the LSE
 * merge of core/lse_merge.h that the CPU decode path includes) compile to
 * machine code for both targets: every row-tile count, both 16-bit types
 * and f32, aligned and unaligned rows, head dims 64-256, masked and dense,
 * with a score mod that reads buffers (checked and proved reads). */
START_TEST(test_nvrtc_compiles_decode) {
    if (!nvrtc_loaded("NVRTC decode cases")) return;
    ir_mod mask, score;
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv && q - kv <= W", seed_params, 2, NULL, 0,
                                &mask),
                     0);
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "score + float(bias[h][q % 7]) * float(kv - q)",
                                NULL, 0, bias_buf, 1, &score),
                     0);
    static const struct {
        flex_cuda_dec_config cfg;
        int masked, scored, in_range;
        const char *arch;
    } dec_cases[] = {
        {{.dtype = FLEX_BF16, .dq = 128, .dv = 128, .dv_exact = 1, .row_tiles = 1, .vec = 1,
          .short_indices = 1},
         1, 1, 0, "sm_90a"},
        {{.dtype = FLEX_BF16, .dq = 128, .dv = 128, .dv_exact = 1, .row_tiles = 1, .vec = 1},
         0, 0, 0, "sm_90a"},
        {{.dtype = FLEX_F16, .dq = 64, .dv = 64, .row_tiles = 2}, 1, 0, 0, "sm_80"},
        {{.dtype = FLEX_BF16, .dq = 256, .dv = 128, .dv_exact = 1, .row_tiles = 4, .vec = 1}, 0,
         1, 1, "sm_80"},
        {{.dtype = FLEX_BF16, .dq = 64, .dv = 192, .row_tiles = 4, .vec = 1}, 1, 1, 1, "sm_90a"},
        {{.dtype = FLEX_F32, .dq = 128, .dv = 64, .row_tiles = 1}, 1, 1, 0, "sm_90a"},
        {{.dtype = FLEX_F32, .dq = 64, .dv = 64, .row_tiles = 1}, 0, 0, 0, "sm_80"},
    };
    for (size_t i = 0; i < sizeof dec_cases / sizeof dec_cases[0]; i++) {
        const ir_mod *m = dec_cases[i].masked ? &mask : NULL;
        const ir_mod *sc = dec_cases[i].scored ? &score : NULL;
        unsigned char *mask_in = dec_cases[i].in_range && m ? every_read(m) : NULL;
        unsigned char *score_in = dec_cases[i].in_range && sc ? every_read(sc) : NULL;
        char *src = flex_cuda_decode_source(&dec_cases[i].cfg, m, sc, mask_in, score_in);
        free(mask_in);
        free(score_in);
        ck_assert_ptr_nonnull(src);
        ck_assert_ptr_nonnull(strstr(src, "flex_decode_kernel"));
        ck_assert_ptr_nonnull(strstr(src, "flex_splitkv_combine"));
        void *bin = NULL;
        size_t size = 0;
        flex_status s = flex_cuda_compile(NULL, api, src, "flex_decode", dec_cases[i].arch, &bin,
                                          &size);
        ck_assert_msg(s == FLEX_OK, "decode case %zu (%s): %s", i, dec_cases[i].arch,
                      flex_error_message(NULL));
        ck_assert_uint_gt(size, 0);
        free(bin);
        free(src);
    }
    ir_free(&mask);
    ir_free(&score);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("cuda_codegen");
    TCase *emit = tcase_create("emit");
    tcase_add_test(emit, test_emit_every_preset);
    tcase_add_test(emit, test_emit_exact_constants_and_slots);
    tcase_add_test(emit, test_division_by_constant);
    tcase_add_test(emit, test_reads_in_range);
    tcase_add_test(emit, test_emit_ir_function);
    tcase_add_test(emit, test_int_to_float);
    tcase_add_test(emit, test_short_int_to_float);
    tcase_add_test(emit, test_unsigned_division_where_proved);
    tcase_add_test(emit, test_backward_source_wgmma);
    suite_add_tcase(suite, emit);
    TCase *nvrtc = tcase_create("nvrtc");
    tcase_set_timeout(nvrtc, 600);
    tcase_add_test(nvrtc, test_nvrtc_compiles_presets_and_seeds);
    tcase_add_test(nvrtc, test_nvrtc_error_carries_log);
    tcase_add_test(nvrtc, test_nvrtc_compiles_decode);
    suite_add_tcase(suite, nvrtc);
    /* Cases of their own, so CK_RUN_CASE=nvrtc_layout (nvrtc_deterministic)
     * runs one alone. */
    TCase *layout = tcase_create("nvrtc_layout");
    tcase_add_test(layout, test_nvrtc_parameter_layout);
    suite_add_tcase(suite, layout);
    TCase *det = tcase_create("nvrtc_deterministic");
    tcase_set_timeout(det, 600);
    tcase_add_test(det, test_nvrtc_compiles_deterministic_backward);
    suite_add_tcase(suite, det);
    TCase *trig = tcase_create("nvrtc_trig");
    tcase_set_timeout(trig, 300);
    tcase_add_test(trig, test_nvrtc_trig_out_of_line);
    tcase_add_test(trig, test_nvrtc_trig_other_kernels);
    tcase_add_test(trig, test_nvrtc_diagonal_tables);
    suite_add_tcase(suite, trig);
    /* CK_RUN_CASE=nvrtc_partial_bits runs it alone. */
    TCase *bits = tcase_create("nvrtc_partial_bits");
    tcase_set_timeout(bits, 600);
    tcase_add_test(bits, test_nvrtc_compiles_partial_bits);
    suite_add_tcase(suite, bits);
    SRunner *runner = srunner_create(suite);
    /* In-process, so the skip flag set by a case is seen here. */
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    if (failed) return 1;
    return nvrtc_skipped ? 77 : 0;
}
