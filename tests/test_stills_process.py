"""spread-stills-process on small simulated shards, with the real dials.stills_process.

The shard is simulated once per module on the indexable test panel (see tiny_config). The tests show
that the xfel_mono_sim_ext stand-in is what makes stills indexing work on Debian's DIALS, that two
MPI ranks give the same result as one, and that a corrupt image, a shard with nothing to index and
an unreadable shard are recorded per shot without failing the job.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from xfel_spread.dials.stills import INTEGRATED, NOT_A_HIT, UNREADABLE_SHARD
from xfel_spread.io.stills import output_paths, read_shots_table
from xfel_spread.io.shard import read_shard_metadata, write_shard

from tiny_config import indexable_config, write_config

#: Slow tier (make test-fast leaves it out): dials.stills_process on simulated shards, under MPI.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
INDEX_PHIL = REPO_ROOT / "config" / "index.phil"
BIN_DIR = Path(sys.executable).parent
N_SHOTS = 3
#: As in the local profile: Open MPI refuses to run as root without the flag.
MPIRUN = ["mpirun", "--allow-run-as-root"]


def run(arguments, cwd=None):
    return subprocess.run(list(map(str, arguments)), capture_output=True, text=True, timeout=900, cwd=cwd)


def succeeded(result):
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result


def stills_process(shard, prefix, ranks=None, hits_table=None):
    """spread-stills-process on all shots of `shard` (or the hits of `hits_table`); under
    `mpirun -n ranks` when ranks is given."""
    command = [BIN_DIR / "spread-stills-process", "--shard", shard, "--shots", 0, N_SHOTS,
               "--phil", INDEX_PHIL, "--output-prefix", prefix]
    if hits_table is not None:
        command += ["--hits-table", hits_table]
    if ranks is not None:
        command = [*MPIRUN, "-n", ranks, *command]
    return run(command)


def load_outputs(prefix):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    paths = output_paths(prefix)
    return (read_shots_table(paths["shots"]),
            ExperimentList.from_file(str(paths["integrated_experiments"]), check_format=False),
            flex.reflection_table.from_file(str(paths["integrated_reflections"])))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A shard of N_SHOTS simulated shots (psf dataset) on the indexable panel."""
    directory = tmp_path_factory.mktemp("stills")
    config = indexable_config(directory, n_shots=N_SHOTS, shots_per_shard=N_SHOTS)
    configfile = write_config(directory / "config.yaml", config)
    amplitudes = directory / "amplitudes.h5"
    reference = Path(config["reference"]["mirror_dir"])
    succeeded(run([BIN_DIR / "spread-structure-factors", "--config", configfile, "--pdb", reference / "1m2a.pdb",
                   "--site", f"FE1={reference / 'pf-rd-ox_fftkk.out'}",
                   "--site", f"FE2={reference / 'pf-rd-red_fftkk.out'}", "--output", amplitudes]))
    succeeded(run([BIN_DIR / "spread-simulate", "--config", configfile, "--amplitudes", amplitudes,
                   "--shots", 0, N_SHOTS, "--nopsf", directory / "nopsf.h5", "--psf", directory / "psf.h5",
                   "--truth", directory / "truth.json", "--threads", 2]))
    return directory / "psf.h5"


@pytest.fixture(scope="module")
def one_rank(shard):
    """Outputs of spread-stills-process on the shard with a single process."""
    prefix = shard.parent / "one_rank" / "shard_00000"
    prefix.parent.mkdir()
    result = succeeded(stills_process(shard, prefix))
    return prefix, result


