"""The blocking wire path: NATS KV protocol code that runs on the caller's thread.

A blocking call (``Bucket.get``, ``Bucket.set`` ...) encodes its command here, in the calling
thread, hands the bytes to the multiplexer's coalesced writer and waits on a thread lock that the
loop thread's frame reader releases; the reply is parsed and checked here again. Nothing in this
package imports nats-py or awaits anything: the loop-thread side (the connection, the frame
reader, watch consumers) is :mod:`natskv.aio`, which builds on the pieces defined here.

Modules: :mod:`~natskv.wire.headers` (header names and builders), :mod:`~natskv.wire.replies`
(encoding commands, reading replies and JetStream API answers), :mod:`~natskv.wire.waiters` (the
locks callers wait on), :mod:`~natskv.wire.mux` (the caller half of the multiplexer),
:mod:`~natskv.wire.retry` (resend and retry loops), :mod:`~natskv.wire.kv` (the KV protocol of one
bucket) and :mod:`~natskv.wire.counters` (autoincrement counter streams).
"""
