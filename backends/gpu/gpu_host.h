/*
 * The host layer the GPU backends share (CUDA, HIP): the loaded-module list
 * in front of the kernel cache and the run-time compiler, device mirrors of
 * host-resident mod buffers, the upload of block masks, the buffer-bounds
 * flag, the proofs that let buffer reads go unchecked, and the parameter
 * block of the forward kernels (flex_common.cuh).
 *
 * A backend owns a flex_gpu_state (the first member of its own state) and
 * a flex_gpu_ops table of its vendor's entry points; this layer calls the
 * vendor only through that table, so what it does is the same on every
 * vendor. Vendor results are ints (0 = success) turned into FLEX_ERR_DEVICE
 * by flex_gpu_check with the vendor's description of the error.
 *
 * Locking: the functions that walk or grow the module and buffer lists run
 * under st->lock with the vendor's device context current (the caller
 * takes both); flex_gpu_release and the block mask's free take what they
 * need themselves.
 */
#ifndef FLEXATTN_GPU_HOST_H
#define FLEXATTN_GPU_HOST_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"
#include "cache.h"
#include "mod/derive.h"
#include "mod/emit.h"

/* A device address, whatever the vendor calls it. */
typedef uint64_t flex_gpu_ptr;

/* The vendor's entry points. Every int-returning slot returns the vendor's
 * result (0: success). `api` is flex_gpu_state.api, the vendor's loaded
 * table. The *_name strings name the call in error messages. */
typedef struct flex_gpu_ops {
    const char *vendor; /* "CUDA", "HIP": the prefix of device errors */
    /* "NAME (code): description" of a result */
    void (*describe)(const void *api, int result, char *buf, size_t cap);
    /* Makes the device's context current for the calling thread (enter)
     * until leave. */
    int (*enter)(const void *api, void *vendor_ctx);
    void (*leave)(const void *api);
    const char *enter_name;
    int (*mem_alloc)(const void *api, flex_gpu_ptr *ptr, size_t bytes);
    int (*mem_free)(const void *api, flex_gpu_ptr ptr);
    int (*copy_to_device)(const void *api, flex_gpu_ptr dst, const void *src, size_t bytes);
    int (*copy_to_host)(const void *api, void *dst, flex_gpu_ptr src, size_t bytes);
    int (*mem_set)(const void *api, flex_gpu_ptr dst, unsigned char value, size_t bytes);
    const char *mem_alloc_name, *copy_to_device_name, *copy_to_host_name, *mem_set_name;
    /* Modules: load a compiled image, find a function in it, unload. */
    int (*module_load)(const void *api, const void *image, size_t size, void **module);
    int (*module_function)(const void *api, void *module, const char *name, void **fn);
    int (*module_unload)(const void *api, void *module);
    const char *module_load_name, *module_function_name;
    /* The run-time compiler: source -> image for arch (malloc'd); on failure
     * FLEX_ERR_COMPILE with the compiler's log in ctx's message. */
    flex_status (*compile)(flex_context *ctx, const void *api, const char *source,
                           const char *program_name, const char *arch, void **image,
                           size_t *size);
} flex_gpu_ops;

/* A loaded module: key names what its source is made of. */
typedef struct flex_gpu_module {
    char *key; /* configuration, mod hashes, arch, compiler version */
    void *module;
    void *fn;
    /* Its other kernels found so far (flex_gpu_module_function), so a call
     * asks the vendor for none of them again. */
    struct {
        char name[48];
        void *fn;
    } more[4];
    int num_more;
    struct flex_gpu_module *next;
} flex_gpu_module;

/* A device copy of a host-resident mod buffer, kept until release. */
typedef struct flex_gpu_buffer_copy {
    const struct flex_mod *mod;
    int index;
    uint64_t generation;
    const void *host;
    flex_gpu_ptr dev;
    struct flex_gpu_buffer_copy *next;
} flex_gpu_buffer_copy;

