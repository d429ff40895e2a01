/* The buffer arena: one mapping for the whole pool, sized at start-up, locked so the
 * kernel never pages it out from under io_uring or an RDMA NIC. 2 MiB hugetlb pages when
 * the administrator reserved some (fewer TLB misses, fewer pages to pin); otherwise normal
 * pages with a transparent-hugepage hint. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/mman.h>

#include "ctxkv.h"

#define CTXKV_HUGEPAGE_BYTES (2u << 20)

int ctxkv_arena_map(uint64_t nbytes, int try_hugetlb, struct ctxkv_arena *arena)
{
    arena->addr = 0;
    arena->nbytes = 0;
    arena->backing = 0;
    arena->failed_step = 0;
    if (nbytes == 0 || nbytes % CTXKV_HUGEPAGE_BYTES != 0)
        return -EINVAL;

    void *addr = MAP_FAILED;
    int backing = CTXKV_ARENA_HUGETLB;
    if (try_hugetlb)
        addr = mmap(NULL, nbytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE, -1, 0);
    if (addr == MAP_FAILED) {
        backing = CTXKV_ARENA_THP;
        addr = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (addr == MAP_FAILED) {
            arena->failed_step = CTXKV_ARENA_STEP_MMAP;
            return -errno;
        }
        (void)madvise(addr, nbytes, MADV_HUGEPAGE); /* a hint: refusal is harmless */
    }
    /* mlock also faults every page in, so the first I/O does not pay for it. */
    if (mlock(addr, nbytes) != 0) {
        int error = errno;
        munmap(addr, nbytes);
        arena->failed_step = CTXKV_ARENA_STEP_MLOCK;
        return -error;
    }
    arena->addr = (uint64_t)(uintptr_t)addr;
    arena->nbytes = nbytes;
    arena->backing = backing;
    return 0;
}

int ctxkv_arena_unmap(struct ctxkv_arena *arena)
{
    if (arena->addr == 0)
        return 0;
    if (munmap((void *)(uintptr_t)arena->addr, arena->nbytes) != 0)
        return -errno;
    arena->addr = 0;
    arena->nbytes = 0;
    return 0;
}
