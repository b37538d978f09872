/*
 * flex_mask_blocks.cuh: exact classes of the blocks interval analysis left
 * undecided. One CTA per listed block evaluates flex_mask_mod (emitted and
 * prepended by the host, after vendor.cuh and flex_gpu_params.h) over
 * the block's elements, clipped to the sequence lengths, and writes
 * FLEX_BLOCK_EMPTY (0), _PARTIAL (1) or _FULL (2).
 */

/* The members of the head (struct flex_gpu_mask_blocks_head,
 * flex_gpu_params.h), then the mask mod's buffers. */
struct flex_mask_blocks_params {
    FLEX_GPU_MASK_BLOCKS_HEAD_FIELDS
    flex_buffers bufs;
};
static_assert(sizeof(flex_mask_blocks_params) ==
                  sizeof(flex_gpu_mask_blocks_head) + FLEX_GPU_BUFFERS_BYTES(FLEX_NUM_BUFFERS),
              "struct flex_mask_blocks_params: the buffers follow the head unpadded");

extern "C" __global__ void __launch_bounds__(256)
    flex_mask_blocks_kernel(const flex_mask_blocks_params p) {
    unsigned oob = 0;
    for (long long i = blockIdx.x; i < p.count; i += gridDim.x) {
        const int b = p.blocks[4 * i], h = p.blocks[4 * i + 1];
        const int q0 = p.blocks[4 * i + 2] * p.q_block, k0 = p.blocks[4 * i + 3] * p.kv_block;
        const int nq = max(0, min(p.q_block, p.q_len - q0));
        const int nk = max(0, min(p.kv_block, p.kv_len - k0));
        int any_true = 0, any_false = 0;
        for (int e = threadIdx.x; e < nq * nk; e += blockDim.x) {
            const bool r = flex_mask_mod(b, h, q0 + e / nk, k0 + e % nk, p.bufs, oob);
            any_true |= r;
            any_false |= !r;
        }
        any_true = __syncthreads_or(any_true);
        any_false = __syncthreads_or(any_false);
        if (threadIdx.x == 0) p.classes[i] = any_true ? (any_false ? 1 : 2) : 0;
        __syncthreads();
    }
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
}
