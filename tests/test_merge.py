"""LoRA cube merging: PEFT's add_weighted_adapter arithmetic, exact outputs, lineage and typed refusals."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from helpers.lora_cubes import peft_lora_cube
from memfed.cube.core import MemCube
from memfed.cube.digest import payload_digest
from memfed.cube.fingerprint import fingerprint_model
from memfed.cube.manifest import new_manifest
from memfed.cube.payload import describe_tensors, encode_tensors
from memfed.cube.peft_io import attach_to_peft_model, import_peft
from memfed.errors import IncompatibleModelError, InvalidArgumentError, UnsupportedError
from memfed.mip.v1 import cube_pb2
from memfed.node.merge import MERGE_METHODS, merge_lora_cubes
from memfed.node.tiny_models import tiny_llama

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
WEIGHTS = [0.7, -0.4]  # a negative weight exercises PEFT's sign handling


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(seed=0, **TINY)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, tuple[Path, MemCube]]:
    """PEFT adapter folders and their cubes. a/b: equal ranks, partly different modules and scalings;
    c: another rank (6) on a's modules; d: rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "a": (1, 4, 8, ["q_proj", "v_proj", "down_proj"]),
        "b": (2, 4, 4, ["q_proj", "k_proj"]),
        "c": (3, 6, 12, ["q_proj", "v_proj", "down_proj"]),
        "d": (4, 4, 8, ["q_proj", "v_proj"]),  # rsLoRA
    }
    out = {}
    for name, (seed, r, alpha, targets) in specs.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                            use_rslora=name == "d")  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(copy.deepcopy(base), config)
        peft_model.save_pretrained(root / name)
        cube = import_peft(root / name, base, cube_id=f"cube_{name}", owner=f"node:{name}")
        out[name] = (root / name, cube)
    return out


def _cube_deltas(cube: MemCube) -> dict[str, torch.Tensor]:
    t = cube.tensors()
    return {
        x.module: (t[f"{x.module}.lora_B.weight"] @ t[f"{x.module}.lora_A.weight"]) * x.scaling
        for x in cube.manifest.payload.lora.targets
    }


