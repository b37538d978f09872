/*
 * The HIP backend without an AMD GPU: the architecture table, the HIP
 * kernel sources built from the shared templates, the backend's report
 * where no HIP runtime is installed, and every emitted kernel compiled for
 * gfx90a (MI200), gfx942 (MI300; gfx940 where the compiler predates it) and
 * gfx1100 (RDNA3) with clang's AMDGPU target and no HIP headers: the
 * forward per preset, the backward once per dtype, with its products on
 * the matrix instructions (MFMA, WMMA) where the arch has them.
 *
 * The compiler is $FLEXATTN_HIP_CLANG or the newest clang-N found. Without
 * one the compile cases print "SKIPPED: <reason>" and the program exits 77
 * (meson: skipped, never passed), unless FLEXATTN_REQUIRE_HIP_COMPILE=1
 * (set by scripts/test.sh, whose machines install clang with
 * scripts/deps.sh): then a missing compiler is a failure.
 * FLEXATTN_SKIP_HIP_COMPILE=1 skips them (scripts/test.sh's sanitizer
 * build: the compiles run in clang's process, which it does not check).
 */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "mod/derive.h"
#include "mod/parse.h"
#include "../backends/hip/hip_compile.h"

static int compile_skipped;
static char clang_path[256];
static char work_dir[] = "/tmp/flexattn-hip-XXXXXX";

/* ---- architecture table (a pure function) ---- */

START_TEST(test_arch_table) {
    flex_hip_arch a;
    char why[256];
    ck_assert_int_eq(flex_hip_arch_supported("gfx90a:sramecc+:xnack-", &a, why, sizeof why), 1);
    ck_assert_str_eq(a.name, "gfx90a");
    ck_assert_int_eq(a.wave_size, 64);
    ck_assert_int_eq(flex_hip_arch_supported("gfx942", &a, why, sizeof why), 1);
    ck_assert_int_eq(a.wave_size, 64);
    ck_assert_int_eq(flex_hip_arch_supported("gfx1100", &a, why, sizeof why), 1);
    ck_assert_int_eq(a.wave_size, 32);
    why[0] = 0;
    ck_assert_int_eq(flex_hip_arch_supported("gfx906:sramecc-:xnack-", &a, why, sizeof why), 0);
    ck_assert_msg(strstr(why, "'gfx906'") != NULL, "the reason names the arch: %s", why);
    ck_assert_int_eq(flex_hip_arch_supported("gfx1030", NULL, why, sizeof why), 0);
    ck_assert_msg(strstr(why, "'gfx1030'") != NULL, "%s", why);
    ck_assert_int_eq(flex_hip_arch_supported("gfx9", NULL, why, sizeof why), 0);
    ck_assert_int_eq(flex_hip_arch_supported("", NULL, why, sizeof why), 0);
    ck_assert_int_eq(flex_hip_arch_supported(NULL, NULL, why, sizeof why), 0);
}
END_TEST

/* ---- the backend where no HIP runtime is installed ---- */

START_TEST(test_backend_reports_why_unusable) {
    int found = 0;
    for (int i = 0; i < flex_backend_count(); i++) {
        flex_backend_info info;
        ck_assert_int_eq(flex_backend_get_info(i, &info), FLEX_OK);
        if (strcmp(info.name, "hip") != 0) continue;
        found = 1;
        ck_assert_int_eq(info.built_in, 1);
        if (info.usable) return; /* a machine with an AMD GPU: nothing to show here */
        ck_assert_int_eq(info.score, 0);
        ck_assert_msg(info.reason[0] != 0, "an unusable backend says why");
    }
    ck_assert_int_eq(found, 1);
    flex_backend_info hip_info;
    for (int i = 0; i < flex_backend_count(); i++)
        if (flex_backend_get_info(i, &hip_info) == FLEX_OK && !strcmp(hip_info.name, "hip")) break;
    /* Asking for it by name is an error with that reason, never a fallback. */
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("hip", &ctx), FLEX_ERR_BACKEND);
    ck_assert_ptr_null(ctx);
    const char *msg = flex_error_message(NULL);
    ck_assert_msg(strstr(msg, hip_info.reason) != NULL, "'%s' carries '%s'", msg,
                  hip_info.reason);
    setenv("FLEXATTN_BACKEND", "HIP:0", 1);
    ck_assert_int_eq(flex_context_create(NULL, &ctx), FLEX_ERR_BACKEND);
    ck_assert_ptr_null(ctx);
    unsetenv("FLEXATTN_BACKEND");
}
END_TEST

