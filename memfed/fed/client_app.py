"""The node's Flower ClientApp: prove who it is, train the shared cube on local data, send only the update.

Which node it is comes from the SuperNode's ``--node-config`` (``memfed fed join`` sets it):

- ``identity``: the node's identity folder (``memfed identity init``); its Ed25519 key signs every reply;
- ``data``: the local data (a plaintext memory ``.db``, a folder of ``.md``/``.txt`` files, or one file);
- ``model``: the base model folder (default: the embedded model); ``principal``: the name the registry
  knows (default: the identity's name).

On the simulation engine each virtual node gets ``partition-id`` instead, and finds its identity and data
under ``<sim-root>/<partition-id>/`` (``sim-root`` in the run config; ``memfed fed simulate`` lays it out).
What leaves the node: the update's factors (ArrayRecord), its sample count and train loss (MetricRecord),
and the signed proof (ConfigRecord). Never the data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from memfed.errors import InvalidArgumentError
from memfed.fed.privacy import DpSettings, privatize
from memfed.fed.wire import (
    CONFIG_KEY,
    GLOBAL_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROOF_KEY,
    UPDATE_KEY,
    RoundTicket,
    factors_to_record,
    hello_statement,
    record_to_factors,
    sign_proof,
    tensors_digest,
)


@dataclass
class NodeSetup:
    """Everything a node loads once per process: identity, model, its fingerprint, training items."""

    principal: str
    key: Any  # Ed25519PrivateKey
    model: Any
    tokenizer: Any
    fingerprint: bytes
    items: list
    fan_in_fan_out: bool


def node_paths(context: Context, sim_root: str = "", model: str = "") -> tuple[str, str, str, str]:
    """(identity dir, data path, model dir or "", principal or "") from the node and run config."""
    nc, rc = context.node_config, dict(context.run_config)
    if sim_root:
        rc.setdefault("sim-root", sim_root)
        rc.setdefault("model", model)
    if "identity" in nc:
        get = nc.get
        return str(nc["identity"]), str(get("data", "")), str(get("model", "")), str(get("principal", ""))
    if "partition-id" in nc and "sim-root" in rc:
        root = Path(str(rc["sim-root"])) / str(nc["partition-id"])
        return str(root / "identity"), str(root / "data"), str(rc.get("model", "")), ""
    raise InvalidArgumentError(
        "this SuperNode has no memfed node config",
        hint="start it with `memfed fed join` (it passes --node-config identity=... data=...)",
    )


@dataclass
class Signer:
    """A node's name and signing key: all the admission handshake needs."""

    principal: str
    key: Any  # Ed25519PrivateKey


@functools.cache
def load_signer(identity: str, principal: str) -> Signer:
    """The node's identity (cached: a process may answer many queries)."""
    from memfed.crypto.identity import load_identity

    ident = load_identity(Path(identity))
    return Signer(principal or ident.public.name, ident.signing_key)


@functools.cache
def load_setup(identity: str, data: str, model: str, principal: str) -> NodeSetup:
    """Load once per process: a SuperNode runs many rounds, and loading the model dominates a round."""
    from memfed.crypto.identity import load_identity
    from memfed.cube.fingerprint import fingerprint_model
    from memfed.fed.local import training_items
    from memfed.node.models import load_host_model

    ident = load_identity(Path(identity))
    lm, tokenizer = load_host_model(model or None, device="cpu")
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in lm.modules())
    fp = fingerprint_model(lm).SerializeToString()
    name = principal or ident.public.name
    return NodeSetup(name, ident.signing_key, lm, tokenizer, fp, training_items(data), fan_in_fan_out)


def hello_reply(msg: Message, context: Context, sim_root: str = "", model: str = "") -> Message:
    """Answer the server's admission challenge with the node's principal and signature.

    Loads only the identity: a node not admitted never pays for loading the model, and on the
    deployment engine every message runs in a fresh ClientApp process.
    """
    identity, _data, _model, principal = node_paths(context, sim_root, model)
    return Message(hello_content(load_signer(identity, principal), msg.content), reply_to=msg)


def train_reply(msg: Message, context: Context, sim_root: str = "", model: str = "") -> Message:
    """Train a fresh LoRA on local data on top of the shared cube; reply with the signed update."""
    setup = load_setup(*node_paths(context, sim_root, model))
    return Message(train_round(setup, msg.content, node_dp(context)), reply_to=msg)


def make_client_app(sim_root: str = "", model: str = "") -> ClientApp:
    """The ClientApp; ``sim_root``/``model`` for the simulation engine, which has no node config."""
    client = ClientApp()

    @client.query()
    def hello(msg: Message, context: Context) -> Message:
        return hello_reply(msg, context, sim_root, model)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, sim_root, model)

    return client


app = make_client_app()


