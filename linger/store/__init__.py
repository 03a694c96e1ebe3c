"""Persistence: the schema and engine, the driver that runs precompiled statements, and
the storage operations."""
