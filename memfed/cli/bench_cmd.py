"""``memfed bench``: measured figures, as ratios against named baselines."""

from __future__ import annotations

from pathlib import Path

import click

from memfed.bench.harness import BENCHES, run_bench
from memfed.cli.options import json_option
from memfed.cli.output import console, emit_json
from memfed.errors import InvalidArgumentError

# Not benches: ``all`` runs every bench into a report, ``report`` re-renders one from its report.json.
_ACTIONS = ("all", "report")


@click.command()
@click.argument("name", type=click.Choice([*sorted(BENCHES), *_ACTIONS]))
@click.option("--quick", is_flag=True, help="Fewer repetitions (a smoke run, not figures to report).")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With `all`: write report.json, report.md and PNG plots into this folder.",
)
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    help="With `all`: run only these benches (repeat the option, or separate names by commas).",
)
@click.option(
    "--from",
    "from_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="With `report`: the folder holding a report.json to re-render (nothing is run).",
)
@json_option
def bench(
    name: str,
    quick: bool,
    report_dir: Path | None,
    only: tuple[str, ...],
    from_dir: Path | None,
    as_json: bool,
) -> None:
    """Run benchmark NAME and print medians, the baseline's settings and the ratios.

    A ratio named x_vs_y is x's figure over y's (for times, lower is better for memfed).

    \b
    memfed bench all --report DIR [--quick] [--only NAME]   every bench, each in its own process,
                                                            then DIR/report.{json,md} and DIR/*.png
    memfed bench report --from DIR                          re-render DIR's report without running
    """
    if name == "all":
        _all(quick=quick, report_dir=report_dir, only=only, as_json=as_json)
        return
    if name == "report":
        if from_dir is None:
            raise InvalidArgumentError(
                "`memfed bench report` needs --from DIR", hint="the folder of a report.json"
            )
        from memfed.bench.report import render_from

        _written(render_from(from_dir), as_json=as_json)
        return
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


def _all(*, quick: bool, report_dir: Path | None, only: tuple[str, ...], as_json: bool) -> None:
    """Run the benches one by one with a progress line each, then render the report."""
    from memfed.bench.all import ordered, run_all
    from memfed.bench.report import assemble, render

    if report_dir is None:
        raise InvalidArgumentError("`memfed bench all` needs --report DIR", hint="where the report goes")
    names = ordered([n.strip() for item in only for n in item.split(",") if n.strip()])
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=as_json,
    ) as progress:
        task = progress.add_task(f"bench {names[0] if names else ''}", total=len(names))

        def done(bench_name: str, entry: dict) -> None:
            mark = "[green]ok[/]" if entry["ok"] else f"[red]failed[/] ({entry['error']})"
            if not as_json:  # stdout carries only the JSON document
                progress.console.print(f"bench {bench_name}: {mark} in {entry['seconds']:.1f} s")
            progress.advance(task)
            following = names.index(bench_name) + 1
            if following < len(names):
                progress.update(task, description=f"bench {names[following]}")

        results = run_all(names, quick=quick, on_done=done)
    report = assemble(results, quick=quick)
    written = render(report, report_dir)
    if as_json:
        emit_json({"report_dir": str(report_dir), "benches": {n: e["ok"] for n, e in results.items()},
                   "files": [str(p) for p in written]})  # fmt: skip
        return
    met = [r for r in report["rows"] if r["met"] is not None]
    console.print(f"goals met: {sum(r['met'] for r in met)}/{len(met)} judged; report in {report_dir}")
    _written(written, as_json=False)


def _written(paths: list[Path], *, as_json: bool) -> None:
    if as_json:
        emit_json({"files": [str(p) for p in paths]})
        return
    for p in paths:
        console.print(f"  wrote {p}")
