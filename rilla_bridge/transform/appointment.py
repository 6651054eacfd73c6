"""The Rilla appointment payload's contract, checked before anything is sent."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from rilla_bridge.transform.fields import RILLA_TIME_FORMAT, validation_text
from rilla_bridge.transform.model import TransformError

RECORDING_TYPES = ("CALL_AUDIO", "APPOINTMENT_AUDIO", "CALL_AUDIO_WITH_LOCATION")
MAX_CUSTOM_FIELD_CHARS = 2000
MAX_PAYLOAD_BYTES = 64 * 1024


def _rilla_time(value: str) -> None:
    try:
        datetime.strptime(value, RILLA_TIME_FORMAT)
    except ValueError:
        raise ValidationError(f"{value!r} is not a UTC time as YYYY-MM-DD HH:MM:SS") from None
    if len(value) != 19:  # strptime accepts unpadded parts; Rilla's format is zero-padded
        raise ValidationError(f"{value!r} is not a UTC time as YYYY-MM-DD HH:MM:SS")


def _custom_value(value: Any) -> None:
    if isinstance(value, (dict, list)):
        raise ValidationError("must be a plain string, number or boolean")


_required = {"required": True, "validate": validate.Length(min=1)}


class CustomerSchema(Schema):
    """Rilla's customer object: ``id`` and ``name`` are required."""

    class Meta:
        unknown = RAISE

    id = fields.String(**_required)  # type: ignore[arg-type]
    name = fields.String(**_required)  # type: ignore[arg-type]
    email = fields.Email()
    phone = fields.String()
    address = fields.String()


class AppointmentSchema(Schema):
    """A create-or-update body for ``POST /custom/appointment`` with the create-time fields."""

    class Meta:
        unknown = RAISE

    event_id = fields.String(**_required)  # type: ignore[arg-type]
    user_email = fields.Email(required=True)
    start_time = fields.String(required=True, validate=_rilla_time)
    end_time = fields.String(required=True, validate=_rilla_time)
    title = fields.String(**_required)  # type: ignore[arg-type]
    customer = fields.Nested(CustomerSchema, required=True)
    result = fields.String()
    type = fields.String()
    price = fields.Float(allow_nan=False)
    media_url = fields.Url(schemes={"http", "https"})
    recording_type = fields.String(validate=validate.OneOf(RECORDING_TYPES))
    location = fields.String()
    lead_source = fields.String()
    custom_fields = fields.Dict(keys=fields.String(), values=fields.Raw(validate=_custom_value))

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_: Any) -> None:
        if "media_url" in data and "recording_type" not in data:
            raise ValidationError("media_url requires recording_type", "recording_type")
        if data.get("recording_type") == "CALL_AUDIO_WITH_LOCATION" and not data.get("location"):
            raise ValidationError("CALL_AUDIO_WITH_LOCATION requires location", "location")
        # The fixed-width format sorts like the times it stands for.
        if data["end_time"] < data["start_time"]:
            raise ValidationError("end_time is before start_time", "end_time")


_SCHEMA = AppointmentSchema()


def validate_appointment(payload: dict[str, Any]) -> None:
    """Raise TransformError unless ``payload`` is a complete, sendable Rilla appointment.

    Beyond Rilla's documented rules, oversized data is refused here, by name, so that it is
    dead-lettered with a clear reason instead of being sent.
    """
    custom = payload.get("custom_fields")
    if isinstance(custom, dict):
        for key, value in custom.items():
            size = len(value) if isinstance(value, str) else len(str(value))
            if size > MAX_CUSTOM_FIELD_CHARS:
                raise TransformError(
                    f"custom field {key!r} is {size} characters (limit {MAX_CUSTOM_FIELD_CHARS})")
    try:
        body = json.dumps(payload, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TransformError(f"payload is not JSON-serialisable: {exc}") from None
    if len(body) > MAX_PAYLOAD_BYTES:
        raise TransformError(f"payload is {len(body)} bytes (limit {MAX_PAYLOAD_BYTES})")
    try:
        _SCHEMA.load(payload)
    except ValidationError as exc:
        raise TransformError(f"invalid Rilla appointment: {validation_text(exc)}") from None
