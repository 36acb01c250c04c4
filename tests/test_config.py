"""Configuration: schema completeness, default filling, one-line error messages, shard bookkeeping."""

import subprocess
import sys

import pytest
import yaml

from xfel_spread.config import ConfigError, load_config, load_schema, modelled_psf, shard_ranges


def schema_keys(schema, path=()):
    """Yield (dotted path, schema) for every key the schema declares, depth first."""
    for key, key_schema in schema.get("properties", {}).items():
        yield ".".join(path + (key,)), key_schema
        yield from schema_keys(key_schema, path + (key,))


def write_config(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(source, source_name=None):
    with pytest.raises(ConfigError) as caught:
        load_config(source, source_name)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the schema itself -------------------------------------------------------------------------------


def test_every_schema_key_has_description_and_default():
    keys = list(schema_keys(load_schema()))
    assert len(keys) > 40
    for dotted, key_schema in keys:
        assert key_schema.get("description"), f"{dotted} has no description"
        assert "default" in key_schema, f"{dotted} has no default"


def test_every_schema_object_forbids_unknown_keys():
    objects = [("<top level>", load_schema())] + [
        (dotted, key_schema) for dotted, key_schema in schema_keys(load_schema()) if key_schema.get("type") == "object"
    ]
    for dotted, object_schema in objects:
        assert object_schema.get("additionalProperties") is False, dotted


def test_datasets_are_not_configurable():
    assert "datasets" not in load_schema()["properties"]["simulate"]["properties"]


# --- default filling ---------------------------------------------------------------------------------


def test_empty_config_gets_ly99_defaults_at_every_depth():
    config = load_config({}, "empty")
    assert config["output_dir"] == "results"
    assert config["log_dir"] == "logs"
    assert config["reference"] == {"mirror_dir": None, "dir": "resources/reference"}
    assert config["structure_factors"]["d_min_a"] == 1.7
    assert config["structure_factors"]["k_sol"] == 0.435
    assert config["structure_factors"]["n_channels"] == 100
    assert config["structure_factors"]["channel_start_ev"] == 7070.5
    assert config["simulate"]["detector"]["pixel_size_mm"] == 0.088
    assert config["simulate"]["detector"]["beam_center_offset_px"] == [0.5, 0.5]
    assert config["simulate"]["beam"]["total_photons"] == 1e12
    assert config["simulate"]["beam"]["spectrum"]["n_modes"] == 30
    assert config["simulate"]["crystal"]["n_mosaic_domains"] == 25
    assert config["simulate"]["background"]["enabled"] is True


def test_defaults_fill_around_given_values_without_touching_the_input():
    given = {"simulate": {"detector": {"n_fast": 100}}}
    config = load_config(given, "partial")
    assert config["simulate"]["detector"]["n_fast"] == 100
    assert config["simulate"]["detector"]["n_slow"] == 3840
    assert config["simulate"]["beam"]["spectrum"]["source"] == "sase"
    assert config["simulate"]["n_shots"] == 8
    assert given == {"simulate": {"detector": {"n_fast": 100}}}


def test_every_declared_key_is_present_after_filling():
    config = load_config({}, "empty")
    for dotted, _ in schema_keys(load_schema()):
        value = config
        for part in dotted.split("."):
            assert part in value, dotted
            value = value[part]


def test_empty_file_means_all_defaults(tmp_path):
    assert load_config(write_config(tmp_path, "")) == load_config({}, "empty")


def test_demo_config(repo_root):
    config = load_config(repo_root / "config" / "config.yaml")
    assert config["reference"]["mirror_dir"] == "../shared/data"
    assert (config["simulate"]["n_shots"], config["simulate"]["shots_per_shard"]) == (8, 4)
    # The demo refines eta and the free domains, which SPREAD models its lattices by.
    assert config["stage1"]["free_domains"] == 25 and "eta" in config["stage1"]["refine"]
    # With eta refined, every lattice from the broad-spot start too (one validation lattice needed it).
    assert config["stage1"]["broad_start"] == "always"


def test_production_config_over_demo_config(repo_root):
    """Snakemake merges --configfile config/production.yaml over the Snakefile's config/config.yaml, key by
    key within a section (snakemake.utils.update_config), so production names every demo key it undoes and
    what it changes of the rest."""
    from snakemake.utils import update_config

    merged = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    update_config(merged, yaml.safe_load((repo_root / "config" / "production.yaml").read_text()))
    config = load_config(merged, "production")
    assert config["reference"]["mirror_dir"] is None
    assert (config["simulate"]["n_shots"], config["simulate"]["shots_per_shard"]) == (100000, 500)
    assert config["stage1"]["structure_factors"] == load_config({}, "defaults")["stage1"]["structure_factors"]
    # The free domains, as the demo, with one start (SPREAD's model of its lattices).
    assert "eta" in config["stage1"]["refine"]
    assert (config["stage1"]["free_domains"], config["stage1"]["free_domains_starts"]) == (25, 1)
    assert config["stage1"]["broad_start"] == "always"


@pytest.mark.parametrize("example", ["nanobragg", "rayonix_mfx", "thermolysin_cspad"])
def test_the_examples_take_the_schemas_crystal_model_back(repo_root, example):
    """The worked examples run with --configfile over the demo's config (key by key, as Snakemake merges):
    the demo's eta and free domains, made for the simulation's sharp domains, are not theirs."""
    from snakemake.utils import update_config

    merged = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    update_config(merged, yaml.safe_load((repo_root / "config" / "examples" / f"{example}.yaml").read_text()))
    stage1 = load_config(merged, example)["stage1"]
    defaults = load_config({}, "defaults")["stage1"]
    assert (stage1["refine"], stage1["free_domains"], stage1["broad_start"]) == (
        defaults["refine"], defaults["free_domains"], defaults["broad_start"])


# --- one-line errors ---------------------------------------------------------------------------------


def test_bad_value_names_file_key_and_problem(tmp_path):
    path = write_config(tmp_path, "simulate:\n  detector:\n    pixel_size_mm: -1\n")
    assert config_error(path, "config/config.yaml") == (
        "config/config.yaml: simulate.detector.pixel_size_mm: -1 is less than or equal to the minimum of 0"
    )


def test_file_name_defaults_to_the_path(tmp_path):
    path = write_config(tmp_path, "simulate:\n  n_shots: 0\n")
    assert config_error(path) == f"{path}: simulate.n_shots: 0 is less than the minimum of 1"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write_config(tmp_path, "simulate:\n  detector:\n    pixl_size_mm: 0.1\n")
    assert config_error(path, "my.yaml") == (
        "my.yaml: simulate.detector.pixl_size_mm: unknown key (did you mean 'pixel_size_mm'?)"
    )


def test_unknown_top_level_key_lists_allowed_keys():
    message = config_error({"zzz": 1}, "cfg.yaml")
    assert message.startswith("cfg.yaml: zzz: unknown key; allowed keys: output_dir, log_dir, reference")


def test_wrong_type_enum_and_array_length():
    assert config_error({"simulate": {"device": "gpu"}}, "c.yaml") == (
        "c.yaml: simulate.device: 'gpu' is not one of ['cpu', 'cuda', 'auto']"
    )
    assert config_error({"simulate": {"n_shots": "many"}}, "c.yaml") == (
        "c.yaml: simulate.n_shots: 'many' is not of type 'integer'"
    )
    assert config_error({"simulate": {"detector": {"beam_center_offset_px": [0.5]}}}, "c.yaml").startswith(
        "c.yaml: simulate.detector.beam_center_offset_px: [0.5] is too short"
    )
    assert config_error({"simulate": {"detector": {"beam_center_offset_px": [0.5, "x"]}}}, "c.yaml") == (
        "c.yaml: simulate.detector.beam_center_offset_px[1]: 'x' is not of type 'number'"
    )


def test_recorded_spectrum_needs_a_file():
    message = config_error({"simulate": {"beam": {"spectrum": {"source": "file"}}}}, "c.yaml")
    assert message == "c.yaml: simulate.beam.spectrum.file: None is not of type 'string'"
    config = load_config({"simulate": {"beam": {"spectrum": {"source": "file", "file": "spectra.h5"}}}}, "c.yaml")
    assert config["simulate"]["beam"]["spectrum"]["file"] == "spectra.h5"


def test_several_problems_report_the_first_and_count_the_rest():
    message = config_error({"simulate": {"n_shots": 0, "seed": -1}}, "c.yaml")
    assert message == "c.yaml: simulate.n_shots: 0 is less than the minimum of 1 (and 1 more problem)"


def test_section_of_the_wrong_type(tmp_path):
    path = write_config(tmp_path, "simulate: 5\n")
    assert config_error(path, "c.yaml") == "c.yaml: simulate: 5 is not of type 'object'"


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_config(tmp_path, "- a\n- b\n")
    assert config_error(path, "c.yaml") == "c.yaml: <top level>: expected a mapping of keys, got list"


def test_bad_yaml_names_file_and_position(tmp_path):
    path = write_config(tmp_path, "simulate:\n  n_shots: [8\n  seed: 1\n")
    message = config_error(path, "bad.yaml")
    assert message.startswith("bad.yaml: line ")
    assert "invalid YAML" in message


def test_missing_file_names_file(tmp_path):
    message = config_error(tmp_path / "absent.yaml")
    assert message == f"{tmp_path / 'absent.yaml'}: cannot read config file: No such file or directory"


def test_snakemake_stops_with_the_one_line_error_before_any_job(repo_root, tmp_path):
    bad = write_config(tmp_path, "simulate:\n  detector:\n    pixel_size_mm: -1\n", name="bad.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dry-run", "--configfile", str(bad)],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"Config error: config/config.yaml + {bad}: "
        "simulate.detector.pixel_size_mm: -1 is less than or equal to the minimum of 0"
    )
    assert "Traceback" not in result.stderr


