"""One registry per kind (dataset, model, attack, defense, evaluation).

Implementations register themselves with a decorator (timm's ``register_model``) and are
looked up by name; an unknown name lists the known ones (and the closest, "did you mean"),
a duplicate name is an error.

Other installed packages add implementations without forking this one, through the entry
point groups ``bibau.attacks``, ``bibau.defenses``, ``bibau.models``, ``bibau.datasets`` (and
``bibau.evaluations``): each entry point names a module whose decorators register what it
holds, or an object registered under the entry point's name. A registry loads its group the
first time it is asked for a name; a plugin that fails to load is reported with the name that
needed it, never silently dropped.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, known: list[str]) -> str:
    """`` did you mean 'x'?`` for the closest known name, or nothing. Names the given one begins (a family:
    'bibau' -> 'bibau_t' or 'bibau_u') come before the closest spelling ('ibau'), the two shortest."""
    family = sorted((k for k in known if k.startswith(str(name)) and k != name), key=lambda k: (len(k), k))[:2]
    if family:
        return " did you mean " + " or ".join(repr(k) for k in family) + "?"
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


class UnknownNameError(KeyError):
    """A look-up by a name nobody registered."""

    def __init__(self, kind: str, name: str, known: list[str], note: str = ""):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r};{did_you_mean(name, known)} known: {', '.join(known) or '(none)'}"
                         + (f" ({note})" if note else ""))

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group or f"bibau.{kind}s"  # the entry point group other packages register in
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False
        self.plugin_errors: dict[str, str] = {}  # entry point name -> why it did not load

    def load_plugins(self, force: bool = False) -> None:
        """Import the entry points of ``self.group`` once (``force``: look again, e.g. after an install)."""
        if self._plugins_loaded and not force:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            if ep.name in self._entries and not force:
                continue
            try:
                obj = ep.load()
                if ep.name not in self._entries and callable(obj):  # an object, not a module that registered
                    self.register(ep.name)(obj)
                self.plugin_errors.pop(ep.name, None)
            except Exception as exc:  # one broken plugin must not take the built-ins down with it
                where = f"{ep.dist.name} " if getattr(ep, "dist", None) is not None else ""
                self.plugin_errors[ep.name] = f"plugin {where}entry point {ep.name} = {ep.value} in {self.group} " \
                                              f"failed to load: {type(exc).__name__}: {exc}"

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
        self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names(), self.plugin_errors.get(name, "")) from None

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)


DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
ATTACKS: Registry = Registry("attack")
DEFENSES: Registry = Registry("defense")
EVALUATIONS: Registry = Registry("evaluation")
