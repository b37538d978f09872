/*
 * `flexattn mask`: builds the block mask of a preset or of mod text and
 * prints its picture, sizes, sparsity, block counts and build time.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_args.h"
#include "internal.h"

static void usage(FILE *f) {
    fprintf(f, "usage: flexattn mask PRESET|--text 'MOD TEXT' [options]\n"
               "\n"
               "Builds the block mask of a mask preset or of mask mod text and prints it:\n"
               "full blocks as \xe2\x96\x88\xe2\x96\x88, partial ones as "
               "\xe2\x96\x91\xe2\x96\x91, empty ones blank.\n"
               "\n"
               "options:\n"
               "  --len N            q_len and kv_len (default 8192; 12 x 9 for flamingo)\n"
               "  --q-len N          query length\n"
               "  --kv-len N         key/value length\n"
               "  --block N          q and kv block size (power of two 16..1024, default 128)\n"
               "  --q-block N        q block size\n"
               "  --kv-block N       kv block size\n"
               "  -B N, -H N         batch and heads (0 or 1 broadcast; default 1)\n"
               "  --param NAME=VAL   set a param (repeatable), e.g. --param W=256\n"
               "  --docs N           N documents of equal-ish length for doc/seq/off (default 4)\n"
               "  --doc-lengths a,b  explicit document lengths (sum = the sequence length)\n"
               "  --buffer NAME=FILE data of buffer NAME from a .npy file (repeatable): mod\n"
               "                     text may read it, a preset's buffer of that name takes it\n"
               "  --backend SPEC     backend (auto, cpu, cuda, ...; default FLEXATTN_BACKEND)\n"
               "  --max-cells N      largest picture side in cells (default 64)\n"
               "  --show B,H         which (batch, head) to draw (default 0,0)\n"
               "  --dense            also print the element mask, 1 = attend (as PyTorch's\n"
               "                     create_mask), for at most 256 x 256 elements\n"
               "  --list             list the presets and exit\n"
               "\n"
               "Lengths accept k and M suffixes (32k = 32768). Buffers a preset reads are\n"
               "generated: doc/seq/off from --docs or --doc-lengths, slopes as the ALiBi slopes\n"
               "of H heads, img_of/intervals from the Flamingo example. Mod text may read the\n"
               "same buffer names.\n");
}

/* Largest q_len * kv_len --dense prints. */
#define DENSE_LIMIT (256 * 256)

/* Prints the element mask of (b, h) as rows of 0/1, evaluating the mask mod
 * at every element (the same values the kernels apply in partial blocks). */
static int print_dense(flex_context *ctx, const flex_mod *mod, int64_t b, int64_t h, int64_t q_len,
                       int64_t kv_len) {
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(copies, 0, sizeof copies);
    if (flex_mod_host_views(ctx, mod, views, copies) != FLEX_OK) {
        fprintf(stderr, "flexattn mask: %s\n", flex_error_message(ctx));
        return -1;
    }
    ir_value *scratch = malloc(sizeof(ir_value) * (size_t)(mod->ir.num_nodes + 1));
    int rc = scratch ? 0 : -1;
    if (!scratch) fprintf(stderr, "flexattn mask: out of memory\n");
    printf("dense mask (b=%lld, h=%lld), %lld x %lld, 1 = attend:\n", (long long)b, (long long)h,
           (long long)q_len, (long long)kv_len);
    for (int64_t i = 0; i < q_len && rc == 0; i++) {
        for (int64_t j = 0; j < kv_len; j++) {
            ir_value result;
            mod_bounds_error err;
            memset(&err, 0, sizeof err);
            if (mod_eval_point(&mod->ir, views, 0.0f, (int32_t)b, (int32_t)h, (int32_t)i,
                               (int32_t)j, scratch, &result, &err) != 0) {
                flex_fail_bounds(ctx, mod, &err);
                fprintf(stderr, "\nflexattn mask: %s\n", flex_error_message(ctx));
                rc = -1;
                break;
            }
            printf("%s%d", j ? " " : "", result.i ? 1 : 0);
        }
        if (rc == 0) printf("\n");
    }
    free(scratch);
    flex_mod_release_host_views(copies);
    return rc;
}

static void list_presets(void) {
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        printf("%-30s %-5s %s\n", p->name, p->kind == FLEX_MOD_MASK ? "mask" : "score",
               p->description);
    }
}

