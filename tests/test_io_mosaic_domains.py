"""The free domains' table (xfel_spread.io.mosaic_domains): what is written is read back, and a table
that is not one is refused in one line naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from xfel_spread.io.mosaic_domains import (DOMAIN_COLUMNS, MosaicDomainsError, read_domain_vectors,
                                           write_domain_vectors)


def centred(seed: int, n_domains: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(0.0, 0.03, (n_domains, 3))
    return vectors - vectors.mean(axis=0)


def test_vectors_come_back_to_ten_digits_lattices_in_order(tmp_path):
    path = tmp_path / "s_domains.tsv"
    vectors = {7: centred(1, 25), 2: centred(2, 4)}
    write_domain_vectors(vectors, path)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(DOMAIN_COLUMNS) and len(lines) == 1 + 25 + 4
    assert lines[1].split("\t")[:2] == ["2", "0"] and lines[-1].split("\t")[:2] == ["7", "24"]
    back = read_domain_vectors(path)
    assert sorted(back) == [2, 7]
    for lattice, written in vectors.items():
        assert back[lattice].shape == written.shape
        assert np.abs(back[lattice] - written).max() <= 1e-10 * np.abs(written).max()


def test_no_free_domains_is_the_header_alone(tmp_path):
    path = tmp_path / "s_domains.tsv"
    write_domain_vectors({}, path)
    assert path.read_text() == "\t".join(DOMAIN_COLUMNS) + "\n"
    assert read_domain_vectors(path) == {}


HEADER = "\t".join(DOMAIN_COLUMNS)


@pytest.mark.parametrize("rows, message", [
    (["0\t0\t0.01\t0\t0", "0\t2\t-0.01\t0\t0"], r":3: lattice 0's domains must be numbered 0, 1, \.\.\. in order"),
    (["0\t0\t0.01\t0\t0", "0\t1\t-0.01\t0\t0", "1\t0\t0.01\t0\t0", "1\t1\t-0.01\t0\t0", "0\t2\t0\t0\t0"],
     r":6: lattice 0 given twice"),
    (["0\t0\t0.01\t0\t0", "0\t1\tx\t0\t0"], r":3: not a domains-table row"),
    (["0\t0\t0.01\t0\t0", "0\t1\tnan\t0\t0"], r":3: lattice must be at least 0 and the vector finite"),
    (["-1\t0\t0.01\t0\t0"], r":2: lattice must be at least 0"),
    (["3\t0\t0\t0\t0"], r": lattice 3 has 1 domain; free domains are at least 2"),
    (["0\t0\t0.01\t0\t0", "0\t1\t0.01\t0\t0"], r": lattice 0's domain vectors do not sum to zero"),
])
def test_a_table_that_is_not_one_is_refused_in_one_line(tmp_path, rows, message):
    path = tmp_path / "bad_domains.tsv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    with pytest.raises(MosaicDomainsError, match=f"^{path}{message}") as error:
        read_domain_vectors(path)
    assert "\n" not in str(error.value)


def test_a_table_without_the_columns_is_refused(tmp_path):
    path = tmp_path / "s_shots.tsv"
    path.write_text("shot\timage\n0\t0\n")
    with pytest.raises(MosaicDomainsError, match=f"^{path}: domains table lacks column"):
        read_domain_vectors(path)
