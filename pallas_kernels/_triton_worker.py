"""Compiles one Triton IR module (MLIR bytecode) to an sm_90a cubin and prints its resources as
JSON. Run as a script in its own process with only triton importable (compile_report.py does):
triton's native library crashes a process that has loaded TensorFlow's, and torch imports
triton whenever it can find it, so triton is installed outside the project's site-packages.

    python _triton_worker.py MODULE.mlirbc NUM_WARPS NUM_STAGES
"""

import json
import os
import subprocess
import sys


def main(path: str, num_warps: int, num_stages: int) -> dict:
  import triton
  from triton._C.libtriton import ir, nvidia
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import get_ptxas
  base = os.path.splitext(path)[0]
  # triton.compile reads .ttir as text: parse the bytecode with triton's dialects, write text.
  context = ir.context()
  ir.load_dialects(context)
  nvidia.load_dialects(context)
  with open(base + ".ttir", "w") as f:
    f.write(ir.parse_mlir_module(path, context).str())
  compiled = triton.compile(base + ".ttir", target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
  with open(base + ".ptx", "w") as f:
    f.write(compiled.asm["ptx"])
  # triton ran ptxas for that cubin but keeps its log: rerun it with the same flags (less
  # -lineinfo, which changes no figure) for the registers and spills.
  cmd = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
         base + ".ptx", "-o", base + ".cubin"]
  run = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return {"shared": int(compiled.metadata.shared), "ptxas_log": run.stdout + run.stderr,
          "triton": triton.__version__}


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
