"""The test oracles (transformers, diffusers, peft) and our code in one process, each with its own `kernels`.

transformers >= 5 imports the PyPI package `kernels` (Hugging Face's kernel hub) as its modules load; our Triton kernels
are this repository's folder `kernels/`. Python keeps one module per name, so whichever it found first would serve
both, and the oracles' `from kernels import CUDAProperties` fails on ours. `bind_oracles()` loads the oracle module
that imports `kernels` at load time with this repository hidden from `sys.path`, so it binds the PyPI package, then
hands the name back to our folder. Which of the two Python would find first no longer matters to either side.
It also turns hub kernels off: `from_pretrained` would otherwise swap the oracles' own PyTorch layers for
downloaded ones (transformers 5 does so by default), and the oracles are those PyTorch layers.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

OUR_KERNELS = Path(__file__).resolve().parents[1] / "kernels"
# The transformers module that runs `from kernels import ...` when it loads; every transformers model (and so peft
# and diffusers, which import transformers) loads it. Other uses of `kernels` in the oracles are inside functions
# for hub kernels, which the tests never ask for.
BINDS_KERNELS = "transformers.integrations.hub_kernels"


def _take_kernels_modules():
    """Remove `kernels` and its submodules from sys.modules and return them."""
    return {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "kernels"}


def bind_oracles():
    os.environ["USE_HUB_KERNELS"] = "NO"
    if importlib.util.find_spec("transformers") is None or BINDS_KERNELS in sys.modules:
        return
    ours, path = _take_kernels_modules(), list(sys.path)
    sys.path[:] = [p for p in path if (Path(p or os.getcwd()).resolve() / "kernels") != OUR_KERNELS]
    try:
        importlib.import_module(BINDS_KERNELS)
    finally:
        _take_kernels_modules()  # the PyPI package stays alive through the names transformers bound
        sys.modules.update(ours)
        sys.path[:] = path
