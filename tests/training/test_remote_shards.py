"""Shards over HTTP (fsspec) and ``pipe:``: exact epochs, a connection reset mid-shard, a missing shard.

A real ``ThreadingHTTPServer`` on 127.0.0.1 serves the shard folder; its handler can cut a response short with a
TCP reset, answer 503 once, or leave a shard out (404).
"""

from __future__ import annotations

import collections
import functools
import http.server
import socket
import struct
import threading
from pathlib import Path

import pytest

from medclip_train.data.datamodule import WebDataModule
from medclip_train.data.sources import ShardSource
from medclip_train.data.stream import DataError
from tests.shardkit import make_shards, shard_pattern

PREPROCESS = {
    "size": 32,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "resize_mode": "shortest",
}


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``faults`` maps a path to the faults of its next requests (``reset``, ``503``)."""

    faults: dict[str, list[str]]
    requests: collections.Counter

    def do_GET(self):  # noqa: N802 - the http.server hook name
        path = self.path.split("?")[0]
        self.requests[path] += 1
        fault = self.faults[path].pop(0) if self.faults.get(path) else None
        if fault == "503":
            self.send_error(503, "busy")
            return
        if fault == "reset":
            data = (Path(self.directory) / path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # half the shard: several samples, then the connection dies
            self.wfile.flush()
            # SO_LINGER 0: close() sends a TCP RST instead of a clean FIN, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; stopped at the end of the test."""
    root = tmp_path / "www"
    root.mkdir()
    cls = type("Handler", (ShardHandler,), {"faults": {}, "requests": collections.Counter()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(cls, directory=str(root)))
    httpd.faults, httpd.requests = cls.faults, cls.requests
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root, httpd.url = root, f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def make_dm(tokenizer, train, **kwargs) -> WebDataModule:
    dm = WebDataModule(train=train, **{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, **kwargs})
    dm.connect(tokenizer, PREPROCESS)
    return dm


def read_epoch(dm: WebDataModule, rank: int = 0, world: int = 1, **spec) -> list[dict]:
    loader = dm.train_dataloader()
    loader.world = (rank, world)
    for name, value in spec.items():  # knobs the tests turn down (backoff, skip-check threshold)
        setattr(loader.dataset.spec, name, value)
    return list(loader)


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_exact_epoch_over_http_two_ranks_two_workers_matches_local_read(server, tokenizer):
    sizes = [7, 3, 11, 5]
    paths = make_shards(server.root / "roco", sizes)
    local = shard_pattern(paths)
    remote = f"{server.url}/roco/train-{{000000..000003}}.tar"
    dm_local = make_dm(tokenizer, local, num_workers=2)
    dm_remote = make_dm(tokenizer, remote, num_workers=2)
    assert dm_remote._train_sizes == sizes, "sizes.json read over HTTP from the folder of the shards"
    per_rank = []
    for rank in range(2):
        remote_keys = keys(read_epoch(dm_remote, rank, 2))
        assert remote_keys == keys(read_epoch(dm_local, rank, 2)), "same plan, same order as the local shards"
        per_rank.append(remote_keys)
    seen = collections.Counter(per_rank[0] + per_rank[1])
    assert set(seen) == {f"train_{i:06d}" for i in range(sum(sizes))}
    assert sum(seen.values()) == sum(sizes), "26 samples on 2 ranks: each once, none padded"
    assert all(server.requests[f"/roco/train-{i:06d}.tar"] >= 1 for i in range(4))


def test_label_counts_read_from_remote_manifest(server, tokenizer):
    make_shards(server.root / "roco", [16])
    dm = make_dm(tokenizer, f"{server.url}/roco/train-000000.tar", label_top_k=3)
    assert dm.vocab is not None and len(dm.vocab) == 3


@pytest.mark.parametrize("fault", ["reset", "503"])
def test_transient_error_mid_shard_resumes_at_the_sample_reached(server, tokenizer, fault):
    paths = make_shards(server.root / "roco", [40, 8])
    remote = f"{server.url}/roco/train-{{000000..000001}}.tar"
    clean = read_epoch(make_dm(tokenizer, remote, shuffle_buffer=0))
    assert sum(int(b["read_retries"]) for b in clean) == 0
    requests_clean = server.requests["/roco/train-000000.tar"]

    server.faults["/roco/train-000000.tar"] = [fault]
    faulty = read_epoch(make_dm(tokenizer, remote, shuffle_buffer=0), retry_backoff_s=0.05)
    assert keys(faulty) == keys(clean) == [f"train_{i:06d}" for i in range(48)], "no sample lost or repeated"
    assert sum(int(b["skipped"]) for b in faulty) == 0
    assert sum(int(b["read_retries"]) for b in faulty) == 1, "the retry is counted"
    assert server.requests["/roco/train-000000.tar"] - requests_clean == 2, "the shard was reopened once"
    assert paths  # the shards were written where the server serves them


def test_missing_remote_shard_is_counted_and_named(server, tokenizer):
    make_shards(server.root / "roco", [6, 5, 7])
    (server.root / "roco" / "train-000001.tar").unlink()  # still listed in sizes.json: the server answers 404
    # Credentials in the URL (basic auth) must never reach an error message or a log.
    remote = f"http://user:s3cret@127.0.0.1:{server.server_address[1]}/roco/train-{{000000..000002}}.tar"
    batches = read_epoch(make_dm(tokenizer, remote), retry_backoff_s=0.05)
    assert sum(int(b["skipped"]) for b in batches) == 5, "the 5 samples of the missing shard are counted as lost"
    assert sorted(set(keys(batches))) == [f"train_{i:06d}" for i in [*range(6), *range(11, 18)]]
    assert sum(int(b["read_retries"]) for b in batches) == 0, "a 404 is not retried"
    assert server.requests["/roco/train-000001.tar"] == 1

    with pytest.raises(DataError) as err:
        read_epoch(make_dm(tokenizer, remote, max_skip_fraction=0.1), min_samples_for_skip_check=1)
    message = str(err.value)
    assert "train-000001.tar" in message and "FileNotFoundError" in message
    assert "s3cret" not in message


def test_remote_shards_without_sizes_json_name_the_file(server):
    make_shards(server.root / "roco", [4])
    (server.root / "roco" / "sizes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"127\.0\.0\.1:\d+/roco/sizes\.json does not exist"):
        WebDataModule(train=f"{server.url}/roco/train-000000.tar")


def test_explicit_sizes_url_and_pipe_shards(server, tokenizer, tmp_path):
    paths = make_shards(server.root / "roco", [5, 6])
    sizes_url = f"{server.url}/roco/sizes.json"
    pipe = ShardSource(shards=f"pipe:cat {server.root}/roco/train-{{000000..000001}}.tar", sizes=sizes_url)
    with pytest.raises(FileNotFoundError, match="sizes"):
        WebDataModule(train=[ShardSource(shards=pipe.shards)])  # a pipe: command has no folder to look in
    dm = make_dm(tokenizer, [pipe])
    assert dm._train_sizes == [5, 6]
    got = keys(read_epoch(dm))
    assert sorted(got) == [f"train_{i:06d}" for i in range(11)]
    assert got == keys(read_epoch(make_dm(tokenizer, shard_pattern(paths))))
