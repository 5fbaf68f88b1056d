"""keevx_async: the asyncio/trio SDK of the Keevx image generation API.

Submit many generation requests concurrently, map every returned task ID back to the
request that created it, and get each result the moment its callback arrives.

```python
import keevx_async as kx

async with kx.AsyncKeevx(callback_url="https://example.com/keevx/callback") as client:
    images = await client.generate(kx.ImageRequest("a red fox in the snow"))
```

Code that cannot ``await`` (a script, a notebook, a WSGI view) uses ``kx.Keevx``, the same
client behind blocking calls.
"""

from __future__ import annotations

from ._batch import Batch
from ._client import DEFAULT_BASE_URL, AsyncKeevx
from ._exceptions import (
    APIError,
    AuthenticationError,
    CallbackAuthError,
    CallbackError,
    ClientClosedError,
    DownloadError,
    InvalidRequestError,
    JournalError,
    JournalLockedError,
    KeevxError,
    RateLimitError,
    RouterError,
    ServerError,
    TaskFailedError,
    TaskPendingError,
    TaskTimeoutError,
    TransportError,
    UnknownOutcomeError,
    UnknownTaskError,
)
from ._journal import Journal, JournalResult
from ._journal_postgres import PostgresJournal
from ._journal_sqlite import SQLiteJournal
from ._kinds import VideoRequest, VideoResult
from ._models import (
    CallbackOutcome,
    ImageRequest,
    ImageResult,
    TaskRequest,
    TaskSnapshot,
    UploadedFile,
)
from ._redact import CallbackTokenFilter, redact_callback_tokens
from ._redis import RedisRouter
from ._router import CallbackRouter, LocalRouter, RouterHost, TaskRecord
from ._server import CallbackServer
from ._stats import ClientStats
from ._sync import Keevx, SyncBatch, SyncSubmission, SyncTask
from ._task import Submission, Task
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "APIError",
    "AsyncKeevx",
    "AuthenticationError",
    "Batch",
    "CallbackAuthError",
    "CallbackError",
    "CallbackOutcome",
    "CallbackRouter",
    "CallbackServer",
    "CallbackTokenFilter",
    "ClientClosedError",
    "ClientStats",
    "DownloadError",
    "ImageRequest",
    "ImageResult",
    "InvalidRequestError",
    "Journal",
    "JournalError",
    "JournalLockedError",
    "JournalResult",
    "Keevx",
    "KeevxError",
    "LocalRouter",
    "PostgresJournal",
    "RateLimitError",
    "RedisRouter",
    "RouterError",
    "RouterHost",
    "SQLiteJournal",
    "ServerError",
    "Submission",
    "SyncBatch",
    "SyncSubmission",
    "SyncTask",
    "Task",
    "TaskFailedError",
    "TaskPendingError",
    "TaskRecord",
    "TaskRequest",
    "TaskSnapshot",
    "TaskTimeoutError",
    "TransportError",
    "UnknownOutcomeError",
    "UnknownTaskError",
    "UploadedFile",
    "VideoRequest",
    "VideoResult",
    "__version__",
    "redact_callback_tokens",
]

# Show public objects as ``keevx_async.X`` in reprs, tracebacks and docs, not as the
# private module that happens to define them.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("keevx_async._"):
        _obj.__module__ = "keevx_async"
del _name, _obj
