/*
 * The kernel cache: memory and disk round trips, two processes filling the
 * same key at once, corrupt and truncated entries detected and rebuilt,
 * something other than a file at an entry's path, and FLEXATTN_CACHE_DIR=off.
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cache.h"

static char tmpdir[256];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/flexattn-cache-test-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void remove_tree(const char *dir) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static void fill(unsigned char *buf, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)((i * 131u + seed * 7u) ^ (i >> 5));
}

START_TEST(test_round_trip_memory_and_disk) {
    make_tmpdir();
    unsigned char blob[5000];
    fill(blob, sizeof blob, 1);
    flex_cache *c = flex_cache_open(tmpdir, "cuda");
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(flex_cache_disk_enabled(c), 1);
    void *data = NULL;
    size_t size = 0;
    ck_assert_int_eq(flex_cache_get(c, "fwd|bf16|a", &data, &size, NULL), 0);
    ck_assert_int_eq(flex_cache_put(c, "fwd|bf16|a", blob, sizeof blob), 0);
    int from_disk = -1;
    ck_assert_int_eq(flex_cache_get(c, "fwd|bf16|a", &data, &size, &from_disk), 1);
    ck_assert_int_eq(from_disk, 0);
    ck_assert_uint_eq(size, sizeof blob);
    ck_assert_int_eq(memcmp(data, blob, size), 0);
    free(data);
    flex_cache_destroy(c);

    /* A new cache (a new process, in effect) finds it on disk. */
    c = flex_cache_open(tmpdir, "cuda");
    ck_assert_int_eq(flex_cache_get(c, "fwd|bf16|a", &data, &size, &from_disk), 1);
    ck_assert_int_eq(from_disk, 1);
    ck_assert_uint_eq(size, sizeof blob);
    ck_assert_int_eq(memcmp(data, blob, size), 0);
    free(data);
    /* A different key is a miss, also when it differs only at the end. */
    ck_assert_int_eq(flex_cache_get(c, "fwd|bf16|b", &data, &size, NULL), 0);
    flex_cache_destroy(c);
    remove_tree(tmpdir);
}
END_TEST

START_TEST(test_concurrent_writers) {
    make_tmpdir();
    enum { N = 200000 };
    pid_t kids[2];
    for (int k = 0; k < 2; k++) {
        kids[k] = fork();
        ck_assert_int_ge(kids[k], 0);
        if (kids[k] == 0) {
            static unsigned char blob[N];
            fill(blob, N, 9);
            flex_cache *c = flex_cache_open(tmpdir, "cuda");
            int bad = 0;
            for (int i = 0; i < 40; i++) {
                if (flex_cache_put(c, "shared-key", blob, N) != 0) bad = 1;
                flex_cache *r = flex_cache_open(tmpdir, "cuda");
                void *data;
                size_t size;
                if (!flex_cache_get(r, "shared-key", &data, &size, NULL))
                    bad = 1;
                else {
                    if (size != N || memcmp(data, blob, N) != 0) bad = 1;
                    free(data);
                }
                flex_cache_destroy(r);
            }
            flex_cache_destroy(c);
            _exit(bad);
        }
    }
    for (int k = 0; k < 2; k++) {
        int status = 0;
        ck_assert_int_eq(waitpid(kids[k], &status, 0), kids[k]);
        ck_assert(WIFEXITED(status));
        ck_assert_int_eq(WEXITSTATUS(status), 0);
    }
    /* No temporary files are left behind. */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls '%s/cuda' | grep -c tmp > /dev/null", tmpdir);
    ck_assert_int_ne(system(cmd), 0);
    remove_tree(tmpdir);
}
END_TEST

static void damage_and_check(int truncate_it) {
    make_tmpdir();
    unsigned char blob[3000];
    fill(blob, sizeof blob, 3);
    flex_cache *c = flex_cache_open(tmpdir, "cuda");
    ck_assert_int_eq(flex_cache_put(c, "key", blob, sizeof blob), 0);
    flex_cache_destroy(c);
    char path[1200];
    c = flex_cache_open(tmpdir, "cuda");
    ck_assert_int_eq(flex_cache_entry_path(c, "key", path, sizeof path), 0);
    if (truncate_it) {
        ck_assert_int_eq(truncate(path, 1000), 0);
    } else {
        int fd = open(path, O_RDWR);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(lseek(fd, 2000, SEEK_SET), 2000);
        unsigned char x = 0x5a;
        ck_assert_int_eq(write(fd, &x, 1), 1);
        close(fd);
    }
    void *data;
    size_t size;
    ck_assert_int_eq(flex_cache_get(c, "key", &data, &size, NULL), 0);
    /* The caller rebuilds and puts again; the entry is whole again. */
    ck_assert_int_eq(flex_cache_put(c, "key", blob, sizeof blob), 0);
    flex_cache_destroy(c);
    c = flex_cache_open(tmpdir, "cuda");
    int from_disk = 0;
    ck_assert_int_eq(flex_cache_get(c, "key", &data, &size, &from_disk), 1);
    ck_assert_int_eq(from_disk, 1);
    ck_assert_uint_eq(size, sizeof blob);
    ck_assert_int_eq(memcmp(data, blob, size), 0);
    free(data);
    flex_cache_destroy(c);
    remove_tree(tmpdir);
}

