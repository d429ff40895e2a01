/* NVMe Read, Write and Flush as IORING_OP_URING_CMD: the block layer's request queue,
 * scheduler and bio splitting are skipped; the kernel maps the buffer and hands the
 * command to the controller's queue. No splitting happens below us, so ring.c chunks
 * every I/O at the namespace's max transfer (MDTS) first. */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <linux/nvme_ioctl.h>

#include "ctxkv.h"
#include "nvme_cmd.h"

_Static_assert(sizeof(struct nvme_uring_cmd) <= 80, "fits the big SQE's command area");

void ctxkv_prep_nvme_cmd(struct io_uring_sqe *sqe, uint8_t nvme_opcode, uint32_t file_index,
                         uint32_t nsid, uint32_t lba_shift, uint64_t offset, uint64_t addr,
                         uint32_t nbytes, uint16_t buf_index)
{
    /* A 128-byte SQE: the second half carries the command; clear it all. */
    memset(sqe, 0, 2 * sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = (int32_t)file_index;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->cmd_op = NVME_URING_CMD_IO;
    if (buf_index != CTXKV_UNREGISTERED_BUFFER && nvme_opcode != CTXKV_NVME_FLUSH) {
        /* The kernel maps a registered buffer once at registration, not per command. */
        sqe->uring_cmd_flags = IORING_URING_CMD_FIXED;
        sqe->buf_index = buf_index;
    }
    struct nvme_uring_cmd *cmd = (struct nvme_uring_cmd *)sqe->cmd;
    cmd->opcode = nvme_opcode;
    cmd->nsid = nsid;
    if (nvme_opcode == CTXKV_NVME_FLUSH)
        return;
    uint64_t slba = offset >> lba_shift;
    uint32_t blocks = nbytes >> lba_shift;
    cmd->addr = addr;
    cmd->data_len = nbytes;
    cmd->cdw10 = (uint32_t)slba;
    cmd->cdw11 = (uint32_t)(slba >> 32);
    cmd->cdw12 = blocks - 1; /* NLB is zero based; bits 31:16 (FUA, PRINFO...) stay 0 */
}

int64_t ctxkv_nvme_cmd_result(int32_t res, uint32_t nbytes)
{
    if (res < 0)
        return res;
    return res == 0 ? (int64_t)nbytes : -EIO;
}
