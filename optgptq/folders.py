"""Writing a model folder so that it appears whole or not at all.

Every folder the project writes (the default model's HF folder, converted and quantized
checkpoints) is built in a temporary sibling and renamed into place when complete: an
interrupted run never leaves a folder that looks valid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; when the block completes, rename it to
    ``out`` (removing an existing ``out`` first if ``replace``). On error it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if replace and out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
