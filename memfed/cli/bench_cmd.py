"""``memfed bench``: measured figures, as ratios against named baselines."""

from __future__ import annotations

import click

from memfed.bench.harness import BENCHES, run_bench
from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json


@click.command()
@click.argument("name", type=click.Choice(sorted(BENCHES)))
@click.option("--quick", is_flag=True, help="Fewer repetitions (a smoke run, not figures to report).")
@json_option
def bench(name: str, quick: bool, as_json: bool) -> None:
    """Run benchmark NAME and print medians, the baseline's settings and the ratios.

    A ratio named x_vs_y is x's figure over y's (for times, lower is better for memfed).
    """
    report = run_bench(name, quick=quick)
    if as_json:
        emit_json(report)
        return
    console.print(f"[bold]bench {name}[/]")
    for section in ("metrics", "ratios", "baseline"):
        console.print(f"[bold]{section}[/]")
        for key, value in report[section].items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            console.print(f"  {key}: {shown}")
