import csv
import math

import numpy as np
import pytest

from gmcert.report import (
    COHEN_COLUMNS, COLUMNS, CertifyWriter, average_certified_radius, certificate_row,
    certified_accuracy, certified_accuracy_lower_bound, parse_seconds, read_tsv, summarize,
)
from gmcert.results import Certificate


def _rows(seed=0, n=200):
    rng = np.random.default_rng(seed)
    rows = []
    for idx in range(n):
        label = int(rng.integers(3))
        pred = label if rng.random() < 0.8 else int(rng.integers(-1, 3))
        kind = "exact" if idx % 3 else "estimate"
        cert = Certificate(pred, float(rng.exponential()), kind, "closed_form", time=rng.random())
        rows.append(certificate_row(idx, label, cert))
    return rows


def test_tsv_matches_cohen_columns_and_types(tmp_path):
    out = tmp_path / "r.tsv"
    with CertifyWriter(out) as writer:
        for row in _rows():
            writer.write(row)
    with open(out) as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader)
        assert tuple(header[:6]) == COHEN_COLUMNS
        for fields in reader:
            int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
            assert fields[4] in ("0", "1")
            assert parse_seconds(fields[5]) >= 0.0
    assert not (tmp_path / "r.tsv.partial").exists()


def test_certified_accuracy_matches_independent_computation(tmp_path):
    rows = _rows(1)
    out = tmp_path / "r.tsv"
    with CertifyWriter(out) as writer:
        for row in rows:
            writer.write(row)
    radii = [0.0, 0.25, 0.5, 1.0, 2.0]
    # Independent: parse the file with the csv module and count by hand.
    with open(out) as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    expected = [sum(int(t["correct"]) == 1 and float(t["radius"]) >= r for t in table) / len(table) for r in radii]
    np.testing.assert_allclose(certified_accuracy(out, radii), expected)
    np.testing.assert_allclose(certified_accuracy(rows, radii), expected)
    acr = sum(float(t["radius"]) for t in table if t["correct"] == "1") / len(table)
    assert math.isclose(average_certified_radius(rows), acr)


def test_lower_bound_is_below_and_close_to_observed():
    rows = _rows(2, n=2000)
    radii = [0.0, 0.5, 1.0]
    acc = certified_accuracy(rows, radii)
    lower = certified_accuracy_lower_bound(rows, radii, alpha=0.05)
    assert np.all(lower < acc) and np.all(acc - lower < 0.03)


def test_summary_keeps_estimates_out_of_certified_figures():
    rows = _rows(3)
    summary = summarize(rows, [0.0, 0.5])
    sound_only = [r if r["radius_kind"] == "exact" else {**r, "radius": 0.0} for r in rows]
    assert summary["certified_accuracy"][1] == pytest.approx(certified_accuracy(sound_only, [0.5])[0])
    assert summary["estimated_certified_accuracy"][1] > summary["certified_accuracy"][1]
    assert summary["rows_by_radius_kind"]["estimate"] + summary["rows_by_radius_kind"]["exact"] == len(rows)


def test_resume_after_kill_gives_identical_file(tmp_path):
    rows = _rows(4, n=50)
    whole = tmp_path / "whole.tsv"
    with CertifyWriter(whole) as writer:
        for row in rows:
            writer.write(row)
    cut = tmp_path / "cut.tsv"
    writer = CertifyWriter(cut)
    for row in rows[:20]:
        writer.write(row)
    writer._file.write("21\t0\t1\t0.5")  # a torn line, as a kill mid-write leaves it
    writer._file.close()
    resumed = CertifyWriter(cut)
    assert resumed.done == set(range(20))
    for row in rows:
        if row["idx"] not in resumed.done:
            resumed.write(row)
    resumed.close()
    assert cut.read_text() == whole.read_text()
    assert [r["idx"] for r in read_tsv(cut)] == list(range(50))


def test_read_tsv_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a certify TSV"):
        read_tsv(bad)
    assert COLUMNS[:6] == COHEN_COLUMNS
