"""The benchmark scripts' shared pieces: their rows land in their own table of the Markdown file a test or a
tiny run names (the real page's rows go to docs/results/, tests/test_docs_page.py), and a bad argument fails
before any work."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import cifar10_small, train_throughput  # noqa: E402
from benchmarks.common import append_rows  # noqa: E402

HEADER = "| date | value |"


def section(name):
    return f"## {name}\n\nSome words.\n\n{HEADER}\n|---|---|\n"


def test_rows_go_to_the_end_of_their_own_table(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    append_rows("## A", section("A"), HEADER, ["| 1 | a1 |"], doc)  # creates the file and the section
    append_rows("## B", section("B"), HEADER, ["| 1 | b1 |"], doc)
    append_rows("## A", section("A"), HEADER, ["| 2 | a2 |", "| 3 | a3 |"], doc)
    lines = doc.read_text().splitlines()
    a, b = lines.index("## A"), lines.index("## B")
    assert a < b and lines.count(HEADER) == 2
    assert [line for line in lines[a:b] if line.startswith("| ") and line != HEADER] == \
        ["| 1 | a1 |", "| 2 | a2 |", "| 3 | a3 |"]
    assert [line for line in lines[b:] if line.startswith("| ") and line != HEADER] == ["| 1 | b1 |"]


def test_a_section_without_its_table_gets_one_at_its_end(tmp_path):
    """A section whose reading was written before any row (no header in it) gets its table at its
    own end, not after a later section's table with the same header."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## A\n\nA reading, no rows yet.\n\n" + section("B"))
    append_rows("## A", section("A"), HEADER, ["| 1 | a1 |"], doc)
    lines = doc.read_text().splitlines()
    a, b = lines.index("## A"), lines.index("## B")
    assert lines[a:b] == ["## A", "", "A reading, no rows yet.", "", HEADER, "|---|---|", "| 1 | a1 |", ""]
    assert not [line for line in lines[b:] if line.startswith("| 1")]


@pytest.mark.parametrize("argv, message", [
    (["--defenses", "bibau_u,nope"], "unknown ['nope']"),
    (["--attacks", "trojannn"], "unknown ['trojannn']"),
    (["--defense-set", "bibau_u"], "expected DEFENSE.KEY=VALUE"),
])
def test_cifar10_small_rejects_bad_arguments_before_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        cifar10_small.main(argv)
    assert message in capsys.readouterr().err


def test_cifar10_small_rejects_a_bad_defense_setting_naming_the_field():
    from trainables.config import ConfigError

    with pytest.raises(ConfigError, match="defense.pgd_eps"):
        cifar10_small.main(["--attacks", "badnets", "--defenses", "bibau_u", "--defense-set", "bibau_u.pgd_eps=2"])


def test_the_done_when_check_reads_the_reports():
    none = {"ca": 0.80, "asr": 0.97, "r_asr": 0.95}
    bibau = {"ca": 0.75, "asr": 0.05, "r_asr": 0.10, "q_asr": 0.30}
    ft = {"ca": 0.79, "asr": 0.90, "r_asr": 0.90}
    kd = {"ca": 0.70, "asr": 0.04, "r_asr": 0.08, "q_asr": 0.05}
    lines = cifar10_small.check({("badnets", "none"): none, ("badnets", "bibau_u"): bibau, ("badnets", "ft"): ft,
                                 ("badnets", "bibau_u_kd"): kd})
    assert "badnets bibau_u ASR 5.0 <= 10.0: PASS" in lines
    assert "badnets bibau_u Q-ASR 30.0 <= 20.0: MISS" in lines
    assert "badnets bibau_u CA drop 5.0 (recorded)" in lines  # the paper's method: any CA drop, recorded
    assert "badnets bibau_u_kd CA drop 10.0 <= 8.0: MISS" in lines  # the extension exists to keep CA
    assert "badnets FT R-ASR 90.0 > bibau_u R-ASR 10.0: PASS" in lines


def test_cifar10_small_takes_its_defenses_from_the_registry():
    from trainables.registry import DEFENSES

    assert cifar10_small.DEFENSES == ("none", *(n for n in DEFENSES.names() if not DEFENSES.get(n).contrastive))
    assert {"nc", "btidbf_u", "anp", "ep", "rnp", "clp"} <= set(cifar10_small.DEFENSES)


def test_baseline_costs_in_epoch_equivalents_and_the_comparisons():
    history = {"attack": [{"epoch": e, "seconds": s} for e, s in enumerate([10.0, 12.0, 11.0], 1)]}
    assert cifar10_small.epoch_seconds({"history": history}) == 11.0

    def rep(defense, seconds, r_asr, q_asr):
        return {"defense": defense, "time_defense_s": seconds, "epoch_seconds": 10.0, "r_asr": r_asr, "q_asr": q_asr}

    reports = {("badnets", "bibau_u"): rep("bibau_u", 100, 0.05, 0.08), ("badnets", "nc"): rep("nc", 300, 0.9, 0.2),
               ("badnets", "clp"): rep("clp", 1, 0.1, 0.12), ("badnets", "ep"): rep("ep", 2, 0.95, 0.5)}
    assert cifar10_small.epochs_equivalent(reports[("badnets", "nc")]) == 30.0
    lines = cifar10_small.compare_baselines(reports)
    assert "badnets nc max(R-ASR, Q-ASR) 90.0 well above BI-BAU(U)'s 8.0: PASS" in lines
    assert "badnets clp max(R-ASR, Q-ASR) 12.0 well above BI-BAU(U)'s 8.0: MISS" in lines
    assert "badnets cost order nc 30.00E, ep 0.20E, clp 0.10E; synthesis > pruning: PASS" in lines