/* ---- sources ---- */

static int parse(flex_mod_kind kind, const char *text, const flex_param *params, int np,
                 const flex_buffer_decl *bufs, int nb, ir_mod *out) {
    flex_mod_desc desc = {kind, text, params, np, bufs, nb};
    char err[1024];
    flex_status s = mod_parse(&desc, out, err, sizeof err);
    if (s != FLEX_OK) fprintf(stderr, "parse failed for '%s': %s\n", text, err);
    return s == FLEX_OK ? 0 : -1;
}

static const flex_cuda_fwd_config small_bf16 = {.dtype = FLEX_BF16, .dq = 64, .dv = 64,
                                                .warps = 4, .mt = 1, .block_n = 16, .vec = 1,
                                                .scale_positive = 1, .short_indices = 1,
                                                .mask_bits = 1};
static const flex_cuda_fwd_config small_f16 = {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 4,
                                               .mt = 1, .block_n = 16};
static const flex_cuda_fwd_config f32 = {.dtype = FLEX_F32, .dq = 64, .dv = 64, .warps = 4,
                                         .mt = 1};
/* The tiles hip_backend.c picks for 128 x 128 mask blocks and head dim 128
 * (32-key steps: 64 keys need 80 KB of LDS; test_gpu_host checks the fit). */
static const flex_cuda_fwd_config production = {.dtype = FLEX_BF16, .dq = 128, .dv = 128,
                                                .warps = 4, .mt = 1, .block_n = 32, .vec = 1,
                                                .scale_positive = 1, .mask_bits = 1,
                                                .dv_exact = 1};

