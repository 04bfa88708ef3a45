"""The round pipeline: client transforms, error feedback, the client state store, codecs on every engine."""

import json

import pytest
import torch

import fedloom
from fedloom.client.state_store import ClientStateStore
from fedloom.config import load_config
from fedloom.engines.base import ClientReply, unpacked
from fedloom.errors import ConfigError
from fedloom.params import load_tensors
from fedloom.pipeline import wire
from fedloom.pipeline.codecs import parse_codec
from fedloom.pipeline.transforms import ClientPipeline, ClipNorm, StageContext
from fedloom.store import RunStore

from .conftest import small_config


def ctx(round_=1, client=0):
    return StageContext(round_, client, 0, 10)


# ---- transforms and error feedback -------------------------------------------------------------------------

def test_clip_bounds_the_norm_and_leaves_small_updates_alone():
    clip = ClipNorm(2.0)
    big = torch.tensor([3.0, 4.0])
    out, _ = clip.apply(big, {}, ctx())
    assert float(out.norm()) == pytest.approx(2.0) and torch.allclose(out / out.norm(), big / big.norm())
    small = torch.tensor([0.3, 0.4])
    assert torch.equal(clip.apply(small, {}, ctx())[0], small)


def test_error_feedback_accounting_sent_plus_residual_equals_sum_of_updates():
    """Σ_t decode(sent_t) + residual_T = Σ_t u_t exactly (up to float rounding): nothing the codec drops is lost."""
    pipe = ClientPipeline([], ["topk:0.05", "q4"], error_feedback=True)
    g = torch.Generator().manual_seed(1)
    state: dict = {}
    total_u = torch.zeros(257, dtype=torch.float64)
    total_sent = torch.zeros(257, dtype=torch.float64)
    for r in range(1, 30):
        u = torch.randn(257, generator=g)
        enc, state = pipe.run(u, state, ctx(r))
        sent = parse_codec(enc.codec).decode(enc.payload, 257)
        total_u += u.double()
        total_sent += sent.double()
    assert torch.allclose(total_sent + state["ef/residual"].double(), total_u, atol=1e-4)
    # and the codec really dropped most values each round (so the test is not vacuous)
    assert int((sent != 0).sum()) <= 13


def test_pipeline_without_stages_is_identity_and_keeps_no_state():
    pipe = ClientPipeline()
    u = torch.randn(10)
    enc, state = pipe.run(u, {}, ctx())
    assert pipe.identity and enc.payload is None and enc.vector is u and state == {}


def test_bad_pipeline_config_names_the_key_and_a_close_choice():
    with pytest.raises(ConfigError, match=r"pipeline.upload.*topp.*did you mean 'topk'"):
        load_config(small_config(pipeline__upload=["topp:0.01"]))
    with pytest.raises(ConfigError, match="pipeline"):
        load_config(small_config(pipeline__client=["clap:1"]))
    with pytest.raises(ConfigError, match="server.aggregator|aggregator 'meen'"):
        load_config(small_config(server__aggregator="meen"))
    cfg = load_config(small_config(pipeline__upload="topk:0.1+q8+zstd"))  # a "+"-joined string is a chain too
    assert cfg.pipeline.upload == ["topk:0.1", "q8", "zstd"]


# ---- client state store --------------------------------------------------------------------------------------

def test_state_store_versions_truncate_and_prune(tmp_path):
    st = ClientStateStore(tmp_path / "s.sqlite")
    for r in (1, 2, 3):
        st.put(r, {0: {"x": torch.full((3,), float(r))}, r + 10: {"x": torch.zeros(1)}})
    assert st.get(0)["x"][0] == 3 and st.get(0, at_round=2)["x"][0] == 2
    assert set(st.get_many([0, 11, 12, 99], at_round=2)) == {0, 11, 12}
    st.truncate_after(2)
    assert st.get(0)["x"][0] == 2 and st.get(13) == {}
    st.prune(2)  # a checkpoint at round >= 2 needs only the newest version at or before 2
    assert st.versions() == 3 and st.get(0, at_round=2)["x"][0] == 2 and st.get(11)["x"].shape == (1,)
    st.close()
    again = ClientStateStore(tmp_path / "s.sqlite")  # on disk: survives the process
    assert again.get(0)["x"][0] == 2


def test_scaffold_state_lives_in_the_store_not_in_checkpoints(runs_dir):
    res = fedloom.run(small_config(server__algorithm="scaffold", run__rounds=2), make_report=False)
    ckpt = load_tensors(res.summary["checkpoint"])
    assert not any(k.startswith("client/") for k in ckpt)
    st = ClientStateStore(res.output_dir / "client_state.sqlite")
    assert st.clients() == [0, 1, 2, 3] and "alg/c" in st.get(0)


# ---- codecs through the round ---------------------------------------------------------------------------------

