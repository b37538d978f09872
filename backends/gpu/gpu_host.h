/*
 * The host layer the GPU backends share (CUDA, HIP): the loaded-module list
 * in front of the kernel cache and the run-time compiler, device mirrors of
 * host-resident mod buffers, the upload of block masks, the buffer-bounds
 * flag, the proofs that let buffer reads go unchecked, the backend table's
 * memory, synchronize and mask-block slots, and the launch policy both
 * vendors follow: kernel keys, the forward's checks, configuration and
 * parameter block, the backward's configuration, tiles, score mod,
 * parameter block and launches. The parameter blocks' structs are the
 * kernels' own (flex_gpu_params.h, which both compile). What differs per
 * vendor comes in as a parameter or through the ops table.
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
#include "../cuda/cuda_compile.h" /* the kernels' configurations, which both vendors build */
#include "flex_gpu_params.h"        /* flex_gpu_ptr and the kernels' parameter blocks */

struct flex_gpu_state;

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
    /* Waits for the device's work (the context current). */
    int (*synchronize)(const void *api);
    const char *synchronize_name;
    int out_of_memory; /* the result mem_alloc gives when the device is full */
    /* Launches fn with blob (size bytes) as its parameter block on stream,
     * and `second` (NULL: none) as its second parameter, whose size and
     * alignment the kernel's signature gives (CUDA's tensor maps; a vendor
     * without kernels that take one is never passed one); the vendor turns
     * its failure into ctx's error (the launch is where the vendors' calls
     * and what they can say about a failure differ). */
    flex_status (*launch)(flex_context *ctx, struct flex_gpu_state *st, void *fn, unsigned gx,
                          unsigned gy, unsigned threads, unsigned smem, void *stream, void *blob,
                          size_t size, void *second);
    /* The mask-block evaluator's source (flex_mask_blocks.cuh) for a mask
     * mod (malloc'd; NULL: out of memory). */
    char *(*mask_blocks_source)(const ir_mod *mask);
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
    char compiler[32]; /* "nvrtc12.4", "hiprtc6.2": the kernel keys name it */
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

/* The backend table's memory slots and synchronize (core/backend.h), the
 * same for every vendor: the state is the flex_gpu_state at the start of
 * ctx->backend_state, and each makes the context current for the call.
 * mem_alloc turns the vendor's out-of-memory result into
 * FLEX_ERR_OUT_OF_MEMORY; mem_free ignores failures (it has no way to
 * report them). synchronize reads the bounds flag when a kernel that reads
 * mod buffers ran since the last one (or went into a graph). */
flex_status flex_gpu_mem_alloc(flex_context *ctx, size_t bytes, void **ptr);
void flex_gpu_mem_free(flex_context *ctx, void *ptr);
flex_status flex_gpu_upload(flex_context *ctx, void *dst, const void *src, size_t bytes);
flex_status flex_gpu_download(flex_context *ctx, void *dst, const void *src, size_t bytes);
flex_status flex_gpu_memset(flex_context *ctx, void *dst, int value, size_t bytes);
flex_status flex_gpu_synchronize(flex_context *ctx);
/* The backend table's slots (core/backend.h) that every GPU backend fills
 * with the shared layer's functions. */
#define FLEX_GPU_BACKEND_SLOTS                                                                     \
    .mem_alloc = flex_gpu_mem_alloc, .mem_free = flex_gpu_mem_free, .upload = flex_gpu_upload,     \
    .download = flex_gpu_download, .mem_set = flex_gpu_memset,                                     \
    .mask_blocks = flex_gpu_mask_blocks, .synchronize = flex_gpu_synchronize

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

/* A mod buffer's descriptor as the kernels read it: struct flex_buffer of
 * flex_gpu_params.h. */
typedef flex_buffer flex_gpu_buffer_desc;

/* Fills descs[slot_base + i] for every buffer of mod (NULL: none), copying
 * host-resident buffers to the device once per binding. */
