"""deploy/ (issue 9, parts 2 and 3): the compose file, Kubernetes manifests, systemd units, Dockerfiles
and deploy/README.md name real memfed commands and flags (checked against the click commands
themselves), agree on ports, mount what they use and have health checks; and the registry image's
dependency list (deploy/requirements-registry.txt) is all the registry needs: it imports, issues
certificates and serves with every other installed distribution (torch, numpy, flwr, ...) blocked."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from memfed.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


# -- checking a memfed command line against the CLI ---------------------------------------------------------


def _default(path: list[str], option: str) -> Any:
    cmd: Any = cli
    for name in path:
        cmd = cmd.commands[name]
    return next(p.default for p in cmd.params if option in p.opts)


REGISTRY_PORT = _default(["registry", "serve"], "--port")
NODE_PORT = _default(["node", "serve"], "--port")
SUPERLINK_PORT = _default(["fed", "serve"], "--port")
MIP_PORTS = {REGISTRY_PORT, NODE_PORT}


def check_memfed(argv: list[str], where: str) -> tuple[list[str], dict[str, list[str]]]:
    """Fail unless ``argv`` (``memfed ...``) names a real command with real options, a value after each
    option that takes one, and its required options and arguments. Returns (command path, options)."""
    assert Path(argv[0]).name == "memfed", f"{where}: not a memfed command: {argv}"
    cmd: click.Command = cli
    path: list[str] = []
    i = 1
    while isinstance(cmd, click.Group):
        assert i < len(argv), f"{where}: {' '.join(argv)} stops at a command group"
        name = argv[i]
        if name in ("-h", "--help"):
            return path, {}
        assert name in cmd.commands, f"{where}: `memfed {' '.join(path)}` has no subcommand {name!r}"
        cmd, i = cmd.commands[name], i + 1
        path.append(name)
    by_opt = {o: p for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    given: dict[str, list[str]] = {}
    positional: list[str] = []
    args = argv[i:]
    j = 0
    while j < len(args):
        tok = args[j]
        if tok in ("-h", "--help"):
            return path, given
        if tok.startswith("-") and tok != "-":
            name, eq, value = tok.partition("=")
            assert name in by_opt, f"{where}: `memfed {' '.join(path)}` has no option {name}"
            opt = by_opt[name]
            if not opt.is_flag and not opt.count:
                if not eq:
                    j += 1
                    assert j < len(args) and not args[j].startswith("--"), f"{where}: {name} needs a value"
                    value = args[j]
                given.setdefault(opt.opts[0], []).append(value)
            else:
                given.setdefault(opt.opts[0], []).append("")
        else:
            positional.append(tok)
        j += 1
    for p in cmd.params:
        if p.required and isinstance(p, click.Option):
            assert p.opts[0] in given, f"{where}: `memfed {' '.join(path)}` needs {p.opts[0]}"
    required_args = [p for p in cmd.params if isinstance(p, click.Argument) and p.required]
    assert len(positional) >= len(required_args), f"{where}: `memfed {' '.join(path)}` misses arguments"
    return path, given


def shell_invocations(text: str) -> Iterator[list[str]]:
    """Each ``memfed ...`` command in shell text (pipes, &&, ;, redirections, comments and backslash
    continuations handled), as an argv list."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words = list(lex)
        start = None
        for k, w in enumerate([*words, ";"]):
            # "memfed" after an option is that option's value (kubectl -n memfed), not the command
            if start is None and Path(w).name == "memfed" and not (k and words[k - 1].startswith("-")):
                start = k
            elif start is not None and w and set(w) <= set("();<>|&"):
                yield words[start:k]
                start = None


def exec_argv(command: Any) -> list[str]:
    return command if isinstance(command, list) else shlex.split(command)


