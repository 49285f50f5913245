"""The README's examples run as written (pool addresses pointed at a test server)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import streambroker as sb

from .conftest import Server, seed_code

README = (Path(__file__).parent.parent / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_the_python_example_runs(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code = _blocks("python")[0]
    code = code.replace("localhost:6379", server.address).replace(
        "192.168.1.20:6379", server.address
    )
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "stream-a" in printed
    assert "{'color': 'red', 'price': 12.34}" in printed


def test_the_asyncio_example_runs(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    (example,) = [block for block in _blocks("python") if "asyncio.run" in block]
    code = example.replace("localhost:6379", server.address)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.splitlines() == ["view of /about-us/", "view of /"]


def test_the_yaml_example_is_the_python_example() -> None:
    yaml_config = sb.Registry.from_yaml(_blocks("yaml")[0]).validate()
    assert yaml_config == seed_code().validate()
