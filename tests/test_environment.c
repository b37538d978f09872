/*
 * The environment a context reads when it is created: FLEXATTN_CACHE_DIR (a
 * folder too long for the cache is an error that names the variable, never
 * a path cut short).
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "flexattn.h"
#include "cache.h"

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
    tcase_add_test(tc, long_cache_dir_is_refused);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
