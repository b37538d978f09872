/*
 * The seed patterns as mod text. A preset is only text plus the params
 * (with defaults) and buffers that text names: compiling a preset is
 * compiling its text, so presets and user text share one path, one
 * canonical form and one hash.
 *
 * Where a seed example computes something unusual, the preset computes the
 * same thing (the checkerboard applies its "% 1" step first; the functional
 * ALiBi adds (q - kv) * slope, as the seed does).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

static const flex_param window_params[] = {{"W", 0, 1024}};
static const flex_param prefix_params[] = {{"P", 0, 2048}};
static const flex_param sasa_params[] = {{"IW", 0, 128}, {"WIN", 0, 8}};
static const flex_param natten_params[] = {
    {"IH", 0, 128}, {"IW", 0, 128}, {"KH", 0, 7}, {"KW", 0, 7}};
static const flex_param alibi_functional_params[] = {{"NH", 0, 16}};
static const flex_param softcap_params[] = {{"C", 1, 30.0}};

static const flex_buffer_decl doc_buffers[] = {{"doc", FLEX_I32, 1}};
static const flex_buffer_decl jagged_buffers[] = {{"seq", FLEX_I32, 1}, {"off", FLEX_I32, 1}};
static const flex_buffer_decl alibi_buffers[] = {{"slopes", FLEX_F32, 1}};
static const flex_buffer_decl flamingo_buffers[] = {{"img_of", FLEX_I32, 1},
                                                    {"intervals", FLEX_I32, 2}};

#define PARAMS(p)  p, COUNT(p)
#define BUFFERS(b) b, COUNT(b)
#define NONE       NULL, 0

static const flex_preset presets[] = {
    {"noop", "full attention: the score unchanged", FLEX_MOD_SCORE, "score", NONE, NONE},
    {"causal", "causal mask: a query sees itself and earlier keys", FLEX_MOD_MASK, "q >= kv", NONE,
     NONE},
    {"causal_score", "causal masking written as a score mod (-inf above the diagonal)",
     FLEX_MOD_SCORE, "where(q >= kv, score, -inf)", NONE, NONE},
    {"sliding_window", "causal sliding window: the W most recent keys and the query itself",
     FLEX_MOD_MASK, "q >= kv && q - kv <= W", PARAMS(window_params), NONE},
    {"sliding_window_bidirectional", "keys within W positions on either side of the query",
     FLEX_MOD_MASK, "abs(q - kv) <= W", PARAMS(window_params), NONE},
    {"prefix_lm", "prefix LM: keys up to position P seen by all, causal after", FLEX_MOD_MASK,
     "kv <= P || q >= kv", PARAMS(prefix_params), NONE},
    {"document", "document mask: tokens see only tokens of the same document (buffer doc)",
     FLEX_MOD_MASK, "doc[q] == doc[kv]", NONE, BUFFERS(doc_buffers)},
    {"document_causal", "causal within each document (buffer doc: document id per token)",
     FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]", NONE, BUFFERS(doc_buffers)},
    {"jagged_causal",
     "causal within packed variable-length sequences (buffers seq: id per token, off: offsets)",
     FLEX_MOD_MASK,
     "let qs = q - off[seq[q]];\n"
     "let ks = kv - off[seq[kv]];\n"
     "seq[q] == seq[kv] && qs >= ks",
     NONE, BUFFERS(jagged_buffers)},
    {"sasa", "stand-alone self-attention: a WIN-pixel window on an image IW pixels wide",
     FLEX_MOD_MASK,
     "let qx = q // IW; let qy = q % IW;\n"
     "let kx = kv // IW; let ky = kv % IW;\n"
     "abs(qx - kx) <= WIN && abs(qy - ky) <= WIN",
     PARAMS(sasa_params), NONE},
    {"natten",
     "neighborhood attention: a KH x KW kernel on an IH x IW image, clamped inside the image",
     FLEX_MOD_MASK,
     "let qx = q // IW; let qy = q % IW;\n"
     "let kx = kv // IW; let ky = kv % IW;\n"
     "let cx = clamp(qx, KW // 2, (IW - 1) - KW // 2);\n"
     "let cy = clamp(qy, KH // 2, (IH - 1) - KH // 2);\n"
     "abs(cx - kx) <= KW // 2 && abs(cy - ky) <= KH // 2",
     PARAMS(natten_params), NONE},
    {"alibi", "ALiBi bias from a per-head slope buffer (buffer slopes)", FLEX_MOD_SCORE,
     "score + slopes[h] * (kv - q)", NONE, BUFFERS(alibi_buffers)},
    {"alibi_functional", "ALiBi with the slopes of NH heads computed in the mod, as in the seed",
     FLEX_MOD_SCORE, "score + (q - kv) * exp2(-((h + 1) * 8.0 / NH))",
     PARAMS(alibi_functional_params), NONE},
    {"softcap", "tanh soft-capping of the score to (-C, C)", FLEX_MOD_SCORE, "C * tanh(score / C)",
     PARAMS(softcap_params), NONE},
    {"softcap_approx", "tanh soft-capping with the fast approximate tanh", FLEX_MOD_SCORE,
     "C * tanh_approx(score / C)", PARAMS(softcap_params), NONE},
    {"checkerboard", "the seed's checkerboard: odd distances halved, even ones unchanged",
     FLEX_MOD_SCORE,
     "let s = where(abs(kv - q) % 1 == 0, score * 0.5, score);\n"
     "where(abs(kv - q) % 2 == 0, s * 2.0, s)",
     NONE, NONE},
    {"flamingo",
     "cross-attention from text to images: a text token sees the images whose interval holds it "
     "(buffers img_of: image per key, intervals: [start, end) per image)",
     FLEX_MOD_MASK,
     "let img = img_of[kv];\n"
     "q >= intervals[img][0] && q < intervals[img][1]",
     NONE, BUFFERS(flamingo_buffers)},
};

int flex_preset_count(void) {
    return COUNT(presets);
}

const flex_preset *flex_preset_at(int i) {
    return i >= 0 && i < COUNT(presets) ? &presets[i] : NULL;
}

const flex_preset *flex_preset_find(const char *name) {
    if (!name) return NULL;
    for (int i = 0; i < COUNT(presets); i++)
        if (strcmp(presets[i].name, name) == 0) return &presets[i];
    return NULL;
}

flex_status flex_preset_compile(flex_context *ctx, const char *name, const flex_param *overrides,
                                int num_overrides, flex_mod **out) {
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "out (the new mod) is NULL");
    *out = NULL;
    if (!name) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "preset name is NULL");
    if (num_overrides < 0 || (num_overrides > 0 && !overrides))
        return flex_fail(ctx, num_overrides < 0 ? FLEX_ERR_INVALID_ARGUMENT : FLEX_ERR_NULL_POINTER,
                         "overrides: %d given with pointer %s", num_overrides,
                         overrides ? "set" : "NULL");
    const flex_preset *p = flex_preset_find(name);
    if (!p) {
        char known[1024];
        size_t len = 0;
        known[0] = '\0';
        for (int i = 0; i < COUNT(presets) && len + 40 < sizeof known; i++)
            len += (size_t)snprintf(known + len, sizeof known - len, "%s%s", i ? ", " : "",
                                    presets[i].name);
        return flex_fail(ctx, FLEX_ERR_MOD_NAME, "unknown preset '%s'; the presets are: %s", name,
                         known);
    }
    flex_param params[16];
    int n = p->num_params;
    if (n > COUNT(params)) return flex_fail(ctx, FLEX_ERR_INTERNAL, "preset has too many params");
    for (int i = 0; i < n; i++)
        params[i] = p->params[i];
    for (int k = 0; k < num_overrides; k++) {
        const flex_param *o = &overrides[k];
        if (!o->name) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "override %d has no name", k);
        int found = -1;
        for (int i = 0; i < n; i++)
            if (strcmp(params[i].name, o->name) == 0) found = i;
        if (found < 0) {
            char known[256];
            size_t len = 0;
            known[0] = '\0';
            for (int i = 0; i < n && len + 40 < sizeof known; i++)
                len += (size_t)snprintf(known + len, sizeof known - len, "%s%s", i ? ", " : "",
                                        params[i].name);
            return flex_fail(ctx, FLEX_ERR_MOD_NAME,
                             "preset '%s' has no param '%s'; its params are: %s", name, o->name,
                             n ? known : "(none)");
        }
        /* A float param stays float; an int param becomes float only when
         * the new value is not integral. */
        params[found].value = o->value;
        if (!params[found].is_float && o->is_float && o->value != (double)(int64_t)o->value)
            params[found].is_float = 1;
    }
    flex_mod_desc desc = {p->kind, p->text, params, n, p->buffers, p->num_buffers};
    return flex_mod_compile(ctx, &desc, out);
}

