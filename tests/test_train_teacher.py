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


def _train(tmp_path, workdir, epochs, kill_after=None):
    runner = tmp_path / "mock_train_teacher.py"
    runner.write_text(RUNNER.format(root=ROOT))
    env = dict(os.environ, KILL_AFTER_EPOCH=str(-1 if kill_after is None else kill_after))
    flags = [f"--workdir={workdir}", "--train_split=train", "--val_split=train", f"--epochs={epochs}",
             "--batch_size=8", "--width_multiplier=0.25", "--warmup_epochs=0", "--verbose=0"]
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
