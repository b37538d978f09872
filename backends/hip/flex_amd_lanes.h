/*
 * flex_amd_lanes.h: the lane permutations between mma.sync's m16n8k16
 * fragment layouts, in which the mainloops keep their operands and
 * accumulators, and the register layouts of AMD's 16x16x16 matrix
 * instructions: MFMA on CDNA (wave64, v_mfma_f32_16x16x16{f16,bf16}) and
 * WMMA on RDNA3 (wave32, v_wmma_f32_16x16x16_{f16,bf16}). flex_amd_pair_*
 * computes d0 += A B[:, 0:8] and d1 += A B[:, 8:16] for a 16x16 A and a
 * 16x16 B, as flex_mma_pair does with two mma.sync.
 *
 * The file is valid C11 and HIP device C++, so that the very text the
 * kernels compile is also run by a host test (tests/test_hip_lanes.c) that
 * emulates the instructions' documented register layouts lane by lane. It
 * includes nothing; whoever includes it defines first:
 *   flex_u32                       a 32-bit unsigned type
 *   FLEX_AMD_FN                    the qualifiers of its functions
 *   FLEX_AMD_UNROLL                a full-unroll pragma (or nothing)
 *   int flex_amd_lane()            this lane's index in its wavefront
 *   flex_u32 flex_amd_read(flex_u32 x, int src)  x as lane src of the
 *                                  wavefront holds it (ds_bpermute)
 *   float flex_amd_readf(float x, int src)       the same for a float
 * and, for the MFMA path (FLEX_AMD_HAVE_MFMA), flex_amd_mfma16(a, b, d):
 * d[0..3] = the product of the operands a[0..1], b[0..1] in
 * v_mfma_f32_16x16x16's layout, with C = 0; for the WMMA path
 * (FLEX_AMD_HAVE_WMMA), flex_amd_wmma16(a, b, d): d[0..7] from a[0..7],
 * b[0..7] in v_wmma_f32_16x16x16's layout, C = 0.
 *
 * Layouts (g = (lane & 31) >> 2, t = lane & 3; a "k pair" is the two
 * 16-bit elements of one 32-bit word, the even k in the low half):
 *   m16n8k16 A:   a[h + 2 q] = row g + 8 h, k pair t + 4 q.
 *   m16n8k16 B:   bf[2 n + q] = column g + 8 n, k pair t + 4 q
 *                 (n-tile n of the pair, as ldmatrix.x4 loads K or V).
 *   m16n8 D:      d[r] = row g + 8 (r >> 1), column 2 t + (r & 1) of its
 *                 n-tile.
 *   MFMA A and B: lane L holds row (A) or column (B) L & 15, k pairs
 *                 2 (L >> 4) and 2 (L >> 4) + 1 in words 0 and 1 (which
 *                 of our k pairs go there is ours to choose, the same
 *                 for both operands).
 *   MFMA D:       d[i] of lane L = row 4 (L >> 4) + i, column L & 15.
 *   WMMA A and B: lane L holds row (A) or column (B) L & 15, k pair s in
 *                 word s (s = 0..7); lanes 16-31 repeat lanes 0-15.
 *   WMMA D:       d[v] of lane L = row 2 v + (L >> 4), column L & 15.
 * The operands of B are written as rows too (a column of B is a row of
 * Bᵀ), so one conversion serves A and B.
 *
 * Every conversion is a few rounds of one cross-lane read each: in round
 * r, a lane sends one of its words, chosen by r xor a mask of its own lane
 * bits, and receives into the slot r xor a mask of the reader's lane bits
 * (flex_amd_xperm turns these into selects; no word goes through memory).
 */
#ifndef FLEX_AMD_LANES_H
#define FLEX_AMD_LANES_H

/* x[i] = x[i ^ c] for i < n (n = 4 or 8, c < n, c varying by lane): a
 * conditional swap per bit of c. */
FLEX_AMD_FN void flex_amd_xperm(flex_u32 *x, int n, int c) {
    FLEX_AMD_UNROLL
    for (int bit = 1; bit < 8; bit <<= 1) {
        if (bit >= n) break;
        const int swap = (c & bit) != 0;
        FLEX_AMD_UNROLL
        for (int i = 0; i < 8; i++) {
            if (i >= n || (i & bit)) continue;
            const flex_u32 lo = x[i], hi = x[i | bit];
            x[i] = swap ? hi : lo;
            x[i | bit] = swap ? lo : hi;
        }
    }
}
FLEX_AMD_FN void flex_amd_xpermf(float *x, int n, int c) {
    FLEX_AMD_UNROLL
    for (int bit = 1; bit < 8; bit <<= 1) {
        if (bit >= n) break;
        const int swap = (c & bit) != 0;
        FLEX_AMD_UNROLL
        for (int i = 0; i < 8; i++) {
            if (i >= n || (i & bit)) continue;
            const float lo = x[i], hi = x[i | bit];
            x[i] = swap ? hi : lo;
            x[i | bit] = swap ? lo : hi;
        }
    }
}

