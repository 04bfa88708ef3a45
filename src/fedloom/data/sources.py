"""Finding, downloading and verifying dataset files.

A file is looked for in, in order: an explicit `data_dir`, `$FEDLOOM_DATA`, the user cache
(`$XDG_CACHE_HOME/fedloom/<dataset>`, default `~/.cache/fedloom/<dataset>`) and system dataset folders
(`/usr/share/datasets/<dataset>`, where Debian's `dataset-fashion-mnist` installs Fashion-MNIST).
The first copy found must be the official file: its SHA-256 matches the canonical archive, or, for a
.gz, the SHA-256 of its gunzipped content matches (Debian re-compresses the archives, so their bytes
differ while the data is identical). A copy that fails is an error naming it, never silently skipped,
so a damaged file cannot hide behind a good one or be trained on.

When no copy exists the file is downloaded into the user cache: streamed to a temp file in the same
folder, verified, then renamed into place, so an interrupted or corrupt download never leaves anything
behind that a later run could pick up. `$FEDLOOM_DOWNLOAD_BASE` replaces the mirrors with one base URL.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError

TIMEOUT_S = 30.0
_CHUNK = 1 << 20


@dataclass
class RemoteFile:
    """One official file: where it comes from and how to recognise it."""

    name: str
    urls: list[str]
    sha256: str  # of the canonical archive bytes
    size: int  # bytes of the canonical archive
    content_sha256: str | None = None  # of the gunzipped content, for .gz files re-compressed by packagers


def _mirrored(name: str, bases: Sequence[str], size: int, sha256: str, content_sha256: str | None = None):
    return RemoteFile(name, [b + name for b in bases], sha256, size, content_sha256)


_FASHION = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
_MNIST = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"]

# The official files of each dataset: name, mirrors, size, SHA-256 of the archive and, for Fashion-MNIST,
# of the gunzipped content (as installed by Debian's dataset-fashion-mnist). Tests monkeypatch entries.
REMOTES: dict[str, list[RemoteFile]] = {
    "fashion-mnist": [
        _mirrored("train-images-idx3-ubyte.gz", _FASHION, 26421880,
                  "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                  "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        _mirrored("train-labels-idx1-ubyte.gz", _FASHION, 29515,
                  "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                  "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        _mirrored("t10k-images-idx3-ubyte.gz", _FASHION, 4422102,
                  "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                  "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        _mirrored("t10k-labels-idx1-ubyte.gz", _FASHION, 5148,
                  "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                  "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ],
    "mnist": [
        _mirrored("train-images-idx3-ubyte.gz", _MNIST, 9912422,
                  "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        _mirrored("train-labels-idx1-ubyte.gz", _MNIST, 28881,
                  "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        _mirrored("t10k-images-idx3-ubyte.gz", _MNIST, 1648877,
                  "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        _mirrored("t10k-labels-idx1-ubyte.gz", _MNIST, 4542,
                  "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ],
    "cifar10": [
        RemoteFile("cifar-10-python.tar.gz", ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
                   "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170498071),
    ],
}

# Searched last, as <dir>/<dataset>; a list so tests can point it elsewhere.
SYSTEM_DATA_DIRS: list[Path] = [Path("/usr/share/datasets")]

_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}

# (path, size, mtime_ns, sha256, content_sha256) of files already verified in this process.
_verified: set[tuple[str, int, int, str, str | None]] = set()


def cache_dir(dataset: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: relative paths are ignored
    return root / "fedloom" / dataset


def search_dirs(dataset: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where files of `dataset` are looked for, first match wins (duplicates removed)."""
    dirs: list[Path] = []
    for base in (data_dir, os.environ.get("FEDLOOM_DATA") or None):
        if base is not None:
            dirs += [Path(base).expanduser(), Path(base).expanduser() / dataset]
    dirs.append(cache_dir(dataset))
    dirs += [Path(d) / dataset for d in SYSTEM_DATA_DIRS]
    return list(dict.fromkeys(dirs))


def fix_hint(dataset: str, data_dir: str | os.PathLike | None = None) -> str:
    """How a user gets the files of `dataset` in place, for error messages and `fedloom datasets`."""
    places = ", ".join(str(d) for d in search_dirs(dataset, data_dir))
    hint = f"put the official files in one of: {places}; or set FEDLOOM_DATA to a folder holding them"
    if dataset in _PACKAGES:
        hint += f"; or on Debian/Ubuntu: apt-get install {_PACKAGES[dataset]}"
    return hint


