"""spread-structure-factors and spread-simulate run directly (no Snakemake) on a tiny config.

Determinism that does not depend on how shots are split into shards or processes, the relation of
the psf and nopsf datasets, and the commands' one-line errors that leave no (or the previous) output.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xfel_spread.io.shard import ShardFormatError, read_shard_image, read_shard_metadata, read_shard_spectrum

from tiny_config import N_PIXELS, PSF_RADIUS_PX, SHARED_DATA_DIR, tiny_config, write_config

BIN_DIR = Path(sys.executable).parent  # the environment's spread-* commands live beside its python
ADC_OFFSET_ADU = 10.0  # the schema's default


def command(name, *arguments):
    return [str(BIN_DIR / name), *map(str, arguments)]


def run(name, *arguments):
    return subprocess.run(command(name, *arguments), capture_output=True, text=True, timeout=600)


def simulate_command(configfile, amplitudes, start, stop, outdir, truth=None):
    """spread-simulate for shots start..stop-1 into `outdir` (nopsf.h5, psf.h5, truth.json)."""
    outdir.mkdir(parents=True, exist_ok=True)
    return command("spread-simulate", "--config", configfile, "--amplitudes", amplitudes,
                   "--shots", start, stop, "--nopsf", outdir / "nopsf.h5", "--psf", outdir / "psf.h5",
                   "--truth", truth or outdir / "truth.json", "--threads", 1)


def one_error_line(result, program):
    """The single stderr line of a failed command (logging lines aside), checked for its form."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    return lines[0]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("simulate_cli")


@pytest.fixture(scope="module")
def configfile(workdir):
    return write_config(workdir / "tiny.yaml", tiny_config())


