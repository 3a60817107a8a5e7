"""docs/benchmarks.md and README's Performance table are what scripts/results_reference.py renders from
docs/results/, and their figures are the results files' values (read here straight from the JSON)."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
_spec = importlib.util.spec_from_file_location("results_reference", ROOT / "scripts" / "results_reference.py")
rr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rr)


def _raw(name):
    return json.loads((RESULTS / name).read_text())


def _table(text: str, heading: str) -> list[list[str]]:
    """Cells of the first table after `heading`, header row first."""
    rows: list[list[str]] = []
    for line in text.split(f"\n{heading}\n", 1)[1].splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows and not line.startswith("|"):
            return rows
    return rows


def _near(cell: str, value: float, scale: float = 1.0) -> bool:
    """`cell` (a number, maybe with a k/%/x suffix) shows `value` to the precision it prints."""
    number = re.match(r"-?[\d.]+", cell).group(0)
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) - value * scale) <= 0.5 * 10**-decimals + 1e-12


def _doc() -> str:
    return rr.DOC.read_text()


def test_committed_pages_equal_the_rendering_of_the_results_files():
    assert rr.main(["--check"]) == 0


def test_each_page_is_at_most_300_lines():
    for page in rr.PAGES:
        assert len(page.read_text().splitlines()) <= 300, page


def test_a_changed_results_file_makes_the_check_fail(tmp_path):
    for name in {f for sections in rr.PAGES.values() for s in sections for f in s["files"]}:
        shutil.copy(RESULTS / name, tmp_path / name)
    data = _raw("pack_fa4_mha.json")
    fa4_packed = next(r for r in data["rows"] if r["mode"] == "packed" and r["kernel"] == "fa4")
    fa4_packed["ms"] += 0.1
    (tmp_path / "pack_fa4_mha.json").write_text(json.dumps(data))
    assert rr.main(["--check", "--results", str(tmp_path)]) == 1


def test_every_cited_file_has_a_date_and_every_dated_file_is_cited():
    cited = {f for sections in rr.PAGES.values() for s in sections for f in s["files"]}
    assert set(rr.DATES) <= cited  # no stale date entries
    assert all((RESULTS / f).is_file() for f in cited)
    undated = [
        f
        for f in cited
        if f not in rr.DATES
        and "date" not in (json.loads((RESULTS / f).read_text()).get("meta", {}) if f.endswith(".json") else {})
    ]
    assert not undated, undated  # a date from the spec or from the bench's meta


def test_spec_words_with_a_figure_are_refused():
    with pytest.raises(ValueError, match="typed figure"):
        rr.words("fa4 runs 1.49x faster")
    assert rr.words("fa4 in bf16 against float64") == "fa4 in bf16 against float64"


def test_tutorial_table_shows_the_files_times_and_memory():
    table = _table(_doc(), "## 1. The tutorial's table reproduced")
    head, body = table[0], {row[0]: row for row in table[1:]}
    rows = _raw("tutorial.json")["rows"]
    assert sorted(body, key=int) == sorted({str(r["seq_len"]) for r in rows}, key=int)
    for r in rows:
        if r["kernel"] != "auto":
            row = body[str(r["seq_len"])]
            assert _near(row[head.index(f"{r['kernel']} ms")], r["ms"])
            assert _near(row[head.index(f"{r['kernel']} MiB")], r["peak_mib"])


def test_packing_table_shows_fa4s_latest_packed_time_not_an_older_claim():
    table = _table(_doc(), "## 3. Packed documents per kernel")
    head = table[0]
    fa4 = next(r for r in _raw("pack_fa4_mha.json")["rows"] if r["mode"] == "packed" and r["kernel"] == "fa4")
    cells = [row[head.index("fa4 ms (MiB)")] for row in table[1:] if row[head.index("fa4 ms (MiB)")]]
    packed = [c for c in cells if _near(c, fa4["ms"])]
    assert len(packed) == 1 and _near(packed[0].split("(")[1], fa4["peak_mib"])


def test_gpt2_table_and_readme_show_the_124m_rows():
    rows = _raw("train_gpt2_124m_b32.json")["rows"]
    lit, plain = rows[0], next(r for r in rows if r["variant"].startswith("loop+rows"))
    table = _table(_doc(), "### GPT-2 124M")
    head, row = table[0], table[1]
    assert row[head.index("variant")] == f"`{lit['variant']}`"
    assert _near(row[head.index("ms/step")], lit["ms_per_step"])
    assert _near(row[head.index("tokens/s")], lit["tokens_per_s"], 1e-3)
    assert _near(row[head.index("MFU")], lit["mfu"], 100)
    mfu_plain = plain["mfu"] * plain["ms_per_step"] / lit["ms_per_step"]
    assert _near(row[head.index("MFU, plain loop's count")], mfu_plain, 100)
    readme = rr.README.read_text().split(rr.BEGIN, 1)[1].split(rr.END, 1)[0]
    assert f"MFU {100 * mfu_plain:.1f}%" in readme


def test_monitor_and_correctness_tables_show_the_files_counts_and_ratios():
    doc = _doc()
    table = _table(doc, "## 5. Monitoring overhead")
    lit = _raw("monitors_overhead_default_abba.json")["rows"][1]
    row = next(r for r in table if r[1] == f"`{lit['variant']}`")
    assert _near(row[table[0].index("ratio")], lit["ratio_vs_first"])
    assert row[table[0].index("hooks µs")] == str(lit["hook_us"]["total"])
    table = _table(doc, "## 7. Correctness vs float64")
    for row in table[1:]:
        results = _raw(f"{row[0]}.json")["rows"]
        for kernel in {r["kernel"] for r in results}:
            mine = [r for r in results if r["kernel"] == kernel]
            passed = sum(r["status"] == "pass" for r in mine)
            assert row[table[0].index(kernel)].startswith(f"{passed}/{len(mine)}")
