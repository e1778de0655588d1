"""Environment variables as a contract: declaration and strict parsing.

Every ``KURA_*`` variable is declared once as a :class:`Variable` in the
registry :data:`VARIABLES` (by :mod:`kura.config` and by subsystems with
their own settings, such as :mod:`kura.config.extension`). A :class:`Reader`
parses values from a mapping and collects every problem, so the node can
refuse to start with one message naming all offending variables.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


class ConfigError(ValueError):
    """One or more ``KURA_*`` variables are missing or invalid.

    The message names every offending variable, separated by ``"; "``.
    """


@attrs.frozen
class Variable:
    """A documented ``KURA_*`` environment variable."""

    name: str
    default: str
    meaning: str
    section: str


VARIABLES: list[Variable] = []


def declare(section: str, name: str, default: str, meaning: str) -> Variable:
    """Declare (and register) a variable."""
    variable = Variable(name=name, default=default, meaning=meaning, section=section)
    VARIABLES.append(variable)
    return variable


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


class Reader:
    """Reads variables from a mapping and collects every problem it finds."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._errors: list[str] = []

    def fail(self, variable: Variable, problem: str) -> None:
        self._errors.append(f"{variable.name} {problem}")

    def raise_if_failed(self) -> None:
        if self._errors:
            raise ConfigError("; ".join(self._errors))

    def _raw(self, variable: Variable) -> str | None:
        value = self._environ.get(variable.name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def text(self, variable: Variable, default: str) -> str:
        value = self._raw(variable)
        return default if value is None else value

    def optional_integer(
        self, variable: Variable, *, minimum: int = 0, maximum: int | None = None
    ) -> int | None:
        value = self._raw(variable)
        if value is None:
            return None
        try:
            number = int(value, 10)
        except ValueError:
            self.fail(variable, f"must be an integer, got {value!r}")
            return None
        if number < minimum:
            self.fail(variable, f"must be at least {minimum}, got {number}")
        if maximum is not None and number > maximum:
            self.fail(variable, f"must be at most {maximum}, got {number}")
        return number

    def integer(
        self, variable: Variable, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        number = self.optional_integer(variable, minimum=minimum, maximum=maximum)
        return default if number is None else number

    def port(self, variable: Variable, default: int) -> int:
        return self.integer(variable, default, minimum=0, maximum=65535)

    def strict_boolean(self, variable: Variable, default: bool) -> bool:
        value = self._raw(variable)
        if value is None:
            return default
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.fail(variable, f"must be 'true' or 'false', got {value!r}")
        return default

    def boolean(self, variable: Variable, default: bool) -> bool:
        value = self._raw(variable)
        if value is None:
            return default
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
        self.fail(variable, f"must be one of {'/'.join(_TRUE_WORDS + _FALSE_WORDS)}")
        return default

    def choice(self, variable: Variable, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(variable, default)
        if value not in allowed:
            self.fail(variable, f"must be one of {', '.join(allowed)}, got {value!r}")
            return default
        return value
