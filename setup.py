"""Install userllm (one distribution; ``kernels/`` and ``profiling/`` ship as ``userllm.kernels`` and
``userllm.profiling`` through the relative symlinks inside ``userllm/``).

Torch is a run-time requirement only: build with ``pip install --no-build-isolation`` so the build uses
the torch already installed, and never a fresh one pulled into an isolated build environment.

Native ops (``kernels/csrc/``, built by ``CMakeLists.txt``), driven the way vLLM's setup.py does it: a
``build_ext`` subclass configures and builds the CMake project (ninja when available) and copies the
resulting torch op library to ``userllm/kernels/_C.<python-tag>.so``, inside the wheel or, for an
editable install, into the source tree (``kernels/`` through the symlink). ``kernels/native.py`` loads it.

Environment:
    USERLLM_SKIP_NATIVE=1     do not build the native library (the ops use Triton / the reference).
    USERLLM_REQUIRE_NATIVE=1  a failed native build fails the install (CI); otherwise it warns and goes on.
    MAX_JOBS=N                parallel compile jobs (default: CPU count).
    CMAKE_ARGS="..."          extra CMake arguments, e.g. "-DUSERLLM_CUDA=OFF -DCMAKE_CUDA_ARCHITECTURES=90".
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class _Skipped(Exception):
    pass


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class CMakeExtension(Extension):
    """An extension whose single output is built by CMake from ``cmake_lists_dir`` (no setuptools sources)."""

    def __init__(self, name: str, cmake_lists_dir: Path = ROOT, output: str = "_C.so") -> None:
        super().__init__(name, sources=[])
        self.cmake_lists_dir = Path(cmake_lists_dir)
        self.output = output  # file name CMake produces in its build directory


class CMakeBuild(build_ext):
    def run(self) -> None:
        inplace = self.inplace
        try:
            if _env_flag("USERLLM_SKIP_NATIVE"):
                raise _Skipped
            super().run()
        except Exception as exc:  # no cmake, no compiler, compile error: install without the native ops
            self.inplace = inplace  # build_ext.run clears it while building and restores it only on success
            if _env_flag("USERLLM_REQUIRE_NATIVE") and not isinstance(exc, _Skipped):
                raise
            self._remove_outputs()
            self.extensions = []  # nothing to copy or install
            if isinstance(exc, _Skipped):
                print("userllm: USERLLM_SKIP_NATIVE is set: the native op library is not built", file=sys.stderr)
                return
            print(f"\nWARNING: userllm: the native op library was not built ({exc}). userllm still works: "
                  "embedding_concat falls back to Triton / the PyTorch reference. Install cmake and a C++20 "
                  "compiler and reinstall to build it (pip install -v shows the build log).\n",
                  file=sys.stderr, flush=True)

    def _remove_outputs(self) -> None:
        """Delete libraries left by an earlier build, which would otherwise be installed (or, in an editable
        install, loaded) as if this build had produced them."""
        inplace, self.inplace = self.inplace, False
        try:
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                regular = Path(self.get_ext_fullpath(ext.name))
                stale = [regular]
                if inplace:
                    package = build_py.get_package_dir(ext.name.rpartition(".")[0])
                    stale.append(Path(package) / regular.name)
                for path in stale:
                    path.unlink(missing_ok=True)
        finally:
            self.inplace = inplace

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake was not found on PATH")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        args = [cmake, "-S", str(ext.cmake_lists_dir), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={config}",
                f"-DPython_EXECUTABLE={sys.executable}"]
        # A build directory keeps the generator it was first configured with.
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(args)
        subprocess.check_call([cmake, "--build", str(build_dir), "--config", config, "-j", jobs])
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / ext.output, dest)


readme = ROOT / "README.md"

setup(
    name="userllm",
    version="0.1.0",
    description="User-LLM: contextualizing LLMs with user embeddings, with fused kernels",
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["userllm", "userllm.*"]),
    ext_modules=[CMakeExtension("userllm.kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.46",
        "peft>=0.13",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "nvidia-ml-py>=12",
        "tqdm>=4.66",
        "numpy>=1.24",
        "pyarrow>=14",
        "pyyaml>=6",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4", "pytest-timeout>=2"]},
)
