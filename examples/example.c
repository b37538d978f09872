/*
 * The README's example: causal attention with a soft-capped score on
 * whatever backend FLEXATTN_BACKEND names (default: the best usable one).
 * Build against an installed flexattn with
 *     cc -std=c11 example.c $(pkg-config --cflags --libs flexattn)
 */
#include <flexattn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                                \
    do {                                                                                           \
        flex_status st_ = (call);                                                                  \
        if (st_ != FLEX_OK) {                                                                      \
            fprintf(stderr, "%s failed: %s: %s\n", #call, flex_status_name(st_),                   \
                    flex_error_message(ctx));                                                      \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

int main(void) {
    enum { B = 1, H = 4, S = 300, D = 64 };
    flex_context *ctx = NULL;
    CHECK(flex_context_create(NULL, &ctx)); /* FLEXATTN_BACKEND, else auto */
    printf("backend: %s (%s)\n", flex_context_backend(ctx), flex_context_device_name(ctx));

    /* Mods are text; params are named constants. */
    flex_mod *causal = NULL, *softcap = NULL;
    flex_mod_desc mask_desc = {.kind = FLEX_MOD_MASK, .text = "q >= kv"};
    CHECK(flex_mod_compile(ctx, &mask_desc, &causal));
    flex_param cap = {.name = "C", .is_float = 1, .value = 20.0};
    flex_mod_desc score_desc = {
        .kind = FLEX_MOD_SCORE, .text = "C * tanh(score / C)", .params = &cap, .num_params = 1};
    CHECK(flex_mod_compile(ctx, &score_desc, &softcap));

    flex_block_mask *mask = NULL;
    CHECK(flex_block_mask_create(ctx, causal, 1, 1, S, S, 128, 128, &mask));
    char picture[256];
    flex_block_mask_format(mask, 0, 0, 0, picture, sizeof picture);
    printf("%s", picture);

    /* Inputs live on the context's device: allocate there and copy. */
    size_t n = (size_t)B * H * S * D;
    float *host = malloc(n * sizeof *host);
    if (!host) return 1;
    for (size_t i = 0; i < n; i++)
        host[i] = (float)sin(0.37 * (double)i);
    void *q = NULL, *k = NULL, *v = NULL, *o = NULL;
    CHECK(flex_malloc(ctx, n * sizeof(float), &q));
    CHECK(flex_malloc(ctx, n * sizeof(float), &k));
    CHECK(flex_malloc(ctx, n * sizeof(float), &v));
    CHECK(flex_malloc(ctx, n * sizeof(float), &o));
    CHECK(flex_copy_to_device(ctx, q, host, n * sizeof(float)));
    CHECK(flex_copy_to_device(ctx, k, host, n * sizeof(float)));
    CHECK(flex_copy_to_device(ctx, v, host, n * sizeof(float)));

    flex_device_type dev = flex_context_device_type(ctx);
    flex_tensor tq = flex_tensor_bhsd(q, FLEX_F32, B, H, S, D, dev);
    flex_tensor tk = flex_tensor_bhsd(k, FLEX_F32, B, H, S, D, dev);
    flex_tensor tv = flex_tensor_bhsd(v, FLEX_F32, B, H, S, D, dev);
    flex_tensor to = flex_tensor_bhsd(o, FLEX_F32, B, H, S, D, dev);
    tq.device_index = tk.device_index = tv.device_index = to.device_index =
        flex_context_device_index(ctx);
    CHECK(flex_attention(ctx, &tq, &tk, &tv, softcap, mask, NULL, &to, NULL));
    CHECK(flex_copy_to_host(ctx, host, o, n * sizeof(float)));
    printf("out[0][0][%d][0..3] = %.5f %.5f %.5f %.5f\n", S - 1, host[(S - 1) * D],
           host[(S - 1) * D + 1], host[(S - 1) * D + 2], host[(S - 1) * D + 3]);

    flex_free(ctx, q);
    flex_free(ctx, k);
    flex_free(ctx, v);
    flex_free(ctx, o);
    free(host);
    flex_block_mask_destroy(mask);
    flex_mod_destroy(softcap);
    flex_mod_destroy(causal);
    flex_context_destroy(ctx);
    return 0;
}
