"""Reference data the pipeline starts from: the 1M2A ferredoxin model and the Fe f'/f'' tables.

The files are public data, never committed to this repository. :func:`fetch_reference` obtains one,
from a local mirror directory when one is configured (``reference.mirror_dir``) or else from its public
source, checks it against the sha256 recorded here, and only then writes it (atomically) to the
destination. Any download is checked against the same checksum as the mirror copy: a source that has
changed since (the RCSB re-issues remediated PDB files now and then) is reported as an error naming both
hashes, not used silently.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from xfel_spread.atomic import atomic_output
from xfel_spread.errors import UserInputError

#: Where the LS49 project keeps the Fe tables: a git LFS repository, so there is no plain download URL.
LS49_DATA_LOCATION = "https://gitlab.com/cctbx/ls49_big_data (git LFS), directory data_sherrell/"

DOWNLOAD_TIMEOUT_S = 120
_CHUNK_BYTES = 1 << 20


class ReferenceDataError(UserInputError, RuntimeError):
    """A reference file that cannot be obtained or does not match its checksum (one-line message)."""


@dataclass(frozen=True)
class ReferenceFile:
    """One reference file: its name, expected sha256, and where the public copy lives."""

    name: str
    sha256: str
    description: str
    url: str | None  # None: no direct download; a mirror directory is needed
    public_source: str


REFERENCE_FILES: dict[str, ReferenceFile] = {
    entry.name: entry
    for entry in (
        ReferenceFile(
            name="1m2a.pdb",
            sha256="a77e875df9bf54cb29ca012bf82aa8ec74078db7a89dcbf130643d6fd424bf70",
            description="ferredoxin model, PDB entry 1M2A",
            url="https://files.rcsb.org/download/1M2A.pdb",
            public_source="RCSB PDB entry 1M2A",
        ),
        ReferenceFile(
            name="pf-rd-ox_fftkk.out",
            sha256="14565766986616cb060f02fdb055869eab2156546bca2815719e2830a3284f68",
            description="f', f'' of the oxidized Fe site (applied to FE1)",
            url=None,
            public_source=LS49_DATA_LOCATION + "pf-rd-ox_fftkk.out",
        ),
        ReferenceFile(
            name="pf-rd-red_fftkk.out",
            sha256="59148fdfe4360357afb57bac5119ed5128df82c0a29b74e0f06c1d1c0e552e28",
            description="f', f'' of the reduced Fe site (applied to FE2)",
            url=None,
            public_source=LS49_DATA_LOCATION + "pf-rd-red_fftkk.out",
        ),
        ReferenceFile(
            name="Fe_fake.dat",
            sha256="40c9f1b6ae8d75040cda79728ea37e2e725027ba6cbbadf3a2a0aced63e6eaf0",
            description="f', f'' of a metallic-Fe-like site, interpolated to 1 eV",
            url=None,
            public_source=LS49_DATA_LOCATION + "Fe_fake.dat",
        ),
        ReferenceFile(
            name="Fe.dat",
            sha256="863fc4025a6cd2b2df1cf5355b95cbcc0ae761efcf698d300b235d8bc13aa79c",
            description="tabulated Fe f', f'' on a coarse energy grid",
            url=None,
            public_source=LS49_DATA_LOCATION + "Fe.dat",
        ),
    )
}

REFERENCE_NAMES = tuple(REFERENCE_FILES)


def fetch_reference(name: str, dest_dir: str | Path, mirror_dir: str | Path | None = None) -> Path:
    """Place the verified reference file ``name`` in ``dest_dir`` and return its path.

    Copies from ``mirror_dir`` when given, else downloads from the public source. A destination file
    that already matches the checksum is kept as it is.
    """
    entry = _lookup(name)
    destination = Path(dest_dir) / name
    if destination.is_file() and sha256_of_file(destination) == entry.sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    if mirror_dir is not None:
        _copy_verified(entry, Path(mirror_dir) / name, destination)
    else:
        _download_verified(entry, destination)
    return destination


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _lookup(name: str) -> ReferenceFile:
    try:
        return REFERENCE_FILES[name]
    except KeyError:
        raise ReferenceDataError(
            f"{name}: not a known reference file (known: {', '.join(REFERENCE_NAMES)})"
        ) from None


def _copy_verified(entry: ReferenceFile, source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination`` if its checksum is the recorded one."""
    try:
        stream = open(source, "rb")
    except OSError as error:
        raise ReferenceDataError(f"{source}: cannot read mirror copy of {entry.name}: {error.strerror}") from None
    with stream:
        _write_verified(entry, stream, destination, origin=str(source))


def _download_verified(entry: ReferenceFile, destination: Path) -> None:
    """Download ``entry`` from its public URL to ``destination`` if its checksum is the recorded one."""
    if entry.url is None:
        raise ReferenceDataError(
            f"{entry.name}: no direct download exists (public copy: {entry.public_source}); "
            f"set reference.mirror_dir to a directory holding the file"
        )
    try:
        with urllib.request.urlopen(entry.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            _write_verified(entry, response, destination, origin=entry.url)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise ReferenceDataError(
            f"{entry.name}: download from {entry.url} failed: {reason}; "
            f"set reference.mirror_dir to a directory holding the file"
        ) from None


def _write_verified(entry: ReferenceFile, stream: BinaryIO, destination: Path, origin: str) -> None:
    """Stream into ``destination``, hashing on the way; keep the result only if the hash matches."""
    digest = hashlib.sha256()
    with atomic_output(destination) as output:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
            output.write(chunk)
        if digest.hexdigest() != entry.sha256:  # raising here makes atomic_output discard the copy
            raise ReferenceDataError(
                f"{entry.name}: sha256 mismatch for the copy from {origin}: "
                f"expected {entry.sha256}, got {digest.hexdigest()}"
            )

