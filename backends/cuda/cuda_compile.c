/*
 * Kernel source assembly and NVRTC compilation. The source is
 * vendor.cuh + flex_gpu_params.h (the parameter heads the host fills) + a
 * block of #defines for the configuration + the emitted mods + the kernel
 * template, all text, so nothing is looked up in a toolkit's include
 * folders at run time.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_compile.h"
#include "mod/emit.h"

const char *flex_cuda_template(const char *name) {
    return flex_embedded_text(flex_cuda_template_files, name);
}

/* vendor.cuh and flex_gpu_params.h, the start of every kernel's source
 * (the HIP backend wraps these sources too). */
static int prelude(const char **vendor, const char **params) {
    *vendor = flex_cuda_template("vendor.cuh");
    *params = flex_cuda_template("flex_gpu_params.h");
    return *vendor && *params;
}

static char *concat(const char *const *parts, int n) {
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += strlen(parts[i]) + 1;
    char *s = malloc(len + 1);
    if (!s) return NULL;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(parts[i]);
        memcpy(s + at, parts[i], l);
        at += l;
        s[at++] = '\n';
    }
    s[at] = 0;
    return s;
}

/* The configuration macro naming a kernel's element type. */
static const char *elem_macro(flex_dtype dtype) {
    return dtype == FLEX_BF16  ? "FLEX_ELEM_BF16"
           : dtype == FLEX_F16 ? "FLEX_ELEM_F16"
                               : "FLEX_ELEM_F32";
}

flex_cuda_grad_load flex_cuda_grad_load_of(const ir_mod *derived, const mod_derivative_load *l,
                                           int grad) {
    const ir_node *ld = &derived->nodes[l->load];
    flex_cuda_grad_load gl = {grad, l->node, ld->nargs, {0, 0, 0, 0}};
    for (int d = 0; d < ld->nargs && d < 4; d++)
        gl.index[d] = ld->args[d];
    return gl;
}

char *flex_cuda_forward_source(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                               const ir_mod *score) {
    return flex_cuda_forward_source_in_range(cfg, mask, score, NULL, NULL);
}

char *flex_cuda_forward_source_in_range(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                                        const ir_mod *score, const unsigned char *mask_in_range,
                                        const unsigned char *score_in_range) {
    const char *vendor, *params;
    const char *common = flex_cuda_template("flex_common.cuh");
    const char *mma = flex_cuda_template("flex_mma_sm80.cuh");
    const char *tpl = flex_cuda_template("flex_forward.cuh");
    const char *wgmma = flex_cuda_template("flex_wgmma_sm90.cuh");
    const char *tma = flex_cuda_template("flex_tma_sm90.cuh");
    const char *sm90 = flex_cuda_template("flex_forward_sm90.cuh");
    const char *bits = flex_cuda_template("flex_partial_bits.cuh");
    if (!prelude(&vendor, &params) || !common || !mma || !tpl || !wgmma || !tma || !sm90 || !bits)
        return NULL;
    char config[512];
    const char *elem = elem_macro(cfg->dtype);
    snprintf(config, sizeof config,
             "/* configuration */\n#define %s 1\n#define FLEX_DQ %d\n#define FLEX_DV %d\n"
             "#define FLEX_WARPS %d\n#define FLEX_MT %d\n#define FLEX_BLOCK_N %d\n"
             "#define FLEX_VEC %d\n#define FLEX_SCALE_POSITIVE %d\n#define FLEX_WGMMA %d\n"
             "#define FLEX_SHORT_INDICES %d\n#define FLEX_TMA %d\n#define FLEX_MASK_BITS %d\n"
             "#define FLEX_TMA_CHAIN %d\n#define FLEX_DV_EXACT %d\n#define FLEX_PARTIAL_BITS %d\n"
             "#define FLEX_Q_BUFS %d\n#define FLEX_SCORE_CLAMP %d\n#define FLEX_STEP_CUTS %d\n",
             elem, cfg->dq, cfg->dv, cfg->warps, cfg->mt, cfg->block_n, cfg->vec,
             cfg->scale_positive, cfg->wgmma, cfg->short_indices, cfg->tma, cfg->mask_bits,
             cfg->chain, cfg->dv_exact, cfg->partial_bits, cfg->q_bufs, cfg->score_clamp,
             cfg->step_cuts);
    /* The diagonal tables are the TMA kernel's; the emitter refuses a split
     * of other rows than the host sized them for. */
    if (cfg->diag_values > 0 && !cfg->tma) return NULL;
    char *mods =
        flex_emit_mods_diagonal(mask, score, mask_in_range, score_in_range, cfg->diag_values);
    if (!mods) return NULL;
    /* The sm_90a kernel is a sibling of the mma.sync one and reuses its
     * helpers, so it follows it, after the wgmma and TMA primitives;
     * without FLEX_WGMMA none of them is there. The bit masks' kernel and
     * readers come before the forward, which calls them. */
    const char *parts[] = {vendor, params, config, mods, common, mma,
                           cfg->partial_bits ? bits : "", tpl, wgmma, tma, sm90};
    char *s = concat(parts, cfg->wgmma ? 11 : 8);
    free(mods);
    return s;
}

