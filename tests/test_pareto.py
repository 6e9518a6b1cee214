"""Pareto fronts and hypervolumes (orchestrator/pareto.py): pure functions, no Ray or MLflow."""
import itertools
import math
import random

import numpy as np
import pytest

from orchestrator.pareto import (TrialRecord, dominates, front_of, growth, hypervolume, hypervolume_curve,
                                 non_dominated_sort, pareto_front, pareto_mask)

MODES = ["max", "min", "min"]  # ca, r_asr, q_asr
REF = [0.0, 1.0, 1.0]


def naive_front(points, modes):
    """The definition, spelled out: no other point is at least as good everywhere and better somewhere."""
    def better_eq(a, b, m):
        return a >= b if m == "max" else a <= b

    keep = []
    for i, p in enumerate(points):
        dominated = any(
            all(better_eq(q[k], p[k], m) for k, m in enumerate(modes)) and any(q[k] != p[k] for k in range(len(modes)))
            for j, q in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return keep


def test_dominates_respects_each_objectives_direction():
    assert dominates((0.9, 0.1, 0.1), (0.8, 0.1, 0.1), MODES)  # higher CA, equal ASRs
    assert dominates((0.8, 0.05, 0.1), (0.8, 0.1, 0.1), MODES)  # lower R-ASR
    assert not dominates((0.8, 0.1, 0.1), (0.8, 0.1, 0.1), MODES)  # equal: neither dominates
    assert not dominates((0.9, 0.5, 0.1), (0.8, 0.1, 0.1), MODES)  # a trade-off
    assert not dominates((0.8, 0.1, 0.1), (0.9, 0.1, 0.1), MODES)


def test_front_and_ranks_with_ties_and_mixed_modes():
    pts = [
        (0.90, 0.50, 0.40),  # 0: best CA, front
        (0.80, 0.10, 0.20),  # 1: front
        (0.80, 0.20, 0.20),  # 2: dominated by 1 (rank 1)
        (0.90, 0.50, 0.40),  # 3: identical to 0, so on the front too
        (0.70, 0.10, 0.20),  # 4: dominated by 1
        (0.60, 0.05, 0.30),  # 5: lowest R-ASR, front
        (0.60, 0.30, 0.50),  # 6: dominated by 2 and 4 as well -> rank 2
    ]
    assert pareto_front(pts, MODES) == [0, 1, 3, 5]
    ranks = non_dominated_sort(pts, MODES)
    assert ranks == [0, 0, 1, 0, 1, 0, 2]
    # every point of rank r+1 is dominated by some point of rank r
    for i, r in enumerate(ranks):
        if r > 0:
            assert any(ranks[j] == r - 1 and dominates(pts[j], pts[i], MODES) for j in range(len(pts)))


def test_front_matches_the_definition_on_random_points_and_mode_flips():
    rng = random.Random(0)
    for trial in range(40):
        d = rng.choice([2, 3])
        # coarse values make ties frequent
        pts = [tuple(round(rng.random(), 1) for _ in range(d)) for _ in range(rng.randint(1, 30))]
        modes = [rng.choice(["max", "min"]) for _ in range(d)]
        assert pareto_front(pts, modes) == naive_front(pts, modes)
        # maximising x is minimising -x
        flipped = [tuple(-v if m == "max" else v for v, m in zip(p, modes)) for p in pts]
        assert pareto_mask(pts, modes) == pareto_mask(flipped, ["min"] * d)


def test_hypervolume_by_hand_in_2d():
    # maximise ca, minimise r_asr; reference (ca=0, r_asr=1)
    pts = [(0.8, 0.2), (0.5, 0.1), (0.4, 0.5)]  # the last is dominated
    # union of [0,0.8]x[0.2,1] (0.64) and [0,0.5]x[0.1,1] (0.45), overlap [0,0.5]x[0.2,1] (0.40)
    assert hypervolume(pts, ["max", "min"], [0.0, 1.0]) == pytest.approx(0.64 + 0.45 - 0.40)
    assert hypervolume([], ["max", "min"], [0.0, 1.0]) == 0.0
    assert hypervolume([(0.0, 0.5)], ["max", "min"], [0.0, 1.0]) == 0.0  # no better than the reference in CA


def test_hypervolume_agrees_with_optunas_independent_implementation():
    from optuna._hypervolume import compute_hypervolume

    rng = random.Random(1)
    for d in (2, 3, 4):
        for _ in range(10):
            pts = [[rng.random() for _ in range(d)] for _ in range(rng.randint(1, 20))]
            modes = ["max"] + ["min"] * (d - 1)
            ref = [0.0] + [1.0] * (d - 1)
            as_min = np.array([[-p[0]] + p[1:] for p in pts])
            expected = compute_hypervolume(as_min, np.array([0.0] + [1.0] * (d - 1)))
            assert hypervolume(pts, modes, ref) == pytest.approx(expected, abs=1e-12)


def test_hypervolume_grows_monotonically_and_only_with_non_dominated_points():
    rng = random.Random(2)
    pts = [(rng.random(), rng.random(), rng.random()) for _ in range(25)]
    curve = hypervolume_curve(pts, MODES, REF)
    assert all(b >= a - 1e-15 for a, b in itertools.pairwise(curve))
    assert curve[-1] == pytest.approx(hypervolume(pts, MODES, REF))
    for k in range(1, len(pts)):
        new_on_front = pareto_mask(pts[: k + 1], MODES)[k]
        if new_on_front and pts[k] not in pts[:k]:
            assert curve[k] > curve[k - 1]
        else:
            assert curve[k] == pytest.approx(curve[k - 1])


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front([(0.5, math.nan, 0.1)], MODES)
    with pytest.raises(ValueError, match="3 objectives"):
        hypervolume([(0.5, 0.1)], MODES, REF)


def record(i, ca, r, q, status="completed", attack="badnets"):
    return TrialRecord(trial_id=f"t{i}", study=f"{attack}/bibau_u", attack=attack, defense="bibau_u", status=status,
                       metrics={"ca": ca, "r_asr": r, "q_asr": q}, order=i)


def test_fronts_of_records_skip_failed_and_non_finite_trials():
    metrics = ["ca", "r_asr", "q_asr"]
    recs = [record(1, 0.9, 0.8, 0.8), record(2, 0.99, 0.0, 0.0, status="failed"), record(3, 0.7, 0.1, 0.1),
            record(4, math.nan, 0.0, 0.0), record(5, 0.6, 0.2, 0.2)]
    front = front_of(recs, metrics, MODES)
    assert [r.trial_id for r in front] == ["t1", "t3"]
    curve = growth(recs, metrics, MODES, REF)
    assert [k for k, _ in curve] == [1, 2, 3, 4, 5]  # failed trials count as spent budget
    assert curve[1][1] == curve[0][1]  # ... but add no volume
    assert curve[2][1] > curve[1][1]
    assert curve[4][1] == curve[3][1]  # t5 is dominated by t3
