"""kdig_tf: knowledge distillation guided by Integrated Gradients, in tf-keras.

Importing the package selects tf-keras (Keras 2) for TensorFlow, because
tensorflow-model-optimization only accepts tf-keras models. This must happen
before TensorFlow is first imported, so it is the first thing the package does.

It also turns on TensorFlow's oneDNN CPU kernels, which the TensorFlow 2.21 wheels
leave off on CPUs without AVX-512 VNNI/BF16: on a 2-core AVX2 CPU they run the 4.1x student's train step 2.0x faster,
and they compute the same functions: their gradients are as close to a float64
reference as the default (Eigen) kernels' are (benchmarks/onednn_agreement.py).
``TF_ENABLE_ONEDNN_OPTS=0`` keeps them off.

Both variables are set only when unset; the oneDNN one only while TensorFlow is
not yet imported, since TensorFlow reads it once. Each training run records which
kernels it ran on (``results.json``, ``machines``).
"""
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from kdig_tf.errors import KdigError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KdigError", "__version__"]
