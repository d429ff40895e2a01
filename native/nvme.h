/*
 * ctxkv's binding of libnvme (engine._nvme, built by native/nvme_build.py): discovery of
 * controllers and namespaces, Identify, Dataset Management, and NVMe-oF connect and
 * disconnect. Flat structs of fixed-size strings, so cffi reads them without knowing
 * libnvme's own types. Every function that can fail returns a negative errno.
 * Read by cffi as well as by the C compiler: plain declarations only.
 */

/* One namespace and the controller it is reached through. Strings are NUL-terminated
 * and trimmed of the padding spaces Identify carries. */
struct ctxkv_nvme_namespace {
    char controller[32];   /* nvme0 */
    char block_name[32];   /* nvme0n1: /dev/nvme0n1, the block-layer path */
    char generic_name[32]; /* ng0n1: /dev/ng0n1, the char device for passthrough */
    char model[48];
    char serial[32];
    char firmware[16];
    char transport[16];    /* pcie, tcp, loop, rdma, fc */
    char address[256];     /* traddr=...,trsvcid=... for fabrics; the PCI address otherwise */
    char subsystem_nqn[256];
    uint32_t nsid;
    uint32_t lba_bytes;      /* data size of the LBA format in use */
    uint32_t metadata_bytes; /* metadata bytes per LBA of that format */
    uint32_t lba_format;     /* index of the format in use (FLBAS) */
    uint32_t lba_format_count;
    uint32_t mdts;           /* Identify Controller MDTS: 2^mdts minimum pages; 0 = no limit */
    uint64_t lba_count;      /* NSZE */
    int32_t identify_error;  /* 0, or -errno / NVMe status when Identify failed */
    uint32_t reserved;
};

/* Fills up to capacity entries; returns how many namespaces there are (which may be more
 * than capacity: call again with room for all), or -errno. */
int ctxkv_nvme_scan(struct ctxkv_nvme_namespace *out, uint32_t capacity);

/* One entry of a discovery log page. */
struct ctxkv_nvme_discovery_entry {
    char transport[16];
    char address[256];
    char service[32];
    char subsystem_nqn[256];
    uint32_t subtype; /* 1 = referral to a discovery controller, 2 = NVM subsystem */
    uint32_t port_id;
};

/* Connects to the discovery controller at transport/address/service, reads its log
 * page, disconnects. Returns the number of entries (as ctxkv_nvme_scan does), or -errno. */
int ctxkv_nvme_discover(const char *transport, const char *address, const char *service,
                        struct ctxkv_nvme_discovery_entry *out, uint32_t capacity);

/* Connects to subsystem_nqn; writes the new controller's name (nvme1) to name. address
 * and service may be NULL (loop). Returns 0 or -errno. */
int ctxkv_nvme_connect(const char *transport, const char *address, const char *service,
                       const char *subsystem_nqn, char *name, uint32_t name_bytes);

/* Disconnects the fabrics controller named name (nvme1). */
int ctxkv_nvme_disconnect(const char *name);

/* Dataset Management, deallocate, of nlb blocks from slba on namespace nsid, through an
 * NVMe I/O command on fd (/dev/ngXnY or /dev/nvmeXnY). 0, -errno, or the positive NVMe
 * status the controller answered. */
int ctxkv_nvme_deallocate(int fd, uint32_t nsid, uint64_t slba, uint32_t nlb);

/* Words for an error these functions returned: libnvme's own codes (1000 and up) for
 * fabrics failures, strerror's otherwise. */
const char *ctxkv_nvme_strerror(int error_number);

/* Identify Namespace through fd (/dev/ngXnY or /dev/nvmeXnY): the data and metadata bytes
 * of the LBA format in use. 0, -errno, or the positive NVMe status. */
int ctxkv_nvme_lba_format(int fd, uint32_t nsid, uint32_t *lba_bytes, uint32_t *metadata_bytes);
