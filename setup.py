"""Wheel-build steps that pyproject.toml cannot say: the metadata lives there, this file only adds

* the C / CUDA sources as package data (``csrc/`` -> ``mooncake/_csrc/``), so an installed package can
  compile its CUDA kernels for the GPU it finds, and the doctor can name what is there;
* the CPU plane's helper prebuilt (``mooncake/fast/cpu/libmooncake_shm.so``, a plain shared library
  loaded with ctypes, compiled with the portable flags of ``mooncake/_nativebuild.py``: no
  ``-march=native``), so an installed wheel needs no compiler at install or run time;
* the wheel tag ``py3-none-<platform>``: the library does not use Python's C API, so one wheel per
  platform serves every Python the metadata allows.

Editable installs (``pip install -e .``) skip both: the checkout's ``csrc/`` is used as it is and the
helper is compiled on first use into the user's cache.  Without a C compiler the wheel is still built
(the helper is then compiled on first use where a compiler exists, else the torch fallbacks run);
``MOONCAKE_REQUIRE_NATIVE=1`` makes that an error instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_mooncake_nativebuild", HERE / "mooncake" / "_nativebuild.py")
nb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nb)


class build_py(_build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "mooncake"
        csrc = HERE / "csrc"
        for rel in nb.PACKAGED_FILES + tuple(p.name for p in sorted(csrc.glob("*.cuh"))):
            dst = package / "_csrc" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(csrc / rel, dst)
        self._build_cpu_helper(package, csrc / nb.CPU_SOURCE)

    def _build_cpu_helper(self, package: Path, source: Path) -> None:
        out = package / "fast" / "cpu" / nb.CPU_LIB
        if not sys.platform.startswith("linux"):
            self.announce(f"mooncake: no CPU helper on {sys.platform} (the shared-memory plane needs Linux)", 2)
            return
        try:
            cc = nb.c_compiler()
            version = nb.compiler_version(cc)
            nb.compile_c(source, out, cc)
            nb.write_build_info(out, source, cc, version)
        except nb.NativeProblem as exc:
            if os.environ.get("MOONCAKE_REQUIRE_NATIVE") == "1":
                raise SystemExit(f"mooncake: cannot build the CPU helper: {exc} (fix: {exc.fix})") from None
            self.warn(f"mooncake: the wheel ships no prebuilt CPU helper ({exc}); it will be compiled on first "
                      "use where a C compiler exists")
            return
        self.announce(f"mooncake: built {out.name} with {' '.join(cc)} {' '.join(nb.CPU_FLAGS)}", 2)


class BinaryDistribution(Distribution):
    """A platform wheel: it ships a compiled library (not a Python extension module)."""

    def has_ext_modules(self) -> bool:
        return True


class bdist_wheel(_bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(distclass=BinaryDistribution, cmdclass={"build_py": build_py, "bdist_wheel": bdist_wheel})