char *flex_cuda_decode_source(const flex_cuda_dec_config *cfg, const ir_mod *mask,
                              const ir_mod *score, const unsigned char *mask_in_range,
                              const unsigned char *score_in_range) {
    const char *vendor, *params;
    const char *merge = flex_cuda_template("lse_merge.h");
    const char *common = flex_cuda_template("flex_common.cuh");
    const char *mma = flex_cuda_template("flex_mma_sm80.cuh");
    const char *tpl = flex_cuda_template("flex_decode.cuh");
    const char *combine = flex_cuda_template("flex_splitkv_combine.cuh");
    if (!prelude(&vendor, &params) || !merge || !common || !mma || !tpl || !combine) return NULL;
    char config[512];
    const char *elem = elem_macro(cfg->dtype);
    snprintf(config, sizeof config,
             "/* configuration */\n#define %s 1\n#define FLEX_DQ %d\n#define FLEX_DV %d\n"
             "#define FLEX_DV_EXACT %d\n#define FLEX_WARPS 4\n#define FLEX_DEC_RT %d\n"
             "#define FLEX_VEC %d\n#define FLEX_SHORT_INDICES %d\n",
             elem, cfg->dq, cfg->dv, cfg->dv_exact, cfg->row_tiles, cfg->vec, cfg->short_indices);
    char *mods = flex_emit_mods_in_range(mask, score, mask_in_range, score_in_range);
    if (!mods) return NULL;
    const char *parts[] = {vendor, params, config, mods, merge, common, mma, tpl, combine};
    char *s = concat(parts, 9);
    free(mods);
    return s;
}

static const char *node_ctype(const ir_mod *m, int node) {
    const int t = m->nodes[node].type;
    return t == IR_FLOAT ? "float" : t == IR_BOOL ? "bool" : "int";
}

/* Appends printf-style text to a malloc'd string; on failure frees it and
 * leaves NULL. */
