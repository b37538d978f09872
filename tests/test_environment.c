/*
 * The environment a context reads when it is created: FLEXATTN_DEBUG (the
 * experiment switches, parsed once into the context; typos are warned
 * about, naming the key), FLEXATTN_LOG (a bad level is warned about) and
 * FLEXATTN_CACHE_DIR (a folder too long for the cache is an error that
 * names the variable, never a path cut short).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "cache.h"
#include "debug.h"
#include "plan.h"

/* Runs fn with stderr going to a file and returns what it wrote
 * (malloc'd). */
static char *capture_stderr(void (*fn)(void *), void *arg) {
    FILE *tmp = tmpfile();
    ck_assert_ptr_nonnull(tmp);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    dup2(fileno(tmp), STDERR_FILENO);
    fn(arg);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    long n = ftell(tmp);
    if (n < 0) n = lseek(fileno(tmp), 0, SEEK_END);
    char *text = calloc((size_t)n + 1, 1);
    ck_assert_ptr_nonnull(text);
    lseek(fileno(tmp), 0, SEEK_SET);
    ck_assert_int_eq(read(fileno(tmp), text, (size_t)n), n);
    fclose(tmp);
    return text;
}

typedef struct parse_call {
    const char *text;
    flex_debug debug;
    int skipped;
} parse_call;

static void run_parse(void *arg) {
    parse_call *c = arg;
    c->skipped = flex_debug_parse(c->text, &c->debug);
}

START_TEST(debug_keys_and_values) {
    parse_call c = {.text = "cuda_tile=4x2x64,cuda_tma=0,cpu_simd=portable,,cuda_ctas=3"};
    char *err = capture_stderr(run_parse, &c);
    ck_assert_int_eq(c.skipped, 0);
    ck_assert_str_eq(err, "");
    free(err);
    ck_assert(c.debug.set[FLEX_DEBUG_CUDA_TILE]);
    ck_assert_str_eq(c.debug.value[FLEX_DEBUG_CUDA_TILE], "4x2x64");
    ck_assert_str_eq(c.debug.value[FLEX_DEBUG_CUDA_TMA], "0");
    ck_assert_str_eq(c.debug.value[FLEX_DEBUG_CPU_SIMD], "portable");
    ck_assert_str_eq(c.debug.value[FLEX_DEBUG_CUDA_CTAS], "3");
    ck_assert(!c.debug.set[FLEX_DEBUG_CUDA_CHAIN]);
    for (int k = 0; k < FLEX_DEBUG_NUM_KEYS; k++)
        ck_assert_msg(strcmp(flex_debug_key_name((flex_debug_key)k), "?") != 0, "key %d", k);
}
END_TEST

START_TEST(debug_typos_are_warned_about) {
    parse_call c = {.text =
                        "cuda_tiles=4x2x64,cuda_tma=2,cpu_reference,cpu_tiles=32x0,cuda_chain=0"};
    char *err = capture_stderr(run_parse, &c);
    ck_assert_int_eq(c.skipped, 4);
    /* The unknown key, named with the known ones. */
    ck_assert_msg(strstr(err, "unknown key 'cuda_tiles'") && strstr(err, "cuda_tile, cuda_tma"),
                  "stderr: %s", err);
    ck_assert_msg(strstr(err, "cuda_tma=2 ignored; the value must be 0 or 1"), "stderr: %s", err);
    ck_assert_msg(strstr(err, "'cpu_reference' has no value"), "stderr: %s", err);
    ck_assert_msg(strstr(err, "cpu_tiles=32x0 ignored"), "stderr: %s", err);
    free(err);
    /* What was right is still taken. */
    ck_assert(c.debug.set[FLEX_DEBUG_CUDA_CHAIN]);
    ck_assert(!c.debug.set[FLEX_DEBUG_CUDA_TILE] && !c.debug.set[FLEX_DEBUG_CUDA_TMA] &&
              !c.debug.set[FLEX_DEBUG_CPU_REFERENCE] && !c.debug.set[FLEX_DEBUG_CPU_TILES]);
}
END_TEST

/* The switches are the context's, from its creation: the CPU plan follows
 * them, and a later change of the variable does not reach the context. */
