"""Finding, downloading and verifying dataset files; the IDX reader."""

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from fedloom.data import sources
from fedloom.data.idx import read_idx, write_idx
from fedloom.data.sources import RemoteFile, locate, search_dirs
from fedloom.errors import DatasetError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real cache, $FEDLOOM_DATA or system folder leaks in; proxies never see 127.0.0.1."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDLOOM_DATA", raising=False)
    monkeypatch.delenv("FEDLOOM_DOWNLOAD_BASE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [tmp_path / "system"])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """(folder served, base URL) of an HTTP server on 127.0.0.1, stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def _labels_file(path: Path, n: int = 50, seed: int = 0) -> bytes:
    """A small official-format (IDX, gzip) label file; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_idx(path, np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8))
    return path.read_bytes()


def _remote(data: bytes, urls=(), name="train-labels-idx1-ubyte.gz") -> RemoteFile:
    return RemoteFile(name, list(urls), hashlib.sha256(data).hexdigest(), len(data))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_dirs_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "env"))
    assert search_dirs("mnist", tmp_path / "explicit") == [
        tmp_path / "explicit", tmp_path / "explicit" / "mnist", tmp_path / "env", tmp_path / "env" / "mnist",
        tmp_path / "cache" / "fedloom" / "mnist", tmp_path / "system" / "mnist"]
    monkeypatch.delenv("FEDLOOM_DATA")
    assert search_dirs("mnist", None) == [tmp_path / "cache" / "fedloom" / "mnist",
                                          tmp_path / "system" / "mnist"]


def test_default_places(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [Path("/usr/share/datasets")])
    assert search_dirs("fashion-mnist", None) == [Path.home() / ".cache" / "fedloom" / "fashion-mnist",
                                                  Path("/usr/share/datasets/fashion-mnist")]


def test_lookup_order_explicit_env_cache_system(tmp_path, monkeypatch):
    name = "train-labels-idx1-ubyte.gz"
    places = [tmp_path / "explicit" / "mnist", tmp_path / "env", tmp_path / "cache" / "fedloom" / "mnist",
              tmp_path / "system" / "mnist"]
    data = _labels_file(places[0] / name)
    for p in places[1:]:
        p.mkdir(parents=True)
        (p / name).write_bytes(data)
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "env"))
    remote = _remote(data)
    for place in places:
        assert locate("mnist", remote, tmp_path / "explicit", download=False) == place / name
        (place / name).unlink()


def test_download_lands_in_cache_and_verifies(tmp_path, monkeypatch, mirror):
    root, base = mirror
    data = _labels_file(root / "train-labels-idx1-ubyte.gz")
    monkeypatch.setenv("FEDLOOM_DOWNLOAD_BASE", base + "/")
    path = locate("mnist", _remote(data, ["http://unused.invalid/x"]))
    cache = tmp_path / "cache" / "fedloom" / "mnist"
    assert path == cache / "train-labels-idx1-ubyte.gz" and path.read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == ["train-labels-idx1-ubyte.gz"]
    assert read_idx(path).shape == (50,)
    assert locate("mnist", _remote(data), download=False) == path  # found in the cache next time


def test_corrupt_mirror_is_skipped_for_the_next_one(tmp_path, mirror):
    root, base = mirror
    data = _labels_file(root / "good" / "f.gz")
    (root / "bad").mkdir()
    (root / "bad" / "f.gz").write_bytes(data[:-8] + b"corrupt!")
    remote = _remote(data, [f"{base}/bad/f.gz", f"{base}/good/f.gz"], name="f.gz")
    path = locate("mnist", remote)
    assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["f.gz"]


def test_corrupt_download_leaves_nothing_and_names_url_and_hash(tmp_path, mirror):
    root, base = mirror
    data = _labels_file(root / "f.gz")
    remote = _remote(data, [f"{base}/f.gz"], name="f.gz")
    remote.sha256 = "0" * 64
    with pytest.raises(DatasetError) as e:
        locate("mnist", remote)
    msg = e.value.message
    assert f"{base}/f.gz" in msg and "SHA-256" in msg and "0000000000000000" in msg
    assert list((tmp_path / "cache" / "fedloom" / "mnist").iterdir()) == []


def test_oversized_download_is_cut_off(tmp_path, mirror):
    root, base = mirror
    data = _labels_file(root / "f.gz")
    remote = _remote(data[:20], [f"{base}/f.gz"], name="f.gz")
    with pytest.raises(DatasetError, match="more than the expected 20 bytes"):
        locate("mnist", remote)
    assert list((tmp_path / "cache" / "fedloom" / "mnist").iterdir()) == []


def test_all_mirrors_down_lists_places_urls_and_fix(tmp_path, mirror):
    _, base = mirror
    dead = f"http://127.0.0.1:{_free_port()}/f.gz"
    remote = RemoteFile("f.gz", [dead, f"{base}/missing/f.gz"], "0" * 64, 10)
    with pytest.raises(DatasetError) as e:
        locate("fashion-mnist", remote, tmp_path / "mine")
    msg, hint = e.value.message, e.value.hint
    assert dead in msg and f"{base}/missing/f.gz" in msg and "404" in msg
    for place in search_dirs("fashion-mnist", tmp_path / "mine"):
        assert str(place) in msg
    assert "put the official files in one of" in hint and "FEDLOOM_DATA" in hint
    assert "apt-get install dataset-fashion-mnist" in hint
    assert "\n" not in str(e.value)  # the CLI prints it as one line
    assert list((tmp_path / "cache" / "fedloom" / "fashion-mnist").iterdir()) == []


def test_missing_with_download_disabled(tmp_path):
    remote = sources.REMOTES["mnist"][0]
    with pytest.raises(DatasetError) as e:
        locate("mnist", remote, tmp_path / "mine", download=False)
    assert "download is disabled" in e.value.message and str(tmp_path / "mine" / "mnist") in e.value.message
    assert "FEDLOOM_DATA" in e.value.hint and "data.download" in e.value.hint
    assert not (tmp_path / "cache").exists()


def test_truncated_gz_in_search_dir_is_named(tmp_path):
    remote = sources.REMOTES["mnist"][1]
    data = gzip.compress(b"\x00\x00\x08\x01" + (60000).to_bytes(4, "big") + bytes(60000))
    bad = tmp_path / "mine" / remote.name
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as e:
        locate("mnist", remote, tmp_path / "mine")  # a bad copy is an error, never re-downloaded over
    assert str(bad) in e.value.message and "not a valid gzip" in e.value.message
    assert f"expected {remote.size} bytes" in e.value.message and "delete it" in e.value.hint


def test_recompressed_copy_verifies_by_content(tmp_path):
    raw = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    canonical = gzip.compress(raw, compresslevel=9, mtime=0)
    repacked = gzip.compress(raw, compresslevel=1, mtime=12345)
    assert canonical != repacked
    remote = RemoteFile("f.gz", [], hashlib.sha256(canonical).hexdigest(), len(canonical),
                        content_sha256=hashlib.sha256(raw).hexdigest())
    (tmp_path / "f.gz").write_bytes(repacked)
    assert locate("x", remote, tmp_path, download=False) == tmp_path / "f.gz"
    remote.content_sha256 = "1" * 64
    with pytest.raises(DatasetError, match="gunzipped content SHA-256"):
        locate("x", remote, tmp_path, download=False)


def test_unknown_hash_only_trusted_when_asked(tmp_path):
    data = _labels_file(tmp_path / "f.gz")
    remote = RemoteFile("f.gz", [], "0" * 64, len(data))
    with pytest.raises(DatasetError, match="not the official f.gz"):
        locate("x", remote, tmp_path, download=False)
    assert locate("x", remote, tmp_path, download=False, verify=False) == tmp_path / "f.gz"


def test_verification_is_cached_per_file_state(tmp_path, monkeypatch):
    data = _labels_file(tmp_path / "f.gz", seed=3)
    remote = _remote(data, name="f.gz")
    calls = []
    real = sources._sha256_file
    monkeypatch.setattr(sources, "_sha256_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    locate("x", remote, tmp_path, download=False)
    locate("x", remote, tmp_path, download=False)
    assert len(calls) == 1
    st = (tmp_path / "f.gz").stat()
    # A changed file is hashed again, and rejected (a new mtime forced: coarse clocks may not tick).
    (tmp_path / "f.gz").write_bytes(data[:12] + bytes([data[12] ^ 0xFF]) + data[13:])
    os.utime(tmp_path / "f.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(DatasetError):
        locate("x", remote, tmp_path, download=False)


def test_status_found_and_missing(tmp_path):
    data = _labels_file(tmp_path / "mine" / "f.gz")
    where, note = sources.status("x", [_remote(data, name="f.gz")], tmp_path / "mine")
    assert where == tmp_path / "mine" and str(tmp_path / "mine") in note
    where, note = sources.status("mnist", sources.REMOTES["mnist"], tmp_path / "empty")
    assert where is None and "will download" in note and "ossci-datasets" in note
    (tmp_path / "mine" / "f.gz").write_bytes(b"junk")
    where, note = sources.status("x", [_remote(data, name="f.gz")], tmp_path / "mine")
    assert where is None and str(tmp_path / "mine" / "f.gz") in note


# --- IDX ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "a", images, gz=gz)
    assert np.array_equal(read_idx(tmp_path / "a"), images)
    ints = rng.integers(-1000, 1000, (3, 4), dtype=np.int32)
    write_idx(tmp_path / "b", ints, gz=gz)
    back = read_idx(tmp_path / "b")
    assert back.dtype == np.int32 and np.array_equal(back, ints)


def test_idx_header_is_the_official_one(tmp_path):
    write_idx(tmp_path / "a", np.zeros((2, 28, 28), np.uint8), gz=False)
    head = (tmp_path / "a").read_bytes()[:16]
    assert head == bytes.fromhex("00000803") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2


def test_idx_truncated_and_corrupt_files_name_the_file(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((60000, 28, 28), np.uint8), gz=False)
    raw = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw[: 16 + 1200]))
    with pytest.raises(DatasetError, match=r"truncated: expected 47040000 bytes .*found 1200"):
        read_idx(tmp_path / "a.gz")
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw)[:1000])
    with pytest.raises(DatasetError) as e:
        read_idx(tmp_path / "b.gz")
    assert str(tmp_path / "b.gz") in e.value.message and "not a valid gzip" in e.value.message
    (tmp_path / "c").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(bytes.fromhex("00000803") + (5).to_bytes(4, "big"))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "d")
