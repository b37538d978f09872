/*
 * The lane permutations behind the HIP backend's matrix-instruction
 * products (backends/hip/flex_amd_lanes.h), run on the host. No AMD GPU is
 * needed, or available: every lane of a wavefront is a thread running that
 * file's own text, the cross-lane read (ds_bpermute) and the matrix
 * instructions are emulated here from AMD's documented register layouts,
 * and the operands are laid out as mma.sync's m16n8k16 fragments per the
 * PTX ISA. The pair product must then equal C + A B exactly (small
 * integers, so every sum is exact in fp32):
 *   - MFMA (CDNA, wave64): v_mfma_f32_16x16x16{f16,bf16}. Lane L holds row
 *     (A) or column (B) L % 16 and k = 4 (L / 16) .. + 3, element i in half
 *     i % 2 of word i / 2; the result's d[i] in lane L is row 4 (L / 16) + i,
 *     column L % 16 (AMD's matrix-core lab notes, mfma_fp32_16x16x16fp16,
 *     and the matrix instruction calculator). Two kernel warps share the
 *     wave, each with its own matrices.
 *   - WMMA (RDNA3, wave32): v_wmma_f32_16x16x16_{f16,bf16}. Lane L holds
 *     row (A) or column (B) L % 16 and all 16 k, element k in half k % 2 of
 *     word k / 2, lanes 16-31 repeating lanes 0-15 (checked); d[v] in lane L
 *     is row 2 v + L / 16, column L % 16 (the calculator, and AMD's WMMA
 *     guide for RDNA 3).
 * What this cannot show: that the hardware behaves as documented, and that
 * the compiler's vector types put element 0 in the low half of the first
 * register (flex_mma_hip.cuh relies on both). A layout perturbed in the
 * emulator must make the check fail, which shows the check can fail.
 */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef unsigned int flex_u32;

/* ---- an emulated wavefront: one thread per lane ---- */

typedef struct wave {
    int lanes; /* 64 (CDNA) or 32 (RDNA3) */
    int bf16;  /* operands are bf16 (else f16) */
    int perturb; /* emulate a wrong MFMA layout (k groups of A reversed) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int waiting;
    unsigned long generation;
    flex_u32 words[64];
    float floats[64];
    flex_u32 opa[64][8], opb[64][8];
    int unreplicated; /* WMMA operands whose lanes 16-31 differ from 0-15 */
} wave;

static _Thread_local wave *cur;
static _Thread_local int cur_lane;

/* All lanes of the wave arrive before any goes on. */
static void wave_sync(wave *w) {
    pthread_mutex_lock(&w->lock);
    const unsigned long gen = w->generation;
    if (++w->waiting == w->lanes) {
        w->waiting = 0;
        w->generation++;
        pthread_cond_broadcast(&w->cond);
    } else {
        while (gen == w->generation)
            pthread_cond_wait(&w->cond, &w->lock);
    }
    pthread_mutex_unlock(&w->lock);
}

static int flex_amd_lane(void) {
    return cur_lane;
}
/* ds_bpermute: the address's bits above the byte offset, modulo the wave. */
static flex_u32 flex_amd_read(flex_u32 x, int src) {
    wave *w = cur;
    w->words[cur_lane] = x;
    wave_sync(w);
    const flex_u32 r = w->words[src & (w->lanes - 1)];
    wave_sync(w);
    return r;
}
static float flex_amd_readf(float x, int src) {
    wave *w = cur;
    w->floats[cur_lane] = x;
    wave_sync(w);
    const float r = w->floats[src & (w->lanes - 1)];
    wave_sync(w);
    return r;
}

static float half_to_float(unsigned h) {
    const unsigned sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
    float v;
    if (exp == 0)
        v = (float)mant / 1024.0f / 16384.0f;
    else if (exp == 31)
        v = mant ? NAN : INFINITY;
    else
        v = (1.0f + (float)mant / 1024.0f) * (float)(1u << exp) / 32768.0f;
    return sign ? -v : v;
}

