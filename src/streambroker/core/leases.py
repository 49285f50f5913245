"""Consumer leases: one live process per consumer name. I/O-free.

A lease is a key holding a random token with a time to live. ``consume()`` takes
it, renews it while it runs, and deletes it when it returns; a consumer that died
frees its name when the lease expires.

Taking and renewing run even when the server is out of memory (the ``allow-oom``
script flag, Redis 7.0 or later; the key is tiny): consumers must start and go on
then, since acknowledging and collecting is what frees the memory.
"""

from __future__ import annotations

from ..wire.keys import lease_key
from .effects import Command, Script

__all__ = ["LEASE_RETAKEN", "acquire_command", "release_command", "renew_command"]

# Take the lease if it is free or ours. Returns 1, or the holder's remaining ms.
_ACQUIRE = Script("""#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return -math.max(redis.call('PTTL', KEYS[1]), 1)
""")

#: The reply of a renewal that found the lease gone (the server restarted without
#: persistence, or the key was deleted) and took it again.
LEASE_RETAKEN = 2

# Keep the lease if it is ours, or take it back if it vanished. Returns 1, 2 when
# it had vanished, or 0 when another process holds it.
_RENEW = Script("""#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
""")

_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


def acquire_command(prefix: str, group: str, consumer: str, token: str, ttl_ms: int) -> Command:
    """Take the lease (keys start with ``prefix``); the reply is 1, or minus the
    holder's remaining milliseconds."""
    return ("EVALSHA", _ACQUIRE.sha, 1, lease_key(prefix, group, consumer), token, ttl_ms)


def renew_command(prefix: str, group: str, consumer: str, token: str, ttl_ms: int) -> Command:
    """Renew the lease; the reply is 0 when another process holds the name now, and
    :data:`LEASE_RETAKEN` when it had vanished."""
    return ("EVALSHA", _RENEW.sha, 1, lease_key(prefix, group, consumer), token, ttl_ms)


def release_command(prefix: str, group: str, consumer: str, token: str) -> Command:
    """Give the lease up if it is still ours."""
    return ("EVALSHA", _RELEASE.sha, 1, lease_key(prefix, group, consumer), token)
