"""A tiny prepared tfds image dataset for tests that need real tfds files (splits, other processes).

Once prepared, tfds reads it from ``data_dir`` without this module, so a subprocess can load it.
"""
import kdig_tf  # noqa: F401

import numpy as np
import tensorflow_datasets as tfds

NAME = "kdig_tiny_images"
NUM_CLASSES = 10


class KdigTinyImages(tfds.core.GeneratorBasedBuilder):
    """CIFAR-shaped random images with an ``id`` feature; only a ``train`` split."""

    VERSION = tfds.core.Version("1.0.0")
    IMAGE_SIZE = 32
    NUM_CLASSES = NUM_CLASSES

    def __init__(self, *, num_examples=12, **kwargs):
        self._num_examples = num_examples
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(self.IMAGE_SIZE, self.IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for index in range(self._num_examples):
            yield index, {
                "id": f"train_{index:05d}",
                "image": rng.integers(0, 256, (self.IMAGE_SIZE, self.IMAGE_SIZE, 3), dtype=np.uint8),
                "label": index % self.NUM_CLASSES,
            }


class KdigTinyImages64(KdigTinyImages):
    """Not CIFAR's shape: 64x64 images of 5 classes."""

    IMAGE_SIZE = 64
    NUM_CLASSES = 5


def prepare(data_dir, num_examples=12, builder=KdigTinyImages):
    """Write the dataset under ``data_dir`` and return its name (offline: no GCS lookup)."""
    instance = builder(data_dir=str(data_dir), num_examples=num_examples)
    instance.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return instance.name
