"""One registry per kind (dataset, model, attack, defense, evaluation).

Implementations register themselves with a decorator (timm's ``register_model``) and are
looked up by name; an unknown name lists the known ones, a duplicate name is an error.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A look-up by a name nobody registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            # obj.__dict__, not getattr: a subclass must not inherit its parent's name
            own = obj.__dict__.get("name") if isinstance(obj, type) else None
            key = name or own or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            if isinstance(obj, type):
                obj.name = key  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
ATTACKS: Registry = Registry("attack")
DEFENSES: Registry = Registry("defense")
EVALUATIONS: Registry = Registry("evaluation")
