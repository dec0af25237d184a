"""Where a run's files live: a local folder or an object-store URL, through one layer.

Every file the program writes or reads by name (checkpoints, data positions,
TensorBoard events, the operative config, the parameter table, logs, eval records,
inference outputs) goes through `etils.epath`, the path layer Orbax itself uses, so
`MODEL_DIR=gs://bucket/run` means the bucket everywhere and never a local folder
called `gs:`. (`os.path.abspath('gs://b/run')` is `<cwd>/gs:/b/run`: that was how a
pod's workers each checkpointed to their own disk.)

Three choices hold the layers together:
- epath's `gs://` backend is fsspec's `gcsfs`, also where TensorFlow is installed
  (`EPATH_USE_TF=false`, set when this module is imported): one client with or
  without TF, and one that honours `STORAGE_EMULATOR_HOST`, the variable Google's
  client libraries read.
- Orbax writes arrays through TensorStore, which has its own GCS client. When
  `STORAGE_EMULATOR_HOST` is set (a local emulator, as in the tests), it is mapped
  onto TensorStore's endpoint variable, with a placeholder token since an emulator
  checks none. Nothing else needs setting by the user.
- Folder listings are never cached (fsspec caches them by default), so a process
  sees the checkpoints another one has just committed.

Object stores have no append: `AppendableFile` keeps what was written and rewrites
the whole object when flushed (log files, TensorBoard event files).
"""

from __future__ import annotations

import importlib.util
import io
import os
import time
from typing import IO

from etils import epath

from t5x_like import errors

# Set on import, before any epath path is used: epath decides once per process
# (functools.cache) whether TensorFlow's gfile serves URLs, and the first path it
# sees, even a local one, fixes that choice.
os.environ.setdefault("EPATH_USE_TF", "false")

# Schemes and the package that epath (through fsspec) needs for each.
_SCHEME_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
_EXTRA = {"gs": "t5x_like[gcs]"}
_configured = False


def is_url(location: str) -> bool:
    return "://" in str(location)


def scheme(location: str) -> str | None:
    return str(location).split("://", 1)[0] if is_url(location) else None


def resolve(location: str) -> str:
    """The canonical string form: a local path made absolute (so a later change of
    working directory cannot move it), a URL as given without a trailing '/'."""
    location = os.fspath(location)
    if is_url(location):
        check_supported(location)
        return location.rstrip("/")
    return os.path.abspath(location)


def join(location: str, *parts: str) -> str:
    """`location/part/...` as a string (for Orbax, messages and logs)."""
    return os.fspath(path(location).joinpath(*parts))


def path(location: str, *parts: str) -> epath.Path:
    """An `epath.Path` for `location` (local or URL) joined with `parts`."""
    return epath.Path(resolve(location)).joinpath(*parts)


def check_supported(location: str, *, what: str = "path") -> None:
    """Raises a ConfigError unless this process can reach `location`'s scheme.

    Cheap (no I/O): made before a run builds anything, so a URL whose client is not
    installed fails in the first second rather than at the first checkpoint.
    """
    kind = scheme(location)
    if kind is None:
        return
    package = _SCHEME_PACKAGES.get(kind)
    if package is None:
        raise errors.ConfigError(
            f"{what} {location}: the scheme {kind}:// is not supported",
            fix=f"use a local path or one of {', '.join(s + '://' for s in _SCHEME_PACKAGES)}")
    if importlib.util.find_spec(package) is None:
        raise errors.ConfigError(
            f"{what} {location} needs the {package} package, which is not installed",
            fix=f"pip install '{_EXTRA.get(kind, package)}' (or pip install {package})")
    configure()


def configure() -> None:
    """Points every storage client at one place. Idempotent; runs before any client is
    made, because TensorStore reads its variables when its first GCS handle opens."""
    global _configured
    if _configured:
        return
    _configured = True
    # No cached listings: a folder that another process writes to (a training job's
    # checkpoints, watched by launch.eval) must show its new entries at once.
    import fsspec.config
    for protocol in ("gs", "gcs", "s3", "az", "abfs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        if "://" not in emulator:
            emulator = f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs asks the storage-control API for each bucket's layout, which an
        # emulator lacks (a warning per call); real buckets keep the feature.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def exists(location: str) -> bool:
    return path(location).exists()


def is_dir(location: str) -> bool:
    return path(location).is_dir()


def list_dir(location: str) -> list[str]:
    """Names in a folder (empty when it does not exist)."""
    folder = path(location)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir())


def make_dirs(location: str) -> None:
    path(location).mkdir(parents=True, exist_ok=True)


def read_text(location: str) -> str:
    return path(location).read_text()


def write_text(location: str, text: str) -> None:
    """Writes a whole file. On an object store an object appears whole or not at all;
    locally a temporary file is renamed into place, so a crash leaves no half file."""
    target = path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(location):
        target.write_text(text)
        return
    partial = target.parent / f".{target.name}.partial"
    partial.write_text(text)
    os.replace(partial, target)


def open_file(location: str, mode: str = "r") -> IO:
    """A file object ('r', 'w', 'rb', 'wb'); on an object store a write appears on
    close."""
    target = path(location)
    if "w" in mode:
        target.parent.mkdir(parents=True, exist_ok=True)
    return target.open(mode)


class AppendableFile:
    """A file that grows by `write` and is durable at each `flush`.

    Locally that is an ordinary file in append mode. On an object store, which cannot
    append, it is the bytes written so far, rewritten as one object by `flush` (at
    most every `min_flush_interval_s` seconds; `close` always writes). Used for log
    files and TensorBoard event files, which stay small; the event writer starts a
    new file past a size limit (reporting/metrics.py).
    """

    def __init__(self, location: str, *, min_flush_interval_s: float = 0.0):
        self.location = resolve(location)
        self._remote = is_url(self.location)
        self._interval = min_flush_interval_s
        self._last_flush = 0.0
        path(self.location).parent.mkdir(parents=True, exist_ok=True)
        if self._remote:          # continues what an earlier process wrote, as "ab" does
            target = path(self.location)
            self._buffer = io.BytesIO(target.read_bytes() if target.exists() else b"")
            self._buffer.seek(0, io.SEEK_END)
            self._dirty = True
        else:
            self._file = open(self.location, "ab")

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if self._remote:
            self._buffer.write(data)
            self._dirty = True
        else:
            self._file.write(data)

    @property
    def size(self) -> int:
        return self._buffer.tell() if self._remote else self._file.tell()

    def flush(self, *, force: bool = False) -> None:
        if not self._remote:
            self._file.flush()
            return
        now = time.monotonic()
        if self._dirty and (force or now - self._last_flush >= self._interval):
            path(self.location).write_bytes(self._buffer.getvalue())
            self._dirty, self._last_flush = False, now

    def close(self) -> None:
        if self._remote:
            self.flush(force=True)
        else:
            self._file.close()
