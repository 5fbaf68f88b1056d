"""The image kind: ``POST /v1/image_generate``, ``i2is-`` task IDs, an
[`ImageResult`][keevx_async.ImageResult] per task.

Its request and result live in `keevx_async._models` and its wire format in
`keevx_async._wire`, where the callback decoder's fast path reads image callbacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from keevx_async._kinds._kind import Kind
from keevx_async._models import ImageRequest, ImageResult, image_result_of
from keevx_async._wire import decode_request, encode_request

if TYPE_CHECKING:
    from keevx_async._models import ReferenceImage

__all__ = ["IMAGE"]


def _images(request: ImageRequest) -> tuple[tuple[str, ReferenceImage], ...]:
    return tuple(
        (f"reference_images[{position}]", image)
        for position, image in enumerate(request.reference_images)
    )


IMAGE: Final = Kind(
    name="image",
    task_type="image_generate",
    submit_path="/v1/image_generate",
    prefixes=("i2is-",),
    request_type=ImageRequest,
    result_type=ImageResult,
    url_field="image_url",
    media_types=("image/",),
    images=_images,
    encode=encode_request,
    decode_request=decode_request,
    result=image_result_of,
)
"""Image generation (``POST /v1/image_generate``)."""