/* What the shared layer keeps per context. */
typedef struct flex_gpu_state {
    const flex_gpu_ops *ops;
    const void *api;  /* the vendor's loaded table */
    void *vendor_ctx; /* what ops->enter makes current (a CUcontext, a device) */
    flex_cache *cache; /* the vendor's process-wide kernel cache */
    flex_device_type device_type; /* where tensors on this GPU say they are */
    char arch[32];
    /* Two u32 words: bit i of the first = buffer slot i was read out of
     * range; the second is the decode word (flex_gpu_decode_flag). */
    flex_gpu_ptr bounds_flag;
    atomic_int bounds_pending; /* a kernel that reads mod buffers ran since the last read */
    /* A kernel that reads mod buffers was captured into a graph: its
     * replays launch it with no call here, so every synchronize reads the
     * flag from then on. */
    atomic_int bounds_in_graph;
    /* The call in progress is being captured into a graph (set by the
     * backend under lock, for the call): what a capture does not allow
     * (allocations, synchronous copies, module loads) is refused with a
     * named error instead of being issued. */
    int capturing;
    char slot_names[FLEX_EMIT_MAX_SLOTS][80];
    flex_gpu_module *modules;
    flex_gpu_buffer_copy *buffer_copies;
    pthread_mutex_t lock;
} flex_gpu_state;

/* Checks a vendor result; on failure records FLEX_ERR_DEVICE naming what. */
flex_status flex_gpu_check(flex_context *ctx, const flex_gpu_state *st, int result,
                           const char *what);

/* Context in and out around calls (flex_gpu_check on the way in). */
flex_status flex_gpu_enter(flex_context *ctx, const flex_gpu_state *st);
void flex_gpu_leave(const flex_gpu_state *st);

/* Sets up the shared part (lock, lists); with the context current,
 * allocates and clears the bounds flag. */
void flex_gpu_init(flex_gpu_state *st, const flex_gpu_ops *ops, const void *api,
                   void *vendor_ctx, flex_device_type device_type);
flex_status flex_gpu_alloc_bounds_flag(flex_context *ctx, flex_gpu_state *st);
/* Unloads the modules, frees the buffer copies and the bounds flag (with the
 * context current), then destroys the lock. */
void flex_gpu_release(flex_gpu_state *st);

/* Reads and clears the bounds flag; a set bit becomes FLEX_ERR_BUFFER_BOUNDS,
 * naming the buffer or, for the decode word, the decode argument. */
flex_status flex_gpu_take_bounds_flag(flex_context *ctx, flex_gpu_state *st);
/* The decode word of the bounds flag: bit 0 a q_offsets value, bit 1 a
 * kv_lengths value, bit 2 a page_table entry on the device was out of
 * range and was clamped by the decode kernel (flex_decode.cuh). */
flex_gpu_ptr flex_gpu_decode_flag(const flex_gpu_state *st);

/* ---- per-call work space ---- */

/* Work space of one call from the caller's allocator
 * (flex_context_set_allocator), when ctx has one: returns 1 and sets
 * *status (FLEX_ERR_OUT_OF_MEMORY, recorded on ctx, when it gave nothing)
 * and *ptr. Returns 0 when ctx has none: the backend allocates itself. */
int flex_gpu_caller_alloc(flex_context *ctx, size_t bytes, void *stream, void **ptr,
                          flex_status *status);
/* Gives ptr back to the caller's allocator when ctx has one (returns 1);
 * 0: the backend frees it itself. */
int flex_gpu_caller_free(flex_context *ctx, void *ptr, void *stream);

/* ---- kernels: memory list -> cache -> compiler ---- */

/* Builds the source of a kernel from its arguments (malloc'd; NULL: out of
 * memory). */
typedef char *(*flex_gpu_source_builder)(const void *args);

/* Finds or builds the function `fn_name` whose source `build(args)` makes.
 * key names everything that source is made of (configuration, mod hashes,
 * arch, compiler version): a module already loaded under key is returned
 * without building the source again, which takes longer than many a
 * kernel runs (~0.1 ms of text for a forward). Otherwise the source is
 * built, and the kernel caches are asked under key plus the source's
 * checksum, so that a changed template never finds a stale binary. The
 * caller holds st->lock and has the context current. */
flex_status flex_gpu_get_function(flex_context *ctx, flex_gpu_state *st, const char *key,
                                  flex_gpu_source_builder build, const void *args,
                                  const char *fn_name, void **fn);
/* Another kernel of the module loaded under key (flex_gpu_get_function
 * found or built it just before); the vendor is asked once per name. */
flex_status flex_gpu_module_function(flex_context *ctx, flex_gpu_state *st, const char *key,
                                     const char *name, void **fn);

/* ---- mod buffers ---- */

/* Mirrors struct flex_buffer of the emitted mods. */
typedef struct flex_gpu_buffer_desc {
    uint64_t data;
    int32_t sizes[4];
    int64_t strides[4];
} flex_gpu_buffer_desc;

