"""Names for the service's enumerations and the SDK's small shared types.

The allowed values live here once; the request model validates against them and the
emulator in `keevx_async.testing` enforces the same rules.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "FINISHED_OK",
    "IMAGE_CONTENT_TYPES",
    "IMAGE_EXTENSIONS",
    "IMAGE_QUALITIES",
    "IMAGE_RATIOS",
    "MAX_GENERATE_COUNT",
    "MAX_IMAGE_BYTES",
    "MAX_PROMPT_LENGTH",
    "MAX_REFERENCE_IMAGES",
    "MODULES",
    "UNFINISHED_STATUSES",
    "CallbackTokenIn",
    "ImageQuality",
    "ImageRatio",
    "Module",
]

Module = Literal["std", "pro"]
ImageQuality = Literal["1K", "2K", "4K"]
ImageRatio = Literal["1:1", "3:2", "2:3", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
CallbackTokenIn = Literal["query", "path"]

MODULES: Final = ("std", "pro")
IMAGE_QUALITIES: Final = ("1K", "2K", "4K")
IMAGE_RATIOS: Final = ("1:1", "3:2", "2:3", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_EXTENSIONS: Final = frozenset({"jpg", "jpeg", "png", "bmp", "webp", "gif"})
IMAGE_CONTENT_TYPES: Final = MappingProxyType(
    {
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "png": "image/png",
        "bmp": "image/bmp",
        "webp": "image/webp",
        "gif": "image/gif",
    }
)
"""The media type of each allowed image extension (an upload's part says it)."""
MAX_IMAGE_BYTES: Final = 20 * 1024 * 1024
"""The largest reference image the service takes (20 MB), checked for local files."""

MAX_PROMPT_LENGTH: Final = 1000
MAX_REFERENCE_IMAGES: Final = 5
MAX_GENERATE_COUNT: Final = 8

UNFINISHED_STATUSES: Final = frozenset({"GENERATING", "PENDING", "PROCESSING"})
"""Statuses of a task that has not finished yet. ``PENDING`` and ``PROCESSING`` are the
service's video-task statuses; they are treated like ``GENERATING``.
"""
FINISHED_OK: Final = "SUCCEEDED"
"""The one status that means success. Any other status outside ``UNFINISHED_STATUSES``
is a finished failure.
"""
