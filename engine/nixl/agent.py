"""One NIXL agent (UCX backend) over host memory: the piece of NIXL that ctxkv's server
and NixlClient share. The server registers its buffer pool's arena with one; a client
registers its own memory with another and READs or WRITEs the server's pool buffers
one-sided, so values cross without the server's CPU touching them.

NIXL comes with the optional extra `ctxkv[nixl]` (requirements/nixl.txt).
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
import uuid
from collections.abc import Iterator
from typing import Literal

from engine.closing import Closeable
from engine.errors import CtxkvError

Region = tuple[int, int]  # (address, nbytes) of host memory
Operation = Literal["READ", "WRITE"]


class NixlUnavailableError(CtxkvError, ImportError):
    """NIXL is not installed in this environment."""


class TransferError(CtxkvError, OSError):
    """A NIXL transfer failed, or did not finish before its deadline (it was aborted)."""


def _nixl_api() -> types.ModuleType:
    try:
        from nixl_cu12 import _api
    except ImportError as error:
        raise NixlUnavailableError(
            f"NIXL is not installed ({error}): pip install 'ctxkv[nixl]' "
            f"(or: pip install -r requirements/nixl.txt)"
        ) from error
    # NIXL logs every agent and backend it makes at INFO, on stdout, where `ctxkv serve`
    # announces its port: route its records through the caller's logging, warnings only.
    nixl_logger = logging.getLogger("nixl")
    for handler in list(nixl_logger.handlers):
        nixl_logger.removeHandler(handler)
    nixl_logger.propagate = True
    nixl_logger.setLevel(logging.WARNING)
    return _api


@contextlib.contextmanager
def _progress_delay(api: types.ModuleType, delay_us: int) -> Iterator[None]:
    """Makes the agents created inside pause delay_us between progress polls. nixl_agent
    sets its binding config's pthrDelay to 0 with no way to ask otherwise, so the config
    class is swapped, for the constructor only, for one that keeps delay_us."""
    if delay_us < 0:
        raise ValueError(f"progress_delay_us must not be negative, got {delay_us}")
    original = api.nixlBind.nixlAgentConfig
    field = original.__dict__["pthrDelay"]

    class Config(original):
        pthrDelay = property(field.__get__, lambda config, _value: field.__set__(config, delay_us))

    api.nixlBind.nixlAgentConfig = Config
    try:
        yield
    finally:
        api.nixlBind.nixlAgentConfig = original


class NixlAgent(Closeable):
    """A NIXL agent with the UCX backend over host memory.

    The side that is only read from and written to (the server) needs a progress thread:
    without one, UCX never advances a peer's one-sided transfer and it waits for ever.
    NIXL's Python API starts that thread polling without a pause, which keeps a core
    busy even when idle; progress_delay_us sets the pause between polls instead (100 us:
    an idle server costs no CPU, a 4 MiB transfer still takes about a millisecond). The
    side that starts transfers (a client) needs no thread: waiting for a transfer polls it.
    """

    def __init__(
        self, role: str, *, progress_thread: bool, progress_delay_us: int = 100
    ):  # fmt: skip
        api = _nixl_api()
        self.name = f"ctxkv-{role}-{uuid.uuid4().hex[:12]}"
        config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=[])
        with _progress_delay(api, progress_delay_us):
            self._agent = api.nixl_agent(self.name, config)
        self._agent.create_backend("UCX", {})
        self._registered: list[tuple[Region, object]] = []
        self._closed = False

    def register(self, region: Region) -> None:
        """Registers host memory once; transfers may then use any part of it."""
        address, nbytes = region
        descriptors = self._agent.register_memory([(address, nbytes, 0, "")], "DRAM")
        self._registered.append((region, descriptors))

    def covers(self, address: int, nbytes: int) -> bool:
        """Whether [address, address + nbytes) lies inside one registered region."""
        return any(
            start <= address and address + nbytes <= start + length
            for (start, length), _ in self._registered
        )

    @property
    def metadata(self) -> bytes:
        """What a peer needs (add_peer) to transfer to and from this agent's memory."""
        return self._agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> bytes:
        """Loads a peer agent's metadata; returns its name, for transfer()."""
        return self._agent.add_remote_agent(metadata)

    def transfer(
        self, operation: Operation, local: list[Region], remote: list[Region], peer: bytes,
        deadline: float,
    ) -> None:  # fmt: skip
        """READ remote into local (or WRITE local to remote), descriptor by descriptor,
        waiting until it is done; TransferError if it fails or is still running at
        deadline (time.monotonic()), and then it is aborted."""
        if [n for _, n in local] != [n for _, n in remote]:
            raise ValueError(f"local and remote descriptor lengths differ: {local} {remote}")
        local_descs = self._agent.get_xfer_descs([(a, n, 0) for a, n in local], "DRAM")
        remote_descs = self._agent.get_xfer_descs([(a, n, 0) for a, n in remote], "DRAM")
        handle = self._agent.initialize_xfer(operation, local_descs, remote_descs, peer)
        try:
            state = self._agent.transfer(handle)
            # Spin: a 4 MiB transfer takes about a millisecond here, and sleeping would
            # add a scheduler's delay to every one.
            while state == "PROC" and time.monotonic() < deadline:
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                reason = "failed" if state == "ERR" else "ran past its deadline"
                raise TransferError(
                    f"NIXL {operation} of {sum(n for _, n in local)} bytes with {peer!r} {reason}"
                )
        finally:
            # Releasing a transfer still in flight aborts it.
            self._agent.release_xfer_handle(handle)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _region, descriptors in self._registered:
            self._agent.deregister_memory(descriptors)
        self._registered.clear()
        # Destroy the agent now, while the interpreter is whole: left to the interpreter's
        # exit, NIXL's teardown can crash it.
        del self._agent