/* The eight values a lane received in rounds permuted by mask, back in
 * slot order (xperm), added to its two m16n8 fragments d0 and d1: the end
 * of every result permutation. */
FLEX_AMD_FN void flex_amd_add_fragments(float *d0, float *d1, float *got, int mask) {
    flex_amd_xpermf(got, 8, mask);
    FLEX_AMD_UNROLL
    for (int r = 0; r < 4; r++) {
        d0[r] += got[r];
        d1[r] += got[4 + r];
    }
}

#if defined(FLEX_AMD_HAVE_MFMA)
/* ---- CDNA, wave64: two kernel warps per wavefront ----
 * A 16x16x16 MFMA reads a whole 16x16 operand from the 64 lanes, so each
 * warp's product takes one MFMA of the wave: the two warps of a wave call
 * flex_amd_pair_mfma together, and MFMA w computes warp w's product. */

/* A warp's operand words x (m16n8k16 form, x[h + 2 q] = row g + 8 h, k
 * pair t + 4 q) -> out[2 w + s] = word s of MFMA w's operand in this lane:
 * row L & 15 of warp w, k pair (L >> 4) + 4 s. (The MFMA sums over its k
 * pairs 2 (L >> 4) + s in that order instead of ours, the same for both
 * operands, which leaves the product as it is and makes each lane's two
 * words the same word of two lanes.) Slot 2 w + s comes in round
 * (2 w + s) ^ 2 h (h = (L >> 3) & 1: rows 8-15) from lane
 * 32 w + 4 (L & 7) + (L >> 4), which sends its word x[h + 2 s] then. */
FLEX_AMD_FN void flex_amd_operand_mfma(flex_u32 *out, const flex_u32 *x) {
    const int lane = flex_amd_lane();
    flex_u32 send[4] = {x[0], x[1], x[2], x[3]};
    flex_amd_xperm(send, 4, (lane >> 5) & 1); /* round r: x[P(r) ^ w] */
    const int mask = 2 * ((lane >> 3) & 1);
    const int base = 4 * (lane & 7) + ((lane >> 4) & 3);
    FLEX_AMD_UNROLL
    for (int r = 0; r < 4; r++) {
        const int slot = r ^ mask; /* 2 w + s */
        out[r] = flex_amd_read(send[(r >> 1) + 2 * (r & 1)], 32 * (slot >> 1) + base);
    }
    flex_amd_xperm(out, 4, mask);
}

/* dm[4 w + i] = MFMA w's result in this lane, which, with Bᵀ as the
 * MFMA's A operand and A as its B (flex_amd_pair_mfma), is Dᵀ: row L & 15,
 * column 4 (L >> 4) + i of warp w's product -> d0, d1 += the m16n8
 * fragments of warp L >> 5. The reader's slot e = 4 n + 2 h + b (n-tile n,
 * d[2 h + b]) comes in round e ^ (2 w + 4 (t & 1)) from lane
 * 16 (2 n + (t >> 1)) + g + 8 h, which sends its word 4 w + 2 (t & 1) + b
 * then: word P(r) ^ (4 c0 + 2 c1) in round r, with c0 = (L >> 3) & 1,
 * c1 = (L >> 5) & 1 of the sender and P(r) = 4 r1 + 2 r2 + r0 (r's bits). */
FLEX_AMD_FN void flex_amd_result_mfma(float *d0, float *d1, const float *dm) {
    const int lane = flex_amd_lane();
    float send[8];
    FLEX_AMD_UNROLL
    for (int i = 0; i < 8; i++)
        send[i] = dm[i];
    flex_amd_xpermf(send, 8, 4 * ((lane >> 3) & 1) + 2 * ((lane >> 5) & 1));
    const int g = (lane >> 2) & 7, t = lane & 3;
    const int mask = 2 * ((lane >> 5) & 1) + 4 * (t & 1);
    float got[8];
    FLEX_AMD_UNROLL
    for (int r = 0; r < 8; r++) {
        const int e = r ^ mask;
        const int src = 16 * (2 * (e >> 2) + (t >> 1)) + g + 8 * ((e >> 1) & 1);
        got[r] = flex_amd_readf(send[4 * ((r >> 1) & 1) + 2 * (r >> 2) + (r & 1)], src);
    }
    flex_amd_add_fragments(d0, d1, got, mask);
}

