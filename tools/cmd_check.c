/*
 * `flexattn check`: the backend-vs-oracle suite on every usable backend.
 *
 * The case list is representative rather than exhaustive: every preset at
 * f32, f16 and bf16, then one axis at a time (odd lengths, Q_LEN != KV_LEN,
 * GQA, head dims, Dv != D, a BSHD layout, no LSE). Inputs live in the
 * backend's memory (flex_malloc / flex_copy_*), so GPU backends are tested
 * the same way as the CPU. Each case prints one line; the last line is
 * "N passed, N failed, N skipped", and the exit status is 1 when any case
 * failed. A case passes when outputs, LSE and gradients meet the tolerance rule of
 * tests/tolerance.h (docs/testing.md) against the fp64 oracle, whose mods
 * are evaluated from their text by an evaluator independent of the
 * library's (tests/refmod.c).
 *
 * A case is an `op` over a shape; the forward op is check_forward(). Other
 * ops (backward) add a function of the same form and an entry in the op
 * switch of run_case().
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_args.h"
#include "cli_backward.h"
#include "check_decode.h"
#include "internal.h"
#include "oracle.h"
#include "tolerance.h"

static void usage(FILE *f) {
    fprintf(f, "usage: flexattn check [--backend SPEC] [--quick] [--deterministic]\n"
               "\n"
               "Compares every usable backend (or the one SPEC names: cpu, cuda, cuda:1, ...)\n"
               "with the fp64 oracle on every preset, dtype and a set of shapes (odd lengths,\n"
               "Q_LEN != KV_LEN, GQA, head dims, Dv != D, strides, LSE), and the backward\n"
               "(dq, dk, dv against the fp64 backward oracle; skipped on a backend without\n"
               "one) on a set of masks, score mods and shapes, and decode steps (a few\n"
               "queries at run-time offsets against per-batch kv lengths of a cache,\n"
               "contiguous or in shuffled pages; skipped where a backend refuses them).\n"
               "One line per case;\n"
               "the last line counts passes and failures. Exit status 1 on any failure, and\n"
               "when the backend SPEC names cannot run here.\n"
               "\n"
               "  --quick          fewer and smaller cases\n"
               "  --deterministic  the backward cases in the backward's deterministic mode\n"
               "                   (opts->deterministic)\n");
}

enum { OP_FORWARD = 0, OP_BACKWARD = 1, OP_DECODE = 2 };
enum { LAYOUT_BHSD = 0, LAYOUT_BSHD = 1 };

typedef struct check_case {
    char name[96];
    int op;
    const char *score; /* preset or NULL */
    const char *mask;  /* preset or NULL */
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    flex_dtype dtype;
    int layout;
    int lse;
    int block; /* the block mask's q and kv block (0: 64) */
    /* Mod text instead of a preset (NULL: none); no params, no buffers. */
    const char *score_text, *mask_text;
    int per_head;       /* block mask built per (b, h), not broadcast */
    double input_scale; /* q and k multiplied by it (0: 1) */
    int nan_q;          /* q[0, last head, 5, 3] is NaN */
    /* OP_DECODE: Lq and Lkv above are the cache's length (the mods' and the
     * block mask's); decode.lq query rows end at each batch's kv length. */
    struct {
        int lq, page_size, kv_splits;
        int call_builds_mask; /* opts->mask_mod instead of the block mask */
        int args_on_device;   /* offsets, lengths and page table on the device */
    } decode;
    int deterministic; /* OP_BACKWARD: opts->deterministic (--deterministic) */
    int kv_block;      /* the block mask's kv block where it is not `block` (0: the same) */
} check_case;

typedef struct case_list {
    check_case *v;
    int n, cap;
} case_list;

static void add_case(case_list *l, const check_case *c) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        check_case *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) return;
        l->v = v, l->cap = cap;
    }
    l->v[l->n++] = *c;
}

static const char *short_dtype(flex_dtype dt) {
    return flex_dtype_name(dt);
}

/* Cases at the edges of the numerics and of the mask machinery: per-(b, h)
 * masks (also Python's % on negative operands), logits near +-30, fully
 * masked rows (by the mask and by a score mod returning -inf), and NaN
 * propagation (a NaN in q, a score mod giving NaN or +inf for one score:
 * PyTorch makes that row's output and LSE NaN). */
