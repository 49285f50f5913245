"""What every benchmark shares: the stream, the body, clients, filling, timing, memory."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
import redis.connection

import streambroker as sb

STREAM = "bench"
#: A second stream in the same pool, read by another group, used to warm a broker up
#: (connect, create the groups) without touching STREAM or GROUP.
WARM_STREAM = "bench-warm"
WARM_GROUP = "warm"
GROUP = "g"
FILL_PIPELINE = 1000

#: The body of every event: a small dict whose msgpack encoding is 96-100 bytes
#: (exactly 100 once the sequence number is 65,536 or more).
_FILLER = "x" * 83

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def make_body(seq: int) -> dict[str, Any]:
    """The body of the ``seq``-th event."""
    return {"seq": seq, "data": _FILLER}


def encode_body(seq: int) -> bytes:
    """The body of the ``seq``-th event, msgpack-encoded as raw code would do it."""
    return _encode(make_body(seq))


def decode_body(data: bytes) -> Any:
    """Decode a msgpack body, as raw code would do it."""
    return _decode(data)


def handle_raw(entries: list[Any]) -> list[bytes]:
    """What the raw consumers do with one read: decode every body; returns the ids to ack."""
    ids = []
    for event_id, fields in entries:
        decode_body(fields[BODY_FIELD])
        ids.append(event_id)
    return ids


#: The fields of an entry as the raw code writes them: the same layout as the
#: broker's, so the server does the same work and either side can read the other's.
BODY_FIELD = b"$body"
CODEC_FIELD = b"$codec"
CODEC_NAME = b"msgpack"


def raw_fields(seq: int) -> dict[bytes, bytes]:
    """The entry fields of the ``seq``-th event for ``client.xadd``."""
    return {BODY_FIELD: encode_body(seq), CODEC_FIELD: CODEC_NAME}


def registry(address: str) -> sb.ValidatedRegistry:
    """The benchmark's registry: STREAM read by GROUP (and WARM_STREAM by WARM_GROUP)."""
    reg = sb.Registry()
    reg.register_redis(address, db=0)
    reg.register_stream(STREAM, "default", [GROUP])
    reg.register_stream(WARM_STREAM, "default", [WARM_GROUP])
    return reg.validate()


def raw_client(address: str) -> redis.Redis:
    """The raw redis-py client of the comparison: the defaults, on the same server."""
    host, _, port = address.rpartition(":")
    return redis.Redis(host=host, port=int(port), db=0, socket_timeout=60)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# -- filling streams ----------------------------------------------------------


@dataclass
class Filler:
    """Fills STREAM with ``n`` events; the first fill of a size is kept as a DUMP
    and later fills of that size RESTORE it (much faster than re-adding)."""

    address: str
    _dumps: dict[int, bytes] = field(default_factory=dict)

    def fill(self, n: int, key: str = STREAM) -> None:
        client = raw_client(self.address)
        try:
            dump = self._dumps.get(n)
            if dump is not None:
                client.restore(key, 0, dump, replace=True)
            else:
                client.delete(key)
                for start in range(0, n, FILL_PIPELINE):
                    pipe = client.pipeline(transaction=False)
                    for seq in range(start, min(n, start + FILL_PIPELINE)):
                        pipe.execute_command(
                            "XADD", key, "*", BODY_FIELD, encode_body(seq), CODEC_FIELD, CODEC_NAME
                        )
                    pipe.execute()
                dumped = client.dump(key)
                assert isinstance(dumped, bytes)
                self._dumps[n] = dumped
            length = client.xlen(key)
            if length != n:
                raise RuntimeError(f"filled {key} with {length} events instead of {n}")
        finally:
            client.close()

    def afresh(self, n: int) -> None:
        """Empty the server, then fill STREAM with ``n`` events."""
        client = raw_client(self.address)
        try:
            client.flushall()
        finally:
            client.close()
        self.fill(n)


# -- counting round trips -------------------------------------------------------


@contextmanager
def count_round_trips() -> Iterator[list[int]]:
    """Count the round trips redis-py makes in this process within the block.

    Every command, and every pipeline, is written with one ``send_packed_command``
    call; the count is in ``counter[0]`` after the block.
    """
    cls = redis.connection.AbstractConnection
    original = cls.send_packed_command
    counter = [0]
    lock = threading.Lock()

    def counting(self: Any, command: Any, check_health: bool = True) -> Any:
        with lock:
            counter[0] += 1
        return original(self, command, check_health)

    cls.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        cls.send_packed_command = original  # type: ignore[method-assign]


def server_commands(client: redis.Redis) -> int:
    """The server's ``total_commands_processed`` (commands run inside scripts count too)."""
    info = client.info("stats")
    return int(info["total_commands_processed"])


# -- memory ---------------------------------------------------------------------


def proc_status_kib(*names: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in KiB (e.g. ``VmRSS``, ``VmHWM``)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in names:
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    if "VmHWM" in names and "VmHWM" not in found:
        import resource

        found["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return found


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return proc_status_kib("VmRSS").get("VmRSS", 0) / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return proc_status_kib("VmHWM")["VmHWM"] / 1024


# -- sampling a stream's length ------------------------------------------------


class LengthSampler:
    """Samples ``XLEN key`` every ``interval`` seconds in a thread, until stopped."""

    def __init__(
        self, address: str, key: str = STREAM, interval: float = 0.02, limit: float = 600.0
    ) -> None:
        self._client = raw_client(address)
        self._key = key
        self._interval = interval
        self._limit = limit
        self._done = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, name="xlen-sampler", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        while not self._done.wait(self._interval) and time.monotonic() < deadline:
            try:
                self.samples.append(int(self._client.xlen(self._key)))
            except redis.RedisError:
                return

    def __enter__(self) -> LengthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._client.close()

    def summary(self) -> dict[str, float]:
        samples = self.samples or [0]
        return {
            "samples": len(self.samples),
            "median": median([float(s) for s in samples]),
            "max": float(max(samples)),
        }


def check(condition: bool, message: str) -> None:
    """Raise when a benchmark's own sanity check fails (a wrong count, a leftover)."""
    if not condition:
        raise RuntimeError(message)


Timed = Callable[[], float]