def _sha256_file(path: Path, gunzip: bool = False) -> str:
    h = hashlib.sha256()
    with (gzip.open(path, "rb") if gunzip else open(path, "rb")) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _problem(path: Path, remote: RemoteFile) -> str | None:
    """None if `path` is the official `remote` file, else what was expected and what was found."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, remote.sha256, remote.content_sha256)
    if key in _verified:
        return None
    digest = _sha256_file(path)
    ok = digest == remote.sha256 and st.st_size == remote.size
    found = f"found {st.st_size} bytes with SHA-256 {digest[:16]}..."
    if not ok and path.name.endswith(".gz"):
        try:
            content = _sha256_file(path, gunzip=True)
        except (OSError, EOFError, zlib.error) as e:
            found += f", not a valid gzip ({e})"
        else:
            ok = content == remote.content_sha256
            if remote.content_sha256:
                found += f" and gunzipped content SHA-256 {content[:16]}..."
    if ok:
        _verified.add(key)
        return None
    expected = f"expected {remote.size} bytes with SHA-256 {remote.sha256[:16]}..."
    if remote.content_sha256:
        expected += f" (or gunzipped content SHA-256 {remote.content_sha256[:16]}...)"
    return f"{expected}, {found}"


def check_file(path: Path, remote: RemoteFile, verify: bool = True) -> Path:
    """`path` if it is the official file (or `verify` is False: trusted, structure checked by the loader)."""
    if verify and (problem := _problem(path, remote)):
        raise DatasetError(
            f"{path} is not the official {remote.name}: {problem}",
            hint="delete it and run again to re-download, or put the official file there; to trust a local "
                 "file whose hash is unknown, set data.options = {verify = false}")
    return path


def find_local(dataset: str, remote: RemoteFile, data_dir: str | os.PathLike | None = None,
               verify: bool = True) -> Path | None:
    """The first copy of `remote` in the search dirs (checked), or None if there is none."""
    for d in search_dirs(dataset, data_dir):
        if (d / remote.name).is_file():
            return check_file(d / remote.name, remote, verify)
    return None


def _mirrors(remote: RemoteFile) -> list[str]:
    base = os.environ.get("FEDLOOM_DOWNLOAD_BASE")
    return [base.rstrip("/") + "/" + remote.name] if base else list(remote.urls)


def _describe(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _fetch(url: str, remote: RemoteFile, target: Path) -> None:
    """Stream `url` into a temp file next to `target`, verify it, rename; on failure leave nothing."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{remote.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            got = 0
            while chunk := resp.read(_CHUNK):
                got += len(chunk)
                if got > remote.size:
                    raise OSError(f"server sent more than the expected {remote.size} bytes")
                out.write(chunk)
        if problem := _problem(tmp, remote):
            raise OSError(f"downloaded file does not verify: {problem}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def locate(dataset: str, remote: RemoteFile, data_dir: str | os.PathLike | None = None,
           download: bool = True, verify: bool = True) -> Path:
    """The path of a verified copy of `remote`, downloading it into the user cache if none exists.

    `verify=False` trusts local files whose hash is unknown (the loader still checks their structure);
    downloads are always verified.
    """
    found = find_local(dataset, remote, data_dir, verify)
    if found is not None:
        return found
    searched = ", ".join(str(d) for d in search_dirs(dataset, data_dir))
    if not download:
        raise DatasetError(f"{dataset}: {remote.name} not found (searched {searched}); download is disabled",
                           hint=fix_hint(dataset, data_dir) + "; or enable download (data.download = true)")
    target = cache_dir(dataset) / remote.name
    errors = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        errors.append(f"cannot create the cache folder {target.parent} ({e})")
    else:
        for url in _mirrors(remote):
            if not os.environ.get("FEDLOOM_NO_DOWNLOAD_WARN"):
                print(f"fedloom: downloading {url} ({remote.size / 1e6:.1f} MB) to {target}", file=sys.stderr)
            try:
                _fetch(url, remote, target)
                return target
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts: OSError
                errors.append(f"{url} ({_describe(e)})")
    raise DatasetError(f"{dataset}: could not get {remote.name}: searched {searched}; "
                       f"tried {'; '.join(errors)}", hint=fix_hint(dataset, data_dir))


def status(dataset: str, remotes: Sequence[RemoteFile],
           data_dir: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(folder holding all verified files, description), or (None, what will happen / what to do)."""
    found, missing = [], []
    for r in remotes:
        try:
            path = find_local(dataset, r, data_dir)
        except DatasetError as e:
            return None, f"{e.message}; {e.hint}"
        if path is None:
            missing.append(r)
        else:
            found.append(path)
    if not missing:
        return found[0].parent, "verified in " + ", ".join(dict.fromkeys(str(p.parent) for p in found))
    source = _mirrors(missing[0])[0].rsplit("/", 1)[0] + "/"
    what = ", ".join(m.name for m in missing)
    return None, (f"not found; will download {what} from {source} on first use; "
                  f"or {fix_hint(dataset, data_dir)}")
