"""``memfed cube export / import / detect-watermark``: sealed ``.mcube`` files between nodes.

Registered on the ``cube`` group from memfed.cli.main.
"""

from __future__ import annotations

from pathlib import Path

import click

from memfed.cli.options import (
    identity_dir_option,
    json_option,
    model_option,
    passphrase_env_option,
    read_passphrase,
    resolve_identity_dir,
    resolve_store,
    store_option,
)
from memfed.cli.output import console, emit_json, progress_bar


def _store(store_dir: Path | None):  # -> CubeStore (imported lazily: CLI start-up stays fast)
    from memfed.node.store import CubeStore

    return CubeStore(resolve_store(store_dir))


@click.command("export")
@click.argument("ref")
@click.option(
    "--to", "to", multiple=True, required=True, type=click.Path(path_type=Path),
    help="A recipient's public identity file (repeatable).",
)  # fmt: skip
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-watermark", is_flag=True, help="Do not watermark a LoRA cube (it cannot be traced).")
@model_option
@identity_dir_option
@passphrase_env_option
@store_option
@json_option
def export_cmd(
    ref: str,
    to: tuple[Path, ...],
    output: Path,
    no_watermark: bool,
    model_dir: Path | None,
    identity_dir: Path | None,
    passphrase_env: str | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Seal cube REF for the recipients (--to) into a signed, encrypted, watermarked .mcube file.

    A LoRA cube's watermark is shaped on its base model (--model, or the embedded model when that is the
    cube's base) so that it leaves the model's outputs practically unchanged; without the base model it is
    model-free (it costs more).
    """
    from memfed.crypto.exchange import export_cube
    from memfed.crypto.identity import load_identity, load_public_identity
    from memfed.cube.manifest import parse_ref

    cube_id, version = parse_ref(ref)
    ident = load_identity(resolve_identity_dir(identity_dir), passphrase=read_passphrase(passphrase_env))
    recipients = [load_public_identity(p) for p in to]

    def host(expected):  # the cube's base model, or None (model-free mark); only called for a LoRA mark
        from memfed.cube.fingerprint import fingerprint_model, mismatch_reasons
        from memfed.node.models import load_host_model, resolve_model_dir

        path = resolve_model_dir(model_dir)
        with progress_bar("loading base model", quiet=as_json):
            model, _ = load_host_model(path)
        if model_dir is None and mismatch_reasons(
            expected, fingerprint_model(model, seed=expected.sample_seed)
        ):
            return None  # the embedded model is not this cube's base (an explicit --model is checked)
        return model

    with _store(store_dir) as store:
        res = export_cube(
            store, cube_id, version, ident, recipients, output, watermark=not no_watermark, host=host
        )
    m = res.seal.manifest
    out = {
        "file": str(output),
        "ref": f"{m.cube_id}@{m.version}",
        "digest": m.digest,
        "source_digest": res.source_digest,
        "bytes": res.seal.bytes_written,
        "recipients": [r.fingerprint for r in recipients],
        "watermarked": res.watermarked,
        "mark": ("host-aware" if res.host_aware else "model-free") if res.watermarked else None,
        "signed_by": ident.key_id,
    }
    if as_json:
        emit_json(out)
    else:
        mark = f"watermarked ({out['mark']}), " if res.watermarked else ""
        console.print(
            f"sealed [bold]{out['ref']}[/] ({mark}{res.seal.bytes_written / 1e6:.2f} MB) for "
            f"{', '.join(out['recipients'])} → {output}"
        )


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--trust", "trust", multiple=True, type=click.Path(path_type=Path),
    help="Public identity file of a producer whose signature you accept (repeatable).",
)  # fmt: skip
@model_option
@identity_dir_option
@passphrase_env_option
@store_option
@json_option
def import_cmd(
    file: Path,
    trust: tuple[Path, ...],
    model_dir: Path | None,
    identity_dir: Path | None,
    passphrase_env: str | None,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Verify and import a .mcube file: envelope, signature, digest, base model, watermark — then store.

    Nothing is written to the store unless every check passes. Your own signing key is always trusted.
    """
    from memfed.crypto.identity import load_identity, load_public_identity
    from memfed.crypto.seal import open_file
    from memfed.crypto.signing import TrustedKeys

    ident = load_identity(resolve_identity_dir(identity_dir), passphrase=read_passphrase(passphrase_env))
    trusted = TrustedKeys([ident.public, *(load_public_identity(p) for p in trust)])

    def host_fingerprint():  # only called for cubes that hold weights
        from memfed.cube.fingerprint import fingerprint_model
        from memfed.node.models import load_host_model, resolve_model_dir

        path = resolve_model_dir(model_dir)
        with progress_bar("loading base model", quiet=as_json):
            host, _ = load_host_model(path)
        return fingerprint_model(host, name=path.name)

    with _store(store_dir) as store:
        m = open_file(file, store, ident, trusted, host_fingerprint=host_fingerprint)
    out = {"ref": f"{m.cube_id}@{m.version}", "digest": m.digest, "size_bytes": m.payload.size_bytes}
    if as_json:
        emit_json(out)
    else:
        console.print(f"imported [bold]{out['ref']}[/] digest {m.digest[:19]}… (verified)")


@click.command("detect-watermark")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--owner", "owner_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="The owner's identity folder (its key derives the patterns; its export ledger lists recipients).",
)  # fmt: skip
@passphrase_env_option
@json_option
def detect_watermark_cmd(file: Path, owner_dir: Path, passphrase_env: str | None, as_json: bool) -> None:
    """Test FILE (a cube payload .safetensors or a PEFT folder) for the owner's watermark and name the most
    likely recipient among those the owner exported to."""
    from memfed.crypto import ledger
    from memfed.crypto.identity import load_identity
    from memfed.crypto.watermark import detect_file

    ident = load_identity(owner_dir, passphrase=read_passphrase(passphrase_env))
    report = detect_file(file, ident.watermark_secret(), ledger.records(owner_dir))
    if as_json:
        emit_json(report.to_dict())
    else:
        console.print(report.summary())