/* d0 += a bf[0:2], d1 += a bf[2:4] (m16n8k16 fragments) with two MFMAs per
 * wavefront, one per warp, each computing (A B)ᵀ = Bᵀ Aᵀ: its result then
 * holds rows of the product in four-column pieces, which reach the m16n8
 * fragments with fewer selects than columns would. Both warps of the wave
 * must call it together. */
FLEX_AMD_FN void flex_amd_pair_mfma(float *d0, float *d1, const flex_u32 *a,
                                    const flex_u32 *bf) {
    const flex_u32 bx[4] = {bf[0], bf[2], bf[1], bf[3]}; /* the rows of Bᵀ as A's */
    flex_u32 am[4], bm[4];
    flex_amd_operand_mfma(am, a);
    flex_amd_operand_mfma(bm, bx);
    float dm[8];
    flex_amd_mfma16(bm, am, dm);
    flex_amd_mfma16(bm + 2, am + 2, dm + 4);
    flex_amd_result_mfma(d0, d1, dm);
}
#endif /* FLEX_AMD_HAVE_MFMA */

#if defined(FLEX_AMD_HAVE_WMMA)
/* ---- RDNA3, wave32: one warp per wavefront ---- */

/* A warp's operand words x (m16n8k16 form) -> out[s] = k pair s of row
 * L & 15. Lanes of rows below 8 read k pair r in round r, the others k
 * pair r ^ 1, so the two never read one lane in the same round; lane
 * 4 g + t sends word 2 (r >> 2) + ((t ^ r) & 1). */
FLEX_AMD_FN void flex_amd_operand_wmma(flex_u32 *out, const flex_u32 *x) {
    const int lane = flex_amd_lane();
    const int h = (lane >> 3) & 1, odd = lane & 1;
    FLEX_AMD_UNROLL
    for (int r = 0; r < 8; r++) {
        const int s = r ^ h;
        const flex_u32 send = ((odd ^ r) & 1) ? x[2 * (r >> 2) + 1] : x[2 * (r >> 2)];
        out[r] = flex_amd_read(send, 4 * (lane & 7) + (s & 3));
    }
    flex_amd_xperm(out, 8, h);
}

/* dm[v] (row 2 v + (L >> 4), column L & 15) -> d0, d1 += the m16n8
 * fragments. Slot e = 4 n + j (n-tile n, d[j]) of lane 4 g + t comes in
 * round r = e ^ E, E = (u & 1) + 4 (u >> 1) with u = g >> 1; the lane
 * holding it sends word k ^ c + 4 ((r >> 1) & 1) then, with
 * k = (r & 1) + 2 ((r >> 2) & 1) and c = (L & 1) + 2 ((L >> 3) & 1) of the
 * sender. */
FLEX_AMD_FN void flex_amd_result_wmma(float *d0, float *d1, const float *dm) {
    const int lane = flex_amd_lane();
    const int c = (lane & 1) + 2 * ((lane >> 3) & 1);
    float lo[4] = {dm[0], dm[1], dm[2], dm[3]}, hi[4] = {dm[4], dm[5], dm[6], dm[7]};
    flex_amd_xpermf(lo, 4, c);
    flex_amd_xpermf(hi, 4, c);
    const int g = (lane >> 2) & 7, t = lane & 3, u = g >> 1;
    const int mask = (u & 1) + 4 * (u >> 1);
    float got[8];
    FLEX_AMD_UNROLL
    for (int r = 0; r < 8; r++) {
        const int k = (r & 1) + 2 * ((r >> 2) & 1);
        const float send = ((r >> 1) & 1) ? hi[k] : lo[k];
        const int e = r ^ mask;
        const int row = g + 8 * ((e >> 1) & 1), col = 8 * (e >> 2) + 2 * t + (e & 1);
        got[r] = flex_amd_readf(send, 16 * (row & 1) + col);
    }
    flex_amd_add_fragments(d0, d1, got, mask);
}

/* d0 += a bf[0:2], d1 += a bf[2:4] (m16n8k16 fragments) with one WMMA. */
FLEX_AMD_FN void flex_amd_pair_wmma(float *d0, float *d1, const flex_u32 *a,
                                    const flex_u32 *bf) {
    const flex_u32 bx[4] = {bf[0], bf[2], bf[1], bf[3]}; /* the rows of Bᵀ as A's */
    flex_u32 aw[8], bw[8];
    flex_amd_operand_wmma(aw, a);
    flex_amd_operand_wmma(bw, bx);
    float dw[8];
    flex_amd_wmma16(aw, bw, dw);
    flex_amd_result_wmma(d0, d1, dw);
}
#endif /* FLEX_AMD_HAVE_WMMA */

#endif /* FLEX_AMD_LANES_H */