flex_status flex_gpu_fill_buffers(flex_context *ctx, flex_gpu_state *st,
                                  const struct flex_mod *mod, int slot_base,
                                  flex_gpu_buffer_desc *descs);

/* Appends the mods' buffers (struct flex_buffers of the emitted mods:
 * descs[0 .. max(slots, 1)), then the flag pointer, laid out as
 * FLEX_GPU_BUFFERS_FLAG_AT and FLEX_GPU_BUFFERS_BYTES say) to a kernel
 * parameter blob at offset `at`, the end of a parameter head; returns the
 * new size. */
size_t flex_gpu_append_buffers(unsigned char *blob, size_t at, const flex_gpu_buffer_desc *descs,
                               int slots, flex_gpu_ptr flag);

/* ---- block-mask lists on the device ---- */

typedef struct flex_gpu_mask_copy {
    flex_gpu_ptr full_off, full_idx, part_off, part_idx, order;
    /* the q-major (transposed) lists, for the backward */
    flex_gpu_ptr qfull_off, qfull_idx, qpart_off, qpart_idx;
    /* the partial blocks' bit masks, made at a forward's first use
     * (gpu_partial_bits.h); NULL: none yet */
    struct flex_gpu_partial_bits *partial_bits;
} flex_gpu_mask_copy;

/* Uploads the kv-major lists of mask, its q-major lists (the backward's)
 * and the heaviest-first order of its q-block rows (summed over batch and
 * head), once per mask; the copy is freed with the mask. */
flex_status flex_gpu_mask_device_copy(flex_context *ctx, flex_gpu_state *st,
                                      const struct flex_block_mask *mask,
                                      flex_gpu_mask_copy **out);

/* What a launch reads of a call's mods: the mask's lists (mask NULL: none;
 * *mc is left NULL) and descs (FLEX_EMIT_MAX_SLOTS entries) with the mask
 * mod's buffers from slot 0 and the score mod's after them (either mod may
 * be NULL). Under st->lock with the context current. */
flex_status flex_gpu_bind_mods(flex_context *ctx, flex_gpu_state *st,
                               const struct flex_block_mask *mask,
                               const struct flex_mod *mask_mod, const struct flex_mod *score_mod,
                               flex_gpu_mask_copy **mc, flex_gpu_buffer_desc *descs);

/* The backend table's mask_blocks slot: the exact class of each of count
 * blocks that interval analysis left undecided, by the mask-block kernel
 * (ops->mask_blocks_source). Takes the lock and the context itself. */
flex_status flex_gpu_mask_blocks(flex_context *ctx, const struct flex_mod *mask_mod,
                                 int64_t q_len, int64_t kv_len, int q_block, int kv_block,
                                 const flex_block_ref *blocks, int64_t count, uint8_t *classes);

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
/* The forward's score-mod reads proved in range: the 16-bit kernels
 * evaluate the score mod up to a tile past the ends (and discard those
 * scores), so reads are proved over a margin of 256 where that proves
 * them all; otherwise over the sequences alone, where that proves more,
 * with *clamp set: the kernel then evaluates the mod at the last row and
 * column for positions past the ends (FLEX_SCORE_CLAMP). A buffer indexed
 * by q or kv and sized to the sequence (document ids, a [B][Lq][Lkv]
 * table) is proved only that way. Flags as flex_gpu_reads_in_range's. */
unsigned char *flex_gpu_score_reads_in_range(const flex_context *ctx,
                                             const struct flex_mod *mod, int64_t B, int64_t H,
                                             int64_t Lq, int64_t Lkv, int *clamp);
/* Checksum of a mod's in-range flags for the kernel key (0: none). */
uint64_t flex_gpu_in_range_checksum(const unsigned char *flags, const ir_mod *ir);
/* Whether any node of m reads buffer `buffer`. */
int flex_gpu_ir_reads_buffer(const ir_mod *m, int buffer);

