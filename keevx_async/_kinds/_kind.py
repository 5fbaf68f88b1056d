"""What a kind of task is: the one place the task machinery asks about a kind.

The client, registry, batch, reconciler, router and receiver handle tasks of every kind
alike (submit -> task IDs -> tasks -> callbacks or lookups -> results); a
[`Kind`][keevx_async._kinds.Kind] holds everything that differs from one kind to the
next: its endpoint, its task ID prefix, its request and result types, how a request
becomes a submit body and how a finished task's data becomes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from keevx_async._models import CallbackPayload, ReferenceImage, TaskRequest

__all__ = ["Kind"]


@attrs.frozen
class Kind:
    """One kind of task of the service (image generation, image to video, ...).

    Attributes:
        name: the kind's short name (``"image"``), stored with a router's records.
        task_type: the ``task_type`` the service's callbacks carry for it.
        submit_path: the submit endpoint's path; a task is looked up at
            ``{submit_path}/{task_id}``.
        prefixes: the prefixes of its task IDs (``"i2is-"``).
        request_type: its request class.
        result_type: its result class.
        url_field: the field of a finished task's data holding the result file's URL.
        media_types: the ``Content-Type`` prefixes its result files may have.
        images: the input images of a request, each with the field that holds it
            (``"reference_images[0]"``), in the order `encode` takes their URLs.
        encode: the submit body of a request, given the callback URL to send (with its
            token) and, when some images are local files, the URLs of all of them
            (aligned with `images`).
        decode_request: a request rebuilt from a submit body (a router's record).
        result: the result of a successfully finished task from its payload, its
            request and its index.
    """

    name: str
    task_type: str
    submit_path: str
    prefixes: tuple[str, ...]
    request_type: type[TaskRequest]
    result_type: type[Any]
    url_field: str
    media_types: tuple[str, ...]
    images: Callable[[Any], tuple[tuple[str, ReferenceImage], ...]] = attrs.field(repr=False)
    encode: Callable[[Any, str | None, Sequence[str] | None], bytes] = attrs.field(repr=False)
    decode_request: Callable[[bytes | str | Mapping[str, Any]], Any] = attrs.field(repr=False)
    result: Callable[[CallbackPayload, Any, int], Any] = attrs.field(repr=False)

    def lookup_path(self, quoted_task_id: str) -> str:
        """The GET endpoint's path for a task (its ID already URL-quoted)."""
        return f"{self.submit_path}/{quoted_task_id}"
