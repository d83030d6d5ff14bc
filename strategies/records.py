"""Validated, flat (de)serialisation of the frozen dataclasses the messages carry
(`strategies.protocol`): kebab-case ConfigRecord keys, tuples as comma-joined strings,
nested records under their field's prefix; and the checks that name a bad value's key."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

from flwr.app import ConfigRecord


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ValueError "key=value; allowed: ..." unless `ok`: how every config error reads."""
    if not ok:
        raise ValueError(f"{key}={value!r}; allowed: {allowed}")


def config_key(obj: object, name: str) -> str:
    """The config key a field's value comes from (its `config` metadata)."""
    return next(f.metadata.get("config", name) for f in dataclasses.fields(obj)  # type: ignore[arg-type]
                if f.name == name)


class Record:
    """Flat ConfigRecord (de)serialisation of a frozen dataclass: kebab-case keys, tuples as
    comma-joined strings, nested dataclasses under their field's prefix."""

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, key = getattr(self, f.name), prefix + f.name.replace("_", "-")
            if isinstance(value, Record):
                record.update(value.to_dict(key + "-"))
            elif value is None:
                continue  # an absent optional part
            elif isinstance(value, tuple):  # lists would break ConfigRecord.count_bytes
                record[key] = ",".join(map(str, value))  # str(float) round-trips exactly
            else:
                record[key] = value
        return record

    def to_config(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    @classmethod
    def from_dict(cls, record: Any, prefix: str = "") -> Self:
        """Parse what `to_dict` wrote, naming a missing key; values are validated."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = prefix + f.name.replace("_", "-")
            nested = f.metadata.get("record")
            if nested is not None:
                if f.metadata.get("optional") and not any(k.startswith(key + "-") for k in record):
                    continue
                kwargs[f.name] = nested.from_dict(record, key + "-")
                continue
            if key not in record:
                raise KeyError(f"message config lacks '{key}'")
            value = record[key]
            kwargs[f.name] = tuple(value.split(",")) if f.metadata.get("tuple") else value
        return cls(**kwargs)
