"""The schema layer: Field options, coercion, stored JSON form, validation, Sequelize specs.

Pure Python: no server involved.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natskv.errors import InvalidArgumentError, ValidationError
from natskv.models import Field
from natskv.models.attributes import define_schema, field_from_spec, schema_from_spec
from natskv.models.fields import MISSING, check_schema, primary_key_name, validate_record, validate_rows

UTC = dt.timezone.utc


def named(kind: type = str, **options: Any) -> Field:
    return Field(kind, name="f", **options)


def codes(field: Field, value: Any) -> list[str]:
    return [code for _, _, code in field.validate(value)[1]]


# -- coercion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "given_value", "expected"),
    [
        (str, "x", "x"),
        (int, 5, 5),
        (float, 2, 2.0),
        (float, 2.5, 2.5),
        (bool, False, False),
        (dict, {"a": 1}, {"a": 1}),
        (list, (1, 2), [1, 2]),
        (dt.datetime, "2024-05-01T10:00:00+02:00",
         dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
        (dt.datetime, "2024-05-01T10:00:00Z", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
        (dt.datetime, dt.datetime(2024, 5, 1, 10), dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
        (dt.date, "2024-05-01", dt.date(2024, 5, 1)),
        (dt.date, dt.date(2024, 5, 1), dt.date(2024, 5, 1)),
        (uuid.UUID, "12345678-1234-5678-1234-567812345678",
         uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ],
)
def test_coerce_accepts(kind: type, given_value: Any, expected: Any) -> None:
    result = named(kind).coerce(given_value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("kind", "bad"),
    [
        (int, "1"), (int, True), (int, 1.0), (float, True), (float, "1.5"), (float, float("nan")),
        (float, float("inf")), (bool, 1), (bool, "true"), (str, 1), (dict, [1]), (list, "ab"),
        (dt.datetime, "yesterday"), (dt.datetime, dt.date(2024, 1, 1)), (dt.date, "2024-13-01"),
        (dt.date, dt.datetime(2024, 1, 1)), (uuid.UUID, "not-a-uuid"), (uuid.UUID, 5),
    ],
)
def test_coerce_rejects(kind: type, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="'f'"):
        named(kind).coerce(bad)
    assert codes(named(kind), bad) == ["type"]


def test_coerce_none_passes_through() -> None:
    assert named(int).coerce(None) is None


def test_generated_uuid_str_field_accepts_uuid_objects() -> None:
    field = named(str, generated="uuid")
    value = uuid.uuid4()
    assert field.coerce(value) == str(value)


# -- stored JSON form -------------------------------------------------------------------------


def roundtrip(field: Field, value: Any) -> Any:
    return field.from_json(json.loads(json.dumps(field.to_json(value))))


def test_to_json_forms() -> None:
    offset = dt.timezone(dt.timedelta(hours=-5))
    assert named(dt.datetime).to_json(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=offset)) == (
        "2024-01-02T03:04:05-05:00"
    )
    assert named(dt.datetime).to_json(dt.datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05+00:00"
    assert named(dt.date).to_json(dt.date(2024, 1, 2)) == "2024-01-02"
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert named(uuid.UUID).to_json(value) == "12345678-1234-5678-1234-567812345678"
    assert named(dict).to_json({"a": [1]}) == {"a": [1]}
    assert named(int).to_json(None) is None


def test_from_json_is_tolerant() -> None:
    assert named(dt.datetime).from_json("garbage") == "garbage"
    assert named(dt.datetime).from_json(5) == 5
    assert named(dt.date).from_json("2024-99-99") == "2024-99-99"
    assert named(uuid.UUID).from_json("nope") == "nope"
    assert named(int).from_json("1") == "1"
    assert named(float).from_json(True) is True
    assert named(float).from_json(3) == 3.0
    assert named(dt.datetime).from_json(None) is None


def test_from_json_naive_stored_datetime_is_utc() -> None:
    assert named(dt.datetime).from_json("2024-01-01T00:00:00") == dt.datetime(2024, 1, 1, tzinfo=UTC)


offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)


@given(st.datetimes(timezones=offsets))
def test_aware_datetime_roundtrip(value: dt.datetime) -> None:
    back = roundtrip(named(dt.datetime), value)
    assert back == value
    assert back.utcoffset() == value.utcoffset()


@given(st.datetimes())
def test_naive_datetime_roundtrip_as_utc(value: dt.datetime) -> None:
    assert roundtrip(named(dt.datetime), value) == value.replace(tzinfo=UTC)


@given(st.dates())
def test_date_roundtrip(value: dt.date) -> None:
    assert roundtrip(named(dt.date), value) == value


@given(st.uuids())
def test_uuid_roundtrip(value: uuid.UUID) -> None:
    field = named(uuid.UUID)
    assert roundtrip(field, value) == value
    assert field.coerce(str(value)) == value


@given(st.text())
def test_str_roundtrip(value: str) -> None:
    assert roundtrip(named(str), value) == value


@given(st.integers())
def test_int_roundtrip(value: int) -> None:
    assert roundtrip(named(int), value) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_roundtrip(value: float) -> None:
    field = named(float)
    assert roundtrip(field, field.coerce(value)) == value


@given(st.booleans())
def test_bool_roundtrip(value: bool) -> None:
    assert roundtrip(named(bool), value) is value


# -- validation rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        (named(int, min=0), -1, "min"),
        (named(float, max=1.5), 2, "max"),
        (named(dt.date, min="2024-01-01"), dt.date(2023, 12, 31), "min"),
        (named(dt.datetime, max=dt.datetime(2024, 1, 1)), "2024-01-01T00:00:01+00:00", "max"),
        (named(str, min_length=2), "a", "min_length"),
        (named(str, max_length=2), "abc", "max_length"),
        (named(list, min_length=1), [], "min_length"),
        (named(dict, max_length=1), {"a": 1, "b": 2}, "max_length"),
        (named(str, pattern=r"^[a-z]+$"), "abC", "pattern"),
        (named(str, choices=["a", "b"]), "c", "choices"),
        (named(int, choices=[1, 2]), 3, "choices"),
        (named(str, format="email"), "ann@example", "format"),
        (named(str, format="url"), "javascript:alert(1)", "format"),
        (named(str, format="iso-date"), "2024-02-30", "format"),
        (named(int, nullable=False), None, "null"),
        (named(int), "1", "type"),
    ],
)
def test_rule_codes(field: Field, value: Any, code: str) -> None:
    assert codes(field, value) == [code]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (named(int, min=0, max=10), 0),
        (named(int, min=0, max=10), 10),
        (named(str, min_length=1, max_length=3), "abc"),
        (named(str, pattern="b"), "abc"),
        (named(float, choices=[1, 2.5]), 1),
        (named(int), None),
    ],
)
def test_rule_passes(field: Field, value: Any) -> None:
    assert codes(field, value) == []


@pytest.mark.parametrize(
    "address", ["ann@example.com", "a.b+tag@sub.example.co.uk", "x_y@ex-ample.io"]
)
def test_valid_emails(address: str) -> None:
    assert codes(named(str, format="email"), address) == []


@pytest.mark.parametrize(
    "address", ["ann", "ann@", "@example.com", "an n@example.com", "ann@example.c", "a@@b.com",
                "ann@.com", "ann@example..com"]
)
def test_invalid_emails(address: str) -> None:
    assert codes(named(str, format="email"), address) == ["format"]


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://example.com/x?y=1", True), ("http://localhost:8080", True),
        ("ftp://files.example.com", True), ("HTTPS://EXAMPLE.COM", True),
        ("example.com", False), ("mailto:ann@example.com", False), ("http://", False),
        ("http://exa mple.com", False), ("http://example.com:99999", False), ("", False),
    ],
)
def test_url_format(url: str, ok: bool) -> None:
    assert codes(named(str, format="url"), url) == ([] if ok else ["format"])


@pytest.mark.parametrize(
    ("text", "ok"),
    [("2024-02-29", True), ("2024-02-29T12:30:00+01:00", True), ("2023-02-29", False),
     ("29/02/2024", False)],
)
def test_iso_date_format(text: str, ok: bool) -> None:
    assert codes(named(str, format="iso-date"), text) == ([] if ok else ["format"])


def test_messages_are_readable() -> None:
    field = named(str, format="email")
    assert field.validate("nope")[1] == [("f", "is not a valid email address", "format")]
    _, issues = named(str, choices=["admin", "user"]).validate("root")
    assert issues == [("f", "must be one of 'admin', 'user'", "choices")]


def test_several_rules_on_one_field_are_all_reported() -> None:
    field = named(str, min_length=5, pattern=r"^\d+$", format="email")
    assert codes(field, "ab") == ["min_length", "pattern", "format"]


# -- validate_record --------------------------------------------------------------------------


def user_schema() -> dict[str, Field]:
    return schema_from_spec(
        {
            "id": Field(int, primary_key=True, generated="autoincrement"),
            "name": Field(str, required=True, max_length=20),
            "email": Field(str, unique=True, format="email"),
            "age": Field(int, index=True, min=0),
            "role": Field(str, choices=["admin", "user"], default="user"),
            "tags": Field(list, default=[]),
            "token": Field(uuid.UUID, generated="uuid"),
            "created": Field(dt.datetime, generated="timestamp"),
        }
    )


def test_validate_record_clean_values_and_defaults() -> None:
    clean, issues = validate_record(
        user_schema(), {"name": "Ann", "email": "ann@example.com", "age": 30, "extra": {"x": 1}}
    )
    assert issues == []
    assert clean == {"name": "Ann", "email": "ann@example.com", "age": 30, "role": "user",
                     "tags": [], "extra": {"x": 1}}


def test_validate_record_collects_every_issue() -> None:
    _, issues = validate_record(user_schema(), {"email": "bad", "age": -1, "role": "root"})
    assert sorted(issues) == sorted([
        ("name", "is required", "required"),
        ("email", "is not a valid email address", "format"),
        ("age", "must be >= 0", "min"),
        ("role", "must be one of 'admin', 'user'", "choices"),
    ])
    error = ValidationError(issues)
    assert len(error.issues) == 4


def test_validate_rows_is_validate_record_of_each_row_without_its_none_fields() -> None:
    # bulk_create's validation: what Model(**row) would validate, rows named in the issues
    schema = user_schema()
    token = uuid.uuid4()
    rows = [
        {"name": "Ann", "email": "ann@example.com", "age": 30, "extra": {"x": 1}},
        {"name": "Bob", "age": None, "role": None, "token": str(token)},  # None: left out, defaults apply
        {"email": "bad", "age": -1, "role": "root"},
        {"name": "x" * 21, "id": 7, "tags": ("a",)},
        {},
    ]
    prepared, issues = validate_rows(schema, rows)
    expected_issues = []
    for i, row in enumerate(rows):
        clean, row_issues = validate_record(schema, {k: v for k, v in row.items() if v is not None})
        assert prepared[i] == clean
        expected_issues += [(f"[{i}].{field}", message, code) for field, message, code in row_issues]
    assert sorted(issues) == sorted(expected_issues) and len(issues) == 6
    assert prepared[1]["token"] == token and prepared[1]["role"] == "user"
    assert prepared[0]["extra"] == {"x": 1}
    with pytest.raises(TypeError, match="keywords must be strings"):
        validate_rows(schema, [{"name": "Ann", 5: "five"}])


def test_required_and_null() -> None:
    schema = {"name": Field(str, required=True, name="name")}
    assert validate_record(schema, {})[1] == [("name", "is required", "required")]
    assert validate_record(schema, {"name": None})[1] == [("name", "must not be null", "null")]
    schema = {"note": Field(str, required=True, nullable=True, name="note")}
    assert validate_record(schema, {"note": None}) == ({"note": None}, [])


def test_optional_field_may_be_absent_and_stays_absent() -> None:
    schema = {"nick": Field(str, nullable=False, name="nick")}
    assert validate_record(schema, {}) == ({}, [])
    assert validate_record(schema, {"nick": None})[1][0][2] == "null"


def test_generated_fields_are_not_required() -> None:
    schema = user_schema()
    clean, issues = validate_record(schema, {"name": "Ann"})
    assert issues == []
    assert "id" not in clean and "token" not in clean and "created" not in clean
    assert [name for name, field in schema.items() if field.generates()] == ["id", "token", "created"]
    assert schema["id"].generates("autoincrement") and not schema["id"].generates("uuid")


def test_generated_field_given_by_user_is_validated() -> None:
    clean, issues = validate_record(user_schema(), {"name": "A", "id": 7, "token": "bad"})
    assert clean["id"] == 7
    assert [(f, c) for f, _, c in issues] == [("token", "type")]


def test_generate_value() -> None:
    assert isinstance(Field(uuid.UUID, generated="uuid").generate_value(), uuid.UUID)
    assert isinstance(Field(str, generated="uuid").generate_value(), str)
    stamp = Field(dt.datetime, generated="timestamp").generate_value()
    assert stamp.tzinfo is not None
    with pytest.raises(InvalidArgumentError, match=r"counter|autoincrement"):
        Field(int, generated="autoincrement").generate_value()


def test_default_values_are_fresh_per_record() -> None:
    schema = {"tags": Field(list, default=["a"], name="tags")}
    first, _ = validate_record(schema, {})
    first["tags"].append("b")
    second, _ = validate_record(schema, {})
    assert second["tags"] == ["a"]


def test_callable_default_called_once_per_record() -> None:
    calls = []

    def make() -> int:
        calls.append(1)
        return len(calls)

    schema = {"n": Field(int, default=make, name="n")}
    assert validate_record(schema, {})[0] == {"n": 1}
    assert validate_record(schema, {})[0] == {"n": 2}
    assert validate_record(schema, {"n": 9})[0] == {"n": 9}
    assert len(calls) == 2


def test_callable_default_result_is_validated() -> None:
    schema = {"n": Field(int, default=lambda: "x", name="n")}
    assert validate_record(schema, {})[1] == [("n", "must be an integer, got str", "type")]


def test_partial_validates_only_present_fields() -> None:
    schema = user_schema()
    clean, issues = validate_record(schema, {"age": 5}, partial=True)
    assert (clean, issues) == ({"age": 5}, [])
    _, issues = validate_record(schema, {"age": -5, "name": None}, partial=True)
    assert sorted(code for _, _, code in issues) == ["min", "null"]


def test_coerced_values_come_back_in_python_form() -> None:
    schema = schema_from_spec({"when": dt.datetime, "day": "DATEONLY", "ref": "UUID", "x": "FLOAT"})
    clean, issues = validate_record(
        schema, {"when": "2024-01-01T00:00:00", "day": "2024-01-02",
                 "ref": "12345678123456781234567812345678", "x": 1}
    )
    assert issues == []
    assert clean == {"when": dt.datetime(2024, 1, 1, tzinfo=UTC), "day": dt.date(2024, 1, 2),
                     "ref": uuid.UUID(int=0x12345678123456781234567812345678), "x": 1.0}


# -- definition-time errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "match"),
    [
        (tuple, {}, "not supported"),
        (int, {"min_length": 1}, "min_length"),
        (str, {"min": 1}, "min/max"),
        (int, {"min": "1"}, "must be a number"),
        (int, {"min": 5, "max": 1}, "greater than"),
        (str, {"min_length": 5, "max_length": 1}, "greater than"),
        (str, {"max_length": -1}, "non-negative"),
        (str, {"generated": "autoincrement"}, "autoincrement"),
        (int, {"generated": "uuid"}, "uuid"),
        (str, {"generated": "timestamp"}, "timestamp"),
        (int, {"generated": "sequence"}, "not one of"),
        (int, {"generated": "autoincrement", "default": 1}, "default"),
        (int, {"pattern": "x"}, "pattern"),
        (str, {"pattern": "("}, "regular expression"),
        (int, {"format": "email"}, "format"),
        (str, {"format": "phone"}, "not one of"),
        (int, {"choices": ["a"]}, "choice 'a'"),
        (int, {"choices": []}, "empty"),
        (str, {"choices": "ab"}, "list"),
        (dict, {"choices": [{}]}, "choices"),
        (int, {"primary_key": True, "nullable": True}, "nullable"),
        (float, {"primary_key": True}, "primary key"),
        (dict, {"index": True}, "index"),
        (list, {"unique": True}, "unique"),
        (int, {"default": "x"}, "default"),
        (int, {"default": -1, "min": 0}, "default"),
        (dt.date, {"min": "not a date"}, "min"),
    ],
)
def test_definition_errors(kind: type, options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        Field(kind, **options)


def test_definition_error_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match="field 'age'"):
        Field(int, min_length=1, name="age")


def test_set_name_and_nullable_defaults() -> None:
    class Holder:
        email = Field(str)
        id = Field(int, primary_key=True)

    assert Holder.email.name == "email"
    assert Holder.email.nullable and not Holder.email.required
    assert not Holder.id.nullable and Holder.id.required
    assert not Field(str, required=True).nullable
    assert Field(int, primary_key=True, generated="autoincrement").required is False
    assert Field(int).default is MISSING and not Field(int).has_default


# -- Sequelize-style specs --------------------------------------------------------------------


def test_spec_primary_key_autoincrement() -> None:
    field = field_from_spec("id", {"type": "INTEGER", "primaryKey": True, "autoIncrement": True})
    assert (field.name, field.type, field.primary_key, field.generated) == (
        "id", int, True, "autoincrement"
    )
    assert not field.nullable


def test_spec_string_with_validators() -> None:
    field = field_from_spec("email", {
        "type": "STRING", "allowNull": False, "unique": True, "index": True,
        "validate": {"isEmail": True, "len": [2, 50], "is": "^[a-z@.]+$"},
    })
    assert field.type is str and field.unique and field.index
    assert (field.required, field.nullable) == (True, False)
    assert (field.min_length, field.max_length, field.format) == (2, 50, "email")
    assert field.pattern == "^[a-z@.]+$"


def test_spec_numeric_and_in_validators() -> None:
    field = field_from_spec("n", {"type": "integer", "validate": {"min": 0, "max": 10}})
    assert (field.min, field.max) == (0, 10)
    field = field_from_spec("k", {"type": "STRING", "validate": {"isIn": [["a", "b"]]}})
    assert field.choices == ("a", "b")
    field = field_from_spec("k", {"type": "STRING", "validate": {"isIn": ["a", "b"]}})
    assert field.choices == ("a", "b")
    field = field_from_spec("site", {"type": "TEXT", "validate": {"isUrl": True, "notEmpty": True}})
    assert (field.format, field.min_length) == ("url", 1)
    field = field_from_spec("born", {"type": "STRING", "validate": {"isDate": True}})
    assert field.format == "iso-date"
    field = field_from_spec("born", {"type": "DATEONLY", "validate": {"isDate": True}})
    assert field.format is None


def test_spec_enum() -> None:
    field = field_from_spec("role", {"type": "ENUM", "values": ["admin", "user"],
                                      "defaultValue": "user"})
    assert field.type is str and field.choices == ("admin", "user")
    assert field.default_value() == "user"
    with pytest.raises(InvalidArgumentError, match="ENUM needs 'values'"):
        field_from_spec("role", "ENUM")
    with pytest.raises(InvalidArgumentError, match="only applies to ENUM"):
        field_from_spec("role", {"type": "STRING", "values": ["a"]})
    with pytest.raises(InvalidArgumentError, match="either"):
        field_from_spec("role", {"type": "ENUM", "values": ["a"], "validate": {"isIn": [["a"]]}})


def test_spec_default_markers() -> None:
    assert field_from_spec("at", {"type": "DATE", "defaultValue": "NOW"}).generated == "timestamp"
    today = field_from_spec("on", {"type": "DATEONLY", "defaultValue": "now"}).default_value()
    assert isinstance(today, dt.date) and not isinstance(today, dt.datetime)
    assert field_from_spec("u", {"type": "UUID", "defaultValue": "UUIDV4"}).generated == "uuid"
    assert field_from_spec("u", {"type": "STRING", "defaultValue": "UUIDV4"}).generated == "uuid"
    assert field_from_spec("s", {"type": "STRING", "defaultValue": "NOW"}).default == "NOW"
    field = field_from_spec("n", {"type": "INTEGER", "defaultValue": 3, "allowNull": False})
    assert (field.default, field.required, field.nullable) == (3, False, False)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("STRING", str), ("text", str), ("Char", str), ("UUID", uuid.UUID), ("UUIDV4", uuid.UUID),
     ("INTEGER", int), ("BIGINT", int), ("SMALLINT", int), ("FLOAT", float), ("DOUBLE", float),
     ("REAL", float), ("DECIMAL", float), ("NUMBER", float), ("BOOLEAN", bool), ("JSON", dict),
     ("JSONB", dict), ("OBJECT", dict), ("ARRAY", list), ("DATE", dt.datetime),
     ("DATEONLY", dt.date)],
)
def test_spec_type_names(name: str, expected: type) -> None:
    assert field_from_spec("f", name).type is expected
    assert field_from_spec("f", {"type": name}).type is expected


def test_spec_python_types_fields_and_sized_strings() -> None:
    assert field_from_spec("f", int).type is int
    assert field_from_spec("f", {"type": dt.date}).type is dt.date
    given_field = Field(str)
    assert field_from_spec("g", given_field) is given_field and given_field.name == "g"
    assert field_from_spec("f", "STRING(64)").max_length == 64


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "STRING", "primarykey": True}, "did you mean 'primaryKey'"),
        ({"type": "STRING", "alowNull": False}, "did you mean 'allowNull'"),
        ({"type": "STRING", "validate": {"isEmial": True}}, "did you mean 'isEmail'"),
        ({"type": "STRNG"}, "did you mean 'STRING'"),
        ({"allowNull": False}, "'type' is required"),
        ({"type": 5}, "type name"),
        ({"type": "STRING", "unique": "email_idx"}, "true or false"),
        ({"type": "STRING", "validate": {"len": "2"}}, "len"),
        ({"type": "STRING", "validate": {"isEmail": True, "isUrl": True}}, "only one"),
        ({"type": "STRING", "validate": []}, "validate must be a dict"),
        ({"type": "INTEGER", "validate": {"len": [1, 2]}}, "min_length"),
        ({"type": "STRING", "autoIncrement": True}, "autoincrement"),
        ({"type": "INTEGER", "primaryKey": True, "allowNull": True}, "nullable"),
        ({"type": "DATE", "autoIncrement": True, "defaultValue": "NOW"}, "keep one"),
        (42, "expected a dict"),
    ],
)
def test_spec_errors(spec: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as raised:
        field_from_spec("col", spec)
    assert "'col'" in str(raised.value)


def test_schema_from_spec_end_to_end() -> None:
    schema = schema_from_spec({
        "id": {"type": "UUID", "primaryKey": True, "defaultValue": "UUIDV4"},
        "email": {"type": "STRING", "allowNull": False, "unique": True,
                  "validate": {"isEmail": True}},
        "age": {"type": "INTEGER", "validate": {"min": 0}},
    })
    check_schema(schema)
    assert primary_key_name(schema) == "id"
    _, issues = validate_record(schema, {"age": -3})
    assert sorted(issues) == [("age", "must be >= 0", "min"), ("email", "is required", "required")]
    with pytest.raises(InvalidArgumentError, match="schema must be a dict"):
        schema_from_spec([("id", "INTEGER")])  # type: ignore[arg-type]


def test_define_schema_marks_indexes() -> None:
    schema = define_schema(
        {"id": {"type": "INTEGER", "primaryKey": True}, "age": {"type": "INTEGER", "validate": {"min": 0}},
         "email": "STRING"},
        indexes=["age", {"fields": ["email"], "unique": True}],
    )
    assert schema["age"].index and not schema["age"].unique and schema["age"].min == 0
    assert schema["email"].unique
    for bad in (["nope"], [{"fields": ["age", "email"]}], [{"unique": True}]):
        with pytest.raises(InvalidArgumentError, match="must name one field"):
            define_schema({"id": {"type": "INTEGER", "primaryKey": True}, "age": "INTEGER"}, indexes=bad)


# -- schema checks ----------------------------------------------------------------------------


def test_check_schema_accepts_a_good_schema() -> None:
    check_schema(user_schema())


def test_check_schema_needs_exactly_one_primary_key() -> None:
    with pytest.raises(InvalidArgumentError, match="no primary key"):
        check_schema(schema_from_spec({"name": "STRING"}))
    two = schema_from_spec({"a": {"type": "INTEGER", "primaryKey": True},
                            "b": {"type": "STRING", "primaryKey": True}})
    with pytest.raises(InvalidArgumentError, match="exactly one primary key, found a, b"):
        check_schema(two)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        primary_key_name(two)
    assert primary_key_name(schema_from_spec({"name": "STRING"})) is None


@pytest.mark.parametrize(
    ("name", "match"),
    [("_version", "reserved"), ("_created_at", "reserved"), ("_updated_at", "reserved"),
     ("_secret", "starts with '_'"), ("first name", "identifier"), ("1st", "identifier"),
     ("age__gte", "lookup separator")],
)
def test_check_schema_rejects_names(name: str, match: str) -> None:
    schema = {"id": Field(int, primary_key=True, name="id"), name: Field(str, name=name)}
    with pytest.raises(InvalidArgumentError, match=match):
        check_schema(schema)


def test_check_schema_reports_every_problem_and_mismatches() -> None:
    schema: dict[str, Any] = {"x": Field(str, name="y"), "_z": Field(int), "w": "STRING"}
    with pytest.raises(InvalidArgumentError) as raised:
        check_schema(schema)
    message = str(raised.value)
    for part in ("named 'y'", "'_z'", "not a Field", "no primary key"):
        assert part in message