static void append(char **s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void append(char **s, const char *fmt, ...) {
    if (!*s) return;
    va_list ap, copy;
    va_start(ap, fmt);
    va_copy(copy, ap);
    const int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    const size_t len = strlen(*s);
    char *r = n < 0 ? NULL : realloc(*s, len + (size_t)n + 1);
    if (!r) {
        free(*s);
        *s = NULL;
    } else {
        vsnprintf(r + len, (size_t)n + 1, fmt, ap);
        *s = r;
    }
    va_end(ap);
}

/* The glue between the emitted derivative and flex_backward.cuh:
 * flex_score_bwd (the modified score, d/dscore and the buffer terms of one
 * score) and flex_scatter_grads (the terms times ds' added to the gradient
 * tensors, at the read's indices clamped as the read clamps them). With
 * grad_smem the terms' offsets are the elements' row-major indices and
 * the additions go to the CTA's shared copy (flex_bwd_grad_smem_add,
 * flex_backward.cuh), which adds them to the tensors at their strided
 * offsets at its end; otherwise the offsets are strided and the additions
 * global atomics. */
static char *score_glue(const flex_cuda_bwd_score *sc, int slot_base, int grad_smem) {
    char *g = calloc(1, 1);
    const int n = sc->ir ? sc->num_loads : 0;
    append(&g, "#define FLEX_NUM_GRAD_LOADS %d\n", n);
    /* a row-major index into the shared copy fits an int (at most
     * FLEX_GPU_BWD_GRAD_SMEM_MAX), and an int is one register a term */
    append(&g, "struct flex_grad_terms { float d[%d]; %s off[%d]; };\n", n ? n : 1,
           grad_smem ? "int" : "long long", n ? n : 1);
    if (!sc->ir) {
        append(&g, "static FLEX_DEVICE_INLINE float flex_score_bwd(float score, int b, int h, int q, "
                   "int kv, const flex_buffers &bufs, unsigned &oob, float &dscore, "
                   "flex_grad_terms &terms, const flex_buffer *grads) {\n"
                   "    (void)b; (void)h; (void)q; (void)kv; (void)bufs; (void)oob; (void)terms; "
                   "(void)grads;\n    dscore = 1.0f;\n    return score;\n}\n");
        return g;
    }
    int outputs[2 + 5 * 64];
    int no = 0;
    outputs[no++] = sc->value;
    outputs[no++] = sc->dscore;
    for (int l = 0; l < n && l < 64; l++) {
        outputs[no++] = sc->loads[l].deriv;
        for (int d = 0; d < sc->loads[l].ndim; d++)
            outputs[no++] = sc->loads[l].index[d];
    }
    char *fn = flex_emit_ir_function(sc->ir, "flex_score_grad_ir", outputs, no, slot_base,
                                     sc->in_range);
    if (!fn) {
        free(g);
        return NULL;
    }
    append(&g, "%s", fn);
    free(fn);
    if (grad_smem)
        append(&g, "static FLEX_DEVICE_INLINE int flex_grad_offset(const flex_buffer &g, int ndim, "
                   "int i0, int i1, int i2, int i3) {\n"
                   "    const int idx[4] = {i0, i1, i2, i3};\n    int off = 0;\n"
                   "#pragma unroll\n    for (int d = 0; d < 4; d++)\n"
                   "        if (d < ndim) off = off * g.sizes[d] + min(max(idx[d], 0), "
                   "g.sizes[d] - 1);\n    return off;\n}\n"
                   "static FLEX_DEVICE_INLINE void flex_bwd_grad_smem_add(const flex_buffer "
                   "*grads, int slot, int index, float x);\n");
    else
        append(&g, "static FLEX_DEVICE_INLINE long long flex_grad_offset(const flex_buffer &g, int "
                   "ndim, int i0, int i1, int i2, int i3) {\n"
                   "    const int idx[4] = {i0, i1, i2, i3};\n    long long off = 0;\n"
                   "#pragma unroll\n    for (int d = 0; d < 4; d++)\n"
                   "        if (d < ndim) off += (long long)min(max(idx[d], 0), g.sizes[d] - 1) * "
                   "g.strides[d];\n    return off;\n}\n");
    append(&g, "static FLEX_DEVICE_INLINE float flex_score_bwd(float score, int b, int h, int q, "
               "int kv, const flex_buffers &bufs, unsigned &oob, float &dscore, flex_grad_terms "
               "&terms, const flex_buffer *grads) {\n    (void)terms; (void)grads;\n");
    int k = 0;
    append(&g, "    %s o%d;\n", node_ctype(sc->ir, outputs[k]), k);
    k++;
    append(&g, "    %s o%d;\n", node_ctype(sc->ir, outputs[k]), k);
    k++;
    for (int i = k; i < no; i++)
        append(&g, "    %s o%d;\n", node_ctype(sc->ir, outputs[i]), i);
    append(&g, "    flex_score_grad_ir(score, b, h, q, kv, bufs, oob");
    for (int i = 0; i < no; i++)
        append(&g, ", o%d", i);
    append(&g, ");\n    dscore = (float)o1;\n");
    int at = 2;
    for (int l = 0; l < n; l++) {
        const flex_cuda_grad_load *gl = &sc->loads[l];
        append(&g, "    terms.d[%d] = (float)o%d;\n", l, at);
        append(&g, "    terms.off[%d] = flex_grad_offset(grads[%d], %d", l, gl->grad, gl->ndim);
        for (int d = 0; d < 4; d++)
            if (d < gl->ndim)
                append(&g, ", o%d", at + 1 + d);
            else
                append(&g, ", 0");
        append(&g, ");\n");
        at += 1 + gl->ndim;
    }
    append(&g, "    return (float)o0;\n}\n");
    append(&g, "static FLEX_DEVICE_INLINE void flex_scatter_grads(const flex_buffer *grads, const "
               "flex_grad_terms &terms, float dsp) {\n    (void)grads; (void)terms; (void)dsp;\n");
    for (int l = 0; l < n; l++)
        if (grad_smem)
            append(&g, "    flex_bwd_grad_smem_add(grads, %d, terms.off[%d], __fmul_rn(dsp, "
                       "terms.d[%d]));\n",
                   sc->loads[l].grad, l, l);
        else
            append(&g, "    atomicAdd((float *)grads[%d].data + terms.off[%d], __fmul_rn(dsp, "
                       "terms.d[%d]));\n",
                   sc->loads[l].grad, l, l);
    append(&g, "}\n");
    return g;
}

char *flex_cuda_backward_source(const flex_cuda_bwd_config *cfg, const ir_mod *mask,
                                const unsigned char *mask_in_range,
                                const flex_cuda_bwd_score *score) {
    const char *vendor, *params;
    const char *common = flex_cuda_template("flex_common.cuh");
    const char *mma = flex_cuda_template("flex_mma_sm80.cuh");
    const char *tpl = flex_cuda_template("flex_backward.cuh");
    const char *dq_tpl = flex_cuda_template("flex_backward_dq.cuh");
    const char *wgmma = flex_cuda_template("flex_wgmma_sm90.cuh");
    const char *tma = flex_cuda_template("flex_tma_sm90.cuh");
    const char *sm90 = flex_cuda_template("flex_backward_sm90.cuh");
    const char *bits = flex_cuda_template("flex_partial_bits.cuh");
    if (!prelude(&vendor, &params) || !common || !mma || !tpl || !dq_tpl || !wgmma || !tma ||
        !sm90 || !bits)
        return NULL;
    if (score->ir && score->num_loads > 64) return NULL;
    /* bit masks only for the 16-bit kernels, which read them */
    const int partial_bits = cfg->dtype != FLEX_F32 && mask ? cfg->partial_bits : 0;
    /* the shared gradient region only for the 16-bit kernels, and only
     * where there is a gradient to sum in it */
    const int grad_smem = cfg->dtype != FLEX_F32 && score->ir && score->num_loads > 0
                              ? cfg->grad_smem
                              : 0;
    char config[768];
    const char *elem = elem_macro(cfg->dtype);
    snprintf(config, sizeof config,
             "/* configuration */\n#define %s 1\n#define FLEX_DQ %d\n#define FLEX_DV %d\n"
             "#define FLEX_WARPS %d\n#define FLEX_BWD_BLOCK_M %d\n#define FLEX_VEC %d\n"
             "#define FLEX_SHORT_INDICES %d\n#define FLEX_GRAD_SLOTS %d\n"
             "#define FLEX_BWD_PIPE %d\n#define FLEX_BWD_EXP2 %d\n#define FLEX_BWD_DQ_RED %d\n"
             "#define FLEX_BWD_KV_FASTEST %d\n#define FLEX_BWD_WGMMA %d\n"
             "#define FLEX_BWD_SPLIT_WAIT %d\n#define FLEX_BWD_WG_BARRIER %d\n"
             "#define FLEX_BWD_GRAD_SMEM %d\n#define FLEX_BWD_DQ_BULK %d\n"
             "#define FLEX_BWD_TMA %d\n#define FLEX_BWD_REFILL_EARLY %d\n"
             "#define FLEX_BWD_BITS %d\n",
             elem, cfg->dq, cfg->dv, cfg->warps, cfg->block_m, cfg->vec, cfg->short_indices,
             cfg->grad_slots > 0 ? cfg->grad_slots : 1, cfg->pipeline, cfg->exp2, cfg->dq_red,
             cfg->kv_fastest, cfg->wgmma, cfg->split_wait, cfg->wg_barrier, grad_smem,
             cfg->dq_bulk, cfg->tma, cfg->refill_early, partial_bits);
    char *mods = flex_emit_mods_in_range(mask, score->ir, mask_in_range, score->in_range);
    if (!mods) return NULL;
    char *glue = score_glue(score, mask ? mask->num_buffers : 0, grad_smem);
    if (!glue) {
        free(mods);
        return NULL;
    }
    /* The deterministic dQ kernel, with its own configuration, only where
     * it is launched: the default module stays as it was. */
    char dq_config[128] = "";
    if (cfg->dq_warps > 0)
        snprintf(dq_config, sizeof dq_config,
                 "#define FLEX_BWD_DQ_WARPS %d\n#define FLEX_BWD_DQ_BLOCK_N %d\n", cfg->dq_warps,
                 cfg->dq_block_n);
    /* The sm_90a main kernel replaces the mma.sync one and reuses the rest
     * of flex_backward.cuh, so it follows it, after the wgmma and TMA
     * primitives. The bit masks' kernel comes before the backward, which
     * reads its bits. */
    const char *parts[16];
    int n = 0;
    const char *head[] = {vendor, params, config, mods, glue, common, mma,
                          partial_bits ? bits : "", tpl};
    for (size_t i = 0; i < sizeof head / sizeof head[0]; i++)
        parts[n++] = head[i];
    if (cfg->wgmma) {
        parts[n++] = wgmma;
        parts[n++] = tma;
        parts[n++] = sm90;
    }
    if (cfg->dq_warps > 0) {
        parts[n++] = dq_config;
        parts[n++] = dq_tpl;
    }
    char *s = concat(parts, n);
    free(mods);
    free(glue);
    return s;
}

char *flex_cuda_mask_blocks_source(const ir_mod *mask) {
    const char *vendor, *params;
    const char *tpl = flex_cuda_template("flex_mask_blocks.cuh");
    if (!prelude(&vendor, &params) || !tpl) return NULL;
    char *mods = flex_emit_mods(mask, NULL);
    if (!mods) return NULL;
    const char *parts[] = {vendor, params, mods, tpl};
    char *s = concat(parts, 4);
    free(mods);
    return s;
}

void flex_cuda_arch_name(int major, int minor, char *buf, size_t cap) {
    /* sm_90a enables the Hopper-only instructions; the "a" targets exist for
     * 9.0 and 10.x/12.x, but only 9.0 is used by our templates today. */
    snprintf(buf, cap, "sm_%d%d%s", major, minor, (major == 9 && minor == 0) ? "a" : "");
}

flex_status flex_cuda_compile(flex_context *ctx, const flex_cuda_api *api, const char *source,
                              const char *program_name, const char *arch, void **cubin,
                              size_t *size) {
    *cubin = NULL;
    *size = 0;
    nvrtcProgram prog = NULL;
    nvrtcResult r = api->nvrtcCreateProgram(&prog, source, program_name, 0, NULL, NULL);
    if (r != 0)
        return flex_fail(ctx, FLEX_ERR_COMPILE, "nvrtcCreateProgram failed for %s: %s",
                         program_name, api->nvrtcGetErrorString(r));
    char arch_opt[64];
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", arch);
    const char *opts[] = {arch_opt, "--std=c++17"};
    r = api->nvrtcCompileProgram(prog, 2, opts);
    if (r != 0) {
        size_t log_size = 0;
        char *log = NULL;
        if (api->nvrtcGetProgramLogSize(prog, &log_size) == 0 && log_size > 0) {
            log = malloc(log_size + 1);
            if (log && api->nvrtcGetProgramLog(prog, log) != 0) log[0] = 0;
            if (log) log[log_size] = 0;
        }
        flex_status st =
            flex_fail(ctx, FLEX_ERR_COMPILE, "NVRTC could not compile %s for %s (%s):\n%s",
                      program_name, arch, api->nvrtcGetErrorString(r), log ? log : "(no log)");
        free(log);
        api->nvrtcDestroyProgram(&prog);
        return st;
    }
    /* A virtual arch ("compute_90a") yields PTX; a real one ("sm_90a") a cubin. */
    const int want_ptx = strncmp(arch, "compute_", 8) == 0;
    size_t n = 0;
    r = want_ptx ? api->nvrtcGetPTXSize(prog, &n) : api->nvrtcGetCUBINSize(prog, &n);
    char *bin = (r == 0 && n > 0) ? malloc(n) : NULL;
    if (r == 0 && bin) r = want_ptx ? api->nvrtcGetPTX(prog, bin) : api->nvrtcGetCUBIN(prog, bin);
    if (r != 0 || !bin) {
        free(bin);
        api->nvrtcDestroyProgram(&prog);
        return flex_fail(ctx, r != 0 ? FLEX_ERR_COMPILE : FLEX_ERR_OUT_OF_MEMORY,
                         "NVRTC produced no binary for %s (%s)", program_name,
                         r != 0 ? api->nvrtcGetErrorString(r) : "out of memory");
    }
    api->nvrtcDestroyProgram(&prog);
    *cubin = bin;
    *size = n;
    return FLEX_OK;
}