/* Fills descs[slot_base + i] for every buffer of mod (NULL: none), copying
 * host-resident buffers to the device once per binding. */
flex_status flex_gpu_fill_buffers(flex_context *ctx, flex_gpu_state *st,
                                  const struct flex_mod *mod, int slot_base,
                                  flex_gpu_buffer_desc *descs);

/* Appends the flex_buffers block (descs then the flag pointer) to a kernel
 * parameter blob at offset `at` (8-aligned); returns the new size. */
size_t flex_gpu_append_buffers(unsigned char *blob, size_t at, const flex_gpu_buffer_desc *descs,
                               int slots, flex_gpu_ptr flag);

/* ---- block-mask lists on the device ---- */

typedef struct flex_gpu_mask_copy {
    flex_gpu_ptr full_off, full_idx, part_off, part_idx, order;
    /* the q-major (transposed) lists, for the backward */
    flex_gpu_ptr qfull_off, qfull_idx, qpart_off, qpart_idx;
} flex_gpu_mask_copy;

/* Uploads the kv-major lists of mask, its q-major lists (the backward's)
 * and the heaviest-first order of its q-block rows (summed over batch and
 * head), once per mask; the copy is freed with the mask. */
flex_status flex_gpu_mask_device_copy(flex_context *ctx, flex_gpu_state *st,
                                      const struct flex_block_mask *mask,
                                      flex_gpu_mask_copy **out);

/* ---- launch policy the kernels share ---- */

/* The kernel settings FLEXATTN_DEBUG can force for comparison or testing
 * (read when ctx was created, core/debug.h): the key's value when it is a
 * whole decimal number in [lo, hi], otherwise dflt. */
int flex_gpu_env_int(const flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi);
/* A kernel choice forced by "0" or "1" in key, otherwise dflt. */
int flex_gpu_env_switch(const flex_context *ctx, flex_debug_key key, int dflt);

/* Which buffer reads of ir (mod's IR, or a copy of it with more nodes: the
 * backward's derivative) stay inside their buffers for every index the
 * kernel passes: b < B, h < H, and q, kv below the lengths plus `margin`.
 * Buffer values count as any int. A malloc'd flag per node (caller frees),
 * or NULL when none is proved (or without memory: every read is then
 * checked). FLEXATTN_DEBUG=cuda_reads_in_range=0 checks every read, for
 * comparison. */
unsigned char *flex_gpu_ir_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                          const ir_mod *ir, int64_t B, int64_t H, int64_t Lq,
                                          int64_t Lkv, int64_t margin);
/* The same over mod's own IR (mod NULL: NULL). */
unsigned char *flex_gpu_reads_in_range(const flex_context *ctx, const struct flex_mod *mod,
                                       int64_t B, int64_t H, int64_t Lq, int64_t Lkv,
                                       int64_t margin);
/* Checksum of a mod's in-range flags for the kernel key (0: none). */
uint64_t flex_gpu_in_range_checksum(const unsigned char *flags, const ir_mod *ir);
/* Whether any node of m reads buffer `buffer`. */
int flex_gpu_ir_reads_buffer(const ir_mod *m, int buffer);

/* A head dim padded to a multiple of 64; whether p is 16-byte aligned. */
int flex_gpu_pad64(int64_t d);
int flex_gpu_aligned16(const void *p);

/* The decode kernels' split count (flex_decode.cuh): the caller's hint when
 * given (at most one piece per 64-key step of the longest kv length);
 * otherwise enough pieces that `units` CTAs per piece (batch x kv head x
 * row chunks) fill the GPU's SMs about twice, with at least 4 steps (256
 * keys) a piece and at most 256 pieces. Pure. */
int flex_gpu_decode_splits(int sm_count, int64_t units, int64_t longest_kv, int hint);

/* Mirrors struct flex_fwd_params of flex_common.cuh up to `bufs`. */
typedef struct flex_gpu_fwd_params {
    uint64_t q, k, v, out, lse;
    uint64_t full_off, full_idx, part_off, part_idx, row_order;
    int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss, l_sb, l_sh,
        l_ss;
    int32_t B, Hq, Hkv, Lq, Lkv, D, Dv;
    int32_t mask_B, mask_H, mask_nq, mask_nk, mask_qblock, mask_kvblock;
    int32_t dense, tiles_per_row, head_group;
    float scale, scale_log2;
} flex_gpu_fwd_params;

