"""A real uvicorn server on 127.0.0.1 in a background thread, for the `vgen stream` tests (shared by the websocket
and browser tests): ``with running_server(app) as base_url: ...``."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the stream extra is not installed: pip install 'vgen[stream]'")
pytest.importorskip("uvicorn", reason="the stream extra is not installed: pip install 'vgen[stream]'")
pytest.importorskip("websockets", reason="the stream extra is not installed: pip install 'vgen[stream]'")

import uvicorn  # noqa: E402


@contextlib.contextmanager
def running_server(app, startup_timeout: float = 20.0):
    """Serve ``app`` on 127.0.0.1 at a free port; yields ``http://127.0.0.1:PORT``; stops the server on exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="auto",
                            ws_max_size=1 << 20, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
