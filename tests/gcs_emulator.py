"""A local Google Cloud Storage for tests: `gcp-storage-emulator` (PyPI) on loopback.

`python tests/gcs_emulator.py --port P --bucket B` serves an in-memory GCS until
killed; `running_emulator()` starts one for a test session and points a process's
storage clients at it through `STORAGE_EMULATOR_HOST`, the variable Google's client
libraries read (t5x_like/storage.py maps it onto TensorStore's).

One gap of the emulator is closed here, as real GCS behaves: every object download
carries the object's generation (`x-goog-generation`), and a conditional read whose
`ifGenerationNotMatch` is the current generation is answered 304. The emulator
(2026.7) sends neither, and TensorStore, Orbax's array layer, rejects the read
("Malformed StorageGeneration"). Storage itself (the bytes, listing, deletes) is the
emulator's own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus
from typing import Iterator


def _with_generation_headers(download):
    def handler(request, response, storage, *args, **kwargs):
        from gcp_storage_emulator.exceptions import NotFound
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
        except NotFound:
            return download(request, response, storage, *args, **kwargs)
        unless = request.query.get("ifGenerationNotMatch")
        if unless and unless[0] == str(obj["generation"]):
            response.status = HTTPStatus.NOT_MODIFIED
        else:
            download(request, response, storage, *args, **kwargs)
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return handler


def _quiet_handle_error(handle_error):
    """Clients that hang up early (a normal end of a ranged read) are not errors."""
    def handler(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            handle_error(self, request, client_address)
    return handler


def serve(*, port: int, bucket: str) -> None:
    import http.server
    import logging

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    # Its "Resource not found" lines are the 404s a client asks for on purpose.
    logging.disable(logging.ERROR)
    http.server.HTTPServer.handle_error = _quiet_handle_error(
        http.server.HTTPServer.handle_error)
    original = objects.download
    patched = _with_generation_headers(original)
    objects.download = patched                 # `get ?alt=media` calls it by name
    for _, methods in server.HANDLERS:
        for method, function in list(methods.items()):
            if function is original:
                methods[method] = patched
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_emulator(bucket: str = "test-bucket") -> Iterator[str]:
    """Starts the emulator on a free loopback port; yields its URL
    (http://127.0.0.1:PORT), the value for STORAGE_EMULATOR_HOST."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", str(port),
                             "--bucket", bucket],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, "the GCS emulator exited at start"
                assert time.time() < deadline, "the GCS emulator did not start in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    flags = parser.parse_args()
    serve(port=flags.port, bucket=flags.bucket)
