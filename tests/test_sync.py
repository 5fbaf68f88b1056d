"""Keevx, the synchronous client: plain (non-async) tests against FakeKeevx on a loopback
port, the client's own event loop on asyncio and on trio."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import re
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import httpx
import pytest
from wiring import API_KEY, callback_body, fake_in_thread, ok_reply

import keevx_async as kx
from keevx_async.testing._file_host import png_bytes

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from anyio.from_thread import BlockingPortal

    from keevx_async.testing import FakeKeevx

JOIN_TIMEOUT = 30.0

Backend = Literal["asyncio", "trio"]


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The event loop of the client's thread."""
    return cast("Backend", request.param)


@pytest.fixture
def served() -> Iterator[tuple[FakeKeevx, BlockingPortal]]:
    with fake_in_thread() as served:
        yield served


def loop_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("keevx-")]


def make_client(fake: FakeKeevx, backend: Backend, **options: Any) -> kx.Keevx:
    options.setdefault("reconcile_after", 0.05)  # results by lookups, soon
    return kx.Keevx(api_key=API_KEY, base_url=fake.base_url, backend=backend, **options)


# --- getting results -------------------------------------------------------------------


def test_generate_without_callback_url_gets_results_by_lookups(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    request = kx.ImageRequest("a red fox", generate_count=2)
    with make_client(fake, backend) as client:
        results = client.generate(request, timeout=30)
        stats = client.stats
    assert [result.index for result in results] == [0, 1]
    for result in results:
        assert result.request is request
        assert result.image_url == fake.tasks[result.task_id].image_url
        assert fake.tasks[result.task_id].callback_url is None
    assert stats.resolved_by_lookup == 2
    assert fake.get_calls >= 2


def test_generate_with_serve_callbacks_gets_real_callbacks(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, portal = served
    with make_client(fake, backend, reconcile_after=None) as client:
        with client.serve_callbacks(port=0) as server:
            callback_url_in_block = client.callback_url
            results = client.generate(kx.ImageRequest("a lighthouse", generate_count=3))
            portal.call(fake.wait_idle)
        callback_url_after_block = client.callback_url
        stats = client.stats
    assert callback_url_in_block == server.url
    assert callback_url_after_block is None  # as it was before the block
    assert len(results) == 3
    for result in results:
        served_task = fake.tasks[result.task_id]
        assert served_task.callback_url is not None
        assert served_task.callback_url.startswith(server.url + "?keevx_token=")
        assert result.image_url == served_task.image_url
    assert fake.callbacks_sent == 3
    assert stats.resolved_by_callback == 3
    assert fake.delivery_failures == []


def test_submit_then_wait_on_each_task(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    with make_client(fake, backend) as client:
        submission = client.submit(kx.ImageRequest("a boat", generate_count=3))
        results = [task.wait(timeout=30) for task in submission.tasks]
    assert submission.task_ids == tuple(task.task_id for task in submission.tasks)
    assert [task.index for task in submission.tasks] == [0, 1, 2]
    assert [result.task_id for result in results] == list(submission.task_ids)
    # Finished tasks stay readable after the client closed.
    assert all(task.done() and task.exception() is None for task in submission.tasks)
    assert submission.tasks[0].result() == results[0]
    assert submission.tasks[0].status == "SUCCEEDED"


def test_batch_yields_every_fate_and_reads_a_generator_off_the_loop(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    fake.fail_if = lambda prompt: "forbidden" in prompt
    fake.inject(400)  # the first submit is refused
    prompts = [f"prompt {n}" for n in range(8)] + ["a forbidden fox"]
    readers: set[str] = set()

    def read_prompts() -> Iterator[str]:
        for prompt in prompts:
            readers.add(threading.current_thread().name)
            yield prompt

    with make_client(fake, backend, max_concurrency=1) as client:
        with client.batch(read_prompts(), timeout=30) as batch:
            tasks = list(batch)
        assert batch.requests_read == 9
        assert batch.submitted == 8
        assert batch.submit_failed == 1
        assert batch.yielded == len(tasks) == 9
        assert batch.in_flight == batch.pending == batch.submitting == 0
        assert "read=9" in repr(batch)
    refused = [task for task in tasks if task.task_id is None]
    failed = [task for task in tasks if isinstance(task.exception(), kx.TaskFailedError)]
    succeeded = [task for task in tasks if task.exception() is None]
    assert len(refused) == 1
    assert refused[0].position == 0
    assert isinstance(refused[0].exception(), kx.APIError)
    assert [task.request.prompt for task in failed] == ["a forbidden fox"]
    assert len(succeeded) == 7
    for task in succeeded:
        assert task.task_id is not None
        assert task.position is not None
        assert fake.tasks[task.task_id].prompt == task.request.prompt == prompts[task.position]
    # Read in worker threads: neither the caller's thread nor the client's event loop.
    assert readers
    assert threading.current_thread().name not in readers
    assert not any(name.startswith("keevx-") for name in readers)


def test_leaving_a_batch_early_stops_reading_an_endless_input(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, portal = served

    def endless() -> Iterator[kx.ImageRequest]:
        n = 0
        while True:
            yield kx.ImageRequest(f"prompt {n}")
            n += 1

    with make_client(fake, backend) as client:
        with client.batch(endless(), concurrency=2, max_pending=4) as batch:
            first = [next(batch) for _ in range(3)]
        read = batch.requests_read
        portal.call(fake.wait_idle)
        assert client.stats.pending == 0  # what was unfinished was let go
    assert all(task.done() for task in first)
    # Read only while fewer than max_pending tasks awaited their turn, not after the block.
    assert read <= 3 + 4 + 2
    assert batch.requests_read == read


def test_a_batch_is_iterated_inside_its_block_once(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    with make_client(fake, backend) as client:
        batch = client.batch(["a fox"])
        with pytest.raises(RuntimeError, match=r"inside `with client\.batch"):
            next(batch)
        with batch:
            assert [task.request.prompt for task in batch] == ["a fox"]
        with pytest.raises(RuntimeError, match="runs once"):
            batch.__enter__()
        with pytest.raises(ValueError, match="concurrency"):
            client.batch(["a fox"], concurrency=0)


def test_a_bad_item_in_a_batch_is_raised_after_the_good_ones(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    seen: list[str] = []
    items: list[Any] = ["a fox", 42, "never read"]
    with make_client(fake, backend) as client:
        with pytest.raises(TypeError, match=r"requests\[1\]"):
            with client.batch(iter(items), timeout=30) as batch:
                seen.extend(task.request.prompt for task in batch)
    assert seen == ["a fox"]


def test_generate_many_is_aligned_with_its_input(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    fake.fail_if = lambda prompt: "forbidden" in prompt
    requests: list[kx.ImageRequest | str] = [
        kx.ImageRequest("a koi pond", generate_count=2),
        "a forbidden crane",
        kx.ImageRequest("a paper boat"),
    ]
    with make_client(fake, backend) as client:
        from_list = client.generate_many(requests, timeout=30)
        from_generator = client.generate_many((item for item in requests), timeout=30)
    for results in (from_list, from_generator):
        assert [len(outcomes) for outcomes in results] == [2, 1, 1]
        koi, crane, boat = results
        assert [outcome.index for outcome in koi if isinstance(outcome, kx.ImageResult)] == [0, 1]
        assert isinstance(crane[0], kx.TaskFailedError)
        assert isinstance(boat[0], kx.ImageResult)
        assert fake.tasks[boat[0].task_id].prompt == "a paper boat"


def test_retrieve_and_reattach_by_task_id(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, portal = served
    request = kx.ImageRequest("a kite")
    with make_client(fake, backend, reconcile_after=None) as first:
        submission = first.submit(request)
    (task_id,) = submission.task_ids
    # Closed before its result came: the task ended with the client.
    assert isinstance(submission.tasks[0].exception(), kx.ClientClosedError)
    portal.call(fake.wait_idle)
    # No lookups of its own: a re-attached task is looked up at once otherwise, and
    # could finish (and leave the client) before the second task() below.
    with make_client(fake, backend, reconcile_after=None) as second:
        task = second.task(task_id, request=request)
        again = second.task(task_id)
        snapshot = second.retrieve(task_id)  # resolves the task waiting here
        result = task.wait(timeout=30)
        with pytest.raises(kx.UnknownTaskError):
            second.task("i2is-nobody-knows")
    assert snapshot.task_id == task_id
    assert snapshot.done
    assert snapshot.image_url == fake.tasks[task_id].image_url
    assert result.image_url == snapshot.image_url
    assert result.request is request
    assert again == task
    assert hash(again) == hash(task)
    assert again != submission.tasks[0]


def test_feed_callback_resolves_a_task(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    fake.complete_after = 3600  # the fake never calls back: the test does
    callback_url = "https://app.example.test/keevx/callback"
    with make_client(fake, backend, callback_url=callback_url, reconcile_after=None) as client:
        [task] = client.submit(kx.ImageRequest("a heron")).tasks
        assert task.task_id is not None
        served_task = fake.tasks[task.task_id]
        body = callback_body(task.task_id, image_url="https://images.example.test/heron.png")
        with pytest.raises(kx.CallbackAuthError):
            client.feed_callback(body)
        assert not task.done()
        url = served_task.callback_url
        assert client.feed_callback(body, url=url) is kx.CallbackOutcome.RESOLVED
        assert client.feed_callback(body, url=url) is kx.CallbackOutcome.DUPLICATE
        assert task.wait().image_url == "https://images.example.test/heron.png"


def test_there_is_no_callback_app_and_the_error_says_what_to_use(
    served: tuple[FakeKeevx, BlockingPortal],
) -> None:
    fake, _ = served
    with make_client(fake, "asyncio") as client:
        assert not hasattr(client, "callback_app")
        with pytest.raises(AttributeError, match=r"serve_callbacks\(\).*feed_callback"):
            client.callback_app  # noqa: B018 - the attribute access is the test


def test_a_task_view_waits_reads_and_times_out(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    fake.complete_after = 3600
    with make_client(fake, backend, reconcile_after=None) as client:
        [task] = client.submit(kx.ImageRequest("a slow snail")).tasks
        assert re.fullmatch(r"<SyncTask i2is-\S+ #0 GENERATING>", repr(task))
        assert not task.done()
        assert task.position is None
        with pytest.raises(kx.TaskPendingError):
            task.result()
        with pytest.raises(kx.TaskPendingError):
            task.exception()
        with pytest.raises(kx.TaskTimeoutError):
            task.wait(timeout=0.01)
        with pytest.raises(ValueError, match="timeout"):
            task.wait(timeout=-1)
        assert not task.done()  # a timed-out wait leaves the task as it was
    # The close ended it; waiting now says so, with the task's own error.
    with pytest.raises(kx.ClientClosedError, match=str(task.task_id)):
        task.wait()


# --- threads ---------------------------------------------------------------------------


def test_many_threads_generate_at_once_each_gets_its_own_image(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    fake.complete_after = (0.0, 0.05)  # out of order
    prompts = [f"prompt of thread {n}" for n in range(16)]
    start = threading.Barrier(len(prompts))
    outcomes: dict[str, list[kx.ImageResult] | BaseException] = {}

    def generate(client: kx.Keevx, prompt: str) -> None:
        start.wait(timeout=JOIN_TIMEOUT)
        try:
            outcomes[prompt] = client.generate(kx.ImageRequest(prompt), timeout=30)
        except BaseException as exc:
            outcomes[prompt] = exc

    with make_client(fake, backend, max_concurrency=4) as client:
        threads = [threading.Thread(target=generate, args=(client, p)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
    assert set(outcomes) == set(prompts)
    for prompt, outcome in outcomes.items():
        assert isinstance(outcome, list), outcome
        [result] = outcome
        assert result.request.prompt == prompt
        assert fake.tasks[result.task_id].prompt == prompt
        assert result.image_url == fake.tasks[result.task_id].image_url
    assert fake.max_in_flight <= 4


def test_close_from_another_thread_ends_the_waiters(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, portal = served
    fake.complete_after = 3600
    client = make_client(fake, backend, reconcile_after=None)
    [task] = client.submit(kx.ImageRequest("a task that never ends")).tasks
    errors: dict[str, BaseException] = {}

    def wait_for(name: str, call: Any) -> None:
        try:
            call()
        except BaseException as exc:
            errors[name] = exc

    waiters = [
        threading.Thread(
            target=wait_for, args=("generate", lambda: client.generate(kx.ImageRequest("x")))
        ),
        threading.Thread(target=wait_for, args=("wait", task.wait)),
    ]
    for waiter in waiters:
        waiter.start()
    portal.call(fake.wait_for_submits, 2)  # the generate's submit has reached the service
    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(JOIN_TIMEOUT)
    for waiter in waiters:
        waiter.join(JOIN_TIMEOUT)
    assert not closer.is_alive()
    assert not any(waiter.is_alive() for waiter in waiters)
    assert isinstance(errors["generate"], kx.ClientClosedError)
    assert isinstance(errors["wait"], kx.ClientClosedError)
    assert errors["wait"].task_id == task.task_id
    assert loop_threads() == []


def test_a_call_from_the_clients_own_loop_raises_instead_of_waiting_forever(
    backend: Backend,
) -> None:
    seen: list[BaseException] = []
    holder: list[kx.Keevx] = []

    async def on_request(request: httpx.Request) -> None:
        # httpx runs this on the client's own event loop.
        try:
            holder[0].retrieve("i2is-1")
        except RuntimeError as exc:
            seen.append(exc)
        holder[0].stats  # noqa: B018 - reading stats there is fine (and does not wait)

    def reply(request: httpx.Request) -> httpx.Response:
        status, body, _ = ok_reply("i2is-1")
        return httpx.Response(status, json=body)

    http = httpx.AsyncClient(
        transport=httpx.MockTransport(reply), event_hooks={"request": [on_request]}
    )
    with kx.Keevx(api_key=API_KEY, http_client=http, backend=backend) as client:
        holder.append(client)
        submission = client.submit(kx.ImageRequest("a fox"))
    assert submission.task_ids == ("i2is-1",)
    [error] = seen
    assert "own event loop thread" in str(error)
    assert http.is_closed  # its connections belonged to the client's loop


# --- lifetime --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"api_key": None}, kx.AuthenticationError, "no API key"),
        ({"base_url": "ftp://example.test"}, kx.InvalidRequestError, "base_url"),
        ({"http_client": "not a client"}, TypeError, "http_client"),
        ({"max_retries": -1}, ValueError, "max_retries"),
        ({"backend": "curio"}, ValueError, "backend"),
    ],
)
def test_construction_errors_reach_the_caller_and_leave_nothing_running(
    options: dict[str, Any],
    error: type[Exception],
    match: str,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
) -> None:
    monkeypatch.delenv("KEEVX_API_KEY", raising=False)
    options = {"api_key": API_KEY, "backend": backend, **options}
    with pytest.raises(error, match=match):
        kx.Keevx(**options)
    assert loop_threads() == []


def test_trio_is_asked_for_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trio", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install trio"):
        kx.Keevx(api_key=API_KEY, backend="trio")
    assert loop_threads() == []


class _RouterThatCannotStart(kx.LocalRouter):
    shares_callbacks = True

    async def run(self, host: kx.RouterHost, *, task_status: Any) -> None:
        raise kx.RouterError("the router's store is unreachable")


def test_a_client_that_cannot_start_leaves_nothing_running(backend: Backend) -> None:
    with pytest.raises(kx.RouterError, match="unreachable"):
        kx.Keevx(api_key=API_KEY, router=_RouterThatCannotStart(), backend=backend)
    assert loop_threads() == []


def test_a_call_cut_off_by_close_ends_with_client_closed_error(backend: Backend) -> None:
    in_flight = threading.Event()

    async def never_answer(request: httpx.Request) -> httpx.Response:
        in_flight.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    http = httpx.AsyncClient(transport=httpx.MockTransport(never_answer))
    client = kx.Keevx(api_key=API_KEY, http_client=http, backend=backend)
    errors: list[BaseException] = []

    def retrieve() -> None:
        try:
            client.retrieve("i2is-1")
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=retrieve)
    caller.start()
    assert in_flight.wait(JOIN_TIMEOUT)
    client.close()
    caller.join(JOIN_TIMEOUT)
    [error] = errors
    assert isinstance(error, kx.ClientClosedError)
    assert error.task_id is None
    assert "closed while this call was running" in str(error)


def test_close_from_the_clients_own_loop_does_not_wait_for_itself(backend: Backend) -> None:
    holder: list[kx.Keevx] = []

    async def close_on_request(request: httpx.Request) -> None:
        holder[0].close()  # on the client's own loop: closing starts, and this goes on

    def reply(request: httpx.Request) -> httpx.Response:
        status, body, _ = ok_reply("i2is-1")
        return httpx.Response(status, json=body)

    http = httpx.AsyncClient(
        transport=httpx.MockTransport(reply), event_hooks={"request": [close_on_request]}
    )
    client = kx.Keevx(api_key=API_KEY, http_client=http, backend=backend)
    holder.append(client)
    with pytest.raises(kx.ClientClosedError):
        client.generate(kx.ImageRequest("a fox"))
    with pytest.raises(RuntimeError, match="closed"):
        client.submit(kx.ImageRequest("a fox"))
    client.close()  # waits until the close begun on the loop is done
    assert loop_threads() == []


def test_closing_the_client_inside_a_batch_block(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    fake.complete_after = 3600
    client = make_client(fake, backend, reconcile_after=None)
    with client.batch(["a fox", "a heron"]) as batch:
        client.close()
        with pytest.raises(RuntimeError, match="closed"):
            next(batch)
    assert loop_threads() == []


def test_serve_callbacks_on_a_port_in_use_says_so_and_runs_once(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served
    with socket.socket() as taken, make_client(fake, backend) as client:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="another process listens there"):
            with client.serve_callbacks(port=taken.getsockname()[1]):
                pass
        server = client.serve_callbacks(port=0)
        with pytest.raises(RuntimeError, match="not entered"):
            server.__exit__(None, None, None)
        with server:
            with pytest.raises(RuntimeError, match="runs once"):
                server.__enter__()


def test_a_closed_client_refuses_calls_like_a_closed_async_client(backend: Backend) -> None:
    async def closed_async_error() -> BaseException:
        client = kx.AsyncKeevx(api_key=API_KEY)
        await client.aclose()
        try:
            await client.submit(kx.ImageRequest("x"))
        except Exception as exc:
            return exc
        raise AssertionError("no error")

    expected = anyio.run(closed_async_error)
    client = kx.Keevx(api_key=API_KEY, backend=backend)
    assert loop_threads()
    client.close()
    client.close()  # idempotent
    assert loop_threads() == []
    assert repr(client) == f"<Keevx base_url='https://api.keevx.cn' backend='{backend}' closed>"
    for call in (
        lambda: client.submit(kx.ImageRequest("x")),
        lambda: client.generate(kx.ImageRequest("x")),
        lambda: client.retrieve("i2is-1"),
        lambda: client.batch(["x"]),
        lambda: client.serve_callbacks(port=0),
        client.__enter__,
    ):
        with pytest.raises(type(expected), match="closed: make a new one"):
            call()
    assert client.stats.submitted == 0  # counters stay readable


def test_a_client_nobody_closed_is_closed_when_collected_with_a_warning(
    caplog: pytest.LogCaptureFixture, backend: Backend
) -> None:
    client = kx.Keevx(api_key=API_KEY, backend=backend)
    assert client.max_concurrency == 16
    assert loop_threads()
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        del client
        gc.collect()
    warnings = [r.getMessage() for r in caplog.records if "was not closed" in r.getMessage()]
    assert len(warnings) == 1
    assert "client.close()" in warnings[0]
    assert loop_threads() == []


def test_a_closed_client_says_nothing_when_collected(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        with kx.Keevx(api_key=API_KEY) as client:
            pass
        del client
        gc.collect()
    assert caplog.records == []


def test_works_where_an_event_loop_already_runs_as_in_a_notebook(
    served: tuple[FakeKeevx, BlockingPortal], backend: Backend
) -> None:
    fake, _ = served

    async def notebook_cell() -> list[kx.ImageResult]:
        # A notebook cell runs inside the kernel's asyncio loop and calls without await.
        with make_client(fake, backend) as client:
            return client.generate(kx.ImageRequest("a notebook sketch"), timeout=30)

    [result] = asyncio.run(notebook_cell())
    assert fake.tasks[result.task_id].prompt == "a notebook sketch"


# --- in step with AsyncKeevx -----------------------------------------------------------


def test_the_options_are_those_of_the_async_client() -> None:
    sync_parameters = list(inspect.signature(kx.Keevx).parameters.values())
    async_parameters = list(inspect.signature(kx.AsyncKeevx).parameters.values())
    assert sync_parameters[:-1] == async_parameters  # names, kinds, defaults, annotations
    backend = sync_parameters[-1]
    assert (backend.name, backend.kind, backend.default) == (
        "backend",
        inspect.Parameter.KEYWORD_ONLY,
        "asyncio",
    )


def _documented_args(cls: type) -> dict[str, str]:
    doc = inspect.getdoc(cls)
    assert doc is not None
    section = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    args: dict[str, str] = {}
    for name, text in re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", section, re.M | re.S):
        args[name] = " ".join(text.split())
    return args


#: Options documented differently, on purpose: what the sync client does with them.
DIFFERENTLY_DOCUMENTED = {"http_client", "reconcile_after", "download_client"}


def test_the_options_are_documented_as_for_the_async_client() -> None:
    sync_args, async_args = _documented_args(kx.Keevx), _documented_args(kx.AsyncKeevx)
    assert list(sync_args) == [*async_args, "backend"]
    assert list(async_args) == list(inspect.signature(kx.AsyncKeevx).parameters)
    for name, text in async_args.items():
        if name in DIFFERENTLY_DOCUMENTED:
            # The same option, then what the sync client does differently.
            assert sync_args[name].split()[:4] == text.split()[:4], name
            assert sync_args[name] != text, name
        else:
            assert sync_args[name] == text, name


def test_every_public_method_of_the_async_client_has_a_sync_twin() -> None:
    public = {name for name in dir(kx.AsyncKeevx) if not name.startswith("_")}
    twins = {name for name in dir(kx.Keevx) if not name.startswith("_")}
    assert public - twins == {"aclose"}  # close() is its twin
    methods = [name for name in public - {"aclose"} if callable(getattr(kx.AsyncKeevx, name))]
    assert "generate" in methods
    for name in methods:
        sync_method, async_method = getattr(kx.Keevx, name), getattr(kx.AsyncKeevx, name)
        sync_parameters = inspect.signature(sync_method).parameters.values()
        async_parameters = inspect.signature(async_method).parameters.values()
        assert [(p.name, p.kind, p.default) for p in sync_parameters] == [
            (p.name, p.kind, p.default) for p in async_parameters
        ], name


def test_files_in_and_out_without_await(
    backend: Backend, tmp_path: Path, served: tuple[FakeKeevx, BlockingPortal]
) -> None:
    """A local reference image is uploaded at submit, results are saved by a batch and
    by download(), through the fake's file host, with no await."""
    fake, _ = served
    reference = tmp_path / "vase.png"
    reference.write_bytes(png_bytes("vase"))
    out = tmp_path / "out"
    with kx.Keevx(
        api_key=API_KEY, base_url=fake.base_url, reconcile_after=0.2, backend=backend
    ) as client:
        uploaded = client.upload(reference)
        assert uploaded.url.startswith(fake.base_url)
        assert len(fake.uploads) == 1
        request = kx.ImageRequest("a vase like this one", reference_images=[reference])
        with client.batch([request, "a plain cat"], download_to=out) as batch:
            saved = [task.result() for task in batch]
        assert sorted(r.request.prompt for r in saved) == ["a plain cat", "a vase like this one"]
        for result in saved:
            assert result.path == out / f"{result.task_id}.png"
            assert result.path.read_bytes().startswith(b"\x89PNG")
        again = client.download(saved[0], tmp_path / "copy.png")
        assert again.read_bytes() == (out / f"{saved[0].task_id}.png").read_bytes()
        [[one]] = client.generate_many(["a heron"], download_to=out)
        assert isinstance(one, kx.ImageResult)
        assert one.path is not None
        assert one.path.exists()
