"""Where the UCX worker listens (``choose_host_ip``): checked without a network (env and routing mocked)."""

import pytest

import mooncake.pg as pg
from mooncake.pg.options import choose_host_ip


def _no_route(addr, port):
    raise AssertionError("the routing call must not be made here")


def _no_iface(name):
    return None


def test_explicit_wins_over_everything():
    env = {"MOONCAKE_HOST_IP": "10.0.0.2", "MASTER_ADDR": "10.0.0.1"}
    assert choose_host_ip(env, "10.0.0.9", ["eth0"], _no_route, lambda n: "10.0.0.3") == \
        ("10.0.0.9", "pg.set_host_ip")


def test_env_wins_over_filter_and_master():
    env = {"MOONCAKE_HOST_IP": "10.0.0.2", "MASTER_ADDR": "10.0.0.1"}
    assert choose_host_ip(env, None, ["eth0"], _no_route, lambda n: "10.0.0.3")[0] == "10.0.0.2"


def test_env_must_be_an_address():
    with pytest.raises(pg.ArgumentError, match="MOONCAKE_HOST_IP expects an IP address string"):
        choose_host_ip({"MOONCAKE_HOST_IP": "hostA"}, None, [], _no_route, _no_iface)


def test_device_filter_address_before_master():
    seen = []
    ip, why = choose_host_ip({"MASTER_ADDR": "10.0.0.1"}, None, ["mlx5_1", "eth1:1"], _no_route,
                             lambda n: seen.append(n) or ("10.1.0.5" if n == "eth1" else None))
    assert (ip, seen) == ("10.1.0.5", ["mlx5_1", "eth1"]) and "eth1" in why


def test_master_addr_routes():
    calls = []

    def route(addr, port):
        calls.append((addr, port))
        return "10.77.0.2"

    ip, why = choose_host_ip({"MASTER_ADDR": "10.77.0.1", "MASTER_PORT": "29500"}, None, ["mlx5_0"], route, _no_iface)
    assert (ip, calls) == ("10.77.0.2", [("10.77.0.1", 29500)]) and "MASTER_ADDR=10.77.0.1" in why


@pytest.mark.parametrize("master", ["127.0.0.1", "localhost", "::1", "127.0.1.1"])
def test_loopback_master_means_single_host(master):
    assert choose_host_ip({"MASTER_ADDR": master}, None, [], _no_route, _no_iface)[0] == "127.0.0.1"


def test_master_that_routes_to_loopback_is_this_host():
    ip, why = choose_host_ip({"MASTER_ADDR": "node0"}, None, [], lambda a, p: "127.0.1.1", _no_iface)
    assert ip == "127.0.0.1" and "is this host" in why


def test_no_route_falls_back_to_loopback_and_says_so():
    def route(addr, port):
        raise OSError(101, "Network is unreachable")

    ip, why = choose_host_ip({"MASTER_ADDR": "10.9.9.9"}, None, [], route, _no_iface)
    assert ip == "127.0.0.1" and "MOONCAKE_HOST_IP" in why


def test_nothing_set_is_loopback():
    assert choose_host_ip({}, None, [], _no_route, _no_iface) == \
        ("127.0.0.1", "loopback: MASTER_ADDR unset (single host)")


def test_real_routing_to_loopback_sends_nothing():
    from mooncake.pg.options import route_source
    assert route_source("127.0.0.1") == "127.0.0.1"


def test_loopback_never_advertised_to_another_host(monkeypatch):
    from mooncake.pg import options
    monkeypatch.delenv("MOONCAKE_FAST_CPU_HOST_ID", raising=False)
    monkeypatch.setattr(options, "listens_on_loopback", lambda: True)
    options.check_not_loopback_for([])  # nobody remote: fine
    with pytest.raises(pg.MooncakeError, match="listens on loopback .* set MOONCAKE_HOST_IP"):
        options.check_not_loopback_for([2, 3])
    monkeypatch.setenv("MOONCAKE_FAST_CPU_HOST_ID", "per-process")  # one host pretending to be many
    options.check_not_loopback_for([2, 3])
    monkeypatch.setattr(options, "listens_on_loopback", lambda: False)
    monkeypatch.delenv("MOONCAKE_FAST_CPU_HOST_ID")
    options.check_not_loopback_for([2, 3])