# -- compose ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_commands_volumes_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"registry", "node-a", "node-b", "node-c", "superlink"} <= set(services)
    declared = set(compose["volumes"])
    for name, svc in services.items():
        assert svc.get("image"), f"{name} has no image"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith("."):
                assert source in declared, f"{name} mounts undeclared volume {source}"
            else:
                assert (DEPLOY / source).exists(), f"{name} mounts missing file {source}"
        argv = exec_argv(svc["command"])
        if Path(argv[0]).name == "memfed":
            check_memfed(argv, f"compose {name}")
        test = svc.get("healthcheck", {}).get("test")
        if test and Path(test[1]).name == "memfed":
            check_memfed(test[1:], f"compose {name} healthcheck")
    for name in ("registry", "node-a", "node-b", "node-c", "superlink"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "registry" in services["registry"]["image"] and "node" in services["node-a"]["image"]


def test_compose_ports_agree_with_the_cli(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def container_ports(svc: dict[str, Any]) -> set[int]:
        return {int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])}

    path, opts = check_memfed(services["registry"]["command"], "compose registry")
    assert path == ["registry", "serve"] and int(opts["--port"][0]) == REGISTRY_PORT
    assert REGISTRY_PORT in container_ports(services["registry"])
    metrics = opts["--metrics-port"][0]
    assert f":{metrics}/metrics" in " ".join(services["registry"]["healthcheck"]["test"])
    stores = set()
    for name in ("node-a", "node-b", "node-c"):
        svc = services[name]
        path, opts = check_memfed(svc["command"], f"compose {name}")
        assert path == ["node", "serve"] and int(opts["--port"][0]) == NODE_PORT
        assert container_ports(svc) == {NODE_PORT}
        assert opts["--host"] == [name], "a node listens on (and registers) its service name"
        assert opts["--registry"] == [f"registry:{REGISTRY_PORT}"]
        _, health = check_memfed(svc["healthcheck"]["test"][1:], f"compose {name} healthcheck")
        assert health["--node"] == [f"{name}:{NODE_PORT}"]
        store = next(v for v in svc["volumes"] if v.endswith(":" + opts["--store"][0]))
        stores.add(store.split(":")[0])
    assert len(stores) == 3, "each node has its own store volume"
    path, opts = check_memfed(services["superlink"]["command"], "compose superlink")
    assert path == ["fed", "serve"] and int(opts["--port"][0]) == SUPERLINK_PORT
    assert SUPERLINK_PORT in container_ports(services["superlink"])


def test_bootstrap_script_uses_real_commands() -> None:
    found = list(shell_invocations((DEPLOY / "bootstrap.sh").read_text()))
    paths = {tuple(check_memfed(argv, "bootstrap.sh")[0]) for argv in found}
    assert {("pki", "init"), ("pki", "issue"), ("identity", "init"), ("audit", "verify")} <= paths


def test_docker_compose_config_where_the_client_runs() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on PATH")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"`docker compose` is not available here: {probe.stderr.strip()[:200]}")
    out = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "--profile", "fed", "config", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


# -- Kubernetes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _port(container: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == name)


