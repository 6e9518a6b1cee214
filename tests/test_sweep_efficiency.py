"""The sweep-efficiency benchmark's leak check: a gated trial that carries an R-ASR or Q-ASR in any
of the places a researcher reads (MLflow metrics, the trial's results.json, Tune's result.json) is
reported; one that carries only CA and ASR is not."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.sweep_efficiency import leaks  # noqa: E402


def _sweep(tmp_path: Path, results: dict, tune_lines: list[dict], metrics: dict) -> SimpleNamespace:
    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    (trial / "results.json").write_text(json.dumps(results, indent=2))  # one document over many lines
    tune = tmp_path / "tune" / "run_t1"
    tune.mkdir(parents=True)
    (tune / "result.json").write_text("".join(json.dumps(line) + "\n" for line in tune_lines))
    record = SimpleNamespace(status="gated", metrics=metrics, trial_id="t1")
    return SimpleNamespace(folder=tmp_path, records=[record])


def test_a_clean_gated_trial_is_not_a_leak(tmp_path):
    out = _sweep(tmp_path, {"ca": 0.2, "asr": 0.9, "status": "gated"}, [{"ca": 0.2}], {"ca": 0.2, "asr": 0.9})
    assert leaks(out) == []


def test_r_asr_in_the_multiline_results_json_is_a_leak(tmp_path):
    out = _sweep(tmp_path, {"ca": 0.2, "r_asr": 0.5}, [{"ca": 0.2}], {"ca": 0.2})
    assert leaks(out) == ["t1: results"]


def test_q_asr_in_tunes_result_lines_or_mlflow_is_a_leak(tmp_path):
    out = _sweep(tmp_path, {"ca": 0.2}, [{"ca": 0.2}, {"q_asr": 0.1}], {"ca": 0.2, "q_asr": 0.1})
    assert leaks(out) == ["t1: MLflow", "t1: results"]


def test_both_evaluation_modes_give_a_valid_spec_and_protocol_keeps_ra_qra_defaults(tmp_path):
    import yaml

    from benchmarks.sweep_efficiency import spec
    from orchestrator.spec import load_spec
    from trainables.schema import EvalConfig

    for protocol in (False, True):
        path = tmp_path / f"p{protocol}.yaml"
        path.write_text(yaml.safe_dump(spec(tmp_path / "store", 12, False, 0.3, gate=0.2, protocol=protocol)))
        _, plan = load_spec(str(path))
        evaluation = plan.studies[0].config["evaluation"]
        reduced = {"ra_size": 200, "ra_epochs": 5, "qra_epochs": 20, "qra_clean_size": 100, "qra_poison_size": 100,
                   "qra_hidden": 256}
        for key, value in reduced.items():
            expected = getattr(EvalConfig, key) if protocol else value
            assert evaluation.get(key, getattr(EvalConfig, key)) == expected, (protocol, key)
