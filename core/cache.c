/*
 * Kernel cache: memory + disk blob store (see cache.h for the contract).
 *
 * Entry file layout (little-endian host order; entries are not meant to
 * travel between machines of different byte order):
 *   8 bytes   magic "FLEXKC01"
 *   u32       key length K
 *   u32       reserved (0)
 *   u64       blob size N
 *   u64       FNV-1a 64 of the blob
 *   K bytes   key
 *   N bytes   blob
 * The file name is the FNV-1a 64 of the key in hex; the full key inside
 * guards against hash collisions.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"

#define CACHE_MAGIC       "FLEXKC01"
#define CACHE_HEADER_SIZE 32

typedef struct cache_entry {
    char *key;
    void *data;
    size_t size;
    struct cache_entry *next;
} cache_entry;

struct flex_cache {
    pthread_mutex_t lock;
    cache_entry *entries;
    /* "" when the disk part is off; base, '/' and subdir always fit. */
    char dir[FLEX_CACHE_BASE_MAX + FLEX_CACHE_SUBDIR_MAX + 2];
};

uint64_t flex_cache_checksum(const void *data, size_t size) {
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < size; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* The folder the environment names (FLEXATTN_CACHE_DIR, else
 * $XDG_CACHE_HOME/flexattn, else ~/.cache/flexattn), written to base; or ""
 * when the disk part is off or there is nowhere to write. Returns 0, or -1
 * when the folder's path is longer than FLEX_CACHE_BASE_MAX, with the
 * variable to blame in *culprit. */
static int base_from_environment(char base[FLEX_CACHE_BASE_MAX + 1], const char **culprit) {
    const char *env = getenv("FLEXATTN_CACHE_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    int n;
    base[0] = 0;
    if (env && *env) {
        if (strcmp(env, "off") == 0) return 0;
        *culprit = "FLEXATTN_CACHE_DIR";
        n = snprintf(base, FLEX_CACHE_BASE_MAX + 1, "%s", env);
    } else if (xdg && *xdg) {
        *culprit = "XDG_CACHE_HOME";
        n = snprintf(base, FLEX_CACHE_BASE_MAX + 1, "%s/flexattn", xdg);
    } else if (home && *home) {
        *culprit = "HOME";
        n = snprintf(base, FLEX_CACHE_BASE_MAX + 1, "%s/.cache/flexattn", home);
    } else {
        return 0; /* nowhere to write: memory only */
    }
    if (n < 0 || n > FLEX_CACHE_BASE_MAX) {
        base[0] = 0;
        return -1;
    }
    return 0;
}

int flex_cache_check_environment(char *why, size_t cap) {
    char base[FLEX_CACHE_BASE_MAX + 1];
    const char *culprit = "";
    if (base_from_environment(base, &culprit) == 0) return 0;
    snprintf(why, cap,
             "the kernel cache folder from %s is longer than %d characters; set "
             "FLEXATTN_CACHE_DIR to a shorter path, or to 'off'",
             culprit, FLEX_CACHE_BASE_MAX);
    return -1;
}

flex_cache *flex_cache_open(const char *dir, const char *subdir) {
    flex_cache *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    pthread_mutex_init(&c->lock, NULL);
    char base[FLEX_CACHE_BASE_MAX + 1] = "";
    if (dir) {
        if (strlen(dir) > FLEX_CACHE_BASE_MAX) return c; /* never a cut path: memory only */
        snprintf(base, sizeof base, "%s", dir);
    } else {
        const char *culprit = "";
        if (base_from_environment(base, &culprit) != 0) return c;
    }
    if (!base[0] || !strcmp(base, "off")) return c;
    if (subdir && *subdir && strlen(subdir) <= FLEX_CACHE_SUBDIR_MAX)
        snprintf(c->dir, sizeof c->dir, "%s/%s", base, subdir);
    else if (!subdir || !*subdir)
        snprintf(c->dir, sizeof c->dir, "%s", base);
    return c;
}

void flex_cache_destroy(flex_cache *c) {
    if (!c) return;
    cache_entry *e = c->entries;
    while (e) {
        cache_entry *next = e->next;
        free(e->key);
        free(e->data);
        free(e);
        e = next;
    }
    pthread_mutex_destroy(&c->lock);
    free(c);
}

int flex_cache_disk_enabled(const flex_cache *c) {
    return c->dir[0] != 0;
}
const char *flex_cache_dir(const flex_cache *c) {
    return c->dir;
}

int flex_cache_entry_path(const flex_cache *c, const char *key, char *path, size_t cap) {
    if (!c->dir[0]) return -1;
    snprintf(path, cap, "%s/%016llx.bin", c->dir,
             (unsigned long long)flex_cache_checksum(key, strlen(key)));
    return 0;
}

/* Memory part; the caller holds the lock. */
static cache_entry *memory_find(flex_cache *c, const char *key) {
    for (cache_entry *e = c->entries; e; e = e->next)
        if (strcmp(e->key, key) == 0) return e;
    return NULL;
}

static void memory_store(flex_cache *c, const char *key, const void *data, size_t size) {
    cache_entry *e = memory_find(c, key);
    void *copy = malloc(size ? size : 1);
    if (!copy) return;
    memcpy(copy, data, size);
    if (e) {
        free(e->data);
        e->data = copy;
        e->size = size;
        return;
    }
    e = calloc(1, sizeof *e);
    char *k = strdup(key);
    if (!e || !k) {
        free(e);
        free(k);
        free(copy);
        return;
    }
    e->key = k;
    e->data = copy;
    e->size = size;
    e->next = c->entries;
    c->entries = e;
}

static int read_all(int fd, void *buf, size_t n) {
    unsigned char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t n) {
    const unsigned char *p = buf;
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Reads and verifies the disk entry of key; 1 and a malloc'd blob on
 * success, 0 when missing or invalid. */
static int disk_load(const flex_cache *c, const char *key, void **data, size_t *size) {
    char path[1200];
    if (flex_cache_entry_path(c, key, path, sizeof path) != 0) return 0;
    /* O_NONBLOCK: opening a FIFO someone left at the entry's path must not
     * wait for a writer; anything but a regular file is then a miss. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return 0;
    unsigned char header[CACHE_HEADER_SIZE];
    int ok = 0;
    char *file_key = NULL;
    void *blob = NULL;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) goto done;
    if (read_all(fd, header, sizeof header) != 0) goto done;
    if (memcmp(header, CACHE_MAGIC, 8) != 0) goto done;
    uint32_t key_len;
    uint64_t blob_size, sum;
    memcpy(&key_len, header + 8, 4);
    memcpy(&blob_size, header + 16, 8);
    memcpy(&sum, header + 24, 8);
    size_t klen = strlen(key);
    if (key_len != klen) goto done;
    if ((uint64_t)sb.st_size != CACHE_HEADER_SIZE + (uint64_t)key_len + blob_size) goto done;
    file_key = malloc(klen + 1);
    blob = malloc(blob_size ? (size_t)blob_size : 1);
    if (!file_key || !blob) goto done;
    if (read_all(fd, file_key, klen) != 0 || memcmp(file_key, key, klen) != 0) goto done;
    if (read_all(fd, blob, (size_t)blob_size) != 0) goto done;
    if (flex_cache_checksum(blob, (size_t)blob_size) != sum) goto done;
    ok = 1;
    *data = blob;
    *size = (size_t)blob_size;
    blob = NULL;
done:
    close(fd);
    free(file_key);
    free(blob);
    return ok;
}

/* mkdir -p */
static int make_dirs(const char *dir) {
    char tmp[sizeof((flex_cache *)0)->dir];
    snprintf(tmp, sizeof tmp, "%s", dir);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
    return 0;
}

static int disk_store(const flex_cache *c, const char *key, const void *data, size_t size) {
    char path[1200], tmp[1300];
    if (flex_cache_entry_path(c, key, path, sizeof path) != 0) return 0;
    if (make_dirs(c->dir) != 0) return -1;
    /* A name unique to this process and call, so concurrent writers never
     * share a temporary file; rename() then replaces atomically. */
    static _Atomic unsigned counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%u.%ld", path, (long)getpid(), counter++,
             (long)ts.tv_nsec);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0) return -1;
    unsigned char header[CACHE_HEADER_SIZE] = {0};
    memcpy(header, CACHE_MAGIC, 8);
    uint32_t key_len = (uint32_t)strlen(key);
    uint64_t blob_size = size, sum = flex_cache_checksum(data, size);
    memcpy(header + 8, &key_len, 4);
    memcpy(header + 16, &blob_size, 8);
    memcpy(header + 24, &sum, 8);
    int bad = write_all(fd, header, sizeof header) != 0 || write_all(fd, key, key_len) != 0 ||
              write_all(fd, data, size) != 0;
    if (close(fd) != 0) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

int flex_cache_get(flex_cache *c, const char *key, void **data, size_t *size, int *from_disk) {
    if (from_disk) *from_disk = 0;
    pthread_mutex_lock(&c->lock);
    cache_entry *e = memory_find(c, key);
    if (e) {
        void *copy = malloc(e->size ? e->size : 1);
        if (copy) {
            memcpy(copy, e->data, e->size);
            *data = copy;
            *size = e->size;
        }
        pthread_mutex_unlock(&c->lock);
        return copy != NULL;
    }
    pthread_mutex_unlock(&c->lock);
    void *blob;
    size_t n;
    if (!disk_load(c, key, &blob, &n)) return 0;
    pthread_mutex_lock(&c->lock);
    memory_store(c, key, blob, n);
    pthread_mutex_unlock(&c->lock);
    *data = blob;
    *size = n;
    if (from_disk) *from_disk = 1;
    return 1;
}

int flex_cache_put(flex_cache *c, const char *key, const void *data, size_t size) {
    pthread_mutex_lock(&c->lock);
    memory_store(c, key, data, size);
    pthread_mutex_unlock(&c->lock);
    return disk_store(c, key, data, size);
}
