import os

# Must precede any TensorFlow import: tfmot only accepts tf-keras (Keras 2) models.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never touch the network or the shared data unless a test says so.
os.environ.pop("TFDS_DATA_DIR", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    yield
