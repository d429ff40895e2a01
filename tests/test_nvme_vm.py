"""The QEMU test tier: real NVMe, NVMe passthrough and NVMe-oF in a guest (vm/run.sh).

One guest boots for the whole module and runs tests/nvme_vm/guest_batch.py, which
writes what it measured to a JSON file on a shared folder; the tests here assert on it.
`make test-nvme` runs this module (`make test` leaves it to that target; .ci/run runs
both). Costs: the kernel .deb is downloaded once into CTXKV_VM_CACHE
(/var/cache/ctxkv-vm); a boot with the whole batch takes a few minutes under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.nvme_vm

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "vm" / "run.sh"
BATCH = REPO / "tests" / "nvme_vm" / "guest_batch.py"
# What vm/run.sh tells QEMU to emulate; identify must report exactly this.
SERIAL = "ctxkv0001"
MODEL = "QEMU NVMe Ctrl"
LBA_BYTES = 512
MDTS = 7  # 2^7 pages of 4 KiB = 512 KiB
DISK_MB = 1024
GUEST_TIMEOUT_S = 330
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static", "nvme": "nvme-cli"}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: install {package} (`make setup` does)")
    results_dir = tmp_path_factory.mktemp("nvme-vm")
    python = Path(sys.prefix) / "bin" / "python"
    (results_dir / "job").write_text(
        f"set -u\ncd {REPO}\nexec {python} -u {BATCH} /results/results.json\n"
    )
    environment = {
        **os.environ,
        "CTXKV_VM_SERIAL": SERIAL,
        "CTXKV_VM_MDTS": str(MDTS),
        "CTXKV_VM_DISK_MB": str(DISK_MB),
        "CTXKV_VM_TIMEOUT_S": str(GUEST_TIMEOUT_S),
    }
    started = time.monotonic()
    completed = subprocess.run(
        [str(RUN), str(results_dir)], env=environment, capture_output=True, text=True
    )
    elapsed_s = time.monotonic() - started
    log = (results_dir / "log").read_text() if (results_dir / "log").exists() else ""
    print(f"\n--- guest (vm/run.sh exit {completed.returncode}, {elapsed_s:.0f}s) ---\n{log}")
    print(completed.stderr)
    results_file = results_dir / "results.json"
    if not results_file.exists():
        console = (results_dir / "console").read_text(errors="replace")[-3000:]
        pytest.fail(
            f"the guest wrote no results (exit {completed.returncode}); console:\n{console}"
        )
    return json.loads(results_file.read_text())


def result_of(guest: dict, check: str) -> dict:
    entry = guest["checks"].get(check)
    assert entry is not None, f"the guest did not reach check {check}"
    assert entry["ok"], f"check {check} failed in the guest:\n{entry['traceback']}"
    return entry["result"]


def test_identify_matches_the_emulated_controller(guest: dict) -> None:
    result = result_of(guest, "identify")
    local = [ns for ns in result["namespaces"] if ns["block_path"] == "/dev/nvme0n1"]
    assert len(local) == 1, result["namespaces"]
    ns = local[0]
    assert ns["serial"] == SERIAL
    assert ns["model"] == MODEL
    assert ns["lba_bytes"] == LBA_BYTES
    assert ns["metadata_bytes"] == 0
    assert ns["mdts"] == MDTS and ns["mdts_bytes"] == 4096 << MDTS
    assert ns["capacity_bytes"] == DISK_MB << 20
    assert ns["nsid"] == 1
    assert ns["transport"] == "pcie"
    assert ns["generic_path"] == "/dev/ng0n1"
    assert ns["identify_error"] == 0
    # nvme-cli reads the same controller through its own code: the binding agrees.
    cli = result["nvme_cli"]
    assert (cli["serial"], cli["model"], cli["mdts"]) == (ns["serial"], ns["model"], ns["mdts"])
    assert cli["firmware"] == ns["firmware"]
    assert cli["nsze"] == ns["lba_count"]
    assert (cli["lba_bytes"], cli["metadata_bytes"]) == (ns["lba_bytes"], ns["metadata_bytes"])


def test_devices_json_lists_the_namespace_holding_nothing(guest: dict) -> None:
    result = result_of(guest, "devices_json")
    assert result["exit_status"] == 0
    (entry,) = [d for d in result["devices"] if d["block_path"] == "/dev/nvme0n1"]
    assert entry["holds"] == []
    assert entry["serial"] == SERIAL


def test_passthru_ring_moves_bytes_and_deallocates(guest: dict) -> None:
    result = result_of(guest, "passthru_ring")
    assert result["io_path"] == "passthru"
    assert result["generic_path"] == "/dev/ng0n1"
    assert result["nsid"] == 1 and result["lba_shift"] == 9
    assert result["chunk_bytes"] <= 4096 << MDTS
    assert {"SQE128", "CQE32"} <= set(result["ring_setup_flags"])
    assert result["fixed_buffers"]  # the guest runs 6.12: IORING_URING_CMD_FIXED
    assert result["registered_buffer_round_trip"]
    assert result["plain_buffer_round_trip"]
    assert result["zeros_after_deallocate"]


def assert_store_round_trip(result: dict, io_path: str, member_count: int) -> None:
    assert result["device_io_paths"] == [io_path] * member_count
    assert result["verified"] == result["values"] == 4
    # The largest value spans 4 extents; every value came back byte for byte.
    assert result["value_bytes"] > 3 * result["extent_bytes"]
    for path, reopened in result["reopened"].items():
        chosen = "passthru" if path == "auto" else path
        assert reopened["io_paths"] == [chosen] * member_count
        assert reopened["verified"] == result["values"], (path, reopened)
    assert result["deleted"] and result["get_after_delete_is_none"]
    assert result["others_intact_after_delete"] == result["values"] - 1


@pytest.mark.parametrize("io_path", ["block", "passthru"])
def test_store_on_nvme0n1(guest: dict, io_path: str) -> None:
    assert_store_round_trip(result_of(guest, f"store_{io_path}"), io_path, 1)


def test_store_on_ng0n1_chooses_passthru(guest: dict) -> None:
    result = result_of(guest, "store_generic_path")
    assert result["targets"] == ["/dev/ng0n1"]
    assert_store_round_trip(result, "passthru", 1)


def test_devices_names_the_store_it_holds(guest: dict) -> None:
    holds = result_of(guest, "holds_store")["holds"]
    assert holds and any(entry.startswith("ctxkv store") for entry in holds), holds


def test_nvmet_tcp_and_loop_namespaces_carry_a_second_store(guest: dict) -> None:
    result = result_of(guest, "fabrics")
    discovered = {e["subsystem_nqn"] for e in result["discovered"] if e["subtype"] == 2}
    assert result["tcp_nqn"] in discovered
    tcp, loop = result["remote_namespaces"]["tcp"], result["remote_namespaces"]["loop"]
    assert len(tcp) == 1 and tcp[0]["transport"] == "tcp"
    assert "127.0.0.1" in tcp[0]["address"] and "4420" in tcp[0]["address"]
    assert len(loop) == 1 and loop[0]["transport"] == "loop"
    assert tcp[0]["capacity_bytes"] == loop[0]["capacity_bytes"] == 256 << 20
    for io_path in ("passthru", "block"):
        assert_store_round_trip(result["store"][io_path], io_path, 2)
    assert result["namespaces_left_after_disconnect"] == []
