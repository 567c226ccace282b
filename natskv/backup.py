"""Backups of buckets as JSON Lines: :meth:`natskv.Bucket.backup` and :meth:`natskv.Bucket.restore`.

A backup file is text, one JSON object per line:

- the first line describes it: ``{"natskv": "backup", "format": 1, "bucket": ..., "created": ...,
  "pattern": ..., "config": {"history", "ttl", "max_value_size", "storage", "replicas"}}``;
- then one line per key: ``{"key": ..., "value": <the JSON value>}``, or ``{"key": ..., "bytes":
  <base64>}`` for a payload that is not JSON (bytes, pickles, another codec's encoding), with
  ``"raw": true`` when natskv's JSON codec stored ``bytes``; ``"ttl"`` holds the seconds the key
  had left, when it expires; ``"revision"`` is its revision in the source bucket (informational:
  a restore writes new revisions);
- the last line closes it: ``{"natskv": "end", "records": <the number of key lines>}``.

A file without its last line was cut short (a full disk, an interrupted copy). :meth:`restore`
reads the whole file once to check it before it writes anything, so a truncated or corrupt file
stops with a :class:`~natskv.errors.BackupError` naming the line, having written nothing. Both
directions stream in constant memory, whatever the size of the bucket or the file. A backup
reads the bucket once through a pull consumer (:mod:`natskv.aio.scan`), asking for the next
1,000 values when it has written the last ones; it also holds the names of the keys written
while it runs (those are read again at the end). A restore reads the file line by line, twice
(the check, then the writes), holding 1,000 writes at a time.

Everything here blocks the caller's thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from natskv._runner import runner
from natskv._speedups import core
from natskv.aio.scan import Scan, parse_delivery
from natskv.codec import RAW_HEADER
from natskv.errors import BackupError, InvalidArgumentError, InvalidKeyError
from natskv.wire import headers as h
from natskv.wire import jsapi
from natskv.wire.kv import entry_from_headers

if TYPE_CHECKING:
    from natskv.kv import Bucket

FORMAT = 1
CHUNK = 1000
Progress = Callable[[int, "int | None"], None]  # (records done, records in all when known)


def backup(bucket: Bucket, path: str | os.PathLike[str], pattern: str = "*", *,
           progress: Progress | None = None, timeout: float | None = None,
           extra: dict[str, Any] | None = None) -> int:
    """Write the keys of ``bucket`` matching ``pattern`` to ``path``; the number written. The
    file is written under a temporary name and renamed when complete, so ``path`` never holds
    half a backup. ``extra`` goes into the first line (a model backup names its model there).

    One pass over the bucket, a page of ``CHUNK`` values at a time (see the module). Keys
    written while it runs are read again at the end, so each key is in the file once, with a
    value it held during the backup; a key deleted meanwhile is left out."""
    try:
        compiled = core.compile_pattern(pattern, bucket.sep)
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError(f"invalid key pattern {pattern!r}: {exc}") from exc
    target = Path(path)
    status = bucket.status(timeout=timeout)
    header = {
        "natskv": "backup", "format": FORMAT, "bucket": bucket.name, "pattern": pattern,
        "created": datetime.now(timezone.utc).isoformat(),
        "config": {"history": status.history, "ttl": status.ttl, "max_value_size": status.max_value_size,
                   "storage": status.storage, "replicas": status.replicas},
        **(extra or {}),
    }
    partial = target.with_name(target.name + ".partial")
    rewritten = target.with_name(target.name + ".partial2")
    limit = bucket._timeout(timeout)
    scan = Scan(bucket._client._conn, bucket._proto, compiled.filter)
    try:
        total = runner.call(scan.start(limit or 30.0), None, "backup")
        with partial.open("wb") as out:
            out.write(orjson.dumps(header) + b"\n")
            written, changed = _write_current(bucket, scan, compiled, status.last_revision, out, total,
                                              progress, timeout)
        if changed:
            written = _replace_changed(bucket, compiled, partial, rewritten, changed, written, timeout)
        with partial.open("ab") as out:
            out.write(orjson.dumps({"natskv": "end", "records": written}) + b"\n")
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        rewritten.unlink(missing_ok=True)
        raise
    finally:
        runner.call(scan.stop(), None, "backup")
    if progress is not None:
        progress(written, written)
    return written


def _write_current(bucket: Bucket, scan: Scan, compiled: Any, last_before: int, out: IO[bytes], total: int,
                   progress: Progress | None, timeout: float | None) -> tuple[int, set[str]]:
    """Write the value of each key as the scan delivers it; ``(lines written, keys written
    since the backup began)``.

    The scan sends each key's latest message as of ``last_before`` (the stream's last sequence
    when the backup began), in stream order, then whatever was written since. Those later keys
    are only collected: such a key may already be in the file, or its earlier message was
    replaced before the scan reached it (a bucket keeping one revision). The scan stops at the
    stream's last sequence as seen when the first of them arrives, so a busy bucket cannot keep
    it going; every key replaced before then has its newer message by then."""
    limit = bucket._timeout(timeout)
    prefix_len = len(bucket._proto.subject_prefix)
    exact = compiled.exact
    written = 0
    changed: set[str] = set()
    stop_at: int | None = None
    drained = False
    while not drained:
        deliveries, drained = runner.call(scan.page(CHUNK, limit or 30.0), None, "backup")
        for delivery in deliveries:
            subject, seq, ts_ns, headers = parse_delivery(delivery)
            if seq > last_before:
                if stop_at is None:
                    stop_at = bucket.status(timeout=timeout).last_revision
                if seq > stop_at:
                    drained = True
                    break
                changed.add(subject)
                if seq == stop_at:
                    drained = True
                    break
                continue
            data = delivery[1]
            if entry_from_headers(headers, data, subject).operation != h.OP_PUT:
                continue
            key = bucket._key_of_token(subject[prefix_len:])
            if not (exact or compiled.match(key)):
                continue
            if h.TTL in headers and h.TIME_STAMP not in headers:
                headers[h.TIME_STAMP] = str(ts_ns)  # a consumer's delivery has its time in the ack subject
            line = _record(key, data, seq, headers)
            if line is not None:
                out.write(orjson.dumps(line) + b"\n")
                written += 1
        if progress is not None:
            progress(written, max(total, written))
    return written, changed


def _replace_changed(bucket: Bucket, compiled: Any, partial: Path, rewritten: Path, subjects: set[str],
                     written: int, timeout: float | None) -> int:
    """Copy ``partial`` to ``rewritten`` without the lines of the keys written during the backup,
    add those keys' latest values (read now, in batch gets), and move it back over ``partial``;
    the number of key lines. Memory holds the changed keys, not the file."""
    prefix_len = len(bucket._proto.subject_prefix)
    tokens: dict[str, str] = {}
    for subject in subjects:
        key = bucket._key_of_token(subject[prefix_len:])
        if compiled.exact or compiled.match(key):
            tokens[subject[prefix_len:]] = key
    keys = set(tokens.values())
    with partial.open("rb") as source, rewritten.open("wb") as out:
        out.write(source.readline())  # the header
        for text in source:
            if orjson.loads(text)["key"] in keys:
                written -= 1
            else:
                out.write(text)
        names = list(tokens)
        limit = bucket._timeout(timeout)
        for start in range(0, len(names), CHUNK):
            chunk = names[start : start + CHUNK]
            for raw, headers in bucket._proto.messages(chunk, limit):
                if raw.operation != h.OP_PUT:
                    continue  # deleted during the backup
                found = tokens.get(raw.subject[prefix_len:])
                if found is None:
                    continue
                line = _record(found, raw.data, raw.revision, headers)
                if line is not None:
                    out.write(orjson.dumps(line) + b"\n")
                    written += 1
    rewritten.replace(partial)
    return written


def _record(key: str, payload: bytes, revision: int, headers: dict[str, str]) -> dict[str, Any] | None:
    """A key's line; None when its TTL has already run out."""
    line: dict[str, Any] = {"key": key, "revision": revision}
    left = _ttl_left(headers)
    if left is not None:
        if left <= 0:
            return None
        line["ttl"] = round(left, 3)
    if RAW_HEADER in headers:
        line["bytes"] = base64.b64encode(payload).decode()
        line["raw"] = True
        return line
    try:
        line["value"] = orjson.loads(payload)
    except orjson.JSONDecodeError:
        line["bytes"] = base64.b64encode(payload).decode()
    return line


