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
