"""The network story of ``memfed demo``: a registry and three nodes as processes on loopback (mutual TLS).

Every step drives code that already exists and is tested elsewhere: the node and registry servers
(``memfed node serve`` / ``memfed registry serve``, started here as subprocesses exactly as
tests/test_sync_processes.py starts them), NodeClient/RegistryClient, internalize/externalize, the
editor (ROME) and lifecycle rollback, the sealed sync path (which watermarks per recipient), watermark
detection, the federation (``memfed.fed.deploy``'s SuperLink and SuperNodes, or with ``--fast`` its
strategy and client app in-process) and the lifecycle's archive/restore. This module only tells the story
and checks what each step should show; it owns no logic of its own beyond that.

All state lives in the caller's work folder (PKI, identities, stores, logs, the nodes' MEMFED_HOME), and
every process runs in its own process group, stopped on the way out whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from memfed.processes import MEMFED, ServerProcess, wait_until

NODES = ("node-a", "node-b", "node-c")
DOC_ID = "doc/dreta-and-brigis"  # a shipped document: 5 facts the bare model does not know
CUBE_ID = "dreta"
QUESTION = "Question: Which city is the capital of Dreta?\nAnswer:"
ANSWER = "Fopestox"
SHARED_ID = "shared_notes"
FED_MEMBERS = ("node-a", "node-b")
FED_TEXTS = {
    "node-a": "Dreta is a small republic. Its capital is Fopestox. The harbour opens at dawn.",
    "node-b": "Brigis trades salt and wool. The Brigis council meets every spring.",
}
FED_STEPS = 4


class Network:
    """The registry and nodes A, B, C under ``work``; B and C sync the demo cube in the background."""

    def __init__(self, work: Path, model_dir: Path) -> None:
        self.work = work
        self.model_dir = model_dir
        self.pki = work / "pki"
        self.procs: list[ServerProcess] = []
        self.nodes: dict[str, ServerProcess] = {}
        self.addrs: dict[str, str] = {}
        self.reg_addr = ""
        self.reg_key = work / "registry" / "key" / "identity.pub.json"
        self.env = {
            **os.environ,
            "MEMFED_HOME": str(work / "home"),
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",  # small model on shared cores: one thread per process is fastest
        }

    def identity_dir(self, name: str) -> Path:
        return self.work / f"id-{name}"

    def store_dir(self, name: str) -> Path:
        return self.work / f"store-{name}"

    def start(self) -> None:
        """PKI, identities, the registry, then the three nodes (started together, awaited in `ready`)."""
        from memfed.crypto.identity import init_identity
        from memfed.registry import pki

        pki.init_ca(self.pki)
        for name in ("registry", "admin", *NODES):
            pki.issue(self.pki, name)
        port_file = self.work / "registry.port"
        self.procs.append(
            ServerProcess(
                [*MEMFED, "registry", "serve", "--dir", str(self.work / "registry"), "--tls",
                 str(self.pki / "registry"), "--port", "0", "--port-file", str(port_file),
                 "--operator", "admin"],
                self.work / "registry.log", self.env,
            )
        )  # fmt: skip
        wait_until(lambda: port_file.exists() and bool(port_file.read_text().strip()), 120, "the registry")
        self.reg_addr = f"127.0.0.1:{port_file.read_text().strip()}"
        for name in NODES:
            init_identity(self.identity_dir(name), name=name)
            sync = ["--sync", CUBE_ID] if name != "node-a" else []
            self.nodes[name] = ServerProcess(
                [*MEMFED, "node", "serve", "--model", str(self.model_dir), "--store",
                 str(self.store_dir(name)), "--port", "0", "--json", "--tls", str(self.pki / name),
                 "--registry", self.reg_addr,
                 "--registry-key", str(self.reg_key), "--identity", str(self.identity_dir(name)),
                 "--node-id", name, "--sync-interval", "0.5", "--kv-cache-mb", "0", *sync],
                self.work / f"{name}.log", self.env,
            )  # fmt: skip
            self.procs.append(self.nodes[name])

    def ready(self) -> None:
        """Wait until every node listens (they load the model while the demo trains)."""
        for name, proc in self.nodes.items():
            self.addrs[name] = proc.read_json()["address"]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def node(self, target: str, as_name: str | None = None) -> Any:
        """A NodeClient to ``target`` authenticated with ``as_name``'s certificate (default: itself)."""
        from memfed.client import NodeClient
        from memfed.registry.tls import TlsFiles

        creds = TlsFiles.from_dir(self.pki / (as_name or target)).channel_credentials()
        return NodeClient(self.addrs[target], credentials=creds, timeout=120)

    def registry(self, as_name: str) -> Any:
        """A RegistryClient authenticated with ``as_name``'s certificate (its principal is that name)."""
        from memfed.registry.tls import TlsFiles
        from memfed.registry_client import RegistryClient

        return RegistryClient(self.reg_addr, tls=TlsFiles.from_dir(self.pki / as_name))


