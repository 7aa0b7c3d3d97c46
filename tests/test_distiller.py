import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from kdig_tf import distiller, models
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError

STUDENT_LOGITS = np.array([[2.0, 1.0, 0.0], [0.5, -1.0, 3.0]], np.float32)
TEACHER_LOGITS = np.array([[3.0, 0.0, -1.0], [0.0, 0.0, 4.0]], np.float32)
LABELS = np.array([0, 2])


def _hand_kd(alpha, t):
    """The loss written out with numpy, term by term."""
    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    p_t, p_s = softmax(TEACHER_LOGITS / t), softmax(STUDENT_LOGITS / t)
    kl = (p_t * np.log(p_t / p_s)).sum(axis=1)
    ce = -np.log(softmax(STUDENT_LOGITS)[np.arange(2), LABELS])
    return np.mean(alpha * t * t * kl + (1 - alpha) * ce), kl, ce


def test_kd_loss_golden_values():
    expected, kl, ce = _hand_kd(0.01, 2.5)
    # Golden numbers computed once with the math module and frozen, so a change of convention is caught.
    np.testing.assert_allclose(kl, [0.0759637, 0.0254617], atol=1e-6)
    np.testing.assert_allclose(ce, [0.4076060, 0.0956743], atol=1e-6)
    loss = distiller.KDLoss(alpha=0.01, temperature=2.5)(LABELS, STUDENT_LOGITS, TEACHER_LOGITS)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (0.4082776 + 0.0963089) / 2, atol=1e-6)


def test_alpha_weights_the_kd_term():
    kd_only = distiller.KDLoss(alpha=1.0, temperature=2.5)(LABELS, STUDENT_LOGITS, TEACHER_LOGITS)
    _, kl, _ = _hand_kd(1.0, 2.5)
    np.testing.assert_allclose(float(kd_only), np.mean(6.25 * kl), rtol=1e-5)


def test_logits_distillation_is_the_temperature_scaled_kl():
    _, kl, _ = _hand_kd(1.0, 2.5)
    term = distiller.LogitsDistillation(2.5).per_example(TEACHER_LOGITS, STUDENT_LOGITS)
    np.testing.assert_allclose(term.numpy(), 6.25 * kl, rtol=1e-5)


def test_loss_objects_config_round_trip():
    loss = distiller.KDLoss(alpha=0.3, temperature=4.0)
    clone = distiller.KDLoss.from_config(loss.get_config())
    assert clone.get_config() == {"alpha": 0.3, "temperature": 4.0}
    for term in (distiller.LogitsDistillation(4.0), distiller.AttentionTransfer("a", "b")):
        config = keras.utils.serialize_keras_object(term)
        assert keras.utils.deserialize_keras_object(config).get_config() == term.get_config()


@pytest.mark.parametrize("kwargs", [dict(alpha=-0.1), dict(alpha=1.5), dict(temperature=0.0), dict(temperature=-1)])
def test_bad_kd_arguments(kwargs):
    with pytest.raises(InvalidArgumentError):
        distiller.KDLoss(**kwargs)


def test_bad_distiller_weights_are_refused():
    student = models.build_student(keep_blocks=2)
    with pytest.raises(InvalidArgumentError):
        distiller.Distiller(None, student, [distiller.LogitsDistillation()], [0.5, 0.5])
    with pytest.raises(InvalidArgumentError):
        distiller.Distiller(None, student, [distiller.LogitsDistillation()], [-1.0])
    with pytest.raises(InvalidArgumentError):
        distiller.Distiller(None, student, student_loss_weight=1.5)
    with pytest.raises(InvalidArgumentError):  # features need the teacher model
        distiller.Distiller(None, student, [distiller.AttentionTransfer("a", "b")])


def test_attention_map_golden():
    features = np.zeros((1, 2, 2, 2), np.float32)
    features[0, 0, 0] = [1.0, 1.0]  # attention 1 at one pixel
    features[0, 1, 1] = [2.0, 0.0]  # attention 2 at another
    expected = np.array([1.0, 0.0, 0.0, 2.0]) / np.sqrt(5.0)
    np.testing.assert_allclose(distiller.attention_map(features).numpy()[0], expected, rtol=1e-6)
    at = distiller.AttentionTransfer("a", "b")
    same = at.per_example(tf.constant(features), tf.constant(features))
    assert float(same[0]) == 0.0
    with pytest.raises(ShapeMismatchError):
        at.per_example(tf.zeros((1, 4, 4, 2)), tf.zeros((1, 2, 2, 2)))


def _tiny_pair(num_classes=10):
    keras.utils.set_random_seed(0)
    return models.build_teacher(num_classes=num_classes, width_multiplier=0.25), \
        models.build_student(keep_blocks=3, num_classes=num_classes)


def _batch(n=8, classes=10):
    rng = np.random.default_rng(0)
    return (rng.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32), rng.integers(0, classes, n),
            rng.normal(size=(n, classes)).astype(np.float32))


