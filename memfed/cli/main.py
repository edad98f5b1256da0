"""``memfed``: entry point, command groups and the mapping of errors to exit codes."""

from __future__ import annotations

import os
import sys
import warnings

import click

import memfed
from memfed.cli.audit_cmd import audit
from memfed.cli.bench_cmd import bench
from memfed.cli.cube_cmd import cube
from memfed.cli.demo_cmd import demo
from memfed.cli.edit_cmd import edit
from memfed.cli.fed_cmd import fed
from memfed.cli.feedback_cmd import evolve, feedback
from memfed.cli.generate_cmd import generate
from memfed.cli.identity_cmd import identity
from memfed.cli.memory_cmd import memory
from memfed.cli.model_cmd import model
from memfed.cli.module_cmd import module
from memfed.cli.node_cmd import node
from memfed.cli.output import emit_json, err_console
from memfed.cli.pki_cmd import pki
from memfed.cli.registry_cmd import registry
from memfed.cli.seal_cmd import detect_watermark_cmd, export_cmd, import_cmd
from memfed.cli.steer_cmd import steer
from memfed.cli.sync_cmd import sync_cmd
from memfed.errors import MemfedError

EXIT_CODES_HELP = """\b
Exit codes:
  0  success               6  integrity (digest, tamper, truncation)
  1  unexpected error      7  cube made for another base model
  2  usage error           8  unsupported input
  3  invalid argument      9  illegal lifecycle transition
  4  not found            10  storage failure (disk full, I/O)
  5  already exists       11  permission denied   12  unauthenticated
 13  memory budget or queue too small    14  node unreachable, or its deadline passed
 15  quality gate failed (e.g. an internalized module's recall too low): nothing registered
"""


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(memfed.__version__, prog_name="memfed")
def cli() -> None:
    """memfed: parametric memory (LoRA modules, fact edits, steering vectors) as MemCubes.

    \b
    Start here:
      memfed demo                      build the embedded model and walk a cube round trip
      memfed model init                build (once) and cache the embedded default model
      memfed cube import-peft DIR      turn a Hugging Face PEFT LoRA folder into a cube
      memfed cube list                 what the local store holds
      memfed bench store --json        measure the store against raw file I/O

    Every command that reports takes --json. Errors print one line saying what to fix.
    """


cli.add_command(model)
cli.add_command(cube)
cli.add_command(bench)
cli.add_command(demo)
cli.add_command(identity)
cli.add_command(node)
cli.add_command(module)
cli.add_command(generate)
cli.add_command(memory)
cli.add_command(steer)
cli.add_command(edit)
cli.add_command(feedback)
cli.add_command(evolve)
cli.add_command(fed)
cli.add_command(pki)
cli.add_command(registry)
cli.add_command(audit)
cli.add_command(sync_cmd)
cube.add_command(export_cmd)
cube.add_command(import_cmd)
cube.add_command(detect_watermark_cmd)


def _quiet_libraries() -> None:
    """The CLI shows its own progress: silence the libraries' bars, info logs and deprecation chatter."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    args = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    try:
        result = cli.main(args=args, prog_name="memfed", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        err_console.print("aborted")
        return 130
    except MemfedError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        if "--json" in args:
            emit_json({"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}})
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
