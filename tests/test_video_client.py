"""Videos through the same client: ``VideoRequest`` end to end against FakeKeevx.

The task machinery is the images' (submit -> task IDs -> tasks -> callbacks or lookups ->
results); what these tests pin is that every part of it takes the kind of each task from
the task: its endpoint, its lookups, its result type, its file, its routed records.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import anyio
import pytest
from redis_support import REDIS_URL
from wiring import API_KEY, CALLBACK_URL, fake_in_thread, wired

import keevx_async as kx
from keevx_async.testing import FakeKeevx
from keevx_async.testing._file_host import png_bytes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

START = "https://cdn.example.test/start.png"
REFS = ("https://cdn.example.test/a.png", "https://cdn.example.test/b.jpg")


def video(prompt: str = "waves at dusk", **fields: Any) -> kx.VideoRequest:
    if "reference_images" not in fields and fields.get("model", "V") == "V":
        fields.setdefault("image_url", START)
    if fields.get("model") == "KL":
        fields.setdefault("reference_images", REFS)
    return kx.VideoRequest(prompt, **fields)


def is_lost(prompt: str) -> bool:
    return prompt.startswith("lost")


# --- end to end, per kind ---------------------------------------------------------------


async def test_a_video_request_gives_video_results() -> None:
    async with wired() as (fake, client):
        with anyio.fail_after(10):
            results = await client.generate(video(generate_count=2, custom_id="row-7"))
        assert [type(result) for result in results] == [kx.VideoResult, kx.VideoResult]
        for index, result in enumerate(results):
            task = fake.tasks[result.task_id]
            assert result.task_id.startswith("i2v-")
            assert result.index == index
            assert result.video_url == result.url == task.video_url
            assert result.video_url.endswith(f"/{result.task_id}.mp4")
            assert result.thumbnail_url == task.thumbnail_url != ""
            assert (result.duration, result.width, result.height) == (8, 1920, 1080)
            assert (result.status, result.task_type) == ("SUCCEEDED", "image_to_video")
            assert result.custom_id == "row-7"
            assert result.raw["video_url"] == result.video_url
            assert result.path is None
        assert fake.submit_paths == ["/v1/image_to_video"]
        [body] = {json.dumps(task.body, sort_keys=True) for task in fake.tasks.values()}
        assert json.loads(body)["duration"] == 8  # None resolved to the model's default


@pytest.mark.parametrize(
    ("request_", "result_type", "path", "prefix"),
    [
        (kx.ImageRequest("a fox", generate_count=2), kx.ImageResult, "/v1/image_generate", "i2is-"),
        (video(model="KL", duration=10), kx.VideoResult, "/v1/image_to_video", "i2v-"),
    ],
    ids=["image", "video"],
)
async def test_each_kind_end_to_end(
    request_: kx.ImageRequest | kx.VideoRequest, result_type: type, path: str, prefix: str
) -> None:
    async with wired() as (fake, client):
        submission = await client.submit(request_)
        assert submission.request is request_
        with anyio.fail_after(10):
            results = [await task for task in submission.tasks]
        assert all(type(result) is result_type for result in results)
        assert [result.task_id for result in results] == list(submission.task_ids)
        assert all(task_id.startswith(prefix) for task_id in submission.task_ids)
        assert fake.submit_paths == [path]
        assert client.stats.resolved_by_callback == len(results)
        assert all(result.url for result in results)


async def test_a_mixed_batch_gives_each_task_the_result_of_its_kind() -> None:
    requests: list[kx.ImageRequest | kx.VideoRequest | str] = []
    for i in range(12):
        requests.append(kx.ImageRequest(f"image {i}", generate_count=1 + i % 2))
        requests.append(video(f"video {i}", generate_count=1 + i % 3))
    requests.append("a plain prompt")
    async with wired({"complete_after": (0.0, 0.02), "video_complete_after": (0.0, 0.03)}) as (
        fake,
        client,
    ):
        seen = 0
        with anyio.fail_after(20):
            async with client.batch(requests, concurrency=5) as batch:
                async for task in batch:
                    seen += 1
                    result = task.result()
                    expected = (
                        kx.VideoResult
                        if isinstance(task.request, kx.VideoRequest)
                        else kx.ImageResult
                    )
                    assert type(result) is expected
                    assert result.request is task.request
                    assert result.task_id == task.task_id
        assert (
            seen
            == len(fake.tasks)
            == sum(r.generate_count if not isinstance(r, str) else 1 for r in requests)
        )
        assert sorted(set(fake.submit_paths)) == ["/v1/image_generate", "/v1/image_to_video"]


async def test_generate_many_aligns_mixed_kinds() -> None:
    requests = [video("v", generate_count=2), kx.ImageRequest("i"), video("k", model="KL")]
    async with wired() as (_fake, client):
        with anyio.fail_after(10):
            results = await client.generate_many(requests)
    assert [[type(r).__name__ for r in row] for row in results] == [
        ["VideoResult", "VideoResult"],
        ["ImageResult"],
        ["VideoResult"],
    ]


# --- lookups ----------------------------------------------------------------------------


async def test_lost_video_callbacks_are_recovered_on_the_video_endpoint_only() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.1) as (fake, client):
        with anyio.fail_after(20):
            results = await client.generate_many(
                [video(f"lost {i}", generate_count=2) for i in range(3)]
            )
        task_ids = [result.task_id for row in results for result in row]  # type: ignore[union-attr]
        assert all(type(r) is kx.VideoResult for row in results for r in row)
        assert fake.callbacks_sent == 0
        assert fake.get_paths  # every result came by lookup
        assert all(path.startswith("/v1/image_to_video/i2v-") for path in fake.get_paths)
        assert {path.rsplit("/", 1)[1] for path in fake.get_paths} == set(task_ids)
        assert client.stats.lookups >= len(task_ids)
        for row in results:
            for result in row:
                assert isinstance(result, kx.VideoResult)
                assert (result.duration, result.width, result.height) == (8, 1920, 1080)
                assert result.task_type == "image_to_video"


async def test_retrieve_takes_the_endpoint_from_the_task_id_prefix() -> None:
    async with wired({"video_complete_after": 60}) as (fake, client):
        image_task = (await client.submit(kx.ImageRequest("an image"))).tasks[0]
        video_task = (await client.submit(video(aspect_ratio="9:16", duration=4))).tasks[0]
        with anyio.fail_after(5):
            await image_task
        assert video_task.task_id is not None
        assert image_task.task_id is not None
        # A client that knows neither task: the kind comes from the ID's prefix.
        async with fake.client(callback_url=CALLBACK_URL) as stranger:
            pending = await stranger.retrieve(video_task.task_id)
            assert (pending.status, pending.done, pending.url) == ("PENDING", False, "")
            assert pending.task_type == "image_to_video"
            image = await stranger.retrieve(image_task.task_id)
        assert image.task_type == "image_generate"
        assert image.url == image.image_url != ""
        assert fake.get_paths == [
            f"/v1/image_to_video/{video_task.task_id}",
            f"/v1/image_generate/{image_task.task_id}",
        ]


async def test_a_finished_video_snapshot_resolves_the_waiting_task() -> None:
    async with wired({"video_complete_after": 0.05, "lose_if": is_lost}, reconcile_after=None) as (
        fake,
        client,
    ):
        submission = await client.submit(video("lost one", model="KL", aspect_resolution="720p"))
        [task] = submission.tasks
        assert task.task_id is not None
        with anyio.fail_after(5):
            await fake.wait_idle()
        snapshot = await client.retrieve(task.task_id)
        assert snapshot.done
        assert snapshot.video_url == snapshot.url != ""
        assert (snapshot.duration, snapshot.width, snapshot.height) == (5, 1280, 720)
        result = task.result()
        assert isinstance(result, kx.VideoResult)
        assert (result.video_url, result.duration) == (snapshot.video_url, 5)


async def test_a_video_task_is_pending_then_processing_then_done() -> None:
    async with FakeKeevx(api_key=API_KEY, video_complete_after=1.0) as fake:
        async with fake.client(callback_url=None, reconcile_after=None) as client:
            [task_id] = (await client.submit(video())).task_ids
            first = await client.retrieve(task_id)
            assert first.status == "PENDING"
            with anyio.fail_after(5):
                # Half-way through, the fake's clock turns it PROCESSING.
                await anyio.sleep(0.6)  # a status moved by time alone: nothing to wait on
                assert (await client.retrieve(task_id)).status == "PROCESSING"
                await fake.wait_idle()
            assert (await client.retrieve(task_id)).status == "SUCCEEDED"


async def test_an_image_lookup_endpoint_does_not_know_video_tasks() -> None:
    async with wired() as (fake, client):
        [task_id] = (await client.submit(video())).task_ids
        response = await client._engine.http.get(
            f"{fake.base_url}/v1/image_generate/{task_id}",
            headers={"authorization": f"Bearer {API_KEY}"},
        )
        assert response.json()["code"] == 110002


# --- re-attaching, downloads ------------------------------------------------------------


async def test_a_video_task_re_attaches_in_another_client() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.05) as (fake, client):
        request = video("lost and found", custom_id="csv-3")
        [task_id] = (await client.submit(request)).task_ids
        async with fake.client(callback_url=CALLBACK_URL, reconcile_after=0.05) as other:
            task = await other.task(task_id, request=request)
            assert task.custom_id == "csv-3"
            with anyio.fail_after(10):
                result = await task
        assert isinstance(result, kx.VideoResult)
        assert result.video_url.endswith(".mp4")
        assert result.custom_id == "csv-3"
        assert all(path.startswith("/v1/image_to_video/") for path in fake.get_paths)


async def test_task_refuses_a_request_of_no_kind() -> None:
    async with wired() as (_fake, client):
        with pytest.raises(TypeError, match="VideoRequest"):
            await client.task("i2v-x", request="a prompt")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="VideoRequest"):
            await client.submit(object())  # type: ignore[call-overload]


async def test_a_video_result_downloads_as_mp4(tmp_path: Path) -> None:
    async with wired() as (fake, client):
        with anyio.fail_after(10):
            [result] = await client.generate(video())
            path = await client.download(result, tmp_path)
        assert path == tmp_path / f"{result.task_id}.mp4"
        assert path.read_bytes()[4:8] == b"ftyp"
        assert fake.file_request_headers[-1].get("authorization") is None


async def test_a_batch_downloads_videos_and_images(tmp_path: Path) -> None:
    requests = [video("v"), kx.ImageRequest("i")]
    async with wired() as (_fake, client):
        with anyio.fail_after(10):
            results = await client.generate_many(requests, download_to=tmp_path)
    paths = [
        result.path
        for row in results
        for result in row
        if isinstance(result, (kx.VideoResult, kx.ImageResult))
    ]
    assert all(path is not None and path.exists() for path in paths)
    assert sorted(path.suffix for path in paths if path is not None) == [".mp4", ".png"]


async def test_local_video_images_are_uploaded(tmp_path: Path) -> None:
    start = tmp_path / "start.png"
    start.write_bytes(png_bytes("start"))
    end = tmp_path / "end.png"
    end.write_bytes(png_bytes("end"))
    request = kx.VideoRequest("from here to there", image_url=start, end_image_url=end)
    async with wired() as (fake, client):
        with anyio.fail_after(10):
            [result] = await client.generate(request)
        assert result.request.image_url == start  # kept as given
        body = fake.tasks[result.task_id].body
        assert body["image_url"].startswith(fake.base_url + "/files/uploads/")
        assert body["end_image_url"].startswith(fake.base_url + "/files/uploads/")
        assert body["image_url"] != body["end_image_url"]
        assert len(fake.uploads) == 2


async def test_a_refused_video_submit_keeps_the_code() -> None:
    async with wired() as (fake, client):
        fake.inject(400, route="submit")
        with pytest.raises(kx.APIError) as caught:
            await client.submit(video())
        assert caught.value.maybe_created is False
        assert fake.submit_paths == ["/v1/image_to_video"]


# --- the Redis router -------------------------------------------------------------------


@pytest.fixture
async def two_workers(redis_prefix: str) -> AsyncIterator[tuple[FakeKeevx, list[kx.AsyncKeevx]]]:
    async with FakeKeevx(api_key=API_KEY, seed=7, video_complete_after=(0.05, 0.1)) as fake:
        clients = [
            kx.AsyncKeevx(
                api_key=API_KEY,
                base_url=fake.base_url,
                callback_url=CALLBACK_URL,
                callback_secret="shared-secret",
                router=kx.RedisRouter(REDIS_URL, prefix=redis_prefix),
                reconcile_after=None,
                http_client=fake.http_client(),
            )
            for _ in range(2)
        ]
        try:
            for client in clients:
                await client.__aenter__()
            yield fake, clients
        finally:
            for client in reversed(clients):
                await client.__aexit__(None, None, None)
                await client._engine.http.aclose()


async def test_a_routed_video_callback_resolves_the_owner_in_another_worker(
    two_workers: tuple[FakeKeevx, list[kx.AsyncKeevx]],
) -> None:
    fake, (owner, other) = two_workers
    fake.deliver_into(other)  # every callback reaches the worker that did not submit
    requests = [video(f"routed {i}", generate_count=2, custom_id=f"id-{i}") for i in range(3)]
    with anyio.fail_after(15):
        results = await owner.generate_many([*requests, kx.ImageRequest("an image too")])
        await fake.wait_idle()
    for request, row in zip(requests, results, strict=False):
        assert [type(r) for r in row] == [kx.VideoResult, kx.VideoResult]
        for result in row:
            assert isinstance(result, kx.VideoResult)
            assert result.request is request
            assert (result.duration, result.width, result.height) == (8, 1920, 1080)
            assert result.video_url == fake.tasks[result.task_id].video_url
    assert type(results[-1][0]) is kx.ImageResult
    assert other.stats.callbacks_forwarded == 7
    assert owner.stats.resolved_by_callback == 7
    # The other worker re-attaches a routed video task from Redis alone: kind, request
    # (custom_id included) and result.
    video_id = results[0][1].task_id  # type: ignore[union-attr]
    task = await other.task(video_id)
    assert task.done()
    result = task.result()
    assert isinstance(result, kx.VideoResult)
    assert result.index == 1
    assert result.custom_id == "id-0"
    assert result.request == requests[0]


# --- the sync client --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_sync_client_generates_videos(backend: Literal["asyncio", "trio"]) -> None:
    with (
        fake_in_thread() as (fake, _portal),
        kx.Keevx(
            api_key=API_KEY, base_url=fake.base_url, backend=backend, reconcile_after=0.05
        ) as client,
    ):
        [result] = client.generate(video("sync"), timeout=30)
        task = client.submit(video("sync", custom_id="s-1")).tasks[0]
        assert task.custom_id == "s-1"
        assert isinstance(task.wait(timeout=30), kx.VideoResult)
    assert isinstance(result, kx.VideoResult)
    assert result.video_url.endswith(".mp4")
