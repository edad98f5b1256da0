"""Client-side clipping + noise (``memfed.fed.privacy``): the clip bounds the released factors' norm,
the noise has the asked std, the stricter of server and node settings applies, and a DP round still
aggregates exactly (what is exact is the aggregation of what the nodes released)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from fed_setup import CUBE_ID, Federation, make_federation

from memfed.errors import InvalidArgumentError
from memfed.fed.authority import LocalAuthority
from memfed.fed.client_app import hello_content, load_setup, train_round
from memfed.fed.privacy import DpSettings, epsilon_per_round, flat_norm, privatize
from memfed.fed.strategy import SharedCubeStrategy, TrainSettings
from memfed.fed.wire import CONFIG_KEY, UPDATE_KEY, record_to_factors


def _factors(scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return {
        m: (torch.randn(2, 64, generator=gen) * scale, torch.randn(64, 2, generator=gen) * scale)
        for m in "xy"
    }


def test_clip_bounds_the_norm_and_noise_has_the_asked_std() -> None:
    big = _factors(1.0)
    clipped, before = privatize(big, DpSettings(clip=0.5))
    assert before == pytest.approx(flat_norm(big)) and before > 0.5
    assert flat_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    small = _factors(1e-4)
    same, _ = privatize(small, DpSettings(clip=0.5))
    assert all(torch.equal(same[m][i], small[m][i]) for m in small for i in (0, 1))  # under the clip
    noisy, _ = privatize(big, DpSettings(clip=0.5, noise=2.0), np.random.default_rng(0))
    residual = torch.cat([(noisy[m][i] - clipped[m][i]).flatten() for m in big for i in (0, 1)])
    assert float(residual.std()) == pytest.approx(1.0, rel=0.1)  # std = noise x clip
    assert abs(float(residual.mean())) < 0.1
    assert flat_norm(big) == before  # the input is left alone


def test_settings_and_epsilon() -> None:
    with pytest.raises(InvalidArgumentError):
        DpSettings(clip=0.0, noise=1.0)  # noise without a clip has no sensitivity
    with pytest.raises(InvalidArgumentError):
        DpSettings(clip=-1.0)
    assert DpSettings(1.0, 0.5).stricter(DpSettings(0.2, 0.1)) == DpSettings(0.2, 0.5)
    assert DpSettings().stricter(DpSettings(0.3, 1.0)) == DpSettings(0.3, 1.0)
    assert epsilon_per_round(20.0, 1e-5) == pytest.approx(2 * math.sqrt(2 * math.log(1.25e5)) / 20)
    assert epsilon_per_round(0.0) == math.inf


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return make_federation(tmp_path_factory.mktemp("feddp"))


def _dp_round(fed: Federation, train: TrainSettings, node_floor: DpSettings | None = None):
    from flwr.app import ConfigRecord, RecordDict

    authority = LocalAuthority(fed.store, fed.grants)
    strategy = SharedCubeStrategy(authority, authority, CUBE_ID, train=train)
    challenge = os.urandom(32)
    query = RecordDict({CONFIG_KEY: ConfigRecord({"challenge": challenge})})
    setups = {}
    for i, name in enumerate(("alice", "bob"), start=1):
        identity, data = fed.nodes[name]
        setups[i] = load_setup(str(identity), str(data), str(fed.model_dir), "")
        strategy.principals[i] = strategy.identify(hello_content(setups[i], query), challenge)
    contents = strategy.open_round(1, list(setups))
    replies = [(n, train_round(setups[n], contents[n], node_floor)) for n in setups]
    strategy.collect(1, replies)
    return strategy, replies


def test_server_asked_clipping_bounds_each_update_and_round_stays_exact(fed: Federation) -> None:
    clip = 0.05
    strategy, replies = _dp_round(fed, TrainSettings(rank=2, steps=3, lr=1e-2, batch_size=8, dp_clip=clip))
    report = strategy.reports[-1]
    assert sorted(report.contributors) == ["alice", "bob"] and report.rejected == []
    assert report.aggregation_error is not None and report.aggregation_error <= 1e-6
    for _, content in replies:
        metrics = content.metric_records["metrics"]
        assert metrics["dp-clip"] == clip and metrics["dp-noise-std"] == 0.0
        assert metrics["update-norm"] > clip  # the raw update was larger: the clip did something
        assert flat_norm(record_to_factors(content.array_records[UPDATE_KEY])) <= clip * (1 + 1e-5)
    assert strategy.current.manifest.origin.params["dp_clip"] == "0.05"


def test_node_floor_adds_noise_the_server_did_not_ask_for(fed: Federation) -> None:
    floor = DpSettings(clip=0.05, noise=1.0)
    strategy, replies = _dp_round(fed, TrainSettings(rank=2, steps=3, lr=1e-2, batch_size=8), floor)
    assert sorted(strategy.reports[-1].contributors) == ["alice", "bob"]
    for _, content in replies:
        metrics = content.metric_records["metrics"]
        assert metrics["dp-clip"] == 0.05 and metrics["dp-noise-std"] == pytest.approx(0.05)
        factors = record_to_factors(content.array_records[UPDATE_KEY])
        entries = sum(a.numel() + b.numel() for a, b in factors.values())
        # clipped vector (norm <= 0.05) + N(0, 0.05^2) per entry: the norm is about 0.05 * sqrt(entries)
        assert flat_norm(factors) == pytest.approx(0.05 * math.sqrt(entries), rel=0.2)
