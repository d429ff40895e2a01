/* libnvme, wrapped for ctxkv: see nvme.h. One scan of the sysfs topology per call; nothing
 * is kept between calls, so a controller that comes or goes is seen at the next one. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include <libnvme.h>
#include <linux/nvme_ioctl.h>

#include "nvme.h"

enum { CTXKV_NVME_OP_DSM = 0x09, CTXKV_DSM_DEALLOCATE = 1 << 2, LOG_LEVEL_QUIET = 0 };

static void copy_text(char *dst, size_t dst_bytes, const char *src, size_t src_bytes)
{
    size_t n = 0;
    if (src)
        n = strnlen(src, src_bytes < dst_bytes - 1 ? src_bytes : dst_bytes - 1);
    memcpy(dst, src ? src : "", n);
    while (n > 0 && (dst[n - 1] == ' ' || dst[n - 1] == '\n'))
        n--; /* Identify strings are space padded; sysfs ones end in a newline */
    dst[n] = '\0';
}

#define COPY(dst, src) copy_text((dst), sizeof(dst), (src), (size_t)-1)

/* FLBAS bits 3:0 are the low four bits of the format index, bits 6:5 the high two. */
static uint32_t lba_format_in_use(const struct nvme_id_ns *id_ns)
{
    return (id_ns->flbas & 0x0F) | ((uint32_t)(id_ns->flbas & 0x60) >> 1);
}

static void fill_namespace(struct ctxkv_nvme_namespace *out, nvme_subsystem_t s, nvme_ctrl_t c,
                           nvme_ns_t n)
{
    memset(out, 0, sizeof(*out));
    COPY(out->controller, nvme_ctrl_get_name(c));
    COPY(out->block_name, nvme_ns_get_name(n));
    COPY(out->generic_name, nvme_ns_get_generic_name(n));
    COPY(out->model, nvme_ctrl_get_model(c));
    COPY(out->serial, nvme_ctrl_get_serial(c));
    COPY(out->firmware, nvme_ctrl_get_firmware(c));
    COPY(out->transport, nvme_ctrl_get_transport(c));
    COPY(out->address, nvme_ctrl_get_address(c));
    COPY(out->subsystem_nqn, nvme_subsystem_get_nqn(s));
    out->nsid = (uint32_t)nvme_ns_get_nsid(n);
    out->lba_bytes = (uint32_t)nvme_ns_get_lba_size(n);
    out->metadata_bytes = (uint32_t)nvme_ns_get_meta_size(n);
    out->lba_count = nvme_ns_get_lba_count(n);

    struct nvme_id_ctrl id_ctrl;
    struct nvme_id_ns id_ns;
    int result = nvme_ctrl_identify(c, &id_ctrl);
    if (result == 0) {
        out->mdts = id_ctrl.mdts;
        result = nvme_ns_identify(n, &id_ns);
    }
    if (result != 0) {
        out->identify_error = result < 0 ? -errno : result;
        return;
    }
    uint32_t format = lba_format_in_use(&id_ns);
    out->lba_format = format;
    out->lba_format_count = id_ns.nlbaf + 1u;
    out->lba_bytes = 1u << id_ns.lbaf[format].ds;
    out->metadata_bytes = le16toh(id_ns.lbaf[format].ms);
    out->lba_count = le64toh(id_ns.nsze);
}

static int already_listed(const struct ctxkv_nvme_namespace *out, uint32_t filled,
                          const char *name)
{
    for (uint32_t i = 0; i < filled; i++)
        if (strcmp(out[i].block_name, name) == 0)
            return 1;
    return 0;
}

int ctxkv_nvme_scan(struct ctxkv_nvme_namespace *out, uint32_t capacity)
{
    nvme_root_t r = nvme_create_root(NULL, LOG_LEVEL_QUIET);
    if (!r)
        return -ENOMEM;
    int result = nvme_scan_topology(r, NULL, NULL);
    if (result < 0) {
        result = errno;
        nvme_free_tree(r);
        /* No /sys/class/nvme-subsystem: no NVMe driver loaded, so no namespaces. */
        return result == ENOENT ? 0 : -(result ? result : EIO);
    }
    uint32_t count = 0;
    nvme_host_t h;
    nvme_subsystem_t s;
    nvme_ctrl_t c;
    nvme_ns_t n;
    nvme_for_each_host(r, h) {
        nvme_for_each_subsystem(h, s) {
            /* With native multipath the namespaces hang off the subsystem, reached
             * through its first live controller; without it, off each controller. */
            nvme_ctrl_t first = nvme_subsystem_first_ctrl(s);
            nvme_subsystem_for_each_ns(s, n) {
                if (!first)
                    break;
                if (count < capacity && !already_listed(out, count, nvme_ns_get_name(n)))
                    fill_namespace(&out[count], s, first, n);
                count++;
            }
            nvme_subsystem_for_each_ctrl(s, c) {
                nvme_ctrl_for_each_ns(c, n) {
                    if (count < capacity) {
                        if (already_listed(out, count, nvme_ns_get_name(n)))
                            continue;
                        fill_namespace(&out[count], s, c, n);
                    }
                    count++;
                }
            }
        }
    }
    nvme_free_tree(r);
    return (int)count;
}

static nvme_ctrl_t create_ctrl(nvme_root_t r, const char *transport, const char *address,
                               const char *service, const char *nqn)
{
    return nvme_create_ctrl(r, nqn, transport, address, NULL, NULL, service);
}

static int add_ctrl(nvme_root_t r, nvme_ctrl_t c)
{
    struct nvme_fabrics_config config;
    nvmf_default_config(&config);
    nvme_host_t h = nvme_default_host(r);
    if (!h)
        return -ENOMEM;
    if (nvmf_add_ctrl(h, c, &config) != 0)
        return errno ? -errno : -EIO;
    return 0;
}

