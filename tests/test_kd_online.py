"""kd_online: consistent teaching, the frozen teacher sees the student's augmented view."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras

from kdig_tf import data, distiller, models, pipeline
from kdig_tf.errors import InvalidArgumentError
from kdig_tf.io_utils import read_epoch_log


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(path)
    return path


def test_online_kd_term_uses_the_teacher_on_the_batch_the_student_sees():
    teacher = models.build_teacher(width_multiplier=0.25)
    student = models.build_student(2)
    model = distiller.paper_distiller(teacher, student, alpha=0.5, temperature=2.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: the step leaves the weights as they are
    inputs = tf.random.stateless_uniform((6, 32, 32, 3), seed=[1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 5], tf.int64)
    teacher_logits = teacher(data.normalize_teacher(inputs), training=False)
    student_logits = student(inputs, training=True)
    expected_kd = distiller.LogitsDistillation(2.0).per_example(teacher_logits, student_logits)
    expected_ce = keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True)
    logs = model.train_on_batch(inputs, labels, return_dict=True)
    assert logs["kd_loss"] == pytest.approx(float(tf.reduce_mean(expected_kd)), rel=1e-4)
    assert logs["ce_loss"] == pytest.approx(float(tf.reduce_mean(expected_ce)), rel=1e-4)
    # Other inputs give another KD term: the logits are not cached.
    other = model.train_on_batch(tf.reverse(inputs, axis=[2]), labels, return_dict=True)
    assert other["kd_loss"] != pytest.approx(logs["kd_loss"], rel=1e-6)


def test_kd_online_run_reads_no_store(tmp_path, teacher_path):
    config = pipeline.DistillConfig(method="kd_online", teacher=teacher_path, train_split="train",
                                    val_split="train", epochs=1, batch_size=4, keep_blocks=2, export_modes="",
                                    verbose=0)
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        results = pipeline.run_distillation(config, workdir, progress=False)
    assert results["effective"]["alpha"] == pytest.approx(0.01) and results["effective"]["p"] == 0.0
    assert results["store"] is None and not os.path.exists(os.path.join(workdir, "store"))
    history = read_epoch_log(os.path.join(workdir, pipeline.HISTORY))
    assert np.all(np.asarray(history["kd_loss"]) > 0)


def test_kd_online_refuses_the_shuffled_control(teacher_path):
    config = pipeline.DistillConfig(method="kd_online", teacher=teacher_path, cached_targets_order="shuffled")
    with pytest.raises(InvalidArgumentError, match="no cached targets"):
        config.validate()

