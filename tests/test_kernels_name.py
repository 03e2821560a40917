"""Our `kernels/` folder and the PyPI package `kernels` (which transformers requires) share a name: each side
gets its own, in the test process (tests/oracles.py) and in every entry point run as a user runs it."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = str(ROOT / "kernels" / "__init__.py")
# Printed by every process at exit: which `kernels` package it loaded (its submodules come from the same folder).
REPORT = ("import atexit, sys\natexit.register(lambda: print('KERNELS', repr(getattr(sys.modules.get('kernels'), "
          "'__file__', None)), file=sys.stderr))\n")
SCRIPTS = ["train.py", "sample.py", "convert.py", "prep_data.py"]
BENCH = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


@pytest.fixture(scope="module")
def pypi_kernels():
    """The installed PyPI package's __init__.py: the tests below are only worth something while it is installed."""
    dist = importlib.metadata.distribution("kernels")  # transformers requires it; requirements-dev.txt pins it
    return str(dist.locate_file("kernels/__init__.py"))


def loaded_kernels(tmp_path, *args):
    """Run `python *args` from an empty folder, the way a user would; the `kernels` package it loaded."""
    (tmp_path / "sitecustomize.py").write_text(REPORT)
    run = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    lines = [line for line in run.stderr.splitlines() if line.startswith("KERNELS ")]
    assert len(lines) == 1, run.stderr[-2000:]
    return eval(lines[0].removeprefix("KERNELS ")), run


def test_the_oracles_and_our_code_each_have_their_own_kernels(pypi_kernels):
    import model  # noqa: F401  (imports ours)
    from transformers.integrations import hub_kernels

    assert sys.modules["kernels"].__file__ == OURS
    assert hub_kernels.get_kernel_hub.__code__.co_filename.startswith(str(Path(pypi_kernels).parent))


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_points_import_our_kernels(tmp_path, pypi_kernels, script):
    loaded, run = loaded_kernels(tmp_path, str(ROOT / script), "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert loaded == OURS


@pytest.mark.parametrize("script", BENCH)
def test_bench_scripts_import_our_kernels(tmp_path, pypi_kernels, script):
    """Their imports only (their main needs a GPU)."""
    loaded, run = loaded_kernels(tmp_path, "-c", f"import runpy; runpy.run_path({str(ROOT / 'bench' / script)!r})")
    assert run.returncode == 0, run.stderr[-2000:]
    assert loaded == OURS


def test_our_code_refuses_the_other_kernels_loaded_first(tmp_path, pypi_kernels):
    loaded, run = loaded_kernels(tmp_path, "-c", f"import kernels, sys; sys.path.append({str(ROOT)!r}); import model")
    assert run.returncode == 1 and loaded == pypi_kernels
    assert "another package of that name (PyPI's `kernels`" in run.stderr and "tests/oracles.py" in run.stderr
