"""The broker's logic, free of I/O.

Every operation (publishing, consuming, leases, dead letters, garbage collection,
statistics, ...) is a generator that yields *effects* (:mod:`.effects`: send these
commands to that pool in one round trip, call the handler, sleep) and receives their
results. The I/O layers of :mod:`streambroker.io` perform the effects, synchronously or
with asyncio; the logic is written once for both. Nothing here opens a socket or imports
redis-py.
"""
