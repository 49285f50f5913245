"""The examples in examples/, run against the real servers."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from .conftest import Server, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fastapi_app(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("STREAMBROKER_REDIS", f"redis://{server.address}/0")
    module = load("fastapi_app")
    yield module
    sys.modules.pop("example_fastapi_app", None)


def test_the_fastapi_app_publishes_consumes_and_shuts_down_cleanly(
    fastapi_app: ModuleType, server: Server
) -> None:
    with TestClient(fastapi_app.app) as client:
        ids = [
            client.post("/orders", json={"item": f"book {n}", "quantity": n}).json()["id"]
            for n in range(1, 6)
        ]
        assert len(set(ids)) == 5
        wait_for(lambda: len(client.get("/orders/billed").json()) == 5, what="the orders billed")
        billed = client.get("/orders/billed").json()
        assert sorted(order["quantity"] for order in billed) == [1, 2, 3, 4, 5]
        assert client.post("/orders", json={"item": "x"}).status_code == 422
    redis = server.client(0)
    # Shut down: the consumer left its group and its lease; every event was acknowledged
    # and collected.
    assert redis.xinfo_consumers("orders", "billing") == []
    assert redis.keys("*lease*") == []
    assert redis.xlen("orders") == 0