def test_k8s_manifests_have_the_required_objects_and_fields(k8s: list[dict[str, Any]]) -> None:
    for d in k8s:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name")
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "memfed"
    deploy = _one(k8s, "Deployment")
    sts = _one(k8s, "StatefulSet")
    assert len([d for d in k8s if d["kind"] == "Secret"]) >= 2
    assert sts["spec"]["volumeClaimTemplates"], "each node gets its own volume"
    assert sts["spec"]["serviceName"] == _one(k8s, "Service", sts["spec"]["serviceName"])["metadata"]["name"]
    for workload in (deploy, sts):
        pod = workload["spec"]["template"]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"].startswith("memfed/")
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
            argv = c["command"] + c.get("args", [])
            if Path(argv[0]).name == "memfed":
                check_memfed(argv, f"k8s {c['name']}")
            else:
                for inv in shell_invocations(" ".join(argv[2:])):
                    check_memfed(inv, f"k8s {c['name']} shell")
        for c in pod["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{c['name']} lacks probes"
            probe = c["readinessProbe"].get("exec", {}).get("command")
            for inv in shell_invocations(" ".join(probe[2:])) if probe else ():
                check_memfed(inv, f"k8s {c['name']} readiness")
    secret_names = {d["metadata"]["name"] for d in k8s if d["kind"] == "Secret"}
    for workload in (deploy, sts):
        for v in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in secret_names


def test_k8s_ports_agree_and_the_network_policy_opens_only_mip_ports(k8s: list[dict[str, Any]]) -> None:
    registry = _one(k8s, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    node = _one(k8s, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    _, ropts = check_memfed(registry["command"], "k8s registry")
    _, nopts = check_memfed(node["command"], "k8s node")
    assert int(ropts["--port"][0]) == _port(registry, "mip") == REGISTRY_PORT
    assert int(nopts["--port"][0]) == _port(node, "mip") == NODE_PORT
    assert int(ropts["--metrics-port"][0]) == _port(registry, "metrics")
    assert int(nopts["--metrics-port"][0]) == _port(node, "metrics")
    service = _one(k8s, "Service", "registry")
    assert nopts["--registry"] == [f"registry:{service['spec']['ports'][0]['port']}"]
    assert {p["port"] for p in service["spec"]["ports"]} == {REGISTRY_PORT}
    policy_ports = set()
    for pol in (d for d in k8s if d["kind"] == "NetworkPolicy"):
        assert "Ingress" in pol["spec"]["policyTypes"]
        for rule in pol["spec"]["ingress"]:
            assert rule.get("ports"), "an ingress rule without ports opens every port"
            policy_ports |= {int(p["port"]) for p in rule["ports"]}
    assert policy_ports == MIP_PORTS


# -- systemd, Dockerfiles, README ------------------------------------------------------------------------


def test_systemd_units_parse_and_exec_real_commands() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"memfed-registry.service", "memfed-node@.service"}
    ports = {}
    for unit in units:
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read(unit)
        assert {"Unit", "Service", "Install"} <= set(cp.sections()), unit.name
        argv = shlex.split(cp["Service"]["ExecStart"])
        assert argv[0].startswith("/"), f"{unit.name}: ExecStart needs an absolute path"
        path, opts = check_memfed(argv, unit.name)
        ports[tuple(path)] = int(opts.get("--port", ["0"])[0])
    assert ports[("registry", "serve")] == REGISTRY_PORT and ports[("node", "serve")] == NODE_PORT


def _dockerfile_cmd(text: str) -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]


def test_dockerfiles_per_role_and_no_torch_in_the_registry_image() -> None:
    for role in ("registry", "node", "superlink"):
        text = (DEPLOY / f"Dockerfile.{role}").read_text()
        assert text.startswith("#") and "FROM python:3.11" in text
        argv = _dockerfile_cmd(text)
        if Path(argv[0]).name == "memfed":
            check_memfed(argv, f"Dockerfile.{role}")
    registry = (DEPLOY / "Dockerfile.registry").read_text()
    runs = " ".join(re.findall(r"^RUN (.*(?:\\\n.*)*)", registry, re.M))
    assert "pip install --no-deps ." in runs and "-r deploy/requirements-registry.txt" in runs
    assert not re.search(r"pip install[^&]*torch", runs), "the registry image must not install torch"
    assert re.search(r"pip install[^&]*torch==", (DEPLOY / "Dockerfile.node").read_text())


def test_readme_commands_are_real() -> None:
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [argv for block in blocks for argv in shell_invocations(block)]
    paths = {tuple(check_memfed(argv, "deploy/README.md")[0]) for argv in commands}
    for needed in [("pki", "init"), ("pki", "issue"), ("registry", "serve"), ("node", "serve"),
                   ("identity", "init"), ("audit", "verify"), ("sync",), ("fed", "init")]:  # fmt: skip
        assert needed in paths, f"deploy/README.md never shows memfed {' '.join(needed)}"
    for heading in ("PKI set-up", "first node", "Adding a node", "Rotating a certificate", "Backing up"):
        assert heading.lower() in text.lower()


# -- the registry image's dependencies --------------------------------------------------------------------


def _closure(reqs: list[Requirement]) -> set[str]:
    """Canonical names of the installed distributions ``reqs`` pull in, transitively."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in dist.requires or []:
            sub = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return {k.split("[")[0] for k in seen}


def _registry_requirements() -> list[Requirement]:
    lines = (DEPLOY / "requirements-registry.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_registry_requirements_repeat_the_project_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {canonicalize_name(r.name): r for r in map(Requirement, project)}
    for req in _registry_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not a memfed dependency"
        assert (req.specifier, req.extras) == (pins[name].specifier, pins[name].extras), (
            f"deploy/requirements-registry.txt pins {req}, pyproject.toml {pins[name]}"
        )
    assert not {"torch", "transformers", "peft", "numpy", "flwr"} & {
        canonicalize_name(r.name) for r in _registry_requirements()
    }


REGISTRY_RUNTIME = r"""
import json, sys
from pathlib import Path
blocked = set(json.loads(sys.argv[1]))
tmp = Path(sys.argv[2])
preloaded = set(sys.modules)  # site hooks (e.g. setuptools' _distutils_hack) ran before this line

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ImportError(f"{name} is not in deploy/requirements-registry.txt")

sys.meta_path.insert(0, Block())
from memfed.cli.main import main

def run(*args):
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None), f"memfed {' '.join(args)} exited {code}"

