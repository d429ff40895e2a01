/* NVMe I/O commands as io_uring passthrough SQEs (IORING_OP_URING_CMD on /dev/ngXnY).
 * Private to the native core (ring.c); not read by cffi. */
#ifndef CTXKV_NVME_CMD_H
#define CTXKV_NVME_CMD_H

#include <stdint.h>

#include <liburing.h>

enum ctxkv_nvme_io_opcode {
    CTXKV_NVME_FLUSH = 0x00,
    CTXKV_NVME_WRITE = 0x01,
    CTXKV_NVME_READ = 0x02,
};

/* Fills sqe (of a SQE128 ring) with one NVMe command on registered file file_index.
 * nbytes and offset are whole blocks of 2^lba_shift bytes; buf_index is a registered
 * buffer, or CTXKV_UNREGISTERED_BUFFER. FLUSH ignores offset, addr and nbytes. */
void ctxkv_prep_nvme_cmd(struct io_uring_sqe *sqe, uint8_t nvme_opcode, uint32_t file_index,
                         uint32_t nsid, uint32_t lba_shift, uint64_t offset, uint64_t addr,
                         uint32_t nbytes, uint16_t buf_index);

/* An NVMe passthrough completion's res as the byte count or -errno ring.c reports:
 * 0 is success (nbytes moved), a positive value is the NVMe status (-EIO). */
int64_t ctxkv_nvme_cmd_result(int32_t res, uint32_t nbytes);

#endif
