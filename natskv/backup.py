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
directions stream: values are read and written in chunks of 1,000 keys, and memory holds the
key names of the bucket, not its values.

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

from natskv.codec import RAW_HEADER
from natskv.errors import BackupError, InvalidArgumentError
from natskv.wire import headers as h
from natskv.wire import jsapi

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
    half a backup. ``extra`` goes into the first line (a model backup names its model there)."""
    target = Path(path)
    status = bucket.status(timeout=timeout)
    keys = bucket.keys(pattern, timeout=timeout)
    header = {
        "natskv": "backup", "format": FORMAT, "bucket": bucket.name, "pattern": pattern,
        "created": datetime.now(timezone.utc).isoformat(),
        "config": {"history": status.history, "ttl": status.ttl, "max_value_size": status.max_value_size,
                   "storage": status.storage, "replicas": status.replicas},
        **(extra or {}),
    }
    partial = target.with_name(target.name + ".partial")
    written = 0
    try:
        with partial.open("wb") as out:
            out.write(orjson.dumps(header) + b"\n")
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start : start + CHUNK]
                tokens = {bucket._token(key): key for key in chunk}
                limit = bucket._timeout(timeout)
                for raw, headers in bucket._proto.messages(list(tokens), limit):
                    if raw.operation != h.OP_PUT:
                        continue  # deleted since it was listed
                    key = tokens.get(raw.subject[len(bucket._proto.subject_prefix):])
                    if key is None:
                        continue
                    line = _record(key, raw.data, raw.revision, headers)
                    if line is not None:
                        out.write(orjson.dumps(line) + b"\n")
                        written += 1
                if progress is not None:
                    progress(min(start + CHUNK, len(keys)), len(keys))
            out.write(orjson.dumps({"natskv": "end", "records": written}) + b"\n")
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
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
