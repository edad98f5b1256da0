"""``memfed generate``: generate text on a node, with explicit, per-node active or routed modules."""

from __future__ import annotations

from typing import Any

import click

from memfed.cli.node_cmd import node_options, open_client
from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json


@click.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@click.option(
    "--module",
    "-m",
    "modules",
    multiple=True,
    metavar="REF",
    help="Run this module (NAME or NAME@VERSION) for every prompt; repeat to stack modules.",
)
@click.option(
    "--base-only", is_flag=True, help="Run the bare base model, even if the node has active modules."
)
@click.option(
    "--task", default="", help="Let the node route by task (the module bound to it, else plaintext)."
)
@click.option(
    "--conversation",
    "conversation_id",
    default="",
    help="Continue this conversation: its cached prefix (activation memory) is reused.",
)
@click.option("--max-new-tokens", "-n", type=click.IntRange(1, 256), default=32, show_default=True)
@node_options
@json_option
def generate(
    prompts: tuple[str, ...],
    modules: tuple[str, ...],
    base_only: bool,
    task: str,
    conversation_id: str,
    max_new_tokens: int,
    node_conn: dict[str, Any],
    as_json: bool,
) -> None:
    """Generate a continuation of each PROMPT on a node (greedy), all prompts in one batch.

    \b
    Which memory serves a prompt:
      --module REF     that module (explicit; repeat to stack several)
      (nothing)        the node's active modules (memfed module activate), or the bare model
      --task NAME      the node's routing: the module bound to the task, else plaintext retrieval
      --base-only      the bare base model
    Example: memfed generate "The capital of Zorbia is" --module geo_facts --node 10.0.0.5:7711

    --json prints {"results": [{"prompt", "text", "memory_used", "new_tokens"}], "batch_rows"}, where
    memory_used names what served each row (param:<cube>, kv:<conversation>, text:<doc>).
    """
    from memfed.client import Row

    rows = [
        Row(
            p,
            modules=modules,
            max_new_tokens=max_new_tokens,
            conversation_id=conversation_id,
            task=task,
            base_only=base_only,
        )
        for p in prompts
    ]
    with open_client(node_conn) as client:
        results = client.generate(rows)
    if as_json:
        emit_json(
            {
                "results": [
                    {
                        "prompt": p,
                        "text": r.text,
                        "memory_used": list(r.memory_used),
                        "new_tokens": r.new_tokens,
                    }
                    for p, r in zip(prompts, results, strict=True)
                ],
                "batch_rows": results[0].batch_rows if results else 0,
            }
        )
        return
    for p, r in zip(prompts, results, strict=True):
        served = ", ".join(r.memory_used) or "base model"
        console.print(f"[dim]{p}[/][bold]{r.text}[/]  [dim]({served})[/]")
