"""The review flag: thresholds fitted on a labelled split, stored in the model file, applied per row."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fetalpipe.measure.review import LOG_SCALE_SIGNALS, SIGNALS, ReviewRule, catch_curve


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
    needs_review, _ = rule.apply(table)
    assert curve["not_flagged_hc_mae_mm"] == pytest.approx(errors[~needs_review].mean())
    assert curve["not_flagged_hc_mae_mm"] < errors.mean() - 0.3  # the 8 mm errors are all among the flagged
    # The signal that shows the large errors carries the largest weight.
    assert rule.signals[int(np.argmax(np.abs(rule.weights)))] == "stage_disagreement_mm"


def test_fit_combines_two_signals_that_each_show_half_the_failures():
    table, errors = _signals(seed=3)
    bad = np.flatnonzero(errors > 5)
    table.loc[bad, "stage_disagreement_mm"] = table["stage_disagreement_mm"].median()  # undo the planted signal
    table.loc[bad[:10], "outline_spread_mm"] = 2.0
    table.loc[bad[10:], "head_size_fraction"] = 0.05  # small in its frame: a low value raises the score
    rule = ReviewRule.fit(table, errors, max_flagged_fraction=0.08)
    curve = catch_curve(table, errors, rule)
    assert curve["caught_fraction"] == 1.0 and curve["flagged_fraction"] <= 0.08
    weights = dict(zip(rule.signals, rule.weights))
    assert weights["outline_spread_mm"] > 0 and weights["head_size_fraction"] < 0


def test_fit_on_one_split_generalises_to_another_drawn_alike():
    table, errors = _signals(seed=0)
    rule = ReviewRule.fit(table, errors)
    other, other_errors = _signals(seed=1)
    curve = catch_curve(other, other_errors, rule)
    assert curve["caught_fraction"] >= 0.9 and curve["flagged_fraction"] <= 0.15


def test_fit_refuses_a_split_without_large_errors():
    table, errors = _signals()
    with pytest.raises(ValueError, match="above and below"):
        ReviewRule.fit(table, np.minimum(errors, 1.0))


def _hand_rule() -> ReviewRule:
    # stage_disagreement_mm on a log scale (mean at 0.01 mm), axis_ratio as it is (mean 0.8, sd 0.1); a low ratio raises the score.
    return ReviewRule(signals=("stage_disagreement_mm", "axis_ratio"), mean=(float(np.log(0.01)), 0.8), scale=(1.0, 0.1),
                      weights=(2.0, -1.0), bias=0.0, threshold=1.0)


def test_apply_scores_each_row_and_names_what_raised_it():
    table = pd.DataFrame({"stage_disagreement_mm": [0.01, 0.1, 0.01, np.nan, 0.1], "axis_ratio": [0.8, 0.8, 0.5, 0.8, 0.5]})
    needs_review, reasons = _hand_rule().apply(table)
    assert needs_review.tolist() == [False, True, True, False, True]
    assert _hand_rule().flags(table).tolist() == needs_review.tolist()
    assert _hand_rule().score(table) == pytest.approx([0.0, 2 * np.log(10), 3.0, 0.0, 2 * np.log(10) + 3.0])
    assert reasons[0] == "" and reasons[3] == ""  # a missing signal counts as its training mean
    assert reasons[1] == "review score 4.61 > 1.00: stage_disagreement_mm 0.1 (high)"
    assert reasons[2] == "review score 3.00 > 1.00: axis_ratio 0.5 (low)"
    assert reasons[4] == "review score 7.61 > 1.00: stage_disagreement_mm 0.1 (high); axis_ratio 0.5 (low)"


def test_rule_round_trips_through_its_dict():
    table, errors = _signals()
    rule = ReviewRule.fit(table, errors)
    again = ReviewRule.from_dict(rule.to_dict())
    assert again == rule
    assert set(again.signals) <= set(SIGNALS)
    assert ReviewRule.from_dict(None) is None
    assert ReviewRule.from_dict({"thresholds": {"axis_ratio": 0.6}}) is None  # an earlier development format: recalibrate


def test_stored_threshold_is_what_a_model_file_carries(tmp_path, tiny_model_path):
    from fetalpipe.model.model_file import load_model, read_model_header, refinement_entries, save_model

    model, config, payload = load_model(tiny_model_path)
    rule = _hand_rule()
    path = str(tmp_path / "with_review.pt")
    save_model(path, payload["state_dict"], config, review=rule.to_dict(), **refinement_entries(payload))
    stored = ReviewRule.from_dict(read_model_header(path)["review"])
    assert stored.threshold == pytest.approx(1.0) and stored.weights == pytest.approx((2.0, -1.0))
    assert stored.apply(pd.DataFrame({"stage_disagreement_mm": [0.1], "axis_ratio": [0.8]}))[0].tolist() == [True]


def test_a_rule_scores_with_the_log_scale_it_was_fitted_with():
    table, errors = _signals()
    table["extra_signal_mm"] = np.exp(np.random.default_rng(5).normal(0, 1, len(table)))
    table.loc[errors > 5, "extra_signal_mm"] = 50.0
    rule = ReviewRule.fit(table, errors, candidate_signals=(*SIGNALS, "extra_signal_mm"),
                          log_scale_signals=(*LOG_SCALE_SIGNALS, "extra_signal_mm"))
    assert "extra_signal_mm" in rule.signals and "extra_signal_mm" in rule.log_scale_signals
    assert "extra_signal_mm" not in LOG_SCALE_SIGNALS  # nothing patched the module's list
    again = ReviewRule.from_dict(rule.to_dict())
    assert again == rule and again.score(table) == pytest.approx(rule.score(table))
    # Read as a plain signal, the same weights would score otherwise: the stored list is what makes the file reproducible.
    plain = dataclasses.replace(rule, log_scale_signals=tuple(n for n in rule.log_scale_signals if n != "extra_signal_mm"))
    assert not np.allclose(plain.score(table), rule.score(table))


def test_a_rule_stored_without_its_log_scale_reads_as_fitted_with_todays():
    stored = _hand_rule().to_dict()
    del stored["log_scale_signals"]  # a model file written before the rule carried the list (the shipped one)
    again = ReviewRule.from_dict(stored)
    assert again.log_scale_signals == LOG_SCALE_SIGNALS
    table = pd.DataFrame({"stage_disagreement_mm": [0.01, 0.1], "axis_ratio": [0.8, 0.8]})
    assert again.score(table) == pytest.approx([0.0, 2 * np.log(10)])


def test_rows_without_a_pixel_spacing_are_scored_by_the_rule_without_one():
    """A model's two rules (`ReviewRules`): a row with a spacing by the rule in mm, a row without by the rule on
    fractions of the head, whose reason says so; the margins (score − threshold) are each row's own rule's."""
    from fetalpipe.measure.review import ReviewRules

    in_mm = _hand_rule()
    as_fraction = ReviewRule(signals=("stage_disagreement_fraction",), mean=(float(np.log(0.001)),), scale=(1.0,), weights=(1.0,), bias=0.0,
                             threshold=1.0, log_scale_signals=("stage_disagreement_fraction",))
    table = pd.DataFrame({"stage_disagreement_mm": [0.1, 0.01, np.nan, np.nan], "axis_ratio": [0.8, 0.8, 0.8, 0.8],
                          "stage_disagreement_fraction": [0.0001, 0.01, 0.01, 0.001]})
    has_spacing = np.array([True, True, False, False])
    rules = ReviewRules(in_mm, as_fraction)
    needs_review, reasons = rules.apply(table, has_spacing)
    assert needs_review.tolist() == [True, False, True, False]  # row 0 by its mm signal; row 2 by its fraction alone
    assert reasons[0].startswith("review score 4.61 > 1.00: stage_disagreement_mm 0.1 (high)")
    assert reasons[2].startswith("review score (no pixel spacing) 2.30 > 1.00: stage_disagreement_fraction 0.01 (high)")
    np.testing.assert_allclose(rules.margin(table, has_spacing), [2 * np.log(10) - 1, -1, np.log(10) - 1, -1], atol=1e-9)
    # A model calibrated before the rule without spacing existed scores every row by the rule in mm, as it did.
    alone = ReviewRules(in_mm)
    assert alone.apply(table, has_spacing)[0].tolist() == [True, False, False, False]
    assert ReviewRules.from_payload({"review": in_mm.to_dict()}) == alone
    assert ReviewRules.from_payload({"review": in_mm.to_dict(), "review_without_spacing": as_fraction.to_dict()}) == rules
    assert ReviewRules.from_payload({}) is None


def test_the_rule_without_spacing_is_fitted_on_fractions_of_the_head_and_errors_relative_to_it():
    """`fit_without_spacing`: each length signal over the measured HC, and an image is a failure when its HC is off by
    more than `LARGE_RELATIVE_ERROR` of the reference, whatever the head's size in mm."""
    from fetalpipe.measure.review import LARGE_RELATIVE_ERROR, SPACING_FREE_SIGNALS, fit_without_spacing, relative_to_head

    rng = np.random.default_rng(3)
    count = 400
    reference_hc_mm = rng.uniform(60, 340, count)
    relative_error = rng.normal(0, 0.008, count)
    bad = rng.choice(count, 24, replace=False)
    relative_error[bad] = 0.06
    measured_hc_mm = reference_hc_mm * (1 + relative_error)
    fraction = rng.gamma(2.0, 0.002, count)
    fraction[bad] = 0.03  # the failures show as a large disagreement relative to the head, small or large
    table = pd.DataFrame({"stage_disagreement_mm": fraction * measured_hc_mm, "outline_fit_residual_mm": rng.gamma(2.0, 0.005, count),
                          "outline_spread_mm": rng.uniform(0.5, 3.0, count), "axis_ratio": rng.uniform(0.7, 0.9, count),
                          "confidence": rng.uniform(0.85, 0.95, count)})
    np.testing.assert_allclose(relative_to_head(table, measured_hc_mm)["stage_disagreement_fraction"], fraction)
    rule = fit_without_spacing(table, measured_hc_mm, reference_hc_mm, max_flagged_fraction=0.08)
    assert set(rule.signals) <= set(SPACING_FREE_SIGNALS) and "stage_disagreement_fraction" in rule.signals
    assert rule.fit_report["large_error_fraction"] == LARGE_RELATIVE_ERROR and rule.fit_report["large_errors"] == 24
    assert rule.fit_report["caught_fraction"] >= 0.9 and rule.fit_report["flagged_fraction"] <= 0.09
