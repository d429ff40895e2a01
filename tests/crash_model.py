"""What a store promises across a crash, as a model a history updates op by op and a
checker holds the recovered store to (docs/guarantees.md).

- An acknowledged put that was not later deleted, evicted or overwritten reads back
  identical (in relaxed durability: acknowledged before the last completed sync()).
- An acknowledged delete stays deleted; an acknowledged pin stays pinned.
- Nothing returns bytes that were never put under that key, nor the bytes of a put that
  failed with an error while the device was still up.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from engine.index import key_digest
from engine.store.store import STRICT, Store


@dataclass
class Tally:
    """What a checker saw, summed over histories."""

    histories: int = 0
    crashes: int = 0
    acknowledged_checked: int = 0
    deletes_checked: int = 0
    pins_checked: int = 0
    keys_read: int = 0
    lost: int = 0
    wrong_bytes: int = 0
    resurrected: int = 0
    recovery_failures: int = 0
    injected_errors: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for name, value in vars(other).items():
            if name == "failures":
                self.failures.extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def line(self) -> str:
        return (
            f"histories {self.histories}, crashes injected {self.crashes}, device errors "
            f"injected {self.injected_errors}, acknowledged puts checked "
            f"{self.acknowledged_checked}, deletes checked {self.deletes_checked}, pins checked "
            f"{self.pins_checked}, keys read {self.keys_read}; lost = {self.lost}, wrong bytes "
            f"served = {self.wrong_bytes}, resurrected = {self.resurrected}, recovery "
            f"failures = {self.recovery_failures}"
        )


class Model:
    def __init__(self, durability: str = STRICT):
        self.durability = durability
        self.op_index = 0
        self.attempted: dict[bytes, list[bytes]] = defaultdict(list)
        self.failed: dict[bytes, list[bytes]] = defaultdict(list)
        self.acked: dict[bytes, bytes | None] = {}  # None: acknowledged delete
        self.acked_at: dict[bytes, int] = {}
        self.pinned: dict[bytes, bool] = {}
        self.pinned_at: dict[bytes, int] = {}
        self.unsure: set[bytes] = set()  # the last op on the key failed or was in flight
        self.unsure_pin: set[bytes] = set()
        self.synced_through = -1  # ops before this index are durable (relaxed)

    # ---- a history reports each op before it runs and once it returns --------------------

    def before_put(self, key: bytes, value: bytes) -> None:
        self.op_index += 1
        self.attempted[key].append(value)
        self.unsure.add(key)

    def put_acknowledged(self, key: bytes, value: bytes, *, was_present: bool) -> None:
        self.acked[key], self.acked_at[key] = value, self.op_index
        self.unsure.discard(key)
        if not was_present:  # a pin belongs to a key while it is present
            self.pinned[key], self.pinned_at[key] = False, self.op_index

    def put_failed(self, key: bytes, value: bytes, *, device_up: bool) -> None:
        if device_up:  # an error reported while the device works: never visible
            self.failed[key].append(value)

    def before_key_op(self, key: bytes, pin: bool = False) -> None:
        self.op_index += 1
        (self.unsure_pin if pin else self.unsure).add(key)

    def delete_acknowledged(self, key: bytes, existed: bool) -> None:
        if existed or key in self.acked:
            self.acked[key], self.acked_at[key] = None, self.op_index
            self.pinned[key], self.pinned_at[key] = False, self.op_index
        self.unsure.discard(key)

    def pin_acknowledged(self, key: bytes, pinned: bool, existed: bool) -> None:
        if existed:
            self.pinned[key], self.pinned_at[key] = pinned, self.op_index
        self.unsure_pin.discard(key)

    def synced(self) -> None:
        self.op_index += 1
        self.synced_through = self.op_index

    def durable(self, key: bytes, at: dict[bytes, int]) -> bool:
        return self.durability == STRICT or at.get(key, 1 << 62) < self.synced_through

    # ---- at the crash and after recovery ------------------------------------------------

    def expectations(self, crashed_store: Store) -> tuple[dict[bytes, bytes], set[bytes], dict]:
        """From the store's memory just before the crash (an evicted key is gone from it):
        the values that must survive, the keys that must be absent, the pins that must hold."""
        present = {key for key in self.attempted if key in crashed_store}
        must = {
            key: value
            for key, value in self.acked.items()
            if value is not None
            and key in present
            and key not in self.unsure
            and self.durable(key, self.acked_at)
        }
        absent = {
            key
            for key, value in self.acked.items()
            if value is None and key not in self.unsure and self.durable(key, self.acked_at)
        }
        pins = {
            key: pinned
            for key, pinned in self.pinned.items()
            if key in must and key not in self.unsure_pin and self.durable(key, self.pinned_at)
        }
        return must, absent, pins

    def check(
        self,
        store: Store,
        must: dict[bytes, bytes],
        absent: set[bytes],
        pins: dict[bytes, bool],
        label: str,
    ) -> Tally:
        tally = Tally()
        keys = sorted(self.attempted)
        for key, value in zip(keys, store.get_many(keys), strict=True):
            tally.keys_read += 1
            if value is not None and (
                value not in self.attempted[key] or value in self.failed[key]
            ):
                tally.wrong_bytes += 1
                tally.failures.append(f"{label}: {key!r} returned bytes never acknowledged")
            if key in must:
                tally.acknowledged_checked += 1
                if value != must[key]:
                    tally.lost += 1
                    tally.failures.append(f"{label}: {key!r} lost its acknowledged value")
            if key in absent:
                tally.deletes_checked += 1
                if value is not None:
                    tally.resurrected += 1
                    tally.failures.append(f"{label}: deleted {key!r} came back")
        for key, pinned in pins.items():
            tally.pins_checked += 1
            located = store._state.locate(key_digest(key))
            if located is None or located.pinned != pinned:
                tally.lost += 1
                tally.failures.append(f"{label}: {key!r} lost its pin state {pinned}")
        unknown = set(store.keys()) - set(keys)
        if unknown:
            tally.wrong_bytes += len(unknown)
            tally.failures.append(f"{label}: keys never put are listed: {sorted(unknown)[:3]}")
        return tally
