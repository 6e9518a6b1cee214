"""What every benchmark script shares: the machine line and recording rows (into docs/results/, from which
docs/benchmarks.md is generated, or into a Markdown file a test or a tiny run names)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine(device=None) -> str:
    """CPU model, core count, torch threads, OS and torch version (and the GPU's name on CUDA)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"{platform.system()} {platform.release()}, torch {torch.__version__}")
    if device is not None and torch.device(device).type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; " + text
    return text


def start_ray(attempts: int = 3, **kwargs) -> None:
    """A local Ray (``ray.init(**kwargs)``), retried: on a loaded machine the raylet may miss Ray's
    fixed 30 s start-up window."""
    import ray
    from ray._private import services

    # Ray gives the raylet a fixed 30 s to register, asking get_node() in a loop; on a machine
    # loaded far beyond its cores registration takes longer, so each ask waits up to 3 minutes
    if not getattr(services.get_node, "_patient", False):
        ask = services.get_node

        def patient(*args, **kwargs):
            deadline = time.monotonic() + 180
            while True:
                try:
                    return ask(*args, **kwargs)
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2)

        patient._patient = True
        services.get_node = patient
    for i in range(attempts):
        try:
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception on a start-up timeout
            print(f"Ray did not start ({str(exc).splitlines()[0][:120]}); attempt {i + 1}/{attempts}", flush=True)
            ray.shutdown()
    raise SystemExit("Ray did not start")


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "-"


def append_rows(section: str, section_text: str, header: str, rows: list[str], doc: Path = DOC) -> None:
    """Record ``rows`` (Markdown table rows under ``header``) for the benchmark of ``section`` (its heading).

    Into the default ``doc``, the results page, they go as data: appended to the section's history
    (docs/results/<slug>.jsonl; its notebook <slug>.md is made from ``section_text`` when the section is
    new), and the page is regenerated from docs/results/ (``docs_page.py``). Into any other file (a test's,
    a ``--tiny`` run's, ``gpu_check.sh --doc``'s) they go as before, so such runs never touch tracked docs:
    appended to the table under ``section`` whose header row is ``header``, creating the file, or the
    section from ``section_text``, when absent. Two benchmark jobs side by side may record at once: the
    read-modify-write holds an exclusive lock on a sidecar file."""
    from benchmarks import docs_page

    doc = Path(doc)
    with docs_page.locked(doc):
        if doc.resolve() == DOC.resolve():
            docs_page.record(section, section_text, header, rows, doc)
            docs_page.write_page(doc)
        else:
            _append_rows(section, section_text, header, rows, doc)


def _append_rows(section: str, section_text: str, header: str, rows: list[str], doc: Path) -> None:
    if not doc.exists():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text("# Benchmarks\n\nResults of the scripts in `benchmarks/`, one section per script.\n")
    lines = doc.read_text().splitlines()
    if section not in lines:
        lines = ("\n".join(lines).rstrip("\n") + "\n\n" + section_text.strip("\n") + "\n").splitlines()
    start = lines.index(section)
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head = next((i for i in range(start, stop) if lines[i] == header), None)
    if head is None:  # a section written by hand (a reading, no rows yet): its table goes at its end
        while stop > start + 1 and not lines[stop - 1].strip():
            stop -= 1
        lines[stop:stop] = ["", header, "|" + "---|" * (header.count("|") - 1)]
        head = stop + 1
    end = head + 2  # past the header and its |---| line
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[end:end] = rows
    doc.write_text("\n".join(lines) + "\n")
