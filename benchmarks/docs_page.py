"""The results page, docs/benchmarks.md, generated from docs/results/.

Each benchmark keeps two files in docs/results/: ``<slug>.jsonl``, its history (one JSON object per
recorded row: ``{"section": heading, "row": {column: cell text}}``, appended by ``common.append_rows``),
and ``<slug>.md``, its notebook (readings, notes, tries, small hand tables; written by people).
``summary.md`` is the hand-written summary table. The page shows the summary, then per benchmark what
it measures, how to run it and its current rows: the newest row per key (``Section.key``), or the
newest ``Section.newest`` rows where no key is declared.

    python benchmarks/docs_page.py                  # regenerate docs/benchmarks.md
    python benchmarks/docs_page.py --check          # exit 1 when the committed page is stale
    python benchmarks/docs_page.py --history SLUG   # every recorded row of one benchmark, as a table
    python benchmarks/docs_page.py --add rows.jsonl # records from a GPU machine's $OUT into the history
    python benchmarks/docs_page.py --migrate        # one-off: split the old notebook page into docs/results/
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
OPTIONS = "options"  # a key part that is no column: the command's settings (see command_options)
# a key part that is no column: what a cifar10_small row ran at besides its script's scale (the settings'
# "run: ..." overrides, e.g. another width), so that a row at another width never stands in for the scale's own
RUN = "run"


@dataclass(frozen=True)
class Section:
    heading: str  # the "## ..." line the scripts pass to append_rows
    slug: str  # docs/results/<slug>.jsonl and .md
    about: str = ""  # one or two sentences: what it measures
    command: str = ""  # how to run it
    key: tuple[str, ...] = ()  # the columns (or OPTIONS) that identify a row; () -> the newest rows
    newest: int = 5  # how many rows without a key


# the page's order: the paper's tables first, then the costs and the machinery
SECTIONS = (
    Section("## Paper scale: one row of Tables 1 and 2 (benchmarks/paper_scale.sh)", "paper-scale",
            "One row of the paper's Tables 1 and 2 at the paper's scale: ResNet-18 on all 50,000 CIFAR-10 images, "
            "BI-BAU(U) at METHOD's defaults and FT, with RA and QRA, beside the paper's numbers.",
            "benchmarks/paper_scale.sh --attack badnets", key=("attack", "model", "row")),
    Section("## CIFAR-10 at CPU scale: Tables 1 and 2 with the baselines (benchmarks/cifar10_small.py)",
            "cifar10-cpu-tables",
            "Tables 1 and 2 at CPU scale: every registered attack on CIFAR-10 (20,000 images, a width-16 ResNet), "
            "purified by BI-BAU and every baseline, measured by CA, ASR, R-ASR, Q-ASR and BEC, with the data each "
            "defense saw and its cost in training epochs; rows run at another width or schedule "
            "say so in their settings (`run: ...`) and stand beside the scale's own.",
            "python benchmarks/cifar10_small.py --attacks A --defenses D --record", key=("attack", "defense", "data", RUN)),
    Section("## CIFAR-10 on clip_vit at CPU scale: Table 3 (benchmarks/clip_vit_cifar10.py)", "clip-vit-table3",
            "Table 3 at CPU scale: BadNets and Blended on a tiny CLIP ViT with a linear head, trained from scratch, "
            "purified by BI-BAU(T), BI-BAU(U) and FT; two reduced scales (the `--set` in the command).",
            "python benchmarks/clip_vit_cifar10.py --record", key=("attack", "defense", OPTIONS)),
    Section("## CLIP, Figure 3 at CPU scale (clip_figure3.py)", "clip-figure3",
            "Figure 3 at CPU scale: a micro CLIP pre-trained on CIFAR-10 captions, backdoored by BadNets and "
            "BadCLIP, purified by CleanCLIP and BI-BAU-CLIP (T and U), measured zero-shot by CA, ASR and R-ASR. "
            "Rows with a `--set` in the command are single tries beside the spec's settings.",
            "python benchmarks/clip_figure3.py --record", key=("attack", "defense", OPTIONS)),
    Section("## BI-BAU's clean-accuracy cost, one factor at a time (benchmarks/bibau_cost.py)", "bibau-cost",
            "BI-BAU(U) on BadNets at the CPU scale with one factor changed per row, to find what its clean-accuracy "
            "cost comes from.",
            "python benchmarks/bibau_cost.py --record", key=("row",)),
    Section("## BI-BAU settings search at CPU scale (benchmarks/cifar10_small.py --defense-set)",
            "bibau-settings-search",
            "The tries (2026-11-23 and 2026-11-28) behind the CPU scale's BI-BAU settings: METHOD's defaults remove "
            "the BadNets backdoor at a large CA cost, and the M-step distillation (today the named extension "
            "`bibau_u_kd`) keeps CA; its tables are hand tables in the notebook.",
            "python benchmarks/cifar10_small.py --attacks badnets --defenses bibau_u --defense-set bibau_u.KEY=VALUE"),
    Section("## CIFAR-10 at CPU scale: Tables 1 and 2 (benchmarks/cifar10_small.py)", "cifar10-cpu-tables-first",
            "The first CPU-scale tables (before the baselines and the data column): BadNets and Blended at ε 16/255, "
            "the paper's method and the M-step-distillation extension rows of 2026-11-28, FT and IBU. Today's "
            "CPU-scale rows are in \"Tables 1 and 2 with the baselines\"; the FT rows here are still the current FT.",
            "python benchmarks/cifar10_small.py --attacks A --defenses D --record", key=("attack", "defense")),
    Section("## Attack stage on CIFAR-10 (bibau run)", "attack-stage",
            "The attack stage alone: `bibau run` on CIFAR-10 (20,000 training images, the small ResNet, 10% poison), "
            "CA and ASR of the backdoored models the CPU-scale tables start from.",
            "OMP_NUM_THREADS=1 bibau run search_spaces/run_badnets_cifar10.yaml", key=("attack",)),
    Section("## Training throughput (benchmarks/train_throughput.py)", "train-throughput",
            "Images per second of the project's training loop (uint8 images on the device, batched augmentation) "
            "against a torchvision DataLoader over PIL images, same model and step; target ratio >= 1 on CPU, >= 3 "
            "on a GPU (there step 1 of `benchmarks/gpu_check.sh`).",
            "python benchmarks/train_throughput.py", key=("device", OPTIONS)),
    Section("## BI-BAU epoch against a training epoch (benchmarks/bibau_epoch.py)", "bibau-epoch",
            "Seconds per BI-BAU(U) epoch at METHOD's full scale (ResNet-18, D_c 2,500, 20 PGD steps) against a plain "
            "training epoch, projected to 20 epochs; goal: under 60 s on one H100 (step 2 of "
            "`benchmarks/gpu_check.sh`).",
            "python benchmarks/bibau_epoch.py --device cuda --budget-s 100", key=("device", "model", OPTIONS)),
    Section("## Fractional GPUs: 4 trials packed on one GPU (benchmarks/gpu_packing.py)", "gpu-packing",
            "The same 4 BI-BAU(U) trials through a sweep at `resources.gpus: 0.25` (4 at a time) and at 1 (one at "
            "a time) on one GPU; ratio = one-at-a-time wall / packed wall (step 3 of `benchmarks/gpu_check.sh`).",
            "python benchmarks/gpu_packing.py", key=("device",)),
    Section("## BI-BAU's Fisher estimators (benchmarks/fisher_estimators.py)", "fisher-estimators",
            "METHOD's per-sample empirical Fisher against the squared mini-batch gradient on the CPU-scale BadNets "
            "model: their cost and how far apart the two Fishers are.",
            "python benchmarks/fisher_estimators.py --attack badnets --record", newest=1),
    Section("## Orchestration overhead (benchmarks/orchestration_overhead.py)", "orchestration-overhead",
            "The same fixed trials through `bibau sweep` and as a plain loop of `run_trial` calls: the sweep's "
            "overhead, target below 10% with trials of at least 30 s.",
            "python benchmarks/orchestration_overhead.py --trials 8 --record", newest=1),
    Section("## Quickstart sweep (benchmarks/quickstart_time.py)", "quickstart-sweep",
            "Wall time of `bibau sweep search_spaces/quickstart.yaml` from a fresh storage folder on 2 cores, and "
            "what it left in MLflow; target under 600 s.",
            "python benchmarks/quickstart_time.py --record", newest=1),
    Section("## Sweep efficiency: the cheap-first gate (benchmarks/sweep_efficiency.py)", "sweep-efficiency",
            "The same BI-BAU(U) study with and without the cheap-first gate (`gate: {ca_drop_max: D}`, after or "
            "during the defense): wall and CPU time saved and the hypervolume kept; target wall <= 0.70 at a "
            "hypervolume within 5%.",
            "OMP_NUM_THREADS=1 python benchmarks/sweep_efficiency.py --record", key=("trials per side", "gate mode")),
)
SUMMARY = "summary.md"
INTRO = """# Benchmarks

