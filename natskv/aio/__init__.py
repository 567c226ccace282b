"""The async core: natskv's loop-thread code and the only part of natskv that imports nats-py.

Everything in this package runs on natskv's loop thread (see :mod:`natskv._runner`): the connection
and its reconnect callbacks (:mod:`~natskv.aio.connection`), the writer, frame reader and
subscriptions of the multiplexer (:mod:`~natskv.aio.mux`), and watch consumers
(:mod:`~natskv.aio.watch`). The blocking fast path that runs on the caller's thread is
:mod:`natskv.wire`.
"""
