"""fastconv's C++ kernel beyond GCC on x86: built by clang (macOS's compiler family) and for 64-bit ARM (Apple
silicon, Graviton: GCC's vector types lower to NEON; cross-compiled, run under qemu), with the flags
``fastconv.cpu_kernels`` builds it with and OpenMP (2 threads), its entry points must match a double-precision
reference in every path of ``conv_path`` and the one-pass backward (``tests/csrc/dwconv_reference_check.cpp``). Each
toolchain is skipped where it is not installed (CI installs them: ``apt-get install clang libomp-dev
g++-aarch64-linux-gnu qemu-user``)."""
import shutil
import subprocess

import pytest

from fastconv.cpu_kernels import KERNEL_FLAGS, _SRC
from conftest import REPO_ROOT

CHECK = REPO_ROOT / "tests" / "csrc" / "dwconv_reference_check.cpp"

# name: (compiler, target and OpenMP flags, how to run the program, the tools it needs); clang's OpenMP is LLVM's
# runtime (libomp: apt-get install libomp-dev)
TOOLCHAINS = {
    "clang-x86": ("clang++", ["-march=native", "-fopenmp"], [], ["clang++"]),
    "gcc-aarch64": ("aarch64-linux-gnu-g++", ["-march=armv8-a", "-fopenmp", "-static"], ["qemu-aarch64"],
                    ["aarch64-linux-gnu-g++", "qemu-aarch64"]),
}


@pytest.mark.parametrize("name", list(TOOLCHAINS))
def test_kernel_matches_the_reference_when_built_elsewhere(name, tmp_path):
    cxx, flags, runner, tools = TOOLCHAINS[name]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install clang libomp-dev g++-aarch64-linux-gnu qemu-user)")
    exe = tmp_path / "check"
    build = subprocess.run([cxx, *KERNEL_FLAGS, *flags, "-o", str(exe), str(CHECK), str(_SRC)], capture_output=True,
                           text=True, timeout=300)
    if build.returncode != 0 and "-lomp" in build.stderr:
        pytest.skip("clang's OpenMP runtime is not installed (apt-get install libomp-dev)")
    assert build.returncode == 0, build.stderr[-3000:]
    proc = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    print(name, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
    assert "OpenMP 1: 96 of 96 cases match" in proc.stdout
    assert int(proc.stdout.split("(")[-1].split()[0]) > 0  # the one-pass backward was among them
    if name == "gcc-aarch64":
        assert "variants 8 / 17" in proc.stdout  # no AVX-512 variant there: 16 lanes lowered to the target's vectors