START_TEST(test_hip_source_shape) {
    ir_mod m;
    ck_assert_int_eq(parse(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &m), 0);
    char *s = flex_hip_forward_source(&small_bf16, &m, NULL, NULL, NULL);
    ck_assert_ptr_nonnull(s);
    ck_assert_msg(strncmp(s, "#define FLEX_HIP 1\n", 19) == 0, "FLEX_HIP comes first");
    const char *prims = strstr(s, "flex_mma_hip.cuh:"), *ptx = strstr(s, "flex_mma_sm80.cuh:");
    ck_assert_ptr_nonnull(prims);
    ck_assert_ptr_nonnull(ptx);
    ck_assert_msg(prims < ptx, "the AMD primitives precede the shared layout code");
    ck_assert_ptr_nonnull(strstr(s, "flex_forward_kernel"));
    /* The CUDA source is the same text without the HIP parts. */
    char *cuda = flex_cuda_forward_source(&small_bf16, &m, NULL);
    ck_assert_ptr_nonnull(cuda);
    ck_assert_ptr_nonnull(strstr(s, cuda + strlen(cuda) - 2000));
    free(cuda);
    /* flex_amd_lanes.h is spliced in where flex_mma_hip.cuh includes it:
     * hiprtc has no include path, and the cache key covers the source. */
    ck_assert_ptr_nonnull(strstr(s, "flex_amd_lanes.h: the lane permutations"));
    ck_assert_ptr_null(strstr(s, "#include"));
    free(s);
    flex_cuda_fwd_config wg = production;
    wg.wgmma = 1;
    ck_assert_ptr_null(flex_hip_forward_source(&wg, &m, NULL, NULL, NULL));
    /* The backward: CUDA's kernels with the same AMD parts. */
    const flex_cuda_bwd_config bcfg = {.dtype = FLEX_BF16, .dq = 64, .dv = 64, .warps = 2,
                                       .block_m = 32, .vec = 1};
    const flex_cuda_bwd_score none = {0};
    s = flex_hip_backward_source(&bcfg, &m, NULL, &none);
    ck_assert_ptr_nonnull(s);
    ck_assert_msg(strncmp(s, "#define FLEX_HIP 1\n", 19) == 0, "FLEX_HIP comes first");
    prims = strstr(s, "flex_mma_hip.cuh:");
    ptx = strstr(s, "flex_mma_sm80.cuh:");
    ck_assert_msg(prims && ptx && prims < ptx, "the AMD primitives precede the layout code");
    ck_assert_ptr_nonnull(strstr(s, "flex_bwd_kernel"));
    ck_assert_ptr_nonnull(strstr(s, "flex_bwd_preprocess"));
    ck_assert_ptr_nonnull(strstr(s, "flex_bwd_dq_store"));
    ck_assert_ptr_null(strstr(s, "#include"));
    cuda = flex_cuda_backward_source(&bcfg, &m, NULL, &none);
    ck_assert_ptr_nonnull(cuda);
    ck_assert_ptr_nonnull(strstr(s, cuda + strlen(cuda) - 2000));
    free(cuda);
    /* then the check that MFMA's dQ items pair up the warps of a wave */
    ck_assert_ptr_nonnull(strstr(s, "FLEX_BWD_MT * FLEX_BWD_DQ_GROUPS % 2 == 0"));
    free(s);
    /* The deterministic dQ kernel has no AMD form. */
    flex_cuda_bwd_config det = bcfg;
    det.dq_warps = 2;
    det.dq_block_n = 64;
    ck_assert_ptr_null(flex_hip_backward_source(&det, &m, NULL, &none));
    s = flex_hip_mask_blocks_source(&m);
    ck_assert_ptr_nonnull(s);
    ck_assert_ptr_nonnull(strstr(s, "flex_mask_blocks_kernel"));
    free(s);
    ir_free(&m);
}
END_TEST

/* ---- clang's AMDGPU target ---- */

typedef struct hip_case {
    char name[128];
    char *source;
    const char *arch;
    const char *expect; /* text the assembly must contain (NULL: not looked at) */
    int status;         /* the compiler's exit status; -2: `expect` is missing */
    char log[1024];
} hip_case;

static hip_case cases[1024];
static int num_cases, next_case;
static pthread_mutex_t case_lock = PTHREAD_MUTEX_INITIALIZER;

/* Whether the file at path contains text. */
static int file_contains(const char *path, const char *text) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    const size_t n = strlen(text);
    char buf[65536 + 256];
    size_t have = 0, got;
    int found = 0;
    while (!found && (got = fread(buf + have, 1, sizeof buf - have - 1, f)) > 0) {
        have += got;
        buf[have] = 0;
        found = strstr(buf, text) != NULL;
        /* keep the tail, which a match may straddle */
        const size_t keep = have < n ? have : n;
        memmove(buf, buf + have - keep, keep);
        have = keep;
    }
    fclose(f);
    return found;
}

/* Compiles source for arch to AMDGPU assembly (instruction selection and
 * register allocation for that target, no link); the exit status, with
 * the first lines of the compiler's output in log. With expect, the
 * assembly must also contain that text (-2 when it does not). */