/* A head dim padded to a multiple of 64; whether p is 16-byte aligned. */
int flex_gpu_pad64(int64_t d);
int flex_gpu_aligned16(const void *p);

/* The checks every forward makes first: head dims up to 256 and the last
 * dimension of q, k, v and out contiguous (FLEX_ERR_UNSUPPORTED,
 * FLEX_ERR_SHAPE, naming the vendor's backend). */
flex_status flex_gpu_fwd_check(flex_context *ctx, const flex_gpu_state *st,
                               const flex_forward_args *a);
/* What a GPU backward refuses before anything else (FLEX_ERR_UNSUPPORTED,
 * naming the vendor's backward): head dims above 256; launch limits (grid
 * y of the preprocess and dQ store, (L + 3) / 4 rows of 4, within 65535,
 * batch x heads within an int); and in deterministic mode buffer
 * gradients, which are summed with atomics in a scheduling-dependent
 * order (docs/decisions.md, "CUDA backward"). */
flex_status flex_gpu_bwd_check(flex_context *ctx, const flex_gpu_state *st,
                               const flex_backward_args *a);

/* The mask mod a call's kernels evaluate: the block mask's, or NULL where
 * it has no partial blocks (so such calls share the kernels of the dense
 * case) or there is no mask. A mask with partial blocks and no mod is
 * FLEX_ERR_INVALID_ARGUMENT. */
flex_status flex_gpu_mask_mod(flex_context *ctx, const struct flex_block_mask *mask,
                              const struct flex_mod **mask_mod);
/* The buffer slots the two mods take together (flex_emit_num_slots); more
 * than FLEX_EMIT_MAX_SLOTS is FLEX_ERR_UNSUPPORTED. */
flex_status flex_gpu_mod_slots(flex_context *ctx, const ir_mod *mask, const ir_mod *score,
                               int *slots);
/* Whether the kernels may copy rows of the n tensors t with 16-byte
 * cp.async: head dims multiples of 8 elements (16-bit), data 16-byte
 * aligned, and the batch, head and sequence strides multiples of 8. */
int flex_gpu_rows_vec(int64_t D, int64_t Dv, const flex_tensor *const *t, int n);
/* The head group of the forward's tile order (flex_tile_of): 2, pairs of
 * (batch, head), which keep the K and V of the tiles in flight in L2; or
 * FLEX_GPU_SHARED_READ_GROUP where the score mod reads, per score, a bound
 * buffer of at least FLEX_GPU_SHARED_READ_BYTES that no head index enters
 * (a bias gathered by (b, q, kv)): the tiles in flight then read the same
 * rows of it for that many heads, from L2, where pairs of heads read it
 * from memory once for every two heads. Not on the persistent grid, whose
 * static snake evens out mask rows for pairs (docs/cuda-backend.md, "Tile
 * order"). Pure. */
#define FLEX_GPU_SHARED_READ_GROUP 16
#define FLEX_GPU_SHARED_READ_BYTES ((int64_t)8 << 20)
int flex_gpu_fwd_head_group(const struct flex_mod *score_mod, int persistent);
/* Whether the mods may take 16-bit indices: B and H, and the lengths plus
 * the margin the kernels evaluate the mods past them, within the
 * FLEX_EMIT_SHORT_* bounds. */
int flex_gpu_short_indices(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t margin);
/* One 16-row m-tile per warp, as many warps as the mask's q block holds
 * (max_warps at most), and kv steps no longer than its kv block: 64 keys,
 * 32 for head dims above 128 (wide), so S and the accumulators stay in
 * registers. The forward's tiles where no wider kernel applies, and the
 * deterministic dQ kernel's. Pure. */
void flex_gpu_row_tiles(int q_block, int kv_block, int wide, int max_warps, int *warps,
                        int *block_n);
