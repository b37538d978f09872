/*
 * HIP kernel sources from the shared kernel tree, the AMD architecture
 * table, and hiprtc compilation.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hip_compile.h"

static const char *hip_template(const char *name) {
    for (const struct flex_embedded_file *f = flex_hip_template_files; f->name; f++)
        if (strcmp(f->name, name) == 0) return f->text;
    return NULL;
}

/* prefix + source, with `insert` placed before the first occurrence of
 * `before` in source (which must occur); malloc'd or NULL. */
static char *hip_wrap(const char *source, const char *insert, const char *before) {
    const char *runtime = hip_template("flex_hip_runtime.cuh");
    if (!source || !runtime) return NULL;
    static const char define[] = "#define FLEX_HIP 1\n";
    const char *at = before ? strstr(source, before) : source;
    if (!at) return NULL;
    const size_t head = (size_t)(at - source), ins = insert ? strlen(insert) : 0;
    const size_t len = strlen(define) + strlen(runtime) + 1 + head + ins + 1 + strlen(at) + 1;
    char *s = malloc(len);
    if (!s) return NULL;
    snprintf(s, len, "%s%s\n%.*s%s\n%s", define, runtime, (int)head, source,
             insert ? insert : "", at);
    return s;
}

/* flex_mma_hip.cuh with its #include of flex_amd_lanes.h replaced by that
 * file's text: hiprtc is given one source and no include path, and the
 * kernel caches key the source's checksum, which must cover every line
 * compiled (malloc'd; NULL: out of memory or a template missing). */
static char *hip_primitives(void) {
    static const char include[] = "#include \"flex_amd_lanes.h\"\n";
    const char *prims = hip_template("flex_mma_hip.cuh");
    const char *lanes = hip_template("flex_amd_lanes.h");
    const char *at = prims ? strstr(prims, include) : NULL;
    if (!at || !lanes) return NULL;
    const char *rest = at + strlen(include);
    const size_t len = (size_t)(at - prims) + strlen(lanes) + strlen(rest) + 1;
    char *s = malloc(len);
    if (s) snprintf(s, len, "%.*s%s%s", (int)(at - prims), prims, lanes, rest);
    return s;
}

/* The CUDA source of a 16-bit or f32 kernel made for AMD: FLEX_HIP and the
 * runtime names first, the AMD primitives before flex_mma_sm80.cuh. Frees
 * cuda; NULL when it is NULL or out of memory. */
static char *hip_from_cuda(char *cuda) {
    const char *mma = flex_cuda_template("flex_mma_sm80.cuh");
    char *prims = hip_primitives();
    char *s = mma && prims ? hip_wrap(cuda, prims, mma) : NULL;
    free(prims);
    free(cuda);
    return s;
}

char *flex_hip_forward_source(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                              const ir_mod *score, const unsigned char *mask_in_range,
                              const unsigned char *score_in_range) {
    if (cfg->wgmma || cfg->tma || cfg->chain) return NULL; /* the sm_90a kernel has no AMD form */
    return hip_from_cuda(
        flex_cuda_forward_source_in_range(cfg, mask, score, mask_in_range, score_in_range));
}

/* Appended to the backward: on MFMA both warps of a wave must issue every
 * pair product together (flex_mma_hip.cuh). The per-warp loops do; the dQ
 * loop of flex_backward.cuh hands its items (m-tiles x column groups) to
 * warps w, w + FLEX_WARPS, ..., which gives both warps of a wave as many
 * items when the warps and the items are even in number. FLEX_AMD_HAVE_MFMA
 * asks for an even number of m-tiles; this checks the loop's own count, so
 * that a change there stops the compile rather than a kernel. */
static const char mfma_check[] =
    "\n#if defined(FLEX_AMD_HAVE_MFMA)\n"
    "static_assert(FLEX_WARPS % 2 == 0 && FLEX_BWD_MT * FLEX_BWD_DQ_GROUPS % 2 == 0,\n"
    "              \"MFMA: the dQ items must come to both warps of a wave alike\");\n"
    "#endif\n";