The current numbers of the scripts in `benchmarks/`: the summary, then per benchmark what it measures,
how to run it and its newest rows. Every recorded run is kept, one JSON line per row, in
`docs/results/<benchmark>.jsonl`; each benchmark's notebook (its readings, tries and notes, older numbers
included) is `docs/results/<benchmark>.md`, linked under its table.

This page is generated: a script's `--record` appends to the history and rebuilds it, and
`python benchmarks/docs_page.py` rebuilds it by hand. Edit `docs/results/summary.md` and the notebooks,
not this page.
"""
# where a recorded table stood in a notebook (the migration puts it in the table's place)
ROWS_LINE = ("Every recorded run of this benchmark: [{slug}.jsonl]({slug}.jsonl) (`python benchmarks/docs_page.py "
             "--history {slug}` prints it as a table); the newest rows: [the results page](../benchmarks.md).")
# options that say where a run read or wrote, not what it measured
IO_OPTIONS = {"--data", "--doc", "--json", "--out", "--record", "--no-record", "--storage", "--quiet"}


@contextlib.contextmanager
def locked(doc: Path = PAGE):
    """An exclusive lock on the doc's sidecar file: two benchmark jobs may record at once."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    with open(doc.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def results_dir(page: Path = PAGE) -> Path:
    return page.parent / "results"


