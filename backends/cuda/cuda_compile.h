/*
 * Building the CUDA source of a kernel (embedded template + configuration +
 * emitted mods) and compiling it with NVRTC (cuda_compile.c).
 */
#ifndef FLEXATTN_CUDA_COMPILE_H
#define FLEXATTN_CUDA_COMPILE_H

#include <stddef.h>

#include "embedded.h"
#include "internal.h"
#include "cuda_loader.h"
#include "mod/derive.h"

/* The templates embedded at build time (tools/embed.c). */
extern const struct flex_embedded_file flex_cuda_template_files[];

/* Text of an embedded template by file name, or NULL. Static. */
const char *flex_cuda_template(const char *name);

/* One forward kernel's compile-time choices. */
typedef struct flex_cuda_fwd_config {
    flex_dtype dtype; /* F32, F16, BF16 */
    int dq, dv;       /* head dims padded to a multiple of 64 */
    int warps, mt, block_n;
    int vec;            /* 16-byte aligned rows: cp.async copies */
    int scale_positive; /* scale > 0: scores stay unscaled until the exponent */
    int wgmma;          /* 1: the sm_90a kernel (flex_forward_sm90.cuh) */
    int short_indices;  /* 1: B, H and lengths within the FLEX_EMIT_SHORT_* bounds */
    int tma;            /* wgmma: a TMA producer warpgroup (0: cp.async by all threads) */
    int mask_bits;      /* masked blocks: keep bits from a rolled loop (flex_keep_bits) */
    int chain;          /* tma: one product pipeline across a CTA's tiles */
    int dv_exact;       /* Dv == dv: the output store needs no column guard */
    int partial_bits;   /* partial blocks read bit masks (flex_partial_bits.cuh), not the mask mod */
    int q_bufs;         /* tma: Q tiles the producer keeps (2: the next tile's arrives during
                           this one; 1 where two do not fit beside the K/V stages) */
    int score_clamp;    /* the score mod at the last row/column past the ends
                           (flex_gpu_score_reads_in_range) */
    int step_cuts;      /* wgmma: the step's cuts (FLEX_STEP_CUTS), off until measured */
    int diag_values;    /* tma: the score mod's diagonal split (core/mod/diagonal.h) and the
                           rows of each consumer warp's table in shared memory (its values, and
                           the bounds bits of unproved reads); 0: no split */
} flex_cuda_fwd_config;

/*
 * The full source of the forward kernel for config and mods (either may be
 * NULL), or of the mask-block evaluator (forward == 0; score and config
 * unused). With cfg->partial_bits the module also holds the kernel that
 * makes the bit masks (flex_partial_bits_kernel). Returns a malloc'd string (caller frees) or NULL when out of
 * memory or when the mods have too many buffers.
 */
char *flex_cuda_forward_source(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                               const ir_mod *score);
/* The same with the buffer reads flagged in mask_in_range / score_in_range
 * (one flag per node; either may be NULL) read unchecked: see
 * flex_emit_mods_in_range for what the flags must be proved over. */
char *flex_cuda_forward_source_in_range(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                                        const ir_mod *score, const unsigned char *mask_in_range,
                                        const unsigned char *score_in_range);
char *flex_cuda_mask_blocks_source(const ir_mod *mask);

/* One decode kernel's compile-time choices (flex_decode.cuh). */
typedef struct flex_cuda_dec_config {
    flex_dtype dtype; /* F32, F16, BF16 */
    int dq, dv;       /* head dims padded to a multiple of 64 */
    int dv_exact;     /* Dv == dv */
    int row_tiles;    /* f16/bf16: 16-row tiles of packed rows per CTA (1, 2, 4) */
    int vec;          /* 16-byte aligned rows: cp.async copies */
    int short_indices;
} flex_cuda_dec_config;

/* The full source of the decode kernel (flex_decode_kernel) and the split-KV
 * combine (flex_splitkv_combine) for config and mods, with buffer reads
 * flagged in the in-range arrays read unchecked (as for the forward). A
 * malloc'd string (caller frees), or NULL when out of memory. */
char *flex_cuda_decode_source(const flex_cuda_dec_config *cfg, const ir_mod *mask,
                              const ir_mod *score, const unsigned char *mask_in_range,
                              const unsigned char *score_in_range);