def _final_model(res):
    return load_tensors(res.summary["checkpoint"])


@pytest.mark.parametrize("engine", ["parallel", "vectorized"])
def test_every_engine_gives_the_same_model_with_a_codec(runs_dir, engine):
    over = dict(pipeline__upload=["topk:0.1", "q8"], pipeline__error_feedback=True, pipeline__download=["f16"],
                run__rounds=3)
    ref = _final_model(fedloom.run(small_config(**over), engine="sequential", make_report=False))
    got = _final_model(fedloom.run(small_config(**over, run__workers=2), engine=engine, make_report=False))
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k


def test_bytes_counted_are_the_encoded_messages(runs_dir):
    res = fedloom.run(small_config(pipeline__upload=["q8", "zstd"], run__rounds=1), engine="sequential",
                      make_report=False)
    store = RunStore(runs_dir / "fedloom.db")
    fits = store.client_rounds(res.run_id, "fit")
    plain = fedloom.run(small_config(run__rounds=1), engine="sequential", make_report=False)
    plain_fits = RunStore(runs_dir / "fedloom.db").client_rounds(plain.run_id, "fit")
    # q8 is a quarter of f32's payload plus a scale; zstd can only shrink it further
    for f, p in zip(fits, plain_fits, strict=True):
        assert f["bytes_up"] < 0.3 * p["bytes_up"]
    assert sum(f["bytes_up"] for f in fits) == store.rounds(res.run_id)[0]["bytes_up"]


def test_passthrough_counts_the_exact_encoded_length():
    vec = torch.randn(1000)
    codec = parse_codec(["topk:0.02", "q8"])
    msg = wire.Message("update", 1, 3, "abc", vec, 5, {"loss": 1.0}, codec.spec, codec.encode(vec), 1000)
    got, n = wire.passthrough(msg)
    assert n == len(wire.encode(msg)) and torch.equal(got.vector, codec.decode(msg.payload, 1000))


def test_corrupt_payload_refuses_that_client_only():
    codec = parse_codec(["topk:0.1", "q8"])
    good = wire.encode(wire.Message("update", 1, 0, "s", torch.zeros(0), 5, {}, codec.spec,
                                    codec.encode(torch.randn(50)), 50))
    bad = bytearray(good)
    bad[-3:] = b"\xff\xff\xff"  # values past the end of the payload, or an index out of range
    replies = [ClientReply(None, len(good), 0.1, payload=good), ClientReply(None, len(bad), 0.1, payload=bytes(bad)),
               ClientReply(None, 10, 0.1, payload=good[:-10])]
    out = unpacked(replies, "s")
    assert isinstance(out[0], ClientReply) and out[0].message.vector.numel() == 50
    from fedloom.engines.base import ClientFailure
    assert all(isinstance(r, ClientFailure) for r in out[1:])
    assert out[2].client_id == 0 and "refused the update" in out[2].traceback


def test_corrupt_update_in_a_run_is_dropped_with_a_logged_reason(runs_dir, monkeypatch):
    """A client whose payload does not decode follows run.on_client_error: dropped, with its reason stored."""
    real = wire.passthrough

    def corrupt(msg):
        if msg.kind == "update" and msg.client_id == 2:
            msg.payload, msg.codec = b"\x00", "q8"
        return real(msg)

    monkeypatch.setattr(wire, "passthrough", corrupt)
    res = fedloom.run(small_config(run__on_client_error="drop", run__rounds=2), engine="sequential",
                      make_report=False)
    assert res.status == "completed"
    rows = RunStore(runs_dir / "fedloom.db").rounds(res.run_id)
    assert all(r["metrics"]["dropped_clients"] == [2] for r in rows)
    assert "q8" in json.dumps(rows[0]["metrics"]["client_errors"])


def test_killed_and_resumed_run_with_error_feedback_equals_uninterrupted(runs_dir):
    over = dict(pipeline__upload=["topk:0.1", "q4"], pipeline__error_feedback=True, run__rounds=4,
                server__fraction=0.5)
    full = fedloom.run(small_config(**over), engine="sequential", make_report=False)
    assert_resume_is_exact(runs_dir, over, full)


