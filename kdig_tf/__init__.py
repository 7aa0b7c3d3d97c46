"""kdig_tf: knowledge distillation guided by Integrated Gradients, in tf-keras.

Importing the package selects tf-keras (Keras 2) for TensorFlow, because
tensorflow-model-optimization only accepts tf-keras models. This must happen
before TensorFlow is first imported, so it is the first thing the package does.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kdig_tf.errors import KdigError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KdigError", "__version__"]