def slugify(heading: str) -> str:
    words = re.sub(r"\(.*?\)", "", heading.lstrip("#")).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-")[:60].strip("-") or "section"


def declared(heading: str) -> Section | None:
    return next((s for s in SECTIONS if s.heading == heading), None)


def slug_of(heading: str) -> str:
    section = declared(heading)
    return section.slug if section else slugify(heading)


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row (a ``\\|`` inside a cell stays in it)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def join_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def command_options(command: str) -> str:
    """The settings a command ran with: its environment assignments and options, less those that only say
    where it read or wrote (``--doc``, ``--data``, ``--json``, ...)."""
    spans = re.findall(r"`([^`]*)`", command)
    text = spans[0] if spans else command
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    kept, skip, started = [], False, False
    for i, token in enumerate(tokens):
        if skip:  # the value of an option dropped
            skip = False
            continue
        if token.startswith("--"):
            started = True
            if token.split("=", 1)[0] in IO_OPTIONS:
                skip = "=" not in token and i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
                continue
            kept.append(token)
        elif started:  # an option's value
            kept.append(token)
        elif re.match(r"^[A-Z_][A-Z0-9_]*=", token):  # an environment assignment before the command
            kept.append(token)
    return " ".join(kept)


def run_of(row: dict) -> str:
    """The RUN key part: the "run: ..." overrides at the end of a row's settings ("" at the script's scale)."""
    settings = str(row.get("settings", ""))
    return settings.split("; run: ", 1)[1] if "; run: " in settings else ""


def key_of(row: dict, key: tuple[str, ...]) -> tuple:
    return tuple(command_options(row.get("command", "")) if k == OPTIONS else run_of(row) if k == RUN
                 else row.get(k, "") for k in key)


def current_rows(records: list[dict], section: Section) -> list[dict]:
    """The newest row per key, each where its key first appeared (a re-run keeps its place); without a key
    the newest ``section.newest`` rows."""
    rows = [r["row"] for r in records]
    if not section.key:
        return rows[-section.newest:]
    newest: dict = {}
    for row in rows:
        newest[key_of(row, section.key)] = row  # a dict keeps a key where it first went in
    return list(newest.values())


def table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in reversed(rows):  # the newest row's columns first, then any an older shown row has
        columns += [c for c in row if c not in columns]
    return [join_row(columns), "|" + "---|" * len(columns), *(join_row(row.get(c, "") for c in columns) for row in rows)]


