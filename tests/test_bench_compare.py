"""``lit-xf bench compare``: figures of a rerun against committed results files."""

import json

import pytest

from lit_xf.bench.cli import main
from lit_xf.bench.compare import compare_rows

BANDS = {"time": 0.05, "memory": 0.02}


def _write(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps({"meta": {"gpu": "test"}, "rows": rows}))


def test_rows_match_by_identity_and_move_only_beyond_their_band():
    old = [
        {"kernel": "fa4", "mode": "packed", "docs": 256, "ms": 5.00, "peak_mib": 2475.0, "tflops": 200.0},
        {"kernel": "xformers", "mode": "packed", "docs": 256, "ms": 7.80, "peak_mib": 2603.0},
        {"kernel": "sdpa", "mode": "padded", "docs": 256, "ms": 40.0},
    ]
    new = [  # fa4: 32% slower and 52% more memory; xformers within the bands; sdpa gone; flex new
        {"kernel": "xformers", "mode": "packed", "docs": 256, "ms": 7.95, "peak_mib": 2610.0},
        {"kernel": "fa4", "mode": "packed", "docs": 256, "ms": 6.60, "peak_mib": 3774.0, "tflops": 151.5},
        {"kernel": "flex", "mode": "packed", "docs": 256, "ms": 11.9},
    ]
    changes, unmatched = compare_rows("pack.json", old, new, BANDS)
    assert {(c.row, c.metric, c.regressed) for c in changes} == {
        ("kernel=fa4 mode=packed docs=256", "ms", True),
        ("kernel=fa4 mode=packed docs=256", "peak_mib", True),
        ("kernel=fa4 mode=packed docs=256", "tflops", True),
    }
    assert unmatched == ["pack.json: only in old: kernel=sdpa mode=padded docs=256",
                         "pack.json: only in new: kernel=flex mode=packed docs=256"]  # fmt: skip
    faster, _ = compare_rows("pack.json", new[1:2], old[:1], BANDS)  # the other way round: improvements
    assert faster and not any(c.regressed for c in faster)


def test_step_time_band_widens_to_the_old_runs_spread_and_correctness_compares_status():
    old = [{"variant": "lit_xf", "ms_per_step": 5.0, "ms_range": "4.0-6.0", "tokens_per_s": 1000.0}]
    inside = [{"variant": "lit_xf", "ms_per_step": 5.9, "tokens_per_s": 850.0}]  # within the old runs' ±20%
    assert compare_rows("t.json", old, inside, BANDS) == ([], [])
    outside = [{"variant": "lit_xf", "ms_per_step": 6.5, "tokens_per_s": 770.0}]
    changes, _ = compare_rows("t.json", old, outside, BANDS)
    assert [(c.metric, c.regressed, round(c.band, 3)) for c in changes] == [
        ("ms_per_step", True, 0.2), ("tokens_per_s", True, 0.2)]  # fmt: skip

    passed = [{"kernel": "fa4", "dtype": "bf16", "mask": "packed", "status": "pass", "max_rel_err": 4e-3}]
    failed = [{"kernel": "fa4", "dtype": "bf16", "mask": "packed", "status": "FAIL", "max_rel_err": 9e-1}]
    (change,) = compare_rows("c.json", passed, failed, BANDS)[0]
    assert (change.metric, change.old, change.new, change.regressed) == ("status", "pass", "FAIL", True)
    (change,) = compare_rows("c.json", failed, passed, BANDS)[0]
    assert not change.regressed


def test_cli_exit_status_and_report(tmp_path, capsys):
    committed, rerun = tmp_path / "committed", tmp_path / "rerun"
    _write(committed, "pack.json", [{"kernel": "fa4", "ms": 5.0, "peak_mib": 100.0}])
    _write(rerun, "pack.json", [{"kernel": "fa4", "ms": 5.1, "peak_mib": 100.5}])
    _write(rerun, "brand_new.json", [{"kernel": "fa4", "ms": 1.0}])
    (rerun / "notes.json").write_text(json.dumps({"what": "a probe's dict, no rows"}))
    assert main(["compare", str(rerun), "--against", str(committed)]) == 0
    out = capsys.readouterr().out
    assert "brand_new.json: new file" in out and "1 files compared: 0 figures moved" in out
    assert not list(rerun.glob("compare*")), "compare writes no files"

    _write(rerun, "pack.json", [{"kernel": "fa4", "ms": 5.0, "peak_mib": 150.0}])
    assert main(["compare", str(rerun), "--against", str(committed)]) == 1
    assert "REGRESSED  pack.json: kernel=fa4: peak_mib 100.0 -> 150.0 (1.500x, band ±2.0%)" in capsys.readouterr().out

    (tmp_path / "elsewhere").mkdir()
    assert main(["compare", str(rerun), "--against", str(tmp_path / "elsewhere")]) == 1  # nothing to compare
    with pytest.raises(SystemExit, match="is not a folder of results files"):
        main(["compare", str(tmp_path / "missing")])