/* Element i (0: the low half) of a word as the instruction reads it. */
static float elem(const wave *w, flex_u32 word, int i) {
    const unsigned bits = i ? word >> 16 : word & 0xffffu;
    if (!w->bf16) return half_to_float(bits);
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* v_mfma_f32_16x16x16: a[0..1], b[0..1] per lane, d[0..3] = A B with C = 0. */
static void flex_amd_mfma16(const flex_u32 *a, const flex_u32 *b, float *d) {
    wave *w = cur;
    const int lane = cur_lane;
    memcpy(w->opa[lane], a, 2 * sizeof *a);
    memcpy(w->opb[lane], b, 2 * sizeof *b);
    wave_sync(w);
    for (int i = 0; i < 4; i++) {
        const int row = 4 * (lane >> 4) + i, col = lane & 15;
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) {
            const int ga = w->perturb ? 3 - (k >> 2) : k >> 2, j = k & 3;
            sum += elem(w, w->opa[row + 16 * ga][j >> 1], j & 1) *
                   elem(w, w->opb[col + 16 * (k >> 2)][j >> 1], j & 1);
        }
        d[i] = sum;
    }
    wave_sync(w);
}

/* v_wmma_f32_16x16x16 (wave32): a[0..7], b[0..7] per lane, d[0..7] = A B. */
static void flex_amd_wmma16(const flex_u32 *a, const flex_u32 *b, float *d) {
    wave *w = cur;
    const int lane = cur_lane;
    memcpy(w->opa[lane], a, 8 * sizeof *a);
    memcpy(w->opb[lane], b, 8 * sizeof *b);
    wave_sync(w);
    if (lane < 16 && (memcmp(w->opa[lane], w->opa[lane + 16], 8 * sizeof *a) != 0 ||
                      memcmp(w->opb[lane], w->opb[lane + 16], 8 * sizeof *b) != 0)) {
        pthread_mutex_lock(&w->lock);
        w->unreplicated++;
        pthread_mutex_unlock(&w->lock);
    }
    for (int v = 0; v < 8; v++) {
        const int row = 2 * v + (lane >> 4), col = lane & 15;
        float sum = 0.0f;
        for (int k = 0; k < 16; k++)
            sum += elem(w, w->opa[row][k >> 1], k & 1) * elem(w, w->opb[col][k >> 1], k & 1);
        d[v] = sum;
    }
    wave_sync(w);
}

/* The device file's text, compiled here as C. */
#define FLEX_AMD_FN static inline
#define FLEX_AMD_UNROLL
#define FLEX_AMD_HAVE_MFMA 1
#define FLEX_AMD_HAVE_WMMA 1
#include "../backends/hip/flex_amd_lanes.h"

/* ---- the check ---- */

/* One warp's problem: d = c + a b, a 16 x 16 (m x k), b 16 x 16 (k x n). */
typedef struct problem {
    float a[16][16], b[16][16], c[16][16];
} problem;

typedef struct lane_job {
    wave *w;
    int lane, wmma;
    flex_u32 a[4], bf[4];
    float d0[4], d1[4];
} lane_job;

static unsigned rng_state;
static int small_int(void) {
    rng_state = rng_state * 1103515245u + 12345u;
    return (int)((rng_state >> 16) % 15) - 7; /* -7 .. 7: exact in f16 and bf16 */
}

/* The bits of x (a small integer) as f16 or bf16. */
static unsigned elem_bits(float x, int bf16) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if (bf16) return u >> 16;
    if (x == 0.0f) return (u >> 16) & 0x8000u;
    const unsigned exp = ((u >> 23) & 255u) - 127u + 15u;
    return ((u >> 16) & 0x8000u) | (exp << 10) | ((u >> 13) & 1023u);
}
static flex_u32 pack(float lo, float hi, int bf16) {
    return elem_bits(lo, bf16) | (elem_bits(hi, bf16) << 16);
}

static void *lane_main(void *arg) {
    lane_job *j = arg;
    cur = j->w;
    cur_lane = j->lane;
    if (j->wmma)
        flex_amd_pair_wmma(j->d0, j->d1, j->a, j->bf);
    else
        flex_amd_pair_mfma(j->d0, j->d1, j->a, j->bf);
    return NULL;
}

/* Runs the pair product on a wave of random problems (one per warp);
 * returns the number of accumulator values that differ from c + a b. */
