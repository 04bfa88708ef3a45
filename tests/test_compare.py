"""`fedloom compare`: the table's numbers against the store's rows, the HTML page, the CLI's exit codes."""

import json
import re
import sqlite3
import sys

import pytest

import fedloom
from fedloom import api, cli
from fedloom.errors import ConfigError, RunError
from fedloom.store import RunStore

from .conftest import small_config

PNG_URI = 'src="data:image/png;base64,'


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A float32 run and the same run with 8-bit uploads, 3 evaluated rounds each."""
    runs_dir = tmp_path_factory.mktemp("compare") / "runs"
    plain = fedloom.run(small_config(), runs_dir=runs_dir, make_report=False)
    q8 = fedloom.run(small_config(pipeline__upload=["q8"]), runs_dir=runs_dir, make_report=False)
    return runs_dir, [plain.run_id, q8.run_id]


def expected_from_db(db, run_id: str) -> dict:
    """The table's numbers recomputed with plain SQL, independently of the code under test."""
    con = sqlite3.connect(db)
    rows = con.execute("SELECT round, bytes_up, bytes_down, test_accuracy FROM rounds WHERE run_id=? ORDER BY round",
                       (run_id,)).fetchall()
    clients_up = con.execute("SELECT SUM(bytes_up) FROM client_rounds WHERE run_id=? AND kind='fit'",
                             (run_id,)).fetchone()[0]
    wall = con.execute("SELECT wall_seconds FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
    con.close()
    accs = [a for _, _, _, a in rows if a is not None]
    up, down = sum(r[1] for r in rows), sum(r[2] for r in rows)
    assert clients_up == up  # the round's bytes are the sum of its clients' messages
    return {"final": sum(accs[-5:]) / len(accs[-5:]), "best": max(accs), "up": up, "down": down, "wall": wall}


def test_table_numbers_match_the_store(two_runs):
    runs_dir, ids = two_runs
    result = api.compare([ids[0][:-2], ids[1]], runs_dir=runs_dir)  # a unique prefix resolves to the whole id
    plain, q8 = result.records
    assert [plain["run_id"], q8["run_id"]] == ids and result.warning is None
    base = expected_from_db(runs_dir / "fedloom.db", ids[0])
    for rec in result.records:
        exp = expected_from_db(runs_dir / "fedloom.db", rec["run_id"])
        assert rec["final_accuracy"] == pytest.approx(exp["final"], rel=1e-12) and rec["final_window"] == 3
        assert rec["best_accuracy"] == exp["best"] and rec["wall_seconds"] == exp["wall"]
        assert (rec["bytes_up"], rec["bytes_down"]) == (exp["up"], exp["down"])
        assert (rec["mb_up"], rec["mb_down"]) == (exp["up"] / 1e6, exp["down"] / 1e6)
        assert rec["up_reduction"] == base["up"] / exp["up"]  # exact: first run's bytes / this run's
        assert rec["down_reduction"] == base["down"] / exp["down"]
    assert (plain["upload_codec"], q8["upload_codec"], q8["download_codec"]) == ("f32", "q8", "f32")
    assert plain["up_reduction"] == 1.0 and 3.5 < q8["up_reduction"] < 4.0  # 8 bits of 32, plus norms and headers
    assert q8["down_reduction"] == 1.0  # the broadcast stayed float32


def test_final_accuracy_is_the_mean_of_the_last_five_evaluated_rounds(tmp_path):
    store = RunStore(tmp_path / "runs" / "fedloom.db")
    accs = {1: 0.1, 2: None, 3: 0.3, 4: 0.9, 5: 0.5, 6: None, 7: 0.6, 8: 0.7}  # rounds 2 and 6 not evaluated
    cfg = {"data": {"dataset": "digits"}, "server": {"algorithm": "scaffold"},
           "pipeline": {"upload": ["topk:0.01", "q8"], "download": ["f16"], "download_delta": True,
                        "error_feedback": True}}
    for run_id, up in (("base", 4000), ("coded", 30)):
        store.create_run(run_id, run_id, cfg, 0, {}, str(tmp_path / run_id), 8, [(0, 10, 5, [5, 5])])
        for r, acc in accs.items():
            metrics = {"upload_codec": "topk:0.01+q8", "error_feedback": True} if run_id == "coded" else {}
            row = {"seconds": 1.0, "num_clients": 1, "bytes_up": up, "bytes_down": 4000, "test_accuracy": acc,
                   "metrics": metrics}
            store.record_round(run_id, r, row, [], wall_seconds=float(r))
    store.create_run("empty", "empty", cfg, 0, {}, str(tmp_path / "empty"), 8, [])  # no round yet
    result = api.compare(["base", "coded", "empty"], runs_dir=tmp_path / "runs")
    base, coded, empty = result.records
    assert base["final_accuracy"] == pytest.approx((0.3 + 0.9 + 0.5 + 0.6 + 0.7) / 5, rel=1e-12)
    assert base["final_window"] == 5 and base["evaluated_rounds"] == 6
    assert (base["best_accuracy"], base["best_round"]) == (0.9, 4)
    assert coded["up_reduction"] == 8 * 4000 / (8 * 30) and coded["down_reduction"] == 1.0
    # what ran comes from the round metrics (the base run's rounds say: plain f32), else from the config
    assert (base["upload_codec"], base["download_codec"], base["error_feedback"]) == ("f32", "f32", False)
    assert (coded["upload_codec"], coded["error_feedback"]) == ("topk:0.01+q8", True)
    assert (empty["upload_codec"], empty["download_codec"], empty["error_feedback"]) == ("topk:0.01+q8", "f16", True)
    assert empty["download_delta"] and not base["download_delta"]
    assert empty["final_accuracy"] is None and empty["best_accuracy"] is None and empty["bytes_up"] == 0
    assert empty["up_reduction"] is None and empty["down_reduction"] is None  # nothing sent: no factor
    assert result.html == tmp_path / "runs" / "compare-base-3.html"
    store.close()


def test_html_page_is_self_contained_with_two_plots(two_runs, tmp_path):
    runs_dir, ids = two_runs
    result = api.compare(ids, runs_dir=runs_dir)
    assert result.html == runs_dir / f"compare-{ids[0]}-2.html" and result.html.is_file()
    page = result.html.read_text()
    assert page.count(PNG_URI) == 2
    for title in ("Accuracy per round", "Accuracy against MB uploaded"):
        assert f"<h2>{title}</h2>" in page
    assert all(run_id in page for run_id in ids) and "last (up to) 5 evaluated rounds" in page
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?://", without_images) and not re.search(r"<(link|script)\b", without_images)
    out = tmp_path / "sub" / "cmp.html"
    assert api.compare(ids, runs_dir=runs_dir, out=out).html == out and out.read_text().count(PNG_URI) == 2


def test_bad_run_lists_are_refused(two_runs):
    runs_dir, ids = two_runs
    with pytest.raises(RunError, match="no run 'nope'"):
        api.compare([ids[0], "nope"], runs_dir=runs_dir)
    with pytest.raises(ConfigError, match="at least 2 runs"):
        api.compare([ids[0]], runs_dir=runs_dir)
    with pytest.raises(ConfigError, match="given twice"):
        api.compare([ids[0], ids[0][:-1]], runs_dir=runs_dir)
    with pytest.raises(ConfigError, match="run_ids must be a list of run ids"):
        api.compare(ids[0], runs_dir=runs_dir)  # one id as a string is not a list of its characters


def test_an_unwritable_page_is_one_line_naming_it(two_runs, tmp_path):
    runs_dir, ids = two_runs
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunError, match=r"cannot write .*afile") as info:
        api.compare(ids, runs_dir=runs_dir, out=tmp_path / "afile" / "page.html")
    assert "--output" in info.value.hint