char *flex_hip_backward_source(const flex_cuda_bwd_config *cfg, const ir_mod *mask,
                               const unsigned char *mask_in_range,
                               const flex_cuda_bwd_score *score) {
    if (cfg->dq_warps > 0) return NULL; /* the deterministic dQ kernel has no AMD form */
    if (cfg->wgmma) return NULL;        /* nor the sm_90a main kernel */
    char *s = hip_from_cuda(flex_cuda_backward_source(cfg, mask, mask_in_range, score));
    if (!s) return NULL;
    const size_t n = strlen(s);
    char *t = realloc(s, n + sizeof mfma_check);
    if (!t) {
        free(s);
        return NULL;
    }
    memcpy(t + n, mfma_check, sizeof mfma_check);
    return t;
}

char *flex_hip_mask_blocks_source(const ir_mod *mask) {
    char *cuda = flex_cuda_mask_blocks_source(mask);
    char *s = hip_wrap(cuda, NULL, NULL);
    free(cuda);
    return s;
}

static const flex_hip_arch known_archs[] = {
    {"gfx90a", 64, 65536, "CDNA2 (MI200)"},    {"gfx940", 64, 65536, "CDNA3 (MI300)"},
    {"gfx941", 64, 65536, "CDNA3 (MI300)"},    {"gfx942", 64, 65536, "CDNA3 (MI300)"},
    {"gfx1100", 32, 65536, "RDNA3 (RX 7900)"}, {"gfx1101", 32, 65536, "RDNA3 (RX 7800)"},
    {"gfx1102", 32, 65536, "RDNA3 (RX 7600)"},
};

int flex_hip_arch_supported(const char *gcn_arch, flex_hip_arch *out, char *why, size_t why_cap) {
    char name[32];
    size_t n = 0;
    while (gcn_arch && gcn_arch[n] && gcn_arch[n] != ':' && n + 1 < sizeof name) {
        name[n] = gcn_arch[n];
        n++;
    }
    name[n] = 0;
    for (size_t i = 0; i < sizeof known_archs / sizeof known_archs[0]; i++)
        if (strcmp(known_archs[i].name, name) == 0) {
            if (out) *out = known_archs[i];
            return 1;
        }
    if (why && why_cap)
        snprintf(why, why_cap,
                 "the HIP kernels support gfx90a, gfx940-gfx942 and gfx1100-gfx1102; this GPU is "
                 "'%s'",
                 n ? name : "(unknown)");
    return 0;
}

flex_status flex_hip_compile(flex_context *ctx, const flex_hip_api *api, const char *source,
                             const char *program_name, const char *arch, void **code,
                             size_t *size) {
    *code = NULL;
    *size = 0;
    hiprtcProgram prog = NULL;
    hiprtcResult r = api->hiprtcCreateProgram(&prog, source, program_name, 0, NULL, NULL);
    if (r != 0)
        return flex_fail(ctx, FLEX_ERR_COMPILE, "hiprtcCreateProgram failed for %s: %s",
                         program_name, api->hiprtcGetErrorString(r));
    char arch_opt[64];
    snprintf(arch_opt, sizeof arch_opt, "--offload-arch=%s", arch);
    const char *opts[] = {arch_opt, "-std=c++17", "-O3"};
    r = api->hiprtcCompileProgram(prog, 3, opts);
    if (r != 0) {
        size_t log_size = 0;
        char *log = NULL;
        if (api->hiprtcGetProgramLogSize(prog, &log_size) == 0 && log_size > 0) {
            log = malloc(log_size + 1);
            if (log && api->hiprtcGetProgramLog(prog, log) != 0) log[0] = 0;
            if (log) log[log_size] = 0;
        }
        flex_status st =
            flex_fail(ctx, FLEX_ERR_COMPILE, "hiprtc could not compile %s for %s (%s):\n%s",
                      program_name, arch, api->hiprtcGetErrorString(r), log ? log : "(no log)");
        free(log);
        api->hiprtcDestroyProgram(&prog);
        return st;
    }
    size_t n = 0;
    r = api->hiprtcGetCodeSize(prog, &n);
    char *bin = (r == 0 && n > 0) ? malloc(n) : NULL;
    if (r == 0 && bin) r = api->hiprtcGetCode(prog, bin);
    api->hiprtcDestroyProgram(&prog);
    if (r != 0 || !bin) {
        free(bin);
        return flex_fail(ctx, r != 0 ? FLEX_ERR_COMPILE : FLEX_ERR_OUT_OF_MEMORY,
                         "hiprtc produced no code object for %s (%s)", program_name,
                         r != 0 ? api->hiprtcGetErrorString(r) : "out of memory");
    }
    *code = bin;
    *size = n;
    return FLEX_OK;
}