flex_status flex_sequence_ids_from_offsets(const int32_t *offsets, int num_offsets, int32_t *ids,
                                           int64_t total) {
    if (!offsets) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "offsets is NULL");
    if (!ids && total > 0) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "ids is NULL");
    if (num_offsets < 1)
        return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT,
                         "num_offsets is %d; offsets need at least the leading 0", num_offsets);
    if (total < 0)
        return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT, "total is %lld; it must be >= 0",
                         (long long)total);
    if (offsets[0] != 0)
        return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT, "offsets[0] is %d; it must be 0",
                         (int)offsets[0]);
    for (int i = 1; i < num_offsets; i++)
        if (offsets[i] < offsets[i - 1])
            return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT,
                             "offsets decrease at index %d (%d after %d); they must be "
                             "non-decreasing",
                             i, (int)offsets[i], (int)offsets[i - 1]);
    if (offsets[num_offsets - 1] != total)
        return flex_fail(NULL, FLEX_ERR_INVALID_ARGUMENT,
                         "the last offset is %d but total is %lld; they must be equal",
                         (int)offsets[num_offsets - 1], (long long)total);
    for (int s = 0; s + 1 < num_offsets; s++)
        for (int32_t t = offsets[s]; t < offsets[s + 1]; t++)
            ids[t] = s;
    return FLEX_OK;
}
