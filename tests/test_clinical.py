"""Clinical context columns: Hadlock GA from HC and the INTERGROWTH-21st HC standard, against hand-computed values."""

import numpy as np
import pandas as pd
import pytest

from fetalpipe.data.manifest import ManifestError, validate_manifest
from fetalpipe.measure.clinical import (CENTILE_Z, centile_from_z, clinical_columns, ga_from_hc_weeks, hc_for_centile_mm, hc_z_intergrowth21,
                                        intergrowth21_hc_mean_sd_mm)


def test_intergrowth21_mean_and_sd_match_hand_computed_values():
    mean_mm, sd_mm = intergrowth21_hc_mean_sd_mm(np.array([20.0, 30.0]))
    np.testing.assert_allclose(mean_mm, [172.5, 278.4], atol=0.05)
    np.testing.assert_allclose(sd_mm, [7.4, 9.2], atol=0.06)


def test_intergrowth21_is_defined_only_for_14_to_40_weeks():
    mean_mm, sd_mm = intergrowth21_hc_mean_sd_mm(np.array([13.9, 14.0, 40.0, 40.1, np.nan]))
    assert np.isnan(mean_mm[[0, 3, 4]]).all() and np.isnan(sd_mm[[0, 3, 4]]).all()
    assert np.isfinite(mean_mm[[1, 2]]).all()


def test_intergrowth21_mean_and_sd_grow_with_age():
    ga_weeks = np.linspace(14, 40, 105)
    mean_mm, sd_mm = intergrowth21_hc_mean_sd_mm(ga_weeks)
    assert (np.diff(mean_mm) > 0).all() and (np.diff(sd_mm) > 0).all()


def test_hadlock_gives_20_weeks_for_175_mm_and_is_empty_outside_12_to_42_weeks():
    assert ga_from_hc_weeks(np.array([175.0]))[0] == pytest.approx(20.0, abs=0.05)
    hc_mm = np.array([40.0, 175.0, 300.0, 450.0, np.nan])
    ga_weeks = ga_from_hc_weeks(hc_mm)
    assert np.isnan(ga_weeks[[0, 3, 4]]).all()  # 12 weeks is about 70 mm; 42 weeks about 380 mm
    assert 12 <= ga_weeks[1] < ga_weeks[2] <= 42


def test_z_is_zero_at_the_mean_and_the_centile_is_50_there():
    ga_weeks = np.array([16.0, 25.5, 38.0])
    mean_mm, sd_mm = intergrowth21_hc_mean_sd_mm(ga_weeks)
    np.testing.assert_allclose(hc_z_intergrowth21(mean_mm, ga_weeks), 0.0, atol=1e-12)
    np.testing.assert_allclose(hc_z_intergrowth21(mean_mm + sd_mm, ga_weeks), 1.0, atol=1e-12)
    np.testing.assert_allclose(centile_from_z(np.array([0.0])), [50.0])
    np.testing.assert_allclose(centile_from_z(np.array([CENTILE_Z[3], CENTILE_Z[97], -1.0])), [3.0, 97.0, 15.8655], atol=1e-3)
    np.testing.assert_allclose(hc_z_intergrowth21(hc_for_centile_mm(ga_weeks, CENTILE_Z[97]), ga_weeks), CENTILE_Z[97], atol=1e-12)


def test_clinical_columns_without_gestational_age_leave_the_standard_empty():
    columns = clinical_columns(np.array([175.0, np.nan]), None)
    assert columns["ga_from_hc_weeks"][0] == pytest.approx(20.0, abs=0.05) and np.isnan(columns["ga_from_hc_weeks"][1])
    assert np.isnan(columns["hc_z_intergrowth21"]).all() and np.isnan(columns["hc_centile_intergrowth21"]).all()
    with_ga = clinical_columns(np.array([172.48, 200.0]), np.array([20.0, np.nan]))
    assert with_ga["hc_centile_intergrowth21"][0] == pytest.approx(50.0, abs=0.1) and np.isnan(with_ga["hc_centile_intergrowth21"][1])


def test_manifest_gestational_age_days_become_weeks_and_blank_is_unknown():
    table = validate_manifest(pd.DataFrame({"image_path": ["/a.png", "/b.png"], "gestational_age_days": [140, None]}))
    assert table["gestational_age_weeks"][0] == pytest.approx(20.0) and np.isnan(table["gestational_age_weeks"][1])


@pytest.mark.parametrize("column, bad, message", [
    ("gestational_age_weeks", "twenty", "row 2, column 'gestational_age_weeks': not a number"),
    ("gestational_age_weeks", -3.0, "row 2, column 'gestational_age_weeks': must be non-negative"),
    ("gestational_age_days", "inf", "row 2, column 'gestational_age_days': not a number"),
])
def test_manifest_rejects_a_bad_gestational_age_naming_row_and_column(column, bad, message):
    with pytest.raises(ManifestError, match=message):
        validate_manifest(pd.DataFrame({"image_path": ["/a.png", "/b.png"], column: [20.0, bad]}))
