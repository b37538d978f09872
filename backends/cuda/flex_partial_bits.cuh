/*
 * flex_partial_bits.cuh: bit masks of a block mask's partial blocks, made
 * once on the GPU and read by the forward and the backward instead of the
 * mask mod (host: backends/gpu/gpu_partial_bits.c; docs/decisions.md,
 * "Partial blocks as bit masks"). The host places this file after
 * flex_common.cuh and before flex_forward.cuh (FLEX_PARTIAL_BITS 1) or
 * flex_backward.cuh (FLEX_BWD_BITS 1), so the bit kernel and the kernels
 * that read its bits share one module and call the same emitted
 * flex_mask_mod; whichever module's kernel runs first makes them. Each
 * kernel reads them in its own fragment layout (flex_keep_words_of in
 * flex_forward.cuh, flex_bwd_keep_of in flex_backward.cuh).
 *
 * A bit block covers one mask block of q_block x kv_block elements: row r
 * (query q0 + r) is row_words = max(1, kv_block / 32) 32-bit words, bit c
 * of word w is key k0 + 32 w + c; a bit is set where the element exists
 * (q < Lq, kv < Lkv) and the mask mod keeps it, exactly the forward's
 * keep of a partial block. The (b, h) a block is evaluated at is one of
 * those the mask mod tells apart, so one bit block serves every batch and
 * head that reads the same bits.
 */

/* ---- the bit kernel ---- */

/* The host mirrors this layout (gpu_partial_bits.c). */
struct flex_partial_bits_params {
    const int *blocks; /* 4 ints per bit block: b, h, q-block index, kv-block index */
    unsigned *bits;    /* bit block i at bits + i * q_block * row_words */
    unsigned *oob;     /* the mask mod's buffer-bounds bits, for the calls that read the bits */
    long long count;
    int q_len, kv_len, q_block, kv_block, row_words, pad_;
    flex_buffers bufs;
};

/* One CTA per bit block (grid-stride), one 32-bit word per thread at a
 * time. Elements past the sequences are 0 and their mask mod is never
 * called (a read proved in range only inside them may be compiled
 * unchecked), so bounds bits count only inside, as in the forward. */
extern "C" __global__ void __launch_bounds__(256)
    flex_partial_bits_kernel(const flex_partial_bits_params p) {
    unsigned oob = 0;
    const int block_words = p.q_block * p.row_words;
    const int keys = p.kv_block < 32 ? p.kv_block : 32; /* of a word */
    for (long long i = blockIdx.x; i < p.count; i += gridDim.x) {
        const int b = p.blocks[4 * i], h = p.blocks[4 * i + 1];
        const int q0 = p.blocks[4 * i + 2] * p.q_block, k0 = p.blocks[4 * i + 3] * p.kv_block;
        unsigned *out = p.bits + i * block_words;
        for (int w = threadIdx.x; w < block_words; w += blockDim.x) {
            const int q = q0 + w / p.row_words, kv0 = k0 + (w % p.row_words) * 32;
            unsigned word = 0;
            if (q < p.q_len) {
                for (int c = 0; c < keys && kv0 + c < p.kv_len; c++)
                    word |= (unsigned)flex_mask_mod(b, h, q, kv0 + c, p.bufs, oob) << c;
            }
            out[w] = word;
        }
    }
    if (oob) {
        atomicOr(p.bufs.bounds_flag, oob);
        atomicOr(p.oob, oob);
    }
}

/* A kernel whose mask mod's bounds bits come from the bit kernel: its
 * first thread raises them again, so every call reports what evaluating
 * the mask would have. */
static FLEX_DEVICE_INLINE void flex_raise_bits_oob(const flex_fwd_params &p) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
        const unsigned oob = *p.bits_oob;
        if (oob) atomicOr(p.bufs.bounds_flag, oob);
    }
}