def _ttl_left(headers: dict[str, str]) -> float | None:
    wall = h.expiry(headers)
    return None if wall is None else wall - time.time()


# -- restoring ---------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The first line of a backup file (its bucket, pattern and bucket settings), checked."""
    with _open(path) as lines:
        for number, text in lines:
            return _header(text, number, path)
    raise BackupError(f"{path}: empty file, not a natskv backup")


def restore(bucket: Bucket, path: str | os.PathLike[str], *, clear: bool = False,
            progress: Progress | None = None, timeout: float | None = None) -> int:
    """Write the keys of the backup at ``path`` into ``bucket``; the number written.

    The whole file is checked first (BackupError naming the line, nothing written). With
    ``clear=True`` the bucket is emptied before the keys are written (watchers see no deletes
    for what a clear removes: restart replicas and watches of the bucket). Keys keep the time
    they had left to live."""
    total = _check(path)
    if clear:
        jsapi.call(bucket._proto.conn, f"STREAM.PURGE.{bucket._proto.stream}", {}, bucket._timeout(timeout))
    done = 0
    batch: list[tuple[str, bytes, dict[str, str] | None]] = []
    for record in records(path):
        batch.append(_write_of(bucket, record))
        if len(batch) == CHUNK:
            done += _flush(bucket, batch, timeout)
            if progress is not None:
                progress(done, total)
    if batch:
        done += _flush(bucket, batch, timeout)
    if progress is not None:
        progress(done, total)
    return done