def assert_resume_is_exact(runs_dir, over, full):
    """The run of `over`, killed after round 2 and resumed, ends with exactly `full`'s model."""
    def stop_after_2(ev):
        if ev["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fedloom.run(small_config(**over), engine="sequential", make_report=False, callback=stop_after_2)
    killed = RunStore(runs_dir / "fedloom.db").list_runs()[0]
    assert killed.run_id != full.run_id and killed.rounds_completed == 2
    resumed = fedloom.resume(killed.run_id, make_report=False)
    a, b = _final_model(full), _final_model(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_download_delta_sends_changes_to_holders_and_resumes_exactly(runs_dir):
    """Every client takes part every round: round 1 sends the model, later rounds only the (q8) change since.
    A killed and resumed run ends with the same model; the bytes down shrink by the codec's factor."""
    over = dict(pipeline__download=["q8"], pipeline__download_delta=True, run__rounds=4)
    full = fedloom.run(small_config(**over), engine="sequential", make_report=False)
    rows = RunStore(runs_dir / "fedloom.db").rounds(full.run_id)
    f32 = fedloom.run(small_config(run__rounds=1), engine="sequential", make_report=False)
    f32_down = RunStore(runs_dir / "fedloom.db").rounds(f32.run_id)[0]["bytes_down"]
    assert all(r["bytes_down"] < 0.3 * f32_down for r in rows)
    assert_resume_is_exact(runs_dir, over, full)


def test_delta_of_a_model_the_client_does_not_hold_is_refused():
    from fedloom.client.work import ClientTask
    from fedloom.config import PipelineConfig

    rt = _runtime(PipelineConfig(download_delta=True))
    msg = wire.Message("broadcast", 3, -1, rt.spec_hash, torch.zeros(rt.spec.size), metrics={"delta_of": 2})
    with pytest.raises(ValueError, match="change since round 2.*holds no model"):
        rt.receive(ClientTask(3, 0, 0.1, 0, wire.encode(msg)))


def _runtime(pipeline, cfg=None):
    from fedloom.algorithms import build_algorithm
    from fedloom.api import prepare
    from fedloom.client.work import ClientRuntime

    cfg = cfg or load_config(small_config())
    data, factory = prepare(cfg)
    return ClientRuntime(factory, data, cfg.train, build_algorithm(cfg.server, data.num_clients), cfg.eval, pipeline)


def test_a_header_claiming_another_size_is_refused_before_decoding():
    codec = parse_codec(["randk:10", "q8"])
    data = wire.encode(wire.Message("update", 1, 4, "s", torch.zeros(0), 5, {}, codec.spec,
                                    codec.encode(torch.randn(50)), 2**31 - 1))
    from fedloom.engines.base import ClientFailure
    out = unpacked([ClientReply(None, len(data), 0.1, payload=data)], "s", (50, 0))
    assert isinstance(out[0], ClientFailure) and "claims 2147483647 values" in out[0].traceback


def test_traffic_of_dropped_stragglers_and_personalized_evaluation_is_counted(runs_dir):
    """Stragglers dropped after the broadcast were still sent the model; personalized evaluation's messages
    are counted apart (eval_bytes_*), so `bytes_down` stays the training traffic."""
    res = fedloom.run(small_config(run__rounds=1, train__straggler_fraction=0.5, train__drop_stragglers=True,
                                   eval__finetune_epochs=1), engine="sequential", make_report=False)
    row = RunStore(runs_dir / "fedloom.db").rounds(res.run_id)[0]
    m = row["metrics"]
    assert len(m["dropped_stragglers"]) == 2 and row["num_clients"] == 2
    assert row["bytes_down"] % 4 == 0 and row["bytes_down"] // 4 > 1000  # all 4 selected clients were sent it
    assert m["eval_bytes_down"] == row["bytes_down"] and m["pers_clients"] == 4
    assert m["eval_bytes_up"] > 0


def test_personalized_macro_f1_averages_over_the_classes_in_the_clients_split(runs_dir):
    from sklearn.metrics import f1_score

    from fedloom.api import prepare
    from fedloom.client.work import ClientTask
    from fedloom.evaluation import predict

    res = fedloom.run(small_config(run__rounds=1, eval__finetune_epochs=1, data__alpha=0.1), engine="sequential",
                      make_report=False)
    rows = [r for r in RunStore(runs_dir / "fedloom.db").client_rounds(res.run_id) if r["kind"] == "personal"]
    cfg = load_config(small_config(run__rounds=1, eval__finetune_epochs=1, data__alpha=0.1))
    data, factory = prepare(cfg)
    rt = _runtime(cfg.pipeline, cfg)
    ckpt = load_tensors(res.summary["checkpoint"])
    vec = rt.spec.flatten({k[len("model/"):]: v for k, v in ckpt.items() if k.startswith("model/")})
    bc = wire.encode(wire.Message("broadcast", 1, -1, rt.spec_hash, vec))
    for r in rows:  # recompute each client's fine-tuned predictions and score them with scikit-learn
        rt.evaluate(ClientTask(1, r["client_id"], cfg.train.lr, cfg.run.seed, bc, kind="evaluate"))
        idx = torch.as_tensor(data.clients[r["client_id"]].test_idx)
        y = data.dataset.y_test[idx]
        pred = predict(rt.model, data.dataset, data.dataset.x_test[idx], y).preds
        expected = f1_score(y, pred, average="macro", labels=sorted(set(y.tolist())), zero_division=0)
        assert r["macro_f1"] == pytest.approx(expected, abs=1e-9)