static void build_numeric_cases(case_list *l, int quick) {
    static const flex_dtype dts[] = {FLEX_F32, FLEX_F16, FLEX_BF16};
    struct numeric {
        const char *what, *score_text, *mask_text;
        int B, Hq, Hkv, L, per_head, backward, quick;
        double input_scale;
        int nan_q;
    } cases[] = {
        {"per-(b,h) mask", NULL, "q - kv >= 24 * (h - 2 * b) && (q - kv + 3 * h) % 5 != 1", 2, 4, 2,
         150, 1, 1, 1, 0, 0},
        {"logits near 30", NULL, NULL, 1, 2, 2, 130, 0, 1, 1, 3.2, 0},
        {"logits near 30 causal", NULL, "q >= kv", 1, 2, 2, 130, 0, 1, 0, 3.2, 0},
        {"fully masked rows", NULL, "q % 7 != 3 && kv <= q && q >= 20", 1, 2, 2, 140, 0, 1, 1, 0.0,
         0},
        {"score mod -inf causal", "where(q >= kv, score, -inf)", NULL, 1, 2, 2, 100, 0, 1, 1, 0.0,
         0},
        {"score mod -inf rows", "where(q % 5 != 0 && kv <= q, score, -inf)", NULL, 1, 2, 2, 100, 0,
         1, 0, 0.0, 0},
        {"nan in q", NULL, NULL, 1, 2, 2, 90, 0, 0, 1, 0.0, 1},
        {"nan in q causal", NULL, "q >= kv", 1, 2, 2, 90, 0, 0, 0, 0.0, 1},
        {"score mod nan", "where(q == 7 && kv == 3, sqrt(-1.0 - score * score), score)", NULL, 1, 2,
         2, 90, 0, 0, 1, 0.0, 0},
        {"score mod +inf", "where(q == 9 && kv == 2, inf, score)", NULL, 1, 2, 2, 90, 0, 0, 0, 0.0,
         0},
        /* min and max: -0 below +0 whichever operand holds it (1 / x tells
         * the zeros apart), a NaN kept by max, int()'s truncation */
        {"min max zeros",
         "score + where(1.0 / min(score * 0.0, -(score * 0.0)) < 0.0, 0.75, 0.0) + "
         "where(1.0 / max(-(score * 0.0), score * 0.0) > 0.0, -0.5, 0.0) + "
         "0.25 * clamp(score, -0.4, 0.3) + 0.1 * float(int(score * 7.0))",
         NULL, 1, 2, 2, 90, 0, 1, 0, 0.0, 0},
        {"max nan", "where(q == 7 && kv == 3, max(sqrt(-1.0 - score * score), score), "
         "min(score, 2.0))", NULL, 1, 2, 2, 90, 0, 0, 0, 0.0, 0},
        /* floor division and remainder of ints proved >= 0, by constants
         * and by an index (unsigned on the GPU), beside signed ones */
        {"unsigned division", "score + 0.25 * float(abs(kv - q) % 3 + kv // 7 - q % 4) - "
         "0.5 * float(where(abs(kv - q) % 2 == 0, q // (kv % 5 + 1), (q - kv) % 6))",
         NULL, 1, 2, 2, 110, 0, 1, 0, 0.0, 0},
        /* a relative-position bias of kv - q alone (core/mod/diagonal.h's
         * tables) beside an int of the same diagonal, each query seeing up to 40
         * keys past its own */
        {"relative log bias",
         "score + 0.5 * log(1.0 + float(abs(kv - q))) * "
         "where(kv > q, 1.0, -0.5) + float(where(kv > q, (q - kv) % 3, 1))",
         "q + 40 >= kv", 1, 2, 2, 170, 0, 1, 1, 0.0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct numeric *n = &cases[i];
        if (quick && !n->quick) continue;
        for (int op = 0; op < (n->backward ? 2 : 1); op++)
            for (int d = 0; d < (quick ? 1 : 3); d++) {
                check_case c = {"", op ? OP_BACKWARD : OP_FORWARD, NULL, NULL, n->B, n->Hq, n->Hkv,
                                n->L, n->L, 64, 64, dts[d], LAYOUT_BHSD, 1, 0, n->score_text,
                                n->mask_text, n->per_head, n->input_scale, n->nan_q, {0}, 0, 0};
                snprintf(c.name, sizeof c.name, "%s%s %s", op ? "backward " : "", n->what,
                         short_dtype(dts[d]));
                add_case(l, &c);
            }
    }
}

/* Decode: B=2 batches whose kv lengths (313 and 220 of a 320-key cache)
 * are not multiples of the page sizes; GQA, pages, splits. */
static void build_decode_cases(case_list *l, int quick) {
    static const flex_dtype dts[] = {FLEX_F32, FLEX_F16, FLEX_BF16};
    struct decode_shape {
        const char *what, *score, *mask;
        int Hq, Hkv, Lq, page_size, kv_splits, call_builds_mask, quick, on_device;
    } shapes[] = {
        {"decode q1 causal gqa 4:1", NULL, "causal", 8, 2, 1, 0, 0, 0, 1, 0},
        {"decode q4 sliding_window gqa 8:1 pages 16", NULL, "sliding_window", 8, 1, 4, 16, 0, 1,
         1, 0},
        {"decode q1 alibi causal pages 64 splits 3", "alibi", "causal", 4, 2, 1, 64, 3, 1, 0, 0},
        {"decode q4 softcap pages 64", "softcap", NULL, 4, 4, 4, 64, 0, 0, 0, 0},
        {"decode q4 document_causal splits 2", NULL, "document_causal", 8, 2, 4, 0, 2, 0, 0, 0},
        {"decode q16 alibi sliding_window gqa 8:1 pages 16 args on device", "alibi",
         "sliding_window", 8, 1, 16, 16, 0, 0, 0, 1},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const struct decode_shape *s = &shapes[i];
        if (quick && !s->quick) continue;
        for (int d = 0; d < (quick ? 1 : 3); d++) {
            check_case c = {.op = OP_DECODE,
                            .score = s->score,
                            .mask = s->mask,
                            .B = 2,
                            .Hq = s->Hq,
                            .Hkv = s->Hkv,
                            .Lq = 320,
                            .Lkv = 320,
                            .D = 64,
                            .Dv = 64,
                            .dtype = dts[d],
                            .lse = 1,
                            .decode = {s->Lq, s->page_size, s->kv_splits, s->call_builds_mask,
                                       s->on_device}};
            snprintf(c.name, sizeof c.name, "%s %s", s->what, short_dtype(dts[d]));
            add_case(l, &c);
        }
    }
}

static void build_cases(case_list *l, int quick) {
    static const flex_dtype dts[] = {FLEX_F32, FLEX_F16, FLEX_BF16};
    int L = quick ? 100 : 200;
    for (int p = 0; p < flex_preset_count(); p++) {
        const flex_preset *pr = flex_preset_at(p);
        for (int d = 0; d < 3; d++) {
            check_case c = {"",   OP_FORWARD, NULL, NULL, 1,    4, 4, L, L, 64,
                            64,   dts[d],     0,    1,    0,    NULL, NULL, 0, 0.0, 0, {0}, 0, 0};
            if (pr->kind == FLEX_MOD_MASK)
                c.mask = pr->name;
            else
                c.score = pr->name;
            snprintf(c.name, sizeof c.name, "%s %s", pr->name, short_dtype(dts[d]));
            add_case(l, &c);
        }
    }
    struct shape {
        const char *what, *score, *mask;
        int B, Hq, Hkv, Lq, Lkv, D, Dv, layout, lse, quick;
        int block; /* the block mask's blocks (0: 64) */
    } shapes[] = {
        {"len 1", NULL, NULL, 1, 2, 2, 1, 1, 64, 64, 0, 1, 1, 0},
        {"len 17 causal", NULL, "causal", 1, 2, 2, 17, 17, 64, 64, 0, 1, 1, 0},
        {"len 257 causal", NULL, "causal", 1, 2, 2, 257, 257, 64, 64, 0, 1, 0, 0},
        {"q 1 kv 300 alibi", "alibi", NULL, 1, 4, 4, 1, 300, 64, 64, 0, 1, 1, 0},
        {"q 100 kv 257 prefix_lm", NULL, "prefix_lm", 1, 2, 2, 100, 257, 64, 64, 0, 1, 0, 0},
        {"q 257 kv 100 causal", NULL, "causal", 1, 2, 2, 257, 100, 64, 64, 0, 1, 0, 0},
        {"gqa 4:1 causal", NULL, "causal", 1, 8, 2, 128, 128, 64, 64, 0, 1, 1, 0},
        {"gqa 8:1 softcap", "softcap", NULL, 2, 8, 1, 100, 100, 64, 64, 0, 1, 0, 0},
        {"D 16", NULL, "causal", 1, 2, 2, 100, 100, 16, 16, 0, 1, 0, 0},
        {"D 80", "alibi", NULL, 1, 2, 2, 100, 100, 80, 80, 0, 1, 0, 0},
        {"D 128", NULL, "document_causal", 1, 2, 2, 150, 150, 128, 128, 0, 1, 1, 0},
        {"D 256", NULL, "causal", 1, 2, 2, 100, 100, 256, 256, 0, 1, 0, 0},
        {"D 64 Dv 32", NULL, "causal", 1, 2, 2, 100, 100, 64, 32, 0, 1, 1, 0},
        {"D 128 Dv 64", "checkerboard", NULL, 1, 2, 2, 90, 110, 128, 64, 0, 1, 0, 0},
        {"bshd layout", "alibi", "causal", 2, 4, 2, 100, 100, 64, 64, LAYOUT_BSHD, 1, 1, 0},
        {"no lse", NULL, "sliding_window", 1, 2, 2, 100, 100, 64, 64, 0, 0, 1, 0},
        /* Masks in blocks of 128: the Hopper kernels take only these (blocks
         * of 64 go to the mma.sync kernel), here with several query tiles per
         * head, partial blocks inside the sequences and, for the window over
         * the shorter keys, query tiles without any key. */
        {"blocks 128 causal", NULL, "causal", 1, 4, 4, 520, 520, 128, 128, 0, 1, 0, 128},
        {"blocks 128 document_causal", NULL, "document_causal", 1, 4, 2, 520, 520, 128, 128, 0, 1,
         0, 128},
        {"blocks 128 sliding_window", NULL, "sliding_window", 1, 4, 4, 520, 520, 64, 64, 0, 1, 0,
         128},
        {"blocks 128 prefix_lm", NULL, "prefix_lm", 2, 2, 2, 300, 400, 128, 128, 0, 1, 0, 128},
        {"blocks 128 alibi causal", "alibi", "causal", 1, 4, 4, 400, 400, 128, 128, 0, 1, 0, 128},
        {"blocks 128 window q 700 kv 300", NULL, "sliding_window", 1, 4, 4, 700, 300, 128, 128, 0,
         1, 0, 128},
        /* Head dims over 128 on Hopper: 64-key steps, one Q tile in flight
         * at 256/256; and 64-key steps at head dim 128 where the kv blocks
         * are 64. */
        {"blocks 128 D 256 alibi causal", "alibi", "causal", 1, 4, 4, 400, 530, 256, 256, 0, 1, 0,
         128},
        {"blocks 128 D 192 Dv 256 gqa window", NULL, "sliding_window", 1, 4, 2, 300, 300, 192, 256,
         0, 1, 0, 128},
        {"blocks 128 D 256 Dv 64 softcap", "softcap", NULL, 2, 2, 2, 260, 260, 256, 64, 0, 1, 0,
         128},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const struct shape *s = &shapes[i];
        if (quick && !s->quick) continue;
        for (int d = 0; d < (quick ? 1 : 3); d++) {
            check_case c = {"",    OP_FORWARD, s->score,  s->mask, s->B,
                            s->Hq, s->Hkv,     s->Lq,     s->Lkv,  s->D,
                            s->Dv, dts[d],     s->layout, s->lse,  s->block,
                            NULL,  NULL,       0,         0.0,     0, {0}, 0, 0};
            snprintf(c.name, sizeof c.name, "%s %s", s->what, short_dtype(dts[d]));
            add_case(l, &c);
        }
    }
    /* Query blocks of 128 over kv blocks of 64: the Hopper kernel's 64-key
     * steps at head dim 128. */
    for (int d = 0; d < (quick ? 0 : 3); d++) {
        check_case c = {"",  OP_FORWARD, NULL, "causal", 1,    4,   4, 400, 400, 128, 128, dts[d],
                        0,   1,          128,  NULL,     NULL, 0, 0.0, 0,   {0}, 0,   64};
        snprintf(c.name, sizeof c.name, "blocks 128x64 causal %s", short_dtype(dts[d]));
        add_case(l, &c);
    }
    /* Backward: dq, dk, dv against the fp64 backward oracle. */
    struct bw_shape {
        const char *what, *score, *mask;
        int B, Hq, Hkv, Lq, Lkv, D, Dv, layout, quick;
    } bw[] = {
        {"noop", NULL, NULL, 1, 2, 2, 70, 70, 32, 32, 0, 1},
        {"causal", NULL, "causal", 1, 2, 2, 100, 100, 64, 64, 0, 1},
        {"document_causal", NULL, "document_causal", 1, 2, 2, 100, 100, 32, 32, 0, 0},
        {"sliding_window", NULL, "sliding_window", 1, 2, 2, 100, 100, 32, 32, 0, 0},
        {"alibi causal", "alibi", "causal", 1, 4, 4, 80, 80, 32, 32, 0, 1},
        {"softcap", "softcap", NULL, 1, 2, 2, 80, 80, 32, 32, 0, 0},
        {"checkerboard", "checkerboard", NULL, 1, 2, 2, 60, 90, 32, 32, 0, 0},
        {"gqa 4:1 causal", NULL, "causal", 1, 8, 2, 64, 64, 32, 32, 0, 1},
        {"q 37 kv 91 D 48 Dv 24", NULL, "prefix_lm", 1, 2, 1, 37, 91, 48, 24, 0, 0},
        {"bshd softcap causal", "softcap", "causal", 2, 4, 2, 64, 64, 32, 32, LAYOUT_BSHD, 0},
    };
    for (size_t i = 0; i < sizeof bw / sizeof bw[0]; i++) {
        const struct bw_shape *s = &bw[i];
        if (quick && !s->quick) continue;
        for (int d = 0; d < (quick ? 1 : 3); d++) {
            check_case c = {"",     OP_BACKWARD, s->score, s->mask, s->B,      s->Hq, s->Hkv, s->Lq,
                            s->Lkv, s->D,        s->Dv,    dts[d],  s->layout, 1,     0,
                            NULL,   NULL,        0,        0.0,     0, {0}, 0, 0};
            snprintf(c.name, sizeof c.name, "backward %s %s", s->what, short_dtype(dts[d]));
            add_case(l, &c);
        }
    }
    build_numeric_cases(l, quick);
    build_decode_cases(l, quick);
}

/* Param values that make each preset's pattern visible at these sizes. */
static int small_params(const char *name, int heads, flex_param *p) {
    if (!strcmp(name, "sliding_window") || !strcmp(name, "sliding_window_bidirectional"))
        return p[0] = (flex_param){"W", 0, 40}, 1;
    if (!strcmp(name, "prefix_lm")) return p[0] = (flex_param){"P", 0, 50}, 1;
    if (!strcmp(name, "sasa"))
        return p[0] = (flex_param){"IW", 0, 16}, p[1] = (flex_param){"WIN", 0, 3}, 2;
    if (!strcmp(name, "natten"))
        return p[0] = (flex_param){"IH", 0, 16}, p[1] = (flex_param){"IW", 0, 16},
               p[2] = (flex_param){"KH", 0, 5}, p[3] = (flex_param){"KW", 0, 5}, 4;
    if (!strcmp(name, "alibi_functional")) return p[0] = (flex_param){"NH", 0, heads}, 1;
    if (!strcmp(name, "softcap") || !strcmp(name, "softcap_approx"))
        return p[0] = (flex_param){"C", 1, 2.0}, 1;
    return 0;
}

/* ---- one case on one backend ---- */

static uint64_t rng_state;

static float rand_normalish(void) {
    double s = 0.0;
    for (int i = 0; i < 4; i++) {
        rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
        s += (double)(rng_state >> 11) / 9007199254740992.0;
    }
    return (float)((s - 2.0) * 1.7);
}

typedef struct case_data {
    flex_context *ctx;
    flex_mod *score, *mask_mod;
    flex_block_mask *mask;
    cli_buffers bufs;
    void *host[5]; /* q, k, v, out, lse */
    void *dev[5];
    flex_tensor host_t[5], dev_t[5];
    size_t bytes[5];
} case_data;

static flex_tensor layout_view(void *data, flex_dtype dt, int layout, int64_t B, int64_t H,
                               int64_t S, int64_t D, flex_device_type dev) {
    return layout == LAYOUT_BSHD ? flex_tensor_bshd(data, dt, B, H, S, D, dev)
                                 : flex_tensor_bhsd(data, dt, B, H, S, D, dev);
}

static int compile_mods(case_data *cd, const check_case *c, char *why, size_t cap) {
    const char *names[2] = {c->score, c->mask};
    flex_mod **dst[2] = {&cd->score, &cd->mask_mod};
    cli_buffer_spec spec = {c->Lq, c->Lkv, c->Hq, 4, NULL, 0, NULL, 0, NULL};
    const char *texts[2] = {c->score_text, c->mask_text};
    for (int i = 0; i < 2; i++) {
        if (texts[i]) {
            flex_mod_desc desc = {i ? FLEX_MOD_MASK : FLEX_MOD_SCORE, texts[i], NULL, 0, NULL, 0};
            if (flex_mod_compile(cd->ctx, &desc, dst[i]) != FLEX_OK) {
                snprintf(why, cap, "%s: %s", texts[i], flex_error_message(cd->ctx));
                return -1;
            }
            continue;
        }
        if (!names[i]) continue;
        flex_param ps[4];
        int n = small_params(names[i], c->Hq, ps);
        if (flex_preset_compile(cd->ctx, names[i], ps, n, dst[i]) != FLEX_OK ||
            cli_bind_generated_buffers(cd->ctx, *dst[i], &spec, &cd->bufs) != 0) {
            snprintf(why, cap, "%s: %s", names[i], flex_error_message(cd->ctx));
            return -1;
        }
    }
    const int block = c->block ? c->block : 64, kv_block = c->kv_block ? c->kv_block : block;
    int mask_b = c->per_head ? c->B : 1, mask_h = c->per_head ? c->Hq : 1;
    if (cd->mask_mod && flex_block_mask_create(cd->ctx, cd->mask_mod, mask_b, mask_h, c->Lq,
                                               c->Lkv, block, kv_block, &cd->mask) != FLEX_OK) {
        snprintf(why, cap, "block mask: %s", flex_error_message(cd->ctx));
        return -1;
    }
    return 0;
}

static int make_tensors(case_data *cd, const check_case *c, char *why, size_t cap) {
    int64_t dims[5][4] = {{c->B, c->Hq, c->Lq, c->D},
                          {c->B, c->Hkv, c->Lkv, c->D},
                          {c->B, c->Hkv, c->Lkv, c->Dv},
                          {c->B, c->Hq, c->Lq, c->Dv},
                          {c->B, c->Hq, c->Lq, 1}};
    flex_device_type dev = cd->ctx->backend->device_type;
    rng_state = 0x9e3779b97f4a7c15ull + (uint64_t)c->Lq * 31 + (uint64_t)c->D;
    for (int i = 0; i < 5; i++) {
        flex_dtype dt = i == 4 ? FLEX_F32 : c->dtype;
        size_t n = (size_t)(dims[i][0] * dims[i][1] * dims[i][2] * dims[i][3]);
        cd->bytes[i] = n * flex_dtype_size(dt);
        cd->host[i] = malloc(cd->bytes[i] + 1);
        if (!cd->host[i]) return snprintf(why, cap, "out of host memory"), -1;
        if (i < 3) {
            float gain = i < 2 && c->input_scale != 0.0 ? (float)c->input_scale : 1.0f;
            for (size_t e = 0; e < n; e++) {
                float v = rand_normalish() * gain;
                flex_store_from_float(cd->host[i], dt, (int64_t)e, v);
            }
        } else {
            memset(cd->host[i], 0xff, cd->bytes[i]); /* NaN poison */
        }
        int layout = i == 4 ? LAYOUT_BHSD : c->layout;
        cd->host_t[i] = layout_view(cd->host[i], dt, layout, dims[i][0], dims[i][1], dims[i][2],
                                    dims[i][3], FLEX_DEVICE_CPU);
        if (i == 0 && c->nan_q) {
            const flex_tensor *t = &cd->host_t[0];
            int64_t row = c->Lq > 5 ? 5 : c->Lq - 1, col = c->D > 3 ? 3 : 0;
            flex_store_from_float(cd->host[0], dt,
                                  (c->Hq - 1) * t->strides[1] + row * t->strides[2] +
                                      col * t->strides[3],
                                  NAN);
        }
        if (flex_malloc(cd->ctx, cd->bytes[i] + 1, &cd->dev[i]) != FLEX_OK ||
            flex_copy_to_device(cd->ctx, cd->dev[i], cd->host[i], cd->bytes[i]) != FLEX_OK)
            return snprintf(why, cap, "device memory: %s", flex_error_message(cd->ctx)), -1;
        cd->dev_t[i] = layout_view(cd->dev[i], dt, layout, dims[i][0], dims[i][1], dims[i][2],
                                   dims[i][3], dev);
        cd->dev_t[i].device_index = flex_context_device_index(cd->ctx);
    }
    return 0;
}

static void case_data_free(case_data *cd) {
    for (int i = 0; i < 5; i++) {
        if (cd->dev[i]) flex_free(cd->ctx, cd->dev[i]);
        free(cd->host[i]);
    }
    flex_block_mask_destroy(cd->mask);
    flex_mod_destroy(cd->mask_mod);
    flex_mod_destroy(cd->score);
    cli_buffers_free(&cd->bufs);
}

/* Runs the forward and compares with the oracle by the tolerance rule; *rel
 * and *lse_err are the parts of their bounds used (tol_margin). Returns 1
 * pass, 0 fail. */
static int check_forward(case_data *cd, const check_case *c, double *rel, double *lse_err,
                         char *why, size_t cap) {
    flex_status st = flex_attention(cd->ctx, &cd->dev_t[0], &cd->dev_t[1], &cd->dev_t[2], cd->score,
                                    cd->mask, NULL, &cd->dev_t[3], c->lse ? &cd->dev_t[4] : NULL);
    if (st == FLEX_OK) st = flex_synchronize(cd->ctx);
    if (st != FLEX_OK) return snprintf(why, cap, "%s", flex_error_message(cd->ctx)), 0;
    for (int i = 3; i < 5; i++)
        if (flex_copy_to_host(cd->ctx, cd->host[i], cd->dev[i], cd->bytes[i]) != FLEX_OK)
            return snprintf(why, cap, "%s", flex_error_message(cd->ctx)), 0;
    size_t rows = (size_t)c->B * c->Hq * c->Lq;
    double *ref = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *got = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *ref_lse = malloc(rows * sizeof(double)), *got_lse = malloc(rows * sizeof(double));
    double *naive = malloc(rows * (size_t)c->Dv * sizeof(double));
    double *naive_lse = malloc(rows * sizeof(double));
    int pass = 0;
    if (!ref || !got || !ref_lse || !got_lse || !naive || !naive_lse) {
        snprintf(why, cap, "out of host memory");
        goto done;
    }
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = cd->ctx;
    p.q = cd->host_t[0], p.k = cd->host_t[1], p.v = cd->host_t[2];
    p.score_mod = cd->score;
    p.mask_mod = cd->mask_mod;
    if (oracle_forward(&p, ref, ref_lse, why, cap) != 0) goto done;
    size_t n = 0;
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++)
            for (int i = 0; i < c->Lq; i++, n++) {
                for (int d = 0; d < c->Dv; d++)
                    got[n * c->Dv + d] = oracle_load(&cd->host_t[3], b, h, i, d);
                got_lse[n] = oracle_load(&cd->host_t[4], b, h, i, 0);
            }
    if (oracle_forward_naive(&p, naive, naive_lse, why, cap) != 0) goto done;
    double slack = 0.0;
    if (oracle_approx_score_error(&p, &slack, why, cap) != 0) goto done;
    double max_v = 0.0;
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hkv; h++)
            for (int j = 0; j < c->Lkv; j++)
                for (int d = 0; d < c->Dv; d++) {
                    double x = fabs(oracle_load(&cd->host_t[2], b, h, j, d));
                    if (x > max_v) max_v = x;
                }
    /* A score off by at most e moves each softmax weight's sum by at most
     * 2e and the LSE by at most e. */
    tol_report r;
    pass = tol_compare(c->dtype, TOL_OUTPUT, ref, naive, got, rows * (size_t)c->Dv,
                       2.0 * slack * max_v, &r);
    *rel = tol_margin(&r);
    if (!pass) snprintf(why, cap, "%s", r.why);
    if (c->lse) {
        int lse_pass = tol_compare(c->dtype, TOL_LSE, ref_lse, naive_lse, got_lse, rows, slack, &r);
        *lse_err = tol_margin(&r);
        if (pass && !lse_pass) snprintf(why, cap, "%s", r.why);
        pass = pass && lse_pass;
    } else if (!isnan(got_lse[0])) {
        pass = 0;
        snprintf(why, cap, "lse written although not asked for");
    }
