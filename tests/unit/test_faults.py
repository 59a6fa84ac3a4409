"""The ``stall`` fault stops the thread that reached the point at once, not some moments later."""

import multiprocessing as mp
import time

from mooncake.control import faults
from mooncake.control.procs import process_state

STALL_S = 0.8
ROUNDS = 4


def _child(reached, passed) -> None:
    import threading

    def reach_point() -> None:
        for _ in range(ROUNDS):
            faults.arm("after_data", "stall", stall_s=STALL_S)
            reached.value += 1
            faults.hit("after_data")
            passed.value += 1  # what a stalled rank must not do before it wakes (e.g. send its DONEs)

    worker = threading.Thread(target=reach_point)
    worker.start()
    worker.join()  # the main thread waits in the kernel, as a rank's main thread often does


def _wait_for(condition, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_stall_holds_the_calling_thread_back():
    ctx = mp.get_context("spawn")
    reached, passed = ctx.Value("i", 0, lock=False), ctx.Value("i", 0, lock=False)
    child = ctx.Process(target=_child, args=(reached, passed), daemon=True)
    child.start()
    try:
        for n in range(1, ROUNDS + 1):
            assert _wait_for(lambda: reached.value == n, 30), f"round {n}: the child never reached the point"
            time.sleep(STALL_S / 3)
            assert process_state(child.pid) == "T", f"round {n}: the child is not stopped"
            assert passed.value == n - 1, f"round {n}: the stalled thread ran past the fault point"
            assert _wait_for(lambda: passed.value == n, 10 * STALL_S), f"round {n}: the child never woke"
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
