"""Driver side: CLI, configuration loading, the sweep spec, search, tracking (MLflow), Pareto
fronts, export and report.

The modules stand in layers; each imports only modules of its own layer or of the layers above
it in this list (``tests/test_imports.py`` checks it, and that no import, not even one inside a
function, closes a circle). DEVELOPERS.md says what each module holds.
"""

LAYERS = (
    ("leaves", (  # the words every layer uses: fronts, display names, the rule language, objectives
        "pareto", "names", "console", "keys", "rules", "objectives", "spaces")),
    ("the spec", (  # what a sweep (or a run) is asked to do, validated before any work
        "export_file", "spec_sections", "plan", "spec", "config")),
    ("the results", (  # what sweeps recorded in MLflow: read, written, picked, drawn, tabled
        "mlflow_client", "tracking_read", "results", "figures", "replicates", "fronts", "tracking_write",
        "report_tables", "report_formats", "report", "export")),
    ("the run", (  # driving Ray Tune and Optuna: checks, search, locks, trial logging, the sweep
        "search", "locks", "integrity", "preflight", "capacity", "progress", "tracking_callback", "resume",
        "summary", "sweep", "tracking")),
    ("the command line", ("cli",)),
)