static int clang_compile(const char *source, const char *arch, const char *tag,
                         const char *expect, char *log, size_t log_cap) {
    char src_path[512], asm_path[512], cmd[2048];
    snprintf(src_path, sizeof src_path, "%s/%s.hip", work_dir, tag);
    snprintf(asm_path, sizeof asm_path, "%s/%s.s", work_dir, tag);
    FILE *f = fopen(src_path, "w");
    if (!f) return -1;
    fputs(source, f);
    fclose(f);
    snprintf(cmd, sizeof cmd,
             "'%s' -x hip -std=c++17 -O3 -Werror=implicit-function-declaration --offload-arch=%s "
             "-nogpulib -nogpuinc --cuda-device-only -S -o '%s' '%s' 2>&1",
             clang_path, arch, expect ? asm_path : "/dev/null", src_path);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t n = fread(log, 1, log_cap - 1, p);
    log[n] = 0;
    char sink[4096];
    while (fread(sink, 1, sizeof sink, p) > 0) {
    }
    int st = pclose(p);
    if (st == 0 && expect && !file_contains(asm_path, expect)) {
        snprintf(log, log_cap, "the assembly has no '%s'", expect);
        st = -2;
    }
    unlink(src_path);
    if (expect) unlink(asm_path);
    return st;
}

static void *compile_worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&case_lock);
        const int i = next_case < num_cases ? next_case++ : -1;
        pthread_mutex_unlock(&case_lock);
        if (i < 0) return NULL;
        hip_case *c = &cases[i];
        char tag[32];
        snprintf(tag, sizeof tag, "case%d", i);
        c->status = clang_compile(c->source, c->arch, tag, c->expect, c->log, sizeof c->log);
    }
}

/* Whether the compiler knows arch (compiles an empty kernel for it). */
static int knows_arch(const char *arch) {
    char log[512];
    return clang_compile("#define FLEX_HIP 1\n__attribute__((global)) void k() {}\n", arch,
                         arch, NULL, log, sizeof log) == 0;
}

/* The compiler to use: $FLEXATTN_HIP_CLANG, else the newest clang-N or
 * clang that knows gfx90a. */
static int find_clang(char *why, size_t cap) {
    const char *skip = getenv("FLEXATTN_SKIP_HIP_COMPILE");
    if (skip && strcmp(skip, "1") == 0) {
        snprintf(why, cap, "FLEXATTN_SKIP_HIP_COMPILE=1");
        return -1;
    }
    const char *env = getenv("FLEXATTN_HIP_CLANG");
    const char *candidates[] = {"clang-20", "clang-19", "clang-18", "clang-17", "clang-16",
                                "clang-15", "clang-14", "clang"};
    for (size_t i = 0; i < (env ? 1 : sizeof candidates / sizeof candidates[0]); i++) {
        snprintf(clang_path, sizeof clang_path, "%s", env ? env : candidates[i]);
        if (knows_arch("gfx90a")) return 0;
    }
    snprintf(why, cap, "%s", env ? "$FLEXATTN_HIP_CLANG cannot compile for gfx90a"
                                 : "no clang with the AMDGPU target (clang-14 or newer) found");
    return -1;
}

static void add(const char *label, const char *arch, char *source) {
    ck_assert_ptr_nonnull(source);
    ck_assert_int_lt(num_cases, (int)(sizeof cases / sizeof cases[0]));
    hip_case *c = &cases[num_cases++];
    snprintf(c->name, sizeof c->name, "%s/%s", label, arch);
    c->source = source;
    c->arch = arch;
    c->expect = NULL;
}

/* The matrix instruction arch's 16-bit products must be made of. */
static const char *matrix_instruction(const char *arch) {
    return strncmp(arch, "gfx11", 5) == 0 ? "v_wmma_f32_16x16x16" : "v_mfma_f32_16x16x16";
}

/* The backward source for cfg, the mask mod and the score mod (either may
 * be NULL) with the gradient of every float buffer the score mod reads
 * (one gradient slot per buffer), as the backend builds it. */
