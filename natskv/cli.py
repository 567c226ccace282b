"""The ``natskv`` command (also ``python -m natskv``).

    natskv server [--port N] [--data-dir DIR]      run nats-server in the foreground until Ctrl-C
    natskv server --stop                           stop the shared background server
    natskv demo                                    a short tour of the API
    natskv get KEY | set KEY VALUE | del KEY | ls [PATTERN] | watch [PATTERN]
    natskv pub SUBJECT [DATA] | sub SUBJECT                 plain NATS messages (and JetStream)
    natskv buckets | status | history KEY | find BUCKET WHERE
    natskv backup BUCKET FILE | restore FILE BUCKET

Every command that talks to NATS takes ``--url`` (else ``NATS_URL``, else the embedded server that
``natskv.connect()`` starts), ``--bucket`` and ``--timeout``. A natskv error prints one line on
stderr and exits 1; Ctrl-C exits 130.

Start-up is kept short: this module imports nothing from natskv at import time, so ``--help`` and
argument errors never load nats-py or asyncio. Each command imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket

PROG = "natskv"
DEFAULT_BUCKET = "default"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

_EPILOG = """\
connecting: --url, else the NATS_URL environment variable, else the embedded nats-server that
natskv starts on loopback and leaves running in the background (stop it with `natskv server --stop`).

examples:
  natskv demo
  natskv set user:1 '{"name": "Ann", "age": 34}'
  natskv get user:1
  natskv ls 'user:*'
  natskv watch 'user:*'
  natskv sub 'orders.>'            (in another terminal: natskv pub orders.new '{"id": 1}')
