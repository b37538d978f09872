/*
 * `flexattn info`: what this build of the library can do on this machine:
 * version, each backend (built in, usable, and why not), the backend that
 * FLEXATTN_BACKEND (or auto) selects, the kernel cache folder and the CPU
 * threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cache.h"
#include "cli.h"
#include "cli_args.h"
#include "flexattn.h"

int cmd_info(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            printf("usage: flexattn info\n\nPrints the version, the backends and whether each "
                   "is usable here, the default\nbackend, the kernel cache folder and the CPU "
                   "threads.\n");
            return CLI_EXIT_OK;
        }
        fprintf(stderr, "flexattn info: unknown argument '%s' (info takes none)\n", argv[i]);
        return CLI_EXIT_USAGE;
    }
    printf("flexattn %s\n\n", flex_version());

    printf("backends:\n");
    int n = flex_backend_count();
    for (int i = 0; i < n; i++) {
        flex_backend_info info;
        memset(&info, 0, sizeof info);
        if (flex_backend_get_info(i, &info) != FLEX_OK) {
            printf("  #%d: %s\n", i, flex_error_message(NULL));
            continue;
        }
        const char *state = !info.built_in ? "not built in"
                            : info.usable  ? "usable"
                                           : "built in, not usable";
        printf("  %-6s %-22s", info.name ? info.name : "?", state);
        if (info.usable) printf(" score %-3d", info.score);
        if (info.reason[0]) printf(" %s", info.reason);
        printf("\n");
    }

    const char *env = getenv("FLEXATTN_BACKEND");
    printf("\ndefault backend (FLEXATTN_BACKEND=%s):\n", env && *env ? env : "unset, auto");
    flex_context *ctx = NULL;
    if (flex_context_create(NULL, &ctx) == FLEX_OK) {
        printf("  %s, device %d: %s\n", flex_context_backend(ctx), flex_context_device_index(ctx),
               flex_context_device_name(ctx));
        flex_context_destroy(ctx);
    } else {
        printf("  none: %s\n", flex_error_message(NULL));
    }

    flex_cache *cache = flex_cache_open(NULL, NULL);
    const char *cenv = getenv("FLEXATTN_CACHE_DIR");
    if (cache && flex_cache_disk_enabled(cache))
        printf("\nkernel cache: %s%s\n", flex_cache_dir(cache),
               cenv && *cenv ? " (FLEXATTN_CACHE_DIR)" : "");
    else
        printf("\nkernel cache: memory only%s\n",
               cenv && !strcmp(cenv, "off") ? " (FLEXATTN_CACHE_DIR=off)" : " (no home folder)");
    flex_cache_destroy(cache);

#ifdef _OPENMP
    printf("CPU threads:  %d (OpenMP; OMP_NUM_THREADS sets it)\n", omp_get_max_threads());
#else
    printf("CPU threads:  1 (built without OpenMP)\n");
#endif
    return CLI_EXIT_OK;
}