/* Fills the forward kernel's parameter block from a's tensors and scale,
 * the mask's device copy mc (mask and mc NULL: every block is walked,
 * dense) and the launch choices (block sizes, the tile height block_m of
 * the f16/bf16 kernel, the head group of the tile order). Pure: reads its
 * arguments, writes *p only. */
void flex_gpu_fwd_params_fill(flex_gpu_fwd_params *p, const flex_forward_args *a,
                              const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                              int q_block, int kv_block, int block_m, int head_group);

/* ---- backward ---- */

struct flex_cuda_grad_load; /* backends/cuda/cuda_compile.h: the kernels' gradient reads */
struct flex_cuda_bwd_config; /* backends/cuda/cuda_compile.h: a backward kernel's choices */

/* Shared memory (LDS on AMD) of the f16/bf16 backward kernel for cfg: the
 * sum of the FLEX_BWD_S* regions of flex_backward.cuh (K and V of the kv
 * tile, the Q and dO stages, dS with at least 64 query columns, lse and
 * delta of the stages). Pure. */
size_t flex_gpu_bwd_smem(const struct flex_cuda_bwd_config *cfg);

/*
 * The score mod of a backward call, for the kernels (flex_backward.cuh):
 * checks every buffer gradient asked for (the score mod reads the buffer,
 * the tensor is on this GPU, IR_MAX_BUFFERS at most), fills its
 * descriptor in grad_descs[i] (IR_MAX_BUFFERS entries, the rest zeroed),
 * and, for a score mod other than the identity, copies its IR into
 * *derived with the derivative's nodes (mod_derive, *der) and lists in
 * loads (MOD_DERIVE_MAX_LOADS entries) the float reads whose gradients
 * are wanted. *derived_made says whether *derived holds a copy, which the
 * caller frees with ir_free; on failure nothing is left to free. Errors:
 * FLEX_ERR_MOD_NAME, FLEX_ERR_INVALID_ARGUMENT, FLEX_ERR_UNSUPPORTED (more
 * float reads than the backward takes), FLEX_ERR_OUT_OF_MEMORY.
 */
flex_status flex_gpu_bwd_score_prepare(flex_context *ctx, const flex_gpu_state *st,
                                       const flex_backward_args *a, ir_mod *derived,
                                       int *derived_made, mod_derivative *der,
                                       struct flex_cuda_grad_load *loads, int *num_loads,
                                       flex_gpu_buffer_desc *grad_descs);

/* Mirrors the head of struct flex_bwd_params of flex_backward.cuh; the
 * gradient tensors' descriptors, the forward's block (flex_gpu_fwd_params)
 * and the mods' buffers follow it. */
typedef struct flex_gpu_bwd_head {
    uint64_t dout, dq, dk, dv, delta, dq_acc;
    uint64_t qfull_off, qfull_idx, qpart_off, qpart_idx;
    int64_t do_sb, do_sh, do_ss, dq_sb, dq_sh, dq_ss, dk_sb, dk_sh, dk_ss, dv_sb, dv_sh, dv_ss;
} flex_gpu_bwd_head;

/* The most bytes flex_gpu_bwd_blob writes. */
#define FLEX_GPU_BWD_BLOB_BYTES                                                                    \
    (sizeof(flex_gpu_bwd_head) + IR_MAX_BUFFERS * sizeof(flex_gpu_buffer_desc) +                   \
     sizeof(flex_gpu_fwd_params) + (FLEX_EMIT_MAX_SLOTS + 2) * sizeof(flex_gpu_buffer_desc))

/*
 * The backward kernels' parameter block (struct flex_bwd_params) for a's
 * tensors and scale, the mask's device copy mc (mask and mc NULL: dense),
 * the workspace's delta rows and dQ accumulator (0: the main kernel adds
 * no dQ: not wanted, or left to the deterministic dQ kernel), the
 * gradient tensors (grad_slots of them, at least one slot written) and the
 * mods' buffers with the bounds flag. Writes at most FLEX_GPU_BWD_BLOB_BYTES
 * into blob and returns the size. Pure.
 */
size_t flex_gpu_bwd_blob(unsigned char *blob, const flex_backward_args *a,
                         const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                         int q_block, int kv_block, flex_gpu_ptr delta, flex_gpu_ptr dq_acc,
                         const flex_gpu_buffer_desc *grad_descs, int grad_slots,
                         const flex_gpu_buffer_desc *descs, int slots, flex_gpu_ptr flag);

#endif /* FLEXATTN_GPU_HOST_H */
