"""``bibau``: the command line. Each subcommand is an ``add_<name>(subparsers)`` function that
declares its parser and a ``cmd_<name>(args) -> int`` that does the work; ``SUBCOMMANDS``
lists the former. A :class:`ConfigError` ends any of them with its message on stderr and exit
code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from trainables.config import ConfigError


def _log(message: str) -> None:
    print(message, flush=True)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that reads a run config shares."""
    parser.add_argument("config", nargs="?", help="run config YAML, or an export written by 'bibau export' "
                        "(omitted: the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set train.epochs=3 (value parsed as YAML; repeatable)")
    parser.add_argument("--attack", help="export files: the attack whose selection to run")
    parser.add_argument("--defense", help="export files: the defense whose selection to run, when an attack has several")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a fast end-to-end check: a few hundred images, one epoch, small evaluations")


def _load(args: argparse.Namespace):
    from .config import load_run_config

    return load_run_config(args.config, args.overrides, args.smoke_test, attack=args.attack, defense=args.defense)


# -- bibau run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from trainables.trial import resolved_yaml, run_trial

    from .preflight import check_run

    cfg = _load(args)  # every config error surfaces here, before any data is read
    if args.print_config:
        print(resolved_yaml(cfg), end="")
        return 0
    out = Path(args.out) if args.out else Path("runs") / (
        f"{cfg.attack.name}-{cfg.defense.name if cfg.defense else 'none'}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run(cfg, out=out, out_field="--out" if args.out else "--out (default runs/)")  # before any training
    from .progress import RunProgress

    progress = RunProgress()  # bars per stage on a terminal, the plain lines elsewhere
    try:
        report = run_trial(cfg, out, log=progress, smoke_test=args.smoke_test)
    finally:
        progress.close()
    _log(f"results: {out / 'results.json'} (CA {report['ca']:.4f}, ASR {report['asr']:.4f}, "
         f"{report['wall_time_s']:.1f}s)")
    return 0


def add_run(subparsers) -> None:
    p = subparsers.add_parser("run", help="train a model under an attack (then defend and evaluate it, if configured)",
                              description="Run one trial: data -> attack (cached) -> defense -> evaluation. Writes "
                              "config.yaml, results.json and the model checkpoints to --out.")
    add_config_options(p)
    p.add_argument("--out", help="output folder (default: runs/<attack>-<defense or none>-<timestamp>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_run)


# -- bibau config --------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    if args.fields is not None:
        for key, type_name, default, text in field_rows(args.fields):
            print(f"{key} ({type_name}, default {default!r}): {text}")
        return 0
    from trainables.defenses import build_defense
    from trainables.trial import resolved_yaml

    cfg = _load(args)
    print(resolved_yaml(cfg), end="")
    if cfg.defense is not None:  # the terms the defense computes, resolved (presets, extensions)
        print("".join(f"# {line}\n" for line in [f"defense {cfg.defense.name}:", *build_defense(cfg.defense).describe()]),
              end="")
    return 0


def field_rows(selections: list[str]) -> list[tuple[str, str, object, str]]:
    """(key, type, default, help with the allowed range) of every run config field; a ``SECTION=NAME``
    selection (``defense=bibau_u``, ``attack=wanet``) lists that implementation's own fields in
    place of its polymorphic section's base fields."""
    import dataclasses

    from trainables.config import describe
    from trainables.registry import did_you_mean
    from trainables.schema import RunConfig

    polymorphic = {f.name: f.metadata["registry"] for f in dataclasses.fields(RunConfig)
                   if f.metadata.get("registry") is not None}
    chosen: dict[str, str] = {}
    for item in selections:
        if not item:
            continue
        section, _, name = item.partition("=")
        if section not in polymorphic or not name:
            raise ConfigError(f"--fields {item}: expected SECTION=NAME with SECTION one of "
                              f"{', '.join(sorted(polymorphic))}{';' + did_you_mean(section, sorted(polymorphic)) if section not in polymorphic else ''}")
        reg = polymorphic[section]
        if name not in reg:
            from trainables.registry import UnknownNameError

            raise ConfigError(f"--fields {item}: {UnknownNameError(reg.kind, name, reg.names(), reg.plugin_errors.get(name, ''))}")
        chosen[section] = name
    rows = []
    for row in describe(RunConfig):
        section = row[0].split(".", 1)[0]
        if section in chosen:
            impl = polymorphic[section].get(chosen[section])
            rows += [(key, t, chosen[section] if key == f"{section}.name" else default, text)
                     for key, t, default, text in describe(getattr(impl, "Config"), section)]
        else:
            rows.append(row)
    missing = [s for s in polymorphic if s not in chosen]
    if missing:
        rows.append(("# " + ", ".join(missing), "polymorphic", None,
                     "their fields depend on the name; list them with " + " ".join(
                         f"--fields {s}=NAME ({polymorphic[s].kind}s: {', '.join(polymorphic[s].names())})"
                         for s in missing)))
    return rows


def add_config(subparsers) -> None:
    p = subparsers.add_parser("config", help="print the resolved run config (defaults < YAML < --set)")
    add_config_options(p)
    p.add_argument("--fields", nargs="?", const="", action="append", metavar="SECTION=NAME",
                   help="list every field with its type, default, allowed range and meaning, then exit; "
                   "--fields defense=bibau_u (or attack=wanet) lists that implementation's fields (repeatable)")
    p.set_defaults(func=cmd_config)


# -- the entry point -----------------------------------------------------------------------------

def add_sweep(subparsers) -> None:  # the sweep system lives in sweep.py / export.py
    from .sweep import add_sweep as add

    add(subparsers)


def add_export(subparsers) -> None:
    from .export import add_export as add

    add(subparsers)


def add_report(subparsers) -> None:  # tables and figures from what sweeps recorded: report.py, figures.py
    from .report import add_report as add

    add(subparsers)


SUBCOMMANDS = [add_run, add_config, add_sweep, add_export, add_report]


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped subcommand or choice."""

    def error(self, message: str):
        import re

        from trainables.registry import did_you_mean

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            guess = did_you_mean(m.group(1), [c.strip().strip("'") for c in m.group(2).split(",")])
            message += f";{guess}" if guess else ""
        super().error(message)


class _Version(argparse.Action):
    """``--version``, computed only when asked (it hashes the training sources)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from trainables.cache import code_version, package_version

        print(f"bibau {package_version()} (training code {code_version()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bibau", description="Backdoor removal sweeps: attacks, defenses "
                    "(BI-BAU and baselines), evaluation by CA, ASR, R-ASR, Q-ASR and BEC.")
    parser.add_argument("--version", action=_Version, help="print the version (and the training code's hash) and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def log_dir() -> Path:
    return Path(os.environ.get("BIBAU_LOG_DIR") or Path.home() / ".cache" / "bibau" / "logs")


def _write_crash_log(command: str, argv: Sequence[str] | None) -> Path | None:
    """The traceback of an unexpected error, in a file the one-line message points to."""
    import traceback

    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"bibau-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(f"bibau {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
                            + traceback.format_exc())
            return path
        except OSError:
            continue
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .progress import plain_output

    plain_output()  # no ANSI codes in a log file or a pipe
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        # a refusal that is no input error (a sweep another driver runs) says what it is
        print(f"bibau {args.command}: {getattr(exc, 'label', 'config error')}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bibau {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not an input error: one line here, the traceback in a file
        path = _write_crash_log(args.command, argv)
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"bibau {args.command}: unexpected error: {type(exc).__name__}: {first}"
              + (f" (traceback in {path})" if path else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