def _write_of(bucket: Bucket, record: dict[str, Any]) -> tuple[str, bytes, dict[str, str] | None]:
    headers: dict[str, str] | None = None
    if "bytes" in record:
        payload = base64.b64decode(record["bytes"])
        if record.get("raw"):
            headers = {RAW_HEADER: "1"}
    else:
        payload = orjson.dumps(record["value"])
    bucket._proto.check_size(len(payload))
    ttl = record.get("ttl")
    if ttl is not None:
        bucket._proto.require_ttl()
        ttl_value = h.ttl_header(max(1, math.ceil(ttl)))
        assert ttl_value is not None
        headers = h.with_ttl(headers, ttl_value)
    return bucket._token(record["key"]), payload, headers


def _flush(bucket: Bucket, batch: list[tuple[str, bytes, dict[str, str] | None]], timeout: float | None) -> int:
    results = bucket._proto.put_many(batch, bucket._timeout(timeout))
    batch.clear()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return len(results)


def _check(path: str | os.PathLike[str]) -> int:
    """Read the whole file and check every line; the number of key lines."""
    count = 0
    for _ in records(path):
        count += 1
    return count


def records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The key lines of a backup, each checked; BackupError at the first bad line, or at the end
    when the closing line is missing or disagrees."""
    count = 0
    ended = started = False
    with _open(path) as lines:
        for number, text in lines:
            if not started:
                _header(text, number, path)
                started = True
                continue
            if ended:
                raise BackupError(f"line {number} of {path}: text after the closing line")
            line = _json(text, number, path)
            if line.get("natskv") == "end":
                if line.get("records") != count:
                    raise BackupError(f"line {number} of {path}: the closing line counts {line.get('records')!r} "
                                      f"records, the file holds {count}: the file was altered")
                ended = True
                continue
            yield _checked_record(line, number, path)
            count += 1
    if not started:
        raise BackupError(f"{path}: empty file, not a natskv backup")
    if not ended:
        raise BackupError(f"{path} ends after {count} records without its closing line: the file was cut "
                          "short (an interrupted backup or copy); nothing was written")


def _checked_record(line: dict[str, Any], number: int, path: str | os.PathLike[str]) -> dict[str, Any]:
    key = line.get("key")
    if not isinstance(key, str):
        raise BackupError(f"line {number} of {path}: a record needs a string \"key\"")
    if ("value" in line) == ("bytes" in line):
        raise BackupError(f"line {number} of {path}: a record has one of \"value\" or \"bytes\"")
    if "bytes" in line:
        try:
            base64.b64decode(line["bytes"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise BackupError(f"line {number} of {path}: \"bytes\" is not base64") from None
    ttl = line.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf):
        raise BackupError(f"line {number} of {path}: \"ttl\" must be a positive number of seconds, not {ttl!r}")
    return line


def _header(text: str, number: int, path: str | os.PathLike[str]) -> dict[str, Any]:
    line = _json(text, number, path)
    if line.get("natskv") != "backup":
        raise BackupError(f"line {number} of {path}: not a natskv backup (its first line must describe the backup)")
    if line.get("format") != FORMAT:
        raise BackupError(f"line 1 of {path}: backup format {line.get('format')!r}; this natskv reads format "
                          f"{FORMAT}: upgrade natskv")
    return line


def _json(text: str, number: int, path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        line = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BackupError(f"line {number} of {path}: not JSON ({exc})") from None
    if not isinstance(line, dict):
        raise BackupError(f"line {number} of {path}: a JSON object per line, not {type(line).__name__}")
    return line


@contextlib.contextmanager
def _open(path: str | os.PathLike[str]) -> Iterator[Iterator[tuple[int, str]]]:
    """The numbered, non-empty lines of a backup file, decoded."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a backup path is a str or a path, not {path!r}")
    try:
        file = Path(path).open("rb")  # noqa: SIM115 - closed by the with below, once open() succeeded
    except OSError as exc:
        raise BackupError(f"cannot read the backup {path}: {exc.strerror or exc}") from exc
    with file:
        yield _numbered(file, path)


def _numbered(file: IO[bytes], path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(file, 1):
        text = raw.strip()
        if text:
            try:
                yield number, text.decode()
            except UnicodeDecodeError:
                raise BackupError(f"line {number} of {path}: not UTF-8 text") from None