def first_sentences(section_text: str, count: int = 2) -> str:
    """A section's own words for the page: the first sentences of its first paragraph of prose."""
    paragraphs = [p for p in section_text.strip().split("\n\n")[1:] if p.strip() and not p.lstrip().startswith("|")]
    if not paragraphs:
        return ""
    text = " ".join(paragraphs[0].split())
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z`*(])", text)
    return " ".join(sentences[:count])


def sections_present(results: Path) -> list[Section]:
    """The declared sections that have a history or a notebook, in the page's order, then the others (a
    section a script created) by slug, described from their notebook."""
    found = [s for s in SECTIONS if (results / f"{s.slug}.jsonl").exists() or (results / f"{s.slug}.md").exists()]
    slugs = {s.slug for s in SECTIONS}
    others = {p.stem for p in results.glob("*.jsonl")} | {p.stem for p in results.glob("*.md")} - {Path(SUMMARY).stem}
    for slug in sorted(others - slugs):
        records = read_history(results / f"{slug}.jsonl")
        notebook = results / f"{slug}.md"
        text = notebook.read_text() if notebook.exists() else ""
        heading = records[0]["section"] if records else "#" + text.splitlines()[0] if text else f"## {slug}"
        command = records[-1]["row"].get("command", "") if records else ""
        spans = re.findall(r"`([^`]*)`", command)
        found.append(Section(heading, slug, first_sentences(text), spans[0] if spans else command))
    return found


def words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def render_section(section: Section, results: Path) -> list[str]:
    records = read_history(results / f"{section.slug}.jsonl")
    lines = [section.heading, ""]
    if section.about:
        lines += [section.about, ""]
    if section.command:
        lines += [f"Run: `{section.command}`", ""]
    links = []
    if (results / f"{section.slug}.md").exists():
        links.append(f"notebook [results/{section.slug}.md](results/{section.slug}.md)")
    if records:
        shown = current_rows(records, section)
        lines += [*table(shown), ""]
        which = (f"the newest for each {words([('command options' if k == OPTIONS else k) for k in section.key])}"
                 if section.key else "the newest" if len(shown) == 1 else f"the newest {len(shown)}")
        links.append(f"every run [results/{section.slug}.jsonl](results/{section.slug}.jsonl) "
                     f"({len(records)} row{'s' * (len(records) != 1)}; shown: {which})")
    else:
        lines += ["No recorded rows: its numbers are in the notebook.", ""]
    text = "; ".join(links) + "."
    lines += [text[0].upper() + text[1:], ""]
    return lines


def render_page(page: Path = PAGE) -> str:
    results = results_dir(page)
    lines = INTRO.splitlines() + [""]
    summary = results / SUMMARY
    if summary.exists():
        lines += summary.read_text().rstrip("\n").splitlines() + [""]
    for section in sections_present(results):
        lines += render_section(section, results)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_page(page: Path = PAGE) -> None:
    page.write_text(render_page(page))


def notebook_from(section_text: str, slug: str) -> str:
    """A new section's notebook from the text its script gives: the heading one level up, its recorded table
    (header and rows) replaced by the pointer to the history."""
    lines = section_text.strip("\n").splitlines()
    if lines and lines[0].startswith("## "):
        lines[0] = lines[0][1:]
    start = next((i for i, line in enumerate(lines) if line.startswith("| date")), None)
    pointer = ROWS_LINE.format(slug=slug)
    if start is None:
        lines += ["", pointer]
    else:
        end = start + 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = [pointer]
    return "\n".join(lines).rstrip("\n") + "\n"


def record(section: str, section_text: str, header: str, rows: list[str], page: Path = PAGE) -> None:
    """Append ``rows`` (markdown table rows under ``header``) to the section's history, creating its notebook
    from ``section_text`` when the section is new. The caller holds the lock."""
    results = results_dir(page)
    results.mkdir(parents=True, exist_ok=True)
    slug = slug_of(section)
    columns = split_row(header)
    out = []
    for line in rows:
        cells = split_row(line)
        if len(cells) != len(columns):
            raise ValueError(f"{section}: a row of {len(cells)} cells under a header of {len(columns)}: {line[:200]}")
        out.append(json.dumps({"section": section, "row": dict(zip(columns, cells))}, ensure_ascii=False))
    notebook = results / f"{slug}.md"
    if not notebook.exists():
        notebook.write_text(notebook_from(section_text, slug))
    with open(results / f"{slug}.jsonl", "a") as f:
        f.write("".join(line + "\n" for line in out))


def add(path: Path, page: Path = PAGE) -> int:
    """Append the records of a JSONL file (a GPU machine's ``$OUT/rows.jsonl``) to their sections' histories."""
    records = read_history(path)
    results = results_dir(page)
    results.mkdir(parents=True, exist_ok=True)
    with locked(page):
        for rec in records:
            with open(results / f"{slug_of(rec['section'])}.jsonl", "a") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        write_page(page)
    return len(records)


def new_since(before: Path, page: Path = PAGE) -> list[dict]:
    """The records added to the histories since ``before``, a copy of the results folder."""
    added = []
    for path in sorted(results_dir(page).glob("*.jsonl")):
        added += read_history(path)[len(read_history(before / path.name)):]
    return added


# ---- the one-off migration of the old notebook page (kept: its test proves no row was lost) ----

def split_notebook(text: str) -> tuple[list[str], list[str], list[tuple[str, list[str], list[str], list[str]]]]:
    """The old page as (preamble lines, summary lines, [(heading, lines, header cells, rows)]), where a
    section's lines hold ROWS_LINE in place of its recorded table (the one whose header starts "| date")."""
    lines = text.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")] + [len(lines)]
    preamble, summary, sections = lines[:starts[0]], [], []
    for a, b in zip(starts, starts[1:]):
        chunk = lines[a:b]
        if chunk[0].startswith("## Current summary"):
            summary = chunk
            continue
        head = next((i for i in range(len(chunk) - 1) if chunk[i].startswith("| date") and chunk[i + 1].startswith("|---")),
                    None)
        header, rows = [], []
        if head is not None:
            end = head + 2
            while end < len(chunk) and chunk[end].startswith("|"):
                end += 1
            header, rows = split_row(chunk[head]), chunk[head + 2:end]
            chunk = chunk[:head] + [ROWS_LINE.format(slug=slug_of(chunk[0]))] + chunk[end:]
        sections.append((chunk[0], chunk, header, rows))
    return preamble, summary, sections


def reassemble(preamble, summary, sections) -> str:
    """The old page back from its parts: the migration's proof that nothing was lost."""
    lines = list(preamble) + list(summary)
    for heading, chunk, header, rows in sections:
        pointer = ROWS_LINE.format(slug=slug_of(heading))
        for line in chunk:
            lines += [join_row(header), "|" + "---|" * len(header), *rows] if line == pointer and header else [line]
    return "\n".join(lines) + "\n"


def migrate(old: Path, page: Path = PAGE) -> dict[str, int]:
    """Split the old notebook page into docs/results/ and write the generated page; {slug: rows moved}."""
    text = old.read_text()
    preamble, summary, sections = split_notebook(text)
    if reassemble(preamble, summary, sections) != text.rstrip("\n") + "\n":
        raise SystemExit("migration: the parts do not give the page back; nothing written")
    results = results_dir(page)
    if any(results.glob("*.jsonl")):
        raise SystemExit(f"migration: {results} already holds histories; nothing written")
    results.mkdir(parents=True, exist_ok=True)
    moved = {}
    for heading, chunk, header, rows in sections:
        slug = slug_of(heading)
        for row in rows:
            if len(split_row(row)) != len(header) or join_row(split_row(row)) != row:
                raise SystemExit(f"migration: a row of {heading} does not survive the round trip: {row[:200]}")
        notebook = [chunk[0][1:]] + chunk[1:]  # "## X" -> "# X": the notebook is a page of its own
        (results / f"{slug}.md").write_text("\n".join(notebook).rstrip("\n") + "\n")
        if rows:
            record(heading, "", join_row(header), rows, page)
        moved[slug] = len(rows)
    if summary:
        (results / SUMMARY).write_text("\n".join(summary).rstrip("\n") + "\n")
    write_page(page)
    return moved


def history_table(slug: str, page: Path = PAGE) -> str:
    records = read_history(results_dir(page) / f"{slug}.jsonl")
    if not records:
        raise SystemExit(f"no history {slug}; known: {', '.join(sorted(p.stem for p in results_dir(page).glob('*.jsonl')))}")
    return "\n".join([records[0]["section"], "", *table([r["row"] for r in records])])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 when docs/benchmarks.md is not the generated page")
    group.add_argument("--history", metavar="SLUG", help="print every recorded row of one benchmark as a table")
    group.add_argument("--add", type=Path, metavar="JSONL", help="append these records to their histories")
    group.add_argument("--new-since", type=Path, metavar="DIR", help="print the records added since DIR, "
                       "a copy of docs/results, as JSONL")
    group.add_argument("--migrate", type=Path, nargs="?", const=PAGE, metavar="OLD_PAGE",
                       help="one-off: split the old notebook page into docs/results/")
    args = ap.parse_args(argv)
    if args.check:
        if PAGE.exists() and PAGE.read_text() == render_page():
            return 0
        print(f"{PAGE.relative_to(ROOT)} is not the generated page: run python benchmarks/docs_page.py", file=sys.stderr)
        return 1
    if args.history:
        print(history_table(args.history))
    elif args.add:
        print(f"added {add(args.add)} rows; {PAGE.relative_to(ROOT)} regenerated")
    elif args.new_since:
        for rec in new_since(args.new_since):
            print(json.dumps(rec, ensure_ascii=False))
    elif args.migrate:
        moved = migrate(args.migrate)
        print(f"migrated {sum(moved.values())} rows in {len(moved)} sections: "
              + ", ".join(f"{slug} {n}" for slug, n in moved.items()))
    else:
        with locked():
            write_page()
        print(f"{PAGE.relative_to(ROOT)} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