for group in (["registry", "serve"], ["pki", "issue"], ["audit", "verify"], ["identity", "init"]):
    run(*group, "--help")
pki = str(tmp / "pki")
run("pki", "init", "--dir", pki)
for name in ("registry", "node-a"):
    run("pki", "issue", name, "--dir", pki)
run("identity", "init", "--dir", str(tmp / "id-a"), "--name", "node-a")
run("audit", "verify", "--dir", str(tmp / "reg"))

from memfed.registry.core import Registry
from memfed.registry.service import BackgroundRegistry, RegistryServer
from memfed.registry.tls import TlsFiles

reg = Registry.open(tmp / "reg", ca_pem=(tmp / "pki" / "ca.pem").read_bytes())
bg = BackgroundRegistry(RegistryServer(reg, tls=TlsFiles.from_dir(tmp / "pki" / "registry"), metrics_port=0))
bg.start()
try:
    run("registry", "register", "--registry", bg.address, "--tls", str(tmp / "pki" / "node-a"),
        "--identity", str(tmp / "id-a"), "--address", "127.0.0.1:7711")
finally:
    bg.stop()
    reg.close()
print(json.dumps(sorted(blocked & {m.partition(".")[0] for m in set(sys.modules) - preloaded})))
"""


def test_the_registry_runs_with_only_its_listed_dependencies(tmp_path: Path) -> None:
    allowed = _closure(_registry_requirements()) | {"memfed"}
    # Every importable top-level module of an installed distribution outside the registry's closure.
    blocked = {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in allowed for d in dists)
    }
    assert {"torch", "numpy", "transformers", "peft", "flwr"} <= blocked
    out = subprocess.run(
        [sys.executable, "-c", REGISTRY_RUNTIME, json.dumps(sorted(blocked)), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_command_checker_catches_mistakes() -> None:
    check_memfed(["memfed", "node", "serve", "--port", "7711", "--insecure"], "ok")
    for bad in (
        ["memfed", "node", "serv"],  # no such subcommand
        ["memfed", "node", "serve", "--listen", "0.0.0.0"],  # no such option
        ["memfed", "node", "serve", "--port"],  # an option without its value
        ["memfed", "fed", "serve", "shared", "--store", "s"],  # --tls-dir is required
        ["memfed", "pki", "issue", "--dir", "pki"],  # NAME is missing
    ):
        with pytest.raises(AssertionError):
            check_memfed(bad, "bad")
    found = list(shell_invocations("kubectl -n memfed get pods && memfed pki init --dir p | tee log"))
    assert found == [["memfed", "pki", "init", "--dir", "p"]]
