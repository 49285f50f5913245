"""A consumer process for the tests: ``python worker.py '<json settings>'``.

Settings: ``address`` (host:port), ``group``, ``name``, ``options`` (consumer
options), ``count``, ``block`` and ``mode``:

- ``record``: push each handled event id to the list ``handled:<name>``;
- ``hang``: push the ids of a batch to ``started:<name>``, then wait until the key
  ``release:<name>`` exists, then record them as handled.

The process prints ``exit:<n handled>`` when ``consume`` returns.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import redis

import streambroker as sb


def main() -> None:
    settings = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    host, port = settings["address"].split(":")
    client = redis.Redis(host=host, port=int(port))
    name = settings["name"]
    registry = sb.Registry()
    registry.register_redis(settings["address"], db=0)
    registry.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    registry.register_stream("stream-b", "default", ["read-group-ab"])

    def handler(events: list[sb.Event]) -> None:
        ids = [event.id for event in events]
        if settings["mode"] == "hang":
            client.rpush(f"started:{name}", *ids)
            while not client.exists(f"release:{name}"):
                time.sleep(0.01)
        client.rpush(f"handled:{name}", *ids)

    with registry.validate().broker() as broker:
        consumer = broker.consumer(settings["group"], name, **settings.get("options", {}))
        try:
            handled = consumer.consume(
                handler, count=settings.get("count", 10), block=settings.get("block", True)
            )
        except sb.ConsumerBusyError as exc:
            print(f"busy:{exc}", flush=True)
            sys.exit(3)
    print(f"exit:{handled}", flush=True)


if __name__ == "__main__":
    main()
