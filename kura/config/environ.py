"""Environment variables as a contract: declaration and strict parsing.

Every ``KURA_*`` variable is declared once as a :class:`Variable`, with its
default (:mod:`kura.config.node`, :mod:`kura.config.access`,
:mod:`kura.config.extension`; :data:`kura.config.node.VARIABLES` lists them
all). A :class:`Reader` parses values from a mapping, falling back on each
variable's default, and collects every problem, so the node can refuse to
start with one message naming all offending variables.

One grammar for every variable of a kind:

* **booleans**: ``1/true/yes/on`` and ``0/false/no/off``, any case;
* **durations** (names ending ``_MS``): milliseconds, or a number with a
  unit: ``250ms``, ``30s``, ``5m``, ``1h``, ``1.5s``;
* **sizes** (names with ``_BYTES``): bytes, or a number with a unit:
  ``KiB/MiB/GiB/TiB`` (also ``Ki/Mi/Gi/Ti``, as Kubernetes writes them) are
  powers of 1024, ``KB/MB/GB/TB`` (``K/M/G/T``) powers of 1000, ``B`` bytes.

:func:`unknown_variables` names ``KURA_*`` variables nobody reads (a typo,
with the closest known name), leaving out the ones Kubernetes injects for a
Service named ``kura...`` (service links).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
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

_MS_PER_UNIT = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_BYTES_PER_UNIT = {
    "b": 1,
    **{f"{p}": 1000**n for n, p in enumerate("kmgt", start=1)},
    **{f"{p}b": 1000**n for n, p in enumerate("kmgt", start=1)},
    **{f"{p}i": 1024**n for n, p in enumerate("kmgt", start=1)},
    **{f"{p}ib": 1024**n for n, p in enumerate("kmgt", start=1)},
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)$")
#: What Kubernetes injects for a Service named ``kura`` or ``kura-...``
#: (``KURA_SERVICE_HOST``, ``KURA_PORT_4000_TCP_ADDR`` ...): not typos.
_SERVICE_LINK = re.compile(
    r"^KURA_(?:\w+_)?(?:SERVICE_(?:HOST|PORT)(?:_\w+)?|PORT_\d+_(?:TCP|UDP|SCTP)(?:_\w+)?)$"
)
#: A service link's value for ``<NAME>_PORT`` (``tcp://10.0.0.7:4000``).
_SERVICE_LINK_VALUE = re.compile(r"^(?:tcp|udp|sctp)://")


def units_of(name: str) -> dict[str, int] | None:
    """The units a variable's integer may carry, by naming convention (``None``: none)."""
    if name.endswith("_MS"):
        return _MS_PER_UNIT
    if "_BYTES" in name:
        return _BYTES_PER_UNIT
    return None


def unknown_variables(environ: Iterable[str], known: Iterable[str]) -> list[str]:
    """One warning per ``KURA_*`` name in ``environ`` that no declaration reads.

    Kubernetes service-link names are left out; a typo names the closest
    known variable.
    """
    names = set(known)
    warnings = []
    for name in sorted(environ):
        if not name.startswith("KURA_") or name in names or _SERVICE_LINK.match(name):
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a kura variable and is ignored{hint}")
    return warnings


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
        """The value as an integer in range, or ``None`` when unset (or invalid: reported).

        Durations and sizes may carry a unit (see the module docstring).
        """
        value = self._raw(variable)
        if value is None:
            return None
        number = self._quantity(variable, value)
        if number is None:
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

    def _quantity(self, variable: Variable[Any], value: str) -> int | None:
        try:
            return int(value, 10)
        except ValueError:
            pass
        units = units_of(variable.name)
        match = _QUANTITY.match(value)
        if units is not None and match is not None and match.group(2).lower() in units:
            scaled = float(match.group(1)) * units[match.group(2).lower()]
            if scaled.is_integer():
                return int(scaled)
        if units is _MS_PER_UNIT:
            expected = "a duration in milliseconds or with a unit (250ms, 30s, 5m, 1h)"
        elif units is _BYTES_PER_UNIT:
            expected = "a size in bytes or with a unit (512MiB, 4KiB, 1GiB, 10MB)"
        else:
            expected = "an integer"
        self.fail(variable, f"must be {expected}, got {value!r}")
        return None

    def port(self, variable: Variable[int]) -> int:
        value = self._raw(variable)
        if value is not None and _SERVICE_LINK_VALUE.match(value):
            self.fail(
                variable,
                f"is {value!r}, which Kubernetes injects for a Service of that name (service "
                "links): set enableServiceLinks: false on the pod, or set the port explicitly",
            )
            return variable.default
        return self.integer(variable, minimum=0, maximum=65535)

    def boolean(self, variable: Variable[bool]) -> bool:
        """Any of ``1/true/yes/on`` and ``0/false/no/off``."""
        value = self._raw(variable)
        if value is None:
            return variable.default
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
        self.fail(variable, f"must be one of {'/'.join(_TRUE_WORDS + _FALSE_WORDS)}, got {value!r}")
        return variable.default

    def set_but_blank(self, variable: Variable[Any]) -> bool:
        """Whether the variable is present with nothing but whitespace in it."""
        value = self._environ.get(variable.name)
        return value is not None and not value.strip()

    def choice(self, variable: Variable[str], allowed: tuple[str, ...]) -> str:
        value = self.text(variable)
        if value not in allowed:
            self.fail(variable, f"must be one of {', '.join(allowed)}, got {value!r}")
            return variable.default
        return value
