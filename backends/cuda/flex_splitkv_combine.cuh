/*
 * Split-KV combine (decode; not wired yet, docs/decode.md): merges the
 * pieces that split-KV decode CTAs leave for each query row into the row's
 * output and LSE, by the one LSE merge of core/lse_merge.h (which the
 * source is assembled after; it is embedded beside this template).
 *
 * Layout, the CPU decode path's (backends/cpu/cpu_decode.c): piece s of row
 * i of (b, h) is at part_out[(((b * H + h) * splits + s) * Lq + i) * dv_pad
 * + c] and part_lse[((b * H + h) * splits + s) * Lq + i]. One CTA merges
 * one row; its threads stride over the Dv columns. The f32 result goes to
 * out (element strides out_sb, out_sh, out_si, unit column stride); the
 * conversion to the attention dtype is the caller's epilogue.
 *
 * Compiled by the NVRTC test for sm_80 and sm_90a; never run here.
 */
extern "C" __global__ void
flex_splitkv_combine(const float *__restrict__ part_out, const float *__restrict__ part_lse, int H,
                     int Lq, int splits, int dv, int dv_pad, float *__restrict__ out,
                     long long out_sb, long long out_sh, long long out_si, float *__restrict__ lse,
                     long long lse_sb, long long lse_sh, long long lse_si) {
    const int row = blockIdx.x; /* (b * H + h) * Lq + i */
    const int i = row % Lq, bh = row / Lq, h = bh % H, b = bh / H;
    const long long base = (long long)bh * splits * Lq + i;
    float max = FLEX_LSE_MERGE_NEG_INF;
    for (int s = 0; s < splits; s++)
        max = flex_lse_merge_max(max, part_lse[base + (long long)s * Lq]);
    float weight_sum = 0.0f;
    for (int s = 0; s < splits; s++)
        weight_sum += flex_lse_merge_weight(part_lse[base + (long long)s * Lq], max);
    const float inv = flex_lse_merge_inverse(weight_sum);
    float *dst = out + b * out_sb + h * out_sh + i * out_si;
    for (int c = threadIdx.x; c < dv; c += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; s++) {
            const long long at = base + (long long)s * Lq;
            const float w = flex_lse_merge_weight(part_lse[at], max);
            if (w != 0.0f) acc += w * part_out[at * dv_pad + c];
        }
        dst[c] = acc * inv;
    }
    if (threadIdx.x == 0 && lse)
        lse[b * lse_sb + h * lse_sh + i * lse_si] = flex_lse_merge_lse(max, weight_sum);
}
