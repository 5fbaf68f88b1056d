# expect: access log: 127.0.0.1:5000 - "POST /keevx/callback?keevx_token=<redacted> HTTP/1.1" 200
"""Keeping callback tokens out of access logs with ``kx.redact_callback_tokens``.

A web server's access log prints each request's path, query string included; with a
callback token in the URL, that log would hold a credential. Install the filter before
the server starts logging (uvicorn, gunicorn and hypercorn's access loggers by default).
"""

from __future__ import annotations

import logging
import sys

import keevx_async as kx

# --8<-- [start:redact]
kx.redact_callback_tokens()  # uvicorn.access, gunicorn.access, hypercorn.access
# --8<-- [end:redact]

# What uvicorn's access logger would log for a callback (the token is made up here).
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("access log: %(message)s"))
access = logging.getLogger("uvicorn.access")
access.addHandler(handler)
access.setLevel(logging.INFO)
access.propagate = False
token = "Qm9vdHN0cmFwcGVk.bm90LWEtcmVhbC10b2tlbi1h"  # the shape CallbackSigner issues
access.info(
    '%s - "%s %s HTTP/%s" %d',
    "127.0.0.1:5000",
    "POST",
    f"/keevx/callback?keevx_token={token}",
    "1.1",
    200,
)