static char *backward_source(const flex_cuda_bwd_config *config, const ir_mod *mask,
                             const ir_mod *score) {
    flex_cuda_bwd_config cfg = *config;
    if (!score) {
        const flex_cuda_bwd_score none = {0};
        return flex_hip_backward_source(&cfg, mask, NULL, &none);
    }
    ir_mod derived;
    ck_assert_int_eq(ir_copy(&derived, score), 0);
    mod_derivative der;
    ck_assert_int_eq(mod_derive(&derived, &der), 0);
    flex_cuda_grad_load loads[MOD_DERIVE_MAX_LOADS];
    for (int l = 0; l < der.num_loads; l++)
        loads[l] = flex_cuda_grad_load_of(&derived, &der.loads[l], der.loads[l].buffer);
    cfg.grad_slots = derived.num_buffers;
    const flex_cuda_bwd_score sc = {&derived, der.value, der.dscore, loads, der.num_loads, NULL};
    char *src = flex_hip_backward_source(&cfg, mask, NULL, &sc);
    ir_free(&derived);
    return src;
}

/* Backward tiles with an even number of warps and of 16-row dQ tiles (so
 * MFMA serves on wave64; 16 kv rows a warp), small head dims to keep the
 * compiles short, and between them both sides of every variant switch:
 * bwd_bf16 has what hip_backend.c never picks (the pipeline, expf, the
 * 16-byte dQ reductions in their AMD form, head-major grid), bwd_f16 the
 * 128-row kv tile (8 warps) with the choices hip_backend.c makes. The f32
 * kernel has no tiles. */
static const flex_cuda_bwd_config bwd_bf16 = {.dtype = FLEX_BF16, .dq = 64, .dv = 64,
                                              .warps = 2, .block_m = 32, .vec = 1,
                                              .short_indices = 1, .pipeline = 1, .dq_red = 1};
static const flex_cuda_bwd_config bwd_f16 = {.dtype = FLEX_F16, .dq = 64, .dv = 64, .warps = 8,
                                             .block_m = 32, .exp2 = 1, .kv_fastest = 1};
static const flex_cuda_bwd_config bwd_f32 = {.dtype = FLEX_F32, .dq = 64, .dv = 64, .warps = 4,
                                             .block_m = 16};
/* hip_backend.c's choice for 128 x 128 mask blocks and head dim 128 (the
 * 8-warp tile halved to fit the LDS, no pipeline). */
static const flex_cuda_bwd_config bwd_production = {.dtype = FLEX_BF16, .dq = 128, .dv = 128,
                                                    .warps = 4, .block_m = 32, .vec = 1,
                                                    .short_indices = 1, .exp2 = 1,
                                                    .kv_fastest = 1};

static const flex_buffer_decl seed_bufs[] = {
    {"bias", FLEX_BF16, 2}, {"mask8", FLEX_U8, 1}, {"ids64", FLEX_I64, 1},
    {"hb", FLEX_F16, 1},    {"keep", FLEX_BOOL, 1}};
static const flex_param seed_params[] = {{"W", 0, 256}, {"T", 1, 0.5}};
/* A score mod with every op kind, as the NVRTC checks have it. */
static const char every_op[] =
    "let a = (q * 2147483) // (kv - 7) + q % -3 - ~kv;\n"
    "let f = float(a) / 3.0 + pow(abs(score), T) + sigmoid(score) - rsqrt(1.0 + score * score);\n"
    "let g = min(f, max(score, -1.0)) + exp(-abs(score)) + log(2.0 + abs(score)) + sqrt(abs(f));\n"
    "let i = int(g * 1e9) ^ (a | 5) & 255;\n"
    "let bb = float(bias[h][q % 7]) + float(hb[kv % 3]) + float(mask8[q % 5] + ids64[kv % 2]);\n"
    "where(keep[q % 4] && i != 0, g + floor(f) - ceil(f) + sin(g) * cos(g) + tan(0.1) + "
    "tanh_approx(g) + exp2(-2.0) + log2(8.0) + bb, -inf)";