@contextlib.contextmanager
def network(work: Path, model_dir: Path) -> Iterator[Network]:
    """The network, always stopped (every process group) when the story ends, whatever happened."""
    net = Network(work, model_dir)
    try:
        yield net
    finally:
        net.stop()


def _starts(text: str, want: str) -> bool:
    return text.strip().startswith(want.strip())


STEP_NAMES = (
    "internalize", "hot_swap", "edit_rollback", "seal_send", "deny", "watermark_trace", "federated_round",
    "time_machine", "externalize",
)  # fmt: skip


def run(story: Any, work: Path, model_dir: Path | None = None, *, fast: bool = False) -> None:
    """Tell the whole story inside ``work`` (the caller removes it); each step is timed by ``story``.

    ``fast`` (CI) saves time where the story's result does not depend on it: the federated round runs
    in-process instead of on Flower's deployment engine, and the editor's key statistics use a smaller
    slice of its corpus. Internalization keeps its recall gate either way.
    """
    import torch

    from memfed.node.models import resolve_model_dir

    path = resolve_model_dir(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_conversion.py: one thread is faster on 2 shared cores
    try:
        with network(work, path) as net:
            steps = _Steps(net, work, path, fast)
            plan = steps.plan()
            assert tuple(name for name, _, _ in plan) == STEP_NAMES
            for name, title, fn in plan:
                rec = story.step(name, title, fn)
                if not rec["ok"]:
                    break  # later steps build on this one: stop the story here, the JSON says where
    finally:
        torch.set_num_threads(threads)


class _Steps:
    """The nine steps; ``st`` carries what one step hands the next (cubes, digests, identities)."""

    def __init__(self, net: Network, work: Path, model_dir: Path, fast: bool) -> None:
        self.net, self.work, self.model_dir, self.fast = net, work, model_dir, fast
        self.st: dict[str, Any] = {}

    def plan(self) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
        return [
            ("internalize", "Internalize a document into a LoRA cube on node A", self.internalize),
            ("hot_swap", "Activate and hot-swap modules on A; one mixed-module batch", self.hot_swap),
            ("edit_rollback", "Edit one fact (ROME) on A, then roll the edit back", self.edit_rollback),
            ("seal_send", "Grant B; B syncs it sealed + watermarked, verifies, answers", self.seal_send),
            ("deny", "Node C has no grant: denied, and the audit log shows it", self.deny),
            ("watermark_trace", "Leak test: find the watermark in B's copy, name B", self.watermark_trace),
            ("federated_round", "A federated round across A and B: the next version", self.federated_round),
            ("time_machine", "Archive the module on A, then restore it (time machine)", self.time_machine),
            ("externalize", "Externalize A's module back to text", self.externalize),
        ]  # fmt: skip

    # -- internalize ------------------------------------------------------------------------------------

    def internalize(self) -> dict[str, Any]:
        from memfed.client import Row
        from memfed.node.conversion.documents import shipped_documents
        from memfed.node.conversion.internalize import internalize
        from memfed.node.models import load_host_model
        from memfed.node.plaintext import PlaintextMemory
        from memfed.node.store import CubeStore

        t_net = time.perf_counter()
        self.net.start()  # the registry is up; the nodes start loading their models
        model, tokenizer = load_host_model(self.model_dir)
        self.st.update(model=model, tokenizer=tokenizer)
        t0 = time.perf_counter()
        doc = next(d for d in shipped_documents() if d.doc_id == DOC_ID)
        # Trains while the nodes load their models.
        with CubeStore(self.work / "local") as store, PlaintextMemory(self.work / "vault.db") as vault:
            report, cube = internalize(
                self.st["model"], self.st["tokenizer"], [doc], cube_id=CUBE_ID, store=store, vault=vault,
                owner="node-a", model_name=self.model_dir.name,
            )  # fmt: skip
        self.st.update(cube=cube, doc=doc)
        trained = time.perf_counter() - t0
        self.net.ready()
        started = time.perf_counter() - t_net - trained
        with self.net.node("node-a") as na:
            na.put_cube(cube)
            before, after = na.generate(
                [
                    Row(QUESTION, max_new_tokens=6, base_only=True),
                    Row(QUESTION, modules=(CUBE_ID,), max_new_tokens=6),
                ]
            )
        ok = report.registered and _starts(after.text, ANSWER) and not _starts(before.text, ANSWER)
        return {
            "ok": ok,
            "ref": cube.ref,
            "facts": report.facts,
            "recall_heldout": report.recall_heldout,
            "train_seconds": round(trained, 2),
            "network_seconds": round(started, 2),
            "nodes": dict(self.net.addrs),
            "before": before.text,
            "after": after.text,
            "say": f"registry + 3 nodes up (mTLS, {started:.1f} s outside training) at "
            f"{', '.join(self.net.addrs.values())}; {doc.doc_id} → "
            f"{cube.ref} ({report.facts} facts, held-out recall {report.recall_heldout:.2f}, trained in "
            f"{trained:.1f} s), pushed to node A.\n    {QUESTION.splitlines()[0]!r} → bare {before.text!r}, "
            f"with the module {after.text!r}",
        }

    # -- hot swap ------------------------------------------------------------------------------------------

    def hot_swap(self) -> dict[str, Any]:
        import torch

        from memfed.client import Row
        from memfed.cube.build import lora_cube
        from memfed.node.runtime import ModuleRuntime

        model = self.st["model"]
        g = torch.Generator().manual_seed(1)
        layers = list(ModuleRuntime(model).linear_layers.items())[:4]
        other = lora_cube(  # a second module, so there is something to swap between
            model,
            {n: (torch.randn(4, i, generator=g) * 0.05, torch.randn(o, 4, generator=g) * 0.05)
             for n, (i, o) in layers},
            cube_id="demo_style",
        )  # fmt: skip
        cube = self.st["cube"]
        with self.net.node("node-a") as na:
            na.put_cube(other)
            loads = [na.load(cube.ref).seconds, na.load(other.ref).seconds]
            swaps = sorted(na.activate(ref).seconds for ref in [cube.ref, other.ref] * 10)
            na.deactivate()
            rows = [
                Row(QUESTION, modules=(cube.ref,), max_new_tokens=6),
                Row(QUESTION, max_new_tokens=6, base_only=True),
                Row(QUESTION, modules=(other.ref,), max_new_tokens=6),
            ]
            with_module, bare, styled = na.generate(rows)
        swap_ms = swaps[len(swaps) // 2] * 1e3
        load_ms = sum(loads) / len(loads) * 1e3
        ok = _starts(with_module.text, ANSWER) and bare.text != with_module.text
        return {
            "ok": ok,
            "activate_ms_p50": round(swap_ms, 4),
            "load_ms": round(load_ms, 2),
            "batch_rows": with_module.batch_rows,
            "mixed_batch": [with_module.text, bare.text, styled.text],
            "say": f"load {load_ms:.1f} ms/module, activate p50 {swap_ms * 1e3:.0f} µs (node-side, 20 "
            f"swaps); one batch of {with_module.batch_rows} rows: {with_module.text!r} (dreta) / "
            f"{bare.text!r} (bare) / {styled.text!r} (demo_style)",
        }

    # -- edit and roll back -------------------------------------------------------------------------------

    def edit_rollback(self) -> dict[str, Any]:
        from memfed.client import Row
        from memfed.node.editing.apply import apply_edits
        from memfed.node.editing.counterfact import load_cases
        from memfed.node.editing.editor import Editor
        from memfed.node.editing.stats import default_corpus
        from memfed.node.store import CubeStore

        model, tokenizer = self.st["model"], self.st["tokenizer"]
        for p in model.parameters():
            p.requires_grad_(False)
        corpus = default_corpus()[:: 12 if self.fast else 6]  # the key statistics: a slice, in memory
        editor = Editor(model, tokenizer, texts=corpus, cache_stats=False)
        cases = load_cases()
        first, fact = cases[123], cases[201]
        with CubeStore(self.work / "local") as store, self.net.node("node-a") as na:
            [bare] = na.generate([Row(fact.prompt, max_new_tokens=4, base_only=True)])
            for case in (first, fact):  # fixes@1.0.0 edits one fact; fixes@1.1.0 adds the demo's fact
                apply_edits(editor, store, method="rome", layer=0, default_cube="fixes",
                            single=(case.prompt, case.subject, case.target_new))  # fmt: skip
            for version in ("1.0.0", "1.1.0"):
                na.put_cube(store.get("fixes", version))
            [edited] = na.generate([Row(fact.prompt, modules=("fixes",), max_new_tokens=4)])
            back = na.rollback("fixes", to_version="1.0.0", reason="demo: undo the edit")
            [rolled] = na.generate([Row(fact.prompt, modules=("fixes",), max_new_tokens=4)])
        ok = _starts(edited.text, fact.target_new) and rolled.text == bare.text and edited.text != bare.text
        return {
            "ok": ok,
            "prompt": fact.prompt,
            "target_new": fact.target_new,
            "bare": bare.text,
            "edited": edited.text,
            "rolled_back": rolled.text,
            "current": back.current,
            "say": f"{fact.prompt!r}: bare {bare.text!r} → edited (fixes@1.1.0) {edited.text!r} → rollback "
            f"to {back.current}: {rolled.text!r} (the bare answer again)",
        }

    # -- seal, watermark, send -------------------------------------------------------------------------

    def seal_send(self) -> dict[str, Any]:
        from memfed.client import Row
        from memfed.crypto.identity import load_identity
        from memfed.crypto.signing import sign_manifest

        cube = self.st["cube"]
        a_ident = load_identity(self.net.identity_dir("node-a"))
        with self.net.registry("node-a") as ra:
            ra.publish(sign_manifest(cube.manifest, a_ident), "node-a")
            ra.grant(CUBE_ID, "node:node-b", ["export"])
        with self.net.node("node-b") as nb:
            wait_until(lambda: any(m.cube_id == CUBE_ID for m in nb.list_cubes()), 120, "B to sync the cube")
            got = next(m for m in nb.list_cubes() if m.cube_id == CUBE_ID)
            [out] = nb.generate([Row(QUESTION, modules=(CUBE_ID,), max_new_tokens=6)])
        self.st["b_digest"] = got.digest
        marked = got.digest != cube.manifest.digest
        tamper = self._tamper_check(cube)
        ok = marked and _starts(out.text, ANSWER) and tamper
        return {
            "ok": ok,
            "a_digest": cube.manifest.digest,
            "b_digest": got.digest,
            "b_answer": out.text,
            "tamper_detected": tamper,
            "say": f"A granted B export; B's sync fetched {got.cube_id}@{got.version} sealed for B (HPKE + "
            f"AES-GCM chunks) and watermarked for B (digest {cube.manifest.digest[7:19]}… → "
            f"{got.digest[7:19]}…), "
            f"verified it and answers {out.text!r}; a flipped byte in a sealed file is refused: {tamper}",
        }

    def _tamper_check(self, cube: Any) -> bool:
        """One flipped byte in a sealed file must be refused (the seal's AEAD), here on a local export."""
        from memfed.crypto.exchange import export_cube
        from memfed.crypto.identity import load_identity
        from memfed.crypto.seal import open_file
        from memfed.crypto.signing import TrustedKeys
        from memfed.errors import MemfedError
        from memfed.node.store import CubeStore

        a_ident = load_identity(self.net.identity_dir("node-a"))
        b_ident = load_identity(self.net.identity_dir("node-b"))
        out = self.work / "tamper.mcube"
        with CubeStore(self.work / "local") as store:
            export_cube(store, cube.manifest.cube_id, cube.manifest.version, a_ident, [b_ident.public], out,
                        watermark=False)  # fmt: skip
        data = bytearray(out.read_bytes())
        data[-40] ^= 0x01
        out.write_bytes(bytes(data))
        with CubeStore(self.work / "tamper-store") as store:
            try:
                open_file(out, store, b_ident, TrustedKeys([b_ident.public, a_ident.public]))
            except MemfedError:
                return not store.has(cube.manifest.cube_id, cube.manifest.version)
        return False

    # -- deny ----------------------------------------------------------------------------------------------

    def deny(self) -> dict[str, Any]:
        def denied() -> list[Any]:
            with self.net.registry("admin") as adm:
                entries = adm.read_audit(1)
            return [
                e for e in entries if e.principal == "node:node-c" and e.cube_id == CUBE_ID and not e.allowed
            ]

        wait_until(lambda: bool(denied()), 60, "C's denial in the audit log")
        entry = denied()[0]
        with self.net.node("node-c") as nc:
            held = any(m.cube_id == CUBE_ID for m in nc.list_cubes())
        return {
            "ok": not held,
            "audit": {
                "sequence": entry.sequence,
                "principal": entry.principal,
                "action": entry.action,
                "reason": entry.reason,
            },
            "say": f"C's sync of {CUBE_ID} refused; audit #{entry.sequence}: {entry.principal} "
            f"{entry.action} {entry.cube_id} DENIED ({entry.reason})",
        }

    # -- watermark trace -----------------------------------------------------------------------------------

    def watermark_trace(self) -> dict[str, Any]:
        from memfed.crypto import ledger
        from memfed.crypto.identity import load_identity
        from memfed.crypto.watermark import detect_file
        from memfed.cube.digest import digest_hex

        hexd = digest_hex(self.st["b_digest"])
        leaked = self.net.store_dir("node-b") / "objects" / hexd[:2] / hexd[2:]  # B's copy, as it would leak
        a_dir = self.net.identity_dir("node-a")
        found = detect_file(leaked, load_identity(a_dir).watermark_secret(), ledger.records(a_dir))
        names = {load_identity(self.net.identity_dir(n)).recipient_id: n for n in NODES}
        who = names.get(found.best_mark_id or "", "nobody")
        return {
            "ok": found.detected and who == "node-b",
            "z": round(found.best_z, 2),
            "threshold": found.threshold,
            "traced_to": who,
            "say": f"{found.summary()} → the leak came from {who}",
        }

    # -- federated round --------------------------------------------------------------------------------

    def federated_round(self) -> dict[str, Any]:
        from memfed.crypto.identity import load_identity
        from memfed.crypto.signing import sign_manifest
        from memfed.cube.manifest import manifest_from_bytes
        from memfed.fed.authority import LocalAuthority, write_grants
        from memfed.fed.shared import new_shared_cube
        from memfed.node.store import CubeStore

        fed = self.work / "fed"
        fed.mkdir(parents=True, exist_ok=True)
        idents = {n: load_identity(self.net.identity_dir(n)) for n in FED_MEMBERS}
        data = {}
        for n in FED_MEMBERS:  # each node's own local text: it never leaves the node, only updates do
            data[n] = fed / f"{n}.txt"
            data[n].write_text(FED_TEXTS[n], encoding="utf-8")
        keys = {n: i.signing_key.public_key().public_bytes_raw() for n, i in idents.items()}
        grants = write_grants(fed / "grants.json", keys, {SHARED_ID: {"use": list(FED_MEMBERS)}})
        LocalAuthority(fed / "store", grants).publish(
            new_shared_cube(self.st["model"], SHARED_ID, owner="node-a")
        )
        if self.fast:
            engine, version, contributors = "in-process", *self._round_in_process(fed, grants, data)
        else:
            engine, version, contributors = "flower-deployment", *self._round_deployed(fed, grants, data)
        with CubeStore(fed / "store") as store:
            v1, v2 = store.get(SHARED_ID, "1.0.0"), store.get(SHARED_ID, version)
        # The network learns of both versions: A holds them and publishes them (the chain extends).
        with self.net.node("node-a") as na, self.net.registry("node-a") as ra:
            for cube in (v1, v2):
                na.put_cube(cube)
                ra.publish(sign_manifest(cube.manifest, idents["node-a"]), "node-a")
            answer = ra.lookup(SHARED_ID)
        catalog = [manifest_from_bytes(e.manifest.manifest).version for e in answer.versions]
        ok = version == "1.1.0" and contributors == list(FED_MEMBERS) and "1.1.0" in catalog
        how = (
            "in-process: the federation's strategy and client app without a SuperLink (--fast)"
            if self.fast
            else "Flower deployment engine: a SuperLink, A's and B's SuperNodes, TLS from the network CA"
        )
        return {
            "ok": ok,
            "engine": engine,
            "version": version,
            "contributors": contributors,
            "catalog": catalog,
            "say": f"round 1 with {', '.join(contributors)} ({how}) → {SHARED_ID}@{version}, chained to "
            f"1.0.0, published in the registry: versions {catalog}",
        }

    def _round_in_process(self, fed: Path, grants: Path, data: dict[str, Path]) -> tuple[str, list[str]]:
        """One round with the strategy and client app called directly (what the Flower apps run)."""
        from flwr.app import ConfigRecord, RecordDict

        from memfed.fed.authority import LocalAuthority
        from memfed.fed.client_app import hello_content, load_setup, train_round
        from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
        from memfed.fed.wire import CONFIG_KEY

        authority = LocalAuthority(fed / "store", grants)
        train = TrainSettings(rank=2, steps=FED_STEPS, lr=1e-2, batch_size=8)
        strategy = SharedCubeStrategy(authority, authority, SHARED_ID, train=train)
        challenge = os.urandom(32)
        query = RecordDict({CONFIG_KEY: ConfigRecord({"challenge": challenge})})
        setups = {}
        for i, n in enumerate(FED_MEMBERS, start=1):  # the admission handshake configure_train runs
            setups[i] = load_setup(str(self.net.identity_dir(n)), str(data[n]), str(self.model_dir), "")
            strategy.principals[i] = strategy.identify(hello_content(setups[i], query), challenge)
        contents = strategy.open_round(1, strategy.granted(list(setups)))
        strategy.collect(1, [(i, train_round(setups[i], contents[i])) for i in contents])
        report = strategy.reports[-1]
        return report.version, sorted(report.contributors)

    def _round_deployed(self, fed: Path, grants: Path, data: dict[str, Path]) -> tuple[str, list[str]]:
        """One round on Flower's deployment engine (memfed.fed.deploy): SuperLink + two SuperNodes."""
        from memfed.fed import deploy
        from memfed.fed.server_app import ServerSettings

        tls = deploy.make_tls(self.net.pki)  # the SuperLink's certificate from the network's CA
        procs: list[subprocess.Popen[bytes]] = []
        report = fed / "report.json"
        try:
            link, address = deploy.launch_superlink(fed / "link", tls)
            procs.append(link.proc)
            nodes = []
            for n in FED_MEMBERS:
                config = {"identity": str(self.net.identity_dir(n)), "data": str(data[n]),
                          "model": str(self.model_dir)}  # fmt: skip
                nodes.append(deploy.launch_supernode(address, tls.ca, config, fed / f"supernode-{n}"))
                procs += nodes[-1].procs
            settings = ServerSettings(
                cube_id=SHARED_ID, store=str(fed / "store"), grants=str(grants), rounds=1, rank=2,
                steps=FED_STEPS, lr=1e-2, batch_size=8, min_nodes=len(FED_MEMBERS),
                min_contributors=len(FED_MEMBERS), round_timeout=120.0, report=str(report),
            )  # fmt: skip
            link.wait()
            deploy.submit_run(
                deploy.write_app(fed / "app", settings.as_run_config()), address, tls.ca, fed / "link"
            )
            for node in nodes:
                node.wait()
            wait_until(report.exists, 180, "the federated round's report")
        finally:
            deploy.stop_all(procs)
        [done] = json.loads(report.read_text())
        return done["version"], sorted(done["contributors"])

    # -- time machine ---------------------------------------------------------------------------------

    def time_machine(self) -> dict[str, Any]:
        from memfed.client import Row
        from memfed.errors import MemfedError

        ref = self.st["cube"].ref
        with self.net.node("node-a") as na:
            na.deactivate()
            with contextlib.suppress(MemfedError):
                na.evict(ref, tier="device")
            archived = na.archive(ref, reason="demo: cold storage")
            refused = ""
            try:
                na.generate([Row(QUESTION, modules=(ref,), max_new_tokens=6)])
            except MemfedError as exc:
                refused = type(exc).__name__
            restored = na.restore(ref, reason="demo: time machine")
            [out] = na.generate([Row(QUESTION, modules=(ref,), max_new_tokens=6)])
        ok = bool(refused) and _starts(out.text, ANSWER)
        return {
            "ok": ok,
            "archived": f"{archived.from_state}→{archived.to_state}",
            "restored": f"{restored.from_state}→{restored.to_state}",
            "refused_while_archived": refused,
            "answer": out.text,
            "say": f"{ref} archived ({archived.from_state}→{archived.to_state}); generating with it is "
            f"refused ({refused}); restored ({restored.from_state}→{restored.to_state}) it answers "
            f"{out.text!r}",
        }

    # -- externalize -----------------------------------------------------------------------------------

    def externalize(self) -> dict[str, Any]:
        from memfed.node.conversion.externalize import externalize, recovery
        from memfed.node.plaintext import PlaintextMemory

        expected = [f.triple for f in self.st["doc"].facts()]
        with PlaintextMemory(self.work / "vault.db") as vault:
            out = externalize(self.st["model"], self.st["tokenizer"], self.st["cube"], vault=vault)
        rec = recovery(expected, out.claims)
        lines = out.text.strip().splitlines()
        example = (lines[1] if len(lines) > 1 else out.text)[:100]
        return {
            "ok": rec >= 0.8,
            "recovery": rec,
            "claims": len(out.claims),
            "doc_id": out.doc_id,
            "say": f"{len(out.claims)} claims written to the vault as {out.doc_id} (pending review); "
            f"{rec:.0%} of the source's facts recovered, e.g. {example!r}",
        }