/* The CUDA forward's kernel and tiles for 16-bit inputs (cfg's dq, dv and
 * vec set), from the mask's block sizes and whether the GPU is sm_90a
 * (hopper). There the wgmma kernel (flex_forward_sm90.cuh) takes every
 * case it covers: 16-byte aligned rows, query blocks that are multiples of
 * 128, and kv blocks that are multiples of 64. Its steps are 128 keys for
 * head dims up to 128 where the kv blocks allow, else 64 (at head dims
 * over 128, O's accumulators of up to 256 columns and 128 scores a row
 * would not fit a consumer's registers). Everything else, and every GPU
 * before Hopper, runs the mma.sync kernel. FLEXATTN_DEBUG=
 * cuda_tile=WARPSxMTxBLOCK_N selects the mma.sync kernel with those tiles
 * (for tuning and comparison; they must divide the mask's blocks), and
 * cuda_wgmma_step=64 the wgmma kernel in 64-key steps at any head dim.
 * Pure but for ctx's debug settings (ctx may be NULL: none). */
void flex_gpu_fwd_tiles(const flex_context *ctx, flex_cuda_fwd_config *cfg, int q_block,
                        int kv_block, int hopper);
/* The Q tiles the TMA kernel keeps (cfg->q_bufs): two where the kernel's
 * shared memory fits limit with two, else one; 0 without TMA. Pure. */
void flex_gpu_fwd_q_bufs(flex_cuda_fwd_config *cfg, size_t limit);
/* Shared memory of a 16-bit forward kernel for cfg: its Q tile (q_bufs of
 * them for the TMA kernel), two K/V stages, and 1 KB of alignment for the
 * wgmma kernels. Pure. */
size_t flex_gpu_fwd_smem(const flex_cuda_fwd_config *cfg);
/* Shrinks the mma.sync forward's tiles until flex_gpu_fwd_smem fits limit:
 * the kv step halved down to 16 keys, then the warps (query rows) halved.
 * Left as small as it gets when nothing fits (the caller refuses by name).
 * Pure. */
void flex_gpu_fwd_fit(flex_cuda_fwd_config *cfg, size_t limit);

/* The decode kernels' split count (flex_decode.cuh): the caller's hint when
 * given (at most one piece per 64-key step of the longest kv length);
 * otherwise enough pieces that `units` CTAs per piece (batch x kv head x
 * row chunks) fill the GPU's SMs about twice, with at least 4 steps (256
 * keys) a piece and at most 256 pieces. Pure. */
int flex_gpu_decode_splits(int sm_count, int64_t units, int64_t longest_kv, int hint);

/* Fills the forward kernel's parameter block from a's tensors and scale,
 * the mask's device copy mc (mask and mc NULL: every block is walked,
 * dense) and the launch choices (block sizes, the tile height block_m of
 * the f16/bf16 kernel, the head group of the tile order). Pure: reads its
 * arguments, writes *p only. */
void flex_gpu_fwd_params_fill(flex_gpu_fwd_params *p, const flex_forward_args *a,
                              const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                              int q_block, int kv_block, int block_m, int head_group);

/* The most bytes flex_gpu_fwd_blob writes. */
#define FLEX_GPU_FWD_BLOB_BYTES                                                                    \
    (sizeof(flex_gpu_fwd_params) + FLEX_GPU_BUFFERS_BYTES(FLEX_EMIT_MAX_SLOTS))
/* The forward kernel's parameter block (struct flex_fwd_params): *p
 * (flex_gpu_fwd_params_fill's arguments) followed by the mods' buffers and
 * the bounds flag, in blob; returns its size. Pure. */
size_t flex_gpu_fwd_blob(unsigned char *blob, flex_gpu_fwd_params *p, const flex_forward_args *a,
                         const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                         const struct flex_gpu_partial_bits *bits, int q_block, int kv_block,
                         int block_m, int head_group, const flex_gpu_buffer_desc *descs,
                         int slots, flex_gpu_ptr flag);

