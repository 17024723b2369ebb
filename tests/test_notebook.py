"""notebooks/quickstart.ipynb runs top to bottom on CPU in a kernel of this interpreter."""

import json
import os
import sys
import time

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
KERNEL = "coder-jax-test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec for exactly this interpreter (.venv's python), found first on JUPYTER_PATH:
  the stock 'python3' may resolve to a user- or system-wide kernel with another Python."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "coder_jax test", "language": "python",
          "env": {"PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  from jupyter_client.kernelspec import KernelSpecManager
  found = KernelSpecManager().get_kernel_spec(KERNEL)
  assert found.argv[0] == sys.executable
  return KERNEL


def _text(cell) -> str:
  out = []
  for o in cell.get("outputs", []):
    if o["output_type"] == "stream":
      out.append(o["text"])
    elif o["output_type"] in ("execute_result", "display_data"):
      out.append(o["data"].get("text/plain", ""))
  return "".join(out)


def test_quickstart_runs(kernel_name):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  t0 = time.perf_counter()
  client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=240,
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  dt = time.perf_counter() - t0
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
  text = "\n".join(_text(c) for c in code)
  assert "checkpoint: " in text and "config.json" in text and "tokenizer.json" in text
  assert "completion: '" in text or 'completion: "' in text
  losses = [float(line.split("loss ")[1].split()[0]) for line in text.splitlines()
            if line.startswith("step ")]
  assert len(losses) == 5 and losses[-1] < losses[0]
  assert "round trip exact: True" in text
  print(f"\nnotebook executed in {dt:.1f} s")
  assert dt < 180
