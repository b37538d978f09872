/*
 * flex_partial_bits.cuh: bit masks of a block mask's partial blocks, made
 * once on the GPU and read by the forward instead of the mask mod (host:
 * backends/gpu/gpu_partial_bits.c; docs/decisions.md, "Partial blocks as
 * bit masks"). The host places this file after flex_common.cuh and before
 * flex_forward.cuh when the forward is compiled with FLEX_PARTIAL_BITS 1,
 * so the bit kernel and the forward share one module and call the same
 * emitted flex_mask_mod.
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
    unsigned *oob;     /* the mask mod's buffer-bounds bits, kept for later forwards */
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

/* ---- reading them in the forward ---- */

/* The bit block of step j of a tile's walk (a partial step): its word
 * offset in p.bits, from the host's table of one entry per (plane, partial
 * list entry). The plane is the (b, h) the mask mod tells apart where the
 * mask's lists do not (a broadcast mask whose mod reads b or h); the list
 * entry is where the walk finds the block. */
static FLEX_DEVICE_INLINE int flex_step_bits_at(const flex_fwd_params &p, const flex_kv_walk &w,
                                                int j, int b, int h) {
    const int entry = w.part0 + j / (p.mask_kvblock / FLEX_BLOCK_N) - w.n_full;
    const int plane =
        (p.bit_planes_b > 1 ? b * p.bit_planes_h : 0) + (p.bit_planes_h > 1 ? h : 0);
    return p.bit_words[(long long)plane * p.bit_entries + entry];
}

/* Keep bits of this lane's scores in a step of NT n-tiles (flex_keep_bits'
 * words with partial bits): per row half hf (rows qrow0 + lane / 4 + 8 hf),
 * word g holds keys kv0 + 32 g .. + 31, shifted right by 2 (lane & 3) so
 * that score r of n-tile nt is bit (nt & 3) * 8 + (r & 1) of word nt / 4 of
 * half r / 2. */
template <int NT> struct flex_keep_words {
    unsigned w[2][(NT + 3) / 4];
};

template <int NT>
static FLEX_DEVICE_INLINE bool flex_kept(const flex_keep_words<NT> &kw, int nt, int r) {
    return (kw.w[r >> 1][nt >> 2] >> ((nt & 3) * 8 + (r & 1))) & 1u;
}

/* The words of a partial step from its bit block (bits_at: its word
 * offset), or of a full step cut by the sequence ends from the lengths.
 * A partial block's bits are already 0 past the ends. Step kv0 and the
 * tile's rows lie inside one mask block, aligned to its power-of-two
 * sizes. */
template <int NT>
static FLEX_DEVICE_INLINE void flex_keep_words_of(const flex_fwd_params &p, int qrow0, int kv0,
                                                  bool partial, int bits_at, int lane,
                                                  flex_keep_words<NT> &kw) {
    constexpr int G = (NT + 3) / 4; /* 32-key groups of the step */
    const int shift = 2 * (lane & 3);
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = qrow0 + (lane >> 2) + 8 * hf;
        if (partial) {
            const int kin = kv0 & (p.mask_kvblock - 1);
            const unsigned *row = p.bits + bits_at +
                                  (q & (p.mask_qblock - 1)) * p.bit_row_words + (kin >> 5);
            if (G == 4) {
                /* 128 keys of a 128-key step: 16-byte aligned (row_words
                 * and the block's words are multiples of 4, kin of 128) */
                const uint4 v = __ldg(reinterpret_cast<const uint4 *>(row));
                kw.w[hf][0] = v.x >> shift;
                kw.w[hf][G > 1 ? 1 : 0] = v.y >> shift;
                kw.w[hf][G > 2 ? 2 : 0] = v.z >> shift;
                kw.w[hf][G > 3 ? 3 : 0] = v.w >> shift;
            } else {
#pragma unroll
                for (int g = 0; g < G; g++)
                    kw.w[hf][g] = (__ldg(row + g) >> (kin & 31)) >> shift;
            }
        } else {
#pragma unroll
            for (int g = 0; g < G; g++) {
                const int n = p.Lkv - (kv0 + 32 * g); /* keys of the group inside */
                const unsigned keys = n >= 32 ? ~0u : n <= 0 ? 0u : (1u << n) - 1u;
                kw.w[hf][g] = q < p.Lq ? keys >> shift : 0u;
            }
        }
    }
}

/* A forward whose mask mod's bounds bits come from the bit kernel: its
 * first thread raises them again, so every call reports what evaluating
 * the mask would have. */
static FLEX_DEVICE_INLINE void flex_raise_bits_oob(const flex_fwd_params &p) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
        const unsigned oob = *p.bits_oob;
        if (oob) atomicOr(p.bufs.bounds_flag, oob);
    }
}
