# expect: 7 images saved, 1 upload for 3 requests, 0 partial files
"""Files: a local reference image uploaded once, every result saved as it finishes.

Runs on FakeKeevx, whose file host serves every result URL as a real PNG; a scripted 503
from the file host shows a download retried.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:batch]
async def restyle(client: kx.AsyncKeevx, photo: Path, out: Path) -> list[Path]:
    """Three variations of one local photo, each result saved into ``out``."""
    requests = [
        kx.ImageRequest(f"this vase, {style}", reference_images=[photo], generate_count=2)
        for style in ("in watercolor", "as a pencil sketch", "in the style of ukiyo-e")
    ]
    saved = []
    async with client.batch(requests, download_to=out) as batch:
        async for task in batch:
            error = task.exception()
            if isinstance(error, kx.DownloadError):
                # The image exists, but its file could not be saved: keep the URL.
                assert error.result is not None
                print(f"not saved ({error}): {error.result.image_url}")
            elif error is not None:
                print(f"{task.request.prompt!r} failed: {error}")
            else:
                path = task.result().path  # set once the file is saved
                assert path is not None
                saved.append(path)
    return saved


# --8<-- [end:batch]


async def main() -> None:
    workdir = Path(tempfile.mkdtemp())
    photo = workdir / "vase.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # stands for your own photo
    out = workdir / "out"
    async with FakeKeevx(file_size=20_000) as fake, fake.client() as client:
        fake.inject(503, retry_after=0, route="file")  # the first file fails once
        saved = await restyle(client, photo, out)
        # --8<-- [start:download]
        [result] = await client.generate(kx.ImageRequest("a red fox"))
        path = await client.download(result, out)  # out/<task_id>.png
        # --8<-- [end:download]
        saved.append(path)
    partial = [name for name in out.iterdir() if name.suffix == ".part"]
    print(
        f"{len(saved)} images saved, {fake.upload_calls} upload for 3 requests, "
        f"{len(partial)} partial files"
    )


if __name__ == "__main__":
    anyio.run(main)