# --- shard bookkeeping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_shots, shots_per_shard, expected",
    [
        (8, 4, [(0, 4), (4, 8)]),
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
        (3, 10, [(0, 3)]),
        (1, 1, [(0, 1)]),
    ],
)
def test_shard_ranges(n_shots, shots_per_shard, expected):
    assert shard_ranges(n_shots, shots_per_shard) == expected


def test_production_shards_cover_every_shot_once():
    ranges = shard_ranges(100000, 500)
    assert len(ranges) == 200
    assert ranges[0][0] == 0 and ranges[-1][1] == 100000
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(ranges, ranges[1:]))
    # Shards of 333: the last of 301 shards is partial.
    ranges = shard_ranges(100000, 333)
    assert len(ranges) == 301 and ranges[-1] == (99900, 100000)


@pytest.mark.parametrize("n_shots, shots_per_shard", [(0, 4), (8, 0), (-1, 4)])
def test_shard_ranges_rejects_non_positive_counts(n_shots, shots_per_shard):
    with pytest.raises(ValueError):
        shard_ranges(n_shots, shots_per_shard)


def test_modelled_psf_is_the_simulated_spread_of_the_psf_dataset_only():
    config = load_config({})
    assert modelled_psf("psf", config) == (0.08, 10)
    assert modelled_psf("nopsf", config) is None
    config["stage1"]["model_detector_psf"] = False
    assert modelled_psf("psf", config) is None
    config = load_config({"simulate": {"detector": {"psf_fwhm_mm": 0.0}}})
    assert modelled_psf("psf", config) is None
