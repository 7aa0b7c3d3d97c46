import os

# Must precede any TensorFlow import: tfmot only accepts tf-keras (Keras 2) models.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# The package's default, which it can only set when it is imported before TensorFlow.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never touch the network or the shared data unless a test says so.
os.environ.pop("TFDS_DATA_DIR", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def fixed_cpu_competition(monkeypatch):
    """``install(other_cpus, wall_seconds)``: benchmark.CpuCompetition then reports those figures."""
    from kdig_tf import benchmark

    def install(other_cpus, wall_seconds):
        class FixedCompetition:
            def __enter__(self):
                self.other_cpus = other_cpus
                return self

            def __exit__(self, *exc_info):
                return False

            def summary(self):
                return {"other_processes_cpu_seconds": other_cpus * wall_seconds,
                        "other_processes_cpus": other_cpus, "wall_seconds": wall_seconds}

        monkeypatch.setattr(benchmark, "CpuCompetition", FixedCompetition)

    return install


@pytest.fixture(scope="module")
def seeded_teacher_path(tmp_path_factory):
    """A tiny MobileNetV2 teacher (width 0.25), built under seed 0 and saved once per test module."""
    import tf_keras as keras

    from kdig_tf import models

    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    keras.utils.set_random_seed(0)
    models.build_teacher(width_multiplier=0.25).save(path)
    return path
