"""Observability (issue 9, part 5): the registry and node servers' Prometheus metrics (per-RPC counts,
latencies, transfer bytes, denials; the node's resident modules and KV-cache counters) scraped over HTTP
after real calls, and ``--log-json`` lines from a real ``memfed registry serve`` process."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memfed.errors import InvalidArgumentError
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.mip.v1 import registry_service_pb2_grpc
from memfed.observability import JsonFormatter
from memfed.registry.core import Registry
from memfed.registry.service import BackgroundRegistry, RegistryServer
from memfed.registry_client import RegistryClient


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample at http://127.0.0.1:PORT/metrics, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[BackgroundRegistry]:
    reg = Registry.open(tmp_path / "reg")
    bg = BackgroundRegistry(RegistryServer(reg, insecure=True, metrics_port=0))
    bg.start()
    yield bg
    bg.stop()
    reg.close()


def test_registry_metrics_count_calls_denials_and_bytes(registry: BackgroundRegistry) -> None:
    port = registry.server.metrics_port
    assert port
    with RegistryClient(registry.address, principal="node:a") as client, pytest.raises(InvalidArgumentError):
        client.register(rpb.NodeIdentity())  # refused (empty identity): INVALID_ARGUMENT, still counted
    with grpc.insecure_channel(registry.address) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        for _ in range(2):  # no principal header on a plaintext registry: UNAUTHENTICATED, i.e. denied
            with pytest.raises(grpc.RpcError) as err:
                stub.LookupVersions(rpb.LookupRequest(cube_id="notes"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    s = scrape(port)
    svc = "memfed.mip.v1.RegistryService"
    assert value(s, "memfed_rpc_requests_total", service=svc, method="LookupVersions") == 2
    assert value(s, "memfed_rpc_denied_total", method="LookupVersions", code="UNAUTHENTICATED") == 2
    assert value(s, "memfed_rpc_requests_total", method="RegisterNode", code="INVALID_ARGUMENT") == 1
    assert value(s, "memfed_rpc_denied_total", method="RegisterNode") == 0
    assert value(s, "memfed_rpc_duration_seconds_count", method="LookupVersions") == 2
    assert value(s, "memfed_rpc_transfer_bytes_total", method="LookupVersions", direction="received") > 0


def test_metrics_are_off_unless_asked_for(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "reg")
    try:
        server = RegistryServer(reg, insecure=True)
        assert server.metrics is None and server.metrics_port is None
    finally:
        reg.close()


def test_node_metrics_count_rpcs_transfer_bytes_and_resident_modules(tmp_path: Path) -> None:
    from test_node_service import make_lora

    from memfed.client import NodeClient
    from memfed.node.service import BackgroundServer, Node, NodeServer
    from memfed.node.tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir("llama", tmp_path / "tiny-llama", seed=3)
    node = Node.open(model_dir, tmp_path / "store", node_id="node-m", kv_cache_bytes=4 << 20)
    bg = BackgroundServer(NodeServer(node, insecure=True, metrics_port=0))
    bg.start()
    try:
        port = bg.server.metrics_port
        assert port
        assert value(scrape(port), "memfed_node_resident_modules") == 0
        cube = make_lora(node.model, node.fingerprint, "facts", seed=1)
        with NodeClient(bg.address, timeout=60) as client:
            client.health()
            client.put_cube(cube)
            client.load(cube.ref)
            fetched = client.get_cube(cube.ref)  # a server stream through the interceptor
        s = scrape(port)
    finally:
        bg.stop()
        node.close()
    svc = "memfed.mip.v1.NodeService"
    assert value(s, "memfed_rpc_requests_total", service=svc, method="Health", code="OK") == 1
    assert value(s, "memfed_rpc_requests_total", method="PushCube", code="OK") == 1
    assert value(s, "memfed_rpc_requests_total", method="Load", code="OK") == 1
    pushed = value(s, "memfed_rpc_transfer_bytes_total", method="PushCube", direction="received")
    assert pushed >= len(cube.payload)
    assert value(s, "memfed_rpc_duration_seconds_count", method="PushCube") == 1
    assert fetched.payload == cube.payload
    assert value(s, "memfed_rpc_requests_total", method="FetchCube", code="OK") == 1
    sent = value(s, "memfed_rpc_transfer_bytes_total", method="FetchCube", direction="sent")
    assert sent >= len(cube.payload)
    assert value(s, "memfed_node_resident_modules") == 1
    assert value(s, "memfed_node_device_bytes") > 0
    assert ("memfed_node_kv_cache_hits_total", frozenset()) in s


def test_json_formatter_keeps_extra_fields_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed %s", ("Load",), sys.exc_info(), extra={"rpc": "Load"}
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "error" and line["message"] == "failed Load" and line["rpc"] == "Load"
    assert "ValueError: boom" in line["exc"] and line["ts"].endswith("Z")


def test_registry_serve_log_json_and_metrics_port(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "memfed.cli.main", "registry", "serve", "--dir", str(tmp_path / "reg"),
           "--insecure", "--port", "0", "--port-file", str(port_file), "--metrics-port", "0",
           "--log-json"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < end, "the registry did not start"
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.GetNode(rpb.GetNodeRequest(node_id="ghost"), timeout=10)  # denied: no principal
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    messages = {line["message"] for line in lines}
    assert "registry serving" in messages
    assert any(line.get("code") == "UNAUTHENTICATED" and line.get("rpc") == "GetNode" for line in lines)
    assert any("PLAINTEXT" in line["message"] and line["level"] == "warning" for line in lines)
    assert any("metrics_port" in line for line in lines)


def test_metrics_port_and_log_json_are_options_of_both_servers() -> None:
    from memfed.cli.node_cmd import serve_cmd as node_serve
    from memfed.cli.registry_cmd import serve_cmd as registry_serve

    for cmd in (node_serve, registry_serve):
        names = {o for p in cmd.params for o in p.opts}
        assert {"--metrics-port", "--log-json"} <= names
