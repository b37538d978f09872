/*
 * Split-KV combine (decode, flex_decode.cuh): merges the pieces that the
 * split-KV decode CTAs leave for each query row into the row's output and
 * LSE, by the one LSE merge of core/lse_merge.h (assembled before
 * flex_common.cuh). Appended after flex_decode.cuh, whose parameter block,
 * piece layout (flex_dec_piece) and output store it uses.
 *
 * One CTA merges one row (b, h, i); its threads stride over the Dv
 * columns. A row whose pieces are all empty gets 0 and lse -inf; a NaN
 * piece makes the row NaN.
 */
extern "C" __global__ void flex_splitkv_combine(const flex_dec_params dp) {
    const flex_fwd_params &p = dp.f;
    const int row = blockIdx.x; /* (b * Hq + h) * Lq + i */
    const int i = row % p.Lq, bh = row / p.Lq, h = bh % p.Hq, b = bh / p.Hq;
    const long long first = flex_dec_piece(dp, b, h, 0, i);
    float max = FLEX_LSE_MERGE_NEG_INF;
    for (int s = 0; s < dp.splits; s++)
        max = flex_lse_merge_max(max, dp.part_lse[first + (long long)s * p.Lq]);
    float weight_sum = 0.0f;
    for (int s = 0; s < dp.splits; s++)
        weight_sum += flex_lse_merge_weight(dp.part_lse[first + (long long)s * p.Lq], max);
    const float inv = flex_lse_merge_inverse(weight_sum);
    for (int c = threadIdx.x; c < p.Dv; c += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < dp.splits; s++) {
            const long long at = first + (long long)s * p.Lq;
            const float w = flex_lse_merge_weight(dp.part_lse[at], max);
            if (w != 0.0f) acc += w * dp.part_out[at * FLEX_DV + c];
        }
        flex_dec_store_out(p, b, h, i, c, acc * inv);
    }
    if (threadIdx.x == 0 && p.lse)
        p.lse[b * p.l_sb + h * p.l_sh + (long long)i * p.l_ss] =
            flex_lse_merge_lse(max, weight_sum);
}
