"""scripts/train_teacher.py on mock CIFAR-10: a hard kill resumes at the next epoch, a finished
run is not retrained, and a log without a checkpoint is refused."""
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kill: os._exit right after epoch KILL_AFTER_EPOCH was backed up (the last thing an epoch
# does), as a SIGKILL between epochs would.
RUNNER = """
import os, runpy, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow_datasets as tfds
import tf_keras as keras
kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "-1"))

class KillingBackupAndRestore(keras.callbacks.BackupAndRestore):
    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == kill_after:
            os._exit(9)

keras.callbacks.BackupAndRestore = KillingBackupAndRestore
sys.argv = ["train_teacher.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path(os.path.join({root!r}, "scripts", "train_teacher.py"), run_name="__main__")
"""


def _train(tmp_path, workdir, epochs, kill_after=None, extra=()):
    runner = tmp_path / "mock_train_teacher.py"
    runner.write_text(RUNNER.format(root=ROOT))
    env = dict(os.environ, KILL_AFTER_EPOCH=str(-1 if kill_after is None else kill_after))
    flags = [f"--workdir={workdir}", "--train_split=train", "--val_split=train", f"--epochs={epochs}",
             "--batch_size=8", "--width_multiplier=0.25", "--warmup_epochs=0", "--verbose=0", *extra]
    return subprocess.run([sys.executable, str(runner), *flags], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def _logged_epochs(workdir):
    with open(workdir / "history.csv") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_killed_teacher_run_resumes_and_a_finished_one_only_exports(tmp_path):
    workdir = tmp_path / "teacher"
    killed = _train(tmp_path, workdir, epochs=3, kill_after=1)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert _logged_epochs(workdir) == [0, 1]
    assert not (workdir / "teacher.h5").exists()

    resumed = _train(tmp_path, workdir, epochs=3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _logged_epochs(workdir) == [0, 1, 2]  # epochs 0 and 1 were not trained again
    summary = json.loads((workdir / "teacher.json").read_text())
    assert summary["epochs_finished"] == 3 and 0.0 <= summary["val_accuracy"] <= 100.0
    assert (workdir / "teacher.h5").stat().st_size > 0

    again = _train(tmp_path, workdir, epochs=3)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training finished earlier" in again.stdout
    assert _logged_epochs(workdir) == [0, 1, 2]


def test_log_without_a_checkpoint_is_refused(tmp_path):
    workdir = tmp_path / "teacher"
    workdir.mkdir()
    (workdir / "history.csv").write_text("accuracy,epoch,loss,val_accuracy,val_loss\n0.1,0,2.3,0.1,2.3\n")
    refused = _train(tmp_path, workdir, epochs=3)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: StaleRunError:")
    assert _logged_epochs(workdir) == [0]


def test_init_weights_starts_from_the_given_teacher(tmp_path):
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tf_keras as keras

    from kdig_tf import models
    source = models.build_teacher(width_multiplier=0.25)
    source_path = tmp_path / "source.h5"
    source.save(source_path)
    # lr 0 also zeroes the decoupled weight decay: the trainable weights must stay the source's.
    run = _train(tmp_path, tmp_path / "second_cycle", epochs=1,
                 extra=[f"--init_weights={source_path}", "--learning_rate=0"])
    assert run.returncode == 0, run.stderr[-2000:]
    trained = keras.models.load_model(tmp_path / "second_cycle" / "teacher.h5", compile=False)
    for before, after in zip(source.trainable_weights, trained.trainable_weights):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    summary = json.loads((tmp_path / "second_cycle" / "teacher.json").read_text())
    assert summary["flags"]["init_weights"] == str(source_path)

    wider_path = tmp_path / "wider.h5"
    models.build_teacher(width_multiplier=0.5).save(wider_path)
    refused = _train(tmp_path, tmp_path / "refused", epochs=1, extra=[f"--init_weights={wider_path}"])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ShapeMismatchError:")
