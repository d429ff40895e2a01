/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as iSCSI, ext4 and the `crc32c`
 * PyPI package compute it. Every extent is checksummed on put and on get, on the critical
 * path of both, so the SSE4.2 version runs three streams at once. The portable
 * slicing-by-8 version serves CPUs without SSE4.2, and tests pin the two to each other. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ctxkv.h"

#define CTXKV_CRC32C_POLY 0x82F63B78u

static uint32_t crc_table[8][256];
static int crc_table_ready;

static void crc_table_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ CTXKV_CRC32C_POLY : crc >> 1;
        crc_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc_table[0][crc & 0xff] ^ (crc >> 8);
            crc_table[k][n] = crc;
        }
    }
    __atomic_store_n(&crc_table_ready, 1, __ATOMIC_RELEASE);
}

uint32_t ctxkv_crc32c_portable(uint32_t crc, const void *data, size_t nbytes)
{
    if (!__atomic_load_n(&crc_table_ready, __ATOMIC_ACQUIRE))
        crc_table_init(); /* idempotent: racing threads write identical tables */
    const unsigned char *p = data;
    crc = ~crc;
    while (nbytes >= 8) {
        uint64_t word;
        memcpy(&word, p, 8); /* little-endian load, alignment-free */
        word ^= crc;
        crc = crc_table[7][word & 0xff] ^ crc_table[6][(word >> 8) & 0xff] ^
              crc_table[5][(word >> 16) & 0xff] ^ crc_table[4][(word >> 24) & 0xff] ^
              crc_table[3][(word >> 32) & 0xff] ^ crc_table[2][(word >> 40) & 0xff] ^
              crc_table[1][(word >> 48) & 0xff] ^ crc_table[0][word >> 56];
        p += 8;
        nbytes -= 8;
    }
    while (nbytes--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
/* Three independent crc32q chains over adjacent blocks of STREAM_BYTES, combined with a
 * table that advances a CRC register over STREAM_BYTES zero bytes (CRC is linear:
 * crc(A||B) = advance(crc(A), |B|) ^ crc_from_zero(B)). The instruction has a latency of
 * 3 cycles and a throughput of 1, so three chains run ~3x faster than one. */
#define STREAM_BYTES 8192u

static uint32_t advance_table[4][256];
static int advance_table_ready;

__attribute__((target("sse4.2"))) static uint32_t advance_slow(uint32_t reg)
{
    uint64_t r = reg;
    for (unsigned i = 0; i < STREAM_BYTES / 8; i++)
        r = __builtin_ia32_crc32di(r, 0);
    return (uint32_t)r;
}

static void advance_table_init(void)
{
    for (unsigned k = 0; k < 4; k++)
        for (unsigned b = 0; b < 256; b++)
            advance_table[k][b] = advance_slow((uint32_t)b << (8 * k));
    __atomic_store_n(&advance_table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t advance(uint32_t reg)
{
    return advance_table[0][reg & 0xff] ^ advance_table[1][(reg >> 8) & 0xff] ^
           advance_table[2][(reg >> 16) & 0xff] ^ advance_table[3][reg >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *data,
                                                                 size_t nbytes)
{
    const unsigned char *p = data;
    uint64_t crc64 = ~crc;
    while (nbytes && ((uintptr_t)p & 7)) {
        crc64 = __builtin_ia32_crc32qi((uint32_t)crc64, *p++);
        nbytes--;
    }
    if (nbytes >= 3 * STREAM_BYTES) {
        if (!__atomic_load_n(&advance_table_ready, __ATOMIC_ACQUIRE))
            advance_table_init(); /* idempotent: racing threads write identical tables */
        while (nbytes >= 3 * STREAM_BYTES) {
            uint64_t a = crc64, b = 0, c = 0;
            for (unsigned i = 0; i < STREAM_BYTES; i += 8) {
                uint64_t wa, wb, wc;
                memcpy(&wa, p + i, 8);
                memcpy(&wb, p + STREAM_BYTES + i, 8);
                memcpy(&wc, p + 2 * STREAM_BYTES + i, 8);
                a = __builtin_ia32_crc32di(a, wa);
                b = __builtin_ia32_crc32di(b, wb);
                c = __builtin_ia32_crc32di(c, wc);
            }
            crc64 = advance(advance((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
            p += 3 * STREAM_BYTES;
            nbytes -= 3 * STREAM_BYTES;
        }
    }
    while (nbytes >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc64 = __builtin_ia32_crc32di(crc64, word);
        p += 8;
        nbytes -= 8;
    }
    while (nbytes--)
        crc64 = __builtin_ia32_crc32qi((uint32_t)crc64, *p++);
    return ~(uint32_t)crc64;
}

int ctxkv_crc32c_hardware(void)
{
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

uint32_t ctxkv_crc32c(uint32_t crc, const void *data, size_t nbytes)
{
    static int hardware = -1; /* racing first calls store the same answer */
    if (hardware < 0)
        hardware = ctxkv_crc32c_hardware();
    return hardware ? crc32c_sse42(crc, data, nbytes) : ctxkv_crc32c_portable(crc, data, nbytes);
}
#else
int ctxkv_crc32c_hardware(void)
{
    return 0;
}

uint32_t ctxkv_crc32c(uint32_t crc, const void *data, size_t nbytes)
{
    return ctxkv_crc32c_portable(crc, data, nbytes);
}
#endif

uint32_t ctxkv_copy_crc32c(void *dst, const void *src, size_t nbytes)
{
    /* Pieces small enough to stay in L2 between the copy and the checksum. */
    enum { PIECE_BYTES = 128 << 10 };
    unsigned char *to = dst;
    const unsigned char *from = src;
    uint32_t crc = 0;
    while (nbytes) {
        size_t piece = nbytes < PIECE_BYTES ? nbytes : PIECE_BYTES;
        memcpy(to, from, piece);
        crc = ctxkv_crc32c(crc, to, piece);
        to += piece;
        from += piece;
        nbytes -= piece;
    }
    return crc;
}