/* The most bytes flex_gpu_dec_blob writes. */
#define FLEX_GPU_DEC_BLOB_BYTES (FLEX_GPU_DEC_FWD_AT + FLEX_GPU_FWD_BLOB_BYTES)
/* The decode kernels' parameter block (struct flex_dec_params of
 * flex_decode.cuh): *hd, the forward's block *p from FLEX_GPU_DEC_FWD_AT,
 * then the mods' buffers and the bounds flag, in blob; returns its size.
 * Pure. */
size_t flex_gpu_dec_blob(unsigned char *blob, const flex_gpu_dec_head *hd,
                         const flex_gpu_fwd_params *p, const flex_gpu_buffer_desc *descs,
                         int slots, flex_gpu_ptr flag);

/* The forward configuration both vendors start from: dtype, padded head
 * dims, the scale's sign, 16-bit indices (the kernels evaluate the mods up
 * to a tile past the ends), and for f32 the FMA kernel's 4 warps; for
 * 16-bit inputs whether rows take cp.async. Tiles and variants are the
 * vendor's. Pure. */
void flex_gpu_fwd_config(flex_cuda_fwd_config *cfg, const flex_forward_args *a);

/* A forward kernel's key (flex_gpu_get_function): every field of cfg, the
 * mods' hashes and in-range proofs, the arch and the compiler. sm90 says
 * whether the vendor has the sm_90a kernel's fields (wgmma, tma, chain) in
 * its keys. */
void flex_gpu_fwd_key(char *key, size_t cap, const flex_gpu_state *st,
                      const flex_cuda_fwd_config *cfg, int sm90, const struct flex_mod *mask_mod,
                      const struct flex_mod *score_mod, const unsigned char *mask_in_range,
                      const unsigned char *score_in_range);

/* The source of a forward kernel (flex_cuda_forward_source_in_range,
 * flex_hip_forward_source). */
typedef char *(*flex_gpu_fwd_source_fn)(const flex_cuda_fwd_config *cfg, const ir_mod *mask,
                                        const ir_mod *score, const unsigned char *mask_in_range,
                                        const unsigned char *score_in_range);
/* flex_gpu_get_function for the forward kernel of cfg and the mods, the
 * source from `source`. */
flex_status flex_gpu_fwd_function(flex_context *ctx, flex_gpu_state *st, const char *key,
                                  flex_gpu_fwd_source_fn source, const flex_cuda_fwd_config *cfg,
                                  const struct flex_mod *mask_mod,
                                  const struct flex_mod *score_mod,
                                  const unsigned char *mask_in_range,
                                  const unsigned char *score_in_range, void **fn);

/* ---- backward ---- */

/* Shared memory (LDS on AMD) of the f16/bf16 backward kernel for cfg: the
 * sum of the FLEX_BWD_S* regions of flex_backward.cuh (K and V of the kv
 * tile, the Q and dO stages, dS with at least 64 query columns, lse and
 * delta of the stages, the gradient region of cfg->grad_smem floats). Pure. */
size_t flex_gpu_bwd_smem(const flex_cuda_bwd_config *cfg);

/* The most floats the backward's shared gradient region holds (48 KB):
 * beside the largest tiles that use it (149 KB for the sm_90 wgmma kernel
 * at head dim 128) it stays inside sm_90's 227 KB, and beside the sm_80
 * mma.sync kernel's 113 KB inside sm_80's 163 KB. */
#define FLEX_GPU_BWD_GRAD_SMEM_MAX 12288

/* The floats of a's buffer gradients together (the size of the shared
 * gradient region that holds them all), or 0 where there are none, one
 * is empty, or together they exceed FLEX_GPU_BWD_GRAD_SMEM_MAX. Pure. */
int flex_gpu_bwd_grad_floats(const flex_backward_args *a);

/* The backward configuration both vendors start from: dtype, padded head
 * dims, 16-bit indices (the kernels clamp the indices they pass the mods),
 * the gradient slots, the f32 kernel's 4 warps of 16-row steps, and for
 * 16-bit inputs whether rows take cp.async. Tiles and variants are the
 * vendor's (flex_gpu_bwd_tiles, flex_gpu_bwd_fit). Pure. */