done:
    free(ref);
    free(got);
    free(ref_lse);
    free(got_lse);
    free(naive);
    free(naive_lse);
    return pass;
}

/* Backward gradients against the fp64 backward oracle. Returns 1 pass, 0
 * fail, -1 when the backend has no backward pass (the case is skipped). */
static int check_backward(case_data *cd, const check_case *c, double *rel, char *why,
                          size_t cap) {
    cli_backward_problem p;
    memset(&p, 0, sizeof p);
    p.deterministic = c->deterministic;
    p.ctx = cd->ctx;
    p.q = cd->dev_t[0], p.k = cd->dev_t[1], p.v = cd->dev_t[2];
    p.host_q = cd->host_t[0], p.host_k = cd->host_t[1], p.host_v = cd->host_t[2];
    p.score_mod = cd->score;
    p.mask_mod = cd->mask_mod;
    p.mask = cd->mask;
    cli_backward_state st;
    int r = cli_backward_prepare(&st, &p, why, cap);
    if (r == 0)
        r = cli_backward_check(&st, rel, why, cap);
    else
        r = 0;
    cli_backward_free(&st);
    return r == -2 ? -1 : r < 0 ? 0 : r;
}

/* A decode step against the oracle (tools/check_decode.c). Returns 1 pass, 0
 * fail, -1 when the backend refuses decode arguments (skipped). */
