"""What a broker is configured with: pools, streams and consumer groups, registered in
code (:class:`Registry`) or loaded from YAML, and validated without a server.

Nothing here does I/O or imports the rest of the package but :mod:`streambroker.errors`
and the key layout of :mod:`streambroker.core.keys`.
"""

from .registry import DEFAULT_DATA_DIR, PoolSpec, Registry, StreamSpec, ValidatedRegistry

__all__ = ["DEFAULT_DATA_DIR", "PoolSpec", "Registry", "StreamSpec", "ValidatedRegistry"]
