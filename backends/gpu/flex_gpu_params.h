/*
 * flex_gpu_params.h: the parameter blocks that the GPU kernels take by
 * value, defined once for both sides. The host compiles this file as C11
 * (gpu_host.h includes it; gpu_host.c and the vendor backends fill the
 * structs); the kernels compile it as C++ (NVRTC, hiprtc, clang's AMDGPU
 * target): the source assembly (cuda_compile.c) places its text after
 * vendor.cuh, before the emitted mods. There is no second declaration to
 * keep in step (docs/decisions.md, "One parameter header for host and
 * device").
 *
 * A kernel's parameter is one struct: a fixed head declared here, then a
 * tail whose length depends on the kernel's configuration: the mods'
 * buffers (flex_gpu_buffers below, FLEX_NUM_BUFFERS descriptors and the
 * bounds flag) and, in the backward, the gradient tensors' descriptors.
 * The kernels' structs begin with a head's members (flex_common.cuh,
 * flex_backward.cuh, flex_decode.cuh, flex_mask_blocks.cuh) and assert
 * that their size is the head's plus the tail's as the macros at the end
 * count it, so each part starts where the host puts it: the host writes
 * the head and then the tail into a byte blob (gpu_host.c), which becomes
 * the kernel's parameter.
 *
 * Device pointers are FLEX_GPU_PTR(T): T * in the kernels, a 64-bit
 * integer (flex_gpu_ptr) on the host, which only passes them on. Integers
 * are flex_gpu_i32 and flex_gpu_i64 (int and long long in the kernels,
 * int32_t and int64_t on the host). Both sides assert these widths and
 * alignments below, so one declaration makes one layout; the NVRTC suite
 * checks the heads' sizes as NVRTC lays them out against the host's
 * (test_cuda_codegen.c), and the host's suite reads every blob at the
 * offsets of these structs (test_gpu_host.c).
 */
#ifndef FLEX_GPU_PARAMS_H
#define FLEX_GPU_PARAMS_H

#ifdef __cplusplus
/* ---- the kernels' side (C++): real pointer types ---- */
template <typename T> using flex_gpu_device_ptr = T *;
#define FLEX_GPU_PTR(T) flex_gpu_device_ptr<T>
typedef int flex_gpu_i32;
typedef long long flex_gpu_i64;
#define FLEX_GPU_STATIC_ASSERT(cond, why) static_assert(cond, why)
#define FLEX_GPU_ALIGNOF(T)               alignof(T)
#else
/* ---- the host's side (C11): device addresses as integers ----
 * The includer brings <stdint.h> first (gpu_host.h does): the kernels'
 * sources hold this text too, and they carry no include line, since the
 * run-time compilers have no include path. */
/* A device address, whatever the vendor calls it (CUdeviceptr, hipDeviceptr_t). */
typedef uint64_t flex_gpu_ptr;
#define FLEX_GPU_PTR(T) flex_gpu_ptr
typedef int32_t flex_gpu_i32;
typedef int64_t flex_gpu_i64;
#define FLEX_GPU_STATIC_ASSERT(cond, why) _Static_assert(cond, why)
#define FLEX_GPU_ALIGNOF(T)               _Alignof(T)
#endif

/* The widths that make the layout the same on both sides. */
FLEX_GPU_STATIC_ASSERT(sizeof(FLEX_GPU_PTR(void)) == 8 && FLEX_GPU_ALIGNOF(FLEX_GPU_PTR(void)) == 8,
                       "device pointers are 8 bytes, 8-aligned");
FLEX_GPU_STATIC_ASSERT(sizeof(flex_gpu_i64) == 8 && FLEX_GPU_ALIGNOF(flex_gpu_i64) == 8,
                       "flex_gpu_i64 is 8 bytes, 8-aligned");
FLEX_GPU_STATIC_ASSERT(sizeof(flex_gpu_i32) == 4 && FLEX_GPU_ALIGNOF(flex_gpu_i32) == 4,
                       "flex_gpu_i32 is 4 bytes, 4-aligned");
FLEX_GPU_STATIC_ASSERT(sizeof(float) == 4 && FLEX_GPU_ALIGNOF(float) == 4,
                       "float is 4 bytes, 4-aligned");

/*
 * One buffer of a mod as the emitted loads read it (core/mod/emit.c): its
 * data, the sizes of its first four dimensions (1 past its rank, at most
 * INT32_MAX) and their strides in elements (0 past its rank). The
 * backward's gradient tensors take the same form.
 */
typedef struct flex_buffer {
    FLEX_GPU_PTR(const void) data;
    flex_gpu_i32 sizes[4];
    flex_gpu_i64 strides[4];
} flex_buffer;

/*
 * Each head below is one list of members (FLEX_GPU_*_FIELDS) that two
 * structs begin with: the host's (flex_gpu_fwd_params, ...) and the
 * kernel's (flex_fwd_params, ...), whose members thus stay its own (p.q,
 * not p.head.q) and whose compiled code is that of a struct declared in
 * one piece. Structs that begin with the same members have them at the
 * same offsets.
 */

