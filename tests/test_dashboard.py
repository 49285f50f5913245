"""``streambroker dashboard``: a real server process, driven by a real browser (Debian's
Chromium through Playwright), on the real servers."""

from __future__ import annotations

import asyncio
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import streambroker as sb
from streambroker.apps.dashboard import Figures

from .conftest import IN_CI, SEED_YAML_TEMPLATE, Server, free_port, seed_registry, wait_for
from .faces import Loop

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: How long the page may take to show what a test waits for (milliseconds).
PAGE_DEADLINE = 20_000
FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}
HOSTILE = "<script>window.hacked=1</script>\x1b[2J"
#: HOSTILE as the page must show it: as text, with the escape character escaped.
HOSTILE_SHOWN = "<script>window.hacked=1</script>\\u001b[2J"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; a skip (a failure with ``CI=true``) when it is missing."""
    problem = None
    if shutil.which(CHROMIUM) is None:
        problem = f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install playwright)"
    if problem is not None:
        if IN_CI:
            pytest.fail(problem + " (CI=true: a missing browser is a failure)")
        pytest.skip(problem)
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=PAGE_DEADLINE)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(PAGE_DEADLINE)
    tab = context.new_page()
    yield tab
    context.close()


class Dashboard:
    """``streambroker dashboard`` run as a process on a free port, stopped with SIGTERM."""

    def __init__(self, config: Path, *options: str) -> None:
        command = [sys.executable, "-m", "streambroker", "dashboard", "-p", "0", "-c", str(config)]
        self.process = subprocess.Popen(
            [*command, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.errors = ""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("serving the dashboard on http://"):
            self.stop()
            pytest.fail(f"the dashboard did not start: {line!r} {self.errors!r}")
        self.url = line.split()[-1].rstrip("/")

    def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            _, self.errors = self.process.communicate(timeout=30)
        return self.process.returncode


@pytest.fixture
def config_file(server: Server, tmp_path: Path) -> Path:
    path = tmp_path / "streambroker.yaml"
    path.write_text(
        SEED_YAML_TEMPLATE.format(default=f"{server.address}:0", second=f"{server.address}:3")
    )
    return path


@pytest.fixture
def seeded(server: Server) -> Iterator[sb.Broker]:
    with seed_registry(f"{server.address}:0", f"{server.address}:3").broker() as broker:
        yield broker


@pytest.fixture
def dashboard(config_file: Path) -> Iterator[Dashboard]:
    running = Dashboard(config_file)
    yield running
    assert running.stop() == 0, running.errors


def bury(consumer: sb.Consumer, error: Callable[[sb.Event], str]) -> None:
    """Fail every event the consumer is given with ``ValueError(error(event))``: with
    ``max_deliveries=1``, each becomes a dead letter at once."""

    def fail(events: list[sb.Event]) -> None:
        for event in events:
            event.fail(ValueError(error(event)))

    consumer.consume(fail, 10, block=False)


def figure(page: Any, stream: str, field: str, group: str | None = None) -> Any:
    where = f'section[data-stream="{stream}"]'
    if group is not None:
        where += f' tr[data-group="{group}"]'
    return page.locator(f'{where} [data-field="{field}"]').first


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def test_the_page_shows_the_streams_and_its_figures_follow_publishing_and_consuming(
    seeded: sb.Broker, dashboard: Dashboard, page: Any
) -> None:
    for n in range(3):
        seeded.publish("stream-a", n)
    page.goto(dashboard.url)
    for stream in ("stream-a", "stream-b", "stream-c"):
        expect(page.locator(f'section[data-stream="{stream}"] h2')).to_contain_text(stream)
    expect(page.locator('section[data-stream="stream-c"] h2')).to_contain_text("pool second")
    expect(figure(page, "stream-a", "length")).to_have_text("3")
    expect(figure(page, "stream-a", "lag", "read-group-a")).to_have_text("3")

    for n in range(3, 8):
        seeded.publish("stream-a", n)
    expect(figure(page, "stream-a", "length")).to_have_text("8")
    expect(figure(page, "stream-a", "lag", "read-group-a")).to_have_text("8")
    expect(figure(page, "stream-a", "published_per_s")).not_to_have_text("-")
    expect(figure(page, "stream-a", "published_per_s")).not_to_have_text("0.0")

    handled: list[int] = []
    consumer = seeded.consumer("read-group-a", "web-1", **FAST)
    thread = threading.Thread(
        target=lambda: consumer.consume(
            lambda events: handled.extend(e.body for e in events), handle_signals=False
        ),
    )
    thread.start()
    try:
        expect(figure(page, "stream-a", "lag", "read-group-a")).to_have_text("0")
        expect(figure(page, "stream-a", "pending", "read-group-a")).to_have_text("0")
        expect(figure(page, "stream-a", "consumers", "read-group-a")).to_have_text(
            "1 live / 0 stale"
        )
        expect(figure(page, "stream-a", "acked_per_s", "read-group-a")).not_to_have_text("-")
        expect(figure(page, "stream-a", "acked_per_s", "read-group-a")).not_to_have_text("0.0")
        expect(page.locator('tr[data-consumer="web-1"]')).to_contain_text("live")
        # The other group of the stream still holds its eight events.
        expect(figure(page, "stream-a", "lag", "read-group-ab")).to_have_text("8")
        chart = page.locator('section[data-stream="stream-a"] p.figures svg polyline')
        wait_for(
            lambda: any(float(y) < 20 for y in _ys(chart.get_attribute("points") or "")),
            timeout=PAGE_DEADLINE / 1000,
            what="the chart of stream-a to show the events published",
        )
    finally:
        consumer.stop()
        thread.join(timeout=30)
    assert sorted(handled) == list(range(8))
    expect(page.locator('tr[data-consumer="web-1"]')).to_contain_text("stale")


def _ys(points: str) -> list[str]:
    return [point.partition(",")[2] for point in points.split()]


def test_a_dead_letter_is_replayed_only_once_the_replay_is_confirmed(
    seeded: sb.Broker, dashboard: Dashboard, page: Any
) -> None:
    for n in range(3):
        seeded.publish("stream-a", n)
    consumer = seeded.consumer("read-group-a", "w", max_deliveries=1, **FAST)
    bury(consumer, lambda event: f"no {event.body}")
    assert len(seeded.dead_letters("stream-a", "read-group-a")) == 3

    posts: list[str] = []
    page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
    page.goto(dashboard.url)
    page.locator('tr[data-group="read-group-a"] a').click()
    expect(page.locator("h1")).to_contain_text("Dead letters of group read-group-a")
    rows = page.locator("tr.letter")
    expect(rows).to_have_count(3)
    expect(rows.first.locator("td.letter-error")).to_have_text("ValueError: no 0")

    questions: list[str] = []

    def answer(dialog: Any, accept: bool) -> None:
        questions.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda dialog: answer(dialog, accept=False))
    rows.first.locator("button").click()
    page.evaluate("1")  # the click's handlers have run
    assert len(questions) == 1
    assert questions[0].startswith("Replay event ")
    assert posts == []
    expect(rows).to_have_count(3)
    assert len(seeded.dead_letters("stream-a", "read-group-a")) == 3

    page.once("dialog", lambda dialog: answer(dialog, accept=True))
    rows.first.locator("button").click()
    expect(page.locator("p.done")).to_contain_text("Replayed 1 dead letter")
    expect(rows).to_have_count(2)
    assert len(posts) == 1
    assert [letter.event.body for letter in seeded.dead_letters("stream-a", "read-group-a")] == [
        1,
        2,
    ]

    page.once("dialog", lambda dialog: answer(dialog, accept=True))
    page.locator("form.replay-all button").click()
    expect(page.locator("p.done")).to_contain_text("Replayed 2 dead letters")
    expect(page.locator("p.empty")).to_have_text("No dead letters.")
    assert questions[-1] == "Replay all 2 dead letters to group read-group-a?"
    assert seeded.dead_letters("stream-a", "read-group-a") == []
    again: list[int] = []
    consumer.consume(lambda events: again.extend(e.body for e in events), 10, block=False)
    assert sorted(again) == [0, 1, 2]


def test_hostile_names_meta_bodies_and_errors_are_shown_as_text(
    server: Server, seeded: sb.Broker, dashboard: Dashboard, page: Any
) -> None:
    seeded.publish("stream-a", {"text": HOSTILE}, {"tag": HOSTILE})
    consumer = seeded.consumer("read-group-a", "w", max_deliveries=1, **FAST)
    bury(consumer, lambda event: HOSTILE)
    key = seeded.registry.streams["stream-a"].key
    client = server.client()
    client.xgroup_create(key, "read-group-ab", "0")  # as its first consumer would
    client.xgroup_createconsumer(key, "read-group-ab", HOSTILE)

    page.goto(dashboard.url)
    hostile = page.locator("tr.consumer td.name", has_text="window.hacked")
    expect(hostile).to_have_text(HOSTILE_SHOWN)

    page.goto(f"{dashboard.url}/streams/stream-a")
    event = page.locator("tr.event")
    expect(event).to_have_count(1)
    expect(event.locator("td.meta")).to_have_text(f"tag={HOSTILE_SHOWN}")
    expect(event.locator("td.body")).to_have_text('{"text": "' + HOSTILE_SHOWN + '"}')

    page.goto(f"{dashboard.url}/streams/stream-a/groups/read-group-a")
    letter = page.locator("tr.letter")
    expect(letter.locator("td.letter-error")).to_have_text(f"ValueError: {HOSTILE_SHOWN}")
    expect(letter.locator("td.meta")).to_have_text(f"tag={HOSTILE_SHOWN}")
    # A stream that does not exist, named in the address: a 404 that shows the name as text.
    reply = page.goto(f"{dashboard.url}/streams/%3Cimg%20src=x%20onerror=window.hacked=1%3E%1B[2J")
    assert reply.status == 404
    expect(page.locator("p.error")).to_contain_text(
        # As the command line shows it: the name quoted as Python does, its escape escaped.
        "stream '<img src=x onerror=window.hacked=1>\\x1b[2J' is not registered"
    )
    for path in ("/", "/streams/stream-a", "/streams/stream-a/groups/read-group-a"):
        page.goto(dashboard.url + path)
        page.locator("header").wait_for()
        assert page.locator("main script").count() == 0
        assert page.evaluate("window.hacked") is None
        assert "\x1b" not in page.content()


def test_a_group_whose_consumers_all_stopped_while_it_holds_events_is_flagged(
    seeded: sb.Broker, dashboard: Dashboard, page: Any
) -> None:
    consumer = seeded.consumer("read-group-c", "crashed", **FAST)
    seeded.publish("stream-c", "held")

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("the worker died")

    with pytest.raises(RuntimeError):
        consumer.consume(crash, 10, block=False)
    for n in range(2):
        seeded.publish("stream-c", n)

    # A group whose consumers all left (or that never ran) holds its events back too.
    seeded.publish("stream-b", "waits")

    page.goto(dashboard.url)
    banner = page.locator('.alert[data-stream="stream-c"][data-group="read-group-c"]')
    expect(banner).to_contain_text(
        "Consumer group read-group-c of stream stream-c has no live consumer and holds back "
        "3 events, the oldest for"
    )
    expect(page.locator('.alert[data-stream="stream-b"]')).to_contain_text(
        "Consumer group read-group-ab of stream stream-b has no live consumer and holds back "
        "1 event, the oldest for"
    )
    expect(page.locator('tr.group.stopped[data-group="read-group-c"]')).to_have_count(1)
    # The groups that hold nothing back are not flagged.
    expect(page.locator(".alert")).to_have_count(2)

    def settled() -> bool:
        consumer.consume(lambda events: None, 10, block=False)
        figures = seeded.group_stats("stream-c", "read-group-c")
        return figures.lag == figures.pending == 0

    wait_for(settled, timeout=30, what="read-group-c to handle its events")
    expect(banner).to_have_count(0)


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_token_is_required_when_given_and_actions_need_the_page(
    valkey: Server, tmp_path: Path, browser: Any, page: Any
) -> None:
    config = tmp_path / "streambroker.yaml"
    config.write_text(
        SEED_YAML_TEMPLATE.format(default=f"{valkey.address}:0", second=f"{valkey.address}:3")
    )
    with seed_registry(f"{valkey.address}:0", f"{valkey.address}:3").broker() as broker:
        broker.publish("stream-a", "x")
        consumer = broker.consumer("read-group-a", "w", max_deliveries=1, **FAST)
        bury(consumer, lambda event: "no")
        (letter,) = broker.dead_letters("stream-a", "read-group-a")
        running = Dashboard(config, "--token", "s3cret")
        try:
            base = running.url
            assert _get(base) == 401
            assert _get(f"{base}/api/figures") == 401
            assert _get(f"{base}/api/figures", {"Authorization": "Bearer wrong"}) == 401
            assert _get(f"{base}/api/figures", {"Authorization": "Bearer s3cret"}) == 200
            assert _get(f"{base}/?token=wrong") == 401
            # A page of another site whose name points at this address gets nothing.
            headers = {"Authorization": "Bearer s3cret", "Host": "evil.example"}
            assert _get(f"{base}/api/figures", headers) == 400

            # Actions need the page's Origin and CSRF value, even with the token.
            replay = f"{base}/streams/stream-a/groups/read-group-a/replay"
            form = f"letter={letter.id}&csrf=guess".encode()
            bearer = {"Authorization": "Bearer s3cret"}
            assert _get(replay, bearer, form) == 403
            assert _get(replay, {**bearer, "Origin": "http://evil.example"}, form) == 403
            assert _get(replay, {**bearer, "Origin": base}, form) == 403
            assert len(broker.dead_letters("stream-a", "read-group-a")) == 1

            reply = page.goto(f"{base}/streams/stream-a?token=wrong")
            assert reply.status == 401
            page.goto(f"{base}/?token=s3cret")
            assert page.url == f"{base}/"
            expect(figure(page, "stream-a", "length")).to_have_text("1")
            page.goto(f"{base}/streams/stream-a/groups/read-group-a")
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator("tr.letter button").click()
            expect(page.locator("p.done")).to_contain_text("Replayed 1 dead letter")
            assert broker.dead_letters("stream-a", "read-group-a") == []
        finally:
            assert running.stop() == 0, running.errors


def test_the_figures_are_read_once_per_interval_however_many_ask(
    server: Server, event_loop_thread: Loop
) -> None:
    registry = seed_registry(f"{server.address}:0", f"{server.address}:3")

    async def scenario() -> None:
        async with registry.async_broker() as broker:
            await broker.publish("stream-a", "x")
            figures = Figures(broker, min_interval=0.2)
            views = await asyncio.gather(*(figures.view() for _ in range(20)))
            assert figures.reads == 1
            assert all(view is views[0] for view in views)
            assert views[0]["streams"][0]["length"] == 1
            await broker.publish("stream-a", "y")
            await asyncio.sleep(0.25)
            view = await figures.view()
            assert figures.reads == 2
            assert view["streams"][0]["length"] == 2
            assert view["streams"][0]["published_series"] != []

    event_loop_thread.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_reading_that_fails_names_the_pool_and_waits_for_the_interval(
    event_loop_thread: Loop,
) -> None:
    port = free_port()  # nothing listens there
    registry = seed_registry(f"127.0.0.1:{port}:0", f"127.0.0.1:{port}:3")

    async def scenario() -> None:
        async with registry.async_broker() as broker:
            figures = Figures(broker, min_interval=60)
            views = await asyncio.gather(*(figures.view() for _ in range(5)))
            assert figures.reads == 1
            assert views[0]["streams"] == []
            assert views[0]["error"].startswith("redis pool 'default': ")
            assert str(port) in views[0]["error"]

    event_loop_thread.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_port_in_use_is_one_line_naming_it(config_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "streambroker", "dashboard", "-p", str(port)]
        result = subprocess.run(
            [*command, "-c", str(config_file)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"streambroker: error: cannot serve the dashboard on 127.0.0.1:{port}: "
    )
    assert len(result.stderr.splitlines()) == 1
