"""Reference data: checksum table, mirror copies, corrupted and missing copies, download path, rule."""

import hashlib
import io
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from xfel_spread.cli import fetch_reference as fetch_reference_cli
from xfel_spread.reference import (
    REFERENCE_FILES,
    REFERENCE_NAMES,
    ReferenceDataError,
    fetch_reference,
    sha256_of_file,
)


def reference_error(*args, **kwargs):
    with pytest.raises(ReferenceDataError) as caught:
        fetch_reference(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def corrupted_mirror(tmp_path, shared_data_dir):
    """A mirror directory whose copy of Fe.dat has one byte changed."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = bytearray((shared_data_dir / "Fe.dat").read_bytes())
    data[10] ^= 0x01
    (mirror / "Fe.dat").write_bytes(bytes(data))
    return mirror


def test_table_matches_the_mirror_checksum_list(shared_data_dir):
    listed = {}
    for line in (shared_data_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    assert {name: entry.sha256 for name, entry in REFERENCE_FILES.items()} == listed
    assert REFERENCE_NAMES == tuple(REFERENCE_FILES)


def test_every_file_copies_from_the_mirror(tmp_path, shared_data_dir):
    dest = tmp_path / "dest"
    for name in REFERENCE_NAMES:
        path = fetch_reference(name, dest, mirror_dir=shared_data_dir)
        assert path == dest / name
        assert path.read_bytes() == (shared_data_dir / name).read_bytes()
    assert sorted(os.listdir(dest)) == sorted(REFERENCE_NAMES)


def test_verified_file_already_in_place_is_kept(tmp_path, shared_data_dir):
    first = fetch_reference("1m2a.pdb", tmp_path, mirror_dir=shared_data_dir)
    modified = first.stat().st_mtime_ns
    # No mirror and no network needed the second time.
    assert fetch_reference("1m2a.pdb", tmp_path) == first
    assert first.stat().st_mtime_ns == modified


def test_stale_destination_is_replaced(tmp_path, shared_data_dir):
    (tmp_path / "Fe.dat").write_bytes(b"stale")
    fetch_reference("Fe.dat", tmp_path, mirror_dir=shared_data_dir)
    assert sha256_of_file(tmp_path / "Fe.dat") == REFERENCE_FILES["Fe.dat"].sha256


def test_corrupted_mirror_copy_is_refused_and_nothing_written(tmp_path, corrupted_mirror):
    dest = tmp_path / "dest"
    message = reference_error("Fe.dat", dest, mirror_dir=corrupted_mirror)
    bad_digest = hashlib.sha256((corrupted_mirror / "Fe.dat").read_bytes()).hexdigest()
    assert message == (
        f"Fe.dat: sha256 mismatch for the copy from {corrupted_mirror / 'Fe.dat'}: "
        f"expected {REFERENCE_FILES['Fe.dat'].sha256}, got {bad_digest}"
    )
    assert os.listdir(dest) == []  # neither the file nor a temporary


def test_file_missing_from_mirror(tmp_path):
    message = reference_error("Fe.dat", tmp_path / "dest", mirror_dir=tmp_path)
    assert message == f"{tmp_path / 'Fe.dat'}: cannot read mirror copy of Fe.dat: No such file or directory"


def test_unknown_name(tmp_path):
    assert reference_error("2xyz.pdb", tmp_path).startswith("2xyz.pdb: not a known reference file (known: 1m2a.pdb")


def test_ls49_tables_need_a_mirror(tmp_path):
    message = reference_error("pf-rd-ox_fftkk.out", tmp_path)
    assert message.startswith("pf-rd-ox_fftkk.out: no direct download exists")
    assert "reference.mirror_dir" in message


def fake_urlopen(payload=None, error=None):
    """Stand-in for urllib.request.urlopen: returns ``payload`` or raises ``error``; records the URL."""
    requested = []

    def urlopen(url, timeout):
        requested.append(url)
        if error is not None:
            raise error
        return io.BytesIO(payload)

    urlopen.requested = requested
    return urlopen


def test_download_is_verified_like_a_mirror_copy(tmp_path, shared_data_dir, monkeypatch):
    urlopen = fake_urlopen(payload=(shared_data_dir / "1m2a.pdb").read_bytes())
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    path = fetch_reference("1m2a.pdb", tmp_path)
    assert urlopen.requested == ["https://files.rcsb.org/download/1M2A.pdb"]
    assert sha256_of_file(path) == REFERENCE_FILES["1m2a.pdb"].sha256


def test_changed_download_names_both_hashes(tmp_path, monkeypatch):
    remediated = b"HEADER    ELECTRON TRANSPORT (remediated)\n"
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payload=remediated))
    message = reference_error("1m2a.pdb", tmp_path)
    assert message == (
        "1m2a.pdb: sha256 mismatch for the copy from https://files.rcsb.org/download/1M2A.pdb: "
        f"expected {REFERENCE_FILES['1m2a.pdb'].sha256}, got {hashlib.sha256(remediated).hexdigest()}"
    )
    assert os.listdir(tmp_path) == []


def test_failed_download_names_file_and_suggests_a_mirror(tmp_path, monkeypatch):
    offline = urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(error=offline))
    message = reference_error("1m2a.pdb", tmp_path)
    assert message == (
        "1m2a.pdb: download from https://files.rcsb.org/download/1M2A.pdb failed: "
        "Temporary failure in name resolution; set reference.mirror_dir to a directory holding the file"
    )


def test_cli_fetches_from_mirror(tmp_path, shared_data_dir, capsys):
    arguments = ["--dest", str(tmp_path), "--mirror", str(shared_data_dir), "Fe.dat", "1m2a.pdb"]
    status = fetch_reference_cli.main(arguments)
    assert status == 0
    assert sorted(os.listdir(tmp_path)) == ["1m2a.pdb", "Fe.dat"]
    assert capsys.readouterr().out.count("verified") == 2


def test_cli_reports_one_error_line(tmp_path, corrupted_mirror, capsys):
    arguments = ["--dest", str(tmp_path / "dest"), "--mirror", str(corrupted_mirror), "Fe.dat"]
    status = fetch_reference_cli.main(arguments)
    assert status == 1
    error_lines = capsys.readouterr().err.splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith("spread-fetch-reference: error: Fe.dat: sha256 mismatch")


def test_cli_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit) as caught:
        fetch_reference_cli.main(["--dest", str(tmp_path), "nothing.pdb"])
    assert caught.value.code == 2


def test_reference_rule_fetches_every_file(repo_root, tmp_path, shared_data_dir):
    """Run the reference_data rule for real, in a scratch working directory."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"reference:\n  mirror_dir: {shared_data_dir}\n")
    targets = [f"resources/reference/{name}" for name in REFERENCE_NAMES]
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(repo_root / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(config_file), "--cores", "1", *targets],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in REFERENCE_NAMES:
        assert sha256_of_file(tmp_path / "resources" / "reference" / name) == REFERENCE_FILES[name].sha256
        assert "verified" in (tmp_path / "logs" / "reference" / f"{name}.log").read_text()