void flex_gpu_bwd_config(flex_cuda_bwd_config *cfg, const flex_backward_args *a);

/* The f16/bf16 backward's tiles before shared memory is counted: 16 kv
 * rows a warp, 128 a CTA (8 warps) for head dims up to 128 where the mask's
 * kv block is a multiple of 128 (half the atomic adds per dQ element and
 * half the reads of Q and dO per kv row), otherwise up to 64 and no more
 * than the kv block; query steps no longer than the mask's q block and
 * short enough that Sᵀ and dPᵀ fit beside the dK and dV accumulators: 64
 * rows for head dims up to 64, 32 up to 128, wide_block_m above (CUDA 16;
 * HIP 32, an even number of 16-row dQ tiles, which MFMA needs). Pure. */
void flex_gpu_bwd_tiles(flex_cuda_bwd_config *cfg, int q_block, int kv_block, int wide_block_m);
/* Shrinks cfg until flex_gpu_bwd_smem fits smem_limit: the kv tile halved
 * down to 64 rows, then the Q/dO pipeline dropped, then (shrink_block_m)
 * the query step halved down to 16 rows, then the kv tile halved further.
 * The mask's blocks are powers of two from 16, so each halving still
 * divides them. What stays too large is the caller's error. Pure. */
void flex_gpu_bwd_fit(flex_cuda_bwd_config *cfg, size_t smem_limit, int shrink_block_m);

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

/* The mods of a backward call as its kernels see them. */
typedef struct flex_gpu_bwd_mods {
    const struct flex_mod *mask_mod;   /* NULL: no mask mod evaluated */
    const struct flex_mod *score_used; /* NULL: the identity (no derivative) */
    const ir_mod *mask_ir, *score_ir;  /* score_ir: &derived */
    ir_mod derived;
    int derived_made;
    mod_derivative der;
    flex_cuda_grad_load loads[MOD_DERIVE_MAX_LOADS];
    int num_loads;
    flex_gpu_buffer_desc grad_descs[IR_MAX_BUFFERS];
    int slots; /* buffer slots of both mods */
} flex_gpu_bwd_mods;

/* flex_gpu_bwd_score_prepare into m, then the slot count's check
 * (flex_gpu_mod_slots). On failure nothing is left to free; on success the
 * caller calls flex_gpu_bwd_mods_free (which may be called again). */
flex_status flex_gpu_bwd_mods_prepare(flex_context *ctx, const flex_gpu_state *st,
                                      const flex_backward_args *a,
                                      const struct flex_mod *mask_mod, flex_gpu_bwd_mods *m);
void flex_gpu_bwd_mods_free(flex_gpu_bwd_mods *m);

/* The source of the backward kernels (flex_cuda_backward_source,
 * flex_hip_backward_source). */
typedef char *(*flex_gpu_bwd_source_fn)(const flex_cuda_bwd_config *cfg, const ir_mod *mask,
                                        const unsigned char *mask_in_range,
                                        const flex_cuda_bwd_score *score);
/* A backward module's key: every field of cfg, the mods' hashes, the
 * gradient reads, the in-range proofs, the arch and the compiler. */
void flex_gpu_bwd_key(char *key, size_t cap, const flex_gpu_state *st,
                      const flex_cuda_bwd_config *cfg, const flex_gpu_bwd_mods *m,
                      const unsigned char *mask_in_range, const unsigned char *score_in_range);
/* The most bytes flex_gpu_bwd_blob writes. */
#define FLEX_GPU_BWD_BLOB_BYTES                                                                    \
    (FLEX_GPU_BWD_FWD_AT(IR_MAX_BUFFERS) + FLEX_GPU_FWD_BLOB_BYTES)

