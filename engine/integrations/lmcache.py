"""ctxkv as an LMCache remote storage plugin.

LMCache loads it from its own config:

    remote_storage_plugins: [ctxkv]
    extra_config:
      remote_storage_plugin.ctxkv.module_path: engine.integrations.lmcache
      remote_storage_plugin.ctxkv.class_name: CtxkvConnectorAdapter
      remote_storage_plugin.ctxkv.url: ctxkv://127.0.0.1:7420

Each LMCache chunk is one ctxkv value: LMCache's RemoteMetadata header (length, memory
format, dtype and shape per group, the bytes its fs:// and lm:// connectors store) then
the MemoryObj's bytes. The header lets a process that never saw the chunk rebuild it,
partial last chunks included. Keys are CacheEngineKey.to_string(), UTF-8.

The async calls run on LMCache's event loop over a few AsyncClient connections (one
request in flight each); the synchronous ones (exists_sync, batched_contains,
remove_sync) come from LMCache's worker threads and use a thread-safe ClientPool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlparse

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

from engine.client.aio import AsyncClient
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
        self._token = token
        self._connections = connections
        self._opened = 0
        self._idle: asyncio.Queue[AsyncClient] | None = None
        self._sync = ClientPool(address, token=token, size=connections)

    # ---- connections -------------------------------------------------------------------

    async def _with_client(
        self, call: Callable[[AsyncClient], Awaitable[Result]], *, retry: bool
    ) -> Result:
        """Runs call on an idle connection (opening one while fewer than `connections`
        exist). A broken connection is dropped; reads retry once on a fresh one, since a
        restarted server drops every connection it had."""
        if self._idle is None:
            self._idle = asyncio.Queue()
        for attempt in range(2 if retry else 1):
            if self._idle.empty() and self._opened < self._connections:
                self._opened += 1
                try:
                    client = await AsyncClient.connect(self.address, token=self._token)
                except BaseException:
                    self._opened -= 1
                    raise
            else:
                client = await self._idle.get()
            try:
                result = await call(client)
            except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                self._opened -= 1
                await client.close()
                if attempt == 1 or not retry:
                    raise
                continue
            except BaseException:
                self._opened -= 1
                await client.close()
                raise
            self._idle.put_nowait(client)
            return result
        raise AssertionError("unreachable")

    # ---- values ------------------------------------------------------------------------

    def _header(self, memory_obj: MemoryObj) -> bytes:
        payload_bytes = len(memory_obj.byte_array)
        return RemoteMetadata(
            payload_bytes,
            memory_obj.get_shapes(),
            memory_obj.get_dtypes(),
            memory_obj.get_memory_format(),
        ).serialize()

    def _rebuild(self, key: CacheEngineKey, value: bytes) -> MemoryObj | None:
        if len(value) < self.remote_metadata_bytes:
            raise ValueError(f"ctxkv value for {key.to_string()} is shorter than its header")
        header = RemoteMetadata.deserialize(value[: self.remote_metadata_bytes])
        payload = memoryview(value)[self.remote_metadata_bytes :]
        if header.length != len(payload):
            raise ValueError(
                f"ctxkv value for {key.to_string()}: header says {header.length} bytes, "
                f"{len(payload)} follow"
            )
        memory_obj = self.local_cpu_backend.allocate(header.shapes, header.dtypes, header.fmt)
        if memory_obj is None:  # LMCache's buffer is full: a miss, as its connectors do
            return None
        target = memory_obj.byte_array
        if len(target) != len(payload):
            memory_obj.ref_count_down()
            raise ValueError(
                f"ctxkv value for {key.to_string()}: {len(payload)} bytes for a "
                f"MemoryObj of {len(target)}"
            )
        memoryview(target).cast("B")[:] = payload
        return memory_obj

    async def _put_one(self, client: AsyncClient, key: CacheEngineKey, obj: MemoryObj) -> None:
        await client.put(key_bytes(key), self._header(obj), obj.byte_array)

    async def _get_one(self, client: AsyncClient, key: CacheEngineKey) -> MemoryObj | None:
        value = await client.get(key_bytes(key))
        return None if value is None else self._rebuild(key, value)

    # ---- RemoteConnector ---------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._with_client(lambda c: c.contains(key_bytes(key)), retry=True)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._sync.contains(key_bytes(key))

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return await self._with_client(lambda c: self._get_one(c, key), retry=True)

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self._with_client(lambda c: self._put_one(c, key, memory_obj), retry=False)

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
        return self._sync.longest_prefix([key_bytes(key) for key in keys])

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(
        self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False
    ) -> int:
        encoded = [key_bytes(key) for key in keys]
        return await self._with_client(lambda c: c.longest_prefix(encoded), retry=True)

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return self._sync.delete(key_bytes(key))

    async def list(self) -> list[str]:
        raise NotImplementedError("ctxkv serve has no key listing operation")

    async def close(self) -> None:
        self._sync.close()
        if self._idle is not None:
            while not self._idle.empty():
                with contextlib.suppress(OSError):
                    await self._idle.get_nowait().close()


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
