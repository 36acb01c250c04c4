"""The Snakefile's parse-time checks (xfel_spread.workflow): each refusal is one line naming the file,
and a good run passes; plus the workflow lint's table of accepted lints (scripts/lint_workflow.py)."""

import importlib.util
import os

import pytest

from conftest import REPO_ROOT
from xfel_spread.dials.metrology import DENSE_ENGINE_MAX_LATTICES
from xfel_spread.workflow import RunSettingsError, check_run_settings, run_config, workflow_file

SOURCE = "run.yaml"


def refusal(function, *args) -> str:
    """The one-line message `function(*args)` refuses the run with."""
    with pytest.raises(RunSettingsError) as caught:
        function(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository, as when Snakemake runs with --directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def demo_config(**metrology) -> dict:
    """The demo config, settled as the Snakefile settles it (from the repository as working directory)."""
    return run_config({"metrology": metrology}, SOURCE, str(REPO_ROOT))


# --- run_config: validation and where the phil files are ------------------------------------------


def test_run_config_fills_defaults_and_finds_the_shipped_phil_files(elsewhere):
    config = run_config({}, SOURCE, str(REPO_ROOT))
    assert config["index"]["phil"] == str(REPO_ROOT / "config/index.phil")
    assert config["metrology"]["phil"] == str(REPO_ROOT / "config/metrology.phil")
    assert config["simulate"]["n_shots"] > 0


def test_run_config_keeps_a_phil_file_of_the_working_directory(elsewhere):
    (elsewhere / "config").mkdir()
    (elsewhere / "config/index.phil").write_text("")
    config = run_config({}, SOURCE, str(REPO_ROOT))
    assert config["index"]["phil"] == "config/index.phil"
    assert config["metrology"]["phil"] == str(REPO_ROOT / "config/metrology.phil")


def test_workflow_file_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workflow").mkdir()
    assert workflow_file("a.phil", str(tmp_path / "workflow")) == os.path.join("workflow", "a.phil")
    assert workflow_file("/no/such/a.phil", str(tmp_path)) == "/no/such/a.phil"


def test_run_config_refuses_a_bad_value_naming_the_source():
    message = refusal(run_config, {"simulate": {"n_shots": -1}}, SOURCE, str(REPO_ROOT))
    assert message.startswith(f"Config error: {SOURCE}: simulate.n_shots: "), message


# --- check_run_settings ----------------------------------------------------------------------------


def test_the_demo_settings_pass(tmp_path):
    check_run_settings(demo_config(), SOURCE, str(tmp_path / "results"))


def test_unknown_phil_parameter_is_refused(tmp_path):
    phil = tmp_path / "index.phil"
    phil.write_text("no_such_scope.no_such_parameter = 3\n")
    config = demo_config()
    config["index"]["phil"] = str(phil)
    message = refusal(check_run_settings, config, SOURCE, str(tmp_path / "results"))
    assert message.startswith(f"Phil error: {phil}: unknown parameter for dials.stills_process: "), message
    assert "no_such_scope.no_such_parameter" in message


def test_missing_metrology_phil_is_refused(tmp_path):
    config = demo_config()
    config["metrology"]["phil"] = str(tmp_path / "missing.phil")
    message = refusal(check_run_settings, config, SOURCE, str(tmp_path / "results"))
    assert message == f"Phil error: {tmp_path / 'missing.phil'}: no such file"


def test_dense_engine_with_too_many_lattices_is_refused(tmp_path):
    config = demo_config(engine="LevMar", max_lattices=DENSE_ENGINE_MAX_LATTICES + 1)
    message = refusal(check_run_settings, config, SOURCE, str(tmp_path / "results"))
    assert message.startswith(f"Config error: {SOURCE}: metrology.max_lattices: "), message


def test_missing_saved_detector_is_refused(tmp_path):
    path = str(tmp_path / "detector.expt")
    config = demo_config(reference_geometry=path)
    message = refusal(check_run_settings, config, SOURCE, str(tmp_path / "results"))
    assert message == f"Config error: {SOURCE}: metrology.reference_geometry: {path}: no such file"


def test_saved_detector_written_by_this_run_is_refused(tmp_path):
    detector = tmp_path / "results/metrology/psf/refined_detector.expt"
    detector.parent.mkdir(parents=True)
    detector.write_text("{}")
    config = demo_config(reference_geometry=str(detector))
    message = refusal(check_run_settings, config, SOURCE, str(tmp_path / "results"))
    assert message == (f"Config error: {SOURCE}: metrology.reference_geometry: {detector} is written by this "
                       "run's metrology; copy it elsewhere first")


def test_saved_detector_from_elsewhere_passes(tmp_path):
    detector = tmp_path / "saved/refined_detector.expt"
    detector.parent.mkdir()
    detector.write_text("{}")
    check_run_settings(demo_config(reference_geometry=str(detector)), SOURCE, str(tmp_path / "results"))


# --- scripts/lint_workflow.py ----------------------------------------------------------------------


def lint_workflow():
    spec = importlib.util.spec_from_file_location("lint_workflow", REPO_ROOT / "scripts/lint_workflow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LINT_TEXT = """\
Lints for snakefile /repo/rules/common.smk:
    * Mixed rules and functions in same snakefile.:
      Small one-liner functions used only once should be defined as lambda

Lints for rule reference_data (line 10, /repo/rules/reference.smk):
    * Specify a conda environment or container for each rule.:
      This way, the used software for each specific step is documented, and the
    * Param dest is a prefix of input or output file but hardcoded:
      If this is meant to represent a file path prefix, it will fail when running

Lints for rule merge (line 5, /repo/rules/merge.smk):
    * Param dest is a prefix of input or output file but hardcoded:
"""


def test_lint_workflow_fails_on_lints_it_does_not_explain():
    module = lint_workflow()
    found = module.lints(LINT_TEXT)
    assert len(found) == 4
    assert module.unexplained(found) == [
        ("/repo/rules/common.smk", "Mixed rules and functions in same snakefile."),
        ("merge", "Param dest is a prefix of input or output file but hardcoded"),
    ]


# --- input.model -----------------------------------------------------------------------------------


def images_config(**sections) -> dict:
    """A settled config with images from elsewhere (the listing is not checked here) and ``sections`` over it."""
    return run_config({"input": {"source": "images", "images": ["*.cbf"]}, **sections}, SOURCE, str(REPO_ROOT))


def test_no_model_needs_every_stage_that_reads_one_turned_to_the_data(tmp_path):
    results = str(tmp_path / "results")
    without = {"merge": {"reference": "data"}, "stage1": {"structure_factors": "merged"}, "spread": {"enabled": False}}
    config = images_config(**without)
    config["input"]["model"] = "none"
    check_run_settings(config, SOURCE, results)
    for key, value, section, change in (("merge.reference", "model", "merge", {"reference": "model"}),
                                        ("stage1.structure_factors", "model", "stage1", {"structure_factors": "model"}),
                                        ("spread.enabled", "true", "spread", {"enabled": True})):
        config = images_config(**{**without, section: change})
        config["input"]["model"] = "none"
        assert refusal(check_run_settings, config, SOURCE, results).startswith(
            f"Config error: {SOURCE}: input.model is none, but {key} is {value}, which needs a model; give input.model "
            f"or set {key}: ")
    simulated = demo_config()
    simulated["input"]["model"] = "none"
    assert "input.model is none, but input.source is simulate" in refusal(check_run_settings, simulated, SOURCE, results)


def test_a_model_is_for_images_from_elsewhere(tmp_path):
    """(A model file that does not exist is refused with the other input files: tests/test_images_workflow.py.)"""
    results = str(tmp_path / "results")
    config = images_config()
    present = tmp_path / "model.pdb"
    present.write_text("CRYST1\n")
    config["input"]["model"] = str(present)
    check_run_settings(config, SOURCE, results)
    simulated = demo_config()
    simulated["input"]["model"] = str(present)
    assert refusal(check_run_settings, simulated, SOURCE, results).endswith(
        "a model is for images from elsewhere; the simulation renders LY99's 1M2A (leave input.model null)")