def test_train_step_changes_only_student_weights():
    teacher, student = _tiny_pair()
    d = distiller.paper_distiller(teacher, student, alpha=0.5, temperature=2.0, gamma=0.8,
                                  at_layers=("features_3_conv_3", "features_2_conv_3"))
    d.compile(optimizer=keras.optimizers.Adam(1e-2))
    before_teacher = [w.numpy().copy() for w in teacher.weights]
    before_student = [w.numpy().copy() for w in student.trainable_weights]
    x, y, _ = _batch()
    logs = d.train_step((tf.constant(x), tf.constant(y)))
    assert {"loss", "kd_loss", "ce_loss", "at_loss", "accuracy"} <= set(logs)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before_teacher, teacher.weights))
    changed = [not np.array_equal(a, w.numpy()) for a, w in zip(before_student, student.trainable_weights)]
    assert all(changed)


def test_cached_logits_are_used_and_teacher_not_needed():
    _, student = _tiny_pair()
    x, y, cached = _batch()
    d = distiller.paper_distiller(None, student, alpha=1.0, temperature=2.0)
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = d.test_step(({"images": tf.constant(x), "teacher_logits": tf.constant(cached)}, tf.constant(y)))
    logits = student(x, training=False)
    expected = distiller.KDLoss(1.0, 2.0)(y, logits, cached)
    np.testing.assert_allclose(float(logs["loss"]), float(expected), rtol=1e-5)
    with pytest.raises(InvalidArgumentError):  # training KD with neither cache nor teacher
        d.train_step((tf.constant(x), tf.constant(y)))


def test_class_count_mismatch_is_refused():
    teacher, _ = _tiny_pair(num_classes=10)
    with pytest.raises(ShapeMismatchError):
        distiller.Distiller(teacher, models.build_student(keep_blocks=2, num_classes=5))


def test_saved_student_loads_without_kdig_tf(tmp_path):
    teacher, student = _tiny_pair()
    d = distiller.paper_distiller(teacher, student, alpha=0.5, temperature=2.0)
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, _ = _batch()
    d.fit(x, y, epochs=1, batch_size=4, verbose=0)
    path = str(tmp_path / "student.h5")
    d.save(path)
    # The saved student is a pixel model: it takes [0, 255] pixels and scales them itself.
    np.save(tmp_path / "x.npy", x * 255.0)
    np.save(tmp_path / "expected.npy", student.predict(x, verbose=0))
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import numpy as np, tf_keras as keras
        model = keras.models.load_model({path!r}, compile=False)
        assert "kdig_tf" not in sys.modules, "loading imported kdig_tf"
        assert len(model.weights) < 200 and model.output_shape == (None, 10)
        diff = np.abs(model.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)
                      - np.load({str(tmp_path / 'expected.npy')!r})).max()
        assert diff < 1e-5, diff
        print("ok", model.name)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok mobilenetv2_student_k3" in result.stdout


MIRRORED_SCRIPT = textwrap.dedent("""
    import os, json, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_keras as keras
    from kdig_tf import distiller

    def make_student():
        # No BatchNorm: per-replica batch statistics would differ from single-device ones by design.
        inputs = keras.Input((8, 8, 3))  # pixels: the model scales them itself
        x = keras.layers.Rescaling(1 / 255.0)(inputs)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(10)(x))

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    t = rng.normal(size=(16, 10)).astype(np.float32)
    keras.utils.set_random_seed(0)
    initial = make_student().get_weights()
    out = {}
    for name, strategy in [("single", tf.distribute.OneDeviceStrategy("/cpu:0")),
                           ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
        with strategy.scope():
            student = make_student()
            student.set_weights(initial)
            d = distiller.paper_distiller(None, student, alpha=0.3, temperature=2.5)
            d.compile(optimizer=keras.optimizers.SGD(0.5))
        ds = tf.data.Dataset.from_tensor_slices(({"images": x, "teacher_logits": t}, y)).batch(16)
        history = d.fit(ds, epochs=2, verbose=0, shuffle=False)
        out[name] = {"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                     "weights": [w.tolist() for w in student.get_weights()]}
    print(json.dumps(out))
""")


def test_mirrored_strategy_matches_single_device():
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mirrored"]["replicas"] == 2
    # The second epoch's loss is measured after one update: equal only if gradients were scaled right.
    np.testing.assert_allclose(out["mirrored"]["loss"], out["single"]["loss"], atol=1e-5)
    for a, b in zip(out["mirrored"]["weights"], out["single"]["weights"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_transfer_layers_are_matched_by_spatial_size_or_refused():
    teacher, student = _tiny_pair()
    teacher_layer, student_layer = distiller.matching_feature_layers(teacher, student)
    student_size = student.get_layer(student_layer).output_shape[1:3]
    assert teacher.get_layer(teacher_layer).output_shape[1:3] == student_size
    assert student_layer == [layer.name for layer in student.layers if len(layer.output_shape) == 4][-1]
    model = distiller.paper_distiller(teacher, student, alpha=0.5, gamma=0.8)  # layers picked by size
    x, y, _ = _batch()
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    assert "at_loss" in model.test_step((tf.constant(x), tf.constant(y)))

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.Conv2D(4, 5, strides=5)(inputs)  # 7x7: no teacher feature map has that size
    odd = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(pooled)))
    with pytest.raises(distiller.MissingFeatureLayerError, match="spatial size"):
        distiller.paper_distiller(teacher, odd, alpha=0.5, gamma=0.8)