def hello_content(setup: NodeSetup | Signer, content: RecordDict) -> RecordDict:
    challenge = content.config_records[CONFIG_KEY]["challenge"]
    if not isinstance(challenge, bytes):
        raise InvalidArgumentError("the admission query carries no challenge")
    proof = sign_proof(setup.key, setup.principal, hello_statement(setup.principal, challenge))
    return RecordDict({PROOF_KEY: proof})


def node_dp(context: Context) -> DpSettings:
    """The node's own DP floor from its node config (``dp-clip``, ``dp-noise``; ``memfed fed join``)."""
    nc = context.node_config
    return DpSettings(float(nc.get("dp-clip", 0.0) or 0.0), float(nc.get("dp-noise", 0.0) or 0.0))


def train_round(setup: NodeSetup, content: RecordDict, node_floor: DpSettings | None = None) -> RecordDict:
    """One node's round, from the server's TRAIN content to the signed reply content.

    With DP asked for (by the server's round config or the node's own floor, the stricter wins) the
    update is clipped and noised here, before it is signed (``memfed.fed.privacy``).
    """
    from memfed.fed.local import train_update

    cfg = content.config_records[CONFIG_KEY]
    _check_model(cfg, setup)
    shared = record_to_factors(content.array_records[GLOBAL_KEY])
    update = train_update(
        setup.model,
        setup.tokenizer,
        setup.items,
        shared,
        lora_config(cfg, sorted(shared)),
        fan_in_fan_out=setup.fan_in_fan_out,
    )
    server_dp = DpSettings(float(cfg.get("dp-clip", 0.0)), float(cfg.get("dp-noise", 0.0)))  # type: ignore[arg-type]
    dp = server_dp.stricter(node_floor or DpSettings())
    factors, norm = privatize(update.factors, dp)
    extra = {"dp-clip": dp.clip, "dp-noise-std": dp.std, "update-norm": norm}
    return signed_reply(setup, cfg, factors, update.num_examples, update.loss, extra)


def lora_config(cfg: ConfigRecord, modules: list[str]) -> Any:
    """The round's training settings (rank, steps, lr, batch-size, seed) as a ``LoraTrainConfig``.

    Sets torch to one thread: many nodes may share one machine (simulation, CI), and oversubscribed
    threads make every one of them slower.
    """
    import torch

    from memfed.node.conversion.train import LoraTrainConfig

    rank = int(cfg["rank"])  # type: ignore[arg-type]
    torch.set_num_threads(1)
    return LoraTrainConfig(
        rank=rank,
        alpha=float(rank),
        target_modules=tuple(modules),
        steps=int(cfg["steps"]),  # type: ignore[arg-type]
        lr=float(cfg["lr"]),  # type: ignore[arg-type]
        batch_size=int(cfg["batch-size"]),  # type: ignore[arg-type]
        replay_batch=0,
        warmup_steps=1,
        seed=int(cfg.get("seed", cfg.get("server-round", 0))),  # type: ignore[arg-type]
    )


def signed_reply(
    setup: NodeSetup,
    cfg: ConfigRecord,
    factors: Any,
    num_examples: int,
    loss: float,
    extra: dict[str, float] | None = None,
) -> RecordDict:
    """The reply content: update, metrics and a proof binding them to this round's ticket."""
    ticket = RoundTicket(
        str(cfg["cube-id"]),
        str(cfg["base-digest"]),
        int(cfg["server-round"]),
        bytes(cfg["nonce"]),  # type: ignore[arg-type]
    )
    record = factors_to_record(factors)
    proof = sign_proof(setup.key, setup.principal, ticket.statement(setup.principal, tensors_digest(record)))
    proof["round"] = ticket.server_round
    proof["nonce"] = ticket.nonce
    proof["base-digest"] = ticket.base_digest
    proof["base-model"] = setup.fingerprint
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, "train-loss": float(loss), **(extra or {})})
    return RecordDict({UPDATE_KEY: record, METRICS_KEY: metrics, PROOF_KEY: proof})


def _check_model(cfg: ConfigRecord, setup: NodeSetup) -> None:
    """Refuse to train a cube made for another base model: the node's weights would not fit its deltas."""
    from memfed.cube.fingerprint import describe, mismatch_reasons
    from memfed.errors import IncompatibleModelError
    from memfed.mip.v1 import cube_pb2

    expected, mine = cube_pb2.BaseModelFingerprint(), cube_pb2.BaseModelFingerprint()
    expected.ParseFromString(bytes(cfg["base-model"]))  # type: ignore[arg-type]
    mine.ParseFromString(setup.fingerprint)
    reasons = mismatch_reasons(expected, mine)
    if reasons:
        raise IncompatibleModelError(
            f"shared cube {cfg['cube-id']} is for {describe(expected)}, this node hosts {describe(mine)}"
        )
