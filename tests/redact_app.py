"""Served by uvicorn in tests/test_redact.py: callback_app with (or, with
KEEVX_TEST_NO_REDACT=1, without) the token filter on uvicorn's access log."""

from __future__ import annotations

import os

import keevx_async as kx

if not os.environ.get("KEEVX_TEST_NO_REDACT"):
    kx.redact_callback_tokens()

client = kx.AsyncKeevx(api_key="k", callback_url="http://127.0.0.1/cb", reconcile_after=None)
app = client.callback_app