int cmd_mask(int argc, char **argv) {
    const char *preset_name = NULL, *text = NULL, *backend = NULL;
    int64_t len = -1, q_len = -1, kv_len = -1, block = 0, q_block = -1, kv_block = -1;
    int64_t B = 1, H = 1, docs = 0, max_cells = 64, show_b = 0, show_h = 0;
    int64_t *doc_lengths = NULL;
    int num_doc_lengths = 0, dense = 0;
    cli_params params;
    memset(&params, 0, sizeof params);
    cli_file_buffers files;
    memset(&files, 0, sizeof files);
    int rc = CLI_EXIT_USAGE;

    for (int i = 1; i < argc;) {
        const char *v = NULL;
        int r;
        const char *arg = argv[i];
        if (cli_flag(arg, "-h") || cli_flag(arg, "--help")) {
            usage(stdout);
            rc = CLI_EXIT_OK;
            goto out;
        }
        if (cli_flag(arg, "--dense")) {
            dense = 1;
            i++;
            continue;
        }
        if (cli_flag(arg, "--list")) {
            list_presets();
            rc = CLI_EXIT_OK;
            goto out;
        }
#define OPT(name) ((r = cli_option(argc, argv, &i, name, &v)) != 0)
        if (OPT("--text")) {
            if (r < 0) goto out;
            text = v;
        } else if (OPT("--len")) {
            if (r < 0 || cli_parse_int(v, "--len", 1, INT32_MAX, &len)) goto out;
        } else if (OPT("--q-len")) {
            if (r < 0 || cli_parse_int(v, "--q-len", 1, INT32_MAX, &q_len)) goto out;
        } else if (OPT("--kv-len")) {
            if (r < 0 || cli_parse_int(v, "--kv-len", 1, INT32_MAX, &kv_len)) goto out;
        } else if (OPT("--block")) {
            if (r < 0 || cli_parse_int(v, "--block", 0, 1 << 20, &block)) goto out;
        } else if (OPT("--q-block")) {
            if (r < 0 || cli_parse_int(v, "--q-block", 0, 1 << 20, &q_block)) goto out;
        } else if (OPT("--kv-block")) {
            if (r < 0 || cli_parse_int(v, "--kv-block", 0, 1 << 20, &kv_block)) goto out;
        } else if (OPT("-B")) {
            if (r < 0 || cli_parse_int(v, "-B", 0, INT32_MAX, &B)) goto out;
        } else if (OPT("-H")) {
            if (r < 0 || cli_parse_int(v, "-H", 0, INT32_MAX, &H)) goto out;
        } else if (OPT("--param")) {
            if (r < 0 || cli_params_add(&params, v)) goto out;
        } else if (OPT("--buffer")) {
            if (r < 0 || cli_file_buffers_add(&files, v)) goto out;
        } else if (OPT("--docs")) {
            if (r < 0 || cli_parse_int(v, "--docs", 1, INT32_MAX, &docs)) goto out;
        } else if (OPT("--doc-lengths")) {
            free(doc_lengths);
            doc_lengths = NULL;
            if (r < 0 || cli_parse_int_list(v, "--doc-lengths", 0, &doc_lengths, &num_doc_lengths))
                goto out;
        } else if (OPT("--backend")) {
            if (r < 0) goto out;
            backend = v;
        } else if (OPT("--max-cells")) {
            if (r < 0 || cli_parse_int(v, "--max-cells", 1, 4096, &max_cells)) goto out;
        } else if (OPT("--show")) {
            if (r < 0) goto out;
            int64_t *bh = NULL;
            int n = 0;
            if (cli_parse_int_list(v, "--show", 0, &bh, &n)) goto out;
            if (n != 2) {
                fprintf(stderr, "flexattn mask: --show takes B,H (two integers)\n");
                free(bh);
                goto out;
            }
            show_b = bh[0];
            show_h = bh[1];
            free(bh);
        } else if (arg[0] == '-' && arg[1] != '\0') {
            fprintf(stderr, "flexattn mask: unknown option '%s' (see flexattn mask --help)\n", arg);
            goto out;
        } else {
            if (preset_name) {
                fprintf(stderr, "flexattn mask: one preset only ('%s' and '%s' given)\n",
                        preset_name, arg);
                goto out;
            }
            preset_name = arg;
            i++;
        }
#undef OPT
    }
    if (!preset_name == !text) {
        fprintf(stderr, "flexattn mask: give a preset name or --text (see flexattn mask "
                        "--help; flexattn mask --list lists the presets)\n");
        goto out;
    }
    const flex_preset *preset = NULL;
    if (preset_name) {
        preset = flex_preset_find(preset_name);
        if (!preset) {
            fprintf(stderr, "flexattn mask: unknown preset '%s'; known presets:\n", preset_name);
            for (int k = 0; k < flex_preset_count(); k++)
                if (flex_preset_at(k)->kind == FLEX_MOD_MASK)
                    fprintf(stderr, "  %s\n", flex_preset_at(k)->name);
            goto out;
        }
        if (preset->kind != FLEX_MOD_MASK) {
            fprintf(stderr,
                    "flexattn mask: preset '%s' is a score mod; block masks come from "
                    "mask mods\n",
                    preset_name);
            goto out;
        }
    }

    /* Lengths: explicit, else the sum of --doc-lengths, else a default. */
    int64_t def_len = doc_lengths ? 0 : 8192;
    if (doc_lengths)
        for (int d = 0; d < num_doc_lengths; d++)
            def_len += doc_lengths[d];
    int is_flamingo = preset && !strcmp(preset->name, "flamingo");
    if (q_len < 0) q_len = len > 0 ? len : is_flamingo ? 12 : def_len;
    if (kv_len < 0) kv_len = len > 0 ? len : is_flamingo ? 9 : def_len;
    if (q_len < 1 || kv_len < 1) {
        fprintf(stderr, "flexattn mask: the documents add up to 0 tokens\n");
        goto out;
    }
    if (show_b >= (B > 1 ? B : 1) || show_h >= (H > 1 ? H : 1)) {
        fprintf(stderr, "flexattn mask: --show %lld,%lld is outside B x H = %lld x %lld\n",
                (long long)show_b, (long long)show_h, (long long)(B > 1 ? B : 1),
                (long long)(H > 1 ? H : 1));
        goto out;
    }
    if (dense && q_len * kv_len > DENSE_LIMIT) {
        fprintf(stderr,
                "flexattn mask: --dense prints at most %d elements; %lld x %lld is too "
                "many\n",
                DENSE_LIMIT, (long long)q_len, (long long)kv_len);
        goto out;
    }
    if (q_block < 0) q_block = block;
    if (kv_block < 0) kv_block = block;

    rc = CLI_EXIT_FAILURE;
    flex_context *ctx = NULL;
    flex_mod *mod = NULL;
    flex_block_mask *mask = NULL;
    cli_buffers bufs;
    memset(&bufs, 0, sizeof bufs);
    if (cli_context_create("flexattn mask", backend, &ctx) != 0) goto out;
    flex_status st;
    if (preset) {
        st = flex_preset_compile(ctx, preset->name, params.params, params.count, &mod);
    } else {
        flex_buffer_decl decls[CLI_MAX_BUFFERS];
        int nd = cli_declare_buffers(text, &files, decls);
        flex_mod_desc desc = {FLEX_MOD_MASK, text, params.params, params.count, decls, nd};
        st = flex_mod_compile(ctx, &desc, &mod);
    }
    if (st != FLEX_OK) {
        fprintf(stderr, "flexattn mask: %s\n", flex_error_message(ctx));
        if (st == FLEX_ERR_MOD_NAME || st == FLEX_ERR_MOD_SYNTAX || st == FLEX_ERR_MOD_TYPE)
            rc = CLI_EXIT_USAGE;
        goto done;
    }
    cli_buffer_spec spec = {q_len,           kv_len,      H > 1 ? H : 1,
                            (int)docs,       doc_lengths, num_doc_lengths,
                            files.name_list, files.count, "flexattn mask"};
    if (cli_bind_file_buffers(ctx, mod, &files) != 0 ||
        cli_bind_generated_buffers(ctx, mod, &spec, &bufs) != 0) {
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    st = flex_block_mask_create(ctx, mod, B, H, q_len, kv_len, (int)q_block, (int)kv_block, &mask);
    if (st != FLEX_OK) {
        fprintf(stderr, "flexattn mask: %s\n", flex_error_message(ctx));
        if (st == FLEX_ERR_INVALID_ARGUMENT) rc = CLI_EXIT_USAGE;
        goto done;
    }
    size_t need = flex_block_mask_format(mask, show_b, show_h, (int)max_cells, NULL, 0);
    char *picture = malloc(need + 1);
    if (!picture) {
        fprintf(stderr, "flexattn mask: out of memory\n");
        goto done;
    }
    flex_block_mask_format(mask, show_b, show_h, (int)max_cells, picture, need + 1);
    fputs(picture, stdout);
    free(picture);

    flex_block_mask_shape shape;
    flex_block_mask_get_shape(mask, &shape);
    int64_t total = shape.B * shape.H * shape.num_q_blocks * shape.num_kv_blocks;
    printf("mask:      %s\n", preset ? preset->name : "(text)");
    /* Canonical text may span lines (lets): indent the continuation. */
    printf("text:      ");
    for (const char *c = flex_mod_canonical_text(mod); *c; c++) {
        putchar(*c);
        if (*c == '\n' && c[1]) printf("           ");
    }
    printf("\n");
    printf("sizes:     B=%lld H=%lld q_len=%lld kv_len=%lld\n", (long long)shape.B,
           (long long)shape.H, (long long)shape.q_len, (long long)shape.kv_len);
    printf("blocks:    %d x %d elements, grid %lld x %lld per (b, h)\n", shape.q_block,
           shape.kv_block, (long long)shape.num_q_blocks, (long long)shape.num_kv_blocks);
    printf("full:      %lld\n", (long long)shape.num_full);
    printf("partial:   %lld\n", (long long)shape.num_partial);
    printf("empty:     %lld\n", (long long)(total - shape.num_full - shape.num_partial));
    printf("sparsity:  %.2f%%\n", flex_block_mask_sparsity(mask));
    printf("build:     %.3f ms on %s (%s)\n", mask->build_ms, flex_context_backend(ctx),
           flex_context_device_name(ctx));
    if (dense && print_dense(ctx, mod, show_b, show_h, q_len, kv_len) != 0) goto done;
    rc = CLI_EXIT_OK;
done:
    flex_block_mask_destroy(mask);
    flex_mod_destroy(mod);
    cli_buffers_free(&bufs);
    flex_context_destroy(ctx);
out:
    free(doc_lengths);
    cli_file_buffers_free(&files);
    return rc;
}
