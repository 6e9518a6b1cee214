"""Loading a trial's configuration: dataclass defaults < YAML file < ``--set key=value``.

The file is either a run config (the sections of ``RunConfig``) or an export written by
``bibau export``, from which one selection's config is taken. Every error is a
:class:`ConfigError` naming the field, raised before any work starts.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from trainables.config import ConfigError, build, load_yaml, merge, parse_overrides
from trainables.schema import RunConfig

from .export_file import EXPORT_KIND, EXPORT_VERSION


def _label(selection: Mapping) -> str:
    return f"{selection.get('attack')}/{selection.get('defense') or 'none'}"


def select_from_export(doc: Mapping, path: str, attack: str | None = None, defense: str | None = None) -> dict:
    """The config of the one selection of an export file that ``attack`` (and ``defense``) pick."""
    if doc.get("version") != EXPORT_VERSION:
        raise ConfigError(f"{path}: version: {doc.get('version')!r} is not supported; allowed: {EXPORT_VERSION}")
    unknown = [k for k in doc if k not in ("kind", "version", "selections")]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; allowed keys: kind, version, selections")
    selections = doc.get("selections")
    if not isinstance(selections, list) or not selections:
        raise ConfigError(f"{path}: selections: expected a non-empty list of selections")
    for i, s in enumerate(selections):
        if not isinstance(s, Mapping) or not isinstance(s.get("config"), Mapping):
            raise ConfigError(f"{path}: selections[{i}].config: expected the mapping of a run config")
    chosen = [s for s in selections if attack is None or s.get("attack") == attack]
    chosen = [s for s in chosen if defense is None or (s.get("defense") or "none") == defense]
    if len(chosen) != 1:
        choices = ", ".join(_label(s) for s in selections)
        if not chosen:
            asked = "/".join(x for x in (attack, defense) if x)
            raise ConfigError(f"{path}: no selection for {asked!r}; choices (attack/defense): {choices}")
        flag = "--attack NAME" if attack is None else "--defense NAME"
        raise ConfigError(f"{path}: {len(chosen)} selections match; pick one with {flag}; "
                          f"choices (attack/defense): {choices}")
    return dict(chosen[0]["config"])


def load_run_config(path: str | None, overrides: Sequence[str] = (), smoke_test: bool = False, *,
                    attack: str | None = None, defense: str | None = None) -> RunConfig:
    """The validated ``RunConfig``: defaults, then the YAML file at ``path`` (a run config or an
    export, where ``attack``/``defense`` choose the selection), then ``overrides``
    (``["train.epochs=3", ...]``, values parsed as YAML); ``smoke_test`` shrinks it last."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
        if data.get("kind") == EXPORT_KIND:
            data = select_from_export(data, path, attack, defense)
        elif isinstance(data, dict) and {"base", "attacks", "defenses"} & set(data):
            found = ", ".join(sorted({"base", "attacks", "defenses"} & set(data)))
            raise ConfigError(f"{path}: this is a sweep spec (it has {found}), not a run config; run it with "
                              f"'bibau sweep {path}' (--smoke-test for a quick check), or run one of its "
                              "trials from the export a sweep writes: 'bibau run EXPORT.yaml --attack NAME'")
        elif attack is not None or defense is not None:
            raise ConfigError(f"{path}: --attack/--defense choose a selection of an export file; this is a run "
                              "config (use --set attack.name=... instead)")
    cfg = build(RunConfig, merge(data, parse_overrides(list(overrides))))
    if smoke_test:
        from trainables.trial import smoke_config

        cfg = smoke_config(cfg)
    return cfg
