"""TensorBoard event files of scalars, written with tensorboardX: the one module that
reaches into its internals.

Why that library: it is maintained, writes ordinary event files that TensorBoard (and
`EventAccumulator`) read, and needs only numpy, protobuf and packaging. The
alternatives each bring more: the `tensorboard` package's writer is a private module
and drags in the TensorBoard server (werkzeug, grpcio, markdown, ...); `tf.summary`
needs TensorFlow, which the core must not; CLU's writers need TensorFlow too.

Why its internals: its public `SummaryWriter` hands events to the file through a
background thread, and its `flush()` does not wait for them, so a run killed right
after a checkpoint could lose the last logged point. We use the synchronous
`EventsWriter` under it, the `Event` proto and `summary.scalar` it is fed with, and
`record_writer.register_writer_factory`, its hook for opening the files of a URL
scheme. Verified with tensorboardX 2.6.5 (2.6, the floor of setup.cfg's range, has
the same names and signatures in its source); tests/test_library_adapters.py fails,
naming the symbol, if an upgrade removes one. tensorboardX is imported at first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from t5x_like import errors

VERIFIED = "2.6.5"
_EVENTS_WRITER = "tensorboardX.event_file_writer.EventsWriter"
_EVENT = "tensorboardX.proto.event_pb2.Event"
_SCALAR = "tensorboardX.summary.scalar"
_REGISTER_WRITER_FACTORY = "tensorboardX.record_writer.register_writer_factory"


class EventFile:
    """One event file, `<prefix>.out.tfevents.<time>.<host><filename_suffix>`,
    created (with its file-version event) when this is made."""

    def __init__(self, prefix: str, *, filename_suffix: str = ""):
        self._writer = _internal(_EVENTS_WRITER)(prefix, filename_suffix=filename_suffix)
        self._event, self._scalar = _internal(_EVENT), _internal(_SCALAR)

    def write_scalars(self, step: int, scalars: Mapping[str, float], *,
                      wall_time: float) -> None:
        """One scalar event per name, all at `step` and `wall_time`; on disk once
        `flush()` returns."""
        for name, value in scalars.items():
            self._writer.write_event(self._event(wall_time=wall_time, step=int(step),
                                                 summary=self._scalar(name, float(value))))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_urls_with(scheme: str, open_file: Callable[[str], Any]) -> None:
    """Event files under `scheme`:// are opened by `open_file(path)` (a binary file
    object: write, flush, close) rather than by tensorboardX's own S3/GCS clients,
    and no folder is made for them (object stores have none)."""
    _internal(_REGISTER_WRITER_FACTORY)(scheme, _WriterFactory(open_file))


def check_internals() -> None:
    """Raises LibraryChangedError naming the first internal the installed
    tensorboardX lacks."""
    for symbol in (_EVENTS_WRITER, _EVENT, _SCALAR, _REGISTER_WRITER_FACTORY):
        _internal(symbol)


class _WriterFactory:
    """What register_writer_factory expects: `open(path)` and `directory_check(path)`."""

    def __init__(self, open_file: Callable[[str], Any]):
        self.open = open_file

    def directory_check(self, path: str) -> None:
        del path


def _internal(symbol: str) -> Any:
    return errors.library_internal(symbol, verified=VERIFIED, adapter=__name__)