START_TEST(test_clang_compiles_every_kernel) {
    char why[256];
    if (find_clang(why, sizeof why) != 0) {
        const char *req = getenv("FLEXATTN_REQUIRE_HIP_COMPILE");
        ck_assert_msg(!(req && strcmp(req, "1") == 0),
                      "FLEXATTN_REQUIRE_HIP_COMPILE=1 but %s (scripts/deps.sh installs clang-16)",
                      why);
        printf("SKIPPED: HIP compile cases (%s)\n", why);
        compile_skipped = 1;
        return;
    }
    /* MI300 is gfx942 from LLVM 17 on; LLVM 16 knows its sibling gfx940. */
    const char *mi300 = knows_arch("gfx942") ? "gfx942" : knows_arch("gfx940") ? "gfx940" : NULL;
    const char *req = getenv("FLEXATTN_REQUIRE_HIP_COMPILE");
    const int required = req && strcmp(req, "1") == 0;
    ck_assert_msg(mi300 || !required, "%s knows neither gfx942 nor gfx940 (clang-16+ needed)",
                  clang_path);
    ck_assert_msg(knows_arch("gfx1100") || !required, "%s does not know gfx1100", clang_path);
    const char *archs[3];
    int num_archs = 0;
    archs[num_archs++] = "gfx90a";
    if (mi300) archs[num_archs++] = mi300;
    if (knows_arch("gfx1100")) archs[num_archs++] = "gfx1100";

    /* Every preset, its forward kernels (16-bit and f32) and, for mask
     * mods, the mask-block evaluator; the every-op score mod beside a
     * buffer-reading mask; the production tiles with a mask; the
     * backward kernels. */
    for (int a = 0; a < num_archs; a++) {
        for (int i = 0; i < flex_preset_count(); i++) {
            const flex_preset *p = flex_preset_at(i);
            ir_mod m;
            ck_assert_int_eq(parse(p->kind, p->text, p->params, p->num_params, p->buffers,
                                   p->num_buffers, &m),
                             0);
            const int is_mask = p->kind == FLEX_MOD_MASK;
            const ir_mod *mask = is_mask ? &m : NULL, *score = is_mask ? NULL : &m;
            char label[96];
            snprintf(label, sizeof label, "%s/forward/bf16", p->name);
            add(label, archs[a], flex_hip_forward_source(&small_bf16, mask, score, NULL, NULL));
            cases[num_cases - 1].expect = matrix_instruction(archs[a]);
            snprintf(label, sizeof label, "%s/forward/f32", p->name);
            add(label, archs[a], flex_hip_forward_source(&f32, mask, score, NULL, NULL));
            if (is_mask) {
                snprintf(label, sizeof label, "%s/mask_blocks", p->name);
                add(label, archs[a], flex_hip_mask_blocks_source(&m));
            }
            ir_free(&m);
        }
        ir_mod mask, score;
        ck_assert_int_eq(parse(FLEX_MOD_MASK, "q >= kv && q - kv <= W && keep[kv % 4]",
                               seed_params, 2, seed_bufs, 5, &mask),
                         0);
        ck_assert_int_eq(parse(FLEX_MOD_SCORE, every_op, seed_params, 2, seed_bufs, 5, &score),
                         0);
        add("every_op/forward/f16", archs[a],
            flex_hip_forward_source(&small_f16, &mask, &score, NULL, NULL));
        cases[num_cases - 1].expect = matrix_instruction(archs[a]);
        add("every_op/forward/f32", archs[a],
            flex_hip_forward_source(&f32, &mask, &score, NULL, NULL));
        /* The production tiles (about 4 s of compile each on the matrix
         * instructions; more than 100 s with the scalar products). */
        add("sliding_window/forward/bf16/production", archs[a],
            flex_hip_forward_source(&production, &mask, NULL, NULL, NULL));
        cases[num_cases - 1].expect = matrix_instruction(archs[a]);
        add("sliding_window/backward/bf16/production", archs[a],
            backward_source(&bwd_production, &mask, NULL));
        cases[num_cases - 1].expect = matrix_instruction(archs[a]);
        /* The backward, once per dtype: a buffer-reading mask mod; a score
         * mod with a float buffer whose gradient is wanted; both in f32.
         * The 16-bit ones must run their products on the arch's matrix
         * instruction. */
        ir_mod grad_score;
        static const flex_buffer_decl grad_bufs[] = {{"slopes", FLEX_F32, 1}};
        ck_assert_int_eq(parse(FLEX_MOD_SCORE, "30.0 * tanh(score / 30.0) + slopes[h] * (kv - q)",
                               NULL, 0, grad_bufs, 1, &grad_score),
                         0);
        add("sliding_window/backward/bf16", archs[a], backward_source(&bwd_bf16, &mask, NULL));
        cases[num_cases - 1].expect = matrix_instruction(archs[a]);
        add("softcap_slopes/backward/f16", archs[a], backward_source(&bwd_f16, NULL, &grad_score));
        cases[num_cases - 1].expect = matrix_instruction(archs[a]);
        add("sliding_window+softcap_slopes/backward/f32", archs[a],
            backward_source(&bwd_f32, &mask, &grad_score));
        ir_free(&grad_score);
        ir_free(&mask);
        ir_free(&score);
    }
    pthread_t threads[2];
    for (int t = 0; t < 2; t++)
        pthread_create(&threads[t], NULL, compile_worker, NULL);
    for (int t = 0; t < 2; t++)
        pthread_join(threads[t], NULL);
    int failed = 0;
    for (int i = 0; i < num_cases; i++) {
        if (cases[i].status != 0) {
            failed++;
            fprintf(stderr, "FAILED %s:\n%s\n", cases[i].name, cases[i].log);
        }
        free(cases[i].source);
    }
    ck_assert_msg(failed == 0, "%d of %d HIP compiles failed", failed, num_cases);
    printf("%d HIP compiles with %s passed for", num_cases, clang_path);
    for (int a = 0; a < num_archs; a++)
        printf(" %s", archs[a]);
    printf("\n");
}
END_TEST

