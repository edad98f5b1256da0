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

    from memfed.cube.build import lora_cube
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

    def hot_swap_step() -> dict[str, Any]:
        import time

        from memfed.node.generation import Generator, RowRequest
        from memfed.node.runtime import ModuleRuntime
        from memfed.node.scheduler import MemScheduler

        model, tokenizer, cube = state["model"], state["tokenizer"], state["cube"]
        g = torch.Generator().manual_seed(1)
        other = lora_cube(  # a second module, so there is something to swap between
            model,
            {n: (torch.randn(4, i, generator=g) * 0.01, torch.randn(o, 4, generator=g) * 0.01)
             for n, (i, o) in list(ModuleRuntime(model).linear_layers.items())[:4]},
            cube_id="demo_style",
        )  # fmt: skip
        with CubeStore(work / "store") as store:
            store.put(other.manifest, other.payload)
            runtime = ModuleRuntime(model)
            sched = MemScheduler(runtime, store)
            t0 = time.perf_counter()
            sched.load(cube.ref)
            sched.load(other.ref)
            load_ms = (time.perf_counter() - t0) * 1e3 / 2
            swaps = []
            for ref in [cube.ref, other.ref] * 50:
                t0 = time.perf_counter()
                sched.activate(ref)
                swaps.append((time.perf_counter() - t0) * 1e3)
            sched.deactivate()
            rows = [RowRequest(NEW_FACT_PROMPT, modules=(cube.ref,), max_new_tokens=4),
                    RowRequest(NEW_FACT_PROMPT, max_new_tokens=4),
                    RowRequest(NEW_FACT_PROMPT, modules=(other.ref,), max_new_tokens=4)]  # fmt: skip
            with_module, bare, styled = Generator(sched, tokenizer).generate(rows)
            runtime.close()
        swaps.sort()
        swap_ms = swaps[len(swaps) // 2]
        ok = with_module.text.strip().startswith(NEW_FACT_TARGET.strip()) and bare.text != with_module.text
        return {
            "ok": ok,
            "activate_ms_p50": round(swap_ms, 4),
            "load_ms": round(load_ms, 2),
            "mixed_batch": [with_module.text, bare.text, styled.text],
            "say": f"load {load_ms:.1f} ms/module, activate {swap_ms * 1e3:.0f} µs; one batch, three rows: "
            f"{with_module.text!r} (Zephyria module) / {bare.text!r} (bare) / {styled.text!r} (other module)",
        }

    def time_machine_step() -> dict[str, Any]:
        from memfed.errors import LifecycleError
        from memfed.node.lifecycle import Lifecycle
        from memfed.node.runtime import ModuleRuntime

        model, tokenizer, cube = state["model"], state["tokenizer"], state["cube"]
        v1 = cube.manifest
        # v1.1.0 "forgets" the fact (B zeroed): the next version on the cube's chain.
        tensors = {k: (v if ".lora_A." in k else torch.zeros_like(v)) for k, v in cube.tensors().items()}
        factors = {t.module: (tensors[f"{t.module}.lora_A.weight"], tensors[f"{t.module}.lora_B.weight"])
                   for t in v1.payload.lora.targets}  # fmt: skip
        v2 = lora_cube(v1.base_model, factors, cube_id=v1.cube_id, version="1.1.0", version_chain=[v1.digest])

        def answer(store: CubeStore) -> str:
            current = store.get(v1.cube_id)
            runtime = ModuleRuntime(model)
            runtime.load(current)
            runtime.activate(current.ref)
            try:
                return _greedy(model, tokenizer, NEW_FACT_PROMPT, 4)
            finally:
                runtime.close()

        with CubeStore(work / "store") as store:
            life = Lifecycle(store)
            store.put(v2.manifest, v2.payload)
            newest = answer(store)
            back = life.rollback(v1.cube_id, "1.0.0", reason="v1.1.0 lost the Zephyria fact")
            rolled = answer(store)
            refused = False
            try:
                store.get(v1.cube_id, "1.1.0")
            except LifecycleError:
                refused = True
            life.restore(v1.cube_id, "1.1.0", reason="roll forward again")
            history = [
                f"{e.version} {e.from_name}→{e.to_name}"
                if e.from_name != "unspecified"
                else f"{e.version} stored"
                for e in life.history(v1.cube_id)
            ]
        ok = refused and rolled.strip().startswith(NEW_FACT_TARGET.strip()) and newest != rolled
        return {
            "ok": ok,
            "archived": back.archived,
            "history": history,
            "say": f"v1.1.0 answers {newest!r}; rollback to 1.0.0 (1.1.0 archived to cold storage) answers "
            f"{rolled!r}; 1.1.0 restored again. History: {', '.join(history)}",
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
                store.get("demo_zephyria", "1.0.0")
        except IntegrityError as exc:
            return {"error": str(exc), "say": "one flipped bit in the stored payload → digest error on read"}
        return {"ok": False, "say": "tampering was NOT detected"}

    story.step("model", "Base model (the embedded default unless --model)", model_step)
    story.step("make_adapter", "Teach a new fact with a PEFT LoRA", adapter_step)
    story.step("import", "Import the PEFT adapter as a MemCube", import_step)
    story.step("export_roundtrip", "Export the cube back to PEFT and compare", export_step)
    story.step("hot_swap", "Hot-swap modules and run a mixed-module batch", hot_swap_step)
    story.step("time_machine", "Publish a new version, roll back, restore (time machine)", time_machine_step)
    story.step("foreign_model_refused", "Apply the cube to another base model", foreign_step)
    story.step("tamper_detected", "Corrupt the stored payload", tamper_step)
