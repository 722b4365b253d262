/*
 * hs-generic-platform: make hyperscan compile for its generic x86-64 target,
 * so that the caches rspamd compiles are the same on every machine.
 *
 * rspamd names each hyperscan cache after a hash of its patterns and of
 * hs_populate_platform()'s answer (the CPU's tuning family and AVX2/AVX-512
 * flags). With the real answer, a cache compiled when the image is built
 * only fits a machine whose CPU reports the same: everywhere else rspamd
 * compiles the public suffix list again on first start (10 s natively,
 * minutes under emulation). With this answer the name and the database are
 * the same everywhere, so the image ships the compiled list
 * (recipes/rspamd/mkosi.postinst.chroot), and a generic database runs on any
 * x86-64 CPU that hyperscan supports at all (hs_valid_platform: SSSE3).
 * The cost is that hyperscan does not use AVX2/AVX-512 code paths for
 * rspamd's patterns: a little slower matching, at a household's mail volume
 * not measurable (bench/stack.py).
 *
 * Loaded with LD_PRELOAD by the container's entry point; nothing else
 * in hyperscan changes.
 */
#include <string.h>
#include <hs/hs.h>

hs_error_t HS_CDECL hs_populate_platform(hs_platform_info_t *platform)
{
    if (platform == NULL) {
        return HS_INVALID;
    }
    memset(platform, 0, sizeof(*platform));
    platform->tune = HS_TUNE_FAMILY_GENERIC;
    platform->cpu_features = 0;
    return HS_SUCCESS;
}
