"""Name -> function registries for the three real extension points of `align.core`.

Only the advantage estimator, the policy loss and the preference loss are chosen by name from
a config; everything else in `align.core` is a plain function. A new variant is a new function
plus one decorator line, never an `elif loss_type == ...` branch in a trainer:

    PREFERENCE_LOSSES = Registry("preference loss")

    @PREFERENCE_LOSSES.register("sigmoid")
    def dpo_sigmoid_loss(...): ...

    loss_fn = PREFERENCE_LOSSES.get(cfg.loss_type)   # unknown name -> error listing valid ones
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. Both a KeyError (a failed lookup) and a ValueError (a bad
    config value), so callers may catch either."""

    def __str__(self) -> str:  # KeyError would print the repr of the message, quotes and all
        return str(self.args[0])


class Registry:
    """A dict of named functions filled by a decorator, with a duplicate check."""

    def __init__(self, kind: str):
        self.kind = kind  # what the entries are, for error messages: "policy loss"
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that files the function under `name`; a second use of a name is an error."""

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by "
                    f"{self._entries[name].__qualname__}); pick another name"
                )
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        """The function registered as `name`; an unknown name raises `UnknownNameError`."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    __getitem__ = get

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
