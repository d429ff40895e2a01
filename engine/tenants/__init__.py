"""Tenants: namespaces of keys, each with a capacity quota (docs/protocol.md, Tenants)."""
