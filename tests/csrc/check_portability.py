"""fastconv's C++ kernel beyond GCC on x86, checked by ``.ci/run`` (not a pytest test: it needs toolchains that a
fresh machine lacks): built by clang (macOS's compiler family) and for 64-bit ARM (Apple silicon, Graviton: GCC's
vector types lower to NEON; cross-compiled, run under qemu), with the flags ``fastconv.cpu_kernels`` builds it with
and OpenMP (2 threads), its entry points must match a double-precision reference in every path of ``conv_path`` and
the one-pass backward, the Winograd rows on planes and in direct tiles among them
(``tests/csrc/dwconv_reference_check.cpp``).

Usage (needs ``apt-get install clang libomp-dev g++-aarch64-linux-gnu qemu-user``):
    python tests/csrc/check_portability.py        # exit status 0: every toolchain built and matched
"""
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from fastconv.cpu_kernels import KERNEL_FLAGS, _SRC  # noqa: E402

CHECK = Path(__file__).resolve().with_name("dwconv_reference_check.cpp")

# name: (compiler, target and OpenMP flags, how to run the program); clang's OpenMP is LLVM's runtime (libomp)
TOOLCHAINS = {
    "clang-x86": ("clang++", ["-march=native", "-fopenmp"], []),
    "gcc-aarch64": ("aarch64-linux-gnu-g++", ["-march=armv8-a", "-fopenmp", "-static"], ["qemu-aarch64"]),
}


def check(name: str, tmp: Path) -> str | None:
    """None when the kernel built by toolchain ``name`` matched the reference in every case, else why not."""
    cxx, flags, runner = TOOLCHAINS[name]
    exe = tmp / name
    try:
        build = subprocess.run([cxx, *KERNEL_FLAGS, *flags, "-o", str(exe), str(CHECK), str(_SRC)],
                               capture_output=True, text=True, timeout=300)
        if build.returncode != 0:
            return f"build failed: {build.stderr[-2000:]}"
        proc = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        return f"{e.filename} not found (apt-get install clang libomp-dev g++-aarch64-linux-gnu qemu-user)"
    print(name, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:], flush=True)
    if proc.returncode != 0 or "OpenMP 1: 120 of 120 cases match" not in proc.stdout:
        return proc.stdout[-3000:] + proc.stderr[-1000:]
    counts = proc.stdout.split("(")[-1].split(", ")  # one-pass backward, Winograd rows on planes, in direct tiles
    if int(counts[0].split()[0]) == 0:
        return "the one-pass backward was not among the cases"
    if int(counts[1].split()[0]) == 0:
        return "the Winograd rows on planes were not among the cases"
    if int(counts[2].split()[0]) == 0:
        return "the Winograd rows in direct tiles were not among the cases"
    if name == "gcc-aarch64" and "variants 8 / 17" not in proc.stdout:
        return "expected no AVX-512 variant there (16 lanes lowered to the target's vectors)"
    return None


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        failed = {name: why for name in TOOLCHAINS if (why := check(name, Path(tmp))) is not None}
    for name, why in failed.items():
        print(f"{name}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
