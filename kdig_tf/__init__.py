"""kdig_tf: knowledge distillation guided by Integrated Gradients, in tf-keras.

Importing the package selects tf-keras (Keras 2) for TensorFlow, because
tensorflow-model-optimization only accepts tf-keras models. This must happen
before TensorFlow is first imported, so it is the first thing the package does,
and it is the only environment variable the package sets (and only when unset).
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from kdig_tf.errors import KdigError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KdigError", "__version__"]
