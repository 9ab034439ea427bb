"""How a setting is declared: once, as a dataclass field carrying its default, its check,
its `CHIFFON_*` variable and its help (`setting`). A `Declared` class checks every such
field when it is built, so a built one holds only the types declared; `agent.settings`
gathers the layers (file, environment, flags) over them and `agent.owner` declares the
owner's rules the same way.

Plain dataclasses and hand-written checks rather than pydantic: importing pydantic costs the
agent about 13 MB of its 40 MB budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

MASK = "**********"
MOST_ENTRIES = 64

# Each check takes a value as it arrives (text from the environment and flags, typed values
# from YAML) and returns it converted, or raises ValueError with the reason in plain words.
Check = Callable[[Any], Any]


def seconds(most: float) -> Check:
    """A number of seconds, above 0 and at most `most`."""
    return positive(most)


def count(most: int) -> Check:
    """A whole number from 1 to `most`."""

    def check(value: Any) -> int:
        number = positive(most)(value)
        if number != int(number):
            raise ValueError("must be a whole number")
        return int(number)

    return check


def positive(most: float) -> Check:
    def check(value: Any) -> float:
        # bool is an int to Python, but `interval: yes` in YAML is a mistake, not 1 second.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("must be a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
        if not 0 < number <= most:  # also refuses nan
            raise ValueError(f"must be greater than 0 and at most {most:g}")
        return number

    return check


def text(longest: int | None = None) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if longest is not None and not 1 <= len(value) <= longest:
            raise ValueError(f"must be 1 to {longest} characters")
        return value

    return check


def url(*schemes: str) -> Check:
    def check(value: Any) -> str:
        given: str = text()(value)
        try:
            parts = urlsplit(given)
            usable = parts.scheme in schemes and bool(parts.hostname)
            _ = parts.port  # ValueError when the port is not a number
        except ValueError:
            usable = False
        if not usable:
            raise ValueError("must be a URL starting " + " or ".join(f"{s}://" for s in schemes))
        return given

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("must be " + " or ".join(repr(c) for c in choices))
        return str(value)

    return check


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be true or false")


def names(value: Any) -> list[str]:
    """A list, or comma-separated text (the environment's way)."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    return strings(value)


def lower_names(value: Any) -> list[str]:
    return [name.lower() for name in names(value)]


def gpus(value: Any) -> list[str]:
    """GPUs by index or UUID: `[1]` or `[0, GPU-5d1c...]` in YAML (an index is a number
    there), `0,GPU-5d1c...` in the environment. Kept as text, an index as its digits,
    which is how `agent.owner` compares them."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value]  # `reserve_gpus: 1`: one GPU
    if not isinstance(value, list | tuple):
        raise ValueError(_NOT_GPUS)
    listed = [_gpu(item) for item in value]
    if len(listed) > MOST_ENTRIES:
        raise ValueError(f"must be at most {MOST_ENTRIES} entries")
    return listed


_NOT_GPUS = "must be a list of GPU indexes (0, 1) or UUIDs"


def _gpu(item: Any) -> str:
    if isinstance(item, bool) or not isinstance(item, int | str) or not str(item).strip():
        raise ValueError(_NOT_GPUS)
    if isinstance(item, int) and item < 0:
        raise ValueError(f"{item} is not a GPU index (they start at 0)")
    return str(item).strip()


def strings(value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    if len(value) > MOST_ENTRIES:
        raise ValueError(f"must be at most {MOST_ENTRIES} entries")
    return list(value)


def optional(check: Check) -> Check:
    """None (YAML `null`, as the example file writes it) means unset."""
    return lambda value: None if value is None else check(value)


class Refused(ValueError):
    """A value a `Declared` class refused; `load_settings` adds where it came from.

    `key` is None when the values are each fine but disagree with one another.
    """

    def __init__(
        self, key: str | None, value: object, reason: str, *, secret: bool = False
    ) -> None:
        self.key, self.reason = key, reason
        self.shown = f"'{MASK}'" if secret else repr(value)
        super().__init__(reason if key is None else f"{key} = {self.shown}: {reason}")

    def describe(self, origins: Mapping[str, str]) -> str:
        if self.key is None:
            return f"bad settings: {self.reason}"
        origin = origins.get(self.key, "default")
        return f"bad setting {self.key} = {self.shown} (from {origin}): {self.reason}"


def setting(
    default: Any = MISSING,
    check: Check | None = None,
    *,
    env: str,
    help: str,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
    take: Callable[[Any], Any] | None = None,
) -> Any:
    """A setting, declared once: its default (or `factory`), its `check`, its `CHIFFON_*`
    variable `env`, its `help`; `secret`: masked when refused; `take`: how the part that
    uses it takes the checked value (`agent.owner.OwnerPolicy`)."""
    meta = {"check": check, "env": env, "help": help, "secret": secret, "take": take}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def env_vars(cls: type) -> dict[str, str]:
    """Each declared setting of `cls` and its environment variable."""
    return {spec.name: spec.metadata["env"] for spec in fields(cls) if "env" in spec.metadata}


@dataclass(frozen=True, kw_only=True)
class Declared:
    """Checks (and converts) each declared field when built; `Refused` says which and why."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            check = spec.metadata.get("check")
            if check is None:
                continue
            raw = getattr(self, spec.name)
            try:
                value = check(raw)
            except ValueError as exc:
                secret = bool(spec.metadata.get("secret"))
                raise Refused(spec.name, raw, str(exc), secret=secret) from None
            object.__setattr__(self, spec.name, value)  # frozen: the documented way round
