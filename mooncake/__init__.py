"""mooncake: fault-tolerant collectives and MoE expert-parallel communication for PyTorch.

Sub-packages, read top-down like a map:

* ``mooncake.pg``      torch.distributed backends ``mooncake-cpu`` / ``mooncake`` and the elastic calls
* ``mooncake.ep``      expert-parallel ``Buffer`` (dispatch / combine)
* ``mooncake.control`` views, epochs, deadlines, wire headers, Store access (shared by every data plane)
* ``mooncake.ref``     the readable reference data plane over UCX (defines the semantics)
* ``mooncake.fast``    the production data plane (shared memory / CUDA IPC)
* ``mooncake.model``   the contract as code: folds, FP8, token placement, global-view models

``MOONCAKE_IMPL`` selects ``ref``, ``fast`` or ``auto`` (default).
"""

__version__ = "0.1.0"
