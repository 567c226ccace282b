"""Ending plain subscriptions (``natskv.pubsub``) on the loop thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from natskv.aio.connection import Connection


async def end_subscription(conn: Connection, sid: int, drain: bool) -> None:
    """Unsubscribe ``sid``. With ``drain``, the server is told first and answered a ping, so every
    message it sent before the UNSUB still reaches the subscription's handler; then the handler
    goes. Loop thread only."""
    mux, nc = conn.mux, conn.nc
    if drain and nc is not None and nc.is_connected and not nc.is_draining:
        sub = nc._subs.get(sid)
        if sub is not None:
            await sub.drain()  # type: ignore[no-untyped-call]  # UNSUB, flush, then nats-py forgets it
    if mux is not None:
        await mux.unsubscribe(sid)  # the handler, and nats-py's subscription if still there
