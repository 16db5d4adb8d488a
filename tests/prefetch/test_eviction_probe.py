"""The eviction probe reproduces the table in docs/eviction.md (real pages, real child)."""

from __future__ import annotations

import pytest

from expertpred.prefetch.eviction import EVICTORS, SITUATIONS, format_table, measure

# dropped everything (True) or nothing (False), per (evictor, situation); docs/eviction.md
EXPECTED = {
    "fadvise_dontneed": (False, False, False, True),
    "madvise_dontneed": (False, False, False, False),
    "madvise_cold": (False, False, False, False),
    "madvise_pageout": (True, False, False, False),
    "dontneed_both": (True, False, False, True),
    "pageout_fadvise": (True, False, False, True),
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory, model_file):
    import shutil

    from .conftest import make_cold

    path = tmp_path_factory.mktemp("probe") / "probe.gguf"
    shutil.copyfile(model_file, path)
    make_cold(path)
    return measure(path, nbytes=256 << 10)


def test_every_cell_measured(rows):
    assert {(r.evictor, r.situation) for r in rows} == {
        (e, s) for e in EVICTORS for s in SITUATIONS}
    assert all(r.before == r.pages for r in rows), "set-up did not make every page resident"
    assert "| evictor |" in format_table(rows)


@pytest.mark.parametrize("evictor", sorted(EXPECTED))
def test_eviction_table_matches_docs(rows, evictor):
    got = {r.situation: r.dropped for r in rows if r.evictor == evictor}
    for situation, dropped in zip(SITUATIONS, EXPECTED[evictor]):
        if dropped:
            # MADV_PAGEOUT is best effort: a page another reclaimer has isolated at that
            # moment is skipped (a fresh-clone CI run beside a busy `expertpred demo` saw
            # 60 of 64 pages dropped; this machine also runs DAMON's kdamond). "Dropped"
            # means nearly all; "kept" stays exact.
            assert got[situation] >= 0.9, (evictor, situation, got[situation])
        else:
            assert got[situation] == 0.0, (evictor, situation)
