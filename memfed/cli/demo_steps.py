"""The steps of ``memfed demo``, kept apart from the command so later issues extend the story here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A fact the embedded model was never taught; the demo's adapter teaches it.
NEW_FACT_PROMPT = "The capital of Zephyria is"
NEW_FACT_TARGET = " Lumora"


def _greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 8) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _teach_fact(model: Any, tokenizer: Any, out_dir: Path, steps: int = 60) -> Path:
    """Train a small LoRA on one new fact with PEFT and save it as a PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    batch = tokenizer([NEW_FACT_PROMPT + NEW_FACT_TARGET + tokenizer.eos_token], return_tensors="pt")
    batch = batch.to(model.device)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # hand the bare model back for the next steps
    return out_dir


def run(story: Any, work: Path, model_dir: Path | None = None) -> None:
    """Run every step of the demo inside ``work`` (a temporary folder the caller removes), on the model
    in ``model_dir`` (default: the embedded model, built on first use)."""
    import torch
    from peft import PeftModel

    from memfed.cube.fingerprint import describe, fingerprint_model
    from memfed.cube.peft_io import attach_to_peft_model, export_peft, import_peft
    from memfed.errors import IncompatibleModelError, IntegrityError
    from memfed.node.models import load_host_model, resolve_model_dir, tiny_llama
    from memfed.node.store import CubeStore

    state: dict[str, Any] = {}

    def model_step() -> dict[str, Any]:
        path = resolve_model_dir(model_dir)
        model, tokenizer = load_host_model(path)
        state.update(path=path, model=model, tokenizer=tokenizer)
        fp = fingerprint_model(model, name=path.name)
        return {"say": f"{describe(fp)} at {path}", "path": str(path), "fingerprint": fp.fingerprint_id}

    def adapter_step() -> dict[str, Any]:
        model, tokenizer = state["model"], state["tokenizer"]
        before = _greedy(model, tokenizer, NEW_FACT_PROMPT)
        adapter = _teach_fact(model, tokenizer, work / "peft_adapter")
        peft = PeftModel.from_pretrained(model, adapter).eval()
        after = _greedy(peft, tokenizer, NEW_FACT_PROMPT)
        peft.unload()
        state["adapter"] = adapter
        learned = after.strip().startswith(NEW_FACT_TARGET.strip())
        return {
            "ok": learned,
            "before": before,
            "after": after,
            "say": f"'{NEW_FACT_PROMPT}' → before:{before!r}  with the LoRA:{after!r}",
        }

    def import_step() -> dict[str, Any]:
        cube = import_peft(
            state["adapter"],
            state["model"],
            cube_id="demo_zephyria",
            version="1.0.0",
            model_name=state["path"].name,
        )
        with CubeStore(work / "store") as store:
            store.put(cube.manifest, cube.payload)
        state["cube"] = cube
        return {
            "ref": cube.ref,
            "digest": cube.manifest.digest,
            "say": f"stored {cube.ref} ({cube.manifest.payload.size_bytes / 1e3:.0f} kB)",
        }

    def export_step() -> dict[str, Any]:
        with CubeStore(work / "store") as store:
            cube = store.get("demo_zephyria")
        out = export_peft(cube, work / "exported")
        model, tokenizer = state["model"], state["tokenizer"]
        ids = tokenizer([NEW_FACT_PROMPT], return_tensors="pt").to(model.device)
        with torch.no_grad():
            original = PeftModel.from_pretrained(model, state["adapter"]).eval()
            a = original(**ids).logits
            original.unload()
            exported = PeftModel.from_pretrained(model, out).eval()
            b = exported(**ids).logits
            exported.unload()
        diff = float((a - b).abs().max())
        return {
            "ok": diff <= 1e-6,
            "max_abs_diff": diff,
            "say": f"exported back to PEFT; logits differ by at most {diff:.1e}",
        }

    def foreign_step() -> dict[str, Any]:
        other = tiny_llama(seed=1)
        try:
            attach_to_peft_model(other, state["cube"])
        except IncompatibleModelError as exc:
            return {"error": str(exc), "say": f"refused: {exc.message[:120]}…"}
        return {"ok": False, "say": "a foreign model was NOT refused"}

    def tamper_step() -> dict[str, Any]:
        with CubeStore(work / "store") as store:
            path = store.payload_path(state["cube"].manifest.digest)
            path.chmod(0o644)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        try:
            with CubeStore(work / "store") as store:
                store.get("demo_zephyria")
        except IntegrityError as exc:
            return {"error": str(exc), "say": "one flipped bit in the stored payload → digest error on read"}
        return {"ok": False, "say": "tampering was NOT detected"}

    story.step("model", "Base model (the embedded default unless --model)", model_step)
    story.step("make_adapter", "Teach a new fact with a PEFT LoRA", adapter_step)
    story.step("import", "Import the PEFT adapter as a MemCube", import_step)
    story.step("export_roundtrip", "Export the cube back to PEFT and compare", export_step)
    story.step("foreign_model_refused", "Apply the cube to another base model", foreign_step)
    story.step("tamper_detected", "Corrupt the stored payload", tamper_step)
