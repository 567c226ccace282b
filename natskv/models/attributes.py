"""Sequelize-style attribute definitions: the dicts ``db.define()`` takes, parsed into Fields.

Pure Python with no I/O: everything here runs in the caller's thread. This module only translates
(``{"type": "STRING(64)", "allowNull": False, "validate": {"isEmail": True}}`` becomes
``Field(str, max_length=64, nullable=False, required=True, format="email")``); what a Field means
and how a record is validated is :mod:`natskv.models.fields`' business.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from natskv.errors import InvalidArgumentError
from natskv.models.fields import MISSING, Field


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


SPEC_TYPES: Final[dict[str, type]] = {
    "STRING": str, "TEXT": str, "CHAR": str,
    "UUID": uuid.UUID, "UUIDV4": uuid.UUID,
    "INTEGER": int, "BIGINT": int, "SMALLINT": int,
    "FLOAT": float, "DOUBLE": float, "REAL": float, "DECIMAL": float, "NUMBER": float,
    "BOOLEAN": bool,
    "JSON": dict, "JSONB": dict, "OBJECT": dict,
    "ARRAY": list,
    "DATE": dt.datetime, "DATEONLY": dt.date,
    "ENUM": str,
}
_SPEC_KEYS: Final = (
    "type", "primaryKey", "autoIncrement", "allowNull", "unique", "index", "defaultValue",
    "validate", "values", "comment", "description",
)
_VALIDATE_KEYS: Final = ("isEmail", "isUrl", "isDate", "len", "notEmpty", "min", "max", "is", "isIn")
_SIZED_SPEC_TYPE: Final = re.compile(r"(STRING|CHAR)\((\d+)\)", re.IGNORECASE)


def _reject_unknown(name: str, given: Iterable[Any], allowed: tuple[str, ...], what: str) -> None:
    lowered = {key.lower(): key for key in allowed}
    unknown = [key for key in given if key not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key).lower(), lowered, n=1, cutoff=0.6)
        hint = f" (did you mean {lowered[close[0]]!r}?)" if close else ""
        hints.append(f"{key!r}{hint}")
    raise InvalidArgumentError(
        f"field {name!r}: unknown {what} {', '.join(hints)}; known: {', '.join(allowed)}"
    )


def _flag(name: str, spec: Mapping[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"field {name!r}: {key} must be true or false, not {value!r}")
    return value


def _parse_spec_type(name: str, raw: Any) -> tuple[type, str, int | None]:
    """(Python type, upper-case type name, length from STRING(n)) for a spec's ``type``."""
    if isinstance(raw, type):
        return raw, raw.__name__, None
    if not isinstance(raw, str):
        raise InvalidArgumentError(f"field {name!r}: type must be a type name such as 'STRING', "
                                   f"not {raw!r}")
    sized = _SIZED_SPEC_TYPE.fullmatch(raw.strip())
    if sized:
        return str, sized.group(1).upper(), int(sized.group(2))
    upper = raw.strip().upper()
    if upper not in SPEC_TYPES:
        close = difflib.get_close_matches(upper, SPEC_TYPES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgumentError(f"field {name!r}: unknown type {raw!r}{hint}; "
                                   f"known: {', '.join(SPEC_TYPES)}")
    return SPEC_TYPES[upper], upper, None


def _validate_options(name: str, kind: type, rules: Any) -> dict[str, Any]:
    """Translate a Sequelize ``validate`` dict into Field options."""
    if not isinstance(rules, Mapping):
        raise InvalidArgumentError(f"field {name!r}: validate must be a dict, not {rules!r}")
    _reject_unknown(name, rules, _VALIDATE_KEYS, "validate rule")
    options: dict[str, Any] = {}
    formats = []
    for key, fmt in (("isEmail", "email"), ("isUrl", "url"), ("isDate", "iso-date")):
        if _flag(name, rules, key):
            formats.append(fmt)
    if "iso-date" in formats and kind in (dt.datetime, dt.date):
        formats.remove("iso-date")  # already guaranteed by the type
    if len(formats) > 1:
        raise InvalidArgumentError(f"field {name!r}: only one of isEmail, isUrl, isDate may be set")
    if formats:
        options["format"] = formats[0]
    if "len" in rules:
        bounds = rules["len"]
        if (not isinstance(bounds, (list, tuple)) or not 1 <= len(bounds) <= 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
            raise InvalidArgumentError(f"field {name!r}: len must be [min] or [min, max], "
                                       f"not {bounds!r}")
        options["min_length"] = bounds[0]
        if len(bounds) == 2:
            options["max_length"] = bounds[1]
    if _flag(name, rules, "notEmpty"):
        options["min_length"] = options.get("min_length") or 1
    for key in ("min", "max"):
        if key in rules:
            options[key] = rules[key]
    if "is" in rules:
        options["pattern"] = rules["is"]
    if "isIn" in rules:
        choices = rules["isIn"]
        # Sequelize wraps the list as the validator's single argument: isIn: [["a", "b"]].
        if isinstance(choices, (list, tuple)) and len(choices) == 1 and isinstance(choices[0], (list, tuple)):
            choices = choices[0]
        options["choices"] = choices
    return options


def field_from_spec(name: str, spec: Mapping[str, Any] | str | type | Field) -> Field:
    """Build a Field from a Sequelize-style attribute definition.

    ``spec`` is a Python type, a type name (``"STRING"``, ``"INTEGER"``, ``"STRING(64)"`` ...), a
    Field (named and returned as is), or a dict with ``type`` and any of ``primaryKey``,
    ``autoIncrement``, ``allowNull``, ``unique``, ``index``, ``defaultValue`` (``"NOW"`` and
    ``"UUIDV4"`` mean generated timestamp/uuid), ``values`` (ENUM), ``comment``/``description`` and
    ``validate`` (``isEmail isUrl isDate len notEmpty min max is isIn``). ``allowNull: false`` makes
    the field non-nullable and, when nothing else supplies a value, required. Type names are
    case-insensitive. Raises InvalidArgumentError naming the field and any unknown key.
    """
    if isinstance(spec, Field):
        spec.name = name
        return spec
    if isinstance(spec, (str, type)):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise InvalidArgumentError(f"field {name!r}: expected a dict, a type name or a type, "
                                   f"not {spec!r}")
    _reject_unknown(name, spec, _SPEC_KEYS, "option")
    if "type" not in spec:
        raise InvalidArgumentError(f"field {name!r}: 'type' is required, e.g. {{'type': 'STRING'}}")
    kind, type_name, length = _parse_spec_type(name, spec["type"])
    options: dict[str, Any] = {}
    if length is not None:
        options["max_length"] = length
    if type_name == "ENUM":
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise InvalidArgumentError(f"field {name!r}: ENUM needs 'values', a non-empty list")
        options["choices"] = list(values)
    elif "values" in spec:
        raise InvalidArgumentError(f"field {name!r}: 'values' only applies to ENUM fields")

    generated = "autoincrement" if _flag(name, spec, "autoIncrement") else None
    default: Any = MISSING
    if "defaultValue" in spec:
        value = spec["defaultValue"]
        marker = value.upper() if isinstance(value, str) else None
        if marker == "NOW" and kind is dt.date:
            default = _utc_today
        elif (marker == "NOW" and kind is dt.datetime) or (marker == "UUIDV4" and kind in (uuid.UUID, str)):
            if generated is not None:
                raise InvalidArgumentError(f"field {name!r}: autoIncrement and defaultValue "
                                           f"{value!r} both generate the value; keep one")
            generated = "timestamp" if marker == "NOW" else "uuid"
        else:
            default = value

    extra = _validate_options(name, kind, spec.get("validate", {}))
    if "choices" in extra and "choices" in options:
        raise InvalidArgumentError(f"field {name!r}: use either ENUM values or validate.isIn")
    if "max_length" in extra and "max_length" in options:
        extra["max_length"] = min(extra["max_length"], options["max_length"])
    options.update(extra)

    primary_key = _flag(name, spec, "primaryKey")
    nullable: bool | None = None
    required = False
    if "allowNull" in spec:
        nullable = _flag(name, spec, "allowNull")
        required = not nullable and default is MISSING and generated is None and not primary_key
    description = spec.get("comment", spec.get("description", ""))
    return Field(
        kind,
        name=name,
        primary_key=primary_key,
        required=required,
        default=default,
        generated=generated,
        unique=_flag(name, spec, "unique"),
        index=_flag(name, spec, "index"),
        nullable=nullable,
        description=description,
        **options,
    )


def schema_from_spec(spec: Mapping[str, Any]) -> dict[str, Field]:
    """Build ``{name: Field}`` from a dict of Sequelize-style definitions (see field_from_spec).

    Does not call :func:`check_schema`: the caller may add an automatic primary key first.
    """
    if not isinstance(spec, Mapping):
        raise InvalidArgumentError(f"a schema must be a dict of field definitions, not {spec!r}")
    return {name: field_from_spec(name, definition) for name, definition in spec.items()}


def define_schema(attributes: Mapping[str, Any], indexes: Iterable[str | Mapping[str, Any]] = ()) -> dict[str, Field]:
    """The fields of ``db.define(name, attributes, indexes=...)``: :func:`schema_from_spec` of
    ``attributes``, then each of ``indexes`` (a field name, or a Sequelize index dict with
    ``fields`` naming one field and an optional ``unique``) marks its field indexed or unique.
    Raises InvalidArgumentError for an index that does not name exactly one field."""
    schema = dict(schema_from_spec(attributes))
    for spec in indexes:
        if isinstance(spec, str):
            names, unique = [spec], False
        else:
            names, unique = list(spec.get("fields", [])), bool(spec.get("unique"))
        if len(names) != 1 or names[0] not in schema:
            raise InvalidArgumentError(f"index {spec!r} must name one field of {sorted(schema)}")
        old = schema[names[0]]
        # A Field checks its options together when built: build a new one with the flag added.
        options = {k: v for k, v in vars(old).items() if k in Field.__init__.__code__.co_varnames}
        schema[names[0]] = Field(**{**options, "unique" if unique else "index": True})
    return schema


__all__ = ["SPEC_TYPES", "define_schema", "field_from_spec", "schema_from_spec"]