"""


class CommandError(Exception):
    """A problem the CLI reports itself: one line on stderr, exit status 1."""


# -- output helpers -----------------------------------------------------------------------------


def _out(text: str = "") -> None:
    print(text, flush=True)


def _json(value: Any) -> str:
    """A value as one line of JSON (``bytes`` that are not JSON show as a Python bytes literal)."""
    import orjson

    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return repr(value)


def _parse_value(text: str) -> Any:
    """VALUE as JSON when it parses (``42``, ``true``, ``{"a": 1}``, ``"quoted"``), else the string."""
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _describe_change(change: Any) -> str:
    if change.operation == "PUT":
        return f"PUT {change.key} = {_json(change.value)}  (revision {change.revision})"
    return f"{change.operation} {change.key}  (revision {change.revision})"


# -- connecting ---------------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> Client:
    import natskv

    options: dict[str, Any] = {"name": "natskv-cli"}
    if args.timeout is not None:
        options["timeout"] = args.timeout
        options["connect_timeout"] = args.timeout
    return natskv.connect(args.url, **options)


def _open_bucket(db: Client, args: argparse.Namespace, *, create: bool) -> Bucket:
    from natskv.errors import BucketNotFoundError

    try:
        return db.bucket(args.bucket, create=create, timeout=args.timeout)
    except BucketNotFoundError as exc:
        raise CommandError(
            f"bucket {args.bucket!r} does not exist; pick another with --bucket, or create it by "
            f"storing a key: {PROG} set --bucket {args.bucket} KEY VALUE"
        ) from exc


def _with_bucket(args: argparse.Namespace, *, create: bool, body: Callable[[Bucket], int]) -> int:
    db = _connect(args)
    try:
        return body(_open_bucket(db, args, create=create))
    finally:
        db.close(timeout=2.0)


# -- key commands -------------------------------------------------------------------------------


def cmd_get(args: argparse.Namespace) -> int:
    from natskv.errors import KeyNotFoundError

    def body(kv: Bucket) -> int:
        missing = object()
        value = kv.get(args.key, missing, timeout=args.timeout)
        if value is missing:
            raise KeyNotFoundError(args.key, kv.name)
        if isinstance(value, bytes) and not args.json:
            sys.stdout.buffer.write(value)
            if sys.stdout.isatty():
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
        elif isinstance(value, str) and not args.json:
            _out(value)
        else:
            _out(_json(value))
        return 0

    return _with_bucket(args, create=False, body=body)


def cmd_set(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.value == "-" else args.value
    value = text if args.string else _parse_value(text)

    def body(kv: Bucket) -> int:
        revision = kv.set(args.key, value, ttl=args.ttl, timeout=args.timeout)
        _out(f"{args.key}: stored at revision {revision}")
        return 0

    return _with_bucket(args, create=True, body=body)


def cmd_del(args: argparse.Namespace) -> int:
    from natskv.errors import KeyNotFoundError

    def body(kv: Bucket) -> int:
        current = kv.entry(args.key, timeout=args.timeout)
        if current is None:
            raise KeyNotFoundError(args.key, kv.name)
        revision = kv.delete(args.key, timeout=args.timeout)
        _out(f"{args.key}: deleted at revision {revision}")
        return 0

    return _with_bucket(args, create=False, body=body)


def cmd_ls(args: argparse.Namespace) -> int:
    def body(kv: Bucket) -> int:
        if args.values:
            for key, value in kv.items(args.pattern, timeout=args.timeout):
                _out(f"{key}\t{_json(value)}")
        else:
            for key in kv.keys(args.pattern, timeout=args.timeout):
                _out(key)
        return 0

    return _with_bucket(args, create=False, body=body)


def cmd_watch(args: argparse.Namespace) -> int:
    def body(kv: Bucket) -> int:
        def watching() -> None:
            where = f"{args.pattern!r} in bucket {kv.name!r}"
            print(f"{PROG}: watching {where}; press Ctrl-C to stop", file=sys.stderr, flush=True)

        with kv.watch(args.pattern, updates_only=args.updates_only, timeout=args.timeout) as watcher:
            if args.updates_only:  # no initial values, so no marker: live from here on
                watching()
            for change in watcher:
                if change.initial_done:
                    watching()
                    continue
                _out(_describe_change(change))
        return 0

    # The bucket is created when missing: watching a bucket before it is first written is normal.
    return _with_bucket(args, create=True, body=body)


# -- buckets ------------------------------------------------------------------------------------


def cmd_buckets(args: argparse.Namespace) -> int:
    db = _connect(args)
    try:
        for name in db.buckets(timeout=args.timeout):
            _out(name)
        return 0
    finally:
        db.close(timeout=2.0)


def cmd_status(args: argparse.Namespace) -> int:
    if args.bucket_name:
        args.bucket = args.bucket_name

    def body(kv: Bucket) -> int:
        status = kv.status(timeout=args.timeout)
        rows = [
            ("bucket", status.bucket), ("values", f"{status.values:,}"), ("bytes", f"{status.bytes:,}"),
            ("history", status.history), ("ttl", "none" if status.ttl is None else f"{status.ttl:g} s"),
            ("max value size", status.max_value_size or "server's limit"), ("replicas", status.replicas),
            ("storage", status.storage), ("revisions", f"{status.first_revision}..{status.last_revision}"),
            ("atomic commits", "yes" if status.supports_atomic else "no"),
            ("per-key TTL", "yes" if status.supports_ttl else "no"),
        ]
        for label, value in rows:
            _out(f"{label + ':':16}{value}")
        return 0

    return _with_bucket(args, create=False, body=body)


def cmd_history(args: argparse.Namespace) -> int:
    from natskv.errors import KeyNotFoundError

    def body(kv: Bucket) -> int:
        entries = kv.history(args.key, timeout=args.timeout)
        if not entries:
            raise KeyNotFoundError(args.key, kv.name)
        for entry in entries:
            when = entry.created.isoformat(timespec="milliseconds") if entry.created else "?"
            shown = f" = {_json(entry.value)}" if entry.operation == "PUT" else ""
            _out(f"revision {entry.revision}  {when}  {entry.operation}{shown}")
        return 0

    return _with_bucket(args, create=False, body=body)


def cmd_find(args: argparse.Namespace) -> int:
    where = _parse_value(args.where)
    if not isinstance(where, dict):
        raise CommandError(f"WHERE is a JSON object such as '{{\"age\": {{\"$gte\": 18}}}}', not {args.where!r}")
    args.bucket = args.bucket_name

    def body(kv: Bucket) -> int:
        for key, value in kv.find(where, args.pattern, limit=args.limit, timeout=args.timeout):
            _out(f"{key}\t{_json(value)}")
        return 0

    return _with_bucket(args, create=False, body=body)


class _Progress:
    """Progress of a backup or restore on stderr: a live line on a terminal (records, rate,
    ETA), plain lines every few seconds otherwise."""

    def __init__(self, verb: str) -> None:
        import time

        self.verb = verb
        self.started = self.last = time.monotonic()
        self.live = sys.stderr.isatty()

    def __call__(self, done: int, total: int | None) -> None:
        import time

        now = time.monotonic()
        finished = total is not None and done >= total
        if not self.live and now - self.last < 2.0 and not finished:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-6)
        eta = f", {max(0.0, ((total or done) - done) / rate):.0f} s left" if rate and not finished else ""
        line = f"{self.verb} {done:,}{'' if total is None else f'/{total:,}'} records ({rate:,.0f}/s{eta})"
        if self.live:
            print(f"\r{line}\x1b[K", end="\n" if finished else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def cmd_backup(args: argparse.Namespace) -> int:
    args.bucket = args.bucket_name

    def body(kv: Bucket) -> int:
        written = kv.backup(args.file, args.pattern, progress=_Progress("backed up"), timeout=args.timeout)
        _out(f"{written:,} records of bucket {kv.name!r} written to {args.file}")
        return 0

    return _with_bucket(args, create=False, body=body)


def cmd_restore(args: argparse.Namespace) -> int:
    from natskv.backup import read_header

    header = read_header(args.file)  # a file that is not a backup fails before connecting
    config = header.get("config") or {}
    db = _connect(args)
    try:
        options = {k: config[k] for k in ("history", "ttl", "max_value_size", "storage", "replicas")
                   if config.get(k) is not None}
        kv = db.bucket(args.bucket_name, timeout=args.timeout, **options)  # the source's settings if new
        written = kv.restore(args.file, clear=args.clear, progress=_Progress("restored"), timeout=args.timeout)
        _out(f"{written:,} records restored into bucket {kv.name!r} (backed up from {header.get('bucket')!r})")
        return 0
    finally:
        db.close(timeout=2.0)


# -- messages -----------------------------------------------------------------------------------


def _headers(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CommandError(f"a header is NAME=VALUE, not {pair!r}")
        headers[name] = value
    return headers


def cmd_pub(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode()
    headers = _headers(args.header)
    db = _connect(args)
    try:
        if args.request:
            _out(db.request(args.subject, data, headers=headers, timeout=args.timeout).decode(errors="replace"))
        elif args.jetstream:
            ack = db.jetstream_publish(args.subject, data, msg_id=args.msg_id, headers=headers, timeout=args.timeout)
            duplicate = "  (duplicate: not stored again)" if ack.duplicate else ""
            _out(f"stored in stream {ack.stream} at sequence {ack.seq}{duplicate}")
        else:
            db.publish(args.subject, data, headers=headers)
        return 0
    finally:
        db.close(timeout=2.0)  # the drain sends what was published


def cmd_sub(args: argparse.Namespace) -> int:
    db = _connect(args)
    try:
        with db.subscribe(args.subject, queue=args.queue or "", timeout=args.timeout) as sub:
            group = f" in queue group {args.queue!r}" if args.queue else ""
            print(f"{PROG}: listening on {args.subject!r}{group}; press Ctrl-C to stop", file=sys.stderr, flush=True)
            for received, message in enumerate(sub, 1):
                headers = f" {_json(message.headers)}" if args.headers and message.headers else ""
                _out(f"[{message.subject}]{headers} {message.data.decode(errors='replace')}")
                if args.count and received >= args.count:
                    break
        return 0
    finally:
        db.close(timeout=2.0)


# -- stats --------------------------------------------------------------------------------------


def _size(count: int) -> str:
    """A byte count for a table column: 512 B, 3.1 KiB, 12.0 MiB ..."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop returns


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    import orjson

    from natskv.stats import OperationStats

    db = _connect(args)
    totals: dict[tuple[str, str], OperationStats] = {}
    clients: set[str] = set()

    def on_batch(message: Any) -> None:
        try:
            batch = orjson.loads(message.data)
            events = batch["events"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return  # not a stats batch
        clients.add(str(batch.get("client")))
        for event in events:
            where = str(batch.get("client")) if args.by_client else "*"
            stats = totals.setdefault((where, str(event.get("operation"))), OperationStats())
            stats.latency.add(int(float(event.get("duration_us", 0)) * 1000))
            stats.results += int(event.get("result_count") or 0)
            stats.sent += int(event.get("bytes_sent") or 0)
            stats.received += int(event.get("bytes_received") or 0)
            if event.get("error"):
                stats.errors[event["error"]] = stats.errors.get(event["error"], 0) + 1

    def show(seconds: float) -> None:
        lines = [f"{len(clients)} client(s), {sum(s.latency.count for s in totals.values()):,} operations "
                 f"in {seconds:.0f} s on {args.subject!r}"]
        lines.append(f"{'client':20} {'operation':12} {'count':>9} {'ops/s':>8} {'p50 µs':>9} {'p99 µs':>9} "
                     f"{'sent':>9} {'received':>9}  errors")
        for (where, operation), stats in sorted(totals.items()):
            summary = stats.summary()
            errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "-"
            lines.append(f"{where[:20]:20} {operation[:12]:12} {summary['count']:>9,} "
                         f"{summary['count'] / max(seconds, 1e-9):>8,.0f} {summary['p50_us']:>9,.1f} "
                         f"{summary['p99_us']:>9,.1f} {_size(summary['bytes_sent']):>9} "
                         f"{_size(summary['bytes_received']):>9}  {errors}")
        if args.watch and sys.stdout.isatty():
            print("\x1b[H\x1b[J", end="")
        _out("\n".join(lines))

    try:
        with db.subscribe(args.subject, on_batch, timeout=args.timeout):
            started = time.monotonic()
            if not args.watch:
                time.sleep(args.seconds)
                show(time.monotonic() - started)
                return 0
            print(f"{PROG}: listening on {args.subject!r}; press Ctrl-C to stop", file=sys.stderr, flush=True)
            while True:
                time.sleep(1.0)
                show(time.monotonic() - started)
    finally:
        db.close(timeout=2.0)


# -- server -------------------------------------------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    import time

    from natskv.server import EmbeddedServer, default_data_dir

    data_dir = args.data_dir or default_data_dir()
    if args.stop:
        if EmbeddedServer.stop_shared(data_dir):
            _out(f"stopped the shared nats-server of {data_dir}")
        else:
            _out(f"no shared nats-server was running for {data_dir}")
        return 0

    running = _shared_server_url(data_dir)
    if running is not None:
        # nats-server does not lock its store: two servers on one directory would corrupt it.
        raise CommandError(
            f"the shared background server of {data_dir} is running at {running} and uses this "
            f"data already: connect to it with --url {running}, or stop it first with "
            f"`{PROG} server --stop`, or pass another --data-dir"
        )
    server = EmbeddedServer(data_dir=data_dir, port=args.port, monitor_port=0)
    server.start()
    try:
        version = (server.info or {}).get("version", "?")
        _out(f"nats-server {version} with JetStream is running at {server.url}")
        _out(f"  data: {server.store_dir}")
        _out(f"  log:  {server.log_file}")
        _out(f"  monitoring: {server.monitor_url}  (/healthz, /varz, /jsz)")
        _out(f"  use it: export NATS_URL={server.url}   (or pass --url {server.url})")
        _out("press Ctrl-C to stop")
        while server.running:
            time.sleep(0.2)
        raise CommandError(f"nats-server exited unexpectedly; see its log: {server.log_file}")
    finally:
        server.stop()


def _shared_server_url(data_dir: Any) -> str | None:
    """The URL of the shared server recorded in ``data_dir`` when something answers there."""
    import json
    import socket
    from pathlib import Path

    from natskv.server import STATE_FILE

    try:
        state = json.loads((Path(data_dir) / STATE_FILE).read_text(encoding="utf-8"))
        host, port = str(state["host"]), int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return None
    return f"nats://{host}:{port}"


# -- demo ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from natskv.demo import run

    db = _connect(args)
    try:
        ok = run(db, timeout=args.timeout)
        if db.server is not None:
            _out(
                f"the embedded server keeps running in the background (data in {db.server.data_dir});\n"
                f"later connect() calls reuse it; stop it with: {PROG} server --stop"
            )
        return 0 if ok else EXIT_ERROR
    finally:
        db.close(timeout=2.0)


# -- argument parsing ---------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, *, top: bool, bucket: bool = True) -> None:
    # The same options are accepted before and after the command. On the command's parser they
    # default to SUPPRESS so they do not overwrite a value given before the command.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url", default=default(None),
        help="NATS server URL(s), e.g. nats://user:pass@host:4222,host2:4222 "
        "(default: $NATS_URL, else the embedded server)",
    )
    if bucket:
        group.add_argument("--bucket", default=default(DEFAULT_BUCKET), help=f"bucket name (default: {DEFAULT_BUCKET})")
    group.add_argument(
        "--timeout", type=_positive_float, default=default(None), metavar="SECONDS",
        help="timeout of each call and of connecting (default: 5)",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 (pick a free one) to 65535, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="natskv: a blocking Python driver for NATS JetStream Key-Value.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, common: bool = True, bucket: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        if common:
            _add_common(sub, top=False, bucket=bucket)
        return sub

    p = command("server", cmd_server, "run the embedded nats-server in the foreground until Ctrl-C", common=False)
    p.add_argument("--port", type=_port, default=4222, help="client port (default: 4222; 0 picks a free one)")
    p.add_argument("--data-dir", help="where the JetStream store and log live (default: natskv's per-user data dir)")
    p.add_argument(
        "--stop", action="store_true",
        help="stop the shared background server that natskv.connect() started (of --data-dir), then exit",
    )

    from natskv.demo import (
        DEMO_BUCKET,  # light: the demo imports natskv's client when it runs
    )

    demo_help = f"a short tour of natskv (uses a bucket {DEMO_BUCKET!r} it deletes at the end)"
    command("demo", cmd_demo, demo_help, bucket=False)

    p = command("get", cmd_get, "print the value of KEY (strings as they are, other values as JSON)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print strings as JSON too")

    p = command(
        "set", cmd_set, "store VALUE under KEY (VALUE is parsed as JSON when it parses, else stored as a string)"
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", help="the value; - reads it from stdin")
    p.add_argument("--string", action="store_true", help="store VALUE as a string even if it parses as JSON")
    p.add_argument("--ttl", type=_positive_float, metavar="SECONDS", help="expire the key after this many seconds")

    p = command("del", cmd_del, "delete KEY (exit status 1 when it does not exist)")
    p.add_argument("key", metavar="KEY")

    p = command("ls", cmd_ls, "list the keys matching PATTERN, sorted")
    p.add_argument("pattern", metavar="PATTERN", nargs="?", default="*", help="glob: * ? [abc] (default: *)")
    p.add_argument("-v", "--values", action="store_true", help="print each value (as JSON) after its key")

    p = command("watch", cmd_watch, "print the current values, then every change, until Ctrl-C")
    p.add_argument("pattern", metavar="PATTERN", nargs="?", default="*", help="glob: * ? [abc] (default: *)")
    p.add_argument("--updates-only", action="store_true", help="skip the current values; print new changes only")

    command("buckets", cmd_buckets, "list the buckets", bucket=False)
    p = command("status", cmd_status, "print the size and settings of BUCKET (default: --bucket)")
    p.add_argument("bucket_name", metavar="BUCKET", nargs="?", default=None)

    p = command("history", cmd_history, "print every kept revision of KEY, oldest first, deletes included")
    p.add_argument("key", metavar="KEY")

    p = command("find", cmd_find, "print the keys of BUCKET whose JSON value matches WHERE (a MongoDB-style "
                "filter such as '{\"age\": {\"$gte\": 18}}')", bucket=False)
    p.add_argument("bucket_name", metavar="BUCKET")
    p.add_argument("where", metavar="WHERE")
    p.add_argument("--pattern", default="*", help="only keys matching this glob (default: *)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N matches")

    p = command("backup", cmd_backup, "write the keys of BUCKET to FILE (JSON Lines)", bucket=False)
    p.add_argument("bucket_name", metavar="BUCKET")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--pattern", default="*", help="only keys matching this glob (default: *)")

    p = command("restore", cmd_restore, "write the keys of the backup FILE into BUCKET (created with the "
                "backed-up bucket's settings when missing); a bad file writes nothing", bucket=False)
    p.add_argument("file", metavar="FILE")
    p.add_argument("bucket_name", metavar="BUCKET")
    p.add_argument("--clear", action="store_true", help="empty the bucket first")

    p = command("stats", cmd_stats, "show the operations that clients publish with db.publish_stats(): count, "
                "rate, p50 and p99 latency and errors per operation", bucket=False)
    p.add_argument("--subject", default="natskv.stats.>", help="where the stats events come (default: natskv.stats.>)")
    p.add_argument("--seconds", type=_positive_float, default=2.0, help="listen this long, then print (default: 2)")
    p.add_argument("--watch", action="store_true", help="a live view, refreshed every second, until Ctrl-C")
    p.add_argument("--by-client", action="store_true", help="one row per client and operation")

    p = command("pub", cmd_pub, "publish DATA to SUBJECT (plain NATS, or to a JetStream stream)", bucket=False)
    p.add_argument("subject", metavar="SUBJECT")
    p.add_argument("data", metavar="DATA", nargs="?", default="", help="the payload; - reads it from stdin")
    p.add_argument("-H", "--header", action="append", metavar="NAME=VALUE", help="a header (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--request", action="store_true", help="send a request and print the reply")
    mode.add_argument("--jetstream", action="store_true", help="publish to a stream and print where it was stored")
    p.add_argument("--msg-id", help="with --jetstream: the id that deduplicates the message")

    p = command("sub", cmd_sub, "print the messages published to SUBJECT (wildcards * and >) until Ctrl-C",
                bucket=False)
    p.add_argument("subject", metavar="SUBJECT")
    p.add_argument("--queue", help="join this queue group: each message goes to one member")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N messages")
    p.add_argument("--headers", action="store_true", help="print each message's headers (as JSON)")
    return parser


class _VersionAction(argparse.Action):
    """``--version``: natskv's, nats-py's and nats-server's versions and the core in use.

    Imports natskv only when asked, so other invocations stay fast; runs ``nats-server
    --version`` on the binary ``natskv.connect()`` would start, and starts no server.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        for line in version_lines():
            _out(line)
        parser.exit()


def version_lines() -> list[str]:
    """What ``natskv --version`` prints, one component a line."""
    from importlib.metadata import PackageNotFoundError, version

    import natskv
    from natskv.errors import ServerError
    from natskv.server import find_server_binary, server_version

    try:
        nats_py = version("nats-py")
    except PackageNotFoundError:
        nats_py = "not installed (pip install nats-py)"
    try:
        binary = find_server_binary()
    except ServerError as exc:
        # Its message says where natskv looked and how to install one.
        server = f"not found: {exc}"
    else:
        try:
            server = f"{'.'.join(map(str, server_version(binary)))} ({binary})"
        except ServerError as exc:
            server = f"version unknown ({exc})"
    core = {"c": "c (compiled)", "python": "python (pure-Python fallback)"}.get(natskv.__impl__, natskv.__impl__)
    return [
        f"{PROG} {natskv.__version__}",
        f"nats-py {nats_py}",
        f"nats-server {server}",
        f"core {core}",
    ]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[bool]]:
    """While active, SIGTERM unwinds like Ctrl-C, so watches, clients and servers are cleaned up.

    Yields a list that becomes ``[True]`` once SIGTERM arrived (main() then exits 143).
    """
    seen: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_term(signum: int, frame: Any) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``natskv`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    terminated: list[bool] = []
    try:
        with _sigterm_as_interrupt() as terminated:
            status: int = args.func(args)
            return status
    except KeyboardInterrupt:
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`natskv ls | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        from natskv.errors import NatsKVError

        if not isinstance(exc, NatsKVError):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
