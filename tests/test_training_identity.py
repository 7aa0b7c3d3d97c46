"""The same flags and seed train the identical student as the code before models carried their
own preprocessing (commit LEGACY_COMMIT), weight for weight, on mock data; since then the Distiller
has also become Keras-shaped (compute_loss under Keras's own train_step), with the same bits.

The legacy package is taken from git history into a temporary folder and run in a subprocess;
the current one runs in another. Both train tiny students with every kind of teacher signal
(none, cached logits, cached logits with the IG overlay, the teacher online, attention transfer).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit whose Distiller took (student, teacher) and whose students took [0, 1] inputs.
LEGACY_COMMIT = "2ff1470"
METHODS = ("student", "kd", "kd_ig", "kd_online", "kd_at")

TRAIN = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow_datasets as tfds
    import tf_keras as keras
    from kdig_tf import models, pipeline

    out, methods, side, teacher_path = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
    keras.utils.set_random_seed(0)
    if not os.path.exists(teacher_path):
        models.build_teacher(width_multiplier=0.25).save(teacher_path)
    weights = {}

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt("killed after the first epoch")

    def config(method, epochs=2):
        return pipeline.DistillConfig(
            method=method, teacher=teacher_path, train_split="train", val_split="train", epochs=epochs,
            batch_size=4, keep_blocks=4, ig_steps=2, examples_per_shard=5, export_modes="", verbose=0,
            seed=3, p=0.5, at_teacher_layer="features_3_add", at_student_layer="features_3_add",
            store_dir=os.path.join(out, "store"))

    def trained(workdir):
        model = keras.models.load_model(os.path.join(workdir, "student.h5"), compile=False)
        return [w.tolist() for w in model.get_weights()]

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        for method in methods:
            pipeline.run_distillation(config(method), os.path.join(out, method), progress=False)
            weights[method] = trained(os.path.join(out, method))
        # A run killed under one code path and resumed under the other (a campaign that
        # spans the change) must end where an uninterrupted run ends.
        if side == "legacy":
            try:
                pipeline.run_distillation(config("kd_ig", 3), os.path.join(out, "resumed"), progress=False,
                                          extra_callbacks=[Kill()])
            except KeyboardInterrupt:
                pass
            pipeline.run_distillation(config("kd_ig", 3), os.path.join(out, "uninterrupted"), progress=False)
            weights["uninterrupted"] = trained(os.path.join(out, "uninterrupted"))
        else:
            pipeline.run_distillation(config("kd_ig", 3), os.path.join(out, "resumed"), progress=False)
            weights["resumed"] = trained(os.path.join(out, "resumed"))
    with open(os.path.join(out, "weights.json"), "w") as handle:
        json.dump(weights, handle)
""")


def _train(package_parent, out_dir, side):
    os.makedirs(out_dir, exist_ok=True)
    teacher = os.path.join(os.path.dirname(out_dir), "teacher.h5")  # one file (and path) for both sides
    # The legacy package predates the oneDNN default, so both sides get the same kernels from
    # the environment: this test is about the code, not the kernel library.
    env = dict(os.environ, PYTHONPATH=package_parent, TF_ENABLE_ONEDNN_OPTS="1")
    result = subprocess.run([sys.executable, "-c", TRAIN, str(out_dir), ",".join(METHODS), side, teacher],
                            capture_output=True, text=True, env=env, cwd=str(out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out_dir, "weights.json")) as handle:
        return json.load(handle)


def _legacy_package(tmp_path):
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout with history")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    archive = subprocess.run(["git", "-C", ROOT, "archive", LEGACY_COMMIT, "kdig_tf"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {LEGACY_COMMIT} is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(legacy)], input=archive.stdout, check=True)
    return str(legacy)


@pytest.mark.slow
def test_current_code_trains_the_legacy_student_weight_for_weight_and_resumes_legacy_checkpoints(tmp_path):
    legacy = _train(_legacy_package(tmp_path), tmp_path / "legacy_runs", "legacy")
    # The legacy run killed after its first epoch is resumed by the current code.
    shutil.copytree(tmp_path / "legacy_runs" / "resumed", tmp_path / "current_runs" / "resumed")
    assert not (tmp_path / "current_runs" / "resumed" / "student.h5").exists()
    current = _train(ROOT, tmp_path / "current_runs", "current")
    current["uninterrupted"] = current.pop("resumed")
    for method in METHODS + ("uninterrupted",):
        old, new = legacy[method], current[method]
        assert len(old) == len(new), method
        for index, (a, b) in enumerate(zip(old, new)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{method}: weight {index} differs"