static int run_pair(int wmma, int bf16, int perturb, unsigned seed, int *unreplicated) {
    wave w;
    memset(&w, 0, sizeof w);
    w.lanes = wmma ? 32 : 64;
    w.bf16 = bf16;
    w.perturb = perturb;
    pthread_mutex_init(&w.lock, NULL);
    pthread_cond_init(&w.cond, NULL);
    rng_state = seed;
    problem pr[2];
    const int warps = w.lanes / 32;
    for (int p = 0; p < warps; p++)
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 16; j++) {
                pr[p].a[i][j] = (float)small_int();
                pr[p].b[i][j] = (float)small_int();
                pr[p].c[i][j] = (float)small_int();
            }
    lane_job jobs[64];
    pthread_t threads[64];
    for (int lane = 0; lane < w.lanes; lane++) {
        lane_job *j = &jobs[lane];
        const problem *p = &pr[lane >> 5];
        const int g = (lane & 31) >> 2, t = lane & 3;
        j->w = &w;
        j->lane = lane;
        j->wmma = wmma;
        /* mma.sync m16n8k16 (PTX ISA): A register i holds row g + 8 (i % 2),
         * columns 2 t + 8 (i / 2) and the next; B register i of n-tile n
         * holds column g of that tile, rows 2 t + 8 i and the next; the
         * accumulator's d[r] is row g + 8 (r / 2), column 2 t + r % 2. */
        for (int i = 0; i < 4; i++) {
            const int row = g + 8 * (i & 1), k = 2 * t + 8 * (i >> 1);
            j->a[i] = pack(p->a[row][k], p->a[row][k + 1], bf16);
        }
        for (int n = 0; n < 2; n++)
            for (int i = 0; i < 2; i++) {
                const int col = 8 * n + g, k = 2 * t + 8 * i;
                j->bf[2 * n + i] = pack(p->b[k][col], p->b[k + 1][col], bf16);
            }
        for (int r = 0; r < 4; r++) {
            const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
            j->d0[r] = p->c[row][col];
            j->d1[r] = p->c[row][col + 8];
        }
    }
    for (int lane = 0; lane < w.lanes; lane++)
        ck_assert_int_eq(pthread_create(&threads[lane], NULL, lane_main, &jobs[lane]), 0);
    for (int lane = 0; lane < w.lanes; lane++)
        pthread_join(threads[lane], NULL);
    int wrong = 0;
    for (int lane = 0; lane < w.lanes; lane++) {
        const lane_job *j = &jobs[lane];
        const problem *p = &pr[lane >> 5];
        const int g = (lane & 31) >> 2, t = lane & 3;
        for (int r = 0; r < 8; r++) {
            const int row = g + 8 * ((r & 3) >> 1), col = 2 * t + (r & 1) + 8 * (r >> 2);
            float want = p->c[row][col];
            for (int k = 0; k < 16; k++)
                want += p->a[row][k] * p->b[k][col];
            const float got = r < 4 ? j->d0[r] : j->d1[r - 4];
            if (got != want) {
                if (!perturb && wrong < 8)
                    fprintf(stderr, "%s %s lane %d: d%d[%d] = %g, want %g\n",
                            wmma ? "WMMA" : "MFMA", bf16 ? "bf16" : "f16", lane, r >> 2, r & 3,
                            (double)got, (double)want);
                wrong++;
            }
        }
    }
    *unreplicated = w.unreplicated;
    pthread_mutex_destroy(&w.lock);
    pthread_cond_destroy(&w.cond);
    return wrong;
}

START_TEST(test_mfma_pair) {
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (unsigned seed = 1; seed <= 4; seed++) {
            int unrep = 0;
            ck_assert_int_eq(run_pair(0, bf16, 0, seed, &unrep), 0);
        }
}
END_TEST

START_TEST(test_wmma_pair) {
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (unsigned seed = 1; seed <= 4; seed++) {
            int unrep = -1;
            ck_assert_int_eq(run_pair(1, bf16, 0, seed, &unrep), 0);
            ck_assert_msg(unrep == 0, "WMMA operands must repeat lanes 0-15 in 16-31");
        }
}
END_TEST

/* The check is not vacuous: an emulated MFMA that reads A's k groups in the
 * wrong lanes gives wrong products. */
START_TEST(test_wrong_layout_is_caught) {
    int unrep = 0;
    ck_assert_int_gt(run_pair(0, 0, 1, 7, &unrep), 0);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("hip_lanes");
    TCase *tc = tcase_create("pair");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_mfma_pair);
    tcase_add_test(tc, test_wmma_pair);
    tcase_add_test(tc, test_wrong_layout_is_caught);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}
