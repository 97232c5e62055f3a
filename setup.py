"""Builds gala_kernels._C with CMake + Ninja (the vLLM pattern: setup.py drives CMake).

Install for development with ``pip install --no-build-isolation -e .`` so that the extension
is compiled against the torch already installed (build isolation would download another).
The device comes from how torch was built (CMakeLists.txt), never from the GPU of this machine.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("GALA_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('GALA_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("GALA_CUDA_ARCHS"):
            configure.append(f"-DGALA_CUDA_ARCHS={os.environ['GALA_CUDA_ARCHS']}")
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


setup(
    ext_modules=[CMakeExtension("gala_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