@pytest.fixture(scope="module")
def amplitudes(workdir, configfile):
    """The amplitude table of the tiny config, built once."""
    output = workdir / "amplitudes.h5"
    result = run("spread-structure-factors", "--config", configfile, "--pdb", SHARED_DATA_DIR / "1m2a.pdb",
                 "--site", f"FE1={SHARED_DATA_DIR / 'pf-rd-ox_fftkk.out'}",
                 "--site", f"FE2={SHARED_DATA_DIR / 'pf-rd-red_fftkk.out'}", "--output", output)
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def sharded_runs(workdir, configfile, amplitudes):
    """Shots 0..3 as one shard, and as two shards (0, 2) + (2, 4), each in its own process at once."""
    runs = {"whole": [(0, 4)], "split": [(0, 2), (2, 4)]}
    processes = []
    for label, ranges in runs.items():
        for start, stop in ranges:
            outdir = workdir / label / f"{start}_{stop}"
            processes.append(subprocess.Popen(simulate_command(configfile, amplitudes, start, stop, outdir),
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    return {label: [workdir / label / f"{start}_{stop}" for start, stop in ranges] for label, ranges in runs.items()}


def shots_of(shard_dirs, dataset):
    """{shot index: (image, spectrum)} over the shards in `shard_dirs`."""
    shots = {}
    for shard_dir in shard_dirs:
        path = shard_dir / f"{dataset}.h5"
        metadata = read_shard_metadata(path)
        for position, shot in enumerate(metadata.shot_index.tolist()):
            shots[shot] = (read_shard_image(path, position), read_shard_spectrum(path, position)[1])
    return shots


def truth_of(shard_dirs):
    records = []
    for shard_dir in shard_dirs:
        records += json.loads((shard_dir / "truth.json").read_text())["shots"]
    return records


# --- determinism and the two datasets ---------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["nopsf", "psf"])
def test_shots_do_not_depend_on_sharding_or_process(sharded_runs, dataset):
    whole, split = shots_of(sharded_runs["whole"], dataset), shots_of(sharded_runs["split"], dataset)
    assert sorted(whole) == sorted(split) == [0, 1, 2, 3]
    for shot in whole:
        image_whole, spectrum_whole = whole[shot]
        image_split, spectrum_split = split[shot]
        assert image_whole.dtype == image_split.dtype == np.int32
        assert image_whole.shape == (N_PIXELS, N_PIXELS)
        assert image_whole.tobytes() == image_split.tobytes(), f"shot {shot}"
        assert spectrum_whole.tobytes() == spectrum_split.tobytes(), f"shot {shot}"
    # Different shots are different (no seed collision).
    assert not np.array_equal(whole[0][0], whole[1][0])


def test_truth_does_not_depend_on_sharding(sharded_runs):
    whole, split = truth_of(sharded_runs["whole"]), truth_of(sharded_runs["split"])
    assert [record["shot_index"] for record in whole] == [0, 1, 2, 3]
    assert whole == split


def test_psf_dataset_spreads_the_same_light(sharded_runs):
    shard_dir = sharded_runs["whole"][0]
    nopsf_meta, psf_meta = read_shard_metadata(shard_dir / "nopsf.h5"), read_shard_metadata(shard_dir / "psf.h5")
    assert (nopsf_meta.dataset, psf_meta.dataset) == ("nopsf", "psf")
    assert nopsf_meta.detector == psf_meta.detector and nopsf_meta.beam == psf_meta.beam
    np.testing.assert_array_equal(nopsf_meta.photons_per_channel, psf_meta.photons_per_channel)

    for position in range(4):
        nopsf = read_shard_image(shard_dir / "nopsf.h5", position).astype(np.float64) - ADC_OFFSET_ADU
        psf = read_shard_image(shard_dir / "psf.h5", position).astype(np.float64) - ADC_OFFSET_ADU
        assert not np.array_equal(nopsf, psf)
        # Photons are moved, not made: the only loss is light spread off the panel, which can only
        # come from the ring of pixels within the kernel radius of the edge (and less than half of
        # theirs: at most the half of the kernel that lies outside) ...
        lost = nopsf.sum() - psf.sum()
        ring = nopsf.sum() - nopsf[PSF_RADIUS_PX:-PSF_RADIUS_PX, PSF_RADIUS_PX:-PSF_RADIUS_PX].sum()
        assert nopsf.sum() > 1e6
        assert 0 < lost < 0.5 * ring
        assert psf.sum() == pytest.approx(nopsf.sum(), rel=1e-2)
        # ... and spreading smooths: neighbouring pixels agree better with the PSF than without.
        assert np.abs(np.diff(psf, axis=1)).mean() < 0.9 * np.abs(np.diff(nopsf, axis=1)).mean()


def test_truncated_shard_gives_one_line_error_naming_the_file(sharded_runs, tmp_path):
    path = tmp_path / "truncated.h5"
    path.write_bytes((sharded_runs["split"][0] / "nopsf.h5").read_bytes())
    os.truncate(path, path.stat().st_size * 2 // 3)

    with pytest.raises(ShardFormatError) as caught:
        read_shard_image(path, 0)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")


# --- one-line errors, no or previous output ----------------------------------------------------------------


def test_bad_config_value_is_one_line_and_writes_nothing(amplitudes, tmp_path):
    bad = tiny_config()
    bad["simulate"]["detector"]["pixel_size_mm"] = -0.6
    configfile = write_config(tmp_path / "bad.yaml", bad)
    result = subprocess.run(simulate_command(configfile, amplitudes, 0, 1, tmp_path / "out"),
                            capture_output=True, text=True, timeout=600)

    line = one_error_line(result, "spread-simulate")
    assert line.startswith(f"spread-simulate: error: {configfile}: simulate.detector.pixel_size_mm: "), line
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_amplitude_table_is_one_line_naming_it(configfile, tmp_path):
    missing = tmp_path / "no_such_amplitudes.h5"
    result = subprocess.run(simulate_command(configfile, missing, 0, 1, tmp_path / "out"),
                            capture_output=True, text=True, timeout=600)

    assert f"{missing}" in one_error_line(result, "spread-simulate")
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_run_keeps_previous_complete_outputs(sharded_runs, configfile, amplitudes, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name in ("nopsf.h5", "psf.h5", "truth.json"):
        (outdir / name).write_bytes((sharded_runs["split"][0] / name).read_bytes())
    before = {name: digest(outdir / name) for name in ("nopsf.h5", "psf.h5", "truth.json")}

    # The truth file is written last, after both shards' images: this run fails half-way through.
    unwritable_truth = tmp_path / "no_such_directory" / "truth.json"
    result = subprocess.run(simulate_command(configfile, amplitudes, 0, 2, outdir, truth=unwritable_truth),
                            capture_output=True, text=True, timeout=600)

    assert "no_such_directory" in one_error_line(result, "spread-simulate")
    assert {name: digest(outdir / name) for name in before} == before
    assert sorted(path.name for path in outdir.iterdir()) == sorted(before)  # no temporary files left


@pytest.mark.parametrize("content", ["this is not a PDB file\nATOM garbage\n", ""], ids=["garbage", "empty"])
def test_garbage_model_is_one_line_naming_it(configfile, tmp_path, content):
    pdb = tmp_path / "garbage.pdb"
    pdb.write_text(content)
    output = tmp_path / "amplitudes.h5"
    result = run("spread-structure-factors", "--config", configfile, "--pdb", pdb,
                 "--site", f"FE1={SHARED_DATA_DIR / 'pf-rd-ox_fftkk.out'}",
                 "--site", f"FE2={SHARED_DATA_DIR / 'pf-rd-red_fftkk.out'}", "--output", output)

    assert one_error_line(result, "spread-structure-factors").startswith(f"spread-structure-factors: error: {pdb}: ")
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [pdb]
