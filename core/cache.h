/*
 * The kernel cache (core/cache.c): a blob store keyed by a string, in memory
 * and on disk. Backends key compiled kernel binaries by everything that
 * decides them (mod hashes, template version, dtype, head dims, tile
 * config, arch, compiler version); the cache knows nothing of kernels.
 *
 * Disk: FLEXATTN_CACHE_DIR, or $XDG_CACHE_HOME/flexattn, or
 * ~/.cache/flexattn; "off" keeps the cache in memory only. Each entry is one
 * file written to a temporary name and renamed into place, so two processes
 * filling the same key never see half a file. A file starts with a magic,
 * the full key and a checksum of the blob; an entry whose header, key, size
 * or checksum does not match is treated as missing (and rewritten by the
 * next put), and so is anything at an entry's path that is not a regular
 * file (a FIFO there never blocks a lookup).
 */
#ifndef FLEXATTN_CACHE_H
#define FLEXATTN_CACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct flex_cache flex_cache;

/* The longest folder (dir or the one the environment names) and subdir the
 * cache takes; entry paths always fit their buffers. A longer folder is
 * never cut: flex_context_create refuses it (flex_cache_check_environment)
 * and flex_cache_open keeps such a cache in memory. */
#define FLEX_CACHE_BASE_MAX   960
#define FLEX_CACHE_SUBDIR_MAX 32

/* 0 when the folder the environment names fits FLEX_CACHE_BASE_MAX (or the
 * disk part is off); otherwise -1 and, in why, a message that names the
 * variable. Called by context creation, so a bad setting is an error. */
int flex_cache_check_environment(char *why, size_t cap);

/* Opens a cache whose disk entries live in <dir>/<subdir>/ (subdir e.g.
 * "cuda"). dir == NULL reads the environment as described above. The
 * folder is created on the first put. NULL only on out of memory. The
 * caller owns the result (flex_cache_destroy). Thread-safe. */
flex_cache *flex_cache_open(const char *dir, const char *subdir);
void flex_cache_destroy(flex_cache *cache);

/* 1: the disk part is in use; 0: memory only. */
int flex_cache_disk_enabled(const flex_cache *cache);
/* The folder of disk entries ("" when off). Owned by the cache. */
const char *flex_cache_dir(const flex_cache *cache);

/* Looks up key: memory first, then disk (a disk hit is remembered in
 * memory). On a hit returns 1 and *data (malloc'd, caller frees) / *size;
 * on a miss 0. *from_disk (may be NULL) tells where the hit came from. */
int flex_cache_get(flex_cache *cache, const char *key, void **data, size_t *size, int *from_disk);

/* Stores a copy of data under key in memory and (when enabled) on disk.
 * Returns 0, or -1 when the disk write failed (the memory entry is still
 * made; a cache that cannot write is slower, never wrong). */
int flex_cache_put(flex_cache *cache, const char *key, const void *data, size_t size);

/* The disk file an entry for key would use (for tests). Writes at most cap
 * bytes; returns 0, or -1 when the disk part is off. */
int flex_cache_entry_path(const flex_cache *cache, const char *key, char *path, size_t cap);

/* 64-bit FNV-1a, the checksum of entries (exposed for tests). */
uint64_t flex_cache_checksum(const void *data, size_t size);

#endif /* FLEXATTN_CACHE_H */
