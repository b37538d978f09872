/*
 * The `flexattn` program: one binary, one subcommand per file (cli.h).
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "cli_args.h"
#include "flexattn.h"

static void usage(FILE *f) {
    fprintf(f, "usage: flexattn COMMAND [ARGS]\n"
               "\n"
               "commands:\n"
               "  info     version, backends and whether they are usable here, cache folder\n"
               "  mask     build and print the block mask of a preset or of mod text\n"
               "  run      run attention with a preset or mod text and time it\n"
               "  check    compare every usable backend with the fp64 oracle\n"
               "  help     this text (flexattn COMMAND --help for a command's options)\n"
               "\n"
               "  --version  print the library version\n"
               "\n"
               "environment: FLEXATTN_BACKEND (auto, cpu, cuda, ...; optional :N device),\n"
               "FLEXATTN_CACHE_DIR (kernel cache folder, 'off' for memory only),\n"
               "FLEXATTN_LOG (error, warn, info, debug), OMP_NUM_THREADS.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        printf("flexattn %s\n", flex_version());
        return CLI_EXIT_OK;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return CLI_EXIT_OK;
    }
    /* Each subcommand sees its own name as argv[0]. */
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "mask")) return cmd_mask(argc - 1, argv + 1);
    if (!strcmp(cmd, "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "check")) return cmd_check(argc - 1, argv + 1);
    fprintf(stderr, "flexattn: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return CLI_EXIT_USAGE;
}
