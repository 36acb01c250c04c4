"""The stage-1 score's truth figures and goals on hand-made rows (no refinement run)."""

import numpy as np
import pytest

from xfel_spread.sim.crystal import axis_angle_rotation
from xfel_spread.stage1.scoring import SCORE_COLUMNS, domain_rms_angle_deg, format_summary, summarize


def test_the_true_eta_is_the_rms_angle_of_the_domains_about_their_mean():
    turn = np.radians(0.05)
    tilt = axis_angle_rotation(np.array([1.0, 0.0, 0.0]), np.radians(0.3))
    # Two domains 0.05 deg either side of a tilted mean: the tilt is the mean, not part of the spread.
    domains = [tilt @ axis_angle_rotation(np.array([0.0, 0.0, 1.0]), sign * turn) for sign in (1, -1)]
    shot = {"real_space_a_b_c": np.eye(3).tolist(), "mosaic_rotations": [d.tolist() for d in domains]}
    assert domain_rms_angle_deg(shot) == pytest.approx(0.05, rel=1e-6)
    # Angles 0.03 and 0.07 deg about one axis: RMS about their mean (0.05) is 0.02.
    shot["mosaic_rotations"] = [axis_angle_rotation(np.array([0.0, 1.0, 0.0]), np.radians(angle)).tolist()
                                for angle in (0.03, 0.07)]
    assert domain_rms_angle_deg(shot) == pytest.approx(0.02, rel=1e-3)
    assert domain_rms_angle_deg({"real_space_a_b_c": np.eye(3).tolist()}) == 0.0


def rows(**values):
    """Two converged lattices whose every figure meets the goals, with `values` replacing columns."""
    base = {column: 0.0 for column in SCORE_COLUMNS}
    base.update(converged=1, misorientation_dials_deg=0.02, misorientation_refined_deg=0.006,
                misorientation_dials_domain_mean_deg=0.02, misorientation_refined_domain_mean_deg=0.003,
                Na=55.0, Nb=58.0, Nc=60.0, ncells_true=57.0, G=100.0, G_scaled=100.0, G_true=100.0,
                rmsd_radial_strong_after_px=0.25, zscore_sigma=1.1, eta_deg=0.045, eta_true_deg=0.049)
    base.update(values)
    return [dict(base), dict(base)]


def test_every_goal_is_judged_against_the_domains_mean_orientation():
    text = format_summary("nopsf", summarize(rows()))
    assert "0.0200 -> 0.0030   goal <= 0.004: met" in text
    assert "lattices closer than DIALS to the domains' mean orientation 100.0 %   goal >= 97 %: met" in text
    assert "goal <= 0.3: met" in text and "goal <= 1.2: met" in text
    assert "55.0, 58.0, 60.0; truth 57   goal within 10 %: met" in text
    assert "median eta 0.0450 deg; truth (RMS angle of the domains about their mean) 0.0490 deg   goal within 0.01 deg: met" in text
    # The crystal matrix is information: no goal on its line.
    (matrix_line,) = [line for line in text.splitlines() if "crystal matrix" in line]
    assert "goal" not in matrix_line


@pytest.mark.parametrize("column, value, words", [
    ("misorientation_refined_domain_mean_deg", 0.005, "goal <= 0.004: NOT met"),
    ("misorientation_refined_domain_mean_deg", 0.03, "goal >= 97 %: NOT met"),
    ("rmsd_radial_strong_after_px", 0.31, "goal <= 0.3: NOT met"),
    ("zscore_sigma", 2.2, "goal <= 1.2: NOT met"),
    ("Nb", 50.0, "goal within 10 %: NOT met"),
    ("eta_deg", 0.07, "goal within 0.01 deg: NOT met"),
])
def test_a_figure_past_its_goal_is_not_met(column, value, words):
    assert words in format_summary("nopsf", summarize(rows(**{column: value})))


def test_a_run_without_eta_says_so_and_meets_the_eta_goal_only_without_a_true_spread():
    text = format_summary("psf", summarize(rows(eta_deg=0.0)))
    assert ("eta 0 for every lattice (not refined); truth (RMS angle of the domains about their mean) 0.0490 deg"
            "   goal within 0.01 deg: NOT met") in text
    text = format_summary("psf", summarize(rows(eta_deg=0.0, eta_true_deg=0.0)))
    assert "0.0000 deg   goal within 0.01 deg: met" in text
