# expect: 'a forbidden sign' -> failed: TaskFailedError
"""``generate_many``: a list in, a list out, failures in place; and a paced client.

The client is capped at 20 submits per second (``max_per_second``), evenly spaced.
"""

from __future__ import annotations

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx

PROMPTS = [
    "a snowy owl",
    "a forbidden sign",  # moderation fails this one
    "a tide pool",
    "a fireworks show",
    "a bonsai tree",
]


# --8<-- [start:generate_many]
async def thumbnails(client: kx.AsyncKeevx, prompts: list[str]) -> dict[str, str]:
    """Map each prompt to its first image URL, or to the reason it has none."""
    results = await client.generate_many(prompts, concurrency=8, timeout=600)
    by_prompt: dict[str, str] = {}
    for prompt, outcomes in zip(prompts, results, strict=True):
        first = outcomes[0]  # every request has at least one entry
        if isinstance(first, kx.KeevxError):
            by_prompt[prompt] = f"failed: {type(first).__name__}"
        else:
            by_prompt[prompt] = first.image_url
    return by_prompt


# --8<-- [end:generate_many]


async def main() -> None:
    fake = FakeKeevx(fail_if=lambda prompt: "forbidden" in prompt)
    async with fake, fake.http_client() as http:
        # --8<-- [start:client]
        client = kx.AsyncKeevx(
            api_key="test",
            base_url=fake.base_url,
            http_client=http,
            callback_url="https://app.example.test/keevx/callback",
            max_concurrency=32,  # submits in flight at once, across the client
            max_per_second=20,  # and at most 20 started per second, evenly spaced
        )
        # --8<-- [end:client]
        async with client:
            fake.deliver_into(client)
            by_prompt = await thumbnails(client, PROMPTS)
        span = fake.submit_times[-1] - fake.submit_times[0]
    for prompt, outcome in by_prompt.items():
        print(f"{prompt!r} -> {outcome}")
    print(f"{len(fake.submit_times)} submits spread over {span:.2f} s")


if __name__ == "__main__":
    anyio.run(main)
