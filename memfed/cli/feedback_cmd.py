"""``memfed feedback`` and ``memfed evolve``: rate a module's answers, and let the module improve from them.

Feedback goes to a running node (``--node``; the node needs the caller to hold the ``feedback`` grant on
the cube) or straight into a local store's feedback log (``--store``, for a node that is not running).
``memfed evolve`` runs one evolve step on a local store: train a candidate from the feedback, validate it,
publish it as the next version or discard it (the reason is recorded); ``--history`` lists every decision.
"""

from __future__ import annotations

import base64
import getpass
from pathlib import Path
from typing import Any

import click

from memfed.cli.node_cmd import node_options, open_client
from memfed.cli.options import json_option, model_option, resolve_store, store_option
from memfed.cli.output import console, emit_json
from memfed.errors import InvalidArgumentError

EXAMPLES = """
\b
Examples:
  memfed feedback notes --prompt "The capital of Veltria is" --answer "Quorn" --bad --correction "Dralmouth"
  TOKEN=$(memfed registry token notes feedback --registry REG:7700 --tls pki/me)
  memfed feedback notes --prompt "..." --answer "..." --good --node node-a:7711 --token "$TOKEN"
  memfed feedback notes --prompt "..." --answer "..." --good --store ./store --principal user:alice
  memfed evolve notes --store ./store         # one evolve step on a local store
  memfed evolve notes --store ./store --history
"""


def _token(text: str | None) -> Any:
    """A capability token as `memfed registry token` prints it (base64), or None."""
    if not text:
        return None
    from memfed.mip.v1 import node_service_pb2 as pb

    try:
        return pb.CapabilityToken.FromString(base64.b64decode(text.strip(), validate=True))
    except ValueError as exc:
        raise InvalidArgumentError(
            "--token is not a capability token", hint="pass what `memfed registry token CUBE feedback` prints"
        ) from exc


@click.command(epilog=EXAMPLES)
@click.argument("cube")
@click.option("--prompt", required=True, help="What the module was asked.")
@click.option("--answer", required=True, help="What it answered.")
@click.option("--good/--bad", "good", required=True, help="Was the answer right?")
@click.option("--correction", default=None, help="With --bad: the answer it should have given.")
@click.option(
    "--principal",
    default=None,
    help="Who rates (with --store: default user:$USER; with --node: relayed for a user, operators only).",
)
@click.option("--token", default=None, help="Capability token for `feedback` on CUBE (base64).")
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Record into this local store's feedback log instead of sending it to a node.",
)
@node_options
@json_option
def feedback(
    cube: str,
    prompt: str,
    answer: str,
    good: bool,
    correction: str | None,
    principal: str | None,
    token: str | None,
    store_dir: Path | None,
    node_conn: dict[str, Any],
    as_json: bool,
) -> None:
    """Rate one answer module CUBE gave (CUBE is NAME or NAME@VERSION).

    Ratings accumulate per module. Once enough arrive from enough different people, the node trains a
    candidate next version on them and publishes it only if it answers the held-out ratings better and
    loses no more than a point on the module's own validation set; a version that then does worse in use
    is rolled back. Rate limits per person and a minimum number of people behind a change keep a few
    bad actors from steering a module.
    """
    cube_id, _, version = cube.partition("@")
    if store_dir is not None:
        from memfed.node.evolve.feedback import FEEDBACK_DB, FeedbackItem, FeedbackLog
        from memfed.node.store import CubeStore

        with CubeStore(store_dir) as store, FeedbackLog(store.root / FEEDBACK_DB, store=store) as log:
            who = principal or f"user:{getpass.getuser()}"
            item = FeedbackItem(cube_id, who, prompt, answer, good, correction, version or None)
            fid = log.add(item)
            pending = len(log.pending(cube_id))
            current = version or store.current_version(cube_id) or ""
        reason = "recorded in the local store; `memfed evolve` acts on it"
        result = {"module": f"{cube_id}@{current}", "feedback_id": fid, "pending": pending,
                  "decision": "recorded", "reason": reason}  # fmt: skip
    else:
        with open_client(node_conn) as client:
            r = client.feedback(
                cube, prompt=prompt, answer=answer, good=good, correction=correction or "",
                on_behalf_of=principal or "", capability=_token(token),
            )  # fmt: skip
        result = {"module": r.module, "feedback_id": r.feedback_id, "pending": r.pending,
                  "decision": r.decision, "reason": r.reason}  # fmt: skip
    if as_json:
        emit_json(result)
        return
    console.print(
        f"feedback #{result['feedback_id']} on [bold]{result['module']}[/]: {result['pending']} pending; "
        f"{result['decision']} ({result['reason']})"
    )


@click.command(epilog=EXAMPLES)
@click.argument("cube_id")
@store_option
@model_option
@click.option(
    "--plaintext",
    "plaintext_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The node's plaintext memory: where an internalized module's source documents (its validation "
    "set) are read from.",
)
@click.option("--history", is_flag=True, help="List every recorded decision instead of taking a step.")
@json_option
def evolve(
    cube_id: str,
    store_dir: Path | None,
    model_dir: Path | None,
    plaintext_path: Path | None,
    history: bool,
    as_json: bool,
) -> None:
    """Take one evolve step for module CUBE_ID in a local store, or list its decisions (--history).

    A step does what is due: roll back a promoted version that does worse in use than the one before;
    else, with enough new feedback from enough people, train a candidate from the current version,
    validate it and publish it as the next version, or discard it with the reason recorded.
    Exit code 0 whatever was decided; the decision says what happened.
    """
    from memfed.node.evolve.feedback import FEEDBACK_DB, FeedbackLog
    from memfed.node.store import CubeStore

    with (
        CubeStore(resolve_store(store_dir)) as store,
        FeedbackLog(store.root / FEEDBACK_DB, store=store) as log,
    ):
        if history:
            decisions = log.decisions(cube_id)
        else:
            from memfed.cli.output import progress_bar
            from memfed.node.evolve.evolver import Evolver
            from memfed.node.models import load_host_model, resolve_model_dir

            model, tokenizer = load_host_model(resolve_model_dir(model_dir))
            vault = None
            if plaintext_path is not None:
                from memfed.node.plaintext import PlaintextMemory

                vault = PlaintextMemory(plaintext_path)
            try:
                with progress_bar(f"evolving {cube_id}", quiet=as_json):
                    decisions = [Evolver(model, tokenizer, store, log, vault=vault).step(cube_id)]
            finally:
                if vault is not None:
                    vault.close()
    rows = [
        {"id": d.id, "action": d.action, "reason": d.reason, "from_version": d.from_version,
         "to_version": d.to_version, "figures": d.figures, "at": d.at}
        for d in decisions
    ]  # fmt: skip
    if as_json:
        emit_json({"cube_id": cube_id, "decisions": rows})
        return
    if not rows:
        console.print(f"no decisions recorded for {cube_id}")
    for r in rows:
        target = f" -> {r['to_version']}" if r["to_version"] else ""
        console.print(f"[bold]{r['action']}[/] {cube_id}@{r['from_version']}{target}: {r['reason']}")
