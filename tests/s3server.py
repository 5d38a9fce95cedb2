"""A local S3 for tests: moto's server mode on 127.0.0.1, started and stopped by the ``s3`` fixture.

The fixture sets the variables a real deployment sets (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``): s3fs (through botocore) reads them in this process and in every ``train.py`` it starts.
A test can slow down or refuse the uploads of chosen keys (``server.slow``) to interrupt one midway.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server", reason="the dev extra installs moto[server]")
pytest.importorskip("s3fs", reason="the dev extra installs s3fs")

BUCKET = "medclip-test"
# Distinctive, so that a test can assert that no output ever shows them.
ACCESS_KEY = "AKIAMEDCLIPTESTKEY"
SECRET_KEY = "medclip-s3cret-d0-not-print"


class SlowUploads:
    """WSGI middleware in front of moto: a PUT whose path contains ``pattern`` waits ``delay_s`` before moto sees
    it (so a process can be killed while its upload is in flight); ``started`` is set when the first one arrives."""

    def __init__(self, app):
        self.app = app
        self.pattern: str | None = None
        self.delay_s = 0.0
        self.started = threading.Event()

    def __call__(self, environ, start_response):
        if self.pattern and environ["REQUEST_METHOD"] == "PUT" and self.pattern in environ.get("PATH_INFO", ""):
            self.started.set()
            time.sleep(self.delay_s)
        return self.app(environ, start_response)


class LocalS3(moto_server.ThreadedMotoServer):
    """``ThreadedMotoServer`` with ``SlowUploads`` in front of its application."""

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.slow = SlowUploads(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, self.slow, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


def local_s3(monkeypatch):
    """A fresh S3 on 127.0.0.1 with bucket ``BUCKET``, as a fixture's generator (``yield from local_s3(mp)``): yields
    the server with ``fs`` (an s3fs filesystem of it), ``bucket``, ``url`` (the endpoint) and ``slow`` (the upload
    throttle); stopped at the end of the test."""
    import s3fs

    server = LocalS3(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # fsspec caches filesystems by their arguments, not by the environment: one of an earlier test's server would
    # be reused with its dead endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    # moto keeps its buckets in module-level state, shared by every server of this process: start empty.
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).close()
    fs = s3fs.S3FileSystem(endpoint_url=url, key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    server.fs, server.bucket, server.url = fs, BUCKET, url
    yield server
    s3fs.S3FileSystem.clear_instance_cache()
    server.slow.pattern = None
    server.stop()


def upload_folder(fs, folder: Path, prefix: str) -> None:
    """Every file of ``folder`` to ``s3://{prefix}/NAME``."""
    for path in sorted(folder.iterdir()):
        fs.put_file(str(path), f"{prefix}/{path.name}")