def test_different_datasets_are_compared_with_a_warning(tmp_path):
    store = RunStore(tmp_path / "runs" / "fedloom.db")
    for run_id, dataset in (("a", "digits"), ("b", "mnist")):
        store.create_run(run_id, run_id, {"data": {"dataset": dataset}}, 0, {}, str(tmp_path / run_id), 1, [])
        store.record_round(run_id, 1, {"seconds": 1.0, "num_clients": 1, "bytes_up": 8, "bytes_down": 8,
                                       "test_accuracy": 0.5}, [], wall_seconds=1.0)
    store.close()
    result = api.compare(["a", "b"], runs_dir=tmp_path / "runs")
    assert result.warning is not None and "\n" not in result.warning
    assert "digits: a" in result.warning and "mnist: b" in result.warning and len(result.records) == 2


def fedloom_main(monkeypatch, capsys, *args):
    """The CLI in process (as `fedloom ARGS`): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedloom", *args])
    monkeypatch.setenv("COLUMNS", "200")  # the CLI sizes its consoles when it starts
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_the_table_and_exits_0_or_1(two_runs, monkeypatch, capsys):
    runs_dir, ids = two_runs
    code, out, err = fedloom_main(monkeypatch, capsys, "compare", *ids, "--runs-dir", str(runs_dir))
    assert code == 0 and err == ""
    assert all(run_id in out for run_id in ids) and "q8" in out and "last (up to) 5" in out
    assert f"page: {runs_dir / f'compare-{ids[0]}-2.html'}" in out
    code, out, _ = fedloom_main(monkeypatch, capsys, "compare", *ids, "--json", "--runs-dir", str(runs_dir))
    assert code == 0 and json.loads(out) == api.compare(ids, runs_dir=runs_dir).records
    code, out, err = fedloom_main(monkeypatch, capsys, "compare", ids[0], "nope", "--runs-dir", str(runs_dir))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and out == "" and len(lines) == 1 and "no run 'nope'" in lines[0]