START_TEST(test_corrupt_entry_rebuilt) {
    damage_and_check(0);
}
END_TEST

START_TEST(test_truncated_entry_rebuilt) {
    damage_and_check(1);
}
END_TEST

START_TEST(test_wrong_key_in_file_is_a_miss) {
    make_tmpdir();
    flex_cache *c = flex_cache_open(tmpdir, "cuda");
    ck_assert_int_eq(flex_cache_put(c, "first", "abc", 3), 0);
    char from[1200], to[1200];
    flex_cache_entry_path(c, "first", from, sizeof from);
    flex_cache_entry_path(c, "second", to, sizeof to);
    ck_assert_int_eq(rename(from, to), 0); /* as if two keys hashed alike */
    flex_cache_destroy(c);
    c = flex_cache_open(tmpdir, "cuda");
    void *data;
    size_t size;
    ck_assert_int_eq(flex_cache_get(c, "second", &data, &size, NULL), 0);
    flex_cache_destroy(c);
    remove_tree(tmpdir);
}
END_TEST

/* A FIFO at an entry's path would block a plain open() until a writer
 * came; the lookup must instead be a quick miss (alarm() fails the test if
 * it blocks), and so must a folder. A put then replaces the FIFO. */
START_TEST(test_fifo_at_entry_path_is_a_miss) {
    make_tmpdir();
    flex_cache *c = flex_cache_open(tmpdir, "cuda");
    char path[1200];
    ck_assert_int_eq(flex_cache_entry_path(c, "fifo-key", path, sizeof path), 0);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/cuda", tmpdir);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    ck_assert_int_eq(mkfifo(path, 0644), 0);
    alarm(10);
    void *data = NULL;
    size_t size = 0;
    ck_assert_int_eq(flex_cache_get(c, "fifo-key", &data, &size, NULL), 0);
    alarm(0);
    ck_assert_int_eq(flex_cache_put(c, "fifo-key", "abc", 3), 0);
    flex_cache_destroy(c);
    c = flex_cache_open(tmpdir, "cuda");
    int from_disk = 0;
    ck_assert_int_eq(flex_cache_get(c, "fifo-key", &data, &size, &from_disk), 1);
    ck_assert_int_eq(from_disk, 1);
    ck_assert_int_eq(memcmp(data, "abc", 3), 0);
    free(data);

    ck_assert_int_eq(flex_cache_entry_path(c, "dir-key", path, sizeof path), 0);
    ck_assert_int_eq(mkdir(path, 0755), 0);
    ck_assert_int_eq(flex_cache_get(c, "dir-key", &data, &size, NULL), 0);
    flex_cache_destroy(c);
    remove_tree(tmpdir);
}
END_TEST

START_TEST(test_off_keeps_memory_only) {
    setenv("FLEXATTN_CACHE_DIR", "off", 1);
    flex_cache *c = flex_cache_open(NULL, "cuda");
    ck_assert_int_eq(flex_cache_disk_enabled(c), 0);
    ck_assert_str_eq(flex_cache_dir(c), "");
    char path[64];
    ck_assert_int_eq(flex_cache_entry_path(c, "k", path, sizeof path), -1);
    ck_assert_int_eq(flex_cache_put(c, "k", "xyz", 3), 0);
    void *data;
    size_t size;
    int from_disk = -1;
    ck_assert_int_eq(flex_cache_get(c, "k", &data, &size, &from_disk), 1);
    ck_assert_int_eq(from_disk, 0);
    ck_assert_int_eq(memcmp(data, "xyz", 3), 0);
    free(data);
    flex_cache_destroy(c);
    /* Nothing survives into a new cache. */
    c = flex_cache_open(NULL, "cuda");
    ck_assert_int_eq(flex_cache_get(c, "k", &data, &size, NULL), 0);
    flex_cache_destroy(c);
}
END_TEST

START_TEST(test_default_folder_from_xdg) {
    unsetenv("FLEXATTN_CACHE_DIR");
    setenv("XDG_CACHE_HOME", "/tmp/flexattn-xdg-test", 1);
    flex_cache *c = flex_cache_open(NULL, "cuda");
    ck_assert_str_eq(flex_cache_dir(c), "/tmp/flexattn-xdg-test/flexattn/cuda");
    flex_cache_destroy(c);
    unsetenv("XDG_CACHE_HOME");
    setenv("HOME", "/tmp/flexattn-home-test", 1);
    c = flex_cache_open(NULL, "cuda");
    ck_assert_str_eq(flex_cache_dir(c), "/tmp/flexattn-home-test/.cache/flexattn/cuda");
    flex_cache_destroy(c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("cache");
    tcase_add_test(tc, test_round_trip_memory_and_disk);
    tcase_add_test(tc, test_concurrent_writers);
    tcase_add_test(tc, test_corrupt_entry_rebuilt);
    tcase_add_test(tc, test_truncated_entry_rebuilt);
    tcase_add_test(tc, test_wrong_key_in_file_is_a_miss);
    tcase_add_test(tc, test_fifo_at_entry_path_is_a_miss);
    tcase_add_test(tc, test_off_keeps_memory_only);
    tcase_add_test(tc, test_default_folder_from_xdg);
    suite_add_tcase(s, tc);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
