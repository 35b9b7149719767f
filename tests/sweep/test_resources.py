"""--trial-resource: parsed strictly, refused when no node offers it, and in every trial's request."""

import pytest

from sweep import cluster
from sweep.cli import UserError
from sweep.plan import PlannedTrial
from trainers.config import TrialConfig


def planned(device="cpu") -> list:
    cfg = TrialConfig(name="a", index=0, r=8, targets="attention", bits=16, model="random:tiny-llama",
                      dataset="bundled:products-400", device=device)
    return [PlannedTrial(cfg, 1, 10, 0.5)]


@pytest.mark.parametrize("value", ["worker", "=1", "worker=0", "worker=-1", "worker=inf", "worker=x", "GPU=1"])
def test_malformed_values_are_refused(value):
    with pytest.raises(UserError, match=r"^--trial-resource expects NAME=AMOUNT"):
        cluster.parse_resources((value,))


def test_a_resource_no_node_offers_is_refused_and_one_offered_is_requested(monkeypatch):
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "worker": 2.0}},
             {"Alive": False, "Resources": {"CPU": 8.0, "big": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    wanted = cluster.parse_resources(("worker=1",))
    assert wanted == {"worker": 1.0}
    cluster.check_resources(planned(), {}, wanted)
    with pytest.raises(UserError, match=r"^--trial-resource big=1: no node of the Ray cluster offers it"):
        cluster.check_resources(planned(), {}, {"big": 1.0})  # only a dead node had it
    with pytest.raises(UserError, match=r"^--trial-resource worker=3: no node"):
        cluster.check_resources(planned(), {}, {"worker": 3.0})
    request = cluster.trial_resources({}, wanted)({"trial": planned()[0].cfg.to_param()})
    assert request == {"cpu": 1, "gpu": 0, "custom_resources": {"worker": 1.0}}
