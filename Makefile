# Two commands do everything on a fresh Debian machine, as root:
#   make demo   set up, then run the main job on a file-backed default
#   make test   set up, then run the test suite
# Setup installs the Debian packages ctxkv needs (only those missing), makes .venv and
# builds the native core into it, then adds LMCache (CPU) for the plugin's tests.
#   make bench  the KV-cache workload against LMCache and fio (bench/kvsim)

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := gcc make pkg-config python3-venv python3-dev liburing-dev libnvme-dev \
	fio strace e2fsprogs util-linux qemu-system-x86 busybox-static nvme-cli
DEMO_DIR ?= /var/tmp/ctxkv-demo
DEMO_TARGET := $(DEMO_DIR)/target.img

.PHONY: setup system-packages demo test test-nvme test-crash lint bench-raw bench-store bench-nixl clean

setup: system-packages $(VENV)/.installed $(VENV)/.lmcache $(VENV)/.nixl

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

$(VENV)/.installed: setup.py pyproject.toml native/*.c native/*.h native/*.py
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# LMCache on the CPU, for the plugin's end-to-end test and bench/kvsim: torch's CPU build
# first (so nothing pulls a CUDA one), lmcache without its CUDA dependencies, then the
# imports it makes (requirements/lmcache.txt).
$(VENV)/.lmcache: requirements/lmcache.txt $(VENV)/.installed
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps lmcache==0.5.6
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/lmcache.txt
	touch $@

# NIXL (the extra ctxkv[nixl], requirements/nixl.txt) for `ctxkv serve --nixl`, its
# client and tests/test_nixl.py; after LMCache's step, whose CPU torch it reuses.
$(VENV)/.nixl: requirements/nixl.txt $(VENV)/.lmcache
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/nixl.txt
	touch $@

# The main job: `ctxkv demo` formats a store on a file, serves it, runs a KV workload
# through the client and prints it; then put and get workloads of 4 MiB values through
# the store, side by side with ctxkv's raw path and fio on the same file, then a scrub.
# 64 hugepages are reserved for the run (and given back) so fio's buffers are hugepage
# backed like ctxkv's; without them fio is 2-4x slower here and the ratios mean nothing.
demo: setup
	$(BIN)/ctxkv demo --dir $(DEMO_DIR)
	mkdir -p $(DEMO_DIR)
	test -f $(DEMO_TARGET) || truncate -s 1G $(DEMO_TARGET)
	before=$$(cat /proc/sys/vm/nr_hugepages); \
	trap 'echo $$before > /proc/sys/vm/nr_hugepages' EXIT; \
	echo $$((before + 64)) > /proc/sys/vm/nr_hugepages; \
	$(BIN)/ctxkv bench --mode store --compare-fio --rounds 2 --rw write --bs 4M --iodepth 8 --size 512M $(DEMO_TARGET) && \
	$(BIN)/ctxkv bench --mode store --compare-fio --rounds 2 --rw read --bs 4M --iodepth 8 --size 512M $(DEMO_TARGET)
	$(BIN)/ctxkv scrub $(DEMO_TARGET)

test: setup lint
	$(BIN)/pytest -q -m "not nvme_vm"

# The QEMU tier (tests/test_nvme_vm.py): one guest with an emulated NVMe controller runs
# identify, both I/O paths, a store on each and NVMe-oF tcp + loop targets. The guest
# kernel is downloaded once into $$CTXKV_VM_CACHE (default /var/cache/ctxkv-vm).
test-nvme: setup
	$(BIN)/pytest -v -s -m nvme_vm tests/test_nvme_vm.py

# The long proof (docs/guarantees.md): every history of up to 3 ops crashed at every
# flush point, 2,000 random seeds, 20 kill -9 rounds of ctxkv serve, and 2,000 fuzz cases
# per parser. `make test` runs a quick slice of each. Prints the counts.
test-crash: setup
	CTXKV_CRASH_SEEDS=2000 CTXKV_CRASH_EXHAUSTIVE_LENGTH=3 CTXKV_SERVER_KILL_ROUNDS=20 \
	CTXKV_FUZZ_EXAMPLES=2000 $(BIN)/pytest -q -s \
		tests/test_crash_histories.py tests/test_server_crash.py tests/test_corruption.py \
		tests/test_device_errors.py tests/test_fuzz.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Acceptance figures of the raw path: ctxkv vs fio on a loop device and a file.
bench-raw: setup
	$(BIN)/python bench/raw_vs_fio.py

# Acceptance figures of the store: bandwidth vs fio, write amplification, recovery time,
# and the index's bytes per key and lookups per second.
bench-store: setup
	$(BIN)/python bench/store_vs_fio.py
	$(BIN)/python bench/index_bench.py

# NIXL get through ctxkv (serve --nixl) against a bare NIXL READ of the same buffers by
# the same agents, interleaved rounds: the READ phase alone and end to end (device read
# included), with TCP for context. Writes bench/results/nixl.txt. ~1 minute.
bench-nixl: setup
	$(BIN)/python bench/nixl_get.py

# A KV-cache workload (bench/kvsim) on ctxkv in-process and served, LMCache's local disk
# backend, its lm:// server and LMCache with the ctxkv plugin, against fio on the same
# file: the comparison table, bench/results/kvsim.json and its PNG plots. ~5 minutes.
.PHONY: bench
bench: setup
	PYTHONHASHSEED=0 $(BIN)/python -m bench.kvsim

clean:
	rm -rf $(VENV) build engine/_native.c engine/_native.o engine/_native*.so *.egg-info