/*
 * The backward kernels' parameter block (struct flex_bwd_params: the head,
 * flex_gpu_bwd_head, the gradient descriptors, then the forward's block
 * from FLEX_GPU_BWD_FWD_AT(grad_slots)) for a's tensors and scale, the
 * mask's device copy mc (mask and mc NULL: dense) and its partial blocks'
 * bit masks (bits, made; NULL: the kernels do not read them), the
 * grid's head group (flex_cuda_bwd_config.head_group), the workspace's delta rows and dQ
 * accumulator (0: the main kernel adds no dQ: not wanted, or left to the deterministic dQ kernel),
 * the gradient tensors (grad_slots of them, at least one slot written) and the mods' buffers with
 * the bounds flag. Writes at most FLEX_GPU_BWD_BLOB_BYTES into blob and returns the size. Pure.
 */
size_t flex_gpu_bwd_blob(unsigned char *blob, const flex_backward_args *a,
                         const struct flex_block_mask *mask, const flex_gpu_mask_copy *mc,
                         const struct flex_gpu_partial_bits *bits, int q_block, int kv_block,
                         int head_group, flex_gpu_ptr delta, flex_gpu_ptr dq_acc,
                         const flex_gpu_buffer_desc *grad_descs, int grad_slots,
                         const flex_gpu_buffer_desc *descs, int slots, flex_gpu_ptr flag);

/* The kernels of a backward module. */
typedef struct flex_gpu_bwd_kernels {
    void *pre;   /* flex_bwd_preprocess: delta, the dQ accumulator cleared */
    void *main;  /* flex_bwd_kernel */
    void *store; /* flex_bwd_dq_store: dQ from the accumulator (dq wanted, no dQ kernel) */
    void *dq;    /* flex_bwd_dq_kernel: the deterministic dQ (cfg->dq_warps > 0) */
    void *bits;  /* flex_partial_bits_kernel: makes the bit masks (cfg->partial_bits) */
} flex_gpu_bwd_kernels;

/* The backward's kernels for cfg and m, the module found or built from
 * `source`. The in-range proofs are made over the sequences (the kernels
 * clamp the indices they pass the mods). Under st->lock with the context
 * current. */
flex_status flex_gpu_bwd_kernels_get(flex_context *ctx, flex_gpu_state *st,
                                     const flex_backward_args *a, const flex_cuda_bwd_config *cfg,
                                     const flex_gpu_bwd_mods *m, flex_gpu_bwd_source_fn source,
                                     flex_gpu_bwd_kernels *k);

/* The backward's workspace: delta rows (rounded up to 256 bytes, so the
 * dQ accumulator after them suits 16-byte vector reductions), then, when
 * the main kernel adds dQ (dq wanted and no dQ kernel), its fp32
 * accumulator. */
void flex_gpu_bwd_workspace(const flex_backward_args *a, const flex_cuda_bwd_config *cfg,
                            size_t *delta_bytes, size_t *dq_bytes);

/* The backward's launches on stream, through st's ops, with one parameter
 * block (flex_gpu_bwd_blob over the workspace at ws, laid out as
 * flex_gpu_bwd_workspace says): preprocess, the main kernel per (batch x
 * kv head, kv tile) in the grid order cfg->kv_fastest says (smem bytes of
 * shared memory; main_second, NULL or its second parameter: the tensor
 * maps of cfg->tma, which the caller owns), then the dQ store or the dQ
 * kernel (smem_dq) where k has them. With cfg->partial_bits the kernels
 * read mc's bit masks, made before. Marks the bounds flag pending when the
 * mods read buffers. */
flex_status flex_gpu_bwd_launch(flex_context *ctx, flex_gpu_state *st,
                                const flex_backward_args *a, const flex_cuda_bwd_config *cfg,
                                const flex_gpu_bwd_mods *m, const flex_gpu_mask_copy *mc,
                                const flex_gpu_bwd_kernels *k, const flex_gpu_buffer_desc *descs,
                                flex_gpu_ptr ws, size_t smem, size_t smem_dq, void *stream,
                                void *main_second);

#endif /* FLEXATTN_GPU_HOST_H */
