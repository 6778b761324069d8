"""Configures the CMake build of csrc/ (library + C++ tests) against the running Python's torch.

    python tools/cmake_configure.py BUILD_DIR

torch's CMake package wants the CUDA toolkit found when torch is a CUDA build, even for CPU-only
code: this passes it the toolkit (from CUDA_HOME or nvcc, as setup.py finds it) and the nvrtc library
that ships in the pip 'nvidia' wheels beside torch.
"""

import glob
import os
import shutil
import subprocess
import sys

import torch

from mtvision._toolkit import find_cuda_home


def main(build_dir):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["cmake", "-S", root, "-B", build_dir, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    cuda_home = find_cuda_home()
    if torch.version.cuda and cuda_home:
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}"]
        site = os.path.dirname(os.path.dirname(torch.__file__))
        nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libnvrtc.so.*")))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # else torch's CMake probes for a GPU
    if os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
        return  # already configured; `cmake --build` re-runs configure when CMakeLists changes
    subprocess.run(args, check=True, env=env)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build-cmake")
