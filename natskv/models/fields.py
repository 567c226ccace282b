"""Model fields: types, options, coercion, validation and the stored JSON form.

Pure Python with no I/O: everything here runs in the caller's thread and never touches NATS.

A :class:`Field` describes one attribute of a model. Fields are checked when they are defined, so a
schema that cannot work (``min_length`` on an int, ``generated="autoincrement"`` on a str ...) fails
at import time with :class:`~natskv.errors.InvalidArgumentError`, not at the first write.
:func:`validate_record` checks a whole record and reports every problem at once, as the
``(field, message, code)`` tuples that :class:`~natskv.errors.ValidationError` carries.

Dynamic schemas written as Sequelize-style attribute dicts are parsed into Fields by
:mod:`natskv.models.attributes`.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from natskv.errors import InvalidArgumentError

Issue = tuple[str, str, str]
"""One validation problem: (field name, message, code)."""


class _Missing:
    """Type of :data:`MISSING`: "no value given", distinct from ``None`` (an explicit null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

FIELD_TYPES: Final[tuple[type, ...]] = (
    str, int, float, bool, dict, list, dt.datetime, dt.date, uuid.UUID,
)
GENERATED_KINDS: Final[dict[str, tuple[type, ...]]] = {
    "uuid": (uuid.UUID, str),
    "autoincrement": (int,),
    "timestamp": (dt.datetime,),
}
FORMATS: Final[tuple[str, ...]] = ("email", "url", "iso-date")
RESERVED_NAMES: Final[frozenset[str]] = frozenset(
    {"_version", "_created_at", "_updated_at", "_expires_at", "_changes", "_slot"}
)

_TYPE_WORDS: Final[dict[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "a list",
    dt.datetime: "a datetime (ISO 8601)",
    dt.date: "a date (YYYY-MM-DD)",
    uuid.UUID: "a UUID",
}
_ORDERED_TYPES: Final = (int, float, dt.datetime, dt.date)
_SIZED_TYPES: Final = (str, list, dict)
_KEY_TYPES: Final = (str, int, uuid.UUID)  # encodable record keys; floats would make 1 == 1.0 collide
_CONTAINER_TYPES: Final = (dict, list)

# Pragmatic, not RFC 5322: something@label.label, no spaces, a top-level label of 2+ characters.
_EMAIL_RE: Final = re.compile(r"[^@\s]+@(?:[^@\s.]+\.)+[^@\s.]{2,}")
_URL_SCHEMES: Final = frozenset({"http", "https", "ftp"})


def _type_name(value: Any) -> str:
    return type(value).__name__


def _show(value: Any) -> str:
    """Render a bound or choice for a message: ISO text for dates, repr for the rest."""
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return repr(value)


def _is_email(text: str) -> bool:
    return _EMAIL_RE.fullmatch(text) is not None


def _is_url(text: str) -> bool:
    if not text or any(ch.isspace() for ch in text):
        return False
    try:
        parts = urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme.lower() in _URL_SCHEMES and bool(host)


def _is_iso_date(text: str) -> bool:
    for parse in (dt.date.fromisoformat, dt.datetime.fromisoformat):
        try:
            parse(text)
        except ValueError:
            continue
        return True
    return False


_FORMAT_CHECKS: Final[dict[str, tuple[Callable[[str], bool], str]]] = {
    "email": (_is_email, "is not a valid email address"),
    "url": (_is_url, "is not a valid URL (http, https or ftp with a host)"),
    "iso-date": (_is_iso_date, "is not a valid ISO 8601 date"),
}


class _CoercionError(ValueError):
    """A value cannot become the field's type; the message completes "<field> ..."."""


class Field:
    """One attribute of a model: its type, constraints, default and how it is stored.

    ``type`` is one of str, int, float, bool, dict, list, ``datetime.datetime``, ``datetime.date``,
    ``uuid.UUID``. ``bool`` is not an int here and ``"1"`` is not ``1``: only lossless coercions
    happen (an ISO string for datetime/date/uuid fields, an int for a float field).

    ``default`` is a value (deep-copied for each record) or a zero-argument callable (called once per
    record). ``generated`` is ``"uuid"``, ``"autoincrement"`` (int fields) or ``"timestamp"``
    (datetime fields): the model fills those in at create, so they are never required from the
    user. ``nullable`` defaults to ``True`` except for primary keys and required fields.
    ``pattern`` is searched (``re.search``): anchor it with ``^...$`` to match the whole value.

    Raises :class:`~natskv.errors.InvalidArgumentError` at definition time when options do not fit
    the type or each other. ``name`` is set by ``__set_name__`` when the field is a class attribute,
    or given directly (dynamic schemas).
    """

    def __init__(
        self,
        type: type = str,
        *,
        primary_key: bool = False,
        required: bool = False,
        default: Any = MISSING,
        generated: str | None = None,
        unique: bool = False,
        index: bool = False,
        choices: Iterable[Any] | None = None,
        format: str | None = None,
        min: Any = None,
        max: Any = None,
        min_length: int | None = None,
        max_length: int | None = None,
        pattern: str | re.Pattern[str] | None = None,
        nullable: bool | None = None,
        description: str = "",
        name: str | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.primary_key = primary_key
        self.generated = generated
        self.default = default
        self.unique = unique
        self.index = index
        self.format = format
        self.min = min
        self.max = max
        self.min_length = min_length
        self.max_length = max_length
        self.description = description
        self.pattern: str | None = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        self._regex: re.Pattern[str] | None = None
        self.choices: tuple[Any, ...] | None = None
        self._check_type_and_options(choices, pattern)
        # A primary key without a generator or default has to come from the user.
        self.required = required or (primary_key and generated is None and default is MISSING)
        if nullable is None:
            nullable = not (primary_key or required)
        elif nullable and primary_key:
            self._fail("a primary key cannot be nullable")
        self.nullable = nullable
        if default is not MISSING and not callable(default):
            self._check_default(default)
        # A value of exactly this type is clean as it is (validate_record's fast path): a field of
        # a simple type with nothing to check but the type.
        # (Not float: a float must also be finite.)
        checks = (self.choices, self.min, self.max, self.min_length, self.max_length, self._regex, self.format)
        plain = type in (str, int, bool) and checks.count(None) == len(checks)
        self._as_is: Any = type if plain else None

    # -- definition checks -------------------------------------------------------------------

    def _fail(self, message: str) -> NoReturn:
        who = f"field {self.name!r}" if self.name else "Field"
        raise InvalidArgumentError(f"{who}: {message}")

    def _check_type_and_options(
        self, choices: Iterable[Any] | None, pattern: str | re.Pattern[str] | None
    ) -> None:
        kind = self.type
        if not any(kind is allowed for allowed in FIELD_TYPES):
            allowed = ", ".join(t.__module__ + "." + t.__name__ if t.__module__ != "builtins"
                                else t.__name__ for t in FIELD_TYPES)
            self._fail(f"type {kind!r} is not supported; use one of {allowed}")
        kind_name = kind.__name__
        if self.generated is not None:
            if self.generated not in GENERATED_KINDS:
                self._fail(f"generated={self.generated!r} is not one of {sorted(GENERATED_KINDS)}")
            fits = GENERATED_KINDS[self.generated]
            if kind not in fits:
                names = " or ".join(t.__name__ for t in fits)
                self._fail(f"generated={self.generated!r} needs a {names} field, not {kind_name}")
            if self.default is not MISSING:
                self._fail("a generated field cannot also have a default")
        if self.format is not None:
            if self.format not in FORMATS:
                self._fail(f"format={self.format!r} is not one of {', '.join(FORMATS)}")
            if kind is not str:
                self._fail(f"format={self.format!r} applies to str fields, not {kind_name}")
        self._check_bounds(kind_name)
        self._check_lengths(kind_name)
        if pattern is not None:
            if kind is not str:
                self._fail(f"pattern applies to str fields, not {kind_name}")
            try:
                self._regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
            except (re.error, TypeError) as exc:
                self._fail(f"pattern {pattern!r} is not a valid regular expression: {exc}")
        if choices is not None:
            self._set_choices(choices, kind_name)
        if self.primary_key and kind not in _KEY_TYPES:
            self._fail(f"a primary key must be str, int or uuid.UUID, not {kind_name}")
        if kind in _CONTAINER_TYPES:
            for option in ("unique", "index"):
                if getattr(self, option):
                    self._fail(f"{option}=True is not supported on {kind_name} fields")

    def _check_bounds(self, kind_name: str) -> None:
        if self.min is None and self.max is None:
            return
        if self.type not in _ORDERED_TYPES:
            self._fail(f"min/max apply to int, float, datetime and date fields, not {kind_name}; "
                       "use min_length/max_length for sizes")
        for option in ("min", "max"):
            bound = getattr(self, option)
            if bound is None:
                continue
            if self.type in (int, float):
                if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                    self._fail(f"{option}={bound!r} must be a number")
                continue
            try:
                setattr(self, option, self._coerce(bound))
            except _CoercionError:
                self._fail(f"{option}={bound!r} must be {_TYPE_WORDS[self.type]}")
        if self.min is not None and self.max is not None and self.min > self.max:
            self._fail(f"min={_show(self.min)} is greater than max={_show(self.max)}")

    def _check_lengths(self, kind_name: str) -> None:
        if self.min_length is None and self.max_length is None:
            return
        if self.type not in _SIZED_TYPES:
            self._fail(f"min_length/max_length apply to str, list and dict fields, not {kind_name}")
        for option in ("min_length", "max_length"):
            size = getattr(self, option)
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                self._fail(f"{option}={size!r} must be a non-negative int")
        if (self.min_length is not None and self.max_length is not None
                and self.min_length > self.max_length):
            self._fail(f"min_length={self.min_length} is greater than max_length={self.max_length}")

    def _set_choices(self, choices: Iterable[Any], kind_name: str) -> None:
        if self.type in _CONTAINER_TYPES:
            self._fail(f"choices are not supported on {kind_name} fields")
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
            self._fail(f"choices must be a list of values, not {choices!r}")
        accepted: list[Any] = []
        for choice in choices:
            try:
                accepted.append(self._coerce(choice))
            except _CoercionError:
                self._fail(f"choice {choice!r} is not {_TYPE_WORDS[self.type]}")
        if not accepted:
            self._fail("choices must not be empty")
        self.choices = tuple(accepted)

    def _check_default(self, default: Any) -> None:
        _, problems = self._check(default)
        if problems:
            self._fail(f"default {default!r} is invalid: " + "; ".join(m for m, _ in problems))

    # -- descriptor protocol ---------------------------------------------------------------

    def __set_name__(self, owner: type, name: str) -> None:
        """Record the attribute name when the field is assigned in a class body."""
        self.name = name

    def __repr__(self) -> str:
        options = [self.type.__name__]
        flags = ("primary_key", "required", "unique", "index")
        options.extend(f"{option}=True" for option in flags if getattr(self, option))
        if self.generated:
            options.append(f"generated={self.generated!r}")
        return f"<Field {self.name or '?'}: {', '.join(options)}>"

    # -- defaults and generated values -----------------------------------------------------

    def generates(self, kind: str | None = None) -> bool:
        """True if the field is generated (``kind`` None) or generated as ``kind``."""
        if kind is None:
            return self.generated is not None
        return self.generated == kind

    @property
    def has_default(self) -> bool:
        """True if the field has a default value or default factory."""
        return self.default is not MISSING

    def default_value(self) -> Any:
        """A fresh default for one record: the factory's result or a deep copy; MISSING if none."""
        if self.default is MISSING:
            return MISSING
        if callable(self.default):
            return self.default()
        return copy.deepcopy(self.default)

    def generate_value(self) -> Any:
        """A new value for a ``"uuid"`` or ``"timestamp"`` field (uuid4 / aware UTC now).

        Raises InvalidArgumentError for other fields: autoincrement values come from the model's
        counter stream, not from here.
        """
        if self.generated == "uuid":
            value = uuid.uuid4()
            return str(value) if self.type is str else value
        if self.generated == "timestamp":
            return dt.datetime.now(dt.timezone.utc)
        self._fail(f"generate_value() cannot produce a value for generated={self.generated!r}")

    # -- coercion and the stored form ------------------------------------------------------

    def _coerce(self, value: Any) -> Any:
        """Return ``value`` as the field's type or raise _CoercionError. ``None`` is not handled."""
        kind = self.type
        if kind is str:
            if isinstance(value, str):
                return value
            if isinstance(value, uuid.UUID) and self.generated == "uuid":
                return str(value)
        elif kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    raise _CoercionError("must be a finite number")
                return float(value)
        elif kind is dict:
            if isinstance(value, dict):
                return value
        elif kind is list:
            if isinstance(value, (list, tuple)):
                return list(value)
        elif kind is dt.datetime:
            if isinstance(value, str):
                try:
                    value = dt.datetime.fromisoformat(value)
                except ValueError:
                    raise _CoercionError(f"must be {_TYPE_WORDS[kind]}, got {value!r}") from None
            if isinstance(value, dt.datetime):
                # Naive datetimes are taken as UTC, so the stored form always carries an offset.
                return value if value.utcoffset() is not None else value.replace(tzinfo=dt.timezone.utc)
        elif kind is dt.date:
            if isinstance(value, str):
                try:
                    return dt.date.fromisoformat(value)
                except ValueError:
                    raise _CoercionError(f"must be {_TYPE_WORDS[kind]}, got {value!r}") from None
            # A datetime is a date subclass, but dropping its time silently would lose data.
            if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
                return value
        elif kind is uuid.UUID:
            if isinstance(value, uuid.UUID):
                return value
            if isinstance(value, str):
                try:
                    return uuid.UUID(value)
                except ValueError:
                    raise _CoercionError(f"must be {_TYPE_WORDS[kind]}, got {value!r}") from None
        # The message is built here only: most values pass, and formatting it costs more than the checks.
        raise _CoercionError(f"must be {_TYPE_WORDS[kind]}, got {_type_name(value)}")

    def coerce(self, value: Any) -> Any:
        """Convert user input to the field's Python type; ``None`` passes through.

        Accepts ISO strings for datetime/date/uuid fields, ints for float fields, tuples for list
        fields; naive datetimes become UTC. Raises InvalidArgumentError for anything else.
        """
        if value is None:
            return None
        try:
            return self._coerce(value)
        except _CoercionError as exc:
            raise InvalidArgumentError(f"field {self.name or '?'!r} {exc}") from None

    def to_json(self, value: Any) -> Any:
        """The stored JSON form of a clean value: ISO text for datetime (with offset) and date,
        canonical text for UUIDs, everything else unchanged."""
        if isinstance(value, dt.datetime):
            if value.utcoffset() is None:
                value = value.replace(tzinfo=dt.timezone.utc)
            return value.isoformat()
        if isinstance(value, dt.date):
            return value.isoformat()
        if isinstance(value, uuid.UUID):
            return str(value)
        return value

    def from_json(self, raw: Any) -> Any:
        """The Python form of a stored value (inverse of :meth:`to_json`).

        Tolerant: a stored value that does not fit the field (written by an older schema or another
        client) is returned as it is rather than raising.
        """
        kind = self.type
        try:
            if isinstance(raw, str):
                if kind is dt.datetime:
                    parsed = dt.datetime.fromisoformat(raw)
                    if parsed.utcoffset() is None:
                        parsed = parsed.replace(tzinfo=dt.timezone.utc)
                    return parsed
                if kind is dt.date:
                    return dt.date.fromisoformat(raw)
                if kind is uuid.UUID:
                    return uuid.UUID(raw)
            elif kind is float and isinstance(raw, int) and not isinstance(raw, bool):
                return float(raw)
        except ValueError:
            return raw
        return raw

    # -- validation ------------------------------------------------------------------------

    def _check(self, value: Any) -> tuple[Any, list[tuple[str, str]]]:
        """Coerce and check a present value: (clean value, [(message, code), ...])."""
        if value is None:
            if self.nullable:
                return None, []
            return None, [("must not be null", "null")]
        try:
            value = self._coerce(value)
        except _CoercionError as exc:
            return value, [(str(exc), "type")]
        problems: list[tuple[str, str]] = []
        if self.choices is not None and value not in self.choices:
            shown = ", ".join(_show(c) for c in self.choices)
            problems.append((f"must be one of {shown}", "choices"))
        if self.min is not None and value < self.min:
            problems.append((f"must be >= {_show(self.min)}", "min"))
        if self.max is not None and value > self.max:
            problems.append((f"must be <= {_show(self.max)}", "max"))
        if self.min_length is not None or self.max_length is not None:
            unit = "characters" if isinstance(value, str) else "items"
            if self.min_length is not None and len(value) < self.min_length:
                problems.append((f"must have at least {self.min_length} {unit}", "min_length"))
            if self.max_length is not None and len(value) > self.max_length:
                problems.append((f"must have at most {self.max_length} {unit}", "max_length"))
        if self._regex is not None and self._regex.search(value) is None:
            problems.append((f"must match the pattern {self.pattern!r}", "pattern"))
        if self.format is not None:
            check, message = _FORMAT_CHECKS[self.format]
            if not check(value):
                problems.append((message, "format"))
        return value, problems

    def validate(self, value: Any) -> tuple[Any, list[Issue]]:
        """Coerce and check one present value: (clean value, issues named after this field)."""
        clean, problems = self._check(value)
        return clean, [(self.name or "?", message, code) for message, code in problems]


def validate_record(
    fields: Mapping[str, Field], values: Mapping[str, Any], *, partial: bool = False
) -> tuple[dict[str, Any], list[Issue]]:
    """Apply defaults, coerce and validate a record against ``fields``; collect every issue.

    With ``partial=True`` (updates) only the fields present in ``values`` are checked and no
    defaults are applied. Generated fields are never reported missing: the caller fills them
    (see :meth:`Field.generates`). Keys not in the schema are kept unchanged. Returns the clean
    values in Python form and the list of issues (empty when valid); it never raises for bad data.
    """
    clean = dict(values)
    issues: list[Issue] = []
    for name, field in fields.items():
        if name in values:
            value = values[name]
        elif partial:
            continue
        else:
            value = field.default_value()
            if value is MISSING:
                if field.required and field.generated is None:
                    issues.append((name, "is required", "required"))
                continue
        if type(value) is field._as_is:
            clean[name] = value
            continue
        clean[name], problems = field._check(value)
        issues.extend((name, message, code) for message, code in problems)
    return clean, issues


def validate_rows(
    fields: Mapping[str, Field], rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[Issue]]:
    """Validate many new records at once (``Model.bulk_create``): per row what
    ``validate_record(fields, row without its None fields, partial=False)`` gives, and the issues
    of all rows named ``[i].field``. A field given as None takes its default, as a keyword left
    out of ``Model(...)`` does; keys outside the schema are kept (they must be str: TypeError
    otherwise). One pass per row with the per-field work looked up once."""
    names = frozenset(fields)
    plan = [(name, field, field._as_is) for name, field in fields.items()]
    prepared: list[dict[str, Any]] = []
    issues: list[Issue] = []
    for i, row in enumerate(rows):
        clean: dict[str, Any] = {}
        for name, field, as_is in plan:
            value = row.get(name)
            if value is None:
                value = field.default_value()
                if value is MISSING:
                    if field.required and field.generated is None:
                        issues.append((f"[{i}].{name}", "is required", "required"))
                    continue
            if type(value) is as_is:
                clean[name] = value
                continue
            clean[name], problems = field._check(value)
            issues.extend((f"[{i}].{name}", message, code) for message, code in problems)
        if not names.issuperset(row):  # keys outside the schema: kept as they are
            for key, value in row.items():
                if type(key) is not str and not isinstance(key, str):
                    raise TypeError("keywords must be strings")
                if key not in names:
                    clean[key] = value
        prepared.append(clean)
    return prepared, issues


def primary_key_name(fields: Mapping[str, Field]) -> str | None:
    """The primary key's name, or None when the schema has none. Raises if it has several."""
    keys = [name for name, field in fields.items() if field.primary_key]
    if len(keys) > 1:
        raise InvalidArgumentError(f"a model has exactly one primary key, found {', '.join(keys)}")
    return keys[0] if keys else None


def check_schema(fields: Mapping[str, Field]) -> None:
    """Check a whole schema: valid, unreserved names and exactly one primary key.

    Names must be Python identifiers, must not start with ``_`` (``_version``, ``_created_at`` and
    ``_updated_at`` are the record's metadata) and must not contain ``__`` (the query lookup
    separator, as in ``age__gte``). Raises InvalidArgumentError listing every problem; a schema
    without a primary key is an error too, so the caller decides whether to add an ``id``.
    """
    problems: list[str] = []
    for name, field in fields.items():
        if not isinstance(field, Field):
            problems.append(f"{name!r} is not a Field but {_type_name(field)}")
            continue
        if not isinstance(name, str) or not name.isidentifier():
            problems.append(f"{name!r} is not a valid identifier")
        elif name in RESERVED_NAMES:
            problems.append(f"{name!r} is reserved for record metadata")
        elif name.startswith("_"):
            problems.append(f"{name!r} starts with '_', which is reserved for natskv")
        elif "__" in name:
            problems.append(f"{name!r} contains '__', the query lookup separator")
        if field.name is not None and field.name != name:
            problems.append(f"{name!r} holds a Field named {field.name!r}")
    keys = [name for name, field in fields.items() if isinstance(field, Field) and field.primary_key]
    if not keys:
        problems.append("no primary key: mark one field primary_key=True (primaryKey: true)")
    elif len(keys) > 1:
        problems.append(f"a model has exactly one primary key, found {', '.join(keys)}")
    if problems:
        raise InvalidArgumentError("invalid schema: " + "; ".join(problems))


__all__ = [
    "FIELD_TYPES",
    "FORMATS",
    "GENERATED_KINDS",
    "MISSING",
    "RESERVED_NAMES",
    "Field",
    "Issue",
    "check_schema",
    "primary_key_name",
    "validate_record",
    "validate_rows",
]