/* One backward kernel's compile-time choices. */
typedef struct flex_cuda_bwd_config {
    flex_dtype dtype; /* F32, F16, BF16 */
    int dq, dv;       /* head dims padded to a multiple of 64 */
    int warps;        /* f16/bf16: warps of the main kernel, 16 kv rows each */
    int block_m;      /* f16/bf16: query rows per step */
    int vec;          /* 16-byte aligned rows: cp.async copies */
    int short_indices;
    int grad_slots; /* gradient tensors of float buffers (0 or more) */
    int pipeline;   /* f16/bf16: the next step's Q, dO, lse, delta copied during this one */
    int exp2;       /* f16/bf16: P = exp2 with log2(e) folded in (else expf) */
    int dq_red;     /* f16/bf16: dQ added by 16-byte red.global.add.v4.f32 (sm_90; D % 4 == 0) */
    int kv_fastest; /* grid x = kv tiles, y = (batch, kv head) */
    /* With kv_fastest, the (batch, kv head) pairs of the grid order in
     * groups of this many (flex_bwd_tile_of); 0 or 1: each pair's tiles
     * together. A parameter of the launch, not of the kernel's source. */
    int head_group;
    int wgmma;      /* f16/bf16, sm_90a: the wgmma main kernel (flex_backward_sm90.cuh) */
    /* The wgmma kernel's variants: split_wait computes P while dPᵀ is in
     * flight (two product groups); wg_barrier makes the barrier before dQ
     * the warpgroup's own where dQ reads only its dS rows (head dim 64);
     * dq_bulk adds dQ by bulk asynchronous reductions from shared memory
     * (a region per warp, flex_gpu_bwd_smem) instead of from registers. */
    int split_wait, wg_barrier, dq_bulk;
    /* The wgmma kernel's copies of Q, dO, lse and delta: 2 or 3, by TMA from
     * one thread into that many stages (tensor maps as a second parameter,
     * two dS tiles); 0, cp.async by all threads (pipeline's stages).
     * refill_early: with tma, a stage is refilled at the top of the step
     * after the one that used it, not after that step's barrier C. */
    int tma, refill_early;
    /* The deterministic dQ kernel (flex_backward_dq.cuh), whose presence
     * leaves dQ out of the main kernel's atomics: its warps (f16/bf16: 16
     * query rows each; f32: one row each) and kv rows per step (f16/bf16).
     * 0 warps: no such kernel, dQ through atomics. */
    int dq_warps, dq_block_n;
    /* f16/bf16: floats of the main kernel's shared gradient region, the
     * elements of every gradient tensor in row-major order, slot after
     * slot: each CTA sums its buffer gradients there and adds every nonzero
     * element to global memory once at its end (flex_gpu_bwd_grad_floats).
     * 0: each score adds its gradients with global atomics. */
    int grad_smem;
    /* f16/bf16 main kernel: partial blocks read the bit masks of
     * flex_partial_bits.cuh (the module then holds the kernel that makes
     * them), not the mask mod */
    int partial_bits;
} flex_cuda_bwd_config;

/* A float buffer read of the score mod whose gradient is wanted. */
typedef struct flex_cuda_grad_load {
    int grad;     /* index of its gradient tensor (flex_bwd_params.grads) */
    int deriv;    /* node of d(result)/d(value read) */
    int ndim;     /* indices of the read */
    int index[4]; /* their nodes */
} flex_cuda_grad_load;

/* The kernel's description of derivative load l of derived (mod_derive's
 * output) whose gradient is tensor `grad`. Pure. */
flex_cuda_grad_load flex_cuda_grad_load_of(const ir_mod *derived, const mod_derivative_load *l,
                                           int grad);

/* The score mod of a backward kernel: ir holds the forward's nodes and the
 * derivative's (mod_derive); NULL: the identity. */
typedef struct flex_cuda_bwd_score {
    const ir_mod *ir;
    int value, dscore; /* nodes of the result and of d(result)/d(score) */
    const flex_cuda_grad_load *loads;
    int num_loads;
    const unsigned char *in_range; /* one flag per node of ir, or NULL */
} flex_cuda_bwd_score;

/*
 * The full source of the backward kernels (flex_backward.cuh, with
 * flex_wgmma_sm90.cuh and flex_backward_sm90.cuh when cfg->wgmma, and
 * flex_backward_dq.cuh when cfg->dq_warps > 0) for config,
 * the mask mod (NULL: none evaluated) and the score mod with its
 * derivative. A malloc'd string (caller frees), or NULL when out of memory
 * or when the mods have too many buffers.
 */
char *flex_cuda_backward_source(const flex_cuda_bwd_config *cfg, const ir_mod *mask,
                                const unsigned char *mask_in_range,
                                const flex_cuda_bwd_score *score);

/* "sm_90a" for compute capability 9.0, "sm_80", "sm_86", ... */
void flex_cuda_arch_name(int major, int minor, char *buf, size_t cap);

/*
 * Compiles source with NVRTC for arch into a cubin ("sm_90a"), or into PTX
 * for a virtual arch ("compute_90a": front end and optimiser only, no
 * ptxas; used where only the validity of the source matters). On success *cubin is
 * malloc'd (caller frees). On failure returns FLEX_ERR_COMPILE with the
 * NVRTC log in ctx's message (ctx may be NULL: thread message).
 */
flex_status flex_cuda_compile(flex_context *ctx, const flex_cuda_api *api, const char *source,
                              const char *program_name, const char *arch, void **cubin,
                              size_t *size);

#endif /* FLEXATTN_CUDA_COMPILE_H */
