"""Every notebook in notebooks/ runs top to bottom in tiny mode, and is committed without outputs."""
import json
import os
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(name for name in os.listdir(NOTEBOOK_DIR) if name.endswith(".ipynb"))
KERNEL_NAME = "kdig-test-python"
CELL_TIMEOUT = 600


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {index} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{name} cell {index} has an execution count"
    assert any("tiny.tiny_mode(" in cell.source for cell in notebook.cells), f"{name} has no tiny-mode switch"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A private kernelspec that runs this very interpreter (whatever other specs are installed)."""
    folder = tmp_path_factory.mktemp("kernels")
    spec_dir = folder / KERNEL_NAME
    spec_dir.mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "kdig_tf test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(folder)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_tiny_mode(name, tmp_path, kernel_dir, monkeypatch):
    # Connection files and IPython's profile go to tmp, not $HOME.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    path = os.path.join(NOTEBOOK_DIR, name)
    with open(path, "rb") as handle:
        committed = handle.read()
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, KDIG_TINY="1", KDIG_WORK_ROOT=str(tmp_path / "work"), KDIG_REPO_ROOT=ROOT)
    for variable in ("TFDS_DATA_DIR", "KDIG_TEACHER", "MPLBACKEND"):  # no real data; inline plots
        env.pop(variable, None)
    manager = AsyncKernelManager(kernel_name=KERNEL_NAME,
                                 kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    started = time.time()
    try:
        client.execute(env=env, cleanup_kc=True)  # we own the manager: shut the kernel down
    except CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{str(err)[-4000:]}")
    print(f"{name}: {time.time() - started:.0f} s")
    # The executed copy lives only in memory: notebooks/ is never written.
    with open(path, "rb") as handle:
        assert handle.read() == committed


def test_tiny_mode_reads_the_environment(monkeypatch):
    from kdig_tf import tiny

    monkeypatch.delenv("KDIG_TINY", raising=False)
    assert tiny.tiny_mode(False) is False and tiny.tiny_mode(True) is True
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False), ("off", False)]:
        monkeypatch.setenv("KDIG_TINY", value)
        assert tiny.tiny_mode(not expected) is expected


def test_repo_root_work_root_and_teacher_lookup(monkeypatch, tmp_path):
    from kdig_tf import tiny

    monkeypatch.delenv("KDIG_REPO_ROOT", raising=False)
    monkeypatch.delenv("KDIG_WORK_ROOT", raising=False)
    monkeypatch.delenv("KDIG_TEACHER", raising=False)
    assert tiny.repo_root(start=os.path.join(ROOT, "notebooks")) == ROOT
    work = tiny.work_root(True)
    assert os.path.isdir(work) and not work.startswith(ROOT)
    os.rmdir(work)
    monkeypatch.setenv("KDIG_WORK_ROOT", str(tmp_path / "work"))
    assert tiny.work_root(False, ROOT) == str(tmp_path / "work")
    assert tiny.find_teacher(None, str(tmp_path)) is None
    trained = tmp_path / "quickstart" / "teacher.h5"
    trained.parent.mkdir()
    trained.write_bytes(b"x")
    assert tiny.find_teacher(None, str(tmp_path)) == str(trained)
    monkeypatch.setenv("KDIG_TEACHER", str(trained))
    assert tiny.find_teacher(ROOT, None) == str(trained)
