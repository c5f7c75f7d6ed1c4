"""The kernels/ folder never takes the name ``kernels`` from Hugging Face's package.

transformers imports ``kernels`` (Hugging Face's kernel hub) when it is installed, and newer
transformers releases require it. Processes that put the repository root first on sys.path
(``python -m pytest``, ``serve run``'s app dir, the bench scripts) must still import transformers'
layers and this project's kernels, as ``optgptq_kernels``.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
sys.path.insert(0, {root!r})
import importlib.util
import transformers.activations  # imports `kernels` when Hugging Face's package is installed
import optgptq_kernels.ops
from optgptq.models.llama import LlamaForCausalLM
spec = importlib.util.find_spec("kernels")
origin = (spec.origin or "") if spec else ""
print("kernels:", origin or "namespace" if spec else "absent")
assert not origin.startswith({kernels!r}), origin
"""


def test_repository_root_on_sys_path_does_not_shadow_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py would make the folder a regular package named `kernels` wherever "
        "the repository root is on sys.path")
    code = PROBE.format(root=str(ROOT), kernels=str(ROOT / "kernels"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if importlib.util.find_spec("kernels") is not None:  # Hugging Face's package is installed
        assert str(ROOT) not in done.stdout.split("kernels:")[-1]