/* The forward kernels' parameters before the mods' buffers (struct
 * flex_fwd_params, flex_common.cuh); the backward and the decode kernels
 * embed the whole forward block. */
#define FLEX_GPU_FWD_FIELDS                                                                        \
    FLEX_GPU_PTR(const void) q, k, v;                                                              \
    FLEX_GPU_PTR(void) out;                                                                        \
    FLEX_GPU_PTR(float) lse; /* NULL: not wanted */                                                \
    FLEX_GPU_PTR(const int) full_off, full_idx, part_off, part_idx; /* kv-major mask lists */      \
    FLEX_GPU_PTR(const int) row_order; /* mask q-block rows, heaviest first; NULL: natural */      \
    /* Partial blocks as bit masks (flex_partial_bits.cuh; NULL without):                       \
     * per (plane, partial list entry) the word offset of its bit block in                      \
     * bits, and the mask mod's bounds bits of the kernel that made them. */                    \
    FLEX_GPU_PTR(const int) bit_words;                                                             \
    FLEX_GPU_PTR(const unsigned) bits, bits_oob;                                                   \
    flex_gpu_i64 q_sb, q_sh, q_ss;     /* strides of batch, head, sequence, in elements */         \
    flex_gpu_i64 k_sb, k_sh, k_ss;                                                                 \
    flex_gpu_i64 v_sb, v_sh, v_ss;                                                                 \
    flex_gpu_i64 o_sb, o_sh, o_ss;                                                                 \
    flex_gpu_i64 l_sb, l_sh, l_ss;                                                                 \
    flex_gpu_i32 B, Hq, Hkv, Lq, Lkv, D, Dv;                                                       \
    flex_gpu_i32 mask_B, mask_H, mask_nq, mask_nk, mask_qblock, mask_kvblock;                      \
    flex_gpu_i32 dense;         /* 1: no block mask, every kv block of mask_kvblock is full */     \
    flex_gpu_i32 tiles_per_row; /* kernel q-tiles per mask q-block */                              \
    flex_gpu_i32 head_group;    /* tile order (flex_tile_of); 0: (batch, head) fastest */          \
    /* bit planes over b and h (B or 1, Hq or 1), partial list entries per                      \
     * plane, words per row of a bit block */                                                    \
    flex_gpu_i32 bit_planes_b, bit_planes_h, bit_entries, bit_row_words;                           \
    float scale, scale_log2;
typedef struct flex_gpu_fwd_params {
    FLEX_GPU_FWD_FIELDS
} flex_gpu_fwd_params;

/* The backward kernels' parameters before the gradient tensors'
 * descriptors (struct flex_bwd_params, flex_backward.cuh), which the
 * forward's whole block follows. */
#define FLEX_GPU_BWD_HEAD_FIELDS                                                                   \
    FLEX_GPU_PTR(const void) dout;                                                                 \
    FLEX_GPU_PTR(void) dq, dk, dv; /* NULL: not wanted */                                          \
    FLEX_GPU_PTR(float) delta;     /* (B, Hq, Lq) */                                               \
    FLEX_GPU_PTR(float) dq_acc;    /* (B, Hq, Lq, D) fp32; NULL: the main kernel adds no dQ */     \
    FLEX_GPU_PTR(const int) qfull_off, qfull_idx, qpart_off, qpart_idx; /* q-major mask lists */   \
    /* with bit masks (FLEX_BWD_BITS): per (plane, q-major partial entry) the                      \
     * word offset of its bit block in f.bits (f.bit_words: the same per                           \
     * kv-major entry) */                                                                          \
    FLEX_GPU_PTR(const int) qbit_words;                                                            \
    flex_gpu_i64 do_sb, do_sh, do_ss;                                                              \
    flex_gpu_i64 dq_sb, dq_sh, dq_ss;                                                              \
    flex_gpu_i64 dk_sb, dk_sh, dk_ss;                                                              \
    flex_gpu_i64 dv_sb, dv_sh, dv_ss;
typedef struct flex_gpu_bwd_head {
    FLEX_GPU_BWD_HEAD_FIELDS
} flex_gpu_bwd_head;

/* The decode kernels' parameters before the forward's whole block (struct
 * flex_dec_params, flex_decode.cuh). Per-batch query offsets and kv
 * lengths are device arrays the kernel reads, never values here. */