def test_every_shot_indexes_and_integrates(one_rank):
    prefix, result = one_rank
    shots, experiments, reflections = load_outputs(prefix)

    assert [row["shot"] for row in shots] == list(range(N_SHOTS))
    assert [row["status"] for row in shots] == [INTEGRATED] * N_SHOTS, shots
    assert len(experiments) == N_SHOTS
    assert sorted(experiment.imageset.indices()[0] for experiment in experiments) == list(range(N_SHOTS))
    # Each shot's reflection count in the table is what the reflection file holds for its lattice.
    counts = [(reflections["id"] == i).count(True) for i in range(len(experiments))]
    by_image = dict(zip((experiment.imageset.indices()[0] for experiment in experiments), counts))
    assert [row["n_integrated"] for row in shots] == [by_image[image] for image in range(N_SHOTS)]
    assert all(count > 20 for count in counts)
    # The refined crystals keep the known C-centred monoclinic cell.
    for experiment in experiments:
        assert experiment.crystal.get_space_group().conventional_centring_type_symbol() == "C"
        assert experiment.crystal.get_unit_cell().parameters() == pytest.approx(
            (67.2, 59.8, 47.2, 90.0, 110.3, 90.0), rel=0.01)
    # Progress and DIALS's own log reach the job's log; the scratch directory is gone.
    assert f"{N_SHOTS}/{N_SHOTS} shots done ({N_SHOTS} integrated)" in result.stderr
    assert "----- info_rank0000.out -----" in result.stderr
    assert not Path(f"{prefix}.work").exists()


def test_without_the_stand_in_no_shot_indexes(shard, one_rank, tmp_path):
    """Debian's DIALS on its own (no xfel_mono_sim_ext) fails every shot: the stand-in is the fix."""
    succeeded(run([sys.executable, "-m", "dials.command_line.stills_process", shard, INDEX_PHIL,
                   f"output.output_dir={tmp_path}", "output.integration_pickle=None"], cwd=tmp_path))
    debug = "".join(path.read_text() for path in (tmp_path / "debug").glob("debug_*.txt"))
    assert debug.count("indexing_failed") == N_SHOTS, debug
    assert "integrate_ok" not in debug
    # ... while with it (the one_rank fixture) every shot integrated.
    assert {row["status"] for row in load_outputs(one_rank[0])[0]} == {INTEGRATED}


def test_two_mpi_ranks_give_the_same_result_as_one(shard, one_rank, tmp_path):
    prefix = tmp_path / "shard_00000"
    succeeded(stills_process(shard, prefix, ranks=2))
    shots, experiments, reflections = load_outputs(prefix)
    reference_shots, reference_experiments, reference_reflections = load_outputs(one_rank[0])

    assert shots == reference_shots
    assert len(reflections) == len(reference_reflections)

    def crystal_by_image(experiment_list):
        return {experiment.imageset.indices()[0]: np.array(experiment.crystal.get_A()) for experiment in experiment_list}

    matrices, reference_matrices = crystal_by_image(experiments), crystal_by_image(reference_experiments)
    assert matrices.keys() == reference_matrices.keys()
    for image, matrix in matrices.items():
        np.testing.assert_allclose(matrix, reference_matrices[image], rtol=0, atol=1e-9)


