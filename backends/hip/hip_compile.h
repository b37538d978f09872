/*
 * The HIP side of the kernel tree: the source of a HIP kernel (the CUDA
 * templates of backends/cuda with FLEX_HIP defined, AMD primitives in
 * place of the PTX ones), the AMD architectures the kernels are written
 * for, and compilation with hiprtc (hip_compile.c).
 */
#ifndef FLEXATTN_HIP_COMPILE_H
#define FLEXATTN_HIP_COMPILE_H

#include <stddef.h>

#include "internal.h"
#include "../cuda/cuda_compile.h"
#include "hip_loader.h"

/* The HIP templates embedded at build time (tools/embed.c). */
extern const struct flex_embedded_file flex_hip_template_files[];

/*
 * The HIP source of the forward kernel for cfg and the mods: the same
 * mainloop and emitted mods as CUDA's (flex_cuda_forward_source_in_range),
 * prefixed with FLEX_HIP and the device-runtime names a compile without
 * HIP's headers needs (flex_hip_runtime.cuh), with flex_mma_hip.cuh (and
 * the flex_amd_lanes.h it includes, spliced in) before flex_mma_sm80.cuh.
 * cfg must not ask for the sm_90a kernel (wgmma, tma). A malloc'd string,
 * or NULL (out of memory, too many buffers, or wgmma).
 */
char *flex_hip_forward_source(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                              const ir_mod *score, const unsigned char *mask_in_range,
                              const unsigned char *score_in_range);
/*
 * The HIP source of the backward kernels (flex_bwd_preprocess,
 * flex_bwd_kernel, flex_bwd_dq_store) for cfg, the mask mod and the score
 * mod with its derivative: CUDA's (flex_cuda_backward_source) made for AMD
 * as the forward is, followed by a compile-time check that the MFMA
 * products get both warps of a wave in the dQ loop. cfg must not ask for
 * the deterministic dQ kernel (dq_warps). A malloc'd string, or NULL (out
 * of memory, too many buffers, or dq_warps).
 */
char *flex_hip_backward_source(const flex_cuda_bwd_config *cfg, const ir_mod *mask,
                               const unsigned char *mask_in_range,
                               const flex_cuda_bwd_score *score);
/* The mask-block evaluator's HIP source (malloc'd; NULL: out of memory). */
char *flex_hip_mask_blocks_source(const ir_mod *mask);

/* What the kernels know of an AMD architecture. */
typedef struct flex_hip_arch {
    char name[32]; /* "gfx90a": the processor, without target features */
    int wave_size; /* 64 on CDNA, 32 on RDNA */
    int lds_bytes; /* LDS one workgroup may use */
    const char *family; /* "CDNA2 (MI200)", ... */
} flex_hip_arch;

/*
 * Whether the kernels support the device whose gcnArchName is gcn_arch
 * ("gfx90a:sramecc+:xnack-"): 1 and *out filled for gfx90a (CDNA2), gfx940,
 * gfx941, gfx942 (CDNA3), gfx1100, gfx1101, gfx1102 (RDNA3); 0 otherwise,
 * with the reason, naming the architecture, in why. A pure function.
 */
int flex_hip_arch_supported(const char *gcn_arch, flex_hip_arch *out, char *why, size_t why_cap);

/*
 * Compiles source with hiprtc for arch ("gfx90a") into a code object. On
 * success *code is malloc'd (caller frees). On failure FLEX_ERR_COMPILE with
 * hiprtc's log in ctx's message (ctx may be NULL: thread message).
 */
flex_status flex_hip_compile(flex_context *ctx, const flex_hip_api *api, const char *source,
                             const char *program_name, const char *arch, void **code,
                             size_t *size);

#endif /* FLEXATTN_HIP_COMPILE_H */
