"""Run settings: defaults that adapt to the run, and values the user gave that cannot work."""
import logging

import pytest

from wecolora.config import DistillConfig, resolve_warmup
from wecolora.errors import UserError
from wecolora.train.pretrain import PretrainConfig


@pytest.mark.parametrize("epochs, warmup", [(1, 0), (2, 1), (3, 2), (10, 2)])
def test_default_warmup_is_the_papers_two_epochs_shortened_to_fit(epochs, warmup):
    config = DistillConfig(teacher="bundled", data="mnist-5k", output="run", epochs=epochs)
    assert config.warmup_epochs == warmup


def test_the_resolved_warmup_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="wecolora"):
        DistillConfig(teacher="bundled", data="mnist-5k", output="run", epochs=2)
    assert [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()] == ["warmup shortened to 1 epoch to fit 2 epochs"]


def test_a_warmup_the_user_gave_that_does_not_fit_says_what_would():
    with pytest.raises(UserError, match=r"--warmup-epochs 2 does not fit --epochs 2: .*--warmup-epochs 1 or less"):
        DistillConfig(teacher="bundled", data="mnist-5k", output="run", epochs=2, warmup_epochs=2)
    with pytest.raises(UserError, match="--warmup-epochs -1 is invalid"):
        resolve_warmup(-1, 5, 2)
    assert DistillConfig(teacher="bundled", data="mnist-5k", output="run", epochs=2, warmup_epochs=0).warmup_epochs == 0


def test_pretrain_warmup_default_is_shortened_and_a_given_one_checked():
    assert PretrainConfig(data="fashion-mnist", output="run", epochs=3).warmup_epochs == 2
    assert PretrainConfig(data="fashion-mnist", output="run", epochs=100).warmup_epochs == 5
    with pytest.raises(UserError, match="--warmup-epochs 5 does not fit --epochs 3"):
        PretrainConfig(data="fashion-mnist", output="run", epochs=3, warmup_epochs=5)


WIDTH_AND_BUDGET_CASES = [
    # (settings, fragment of the one-line refusal)
    ({"embed_dim": 0}, "--embed-dim 0 is invalid: expected a positive integer"),
    ({"mlp_hidden": -4}, "--mlp-hidden -4 is invalid"),
    ({"width_ratio": 1.5}, "--width-ratio 1.5 is invalid: expected a fraction in (0, 1]"),
    ({"width_ratio": 0.5, "mlp_hidden": 64}, "--width-ratio 0.5 cannot be combined with --embed-dim, --heads or"),
    ({"width_ranking": "random"}, "--width-ranking 'random' is invalid: expected one of activation, uniform"),
    ({"width_loss": "cosine"}, "--width-loss 'cosine' is invalid: expected one of kept, projection"),
    ({"speedup": 2, "params": 1e6}, "give one budget, not --speedup and --params"),
    ({"latency_ms": -1}, "--latency-ms -1 is invalid: expected a positive number"),
    ({"budget_batch_size": 0}, "--budget-batch-size 0 is invalid"),
    ({"keep": "0,0,1,2,3,4"}, "--keep 0,0,1,2,3,4 names block(s) 0 more than once"),
]


@pytest.mark.parametrize("settings, fragment", WIDTH_AND_BUDGET_CASES)
def test_width_and_budget_settings_are_checked_once(settings, fragment):
    with pytest.raises(UserError) as err:
        DistillConfig(teacher="bundled", data="mnist-5k", output="run", **settings)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_budget_and_widths_are_refused_from_the_user_but_held_once_resolved():
    from wecolora.config import check_budget

    resolved = DistillConfig(teacher="bundled", data="mnist-5k", output="run", speedup=2.0, embed_dim=64)
    assert resolved.budget() == ("speedup", 2.0) and resolved.width_given()
    with pytest.raises(UserError, match="--speedup chooses the student's shape, so it cannot be combined with --embed-dim"):
        check_budget(resolved)


def test_plan_settings():
    from wecolora.config import PlanConfig

    assert PlanConfig(teacher="bundled", keep="0,3,7").keep == "0,3,7"
    for settings, fragment in (({"keep": "auto"}, "--keep 'auto' is invalid"), ({"runtime": "tvm"}, "--runtime 'tvm'"),
                               ({"embed_dims": [64, 0]}, "--embed-dims [64, 0] is invalid"),
                               ({"speedup": 2, "latency_ms": 3}, "give one budget")):
        with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            PlanConfig(teacher="bundled", **settings)