def test_corrupt_image_is_recorded_and_the_other_shots_integrate(shard, tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    shutil.copyfile(shard, corrupt)
    with h5py.File(corrupt, "r") as h5:
        chunk = h5["data"].id.get_chunk_info_by_coord((1, 0, 0))
    with open(corrupt, "r+b") as stream:  # overwrite the middle of image 1's compressed bytes
        stream.seek(chunk.byte_offset + chunk.size // 2)
        stream.write(b"\xff" * 4096)

    prefix = tmp_path / "shard_00000"
    result = succeeded(stills_process(corrupt, prefix))
    shots, experiments, _ = load_outputs(prefix)

    assert [row["status"] for row in shots] == [INTEGRATED, "spotfinding_exception", INTEGRATED], shots
    assert shots[1]["reason"], "the failed shot must say why"
    assert sorted(experiment.imageset.indices()[0] for experiment in experiments) == [0, 2]
    assert "2 of 3 shots integrated" in result.stderr


def test_shard_with_nothing_to_index_gives_empty_outputs(shard, tmp_path):
    metadata = read_shard_metadata(shard)
    rng = np.random.default_rng(0)
    shape = (metadata.detector["n_slow"], metadata.detector["n_fast"])
    blank = tmp_path / "blank.h5"  # background and noise only: no crystal in the beam
    write_shard(blank, (rng.poisson(250.0, shape).astype(np.int32) + 10 for _ in range(N_SHOTS)),
                metadata.shot_index, metadata.energy_ev, metadata.photons_per_channel, metadata.detector,
                metadata.beam, metadata.dataset)

    prefix = tmp_path / "shard_00000"
    result = succeeded(stills_process(blank, prefix))
    shots, experiments, reflections = load_outputs(prefix)

    assert len(shots) == N_SHOTS
    assert not [row for row in shots if row["status"] == INTEGRATED], shots
    assert all(row["status"] != "not_processed" for row in shots)
    assert len(experiments) == 0 and len(reflections) == 0
    assert "0 of 3 shots integrated" in result.stderr


def test_unreadable_shard_is_recorded_without_failing(shard, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(shard.read_bytes()[:4096])

    prefix = tmp_path / "shard_00000"
    result = succeeded(stills_process(truncated, prefix))
    shots, experiments, reflections = load_outputs(prefix)

    assert [row["status"] for row in shots] == [UNREADABLE_SHARD] * N_SHOTS
    assert all(str(truncated) in row["reason"] for row in shots)
    assert len(experiments) == 0 and len(reflections) == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(truncated) in warnings[0]


def test_unknown_phil_parameter_fails_in_one_line_before_processing(shard, tmp_path):
    phil = tmp_path / "bad.phil"
    phil.write_text("spotfinder.filter.min_spot_sise = 3\n")
    prefix = tmp_path / "shard_00000"
    result = run([BIN_DIR / "spread-stills-process", "--shard", shard, "--shots", 0, N_SHOTS,
                  "--phil", phil, "--output-prefix", prefix])

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"spread-stills-process: error: {phil}: unknown parameter for dials.stills_process: "
        "spotfinder.filter.min_spot_sise (line 1)"]
    assert not any(path.exists() for path in output_paths(prefix).values())


def hits_table(path, is_hit, first_shot=0):
    """A hitfind hits table marking shot first_shot + i a hit when is_hit[i]."""
    path.write_text("shot\tlit_pixels\tphotons\tis_hit\n" + "".join(
        f"{first_shot + image}\t{500 if hit else 0}\t1.0e9\t{int(hit)}\n" for image, hit in enumerate(is_hit)))
    return path


def test_only_the_hits_are_processed(shard, one_rank, tmp_path):
    prefix = tmp_path / "shard_00000"
    result = succeeded(stills_process(shard, prefix, hits_table=hits_table(tmp_path / "hits.tsv", [True, False, True])))
    shots, experiments, _ = load_outputs(prefix)

    assert [row["status"] for row in shots] == [INTEGRATED, NOT_A_HIT, INTEGRATED], shots
    assert sorted(experiment.imageset.indices()[0] for experiment in experiments) == [0, 2]
    # The hits come out as they do when every shot is processed.
    every_shot = read_shots_table(output_paths(one_rank[0])["shots"])
    assert [shots[i]["n_integrated"] for i in (0, 2)] == [every_shot[i]["n_integrated"] for i in (0, 2)]
    assert "2 of 3 shots integrated" in result.stderr


def test_shard_without_hits_gives_empty_outputs_without_running_dials(shard, tmp_path):
    prefix = tmp_path / "shard_00000"
    result = succeeded(stills_process(shard, prefix, hits_table=hits_table(tmp_path / "hits.tsv", [False] * N_SHOTS)))
    shots, experiments, reflections = load_outputs(prefix)

    assert [row["status"] for row in shots] == [NOT_A_HIT] * N_SHOTS
    assert len(experiments) == 0 and len(reflections) == 0
    assert "no hits; stills_process not run" in result.stderr
    assert "----- info_rank" not in result.stderr


def test_hits_table_of_other_shots_fails_in_one_line(shard, tmp_path):
    table = hits_table(tmp_path / "hits.tsv", [True] * N_SHOTS, first_shot=100)
    result = stills_process(shard, tmp_path / "shard_00000", hits_table=table)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"spread-stills-process: error: {table}: lists shots [100, 101, 102]... (3), expected 0..2"]
