"""Environment variables as a contract: declaration and strict parsing.

Every ``KURA_*`` variable is declared once as a :class:`Variable`, with its
default (:mod:`kura.config.node`, :mod:`kura.config.access`,
:mod:`kura.config.extension`; :data:`kura.config.node.VARIABLES` lists them
all). A :class:`Reader` parses values from a mapping, falling back on each
variable's default, and collects every problem, so the node can refuse to
start with one message naming all offending variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import attrs


class ConfigError(ValueError):
    """One or more ``KURA_*`` variables are missing or invalid.

    The message names every offending variable, separated by ``"; "``.
    """


T = TypeVar("T")


@attrs.frozen
class Variable(Generic[T]):
    """A documented ``KURA_*`` environment variable.

    Attributes:
        name: the variable's name.
        default: the value a node uses when the variable is unset or blank,
            as parsed (``4000``, ``True``, ``()``); ``None`` when unset means
            "off", or when the default is derived from other settings or the
            host (:attr:`shown` then says how). :class:`Reader` returns it, the
            configuration classes take their attribute defaults from it and
            ``docs/configuration.md`` renders it.
        meaning: what it does (the documentation row).
        section: the documentation section.
        shown: how the documentation states a derived default, instead of
            rendering :attr:`default`.
    """

    name: str
    default: T
    meaning: str
    section: str
    shown: str | None = None

    @property
    def documented_default(self) -> str:
        """The default as ``docs/configuration.md`` shows it."""
        if self.shown is not None:
            return self.shown
        value: object = self.default
        if value is None:
            return "(unset)"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple) and not value:
            return "(empty)"
        return str(value)


class Declarations:
    """Declares variables, keeping them in documentation order.

    Each configuration module declares its variables through one of these;
    :data:`kura.config.node.VARIABLES` joins them in the order the
    documentation lists them.
    """

    def __init__(self) -> None:
        self.variables: list[Variable[Any]] = []

    def __call__(
        self, section: str, name: str, default: T, meaning: str, *, shown: str | None = None
    ) -> Variable[T]:
        """Declare a variable and record it."""
        variable = Variable(
            name=name, default=default, meaning=meaning, section=section, shown=shown
        )
        self.variables.append(variable)
        return variable


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


class Reader:
    """Reads variables from a mapping and collects every problem it finds."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._errors: list[str] = []

    def fail(self, variable: Variable[Any], problem: str) -> None:
        self._errors.append(f"{variable.name} {problem}")

    def raise_if_failed(self) -> None:
        if self._errors:
            raise ConfigError("; ".join(self._errors))

    def _raw(self, variable: Variable[Any]) -> str | None:
        value = self._environ.get(variable.name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def optional_text(self, variable: Variable[Any]) -> str | None:
        """The value as set (surrounding whitespace removed), or ``None`` when unset or blank."""
        return self._raw(variable)

    def text(self, variable: Variable[str]) -> str:
        value = self._raw(variable)
        return variable.default if value is None else value

    def items(self, variable: Variable[Any]) -> list[str]:
        """The non-blank entries of a comma-separated list (none when unset)."""
        return [item.strip() for item in (self._raw(variable) or "").split(",") if item.strip()]

    def optional_integer(
        self, variable: Variable[Any], *, minimum: int = 0, maximum: int | None = None
    ) -> int | None:
        """The value as an integer in range, or ``None`` when unset (or invalid: reported)."""
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
        self, variable: Variable[int], *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        number = self.optional_integer(variable, minimum=minimum, maximum=maximum)
        return variable.default if number is None else number

    def port(self, variable: Variable[int]) -> int:
        return self.integer(variable, minimum=0, maximum=65535)

    def strict_boolean(self, variable: Variable[bool]) -> bool:
        """``true`` or ``false`` only."""
        value = self._raw(variable)
        if value is None:
            return variable.default
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.fail(variable, f"must be 'true' or 'false', got {value!r}")
        return variable.default

    def boolean(self, variable: Variable[bool]) -> bool:
        """Any of ``1/true/yes/on`` and ``0/false/no/off``."""
        value = self._raw(variable)
        if value is None:
            return variable.default
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
        self.fail(variable, f"must be one of {'/'.join(_TRUE_WORDS + _FALSE_WORDS)}")
        return variable.default

    def choice(self, variable: Variable[str], allowed: tuple[str, ...]) -> str:
        value = self.text(variable)
        if value not in allowed:
            self.fail(variable, f"must be one of {', '.join(allowed)}, got {value!r}")
            return variable.default
        return value