/* The check itself catches a kernel that does not compile: the log names
 * the error. */
START_TEST(test_clang_reports_broken_kernel) {
    char why[256];
    if (find_clang(why, sizeof why) != 0) {
        compile_skipped = 1;
        return;
    }
    ir_mod m;
    ck_assert_int_eq(parse(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &m), 0);
    char *s = flex_hip_mask_blocks_source(&m);
    ck_assert_ptr_nonnull(s);
    const size_t n = strlen(s);
    char *broken = malloc(n + 64);
    snprintf(broken, n + 64, "%s\nstatic void broken() { undefined_name(); }\n", s);
    char log[1024];
    ck_assert_int_eq(clang_compile(s, "gfx90a", "good", NULL, log, sizeof log), 0);
    ck_assert_int_ne(clang_compile(broken, "gfx90a", "broken", NULL, log, sizeof log), 0);
    ck_assert_msg(strstr(log, "undefined_name") != NULL, "the log names it: %s", log);
    free(broken);
    free(s);
    ir_free(&m);
}
END_TEST

int main(void) {
    if (!mkdtemp(work_dir)) {
        perror("mkdtemp");
        return 1;
    }
    Suite *suite = suite_create("hip_codegen");
    TCase *host = tcase_create("host");
    tcase_add_test(host, test_arch_table);
    tcase_add_test(host, test_backend_reports_why_unusable);
    tcase_add_test(host, test_hip_source_shape);
    suite_add_tcase(suite, host);
    TCase *amdgpu = tcase_create("amdgpu");
    tcase_set_timeout(amdgpu, 1200);
    tcase_add_test(amdgpu, test_clang_compiles_every_kernel);
    tcase_add_test(amdgpu, test_clang_reports_broken_kernel);
    suite_add_tcase(suite, amdgpu);
    SRunner *runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    rmdir(work_dir);
    if (failed) return 1;
    return compile_skipped ? 77 : 0;
}
