"""MooncakeBackendOptions and process-wide settings: checked before any communication."""

import pytest
import torch

import mooncake.pg as pg
from mooncake.pg.options import check_for_backend


def test_options_overloads_CPU():
    mask = torch.ones(4, dtype=torch.int32)
    assert pg.MooncakeBackendOptions(mask).max_world_size is None
    assert pg.MooncakeBackendOptions(mask, True).is_extension
    assert pg.MooncakeBackendOptions(mask, False, 4).max_world_size == 4
    assert pg.MooncakeBackendOptions(mask, False, -1).max_world_size is None  # upstream: <= 0 is unset


@pytest.mark.parametrize("tensor,fragment", [
    (torch.ones(4, dtype=torch.int64), "activeRanks must be int."),
    (torch.ones(4, dtype=torch.bool), "activeRanks must be int."),
    (torch.ones(4), "activeRanks must be int."),
    (torch.ones(2, 2, dtype=torch.int32), "must be 1-D"),
    (torch.tensor([1, 2], dtype=torch.int32), "entries must be 0 or 1"),
    ([1, 1], "must be a torch.Tensor"),
])
def test_options_reject_bad_masks_CPU(tensor, fragment):
    with pytest.raises(pg.ArgumentError, match=fragment.replace(".", r"\.")):
        pg.MooncakeBackendOptions(tensor)


def test_options_checked_against_backend_CPU():
    opts = pg.MooncakeBackendOptions(torch.ones(4, dtype=torch.int32), False, 4)
    assert check_for_backend(opts, "cpu", 2) == 4
    assert check_for_backend(None, "cpu", 3) == 3
    with pytest.raises(pg.ArgumentError, match=r"activeRanks must be on GPU\."):
        check_for_backend(opts, "cuda", 2)
    with pytest.raises(pg.ArgumentError, match="activeRanks must be sized to max_world_size when max_world_size is set"):
        check_for_backend(pg.MooncakeBackendOptions(torch.ones(3, dtype=torch.int32), False, 4), "cpu", 2)
    with pytest.raises(pg.ArgumentError, match="max_world_size must be >= process group size"):
        check_for_backend(opts, "cpu", 5)
    with pytest.raises(pg.ArgumentError, match="max_world_size out of range"):
        pg.MooncakeBackendOptions(torch.ones(300, dtype=torch.int32), False, 300)
    with pytest.raises(pg.ArgumentError, match="one entry per rank"):
        check_for_backend(pg.MooncakeBackendOptions(torch.ones(3, dtype=torch.int32)), "cpu", 2)


def test_upstream_only_calls_explain_themselves_CPU():
    with pytest.raises(pg.NotApplicableError, match="does not use Mooncake's TransferEngine"):
        pg.set_transfer_engine(None)
    with pytest.raises(pg.ArgumentError, match="IP address"):
        pg.set_host_ip("not-an-ip")
    with pytest.raises(pg.ArgumentError, match="list of device names"):
        pg.set_device_filter("mlx5_0")


def test_device_filter_from_environment_CPU(monkeypatch):
    monkeypatch.setenv("MOONCAKE_PGTEST_DEVICE_FILTERS", "mlx5_1,mlx5_2")
    assert pg.get_device_filter() == ["mlx5_1", "mlx5_2"]
