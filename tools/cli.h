/* Subcommands of the `flexattn` program, one file each. */
#ifndef FLEXATTN_CLI_H
#define FLEXATTN_CLI_H

int cmd_info(int argc, char **argv);
int cmd_mask(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_check(int argc, char **argv);

#endif
