"""The review flag: thresholds fitted on a labelled split, stored in the model file, applied per row."""

import numpy as np
import pandas as pd
import pytest

from fetalpipe.measure.review import SIGNALS, ReviewRule, catch_curve


def _signals(count=400, seed=0):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({
        "stage_disagreement_mm": rng.gamma(2.0, 0.004, count),
        "outline_fit_residual_mm": rng.gamma(2.0, 0.005, count),
        "outline_spread_mm": rng.uniform(0.0, 0.3, count),
        "outline_outside_frame": np.zeros(count),
        "axis_ratio": rng.uniform(0.7, 0.9, count),
        "head_size_fraction": rng.uniform(0.3, 0.6, count),
        "confidence": rng.uniform(0.85, 0.95, count),
    })
    errors = np.abs(rng.normal(0, 1.5, count))
    bad = rng.choice(count, 20, replace=False)
    errors[bad] = 8.0
    table.loc[bad, "stage_disagreement_mm"] = 0.05  # the large errors show up in one signal
    return table, errors


def test_fit_catches_the_large_errors_a_signal_shows_within_the_flag_budget():
    table, errors = _signals()
    rule = ReviewRule.fit(table, errors, max_flagged_fraction=0.10)
    curve = catch_curve(table, errors, rule)
    assert curve["flagged_fraction"] <= 0.10
    assert curve["caught_fraction"] == 1.0
    assert "stage_disagreement_mm" in rule.thresholds


def test_fit_on_one_split_generalises_to_another_drawn_alike():
    table, errors = _signals(seed=0)
    rule = ReviewRule.fit(table, errors)
    other, other_errors = _signals(seed=1)
    curve = catch_curve(other, other_errors, rule)
    assert curve["caught_fraction"] >= 0.9 and curve["flagged_fraction"] <= 0.15


def test_apply_names_every_signal_that_passed_its_threshold():
    rule = ReviewRule(thresholds={"stage_disagreement_mm": 0.02, "axis_ratio": 0.6})
    table = pd.DataFrame({"stage_disagreement_mm": [0.01, 0.03, 0.05, np.nan], "axis_ratio": [0.8, 0.8, 0.5, 0.8]})
    needs_review, reasons = rule.apply(table)
    assert needs_review.tolist() == [False, True, True, False]
    assert reasons[0] == "" and reasons[3] == ""
    assert reasons[1] == "stage_disagreement_mm 0.03 > 0.02"
    assert reasons[2].startswith("stage_disagreement_mm 0.05 > 0.02; axis_ratio 0.5 < 0.6")


def test_rule_round_trips_through_its_dict():
    table, errors = _signals()
    rule = ReviewRule.fit(table, errors)
    again = ReviewRule.from_dict(rule.to_dict())
    assert again.thresholds == rule.thresholds
    assert set(again.thresholds) <= set(SIGNALS)
    assert ReviewRule.from_dict(None) is None


def test_stored_threshold_is_what_a_model_file_carries(tmp_path, tiny_model_path):
    from fetalpipe.model.model_file import load_model, read_model_header, refinement_entries, save_model

    model, config, payload = load_model(tiny_model_path)
    rule = ReviewRule(thresholds={"stage_disagreement_mm": 0.0123}, fit_report={"images": 10})
    path = str(tmp_path / "with_review.pt")
    save_model(path, payload["state_dict"], config, review=rule.to_dict(), **refinement_entries(payload))
    stored = ReviewRule.from_dict(read_model_header(path)["review"])
    assert stored.thresholds == pytest.approx({"stage_disagreement_mm": 0.0123})