def _peft_merge(base, adapters, names, method: str, **kwargs) -> dict[str, tuple[torch.Tensor, ...]]:
    """{module: (A, B, delta)} of PEFT's own add_weighted_adapter over the saved adapter folders."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[names[0]][0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name][0], adapter_name=name)
    model.add_weighted_adapter(names, WEIGHTS, "merged", combination_type=method, **kwargs)
    out = {}
    for path, layer in model.base_model.model.named_modules():
        if hasattr(layer, "lora_A") and "merged" in layer.lora_A:
            a, b = layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach()
            out[path] = (a, b, (b @ a) * layer.scaling["merged"])
    return out


@pytest.mark.parametrize(
    ("names", "method", "ours", "theirs"),
    [
        (["a", "b"], "cat", {}, {}),
        (["a", "c"], "cat", {}, {}),
        (["a", "b"], "linear", {}, {}),
        (["a", "c"], "svd", {}, {}),
        (["a", "c"], "svd", {"rank": 3}, {"svd_rank": 3}),
        (["a", "b"], "svd", {"rank": 2}, {"svd_rank": 2}),
        (["a", "b"], "ties", {"density": 0.5}, {"density": 0.5}),
        (["a", "b"], "ties", {"density": 0.7, "majority_sign_method": "frequency"},
         {"density": 0.7, "majority_sign_method": "frequency"}),
    ],
    ids=["cat", "cat-unequal-ranks", "linear", "svd", "svd-rank3", "svd-rank2", "ties", "ties-frequency"],
)  # fmt: skip
def test_matches_peft_add_weighted_adapter(base, adapters, names, method, ours, theirs) -> None:
    merged = merge_lora_cubes([adapters[n][1] for n in names], WEIGHTS, method=method, cube_id="m", **ours)
    reference = _peft_merge(base, adapters, names, method, **theirs)
    deltas = _cube_deltas(merged)
    assert set(deltas) == set(reference)
    for module, (a, b, delta) in reference.items():
        assert (deltas[module] - delta).abs().max() <= 1e-5, module
        assert delta.abs().max() > 1e-2  # a real delta, not two zeros agreeing
        if method in ("linear", "ties"):  # factor-wise methods: the factors themselves must agree
            t = merged.tensors()
            assert (t[f"{module}.lora_A.weight"] - a).abs().max() <= 1e-5
            assert (t[f"{module}.lora_B.weight"] - b).abs().max() <= 1e-5


@pytest.mark.parametrize("names", [("a", "c"), ("a", "d")], ids=["unequal-ranks", "rslora"])
def test_cat_merge_runs_as_the_weighted_sum_of_its_parents(base, adapters, names) -> None:
    # With rsLoRA parents PEFT's own cat merge is off by sqrt(rank) (it keeps use_rslora); ours is exact.
    parents = [adapters[n][1] for n in names]
    merged = merge_lora_cubes(parents, WEIGHTS, cube_id="sum")  # default method: cat, exact
    assert merged.manifest.origin.params["method"] == "cat"
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for cube, w in zip(parents, WEIGHTS, strict=True):
            for module, delta in _cube_deltas(cube).items():
                reference.get_submodule(module).weight += w * delta
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = attach_to_peft_model(copy.deepcopy(base), merged).eval()(input_ids=ids).logits
        bare = base(input_ids=ids).logits
    assert (expected - bare).abs().max() > 1e-3
    assert (got - expected).abs().max() <= 1e-5


def test_svd_is_exact_at_full_rank_and_reports_its_truncation_error(adapters) -> None:
    parents = [adapters["a"][1], adapters["c"][1]]
    exact = _cube_deltas(merge_lora_cubes(parents, WEIGHTS, cube_id="cat"))
    full = merge_lora_cubes(parents, WEIGHTS, method="svd", rank=10, cube_id="full")
    assert float(full.manifest.origin.params["truncation_error"]) < 1e-6
    for module, delta in _cube_deltas(full).items():
        assert (delta - exact[module]).abs().max() <= 1e-5
    low = merge_lora_cubes(parents, WEIGHTS, method="svd", rank=2, cube_id="low")
    approx = _cube_deltas(low)
    lost = sum(float((approx[m] - exact[m]).double().norm() ** 2) for m in exact)
    total = sum(float(exact[m].double().norm() ** 2) for m in exact)
    params = low.manifest.origin.params
    assert float(params["truncation_error"]) == pytest.approx(math.sqrt(lost / total), rel=1e-3)
    assert float(params["max_module_truncation_error"]) >= float(params["truncation_error"]) > 0.05
    assert {t.rank for t in low.manifest.payload.lora.targets} == {2}


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties"])
def test_factor_methods_refuse_unequal_ranks(adapters, method: str) -> None:
    with pytest.raises(InvalidArgumentError, match="equal LoRA ranks") as err:
        merge_lora_cubes([adapters["a"][1], adapters["c"][1]], method=method, cube_id="m")
    assert "svd" in str(err.value) and "cube_c@1.0.0 (r=6)" in str(err.value)


# Hand-made cubes: one module "m", scaling 1, so factor values can be worked out on paper.


@pytest.fixture(scope="module")
def fp(base: torch.nn.Module) -> cube_pb2.BaseModelFingerprint:
    return fingerprint_model(base)


def _cube(fp, factors: dict[str, tuple[list, list]], cube_id: str, *, chain=(), owner="", kind="lora"):
    tensors, targets = {}, []
    for module, (a, b) in factors.items():
        tensors[f"{module}.lora_A.weight"] = torch.tensor(a, dtype=torch.float32)
        tensors[f"{module}.lora_B.weight"] = torch.tensor(b, dtype=torch.float32)
        r = len(a)
        targets.append(cube_pb2.LoraTarget(module=module, rank=r, alpha=r, scaling=1.0))
    payload = encode_tensors(tensors)
    spec = {"lora": cube_pb2.LoraSpec(rank=targets[0].rank, targets=targets)} if kind == "lora" else {}
    manifest = new_manifest(
        cube_id=cube_id, version="1.0.0", kind=kind, digest=payload_digest(payload), size_bytes=len(payload),
        base_model=fp, payload=cube_pb2.PayloadDescription(tensors=describe_tensors(payload), **spec),
        version_chain=chain, owner=owner,
    )  # fmt: skip
    return MemCube(manifest=manifest, payload=payload)


def _factors(cube: MemCube, module: str = "m") -> tuple[list, list]:
    t = cube.tensors()
    return t[f"{module}.lora_A.weight"].tolist(), t[f"{module}.lora_B.weight"].tolist()


@pytest.mark.parametrize(
    ("sign_method", "expected_a"),
    # "total" sums [1, 0, -1, 0] -> signs + + - +; "frequency" counts [-1, -1, 1, 0] -> - - + +.
    # Agreeing entries are averaged; a column with none left stays 0.
    [("total", [3.0, 2.0, -4.0, 0.0]), ("frequency", [-1.0, -1.0, 1.5, 0.0])],
)
def test_ties_elects_signs_as_worked_out_by_hand(fp, sign_method: str, expected_a: list) -> None:
    rows = [[3, -1, 2, 0], [-1, -1, 1, 0], [-1, 2, -4, 0]]
    cubes = [_cube(fp, {"m": ([row], [[1.0]])}, f"t{i}") for i, row in enumerate(rows)]
    merged = merge_lora_cubes(cubes, method="ties", majority_sign_method=sign_method, cube_id="ties")
    assert _factors(merged) == ([expected_a], [[1.0]])


def test_ties_trims_to_density_before_electing(fp) -> None:
    rows = [[3, -1, 2, 0.5], [-1, -1.5, 4, 0.25], [-2, 0.5, -3, 1]]  # top 2 of 4 kept per row
    cubes = [_cube(fp, {"m": ([row], [[2.0], [0.5]])}, f"t{i}") for i, row in enumerate(rows)]
    merged = merge_lora_cubes(cubes, method="ties", density=0.5, cube_id="ties")
    # Trimmed: [3,0,2,0], [0,-1.5,4,0], [-2,0,-3,0]; sums [1,-1.5,3,0] -> + - + +.
    assert _factors(merged) == ([[3.0, -1.5, 3.0, 0.0]], [[2.0], [0.0]])


def test_dare_drops_to_density_rescales_and_is_seeded(fp) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=gen), torch.randn(64, 8, generator=gen)
    kept = _cube(fp, {"m": (a.tolist(), b.tolist())}, "kept")
    other = _cube(fp, {"m": (torch.ones(8, 64).tolist(), torch.ones(64, 8).tolist())}, "other")

    def merge(seed: int, method: str = "dare_linear", density: float = 0.3) -> MemCube:
        # weight 0 removes "other", so the result is the dropped and rescaled factors of "kept"
        return merge_lora_cubes([kept, other], [1.0, 0.0], method=method, density=density, seed=seed,
                                cube_id="dare")  # fmt: skip

    ratios = []
    for seed in range(8):
        new_a = merge(seed).tensors()["m.lora_A.weight"]
        nonzero = new_a != 0
        assert 0.2 < nonzero.float().mean() < 0.4  # density 0.3 respected (512 entries)
        assert torch.allclose(new_a[nonzero], a[nonzero] / 0.3, rtol=1e-6)  # kept entries rescaled
        ratios.append(new_a / a)
    assert float(torch.stack(ratios).mean()) == pytest.approx(1.0, abs=0.1)  # expectation preserved
    assert merge(5).payload == merge(5).payload and merge(5).payload != merge(6).payload
    assert merge(7, "dare_ties").manifest.origin.params["seed"] == "7"


def test_dare_at_full_density_equals_its_deterministic_counterpart(adapters) -> None:
    cubes = [adapters["a"][1], adapters["b"][1]]
    for dare, plain in (("dare_linear", "linear"), ("dare_ties", "ties")):
        got = merge_lora_cubes(cubes, WEIGHTS, method=dare, cube_id="x").payload
        assert got == merge_lora_cubes(cubes, WEIGHTS, method=plain, cube_id="x").payload


def test_merged_manifest_names_parents_and_lineage(fp) -> None:
    root = payload_digest(b"v1.0")
    p1 = _cube(fp, {"m": ([[1.0, 2.0]], [[1.0]])}, "p1", chain=[root], owner="node:alice")
    p2 = _cube(fp, {"m": ([[0.5, 1.0]], [[2.0]]), "n": ([[1.0]], [[1.0]])}, "p2", chain=[root],
               owner="node:bob")  # fmt: skip
    merged = merge_lora_cubes([p1, p2], [0.5, 0.5], cube_id="both", version="2.0.0", owner="node:carol")
    m = merged.manifest
    merged.verify()
    assert (m.kind, m.lifecycle) == (cube_pb2.CUBE_KIND_LORA, cube_pb2.LIFECYCLE_STATE_MERGED)
    assert list(m.version_chain) == [root, p1.manifest.digest, p2.manifest.digest]
    assert m.origin.method == "merge" and list(m.origin.sources) == ["p1@1.0.0", "p2@1.0.0"]
    assert list(m.origin.contributors) == ["node:alice", "node:bob"] and m.owner == "node:carol"
    assert json.loads(m.origin.params["weights"]) == [0.5, 0.5]
    assert m.origin.params["parents"] == f"{p1.manifest.digest},{p2.manifest.digest}"
    assert m.base_model == p1.manifest.base_model
    assert [t.name for t in m.payload.tensors] == sorted(merged.tensors())
    targets = {t.module: (t.rank, t.alpha, t.scaling) for t in m.payload.lora.targets}
    assert targets == {"m": (2, 2.0, 1.0), "n": (1, 1.0, 1.0)}  # module "n" only in p2: zero delta in p1
    assert _factors(merged, "n") == ([[0.5]], [[1.0]])


def test_refusals_are_typed(base, fp) -> None:
    p = _cube(fp, {"m": ([[1.0, 2.0]], [[1.0]])}, "p")
    q = _cube(fp, {"m": ([[0.5, 1.0]], [[2.0]])}, "q")
    bad_args = [
        ([p], {}),
        ([p, q], {"weights": [1.0]}),
        ([p, q], {"weights": [1.0, math.nan]}),
        ([p, q], {"method": "average"}),
        ([p, q], {"method": "linear", "density": 0.5}),
        ([p, q], {"method": "cat", "rank": 4}),
        ([p, q], {"method": "dare_ties", "density": 0.0}),
        ([p, q], {"method": "ties", "majority_sign_method": "median"}),
        ([p, _cube(fp, {"m": ([[math.inf, 1.0]], [[2.0]])}, "inf")], {}),
    ]
    for cubes, kwargs in bad_args:
        with pytest.raises(InvalidArgumentError):
            merge_lora_cubes(cubes, cube_id="m", **kwargs)
    with pytest.raises(UnsupportedError, match="not a LoRA cube"):
        merge_lora_cubes([p, _cube(fp, {"m": ([[1.0]], [[1.0]])}, "steer", kind="steering")], cube_id="m")
    other = _cube(fingerprint_model(tiny_llama(seed=1, **TINY)), {"m": ([[1.0, 2.0]], [[1.0]])}, "other")
    with pytest.raises(IncompatibleModelError, match=r"p@1\.0\.0.*other@1\.0\.0.*weight values"):
        merge_lora_cubes([p, other], cube_id="m")


def test_merging_rank16_cubes_of_a_130m_model_is_fast(fp) -> None:
    """8 rank-16 cubes on the 48 attention projections of a GPT-2-small-sized (768 wide) model."""
    gen = torch.Generator().manual_seed(0)
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(12) for p in "qkvo"]
    cubes = []
    for c in range(8):
        tensors, targets = {}, []
        for module in modules:
            tensors[f"{module}.lora_A.weight"] = torch.randn(16, 768, generator=gen)
            tensors[f"{module}.lora_B.weight"] = torch.randn(768, 16, generator=gen)
            targets.append(cube_pb2.LoraTarget(module=module, rank=16, alpha=32, scaling=2.0))
        payload = encode_tensors(tensors)
        desc = cube_pb2.PayloadDescription(lora=cube_pb2.LoraSpec(rank=16, targets=targets))
        manifest = new_manifest(cube_id=f"big{c}", version="1.0.0", kind="lora", base_model=fp, payload=desc,
                                digest=payload_digest(payload), size_bytes=len(payload))  # fmt: skip
        cubes.append(MemCube(manifest=manifest, payload=payload))
    seconds = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: stable on a shared, loaded machine, unlike wall time
    try:
        for method, n in (("cat", 8), ("linear", 8), ("svd", 4)):
            start = time.process_time()
            merged = merge_lora_cubes(cubes[:n], method=method, cube_id="big")
            seconds[method] = time.process_time() - start
            assert len(merged.manifest.payload.lora.targets) == len(modules)
    finally:
        torch.set_num_threads(threads)
    # Typically 0.15-0.4 s each here; the bounds leave a margin for slower machines.
    assert seconds["cat"] < 1 and seconds["linear"] < 1 and seconds["svd"] < 2, seconds


def test_merge_methods_are_peft_names() -> None:
    assert set(MERGE_METHODS) == {"linear", "cat", "svd", "ties", "dare_linear", "dare_ties"}


def test_merge_in_store_stores_a_merged_product_and_leaves_parents(tmp_path) -> None:
    from memfed.node.merge import merge_in_store
    from memfed.node.store import CubeStore

    model = tiny_llama(seed=3)
    with CubeStore(tmp_path / "s") as store:
        parents = [peft_lora_cube(model, f"p{i}", seed=i) for i in range(2)]
        for p in parents:
            store.put(p.manifest, p.payload)
        merged = merge_in_store(store, ["p0", "p1@1.0.0"], [0.5, 0.5], cube_id="both")
        stored = store.get_manifest("both")
        assert stored.lifecycle == cube_pb2.LIFECYCLE_STATE_MERGED
        assert stored.digest == merged.manifest.digest
        assert [p.manifest.digest for p in parents] == list(stored.version_chain)[-2:]
        assert all(
            store.get_manifest(f"p{i}").lifecycle == cube_pb2.LIFECYCLE_STATE_GENERATED for i in range(2)
        )
