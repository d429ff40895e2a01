"""The tenant table `ctxkv serve --tenants FILE` reads: JSON or TOML (by the extension).

    [[tenants]]                     {"tenants": [
    name = "team-a"                   {"name": "team-a", "token_file": "a.token",
    token_file = "a.token"             "quota_bytes": "64GiB"},
    quota_bytes = "64GiB"             {"name": "team-b", "token": "...",
                                       "quota_bytes": 1073741824}]}

token_file is read relative to FILE. Every mistake is refused with its place named:
unknown or missing fields, a bad name or size, two tenants with one name or one token.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engine.tenants.keys import tenant_prefix

SIZE = re.compile(r"(\d+)\s*(|B|KiB|MiB|GiB|TiB)")
UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
FIELDS = {"name", "token", "token_file", "quota_bytes"}


class TenantConfigError(ValueError):
    """A tenant table that cannot be used as written."""


@dataclass(frozen=True)
class Tenant:
    name: str
    token: bytes
    quota_bytes: int

    @property
    def prefix(self) -> bytes:
        return tenant_prefix(self.name)


def load_tenants(path: str | Path) -> list[Tenant]:
    path = Path(path)
    raw = path.read_bytes()
    try:
        if path.suffix == ".toml":
            table = tomllib.loads(raw.decode())
        elif path.suffix == ".json":
            table = json.loads(raw)
        else:
            raise TenantConfigError(f"{path}: a tenant table is a .json or .toml file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TenantConfigError(f"{path}: {error}") from error
    entries = table.get("tenants") if isinstance(table, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TenantConfigError(f"{path}: expected a non-empty list 'tenants'")
    tenants = [_tenant(path, i, entry) for i, entry in enumerate(entries)]
    for what in ("name", "token"):
        seen: dict[object, int] = {}
        for i, tenant in enumerate(tenants):
            value = getattr(tenant, what)
            if value in seen:
                raise TenantConfigError(
                    f"{path}: tenants {seen[value]} and {i} have the same {what}"
                )
            seen[value] = i
    return tenants


def _tenant(path: Path, index: int, entry: object) -> Tenant:
    where = f"{path}: tenant {index}"
    if not isinstance(entry, dict):
        raise TenantConfigError(f"{where}: expected a table of {sorted(FIELDS)}")
    unknown = set(entry) - FIELDS
    if unknown:
        raise TenantConfigError(f"{where}: unknown fields {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise TenantConfigError(f"{where}: 'name' must be a string")
    try:
        tenant_prefix(name)
    except ValueError as error:
        raise TenantConfigError(f"{where}: {error}") from error
    if ("token" in entry) == ("token_file" in entry):
        raise TenantConfigError(f"{where} ({name}): give exactly one of 'token', 'token_file'")
    if "token" in entry:
        token = str(entry["token"]).encode().strip()
    else:
        token = (path.parent / str(entry["token_file"])).read_bytes().strip()
    if not token:
        raise TenantConfigError(f"{where} ({name}): the token is empty")
    return Tenant(name, token, _bytes(f"{where} ({name}): quota_bytes", entry.get("quota_bytes")))


def _bytes(where: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match[1]) == 0:
        raise TenantConfigError(
            f"{where} is {value!r}: a positive number of bytes, or like '64GiB' "
            f"(units {', '.join(u for u in UNITS if u)})"
        )
    return int(match[1]) * UNITS[match[2]]
