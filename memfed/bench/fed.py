"""``memfed bench fed``: exact LoRA aggregation vs FedIT, our round vs Flower's FedAvg, accuracy, 50 nodes.

- ``metrics.agg_error_exact`` / ``agg_error_fedit``: ‖ΔW_agg − Σ w_i ΔW_i‖ / ‖Σ w_i ΔW_i‖ for stacking and
  for FedIT (A and B averaged separately) on the same updates: real PEFT updates of ``nodes`` nodes, each
  trained on its own slice of the shipped documents on the tiny model, from one shared init (FedIT at its
  best). ``agg_error_svd`` is the SVD method's reported truncation error at the training rank.
- ``ratios.round_overhead_vs_flower_fedavg``: a whole round on Flower's simulation engine, ours against
  Flower's ``FedAvg`` interleaved round by round in one run (``whole_rounds``), median over rounds
  2..R of every run (round 1 loads the model in every worker, and ours also runs the admission
  handshake then); ``metrics.round_paired_ratio`` is the median of the per-round ratios, and
  ``round_{configure,wait,aggregate}_s`` split a round up:
  our ServerApp strategy (admission check, signed replies, validation, exact stacking, a cube published
  to the store) against Flower's own ``FedAvg`` strategy, with the same ClientApp training (the same
  ``train_update`` call, settings and data), the same update arrays on the wire, the same engine, nodes,
  workers and Grid. Round = from ``configure_train`` to the end of ``aggregate_train``.
- ``metrics.server_step_s`` vs ``baseline.server_step_fedavg_s``: only the server's step on 8 replies
  (validate + aggregate + build the next cube) against Flower's ``aggregate_arrayrecords`` (FedAvg's
  weighted mean) on the same ArrayRecords; medians. The baseline does less (no checks, no cube).
- ``metrics.update_bytes`` vs ``adapter_bytes``: what one node sends per round vs the adapter's size.
- ``metrics.acc_*``: recall of the union of all nodes' facts (the trained question and statement
  phrasings, greedy decoding) on the embedded default model after R rounds: exact (stack) vs FedIT vs
  each node alone (a federation of one; mean and best of the nodes); the nodes hold disjoint documents.
- ``metrics.sim_*``: one round of a ``sim_nodes``-node federation on Flower's simulation engine (Ray).

``MEMFED_BENCH_FED_ONLY=rounds`` (or ``python -m memfed.bench.fed rounds [--quick]``) runs only the
whole-round comparison, for iterating on the round's overhead; the other figures are then left out.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from memfed.bench.harness import BenchResult, median_seconds

ENGINE_TICK_S = 0.1  # flwr 1.42's simulation engine polls for pushed messages this often
ACC_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(*, quick: bool = False) -> BenchResult:
    if os.environ.get("MEMFED_BENCH_FED_ONLY", "") == "rounds":
        return run_rounds(quick=quick)
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from memfed.fed.aggregate import aggregate, aggregation_error, cube_factors
    from memfed.fed.authority import LocalAuthority
    from memfed.fed.client_app import load_setup, train_round
    from memfed.fed.simulate import prepare, simulate
    from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
    from memfed.fed.wire import NUM_EXAMPLES, UPDATE_KEY, record_to_factors
    from memfed.node.tiny_models import save_tiny_model_dir

    nodes, sim_nodes = (4, 10) if quick else (8, 50)
    train = TrainSettings(rank=4, steps=5, batch_size=8)
    with tempfile.TemporaryDirectory(prefix="memfed-bench-fed-") as tmp:
        root = Path(tmp)
        model = str(save_tiny_model_dir("llama", root / "model"))
        settings = prepare(root / "fed", nodes, model=model)
        authority = LocalAuthority(settings.store, settings.grants)
        strategy = SharedCubeStrategy(authority, authority, settings.cube_id, train=train)
        contents = strategy.open_round(1, list(range(1, nodes + 1)))
        replies = []
        for i in range(nodes):
            node = root / "fed" / "nodes" / str(i)
            setup = load_setup(str(node / "identity"), str(node / "data"), model, "")
            strategy.principals[i + 1] = setup.principal
            replies.append((i + 1, train_round(setup, contents[i + 1])))
        current = strategy.current
        updates = [record_to_factors(c.array_records[UPDATE_KEY]) for _, c in replies]
        counts = [int(c.metric_records["metrics"][NUM_EXAMPLES]) for _, c in replies]
        before = cube_factors(current)
        errors = {}
        for method in ("stack", "fedit", "svd"):
            agg = aggregate(current, updates, counts, method=method, rank=train.rank)
            errors[method] = aggregation_error(before, agg.factors, updates, agg.weights)

        unpublished = _NoPublish(authority)

        def ours() -> None:
            s = SharedCubeStrategy(authority, unpublished, settings.cube_id, train=train)
            s.principals, s.tickets, s.current = strategy.principals, strategy.tickets, current
            s.collect(1, replies)

        flower_inputs = [
            RecordDict({"arrays": c.array_records[UPDATE_KEY], "m": MetricRecord({"num-examples": n})})
            for (_, c), n in zip(replies, counts, strict=True)
        ]
        repeats = 5 if quick else 15
        ours_s = median_seconds(ours, repeats=repeats)
        fedavg_s = median_seconds(
            lambda: aggregate_arrayrecords(flower_inputs, "num-examples"), repeats=repeats
        )
        update_bytes = sum(len(a.data) for a in replies[0][1].array_records[UPDATE_KEY].values())
        adapter_bytes = sum(int(a.numel()) * 4 + int(b.numel()) * 4 for a, b in updates[0].values())

        round_train, round_nodes, round_count, round_repeats = _round_settings(quick)
        rounds = whole_rounds(
            root / "rounds", model, round_nodes, round_count, round_train, repeats=round_repeats
        )

        curves: dict[str, list[float]] = {}
        acc_rounds = 2 if quick else 5
        acc = accuracy(root / "acc", rounds=acc_rounds, steps=30 if quick else 40, quick=quick, curves=curves)

        sim_settings = prepare(root / "sim", sim_nodes, model=model)
        sim_settings = replace(sim_settings, rounds=1, rank=2, steps=2, batch_size=8)
        sim = simulate(root / "sim", sim_settings, sim_nodes, model=model)
    sim_round = sim["rounds"][0]["seconds"] if sim["rounds"] else float("nan")
    ours_round, fedavg_round = rounds["ours_round_s"], rounds["fedavg_round_s"]
    return BenchResult(
        metrics={
            "agg_error_exact": errors["stack"],
            "agg_error_fedit": errors["fedit"],
            "agg_error_svd": errors["svd"],
            "round_s": ours_round,
            "round_first_s": rounds["ours_first_round_s"],
            "round_configure_s": rounds["ours_configure_s"],
            "round_wait_s": rounds["ours_wait_s"],
            "round_aggregate_s": rounds["ours_aggregate_s"],
            "rounds_measured": rounds["ours_rounds_measured"],
            "round_paired_ratio": rounds["paired_ratio"],
            "server_step_s": ours_s,
            "update_bytes": float(update_bytes),
            "adapter_bytes": float(adapter_bytes),
            **acc,
            "sim_nodes": float(sim_nodes),
            "sim_total_s": sim["seconds"],
            "sim_server_aggregate_s": sim_round,
            "sim_contributors": float(len(sim["rounds"][0]["contributors"]) if sim["rounds"] else 0),
        },
        baseline={
            "name": "Flower FedAvg strategy (flwr 1.42 Message API), simulation engine",
            "round": _round_baseline(round_train, round_nodes, round_count, round_repeats),
            "round_s": fedavg_round,
            "round_first_s": rounds["fedavg_first_round_s"],
            "round_configure_s": rounds["fedavg_configure_s"],
            "round_wait_s": rounds["fedavg_wait_s"],
            "round_aggregate_s": rounds["fedavg_aggregate_s"],
            "server_step": f"aggregate_arrayrecords on the same {nodes} ArrayRecords, by num-examples",
            "server_step_fedavg_s": fedavg_s,
            "fedit": "A and B averaged separately, shared init (same seed on every node)",
            "accuracy": "each node alone: the same training on its own documents only, R rounds",
            "nodes": nodes,
            "cpus": os.cpu_count(),
        },
        ratios={
            "round_overhead_vs_flower_fedavg": ours_round / fedavg_round
            if fedavg_round > 0
            else float("nan"),
            "server_step_vs_flower_fedavg": ours_s / fedavg_s if fedavg_s > 0 else float("nan"),
            "update_bytes_vs_adapter_bytes": update_bytes / adapter_bytes,
            "acc_exact_vs_fedit": _ratio(acc["acc_exact"], acc["acc_fedit"]),
            "acc_exact_vs_node_alone_mean": _ratio(acc["acc_exact"], acc["acc_alone_mean"]),
        },
        series={"accuracy": {"round": list(range(1, acc_rounds + 1)), **curves}},
    )


def _round_settings(quick: bool) -> tuple[Any, int, int, int]:
    """(train settings, nodes, rounds, runs) of the whole-round comparison."""
    from memfed.fed.strategy import TrainSettings

    nodes, rounds, runs = (3, 4, 1) if quick else (4, 24, 2)
    return TrainSettings(rank=4, steps=5, batch_size=8), nodes, rounds, runs


def _round_baseline(train: Any, nodes: int, rounds: int, runs: int) -> str:
    from memfed.fed.grid import PollingGrid

    return (
        f"FedAvg(fraction_train=1, fraction_evaluate=0) on {nodes} virtual nodes, interleaved round by "
        f"round with ours in {runs} simulation runs of {rounds} rounds each (order swapped every round), "
        f"median of rounds 2..{rounds} of every run; the same ClientApp training (train_update, rank "
        f"{train.rank}, {train.steps} steps, batch {train.batch_size}) on the same workers, returning the "
        f"same rank-r factor arrays, the same Grid (polls every {PollingGrid.POLL_FRACTION:.0%} of the wait, "
        f"{PollingGrid.MIN_POLL_S:g}-{PollingGrid.DEFAULT_POLL_S:g} s), 1 CPU a "
        "worker; ours publishes inside its round"
    )


def run_rounds(*, quick: bool = False, runs: int | None = None) -> BenchResult:
    """Only the whole-round comparison (ours vs Flower's FedAvg on the simulation engine)."""
    from memfed.node.tiny_models import save_tiny_model_dir

    train, nodes, count, default_runs = _round_settings(quick)
    runs = runs or default_runs
    with tempfile.TemporaryDirectory(prefix="memfed-bench-fed-") as tmp:
        model = str(save_tiny_model_dir("llama", Path(tmp) / "model"))
        r = whole_rounds(Path(tmp) / "rounds", model, nodes, count, train, repeats=runs)
    parts = {"round": "round", "round_first": "first_round", "round_configure": "configure"}
    parts |= {"round_wait": "wait", "round_aggregate": "aggregate"}
    return BenchResult(
        metrics={
            **{f"{k}_s": r[f"ours_{p}_s"] for k, p in parts.items()},
            "rounds_measured": r["ours_rounds_measured"],
            "round_paired_ratio": r["paired_ratio"],
        },
        baseline={
            "name": "Flower FedAvg strategy (flwr 1.42 Message API), simulation engine",
            "round": _round_baseline(train, nodes, count, runs),
            **{f"{k}_s": r[f"fedavg_{p}_s"] for k, p in parts.items()},
            "cpus": os.cpu_count(),
            "loadavg": list(os.getloadavg()),
        },
        ratios={"round_overhead_vs_flower_fedavg": _ratio(r["ours_round_s"], r["fedavg_round_s"])},
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


class _NoPublish:
    """Publishing is the store's cost, measured by ``memfed bench store``; here only the round's math."""

    def __init__(self, authority: Any) -> None:
        self._a = authority

    def current(self, cube_id: str) -> Any:
        return self._a.current(cube_id)

    def publish(self, cube: Any) -> None:
        return None


# -- whole rounds: ours vs Flower's FedAvg on the simulation engine -----------------------------------


def _fedavg_train(setup: Any, content: Any) -> Any:
    """FedAvg's node side: the same local training as ours (``train_update`` on top of the received
    factors, the round's settings), replying with the factors under the received keys, unsigned."""
    from flwr.app import MetricRecord, RecordDict

    from memfed.fed.client_app import lora_config
    from memfed.fed.local import train_update
    from memfed.fed.wire import factors_to_record, record_to_factors

    shared = record_to_factors(content.array_records["arrays"])
    cfg = content.config_records["config"]
    update = train_update(
        setup.model, setup.tokenizer, setup.items, shared, lora_config(cfg, sorted(shared)),
        fan_in_fan_out=setup.fan_in_fan_out,
    )  # fmt: skip
    return RecordDict(
        {
            "arrays": factors_to_record(update.factors),
            "metrics": MetricRecord({"num-examples": update.num_examples}),
        }
    )


def _paired_client_app(nodes_root: str, model: str) -> Any:
    """One ClientApp for both arms: our admission query, and TRAIN messages answered by our node side
    (content under ``global``: signed update) or by FedAvg's (content under ``arrays``), on the same
    worker with the same loaded model."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from memfed.fed.client_app import hello_reply, load_setup, node_paths, train_reply
    from memfed.fed.wire import GLOBAL_KEY

    app = ClientApp()

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        return hello_reply(msg, context, nodes_root, model)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if GLOBAL_KEY in msg.content.array_records:
            return train_reply(msg, context, nodes_root, model)
        setup = load_setup(*node_paths(context, nodes_root, model))
        return Message(_fedavg_train(setup, msg.content), reply_to=msg)

    return app


def whole_rounds(
    root: Path, model: str, nodes: int, rounds: int, train: Any, *, repeats: int = 1
) -> dict[str, float]:
    """Round times of our strategy and of Flower's FedAvg, interleaved on one simulation engine run.

    Each of ``repeats`` runs is one simulation whose ServerApp drives both strategies round by round
    over the same Grid and the same warm workers, the loop of Flower's ``Strategy.start``
    (``configure_train`` → ``send_and_receive`` → ``aggregate_train``; evaluation is off for both):
    round r of one, then round r of the other, the order swapped every round. Interleaving is what
    keeps the ratio steady on a shared machine: a burst of load hits both arms alike (run one after
    the other, the ratio moved 0.92-1.30 between runs of unchanged code). The first pair is left out
    (workers load the model then, and ours runs its admission handshake). Ours publishes each round's
    cube inside its round (``start`` would overlap it with the next round; here it would overlap
    FedAvg's). Medians pool the rounds of all runs; ``paired_ratio`` is the median of per-round ratios.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from memfed.fed.simulate import prepare

    done: dict[str, list[list[float]]] = {"ours": [], "fedavg": []}
    firsts: dict[str, list[float]] = {"ours": [], "fedavg": []}
    pairs: list[float] = []
    for k in range(repeats):
        settings = prepare(root / f"run-{k}", nodes, model=model)
        settings = replace(
            settings, rounds=rounds, rank=train.rank, steps=train.steps, batch_size=train.batch_size,
            lr=train.lr,
        )  # fmt: skip
        marks: dict[str, dict[int, list[float]]] = {"ours": {}, "fedavg": {}}
        run_simulation(
            server_app=_paired_server(settings, nodes, rounds, train, marks),
            client_app=_paired_client_app(str(root / f"run-{k}" / "nodes"), model),
            num_supernodes=nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        for name, by_round in marks.items():
            firsts[name] += [m[3] - m[0] for r, m in by_round.items() if r == 1]
            done[name] += [m for r, m in sorted(by_round.items()) if r > 1]
        pairs += [
            (marks["ours"][r][3] - marks["ours"][r][0]) / (marks["fedavg"][r][3] - marks["fedavg"][r][0])
            for r in marks["ours"]
            if r > 1 and r in marks["fedavg"]
        ]
    out: dict[str, float] = {"paired_ratio": statistics.median(pairs) if pairs else float("nan")}
    for name, spans in done.items():
        out[f"{name}_round_s"] = statistics.median(m[3] - m[0] for m in spans) if spans else float("nan")
        out[f"{name}_first_round_s"] = statistics.median(firsts[name]) if firsts[name] else float("nan")
        out[f"{name}_rounds_measured"] = float(len(spans))
        # Where a round goes: the server's configure step, the wait for the nodes (training and the
        # engine's transport), the server's aggregate step (ours: validate, aggregate, publish).
        for part, (i, j) in (("configure", (0, 1)), ("wait", (1, 2)), ("aggregate", (2, 3))):
            out[f"{name}_{part}_s"] = statistics.median(m[j] - m[i] for m in spans) if spans else float("nan")
    return out


def _paired_server(
    settings: Any, nodes: int, rounds: int, train: Any, marks: dict[str, dict[int, list[float]]]
) -> Any:
    """The ServerApp of one interleaved run: per round, each arm's (configure start, configure end,
    replies in, aggregate end) into ``marks[arm][round]``."""
    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from memfed.fed.aggregate import cube_factors
    from memfed.fed.grid import PollingGrid
    from memfed.fed.server_app import build_strategy
    from memfed.fed.wire import factors_to_record

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        grid = PollingGrid(grid)
        ours = build_strategy(settings)
        fedavg = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes
        )
        fedavg_config = ConfigRecord(
            {"rank": train.rank, "steps": train.steps, "lr": train.lr, "batch-size": train.batch_size}
        )
        arms: dict[str, list[Any]] = {
            "ours": [ours, factors_to_record(cube_factors(ours.current)), ConfigRecord()],
            "fedavg": [fedavg, _zero_update_arrays(settings, train.rank), fedavg_config],
        }
        dither = random.Random(rounds)
        for r in range(1, rounds + 1):
            for name in ("ours", "fedavg") if r % 2 else ("fedavg", "ours"):
                strategy, arrays, config = arms[name]
                # Flower's simulation engine picks pushed messages up on a 0.1 s tick
                # (vce_api.add_messages_to_queue), so a round includes 0-0.1 s of dispatch delay set by
                # where its push falls in that tick, i.e. by how long the rounds before it took: the arm
                # after the slower one kept drawing the same phase. An untimed random pause makes the
                # phase independent of the arms, so both see the same delay distribution.
                time.sleep(dither.uniform(0.0, ENGINE_TICK_S))
                t0 = time.perf_counter()
                messages = list(strategy.configure_train(r, arrays, config, grid))
                t1 = time.perf_counter()
                replies = list(grid.send_and_receive(messages, timeout=600.0))
                t2 = time.perf_counter()
                aggregated, _metrics = strategy.aggregate_train(r, replies)
                marks[name][r] = [t0, t1, t2, time.perf_counter()]
                if aggregated is not None:
                    arms[name][1] = aggregated

    return server


def _zero_update_arrays(settings: Any, rank: int) -> Any:
    """Zero factors of the update's shapes (rank ``rank`` on the shared cube's modules): FedAvg's model."""
    import torch

    from memfed.fed.authority import LocalAuthority
    from memfed.fed.wire import factors_to_record

    cube = LocalAuthority(settings.store, settings.grants).current(settings.cube_id)
    factors = {}
    for t in cube.manifest.payload.lora.targets:
        shapes = {i.name: tuple(i.shape) for i in cube.manifest.payload.tensors}
        in_dim = shapes[f"{t.module}.lora_A.weight"][1]
        out_dim = shapes[f"{t.module}.lora_B.weight"][0]
        factors[t.module] = (torch.zeros(rank, in_dim), torch.zeros(out_dim, rank))
    return factors_to_record(factors)


# -- accuracy on the union of the nodes' facts ---------------------------------------------------------


def accuracy(
    root: Path, *, rounds: int, steps: int, quick: bool, curves: dict[str, list[float]] | None = None
) -> dict[str, float]:
    """Recall of every node's facts after ``rounds`` rounds: exact vs FedIT vs each node alone.

    With ``curves``, the exact and FedIT recall after every round is appended under "exact"/"fedit" (the
    report's per-round plot): one extra recall pass per earlier round, so only the bench asks for it."""
    from memfed.crypto.identity import init_identity
    from memfed.fed.authority import LocalAuthority, write_grants
    from memfed.fed.client_app import load_setup, train_round
    from memfed.fed.shared import new_shared_cube
    from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
    from memfed.node.conversion.augment import all_facts, trained_probes
    from memfed.node.conversion.documents import Document
    from memfed.node.conversion.probing import module_loaded, rate, recall
    from memfed.node.models import default_model_dir, load_host_model

    model_dir = str(default_model_dir())
    docs_dir = Path(__file__).resolve().parents[2] / "node" / "data" / "documents"
    files = sorted(docs_dir.glob("*.md"))
    node_count = 4
    groups = [files[i::node_count] for i in range(node_count)]
    keys, setups = {}, {}
    for i, group in enumerate(groups):
        node = root / f"node-{i}"
        (node / "data").mkdir(parents=True, exist_ok=True)
        for f in group:
            (node / "data" / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
        ident = init_identity(node / "identity", name=f"node-{i}")
        keys[f"node-{i}"] = ident.signing_key.public_key().public_bytes_raw()
        setups[i + 1] = load_setup(str(node / "identity"), str(node / "data"), model_dir, "")
    grants = write_grants(root / "grants.json", keys, {"shared_facts": {"use": sorted(keys)}})
    lm, tok = load_host_model(model_dir, device="cpu")
    docs = [Document(f.stem, f.stem, f.read_text(encoding="utf-8")) for f in files]
    probes = trained_probes(all_facts(docs))
    train = TrainSettings(rank=8, steps=steps, lr=5e-3, batch_size=16)

    def federate(tag: str, method: str, members: list[int], curve: list[float] | None = None) -> float:
        authority = LocalAuthority(root / f"store-{tag}", grants)
        authority.publish(new_shared_cube(lm, "shared_facts", ACC_MODULES))
        strategy = SharedCubeStrategy(authority, authority, "shared_facts", method=method, train=train)
        for n in members:
            strategy.principals[n] = setups[n].principal
        for r in range(1, rounds + 1):
            contents = strategy.open_round(r, members)
            strategy.collect(r, [(n, train_round(setups[n], contents[n])) for n in members])
            if curve is not None and r < rounds:
                with module_loaded(lm, strategy.current) as (rt, ref):
                    curve.append(rate(recall(rt, tok, probes, [ref])))
        with module_loaded(lm, strategy.current) as (rt, ref):
            final = rate(recall(rt, tok, probes, [ref]))
        if curve is not None:
            curve.append(final)
        return final

    members = list(setups)
    t0 = time.perf_counter()
    exact = federate("exact", "stack", members, None if curves is None else curves.setdefault("exact", []))
    fedit = federate("fedit", "fedit", members, None if curves is None else curves.setdefault("fedit", []))
    alone = [federate(f"alone-{n}", "stack", [n]) for n in (members[:1] if quick else members)]
    from memfed.node.runtime import ModuleRuntime

    rt = ModuleRuntime(lm)
    try:
        base = rate(recall(rt, tok, probes))
    finally:
        rt.close()
    return {
        "acc_exact": exact,
        "acc_fedit": fedit,
        "acc_alone_mean": statistics.fmean(alone),
        "acc_alone_best": max(alone),
        "acc_base_model": base,
        "acc_probes": float(len(probes)),
        "acc_nodes": float(node_count),
        "acc_rounds": float(rounds),
        "acc_steps_per_round": float(steps),
        "acc_seconds": time.perf_counter() - t0,
    }


if __name__ == "__main__":  # python -m memfed.bench.fed rounds [--quick] [--runs N]
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m memfed.bench.fed")
    parser.add_argument("part", choices=["rounds"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=0)
    args = parser.parse_args()
    res = run_rounds(quick=args.quick, runs=args.runs or None)
    print(json.dumps({"metrics": res.metrics, "baseline": res.baseline, "ratios": res.ratios}, indent=1))