START_TEST(debug_read_once_into_the_context) {
    setenv("FLEXATTN_DEBUG", "cpu_reference=1,cpu_tiles=32x64,cpu_simd=portable", 1);
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    setenv("FLEXATTN_DEBUG", "cpu_reference=0", 1);
    flex_context *plain = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &plain), FLEX_OK);
    unsetenv("FLEXATTN_DEBUG");

    struct flex_plan plan;
    ck_assert_int_eq(flex_plan_make(ctx, NULL, &plan), FLEX_OK);
    ck_assert_int_eq(plan.use_reference, 1);
    ck_assert_int_eq(plan.q_tile, 32);
    ck_assert_int_eq(plan.kv_tile, 64);
    ck_assert_int_eq(plan.simd, FLEX_PLAN_SIMD_PORTABLE);
    ck_assert_int_eq(flex_debug_int(ctx, FLEX_DEBUG_CPU_REFERENCE, 7, 0, 1), 1);
    ck_assert_int_eq(flex_debug_int(ctx, FLEX_DEBUG_CUDA_CTAS, 7, 0, 9), 7); /* unset */

    ck_assert_int_eq(flex_plan_make(plain, NULL, &plan), FLEX_OK);
    ck_assert_int_eq(plan.use_reference, 0);
    ck_assert_int_eq(plan.q_tile, 128);
    ck_assert_int_eq(plan.simd, FLEX_PLAN_SIMD_AUTO);
    flex_context_destroy(ctx);
    flex_context_destroy(plain);
}
END_TEST

static void log_once(void *arg) {
    (void)arg;
    flex_context *ctx = NULL;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    flex_log(FLEX_LOG_INFO, "an info line");
    flex_log(FLEX_LOG_WARN, "a warning line");
    flex_context_destroy(ctx);
}

/* Each test runs in its own process (Check forks), so the level is read
 * afresh here. */
START_TEST(bad_log_level_is_warned_about) {
    setenv("FLEXATTN_LOG", "verbose", 1);
    char *err = capture_stderr(log_once, NULL);
    unsetenv("FLEXATTN_LOG");
    ck_assert_msg(strstr(err, "FLEXATTN_LOG=verbose is not a level"), "stderr: %s", err);
    /* read as the default, warn */
    ck_assert_msg(!strstr(err, "an info line") && strstr(err, "a warning line"), "stderr: %s", err);
    const char *first = strstr(err, "is not a level");
    ck_assert_msg(first && !strstr(first + 1, "is not a level"), "warned more than once: %s", err);
    free(err);
}
END_TEST

START_TEST(good_log_level_is_quiet) {
    setenv("FLEXATTN_LOG", "INFO", 1);
    char *err = capture_stderr(log_once, NULL);
    unsetenv("FLEXATTN_LOG");
    ck_assert_msg(!strstr(err, "not a level") && strstr(err, "an info line"), "stderr: %s", err);
    free(err);
}
END_TEST

START_TEST(long_cache_dir_is_refused) {
    char dir[1001];
    memset(dir, 'd', sizeof dir - 1);
    dir[0] = '/';
    dir[sizeof dir - 1] = 0;
    setenv("FLEXATTN_CACHE_DIR", dir, 1);
    flex_context *ctx = (flex_context *)1;
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(ctx);
    ck_assert_msg(strstr(flex_error_message(NULL), "FLEXATTN_CACHE_DIR") &&
                      strstr(flex_error_message(NULL), "longer than 960"),
                  "message: %s", flex_error_message(NULL));
    /* The cache itself never cuts the path: it keeps to memory. */
    flex_cache *c = flex_cache_open(NULL, "cuda");
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(flex_cache_disk_enabled(c), 0);
    flex_cache_destroy(c);
    c = flex_cache_open(dir, "cuda");
    ck_assert_int_eq(flex_cache_disk_enabled(c), 0);
    flex_cache_destroy(c);

    /* The longest folder taken is taken whole. */
    dir[FLEX_CACHE_BASE_MAX] = 0;
    setenv("FLEXATTN_CACHE_DIR", dir, 1);
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    flex_context_destroy(ctx);
    c = flex_cache_open(NULL, "cuda");
    ck_assert_int_eq(strlen(flex_cache_dir(c)), FLEX_CACHE_BASE_MAX + strlen("/cuda"));
    flex_cache_destroy(c);

    /* The default folder under a long XDG_CACHE_HOME names that variable. */
    unsetenv("FLEXATTN_CACHE_DIR");
    dir[FLEX_CACHE_BASE_MAX] = 'd';
    setenv("XDG_CACHE_HOME", dir, 1);
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert(strstr(flex_error_message(NULL), "XDG_CACHE_HOME") != NULL);
    /* "off" needs no folder at all. */
    setenv("FLEXATTN_CACHE_DIR", "off", 1);
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
    flex_context_destroy(ctx);
    unsetenv("XDG_CACHE_HOME");
}
END_TEST

int main(void) {
    Suite *s = suite_create("environment");
    TCase *tc = tcase_create("environment");
    tcase_add_test(tc, debug_keys_and_values);
    tcase_add_test(tc, debug_typos_are_warned_about);
    tcase_add_test(tc, debug_read_once_into_the_context);
    tcase_add_test(tc, bad_log_level_is_warned_about);
    tcase_add_test(tc, good_log_level_is_quiet);
    tcase_add_test(tc, long_cache_dir_is_refused);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
