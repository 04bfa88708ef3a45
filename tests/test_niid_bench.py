"""benchmarks/niid_bench.py: table arithmetic, the result cache, the docs rewrite, and one real tiny cell.

The script is not a package module, so it is loaded from its path; its `base_config` hook is wrapped to
train on one thread, and `--dataset digits --model mlp` keeps the real cell to a second.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "niid_bench.py"
TINY = ["--dataset", "digits", "--model", "mlp", "--clients", "4", "--rounds", "1", "--epochs", "1"]


@pytest.fixture(scope="module")
def nb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("niid_bench", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["niid_bench"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread(nb, monkeypatch):
    base = nb.base_config

    def config(protocol):
        cfg = base(protocol)
        cfg["run"]["threads"] = 1
        return cfg

    monkeypatch.setattr(nb, "base_config", config)


def record(nb, partition="dir0.5", algorithm="fedavg", acc=0.883, mu=None, seed=0, **protocol) -> dict[str, Any]:
    proto = nb.Protocol(**protocol)
    return {"partition": partition, "algorithm": algorithm, "mu": mu, "seed": seed,
            "protocol": nb.asdict(proto), "comparable": proto.comparable, "best_accuracy": acc,
            "final_accuracy": acc - 0.01, "best_round": 40, "status": "completed", "wall_seconds": 1500.0,
            "run_id": "x", "fedloom": "0.1.0", "date": "2026-11-24T00:00:00+00:00",
            "machine": {"cpu": "cpu", "cpu_count": 2, "cpus_usable": 2, "torch_threads": 2, "torch": "2",
                        "python": "3.11"}}


def test_cell_shows_ours_reference_and_the_difference_of_the_numbers_shown(nb):
    assert nb.format_cell(88.3, 88.1) == "88.3 (88.1, +0.2)"
    assert nb.format_cell(88.04, 88.1) == "88.0 (88.1, -0.1)"
    assert nb.format_cell(88.1, 88.1) == "88.1 (88.1, +0.0)"
    assert nb.format_cell(88.3, None) == "88.3 (—)"
    assert nb.format_cell(None, 88.1) == "— (88.1)"


def test_table_rows_partitions_best_fedprox_mu_and_wall_time(nb):
    recs = [record(nb), record(nb, "c2", "fedavg", 0.75),
            record(nb, algorithm="fedprox", acc=0.880, mu=0.01), record(nb, algorithm="fedprox", acc=0.885, mu=0.1)]
    text = nb.table(recs, ["dir0.5", "c2", "c1"], ["fedavg", "fedprox"])
    assert "| Dir(0.5) | 88.3 (88.1, +0.2) | 25.0 min | 88.5 (88.2, +0.3) μ=0.1 | 25.0 min |" in text
    assert "| #C=2 | 75.0 (78.1, -3.1) | 25.0 min | — (78.1) | — |" in text
    assert "| #C=1 | — | — | — | — |" in text
    two_seeds = nb.table([record(nb, acc=0.88), record(nb, acc=0.89, seed=1)], ["dir0.5"], ["fedavg"])
    assert "88.5 (88.1, +0.4) ±0.7 n=2" in two_seeds


def test_cached_cells_with_the_same_protocol_are_skipped(nb, tmp_path, monkeypatch):
    smoke = nb.Protocol(rounds=2)
    results = tmp_path / "r.jsonl"
    nb.append_record(results, record(nb, "iid", rounds=2))
    nb.append_record(results, record(nb, "c2"))  # same cell key, published protocol: not this smoke protocol
    with results.open("a") as f:
        f.write('{"partition": "c3", "algor')  # a line torn by a kill mid-write
    ran: list = []
    monkeypatch.setattr(nb, "run_cell", lambda cell, protocol, runs_dir: ran.append(cell) or
                        record(nb, cell.partition, rounds=protocol.rounds))
    cells = nb.select_cells(["iid", "c2"], ["fedavg"], [0], [0.01])
    out = nb.run_cells(cells, smoke, results, tmp_path / "runs")
    assert [c.partition for c in ran] == ["c2"] and out.skipped == 1
    nb.run_cells(cells, smoke, results, tmp_path / "runs")  # everything cached now
    assert len(ran) == 1
    nb.run_cells(cells, smoke, results, tmp_path / "runs", force=True)
    assert len(ran) == 3
    assert len(nb.load_cache(results)) == 3  # iid + c2 smoke (latest wins) + c2 published


def test_interrupt_keeps_finished_cells_and_failures_do_not_stop_the_rest(nb, tmp_path, monkeypatch, capsys):
    results = tmp_path / "r.jsonl"
    calls = iter([None, ValueError("boom"), KeyboardInterrupt()])

    def fake(cell, protocol, runs_dir):
        err = next(calls)
        if err:
            raise err
        return record(nb, cell.partition, rounds=protocol.rounds)

    monkeypatch.setattr(nb, "run_cell", fake)
    rc = nb.main(["--partitions", "iid,c2,c3", "--algorithms", "fedavg", "--rounds", "2", "--results", str(results),
                  "--no-doc"])
    assert rc == 130
    assert [r["partition"] for r in nb.load_cache(results).values()] == ["iid"]
    err = capsys.readouterr().err
    assert "c2 / fedavg / seed 0: FAILED: ValueError: boom" in err and "interrupted during c3" in err


def test_a_bad_cell_config_is_reported_before_anything_runs(nb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nb, "run_cell", lambda *a: pytest.fail("nothing may run"))
    rc = nb.main(["--algorithms", "fedavg,fedprox", "--mu", "-1", "--results", str(tmp_path / "r.jsonl"), "--no-doc"])
    assert rc == 2
    assert "bad config for" in capsys.readouterr().err


def test_doc_rewrite_keeps_the_text_around_the_markers(nb, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(f"# Title\n\nintro\n\n{nb.BEGIN}\nold table\n{nb.END}\n\n## After\n\nkept\n")
    recs = [record(nb), record(nb, "c2", rounds=1)]
    nb.write_doc(doc, recs, include_other=False)
    text = doc.read_text()
    assert text.startswith("# Title\n\nintro\n\n" + nb.BEGIN) and text.endswith(nb.END + "\n\n## After\n\nkept\n")
    assert "old table" not in text and "88.3 (88.1, +0.2)" in text
    assert "Not comparable" not in text and "| #C=2 | — (78.1) |" in text  # the smoke cell stays out
    nb.write_doc(doc, recs, include_other=True)
    text = doc.read_text()
    assert "Not comparable" in text and "rounds 1 (published 50)" in text
    assert text.count(nb.BEGIN) == 1 and [p.name for p in tmp_path.iterdir()] == ["page.md"]  # no temp left


def test_one_tiny_real_cell_end_to_end(nb, tmp_path, one_thread, capsys):
    results, doc = tmp_path / "r.jsonl", tmp_path / "doc.md"
    args = [*TINY, "--partitions", "dir0.5", "--algorithms", "fedavg", "--results", str(results),
            "--runs-dir", str(tmp_path / "runs"), "--doc", str(doc)]
    assert nb.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 1
    rec = out[0]
    assert rec["partition"] == "dir0.5" and rec["algorithm"] == "fedavg" and rec["status"] == "completed"
    assert rec["comparable"] is False and rec["protocol"]["dataset"] == "digits"
    assert 0 < rec["best_accuracy"] <= 1 and rec["best_round"] == 1 and rec["wall_seconds"] > 0
    assert rec["machine"]["torch_threads"] == 1
    assert [json.loads(line) for line in results.read_text().splitlines()] == out
    assert "Not comparable" in doc.read_text()
    assert nb.main(args) == 0  # cached: skipped
    captured = capsys.readouterr()
    assert "1 of 1 cells already in" in captured.err and "NOT COMPARABLE" in captured.out


def test_a_cell_stopped_by_ctrl_c_resumes_from_its_last_round(nb, tmp_path, one_thread):
    import fedloom

    protocol = nb.Protocol(dataset="digits", model="mlp", clients=4, rounds=3, epochs=1)
    cell = nb.Cell("iid", "fedavg")

    def stop_after_first_round(row):
        if row["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fedloom.run(nb.cell_config(cell, protocol), runs_dir=tmp_path, make_report=False,
                    callback=stop_after_first_round)
    rec = nb.run_cell(cell, protocol, tmp_path)
    assert rec["resumed_run"] and rec["rounds_completed"] == 3 and rec["status"] == "completed"
    assert len(fedloom.runs(tmp_path)) == 1
