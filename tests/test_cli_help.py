"""The CLI helping its user: ``--version``, "did you mean", ``config --fields SECTION=NAME``, a sweep
spec handed to ``bibau run``; ``bibau run``'s progress (bars on a terminal, plain lines elsewhere)
and the sweep's progress line."""
from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from trainables.cache import code_version

    assert capsys.readouterr().out.strip() == f"bibau 0.1.0 (training code {code_version()})"


def test_a_mistyped_subcommand_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["swep", "x.yaml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'swep'" in err and "did you mean 'sweep'?" in err
    with pytest.raises(SystemExit):
        main(["exprot"])
    err = capsys.readouterr().err
    assert "invalid choice: 'exprot'" in err and "did you mean 'export'?" in err


def test_config_fields_of_a_polymorphic_section(capsys):
    assert main(["config", "--fields", "defense=bibau_u", "--fields", "attack=wanet"]) == 0
    out = capsys.readouterr().out.splitlines()
    theta = [line for line in out if line.startswith("defense.theta ")]
    assert theta == [line for line in theta if "(float, default 0.5)" in line and "in [0.0, 1.0]" in line] and theta
    assert any(line.startswith("defense.preset (str, default 'full')") and "base_at" in line for line in out)
    assert any(line.startswith("defense.name (str, default 'bibau_u')") for line in out)
    assert any(line.startswith("attack.") and "wanet" not in line.split(" ")[0] for line in out)
    assert any(line.startswith("attack.name (str, default 'wanet')") for line in out)
    assert not any(line.startswith("defense (") for line in out)
    # without a selection: the common fields, and how to see an implementation's
    assert main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "train.epochs (int, default 15)" in out and "--fields defense=NAME (defenses: anp, " in out
    assert main(["config", "--fields", "defense=bibau"]) == 2
    assert "unknown defense 'bibau'; did you mean 'bibau_t' or 'bibau_u'?" in capsys.readouterr().err
    assert main(["config", "--fields", "defence=ft"]) == 2
    assert "did you mean 'defense'?" in capsys.readouterr().err


def test_a_sweep_spec_given_to_run_says_what_to_do(tmp_path, capsys):
    assert main(["run", str(REPO / "search_spaces" / "quickstart.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "this is a sweep spec" in err and "bibau sweep" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


LINES = ["[trial] digits / small_resnet / attack badnets / defense ft on cpu",
         "[attack] cache miss (k): training small_resnet under badnets on 400 images for 3 epochs on cpu",
         "epoch 1/3 loss 2.0 lr 0.05 1.0s", "epoch 2/3 loss 1.0", "epoch 3/3 loss 0.5", "[attack] trained: CA 0.9",
         "[defense] ft (data: clean_split) on 40 clean images", "ft epoch 1/2: loss=1", "ft epoch 2/2: loss=0.5",
         "[defense] done (1.0s)", "[eval] CA 0.9000, ASR 0.1000", "[eval] qra: running", "[qra] epoch 10/20 loss 0.3",
         "[qra] epoch 20/20 loss 0.2", "[eval] qra: q_asr=0.1000 (3.0s)"]


def test_run_progress_plain_lines_off_a_terminal_bars_on_one(capsys):
    from orchestrator.progress import RunProgress

    plain = io.StringIO()
    log = RunProgress(stream=plain)  # a StringIO is no terminal
    for line in LINES:
        log(line)
    assert not log.bars and plain.getvalue().splitlines() == LINES
    shown = io.StringIO()
    log = RunProgress(stream=shown, bars=True)
    for line in LINES:
        log(line)
    log.close()
    text = shown.getvalue().splitlines()
    assert "[attack] trained: CA 0.9" in text and "[eval] qra: q_asr=0.1000 (3.0s)" in text
    assert not any(re.search(r"epoch \d+/\d+", line) for line in text)  # the bars show the epochs
    bars = capsys.readouterr().err  # tqdm draws on stderr
    for desc, done in (("training", "3/3"), ("defense ft", "2/2"), ("eval qra", "20/20")):
        assert f"{desc}: 100%" in bars and done in bars, desc
    assert "eval qra: running" in bars


def test_a_bar_shows_no_rate_before_it_timed_a_step_and_plain_output_asks_for_no_colour(capsys, monkeypatch):
    import os

    from orchestrator.progress import RunProgress, plain_output

    log = RunProgress(stream=io.StringIO(), bars=True)
    log("[attack] cache miss (k): training small_resnet under badnets")
    log("[train] epoch 1/5: loss 2.0")
    first = capsys.readouterr().err
    assert "1/5" in first and not re.search(r"epoch/s|s/epoch|<", first), first  # no rate, no time left
    time.sleep(0.2)
    log("[train] epoch 2/5: loss 1.0")
    later = capsys.readouterr().err
    log.close()
    assert "2/5" in later and re.search(r"\d+(\.\d+)?(epoch/s|s/epoch)", later), later
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    assert plain_output(io.StringIO())
    assert os.environ["NO_COLOR"] == "1" and os.environ["RAY_COLOR_PREFIX"] == "0"


def test_sweep_progress_line():
    from orchestrator.tracking import progress_line

    assert progress_line(3, 12, 2, 1, 90.0, 3) == "[sweep] 3/12 done, 2 running, failed 1, ETA 4m30s"
    assert progress_line(12, 12, 0, 0, 10.0, 12).endswith("ETA 0s")
    assert progress_line(0, 12, 2, 0, 5.0, 0).endswith("ETA ?")
    assert progress_line(2, 10, 1, 0, 3600.0, 1) == "[sweep] 2/10 done, 1 running, failed 0, ETA 8h00m"
