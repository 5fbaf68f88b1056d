"""The kinds of task the SDK knows, and how to tell a task's kind.

Adding a kind is one module (its request, result, rules and wire format, ending with its
`Kind`) and one line in `KINDS`; nothing else in the SDK names a kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeAlias

from keevx_async._exceptions import InvalidRequestError
from keevx_async._kinds._image import IMAGE
from keevx_async._kinds._kind import Kind
from keevx_async._kinds._video import VIDEO, VideoRequest, VideoResult
from keevx_async._models import ImageRequest, ImageResult

if TYPE_CHECKING:
    from keevx_async._models import TaskRequest

AnyRequest: TypeAlias = ImageRequest | VideoRequest
"""A request of any kind (one per kind: add the next kind's here)."""
AnyResult: TypeAlias = ImageResult | VideoResult
"""A result of any kind (one per kind: add the next kind's here)."""

__all__ = [
    "IMAGE",
    "KINDS",
    "RESULT_BUILDERS",
    "VIDEO",
    "AnyRequest",
    "AnyResult",
    "Kind",
    "VideoRequest",
    "VideoResult",
    "is_request",
    "kind_named",
    "kind_of",
    "kind_of_callback",
    "kind_of_result",
    "kind_of_task_id",
    "kind_of_task_type",
]

KINDS: Final[tuple[Kind, ...]] = (IMAGE, VIDEO)
"""Every kind, the default (images) first."""

_BY_REQUEST: Final = {kind.request_type: kind for kind in KINDS}
RESULT_BUILDERS: Final = {kind.request_type: kind.result for kind in KINDS}
"""Each request type's ``Kind.result``: a task finishing looks its builder up here, by
the exact type of its request (one dict lookup on the callback path)."""
_BY_RESULT: Final = {kind.result_type: kind for kind in KINDS}
_BY_NAME: Final = {kind.name: kind for kind in KINDS}
_BY_TASK_TYPE: Final = {kind.task_type: kind for kind in KINDS}
_PREFIXES: Final = tuple((prefix, kind) for kind in KINDS for prefix in kind.prefixes)
_REQUEST_NAMES: Final = " or ".join(kind.request_type.__name__ for kind in KINDS)


def kind_of(request: TaskRequest) -> Kind:
    """The kind of a request.

    Raises:
        TypeError: ``request`` is no request of a known kind.
    """
    kind = _BY_REQUEST.get(type(request))
    if kind is None:
        for request_type, candidate in _BY_REQUEST.items():  # a subclass
            if isinstance(request, request_type):
                return candidate
        raise TypeError(f"expected an {_REQUEST_NAMES}; got {type(request).__name__}")
    return kind


def is_request(value: object) -> bool:
    """Whether ``value`` is a request of a known kind."""
    return isinstance(value, tuple(_BY_REQUEST))


def kind_of_result(result: object) -> Kind | None:
    """The kind of a result, or ``None`` for anything else."""
    kind = _BY_RESULT.get(type(result))
    if kind is None:
        for result_type, candidate in _BY_RESULT.items():
            if isinstance(result, result_type):
                return candidate
    return kind


def kind_of_task_id(task_id: str) -> Kind:
    """The kind a task ID's prefix tells (``i2v-``: video; ``i2is-`` and any unknown
    prefix: image, the service's first kind)."""
    for prefix, kind in _PREFIXES:
        if task_id.startswith(prefix):
            return kind
    return IMAGE


def kind_of_task_type(task_type: str) -> Kind | None:
    """The kind whose callbacks carry this ``task_type``, if any."""
    return _BY_TASK_TYPE.get(task_type)


def kind_of_callback(task_id: str, task_type: object) -> Kind:
    """The kind of a callback's task: by its ID's prefix when it has a known one, else by
    its ``task_type``, else images."""
    for prefix, kind in _PREFIXES:
        if task_id.startswith(prefix):
            return kind
    by_type = _BY_TASK_TYPE.get(task_type) if isinstance(task_type, str) else None
    return IMAGE if by_type is None else by_type


def kind_named(name: str | None) -> Kind:
    """The kind of a router record's name (``None``, from a record made before kinds
    were recorded: images).

    Raises:
        InvalidRequestError: no kind has this name.
    """
    if name is None:
        return IMAGE
    kind = _BY_NAME.get(name)
    if kind is None:
        raise InvalidRequestError(f"unknown task kind {name!r}", field="kind")
    return kind