int ctxkv_nvme_discover(const char *transport, const char *address, const char *service,
                        struct ctxkv_nvme_discovery_entry *out, uint32_t capacity)
{
    nvme_root_t r = nvme_create_root(NULL, LOG_LEVEL_QUIET);
    if (!r)
        return -ENOMEM;
    int result = 0;
    nvme_ctrl_t c = create_ctrl(r, transport, address, service, NVME_DISC_SUBSYS_NAME);
    if (!c) {
        result = errno ? -errno : -EINVAL;
        goto out;
    }
    result = add_ctrl(r, c);
    if (result < 0) {
        nvme_free_ctrl(c);
        goto out;
    }
    struct nvmf_discovery_log *log = NULL;
    if (nvmf_get_discovery_log(c, &log, 4) != 0) {
        result = errno ? -errno : -EIO;
    } else {
        uint64_t records = le64toh(log->numrec);
        for (uint64_t i = 0; i < records && i < capacity; i++) {
            const struct nvmf_disc_log_entry *e = &log->entries[i];
            struct ctxkv_nvme_discovery_entry *d = &out[i];
            memset(d, 0, sizeof(*d));
            COPY(d->transport, nvmf_trtype_str(e->trtype));
            copy_text(d->address, sizeof(d->address), e->traddr, sizeof(e->traddr));
            copy_text(d->service, sizeof(d->service), e->trsvcid, sizeof(e->trsvcid));
            copy_text(d->subsystem_nqn, sizeof(d->subsystem_nqn), e->subnqn,
                      sizeof(e->subnqn));
            d->subtype = e->subtype;
            d->port_id = le16toh(e->portid);
        }
        result = records > INT32_MAX ? INT32_MAX : (int)records;
        free(log);
    }
    nvme_disconnect_ctrl(c);
    nvme_free_ctrl(c);
out:
    nvme_free_tree(r);
    return result;
}

int ctxkv_nvme_connect(const char *transport, const char *address, const char *service,
                       const char *subsystem_nqn, char *name, uint32_t name_bytes)
{
    if (name_bytes == 0)
        return -EINVAL;
    nvme_root_t r = nvme_create_root(NULL, LOG_LEVEL_QUIET);
    if (!r)
        return -ENOMEM;
    int result;
    nvme_ctrl_t c = create_ctrl(r, transport, address, service, subsystem_nqn);
    if (!c) {
        result = errno ? -errno : -EINVAL;
    } else {
        result = add_ctrl(r, c);
        if (result == 0)
            copy_text(name, name_bytes, nvme_ctrl_get_name(c), (size_t)-1);
        nvme_free_ctrl(c);
    }
    nvme_free_tree(r);
    return result;
}

int ctxkv_nvme_disconnect(const char *name)
{
    nvme_root_t r = nvme_create_root(NULL, LOG_LEVEL_QUIET);
    if (!r)
        return -ENOMEM;
    int result = -ENODEV;
    if (nvme_scan_topology(r, NULL, NULL) == 0) {
        nvme_host_t h;
        nvme_subsystem_t s;
        nvme_ctrl_t c;
        nvme_for_each_host(r, h) nvme_for_each_subsystem(h, s) nvme_subsystem_for_each_ctrl(s, c)
        {
            if (result == -ENODEV && strcmp(nvme_ctrl_get_name(c), name) == 0) {
                const char *transport = nvme_ctrl_get_transport(c);
                if (transport && strcmp(transport, "pcie") == 0)
                    result = -EOPNOTSUPP; /* a local controller is not ours to drop */
                else
                    result = nvme_disconnect_ctrl(c) == 0 ? 0 : (errno ? -errno : -EIO);
            }
        }
    }
    nvme_free_tree(r);
    return result;
}

int ctxkv_nvme_deallocate(int fd, uint32_t nsid, uint64_t slba, uint32_t nlb)
{
    if (nlb == 0)
        return -EINVAL;
    /* One range descriptor: context attributes, length in blocks, starting LBA. */
    struct {
        uint32_t cattr;
        uint32_t nlb;
        uint64_t slba;
    } __attribute__((aligned(4096))) range = {0, htole32(nlb), htole64(slba)};
    struct nvme_passthru_cmd cmd;
    memset(&cmd, 0, sizeof(cmd));
    cmd.opcode = CTXKV_NVME_OP_DSM;
    cmd.nsid = nsid;
    cmd.addr = (uint64_t)(uintptr_t)&range;
    cmd.data_len = sizeof(range);
    cmd.cdw10 = 0; /* number of ranges, zero based */
    cmd.cdw11 = CTXKV_DSM_DEALLOCATE;
    int result = ioctl(fd, NVME_IOCTL_IO_CMD, &cmd);
    return result < 0 ? -errno : result;
}

const char *ctxkv_nvme_strerror(int error_number)
{
    return error_number >= ENVME_CONNECT_RESOLVE ? nvme_errno_to_string(error_number)
                                                 : strerror(error_number);
}

int ctxkv_nvme_lba_format(int fd, uint32_t nsid, uint32_t *lba_bytes, uint32_t *metadata_bytes)
{
    struct nvme_id_ns id_ns;
    int result = nvme_identify_ns(fd, nsid, &id_ns);
    if (result != 0)
        return result < 0 ? -errno : result;
    uint32_t format = lba_format_in_use(&id_ns);
    *lba_bytes = 1u << id_ns.lbaf[format].ds;
    *metadata_bytes = le16toh(id_ns.lbaf[format].ms);
    return 0;
}
