"""Access control: scoped bearer tokens (``scopes``), their secrets and hashes
(``tokens``), and the per-process cache of lookups (``cache``). Nothing here knows HTTP or
a database driver."""
