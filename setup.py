"""Builds mtvision._C: the C++ (CPU) kernels always, the CUDA kernels when a toolkit is found.

Environment: CUDA_HOME (found from `nvcc` when unset), FORCE_CUDA=1 (build CUDA kernels even if the
toolkit check fails to find one), MTV_CPU_ONLY=1 (never build them), TORCH_CUDA_ARCH_LIST (GPU
architectures, e.g. "9.0"; default: the GPU present, else "8.0;9.0").
"""

import glob
import os
import sys

from setuptools import find_packages, setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from mtvision._toolkit import find_cuda_home, nvcc_major_version  # noqa: E402


def want_cuda():
    """(use_cuda, cuda_home, reason) — why the CUDA kernels are or are not built."""
    if os.environ.get("MTV_CPU_ONLY") == "1":
        return False, None, "MTV_CPU_ONLY=1"
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        if os.environ.get("FORCE_CUDA") == "1":
            sys.exit("mtvision: FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return False, None, "no CUDA toolkit found (no nvcc; set CUDA_HOME)"
    if torch.version.cuda is None:
        return False, None, f"torch {torch.__version__} is a CPU-only build"
    major = nvcc_major_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if major != torch_major:
        msg = (f"the CUDA toolkit at {cuda_home} is CUDA {major} but torch was built with CUDA "
               f"{torch.version.cuda}; building the CPU kernels only (install a CUDA {torch_major} "
               "toolkit and set CUDA_HOME to build the GPU kernels)")
        print(f"mtvision: WARNING: {msg}", file=sys.stderr)
        return False, None, msg
    return True, cuda_home, f"CUDA toolkit {cuda_home}"


def extension(use_cuda, cuda_home, reason):
    print(f"mtvision: building {'CPU + CUDA' if use_cuda else 'CPU-only'} kernels ({reason})")
    sources = ["csrc/mtvision.cpp", "csrc/python_module.cpp"]
    sources += sorted(glob.glob("csrc/*/*_cpu.cpp")) + sorted(glob.glob("csrc/*/*_common.cpp"))
    # No -std flag: cpp_extension adds the standard the installed torch was built with (a mismatch
    # changes c10's header code paths and breaks exceptions thrown across the library boundary).
    cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    nvcc = ["-O3"]
    if not use_cuda:
        return cpp_extension.CppExtension("mtvision._C", sources, extra_compile_args={"cxx": cxx},
                                          include_dirs=[os.path.join(ROOT, "csrc")])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # A lean toolkit may lack headers that torch's CUDA headers include (cuBLAS, cuSPARSE): the pip
    # nvidia wheels installed beside torch carry them.
    include_dirs = [os.path.join(ROOT, "csrc")]
    for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
        include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
    return cpp_extension.CUDAExtension("mtvision._C", sources, include_dirs=include_dirs,
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc})


USE_CUDA, CUDA_HOME, REASON = want_cuda()
if USE_CUDA:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by cpp_extension when it is imported
from torch.utils import cpp_extension  # noqa: E402

setup(
    packages=find_packages(include=["mtvision", "mtvision.*"]),
    ext_modules=[extension(USE_CUDA, CUDA_HOME, REASON)],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
