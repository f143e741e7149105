"""A bank created on a Qdrant cluster: the sharding and replication the server backend
asks for, read from the requests it sends (a stand-in server records them; there is no
Docker engine to run a cluster in tests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.config import ClusterSettings
from mvpp.memory_bank.schema import Manifest
from mvpp.memory_bank.store import open_store
from mvpp.memory_bank.store.base import (
    FULL_SCAN_THRESHOLD_KB,
    RETRIEVAL_EF_CONSTRUCT,
    RETRIEVAL_GRAPH_M,
)
from mvpp.memory_bank.store.edge import edge_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


class Recorder(BaseHTTPRequestHandler):
    """Answers the calls that create a collection the way Qdrant 1.16 does, and keeps
    each request's method, path and JSON body."""

    requests: list[tuple[str, str, dict | None]] = []

    def _reply(self, result) -> None:
        body = json.dumps({"result": result, "status": "ok", "time": 0.0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.requests.append((self.command, self.path, json.loads(raw) if raw else None))

    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        self._record()
        if self.path == "/":
            body = json.dumps({"title": "qdrant - vector search engine", "version": "1.16.3"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.endswith("/exists"):
            self._reply({"exists": False})
        else:
            self.send_error(404)

    def do_PUT(self) -> None:  # noqa: N802
        self._record()
        if "/index" in self.path:
            self._reply({"operation_id": 0, "status": "completed"})
        else:
            self._reply(True)

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture()
def server():
    Recorder.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _manifest() -> Manifest:
    return Manifest(profile="lite", text_model="t", captioner_model=None, frame_model="f", retrieval_dim=8,
                    token_dim=8, frame_dim=4, n_frames=4, max_tokens=8)


def test_a_collection_is_created_with_the_cluster_settings(server):
    cluster = ClusterSettings(shard_number=6, replication_factor=2, write_consistency_factor=2)
    with open_store(qdrant_url=server, collection="clips", cluster=cluster) as store:
        store.init(_manifest())
    created = [body for method, path, body in Recorder.requests
               if method == "PUT" and path.split("?")[0] == "/collections/clips"]
    assert len(created) == 1
    body = created[0]
    assert (body["shard_number"], body["replication_factor"], body["write_consistency_factor"]) == (6, 2, 2)
    assert body["vectors"]["retrieval"]["size"] == 8 and "mvpp_manifest" in body["metadata"]
    # the graph is built and walked on an 8-bit copy of the retrieval vectors, kept in RAM
    scalar = body["vectors"]["retrieval"]["quantization_config"]["scalar"]
    assert (scalar["type"], scalar["always_ram"]) == ("int8", True)
    # the same graph as an embedded bank builds
    graph = edge_config(_manifest()).vectors["retrieval"].hnsw_config
    sent = body["vectors"]["retrieval"]["hnsw_config"]
    assert (sent["m"], sent["ef_construct"], sent["full_scan_threshold"]) == (
        graph.m, graph.ef_construct, graph.full_scan_threshold) == (
        RETRIEVAL_GRAPH_M, RETRIEVAL_EF_CONSTRUCT, FULL_SCAN_THRESHOLD_KB)
    assert sent.get("payload_m") is None and graph.payload_m is None  # the per-payload links stay
    indexed = [path for method, path, _ in Recorder.requests if "/index" in path]
    assert len(indexed) >= 4  # the payload indexes the filters use


def test_without_settings_the_server_decides(server):
    with open_store(qdrant_url=server, collection="plain") as store:
        store.init(_manifest())
    body = next(b for m, p, b in Recorder.requests if m == "PUT" and p.split("?")[0] == "/collections/plain")
    assert not {"shard_number", "replication_factor", "write_consistency_factor"} & {k for k, v in body.items() if v}


def test_cluster_flags_are_checked():
    assert ClusterSettings().collection_params() == {}
    with pytest.raises(ValueError, match="write consistency 3 needs as many copies"):
        ClusterSettings(replication_factor=2, write_consistency_factor=3)
    result = runner.invoke(bank_app, ["build", "--meta", "x.csv", "--replicas", "1", "--write-consistency", "2"])
    assert result.exit_code != 0 and "write consistency 2" in result.output
    with pytest.raises(ValueError, match="apply to a Qdrant server"):
        open_store(bank=Path("b"), cluster=ClusterSettings(shard_number=2))


def test_the_cluster_compose_file_starts_three_nodes_with_a_key():
    compose = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    nodes = {name: svc for name, svc in compose["services"].items() if svc["image"].startswith("qdrant/qdrant")}
    assert len(nodes) == 3
    for svc in nodes.values():
        env = svc["environment"]
        assert env["QDRANT__CLUSTER__ENABLED"] == "true" and "QDRANT__SERVICE__API_KEY" in env
    bootstrapped = [svc for svc in nodes.values() if "--bootstrap" in " ".join(svc.get("command", []))]
    assert len(bootstrapped) == 2  # two nodes join the first
