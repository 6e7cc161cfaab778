"""selftrain.training.flags: what the accelerator means for ``--trainer.devices``.

The rules themselves are rows of test_bad_inputs.py (through ``selftrain fit``); here, which
accelerator counts as the CPU, as the one resolver decides (``selftrain.precision.device_type``).
"""

import pytest
from helpers import without_gpus
from jsonargparse import Namespace

from selftrain.errors import SelftrainError
from selftrain.training.flags import check_trainer_flags


@pytest.mark.parametrize("accelerator", ["cpu", "CPU", "auto"])
def test_device_indices_on_the_cpu_are_refused(monkeypatch, accelerator):
    without_gpus(monkeypatch)
    trainer = Namespace(accelerator=accelerator, devices="0,1")
    with pytest.raises(SelftrainError, match="on the CPU give a number of processes"):
        check_trainer_flags(trainer, None)


def test_gpu_without_a_gpu_is_not_taken_for_the_cpu(monkeypatch):
    without_gpus(monkeypatch)
    # check_gpu_request refuses it, naming the accelerator
    check_trainer_flags(Namespace(accelerator="gpu", devices="0,1"), None)
