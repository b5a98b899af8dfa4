"""``tlserve serve``: uvicorn with a drain-first shutdown.

On SIGTERM/SIGINT: ``/readyz`` turns 503 at once (load balancers stop routing), the listener
stays open for ``shutdown_delay_s`` so requests already routed here are still accepted, then
uvicorn stops accepting, waits for in-flight requests (bounded by ``drain_timeout_s``), and the
lifespan shutdown drains the batch queue. Nothing accepted is dropped. A second signal skips
the delay.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from app.main import create_app
from app.service import Service
from app.settings import get_settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, delay_s: float) -> None:
        super().__init__(config)
        self.service = service
        self.delay_s = delay_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.service.draining
        self.service.begin_drain()
        if not first or self.delay_s <= 0:
            super().handle_exit(sig, frame)
            return
        log.info("%s: not ready; closing the listener in %.1fs", signal.Signals(sig).name, self.delay_s)
        asyncio.get_running_loop().call_later(self.delay_s, super().handle_exit, sig, frame)


def serve(host: str | None = None, port: int | None = None) -> int:
    settings = get_settings()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=5,
        lifespan="on",
        server_header=False,
    )
    DrainingServer(config, app.state.service, settings.shutdown_delay_s).run()
    return 0
