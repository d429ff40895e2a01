"""ctxkv as an LMCache remote storage plugin.

LMCache loads it from its own config:

    remote_storage_plugins: [ctxkv]
    extra_config:
      remote_storage_plugin.ctxkv.module_path: engine.integrations.lmcache
      remote_storage_plugin.ctxkv.class_name: CtxkvConnectorAdapter
      remote_storage_plugin.ctxkv.url: ctxkv://127.0.0.1:7420

Each LMCache chunk is one ctxkv value. A full chunk is stored bare, so a 32 MiB chunk
fills exactly 8 extents of 4 MiB; a partial last chunk is followed by LMCache's
RemoteMetadata (length, memory format, dtype and shape per group: what its fs:// and
lm:// connectors store) so any process can rebuild it. The two are told apart by length
(the connector falls back to a trailer on every value in the degenerate case where the
trailer is a whole number of tokens). A get receives the value straight into a freshly
allocated MemoryObj, with one small spill buffer for a trailer that overhangs it: one
copy, out of the kernel. Keys are CacheEngineKey.to_string(), UTF-8.

LMCache calls the async methods on its event loop; they run the blocking client on a
few threads (`connections`, each with its own connection from a ClientPool), as its
fs:// connector does with files. The synchronous ones (exists_sync, batched_contains,
remove_sync) come from LMCache's worker threads and use the same pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlparse

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

from engine.client.client import ClientPool

SCHEME = "ctxkv://"
PLUGIN_NAME = "ctxkv"
DEFAULT_CONNECTIONS = 4
Result = TypeVar("Result")


def address_of(url: str) -> str:
    """ctxkv://HOST:PORT -> HOST:PORT, with an error naming what is wrong."""
    if not url.startswith(SCHEME):
        raise ValueError(f"a ctxkv URL starts with {SCHEME}, got {url!r}")
    parsed = urlparse(url)
    if not parsed.hostname or parsed.port is None:
        raise ValueError(f"a ctxkv URL is ctxkv://HOST:PORT, got {url!r}")
    return f"{parsed.hostname}:{parsed.port}"


def key_bytes(key: CacheEngineKey) -> bytes:
    return key.to_string().encode()


