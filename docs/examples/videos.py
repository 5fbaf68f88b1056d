# expect: 4 videos and 2 images saved, every video an .mp4
"""Videos: image-to-video requests beside image requests, in one batch, saved to disk.

Runs on FakeKeevx, which emulates ``POST /v1/image_to_video`` with the service's
per-model rules and serves every result video as an MP4.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx

BEACH = "https://cdn.example.com/beach.png"


# --8<-- [start:requests]
def requests_for(photo: Path) -> list[kx.ImageRequest | kx.VideoRequest]:
    """Two stills and four clips of one product shot."""
    return [
        kx.ImageRequest(
            "the bottle on a beach at dawn", reference_images=[photo], generate_count=2
        ),
        # Model V, start frame: 4, 6 or 8 seconds, up to 4k, optionally with sound.
        kx.VideoRequest(
            "waves roll in, the camera pans left",
            image_url=BEACH,
            duration=6,
            aspect_resolution="4k",
            generate_audio=True,
            custom_id="clip-pan",
        ),
        # Model V, start and end frames (local files are uploaded for you).
        kx.VideoRequest("from sunrise to noon", image_url=BEACH, end_image_url=photo),
        # Model KL: 1..7 reference images, 5 or 10 seconds, 720p or 1080p, no sound.
        kx.VideoRequest(
            "the bottle spins slowly",
            model="KL",
            reference_images=[photo, BEACH],
            duration=10,
            aspect_ratio="9:16",
            generate_count=2,
        ),
    ]


# --8<-- [end:requests]


# --8<-- [start:batch]
async def produce(client: kx.AsyncKeevx, photo: Path, out: Path) -> list[Path]:
    """Every result saved into ``out`` as it finishes: images and videos alike."""
    saved = []
    async with client.batch(requests_for(photo), download_to=out, timeout=1800) as batch:
        async for task in batch:
            error = task.exception()
            if error is not None:
                print(f"{task.request.prompt!r} failed: {error}")
                continue
            result = task.result()
            if isinstance(result, kx.VideoResult):
                print(
                    f"video {result.custom_id or result.task_id}: {result.duration} s, "
                    f"{result.width}x{result.height}"
                )
            assert result.path is not None  # set once the file is saved
            saved.append(result.path)
    return saved


# --8<-- [end:batch]


async def main() -> None:
    workdir = Path(tempfile.mkdtemp())
    photo = workdir / "bottle.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # stands for your own photo
    async with FakeKeevx() as fake, fake.client() as client:
        saved = await produce(client, photo, workdir / "out")
    videos = [path for path in saved if path.suffix == ".mp4"]
    print(
        f"{len(videos)} videos and {len(saved) - len(videos)} images saved, "
        f"every video an {'.mp4' if all(p.read_bytes()[4:8] == b'ftyp' for p in videos) else '?'}"
    )


if __name__ == "__main__":
    anyio.run(main)
