"""Names the trial's report, the searcher and the tracking share (a leaf): the report key of a
trial's status, and the Optuna user attrs that link a trial to Tune and to its MLflow run."""

STATUS_KEY = "trial_status"  # what ray_adapters reports: completed | diverged | gated | invalid
TUNE_TRIAL_ATTR = "tune_trial_id"  # Optuna user attrs linking a trial to Tune and MLflow
MLFLOW_RUN_ATTR = "mlflow_run_id"