class CtxkvConnector(RemoteConnector):
    def __init__(
        self,
        address: str,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: LocalCPUBackend,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        token: str | None = None,
    ):
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        if connections <= 0:
            raise ValueError(f"connections must be positive, got {connections}")
        self.address, self.loop, self.local_cpu_backend = address, loop, local_cpu_backend
        self._pool = ClientPool(address, token=token, size=connections)
        self._threads = ThreadPoolExecutor(connections, thread_name_prefix="ctxkv-lmcache")

    async def _in_thread(self, call: Callable[..., Result], *arguments: object) -> Result:
        return await self.loop.run_in_executor(self._threads, call, *arguments)

    # ---- values ------------------------------------------------------------------------

    @property
    def _bare_full_chunks(self) -> bool:
        """A bare full chunk's length is a whole number of tokens, a trailed one's is not,
        unless the trailer itself is a whole number of tokens."""
        return self.remote_metadata_bytes % self.single_token_size != 0

    def _put_blocking(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        payload = memory_obj.byte_array
        if len(payload) == self.full_chunk_size_bytes and self._bare_full_chunks:
            self._pool.put(key_bytes(key), payload)
            return
        trailer = RemoteMetadata(
            len(payload),
            memory_obj.get_shapes(),
            memory_obj.get_dtypes(),
            memory_obj.get_memory_format(),
        ).serialize()
        self._pool.put(key_bytes(key), payload, trailer)

    def _get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        memory_obj = self.local_cpu_backend.allocate(
            self.meta_shapes, self.meta_dtypes, self.meta_fmt
        )
        if memory_obj is None:  # LMCache's buffer is full: a miss, as its connectors do
            return None
        try:
            target = memoryview(memory_obj.byte_array).cast("B")
            spill = bytearray(self.remote_metadata_bytes)
            value_bytes = self._pool.get_into(key_bytes(key), target, spill)
            if value_bytes is None:
                memory_obj.ref_count_down()
                return None
            if value_bytes == self.full_chunk_size_bytes and self._bare_full_chunks:
                return memory_obj
            payload_bytes = value_bytes - self.remote_metadata_bytes
            if payload_bytes <= 0:
                raise ValueError(f"ctxkv value for {key.to_string()} is only {value_bytes} B")
            received = bytes(target[payload_bytes:value_bytes]) + bytes(spill)
            trailer = received[: self.remote_metadata_bytes]
            return self._checked(key, memory_obj, trailer, payload_bytes)
        except BaseException:
            memory_obj.ref_count_down()
            raise

    def _checked(
        self, key: CacheEngineKey, memory_obj: MemoryObj, trailer: bytes, payload_bytes: int
    ) -> MemoryObj:
        header = RemoteMetadata.deserialize(trailer)
        if header.length != payload_bytes or (header.fmt, header.dtypes) != (
            self.meta_fmt,
            self.meta_dtypes,
        ):
            raise ValueError(
                f"ctxkv value for {key.to_string()} does not fit this LMCache: "
                f"{payload_bytes} bytes for a trailer saying {header.length}, format "
                f"{header.fmt} {header.dtypes}, wanted {self.meta_fmt} {self.meta_dtypes}"
            )
        # LMCache's own helper trims a partial last chunk to the tokens it holds.
        memory_obj = self.reshape_partial_chunk(memory_obj, payload_bytes)
        if len(header.shapes) == 1 and memory_obj.meta.shape != header.shapes[0]:
            raise ValueError(
                f"ctxkv value for {key.to_string()} has shape {header.shapes[0]}, "
                f"rebuilt as {memory_obj.meta.shape}"
            )
        return memory_obj

    # ---- RemoteConnector ---------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._in_thread(self.exists_sync, key)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._pool.contains(key_bytes(key))

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return await self._in_thread(self._get_blocking, key)

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self._in_thread(self._put_blocking, key, memory_obj)

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        await asyncio.gather(*(self.put(k, o) for k, o in zip(keys, memory_objs, strict=True)))

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        """How many leading keys are stored: one LONGEST_PREFIX request."""
        return self._pool.longest_prefix([key_bytes(key) for key in keys])

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(
        self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False
    ) -> int:
        return await self._in_thread(self.batched_contains, keys)

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return self._pool.delete(key_bytes(key))

    async def list(self) -> list[str]:
        raise NotImplementedError("ctxkv serve has no key listing operation")

    async def close(self) -> None:
        self._threads.shutdown(wait=True)
        self._pool.close()


class CtxkvConnectorAdapter(ConnectorAdapter):
    """Matches ctxkv://HOST:PORT and plugin://ctxkv[.instance]; for the latter the URL is
    `remote_storage_plugin.<instance>.url`, and optional keys `.connections` and
    `.token` tune it."""

    def __init__(self) -> None:
        super().__init__(SCHEME)

    def can_parse(self, url: str) -> bool:
        if url.startswith(SCHEME):
            return True
        if url.startswith("plugin://"):
            return url[len("plugin://") :].split(".", 1)[0] == PLUGIN_NAME
        return False

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        extra = (context.config.extra_config if context.config else None) or {}
        prefix = f"remote_storage_plugin.{context.plugin_name or PLUGIN_NAME}"
        url = context.url
        if url.startswith("plugin://"):
            url = extra.get(f"{prefix}.url")
            if not url:
                raise ValueError(f"LMCache config lacks {prefix}.url (ctxkv://HOST:PORT)")
        return CtxkvConnector(
            address_of(url),
            context.loop,
            context.local_cpu_backend,
            connections=int(extra.get(f"{prefix}.connections", DEFAULT_CONNECTIONS)),
            token=extra.get(f"{prefix}.token"),
        )
