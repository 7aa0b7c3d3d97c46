"""scripts/precompute_ig.py in a subprocess that mocks CIFAR-10 with tfds.testing."""
import json
import os
import subprocess
import sys

import pytest

from kdig_tf import models, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_RUNNER = """
import os, runpy, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow_datasets as tfds
sys.argv = ["precompute_ig.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path(os.path.join({root!r}, "scripts", "precompute_ig.py"), run_name="__main__")
"""


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(path)
    return path


def _precompute(tmp_path, *flags):
    runner = tmp_path / "mock_precompute.py"
    runner.write_text(MOCK_RUNNER.format(root=ROOT))
    return subprocess.run([sys.executable, str(runner), "--split=train", "--examples_per_shard=5", *flags],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("map_encoding", ["float16", records.NO_MAPS])
def test_precompute_writes_a_validated_store_with_or_without_maps(tmp_path, teacher_path, map_encoding):
    store_dir = tmp_path / "store"
    result = _precompute(tmp_path, f"--teacher={teacher_path}", f"--output_dir={store_dir}", "--steps=2",
                         f"--map_encoding={map_encoding}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12 examples of train" in result.stdout
    store = records.Store(str(store_dir))
    assert store.num_examples == 12 and store.has_maps == (map_encoding != records.NO_MAPS)
    manifest = json.loads((store_dir / records.MANIFEST).read_text())
    assert (manifest["ig"] is None) == (map_encoding == records.NO_MAPS)


def test_unknown_map_encoding_exits_non_zero_and_writes_nothing(tmp_path, teacher_path):
    store_dir = tmp_path / "store"
    result = _precompute(tmp_path, f"--teacher={teacher_path}", f"--output_dir={store_dir}", "--map_encoding=png")
    assert result.returncode != 0
    assert "map_encoding" in result.stderr
    assert not os.path.exists(store_dir / records.MANIFEST)


def test_a_packed_store_is_unpacked_without_the_teacher(tmp_path, teacher_path):
    store_dir, pack = tmp_path / "store", tmp_path / "store.npz"
    built = _precompute(tmp_path, f"--teacher={teacher_path}", f"--output_dir={store_dir}", "--steps=2",
                        f"--pack={pack}")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "packed ->" in built.stdout and pack.exists()
    unpacked = _precompute(tmp_path, f"--unpack={pack}", f"--output_dir={tmp_path / 'unpacked'}",
                           "--teacher=/nonexistent.h5")
    assert unpacked.returncode == 0, unpacked.stderr[-3000:]
    assert "unpacked 12 examples of train" in unpacked.stdout
    assert (tmp_path / "unpacked" / records.MANIFEST).read_text() == (store_dir / records.MANIFEST).read_text()
    missing = _precompute(tmp_path, f"--unpack={tmp_path / 'nothing.npz'}", f"--output_dir={tmp_path / 'none'}")
    assert missing.returncode == 2 and "StoreError" in missing.stderr
    assert not (tmp_path / "none" / records.MANIFEST).exists()
