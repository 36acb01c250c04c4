"""The stage drivers' checks of their inputs (xfel_spread.<stage>.pipeline), in-process: each refuses a
bad option or setting with a UserInputError naming it, before any work."""

import pytest

from xfel_spread.config import ConfigError
from xfel_spread.errors import OptionError, UserInputError


def test_point_spread_options_go_together_and_must_make_a_point_spread():
    from xfel_spread.stage1.pipeline import detector_psf

    assert detector_psf(None, None) is None
    assert (detector_psf(0.08, 10).fwhm_mm, detector_psf(0.08, 10).radius_px) == (0.08, 10)
    with pytest.raises(OptionError, match="--psf-fwhm-mm and --psf-radius-px go together"):
        detector_psf(0.08, None)
    with pytest.raises(OptionError, match="point-spread FWHM must be positive, got 0.0 mm"):
        detector_psf(0.0, 10)


def test_the_structure_factor_file_must_be_the_one_the_settings_ask_for():
    from xfel_spread.stage1.pipeline import check_source

    check_source("merged", "s.yaml", "m.mtz", None)
    check_source("model", "s.yaml", None, "a.h5")
    with pytest.raises(ConfigError, match=r"^s.yaml: stage1.structure_factors is merged; give --mtz"):
        check_source("merged", "s.yaml", None, "a.h5")
    with pytest.raises(ConfigError, match=r"^s.yaml: stage1.structure_factors is model; give --amplitudes"):
        check_source("model", "s.yaml", "m.mtz", None)


def test_cpu_is_cpu_whatever_the_rank():
    from xfel_spread.stage1.pipeline import resolve_device

    assert resolve_device("cpu", 3) == "cpu"


def test_an_empty_shot_range_is_refused_before_the_config_is_read(tmp_path):
    from xfel_spread.sim.pipeline import simulate_shots

    with pytest.raises(OptionError, match=r"^--shots 4 4: need 0 <= START < STOP$"):
        simulate_shots(str(tmp_path / "missing.yaml"), str(tmp_path / "a.h5"), (4, 4), "n.h5", "p.h5", "t.json")


def test_stills_process_refuses_a_missing_reference_geometry(tmp_path):
    from xfel_spread.dials.pipeline import run_stills_process

    missing = tmp_path / "refined_detector.expt"
    with pytest.raises(OptionError, match=f"--reference-geometry: {missing}: no such file"):
        run_stills_process(str(tmp_path / "shard.h5"), (0, 2), [], str(tmp_path / "out"),
                           reference_geometry=str(missing))


@pytest.mark.parametrize("driver", ["score_dials", "score_stage1"])
def test_scores_need_one_prefix_of_each_and_a_truth_per_shard(driver, tmp_path):
    from xfel_spread.dials.pipeline import score_dials
    from xfel_spread.stage1.pipeline import score_stage1

    files = [str(tmp_path / name) for name in ("table.tsv", "text.txt")]
    with pytest.raises(OptionError, match="per shard|per --stage1-prefix"):
        if driver == "score_dials":
            score_dials("psf", ["a", "b"], ["a"], ["t"], "summary.json", *files, "shard.h5", "p.png")
        else:
            score_stage1("psf", ["a", "b"], ["a"], ["t"], *files, "p.png")
    assert not any((tmp_path / name).exists() for name in ("table.tsv", "text.txt"))


def test_a_malformed_metrology_summary_is_a_user_error_naming_it(tmp_path):
    from xfel_spread.dials.pipeline import score_dials

    summary = tmp_path / "summary.json"
    summary.write_text("{not json")
    with pytest.raises(UserInputError, match=f"^{summary}: not a metrology summary"):
        score_dials("psf", ["a"], ["a"], ["t"], str(summary), "t.tsv", "t.txt", "shard.h5", "p.png")
