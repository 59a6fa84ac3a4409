"""The production data plane: shared memory (CPU) and CUDA IPC + kernels (``mooncake.fast.cuda``).

Sub-packages are imported only when selected (``MOONCAKE_IMPL=fast`` or ``auto``), so a machine without a
compiler or GPU still imports ``mooncake``.
"""