def test_quickstart_time_rejects_a_bad_spec_override_before_starting_the_sweep(tmp_path):
    from benchmarks import quickstart_time
    from trainables.config import ConfigError

    with pytest.raises(ConfigError, match="concurrency"):
        quickstart_time.main(["--storage", str(tmp_path), "--set", "concurrency=0"])
    assert not any(tmp_path.iterdir())  # nothing started


def test_train_throughput_measures_both_pipelines_and_records_a_row(cifar10_archive, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    train_throughput.main(["--device", "cpu", "--images", "200", "--epochs", "1", "--repeats", "1",
                           "--batch-size", "64", "--data", str(cifar10_archive), "--doc", str(doc)])
    out = capsys.readouterr().out
    assert "round 1 loop" in out and "round 1 dataloader" in out and "ratio" in out
    rows = [line for line in doc.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| date")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    loop, dataloader, ratio = float(cells[8]), float(cells[9]), float(cells[10])
    assert loop > 0 and dataloader > 0 and ratio == pytest.approx(loop / dataloader, rel=0.05)


def test_cifar10_small_takes_every_registered_attack_with_its_own_run_file():
    from trainables.registry import ATTACKS

    assert set(cifar10_small.ATTACKS) == {n for n in ATTACKS.names() if ATTACKS.get(n).serves(False)} - {"clean"}
    args = type("Args", (), {"metrics": ["ca", "asr"], "seed": 0, "set": [], "defense_set": [], "full_scale": True})()
    from trainables.config import ConfigError

    for attack in cifar10_small.ATTACKS:
        try:
            cfg = cifar10_small.trial_config(attack, "bibau_u", args)
        except ConfigError as exc:  # Narcissus's POOD set (Tiny-ImageNet) is not on every machine
            assert attack == "narcissus" and "attack.pood" in str(exc), (attack, str(exc))
            continue
        assert cfg.attack.name == attack and cfg.data.train_size == 20000 and cfg.train.epochs == 20
    patch = cifar10_small.trial_config("adaptive_patch", "none", args).attack
    assert (patch.poison_rate, patch.cover_rate) == (0.1, 0.2)  # the BI-BAU paper's 10%, the original's 1:2 cover
    lines = cifar10_small.check({("badnets", "none"): {"ca": 0.80, "asr": 0.97},
                                 ("adaptive_patch", "none"): {"ca": 0.76, "asr": 0.65}})
    assert "adaptive_patch backdoored ASR 65.0 >= 60.0: PASS" in lines
    assert "adaptive_patch backdoored CA 76.0 within 3.0 of BadNets' 80.0: MISS" in lines


def test_quickstart_time_reads_the_attack_stage_timing_from_the_sweep_run(tmp_path):
    import mlflow
    from benchmarks import quickstart_time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("qs", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp, tags={"role": "sweep"})
    for key, value in {"attack_stage_wall_s": 40.0, "attack_stage_tasks_s": 70.0, "attack_stage_parallelism": 1.75,
                       "hypervolume": 0.3}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    contents = quickstart_time.mlflow_contents(uri, "qs")
    assert contents["stage"] == {"attack_stage_wall_s": 40.0, "attack_stage_tasks_s": 70.0,
                                 "attack_stage_parallelism": 1.75}
    assert contents["roles"]["sweep"] == 1


def test_cifar10_small_runs_issue_30s_baselines_with_their_cpu_scale():
    assert {"ibau", "sau", "pam", "fst"} <= set(cifar10_small.DEFENSES)
    assert "epochs=25" in cifar10_small.CPU_SCALE["sau"] and "rounds=3" in cifar10_small.CPU_SCALE["pam"]


def test_unlearning_epoch_cost_tiny_records_the_ratios(tmp_path, capsys):
    from benchmarks import unlearning_epoch_cost

    doc = tmp_path / "benchmarks.md"
    assert unlearning_epoch_cost.main(["--tiny", "--doc", str(doc)]) == 0
    out = capsys.readouterr().out
    assert "SAU / BI-BAU(U) = " in out and "I-BAU / BI-BAU(U) = " in out
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "small_resnet w8" in rows[0]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    header = [c.strip() for c in unlearning_epoch_cost.HEADER.strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["BI-BAU(U) settings"] == "defaults"
    assert 0 < float(row["Fishers s"]) < float(row["BI-BAU(U) s"])  # METHOD's Fishers are part of its epoch
    # an extension's cost is measured beside the method's, and the row says which it was
    assert unlearning_epoch_cost.main(["--tiny", "--doc", str(doc), "--bibau-set", "fisher_estimator=batch"]) == 0
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and "| fisher_estimator=batch |" in rows[1]
    for bad in (["--pgd-steps", "0"], ["--bibau-set", "pgd_steps=3"], ["--bibau-set", "fisher_estimator"]):
        with pytest.raises(SystemExit):
            unlearning_epoch_cost.main(bad)


def test_a_row_names_the_run_overrides_it_ran_with_but_not_where_files_were():
    """A row measured at another width (--set model.width=8) says so in its settings; where the
    cache or data lay does not change what was measured and stays out."""
    import argparse

    args = argparse.Namespace(metrics=["ca", "asr"], seed=0, defense_set=[], full_scale=False,
                              set=["model.width=8", "cache_dir=/tmp/elsewhere"])
    cfg = cifar10_small.trial_config("badnets", "fst", args)
    assert cfg.model.width == 8 and str(cfg.cache_dir) == "/tmp/elsewhere"
    text = cifar10_small.settings("fst", args, cfg)
    assert text.endswith("; run: model.width=8") and "elsewhere" not in text
    args.set = []
    assert "run:" not in cifar10_small.settings("fst", args, cifar10_small.trial_config("badnets", "fst", args))
