import numpy as np
import pytest

from kdig_tf import models
from kdig_tf.errors import InvalidArgumentError, UnknownKeyError


@pytest.fixture(scope="module")
def teacher():
    return models.build_teacher()


def test_teacher_parameter_count(teacher):
    assert models.count_trainable_params(teacher) == models.TEACHER_PARAMS == 2_236_682


@pytest.mark.parametrize("keep_blocks, expected", sorted(models.STUDENT_PARAMS.items()))
def test_student_parameter_counts(keep_blocks, expected):
    student = models.build_student(keep_blocks=keep_blocks)
    assert models.count_trainable_params(student) == expected


def test_all_eight_students_are_listed():
    assert sorted(models.STUDENT_PARAMS) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert models.STUDENT_PARAMS[14] == 543_498  # the paper's 4.1x student


def test_output_shapes(teacher):
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    assert teacher(images, training=False).shape == (3, 10)
    student = models.build_student(keep_blocks=6, num_classes=7)
    assert student(images, training=False).shape == (3, 7)
    assert teacher.input_shape == (None, 32, 32, 3)


@pytest.mark.parametrize("keep_blocks, channels, size", [(2, 16, 32), (4, 24, 32), (6, 32, 16), (14, 96, 8)])
def test_student_feature_map_before_pooling(keep_blocks, channels, size):
    student = models.build_student(keep_blocks=keep_blocks)
    assert student.get_layer("avgpool").input_shape == (None, size, size, channels)


def test_compression_factor_lookup():
    assert models.COMPRESSION_FACTORS["4.12x"] == 14
    assert models.resolve_keep_blocks(compression="4.12x") == 14
    assert models.resolve_keep_blocks(compression=4.12) == 14
    assert models.resolve_keep_blocks(keep_blocks=6) == 6
    student = models.build_student(compression="4.12x")
    assert models.count_trainable_params(student) == models.STUDENT_PARAMS[14]
    # every factor is the teacher/student ratio of its own entry
    for name, keep in models.COMPRESSION_FACTORS.items():
        assert name == f"{models.TEACHER_PARAMS / models.STUDENT_PARAMS[keep]:.2f}x"


def test_unknown_compression_factor():
    with pytest.raises(UnknownKeyError, match="3.00x"):
        models.resolve_keep_blocks(compression="3.00x")


@pytest.mark.parametrize("kwargs", [{}, {"keep_blocks": 6, "compression": "4.12x"}, {"keep_blocks": 0},
                                    {"keep_blocks": 19}])
def test_bad_keep_blocks(kwargs):
    with pytest.raises(InvalidArgumentError):
        models.resolve_keep_blocks(**kwargs)


def test_width_multiplier_changes_params():
    full = models.count_trainable_params(models.build_student(keep_blocks=6))
    half = models.count_trainable_params(models.build_student(keep_blocks=6, width_multiplier=0.5))
    wide = models.count_trainable_params(models.build_student(keep_blocks=6, width_multiplier=1.5))
    assert half < full < wide
    assert models.build_student(keep_blocks=2, width_multiplier=0.5).get_layer("features_0_0").filters == 16


def test_stem_stride_2_keeps_parameters_and_quarters_the_pixels_of_every_block():
    from kdig_tf import benchmark

    cifar = models.build_student(keep_blocks=14)
    strided = models.build_student(keep_blocks=14, stem_stride=2)
    assert models.count_trainable_params(strided) == models.count_trainable_params(cifar) == 543_498
    assert strided.name == "mobilenetv2_student_k14_s2"
    assert strided.get_layer("features_13_add").output_shape[1:3] == (4, 4)
    assert cifar.get_layer("features_13_add").output_shape[1:3] == (8, 8)
    ratio = benchmark.count_macs(cifar) / benchmark.count_macs(strided)
    assert 3.5 < ratio < 4.1
    with pytest.raises(InvalidArgumentError, match="stem_stride"):
        models.build_student(keep_blocks=14, stem_stride=4)


def test_bad_width_or_classes():
    with pytest.raises(InvalidArgumentError):
        models.build_student(keep_blocks=2, width_multiplier=0)
    with pytest.raises(InvalidArgumentError):
        models.build_teacher(num_classes=1)


def test_documented_layer_names(teacher):
    names = {layer.name for layer in teacher.layers}
    documented = [
        "features_0_0", "features_0_1", "features_0_2",
        "features_1_conv_0_0", "features_1_conv_0_1", "features_1_conv_1", "features_1_conv_2",
        "features_2_conv_0_0", "features_2_conv_0_1", "features_2_conv_1_0", "features_2_conv_1_1",
        "features_2_conv_2", "features_2_conv_3", "features_3_add",
        "features_17_conv_3", "features_18_0", "features_18_1", "features_18_2",
        "avgpool", "classifier_0", "classifier_1",
    ]
    assert not set(documented) - names
    assert type(teacher.get_layer("features_2_conv_1_0")).__name__ == "DepthwiseConv2D"
    assert type(teacher.get_layer("features_1_conv_0_0")).__name__ == "DepthwiseConv2D"
    assert type(teacher.get_layer("classifier_0")).__name__ == "Dropout"
    # stride-2 depthwise convs are preceded by explicit symmetric padding (PyTorch padding=1)
    assert type(teacher.get_layer("features_4_conv_1_pad")).__name__ == "ZeroPadding2D"


def test_student_has_no_head_and_no_dropout():
    names = {layer.name for layer in models.build_student(keep_blocks=14).layers}
    assert "features_13_conv_3" in names and "features_14_conv_0_0" not in names
    assert "classifier_1" in names and "classifier_0" not in names and "features_18_0" not in names


def test_feature_layer_name(teacher):
    assert models.feature_layer_name(0) == "features_0_2"
    assert models.feature_layer_name(3, teacher) == "features_3_add"
    assert models.feature_layer_name(4, teacher) == "features_4_conv_3"
    assert models.feature_layer_name(1) == "features_1_conv_2"


def test_initialisation_differs_between_layers_and_seeds():
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    first = models.build_student(keep_blocks=7)
    keras.utils.set_random_seed(0)
    again = models.build_student(keep_blocks=7)
    keras.utils.set_random_seed(1)
    other = models.build_student(keep_blocks=7)
    kernel = lambda m, name: m.get_layer(name).get_weights()[0]  # noqa: E731
    assert np.array_equal(kernel(first, "features_2_conv_0_0"), kernel(again, "features_2_conv_0_0"))
    assert not np.array_equal(kernel(first, "features_2_conv_0_0"), kernel(other, "features_2_conv_0_0"))
    # Two layers with the same kernel shape (1x1, 32 -> 192) must not share values.
    assert kernel(first, "features_5_conv_0_0").shape == kernel(first, "features_6_conv_0_0").shape
    assert not np.array_equal(kernel(first, "features_5_conv_0_0"), kernel(first, "features_6_conv_0_0"))
    stem = kernel(first, "features_0_0")
    # Kaiming normal, fan_out = 3*3*32: std sqrt(2 / 288).
    assert abs(stem.std() - np.sqrt(2.0 / 288)) < 0.2 * np.sqrt(2.0 / 288)