static int check_decode(case_data *cd, const check_case *c, double *rel, double *lse_err,
                        char *why, size_t cap) {
    int32_t lengths[2] = {c->Lkv - 7, c->Lkv - 100}, offsets[2];
    for (int b = 0; b < 2; b++)
        offsets[b] = lengths[b] - c->decode.lq;
    check_decode_case dc = {.B = c->B,
                            .Hq = c->Hq,
                            .Hkv = c->Hkv,
                            .Lq = c->decode.lq,
                            .D = c->D,
                            .Dv = c->Dv,
                            .cap = c->Lkv,
                            .dtype = c->dtype,
                            .page_size = c->decode.page_size,
                            .shuffle_pages = 1,
                            .kv_splits = c->decode.kv_splits,
                            .args_on_device = c->decode.args_on_device,
                            .q_offsets = offsets,
                            .kv_lengths = lengths};
    check_decode_data d;
    int pass = 0;
    uint64_t seed = 0x9e3779b97f4a7c15ull + (uint64_t)c->Hq;
    if (check_decode_make(cd->ctx, &dc, seed, &d, why, cap) == 0) {
        flex_status st = check_decode_forward(&d, cd->score, cd->mask_mod,
                                              c->decode.call_builds_mask ? NULL : cd->mask);
        if (st != FLEX_OK) {
            snprintf(why, cap, "%s", flex_error_message(cd->ctx));
            /* Refused by name (a backend without decode yet): skipped. */
            pass = st == FLEX_ERR_UNSUPPORTED ? -1 : 0;
        } else {
            pass = check_decode_compare(&d, &dc, cd->score, cd->mask_mod, rel, lse_err, why, cap);
            if (pass < 0) pass = 0;
        }
    }
    check_decode_free(&d);
    return pass;
}

