"""One validation layer for settings: each config dataclass declares its fields' types and ranges once.

    batch_size: int = setting(256, int, low=2, why="NT-Xent needs other cells as negatives")

`validate(config)` (called from the dataclass's `__post_init__`) checks every declared field,
converts numbers given as text (YAML reads `1e-3` as a string) and raises `SettingError`
naming the field. The caller that knows where a value came from renames it the way the user
typed it: `--batch-size` for a command-line option, `settings.yaml: batch_size` for a key of a
config file (`SettingError.named`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from fastcell.errors import InputError


class SettingError(InputError):
    """A setting with a value of the wrong type or out of its range; `name` is the field."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem

    def named(self, label: str) -> InputError:
        """The same error with the setting called `label` (e.g. `--batch-size`)."""
        return InputError(f"{label} {self.problem}")


@dataclass(frozen=True)
class Check:
    """A field's type (int, float, bool, str, list or dict) and, for numbers, its range."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < value (else low <= value)
    high_open: bool = False
    optional: bool = False  # None is allowed (the setting is unset)
    choices: tuple[str, ...] = ()
    why: str = ""  # said after a range error
    option: str | None = None  # the command-line spelling when it is not --field-name

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"less than {self.high:g}" if self.high_open else f"at most {self.high:g}"

    def apply(self, name: str, value: Any) -> Any:
        """`value` converted to the kind; SettingError when it has the wrong type or range."""
        if value is None:
            if self.optional:
                return None
            raise SettingError(name, "must be set")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SettingError(name, f"must be true or false, got {value!r}")
            return value
        if self.kind in (list, dict):
            if not isinstance(value, self.kind):
                raise SettingError(name, f"must be a {'list' if self.kind is list else 'mapping'}, got {value!r}")
            return value
        if self.kind is str:
            if self.choices and value not in self.choices:
                raise SettingError(name, f"must be one of {', '.join(self.choices)}, got {value!r}")
            if not isinstance(value, str):
                raise SettingError(name, f"must be text, got {value!r}")
            return value
        number = self._number(name, value)
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        above = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if below or above:
            why = f" ({self.why})" if self.why else ""
            raise SettingError(name, f"must be {self.range_text()}{why}, got {value!r}")
        return number

    def _number(self, name: str, value: Any) -> int | float:
        wanted = "an integer" if self.kind is int else "a number"
        if isinstance(value, bool):
            raise SettingError(name, f"must be {wanted}, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise SettingError(name, f"must be {wanted}, got {value!r}") from None
        if not isinstance(number, int | float) or not math.isfinite(number):
            raise SettingError(name, f"must be {wanted}, got {value!r}")
        if self.kind is int:
            if number != int(number):
                raise SettingError(name, f"must be {wanted}, got {value!r}")
            return int(number)
        return float(number)


def setting(default: Any = MISSING, kind: type = int, *, default_factory: Any = MISSING, **check: Any):
    """A dataclass field whose value `validate` checks with `Check(kind, **check)`."""
    metadata = {"check": Check(kind, **check)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def validate(config: Any) -> None:
    """Check (and convert in place) every field of a dataclass declared with `setting`."""
    for f in fields(config):
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(config, f.name, check.apply(f.name, getattr(config, f.name)))


def option_name(config_type: type, name: str) -> str:
    """The command-line spelling of a field: its declared `option`, else `--field-name`."""
    check = next((f.metadata.get("check") for f in fields(config_type) if f.name == name), None)
    return (check.option if check is not None and check.option else None) or f"--{name.replace('_', '-')}"


@contextmanager
def named_as_options(config_type: type):
    """Within it, a SettingError is re-raised naming the field as its command-line option (`--batch-size`)."""
    try:
        yield
    except SettingError as err:
        raise err.named(option_name(config_type, err.name)) from None
