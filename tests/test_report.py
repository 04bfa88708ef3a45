import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedloom.reporting import make_plots, write_report, write_tensorboard
from fedloom.reporting.html import fmt_bytes, fmt_pct, pipeline_used
from fedloom.reporting.plots import accuracy_by_mb
from fedloom.store import RunStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_KEYS = {"accuracy_loss", "accuracy_mb", "client_spread", "fairness", "label_heatmap", "update_norms"}
ACCURACY = {1: 0.52, 2: 0.7345, 3: 0.71}  # the best round is not the last
CONFIG = {
    "name": "tiny",
    "data": {"dataset": "digits", "num_clients": 3, "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "mlp"},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
    "server": {"algorithm": "fedavg", "optimizer": "sgd", "lr": 1.0},
    "run": {"rounds": 3, "seed": 7},
}


def round_row(r: int) -> dict:
    acc = ACCURACY[r]
    return {
        "seconds": 0.5 * r, "num_clients": 3, "bytes_up": 1_000_000 * r, "bytes_down": 2_000_000 * r,
        "train_loss": 1.5 / r, "test_loss": 1.2 / r, "test_accuracy": acc, "test_macro_f1": acc - 0.05,
        "metrics": {
            "lr": 0.05, "fed_accuracy": acc - 0.01, "fed_accuracy_min": acc - 0.2,
            "fed_accuracy_p10": acc - 0.15, "fed_accuracy_median": acc, "fed_accuracy_max": acc + 0.1,
            "update_norm_mean": 2.0 / r,
            "cosine_mean": 0.3 + 0.1 * r,
        },
    }


def client_rows(r: int) -> list[dict]:
    rows = []
    for c in range(3):
        rows.append({"client_id": c, "kind": "fit", "num_examples": 100 + c, "loss": 1.0 / r,
                     "update_norm": 1.0 + c / r, "update_mean": 0.0, "update_std": 0.01, "cosine": 0.5,
                     "bytes_up": 1000, "seconds": 0.1})
        rows.append({"client_id": c, "kind": "eval", "num_examples": 30, "loss": 0.9 / r,
                     "accuracy": ACCURACY[r] - 0.1 * c, "macro_f1": 0.5})
    return rows


def make_run(store: RunStore, tmp_path, run_id: str = "tiny-run-1", rounds: int = 3, name: str = "tiny"
             ) -> str:
    """A run of 3 clients and 3 planned rounds, with `rounds` of them recorded."""
    clients = [(0, 100, 30, [50, 30, 20]), (1, 101, 30, [0, 1, 100]), (2, 102, 30, [34, 34, 34])]
    versions = {"fedloom": "0.1.0", "torch": "2.13.0"}
    store.create_run(run_id, name, CONFIG, 7, versions, str(tmp_path / run_id), 3, clients)
    for r in range(1, rounds + 1):
        store.record_round(run_id, r, round_row(r), client_rows(r), wall_seconds=1.5 * r)
    return run_id


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs" / "fedloom.db")
    yield s
    s.close()


def test_html_report_is_self_contained_and_complete(store, tmp_path):
    run_id = make_run(store, tmp_path)
    store.set_status(run_id, "diverged", "diverging at round 3: try a lower learning rate", wall_seconds=4.5)
    path = write_report(store, run_id)
    assert path == tmp_path / run_id / "report.html"  # default: the run's output dir
    page = path.read_text()
    assert run_id in page and "diverged" in page and "try a lower learning rate" in page
    assert f"{fmt_pct(0.7345)} (round 2)" in page and "73.45%" in page  # best accuracy, not the final one
    assert f"{fmt_pct(0.71)} (round 3)" in page
    assert fmt_bytes(6_000_000) in page and "6.0 MB (6,000,000 bytes)" in page  # bytes up over 3 rounds
    assert "12.0 MB (12,000,000 bytes)" in page
    for text in ("digits", "dirichlet (alpha = 0.5)", "mlp", "fedavg", "<td>7</td>", "2.13.0"):
        assert text in page, text
    assert page.count('src="data:image/png;base64,') == len(PLOT_KEYS)
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?://", without_images)
    assert not re.search(r"<(link|script)\b", without_images)
    # per-client table of the last evaluated round: client 2 scored 0.71 - 0.2 and its last norm is 1 + 2/3
    assert "Clients (round 3)" in page and "51.00%" in page and "1.667" in page
    # fairness of the three clients' accuracies 0.71, 0.61, 0.51, recomputed: this run predates fair_* metrics
    assert "<h2>Fairness across clients</h2>" in page and "<th>mean client accuracy</th>" in page
    assert '<td class="num">61.00%</td>' in page and "3 clients, each counting once." in page
    assert "<h2>Diagnosis</h2>" in page and "<h2>Personalization</h2>" not in page
    assert "upload codec" not in page  # f32 both ways: no codec rows in the summary
    for key in PLOT_KEYS:
        assert (tmp_path / run_id / f"{key}.png").read_bytes().startswith(PNG_MAGIC)


def test_accuracy_against_cumulative_mb_uploaded(store, tmp_path):
    run_id = make_run(store, tmp_path)  # round r uploads r MB: 1, 3, 6 MB by the end of rounds 1, 2, 3
    rounds = store.rounds(run_id)
    assert accuracy_by_mb(rounds) == ([1.0, 3.0, 6.0], [ACCURACY[1], ACCURACY[2], ACCURACY[3]])
    rounds[1]["test_accuracy"] = None  # an unevaluated round has no point, but its bytes still count
    assert accuracy_by_mb(rounds) == ([1.0, 6.0], [ACCURACY[1], ACCURACY[3]])
    assert accuracy_by_mb([]) == ([], [])
    page = write_report(store, run_id).read_text()
    titles = ["Accuracy and loss", "Accuracy against data uploaded", "Accuracy across clients"]
    positions = [page.index(f"<h2>{t}</h2>") for t in titles]
    assert positions == sorted(positions)  # right after accuracy per round
    figure = page[positions[1]:positions[2]]
    assert figure.count('src="data:image/png;base64,') == 1 and "megabytes" in figure


def test_summary_shows_the_codecs_a_run_used(store, tmp_path):
    plain = make_run(store, tmp_path)
    assert pipeline_used(store.rounds(plain)) == {}  # f32 both ways: the summary has no codec rows
    clients = [(0, 100, 30, [50, 50])]
    store.create_run("coded", "coded", CONFIG, 7, {}, str(tmp_path / "coded"), 2, clients)
    pipeline = {"client_transforms": ["clip"], "upload_codec": "topk:0.01+q8+zstd", "error_feedback": True,
                "download_codec": "q8", "download_delta": True}
    for r in (1, 2):
        row = round_row(r)
        row["metrics"].update(pipeline)
        store.record_round("coded", r, row, [], wall_seconds=float(r))
    page = write_report(store, "coded").read_text()
    assert "<th>upload codec</th><td>topk:0.01+q8+zstd with error feedback</td>" in page
    assert "<th>download codec</th><td>q8 of the delta</td>" in page
    assert "<th>client transforms</th><td>clip</td>" in page


def test_plots_are_png_files(store, tmp_path):
    run_id = make_run(store, tmp_path)
    paths = make_plots(store, run_id, tmp_path / "plots")
    assert set(paths) == PLOT_KEYS
    for p in paths.values():
        assert p.parent == tmp_path / "plots" and p.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("rounds", [0, 1])
def test_report_of_a_run_with_no_or_one_round(store, tmp_path, rounds):
    run_id = make_run(store, tmp_path, rounds=rounds)
    out = tmp_path / "elsewhere"
    path = write_report(store, run_id, out)
    page = path.read_text()
    assert path == out / "report.html" and run_id in page
    assert page.count("data:image/png;base64,") == len(PLOT_KEYS)
    assert f"{rounds} / 3" in page


def test_report_tolerates_missing_metrics_and_unevaluated_rounds(store, tmp_path):
    store.create_run("bare", "bare", {}, 0, {}, str(tmp_path / "bare"), 2, [(0, 10, 0, [])])
    row = {"seconds": 1.0, "num_clients": 1, "bytes_up": 10, "bytes_down": 20}  # no losses, no metrics
    fit = {"client_id": 0, "kind": "fit", "num_examples": 10}  # no update norm
    store.record_round("bare", 1, row, [fit], wall_seconds=1.0)
    page = write_report(store, "bare").read_text()
    assert "No federated evaluation recorded yet." in page and "10 B (10 bytes)" in page


def test_many_clients_are_summarised(store, tmp_path):
    n = 60
    store.create_run("big", "big", CONFIG, 0, {}, str(tmp_path / "big"), 2,
                     [(c, 10, 5, [c % 3, 5, 1, 0]) for c in range(n)])
    for r in (1, 2):
        fits = [{"client_id": c, "kind": "fit", "num_examples": 10, "update_norm": 1.0 + c / n}
                for c in range(n)]
        evals = [{"client_id": c, "kind": "eval", "num_examples": 5, "loss": 1.0, "accuracy": c / n}
                 for c in range(n)]
        personal = [{"client_id": c, "kind": "personal", "num_examples": 5, "loss": 0.5, "accuracy": 0.5 + c / (2 * n)}
                    for c in range(n)]
        row = round_row(r)
        row["metrics"]["pers_accuracy"] = 0.75
        store.record_round("big", r, row, fits + evals + personal, wall_seconds=float(r))
    paths = make_plots(store, "big", tmp_path / "big")
    assert set(paths) == PLOT_KEYS | {"personalization"}  # drawn as a scatter: too many clients for bars
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths.values())


def test_run_strings_are_escaped(store, tmp_path):
    run_id = make_run(store, tmp_path, name="<script>alert(1)</script>")
    store.set_status(run_id, "failed", "client 1 failed: x < y & z")
    page = write_report(store, run_id).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x &lt; y &amp; z" in page


def test_tensorboard_scalars_match_the_store(store, tmp_path):
    run_id = make_run(store, tmp_path)
    log_dir = tmp_path / "tb"
    for _ in range(2):  # exporting again replaces the events instead of duplicating every round
        assert write_tensorboard(store, run_id, log_dir) == log_dir
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test/accuracy", "test/loss", "fed/accuracy_p10", "comm/bytes_up", "update/cosine_mean",
            "time/seconds"} <= tags
    events = acc.Scalars("test/accuracy")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([ACCURACY[r] for r in (1, 2, 3)], rel=1e-6)
    assert [e.value for e in acc.Scalars("comm/bytes_down")] == [2e6, 4e6, 6e6]