static int run_case(flex_context *ctx, const check_case *c, double *rel, double *lse_err, char *why,
                    size_t cap) {
    case_data cd;
    memset(&cd, 0, sizeof cd);
    cd.ctx = ctx;
    int pass = 0;
    *rel = *lse_err = NAN;
    if (c->op == OP_DECODE) {
        if (compile_mods(&cd, c, why, cap) == 0)
            pass = check_decode(&cd, c, rel, lse_err, why, cap);
    } else if (compile_mods(&cd, c, why, cap) == 0 && make_tensors(&cd, c, why, cap) == 0) {
        switch (c->op) {
        case OP_FORWARD:
            pass = check_forward(&cd, c, rel, lse_err, why, cap);
            break;
        case OP_BACKWARD:
            pass = check_backward(&cd, c, rel, why, cap);
            break;
        default:
            snprintf(why, cap, "unknown op");
            break;
        }
    }
    case_data_free(&cd);
    return pass;
}

int cmd_check(int argc, char **argv) {
    const char *backend = NULL;
    int quick = 0, deterministic = 0;
    for (int i = 1; i < argc;) {
        const char *v = NULL;
        int r;
        if (cli_flag(argv[i], "-h") || cli_flag(argv[i], "--help")) {
            usage(stdout);
            return CLI_EXIT_OK;
        }
        if (cli_flag(argv[i], "--quick")) {
            quick = 1, i++;
            continue;
        }
        if (cli_flag(argv[i], "--deterministic")) {
            deterministic = 1, i++;
            continue;
        }
        if ((r = cli_option(argc, argv, &i, "--backend", &v)) != 0) {
            if (r < 0) return CLI_EXIT_USAGE;
            backend = v;
            continue;
        }
        fprintf(stderr, "flexattn check: unknown argument '%s' (see flexattn check --help)\n",
                argv[i]);
        return CLI_EXIT_USAGE;
    }

    case_list cases = {0};
    build_cases(&cases, quick);
    for (int ci = 0; ci < cases.n; ci++)
        cases.v[ci].deterministic = deterministic && cases.v[ci].op == OP_BACKWARD;
    if (deterministic) printf("backward cases with opts->deterministic = 1\n");
    int passed = 0, failed = 0, skipped = 0, tried = 0, named_unusable = 0;
    for (int bi = 0; bi < flex_backend_count(); bi++) {
        flex_backend_info info;
        if (flex_backend_get_info(bi, &info) != FLEX_OK) continue;
        size_t nlen = strlen(info.name);
        if (backend && !(strncmp(backend, info.name, nlen) == 0 &&
                         (backend[nlen] == '\0' || backend[nlen] == ':')))
            continue;
        tried++;
        if (!info.built_in || !info.usable) {
            printf("skipped: %s: %s\n", info.name,
                   info.reason[0] ? info.reason : (info.built_in ? "not usable" : "not built in"));
            skipped++;
            named_unusable += backend != NULL;
            continue;
        }
        flex_context *ctx = NULL;
        if (flex_context_create(backend ? backend : info.name, &ctx) != FLEX_OK) {
            printf("skipped: %s: %s\n", info.name, flex_error_message(NULL));
            skipped++;
            named_unusable += backend != NULL;
            continue;
        }
        printf("backend %s: %s\n", info.name, flex_context_device_name(ctx));
        for (int ci = 0; ci < cases.n; ci++) {
            const check_case *c = &cases.v[ci];
            double rel, lse_err;
            char why[512] = "";
            int ok = run_case(ctx, c, &rel, &lse_err, why, sizeof why);
            if (ok < 0) { /* the backend cannot run this op */
                printf("SKIP  %-5s %-42s %s\n", info.name, c->name, why);
                skipped++;
                continue;
            }
            /* Forward: the parts of the output's and the LSE's bounds used
             * (above 1 fails); backward: the largest relative error of the
             * gradients (the rule's verdict is in why). */
            char numbers[64];
            if (c->op == OP_BACKWARD)
                snprintf(numbers, sizeof numbers, "grad rel %.2e", rel);
            else if (isnan(lse_err))
                snprintf(numbers, sizeof numbers, "out %.2f of bound", rel);
            else
                snprintf(numbers, sizeof numbers, "out %.2f lse %.2f of bound", rel, lse_err);
            printf("%s  %-5s %-42s %s%s%s\n", ok ? "PASS" : "FAIL", info.name, c->name, numbers,
                   ok ? "" : "  ", ok ? "" : why);
            fflush(stdout);
            if (ok)
                passed++;
            else
                failed++;
        }
        flex_context_destroy(ctx);
    }
    free(cases.v);
    if (backend && tried == 0) {
        fprintf(stderr, "flexattn check: no backend named '%s'\n", backend);
        return CLI_EXIT_USAGE;
    }
    /* The last line is exactly "N passed, N failed, N skipped" for scripts;
     * what could not run is counted as skipped, never as passed. */
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    /* A backend the caller named that cannot run fails the check: asked to
     * check CUDA, a machine without it has not passed. */
    return failed || named_unusable ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
}