#define FLEX_GPU_DEC_HEAD_FIELDS                                                                   \
    FLEX_GPU_PTR(const int) q_offsets;  /* NULL: all 0 */                                          \
    FLEX_GPU_PTR(const int) kv_lengths; /* NULL: kv_len */                                         \
    FLEX_GPU_PTR(const int) page_table; /* NULL: not paged */                                      \
    FLEX_GPU_PTR(float) part_out;       /* splits > 1: (B, Hq, splits, Lq, FLEX_DV) f32 */         \
    FLEX_GPU_PTR(float) part_lse;       /* splits > 1: (B, Hq, splits, Lq) */                      \
    FLEX_GPU_PTR(unsigned) decode_flag; /* the bounds flag's decode word */                        \
    flex_gpu_i64 qo_stride, kl_stride, pt_sb, pt_sp;                                               \
    flex_gpu_i32 kv_len;    /* logical kv length */                                                \
    flex_gpu_i32 page_size; /* paged: rows per page */                                             \
    flex_gpu_i32 num_pages; /* paged: pages in the pool */                                         \
    flex_gpu_i32 splits;    /* kv pieces per (batch, head) */                                      \
    flex_gpu_i32 group;     /* query heads per kv head */                                          \
    flex_gpu_i32 rows;      /* packed rows per kv head: group * Lq; the head ends on 8 bytes */
typedef struct flex_gpu_dec_head {
    FLEX_GPU_DEC_HEAD_FIELDS
} flex_gpu_dec_head;

/* The mask-block evaluator's parameters before the mask mod's buffers
 * (struct flex_mask_blocks_params, flex_mask_blocks.cuh). */
#define FLEX_GPU_MASK_BLOCKS_HEAD_FIELDS                                                           \
    FLEX_GPU_PTR(const int) blocks; /* 4 ints per block: b, h, q_block index, kv_block index */    \
    FLEX_GPU_PTR(unsigned char) classes;                                                           \
    flex_gpu_i64 count;                                                                            \
    flex_gpu_i32 q_len, kv_len, q_block, kv_block;
typedef struct flex_gpu_mask_blocks_head {
    FLEX_GPU_MASK_BLOCKS_HEAD_FIELDS
} flex_gpu_mask_blocks_head;

/* Every head ends on its 8-byte alignment, so what follows it in a
 * kernel's struct (8-aligned) starts at sizeof(head). */
FLEX_GPU_STATIC_ASSERT(sizeof(flex_buffer) % 8 == 0 && sizeof(flex_gpu_fwd_params) % 8 == 0 &&
                           sizeof(flex_gpu_bwd_head) % 8 == 0 &&
                           sizeof(flex_gpu_dec_head) % 8 == 0 &&
                           sizeof(flex_gpu_mask_blocks_head) % 8 == 0,
                       "parameter heads end on 8 bytes");

/* ---- the tails: where each part of a parameter block starts ---- */

#ifdef __cplusplus
/* The mods' buffers of a kernel: `slots` descriptors (core/mod/emit.c
 * declares flex_buffers as this with FLEX_NUM_BUFFERS slots, at least one),
 * then the bounds flag, a bit per slot that a read out of range sets. The
 * host appends the same bytes after a head (flex_gpu_append_buffers), as
 * the two macros below lay them out. */
template <int slots> struct flex_gpu_buffers {
    flex_buffer buf[slots];
    FLEX_GPU_PTR(unsigned) bounds_flag;
};
#endif

/* Bytes of flex_gpu_buffers<slots> for `slots` buffer slots (at least one
 * descriptor even when the mods have no buffers), and where its bounds
 * flag's pointer starts. */
#define FLEX_GPU_BUFFERS_FLAG_AT(slots)                                                            \
    (sizeof(flex_buffer) * ((slots) > 0 ? (unsigned)(slots) : 1u))
#define FLEX_GPU_BUFFERS_BYTES(slots)                                                              \
    (FLEX_GPU_BUFFERS_FLAG_AT(slots) + sizeof(FLEX_GPU_PTR(unsigned)))

#if defined(__cplusplus) && !defined(__CUDACC_RTC__)
/* The flag after the descriptors, where the host writes it. Checked by the
 * compilers that have offsetof (the host's C++ compile of this file,
 * clang and hiprtc); NVRTC has none, and sizes alone cannot tell the
 * order of two members. */
static_assert(__builtin_offsetof(flex_gpu_buffers<3>, bounds_flag) == FLEX_GPU_BUFFERS_FLAG_AT(3) &&
                  sizeof(flex_gpu_buffers<3>) == FLEX_GPU_BUFFERS_BYTES(3),
              "flex_gpu_buffers: the descriptors, then the bounds flag");
#endif

/* Where the forward's block starts in the backward's: after the head and
 * the descriptors of grad_slots gradient tensors (at least one, as
 * flex_backward.cuh declares grads[FLEX_GRAD_SLOTS]). */
#define FLEX_GPU_BWD_FWD_AT(grad_slots)                                                            \
    (sizeof(flex_gpu_bwd_head) + sizeof(flex_buffer) * ((grad_slots) > 0 ? (unsigned)(grad_slots) : 1u))

/* Where the forward's block starts in the decode's. */
#define FLEX_GPU_DEC_FWD_AT sizeof(flex_gpu_dec_head)

#endif /* FLEX_GPU_PARAMS_H */
