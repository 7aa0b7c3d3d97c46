"""The latency student families of kdig_tf/students.py: hand-counted sizes, the spec syntax and its
named errors, shapes from the caller, stock layers only, and (slow) a trained step of every family
exported to int8 (PTQ and QAT) and classified by the deploy runner."""
import kdig_tf  # noqa: F401

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tf_keras as keras
from PIL import Image

from kdig_tf import KdigError, benchmark, export, models, students
from kdig_tf.errors import InvalidArgumentError, UnknownKeyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "scripts", "deploy", "run_tflite.py")
CIFAR = (32, 32, 3)
# One small member of every family: seconds to build, convert and fine-tune.
TINY = {
    "mnv2": "mnv2:width=0.25,repeats=1-1-1-0-0-0-0,strides=1-2-2-1-1-1-1,expand=2,head=16",
    "resnet": "resnet:depth=8,width=4",
    "shufflenetv2": "shufflenetv2:width=0.25,repeats=1-2-1,head=32",
    "vgg": "vgg:channels=4-8,repeats=1-2,strides=1-2",
}


def build(text, num_classes=10, input_shape=CIFAR):
    return models.parse_student_spec(text).build_core(num_classes, input_shape)


def test_every_family_is_registered_with_a_tiny_member():
    assert set(TINY) == set(models.STUDENT_FAMILIES) - {"mobilenetv2"}


# Hand counts, 10 classes, 32x32 inputs. Trainable parameters: conv kernels (no biases), BN gamma
# and beta (2 per channel), Dense kernel and bias. MACs: H_out*W_out*C_out*k*k*C_in (depthwise:
# *k*k), Dense in*out.
HAND_COUNTED = [
    # ResNet-20, width 16, projection shortcuts (option B):
    #   stem 3*3*3*16 + 32 = 464
    #   stage 1: 6 convs of 3*3*16*16 + 32 = 2,336 -> 14,016
    #   stage 2: 3*3*16*32 + 64 = 4,672; 5 convs of 3*3*32*32 + 64 = 9,280 -> 46,400; projection 16*32 + 64 = 576
    #   stage 3: 3*3*32*64 + 128 = 18,560; 5 of 3*3*64*64 + 128 = 36,992 -> 184,960; projection 32*64 + 128 = 2,176
    #   Dense 64*10 + 10 = 650                 total 272,474 (option A, zero-padded shortcuts: 269,722)
    # MACs: stem 32*32*16*27 = 442,368; stage 1 6 * 32*32*16*144 = 14,155,776;
    #   stage 2: 16*16*32*144 = 1,179,648 + 5 * 16*16*32*288 = 11,796,480 + 16*16*32*16 = 131,072;
    #   stage 3: 8*8*64*288 = 1,179,648 + 5 * 8*8*64*576 = 11,796,480 + 8*8*64*32 = 131,072; Dense 640
    ("resnet:depth=20,width=16", 272_474, 40_813_184),
    # ResNet-8, width 16: 464 + 2*2,336 + (4,672 + 9,280 + 576) + (18,560 + 36,992 + 2,176) + 650
    # MACs: 442,368 + 2*2,359,296 + (1,179,648 + 2,359,296 + 131,072) + (1,179,648 + 2,359,296 + 131,072) + 640
    ("resnet:depth=8,width=16", 78_042, 12_501_632),
    # ShuffleNetV2 x0.5 (stage channels 48/96/192, units 4/8/4, head 1024):
    #   stem 3*3*3*24 + 48 = 696
    #   stage 2: down unit (in 24, branches 24): left dw 216+48, 1x1 576+48; right 1x1 576+48, dw 216+48,
    #            1x1 576+48 -> 2,400; 3 units of (576+48 + 216+48 + 576+48 = 1,512) -> 4,536
    #   stage 3: down (in 48, b 48): 528 + 2,400 + 2,400 + 528 + 2,400 = 8,256; 7 units of 5,328 -> 37,296
    #   stage 4: down (in 96, b 96): 1,056 + 9,408 + 9,408 + 1,056 + 9,408 = 30,336; 3 units of 19,872 -> 59,616
    #   head 192*1024 + 2,048 = 198,656; Dense 1024*10 + 10 = 10,250           total 352,042
    # MACs: stem 663,552; stage 2 995,328 + 3*350,208; stage 3 940,032 + 7*322,560;
    #   stage 4 912,384 + 3*308,736; head 4*4*192*1024 = 3,145,728; Dense 10,240   total 10,902,016
    ("shufflenetv2:width=0.5", 352_042, 10_902_016),
    # VGG 32-64-128, 2 convs per stage, strides 1-2-2:
    #   3*3*3*32 + 64 = 928; 3*3*32*32 + 64 = 9,280; 3*3*32*64 + 128 = 18,560; 3*3*64*64 + 128 = 36,992;
    #   3*3*64*128 + 256 = 73,984; 3*3*128*128 + 256 = 147,712; Dense 128*10 + 10 = 1,290  total 288,746
    # MACs: 32*32*32*27 + 32*32*32*288 + 16*16*64*288 + 16*16*64*576 + 8*8*128*576 + 8*8*128*1152 + 1,280
    ("vgg", 288_746, 38_634_752),
    # MobileNetV2 x0.25 (every stage 8 channels), stages 1-2 only, stage 2 strided, expansion 4, head 16:
    #   stem 3*3*3*8 + 16 = 232; block 1 (t=1): dw 72+16, 1x1 64+16 = 168;
    #   block 2 (t=4): 1x1 8*32 + 64, dw 9*32 + 64, 1x1 32*8 + 16 = 944; head 8*16 + 32 = 160; Dense 16*10 + 10 = 170
    # MACs: stem 32*32*8*27 = 221,184; block 1 32*32*8*9 + 32*32*64 = 139,264;
    #   block 2 32*32*256 + 16*16*32*9 + 16*16*256 = 401,408 (the stride is in its depthwise conv);
    #   head 16*16*128 = 32,768; Dense 160                                                   total 794,784
    ("mnv2:width=0.25,repeats=1-1-0-0-0-0-0,strides=1-2-1-1-1-1-1,expand=4,head=16", 1_674, 794_784),
]


@pytest.mark.parametrize("text, params, macs", HAND_COUNTED)
def test_hand_counted_parameters_and_macs(text, params, macs):
    model = build(text)
    assert models.count_trainable_params(model) == params
    assert benchmark.count_macs(model) == macs


def test_mnv2_with_the_default_layout_is_the_existing_mobilenetv2_weight_for_weight():
    keras.utils.set_random_seed(3)
    truncated = build("mnv2:repeats=1-2-3-4-3-0-0")  # the default strides of the empty stages drop out
    keras.utils.set_random_seed(3)
    papers = models.build_student(keep_blocks=14)
    assert models.weights_fingerprint(truncated) == models.weights_fingerprint(papers)
    assert models.count_trainable_params(truncated) == models.STUDENT_PARAMS[14]
    keras.utils.set_random_seed(3)
    full = build("mnv2")
    keras.utils.set_random_seed(3)
    assert models.weights_fingerprint(full) == models.weights_fingerprint(models.build_student(keep_blocks=18))
    # The public MobileNetV2 x0.5 for CIFAR (with its 1280-channel head): 0.70 M parameters, 28 M MACs.
    reference = build("mnv2:width=0.5,head=1280")
    assert models.count_trainable_params(reference) == 700_490
    assert round(benchmark.count_macs(reference) / 1e6) == 28


def test_moving_the_stride_from_the_stem_to_stage_2_keeps_the_first_blocks_at_full_resolution():
    moved = build("mnv2:width=0.5,strides=1-2-2-2-1-2-1")
    stem = build("mnv2:width=0.5,stem_stride=2,strides=1-1-2-2-1-2-1")
    assert moved.get_layer("features_1_conv_2").output_shape[1:3] == (32, 32)  # stage 1 (16 channels)
    assert moved.get_layer("features_2_conv_1_0").output_shape[1:3] == (16, 16)  # stage 2's depthwise
    assert stem.get_layer("features_1_conv_2").output_shape[1:3] == (16, 16)
    assert moved.get_layer("avgpool").input_shape[1:3] == stem.get_layer("avgpool").input_shape[1:3] == (2, 2)
    assert models.count_trainable_params(moved) == models.count_trainable_params(stem)
    assert benchmark.count_macs(stem) < benchmark.count_macs(moved) < benchmark.count_macs(build("mnv2:width=0.5"))


def test_shuffle_split_and_layout_match_the_reference_channel_shuffle():
    height, width, channels = 3, 5, 8
    x = np.random.default_rng(0).random((2, height, width, channels), dtype=np.float32)
    inputs = keras.Input((height, width, channels))
    shuffled = students._shuffle(inputs, "t")
    outputs = [students._image(shuffled, height, width, "t"),
               students._half(shuffled, 0, height, width, "t"), students._half(shuffled, 1, height, width, "t")]
    image, first, second = keras.Model(inputs, outputs)(x)
    # torchvision's channel_shuffle(x, groups=2): view (2, C/2), transpose, flatten.
    reference = x.reshape(2, height, width, 2, channels // 2).transpose(0, 1, 2, 4, 3).reshape(x.shape)
    np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(first, reference[..., :channels // 2])
    np.testing.assert_array_equal(second, reference[..., channels // 2:])


@pytest.mark.parametrize("family", sorted(TINY))
def test_input_shape_and_classes_come_from_the_caller(family):
    model = build(TINY[family], num_classes=7, input_shape=(24, 40, 1))
    assert model.input_shape == (None, 24, 40, 1) and model.output_shape == (None, 7)
    out = model(np.zeros((2, 24, 40, 1), np.float32), training=False)
    assert out.shape == (2, 7)
    stock = {cls for name in dir(keras.layers) if isinstance(cls := getattr(keras.layers, name), type)}
    assert all(type(layer) in stock for layer in model.layers)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)


def test_spec_text_round_trips():
    for text in ["mnv2:width=0.5,expand=4.5,strides=1-2-2-2-1-2-1", "mnv2:expand=1-6-4-4-4-6-6",
                 "resnet:depth=20,width=16", "shufflenetv2:width=0.5,repeats=2-4-2,head=0",
                 "vgg:channels=16-32-64,strides=2-1-2,repeats=1-1-3"]:
        spec = models.parse_student_spec(text)
        assert models.parse_student_spec(str(spec)) == spec
    assert str(models.parse_student_spec("resnet:width=8,depth=14")) == "resnet:depth=14,width=8"
    assert dict(models.parse_student_spec("mnv2:strides=1-2-2-2-1-2-1").options)["strides"] == (1, 2, 2, 2, 1, 2, 1)
    # The existing family prints as before (run records hold this text).
    assert str(models.parse_student_spec("mobilenetv2:keep=14,width=1.0")) == "mobilenetv2:keep=14,width=1.0"


@pytest.mark.parametrize("text, error", [
    ("resnet:depth=21", InvalidArgumentError),          # not 6n+2
    ("resnet:depth=2", InvalidArgumentError),
    ("resnet:width=0", InvalidArgumentError),
    ("resnet:width=1.5", InvalidArgumentError),
    ("resnet:wdith=16", UnknownKeyError),
    ("resnet:depth", UnknownKeyError),
    ("mnv2:strides=1-2", InvalidArgumentError),         # one per stage (7)
    ("mnv2:strides=1-3-2-2-1-2-1", InvalidArgumentError),
    ("mnv2:strides=1,2,2,2,1,2,1", InvalidArgumentError),  # commas separate options, not list items
    ("mnv2:expand=0.5", InvalidArgumentError),
    ("mnv2:expand=4-4", InvalidArgumentError),
    ("mnv2:width=-1", InvalidArgumentError),
    ("mnv2:width=nan", InvalidArgumentError),
    ("mnv2:repeats=1-2-3-4-3-3-x", InvalidArgumentError),
    ("mnv2:stem_stride=3", InvalidArgumentError),
    ("mnv2:keep=14", UnknownKeyError),
    ("shufflenetv2:repeats=4-8", InvalidArgumentError),
    ("shufflenetv2:groups=3", UnknownKeyError),
    ("vgg:channels=", InvalidArgumentError),
    ("vgg:channels=16--32", InvalidArgumentError),
    ("vgg:depth=3", UnknownKeyError),
])
def test_a_bad_option_gives_a_named_error(text, error):
    with pytest.raises(error) as raised:
        models.parse_student_spec(text)
    assert isinstance(raised.value, KdigError) and "student option" in str(raised.value)


@pytest.mark.parametrize("text, input_shape, match", [
    ("vgg:channels=16-32,repeats=2-2-2", CIFAR, "one value per stage"),
    # The default strides put a 2 on stage 6; given explicitly, it may not land on an empty stage.
    ("mnv2:repeats=1-2-3-4-3-0-0,strides=1-1-2-2-1-2-1", CIFAR, "leaves empty"),
    ("resnet:depth=8,width=4,stem_stride=2", (4, 4, 3), "downsample by 8"),
    ("shufflenetv2:width=0.5", (6, 6, 3), "downsample by 8"),
])
def test_options_that_only_clash_when_built_give_a_named_error(text, input_shape, match):
    with pytest.raises(InvalidArgumentError, match=match):
        build(text, input_shape=input_shape)


def test_distill_config_refuses_a_bad_spec_before_running():
    from kdig_tf import pipeline

    with pytest.raises(InvalidArgumentError):
        pipeline.DistillConfig(method="student", student="resnet:depth=21").validate()
    pipeline.DistillConfig(method="student", student=TINY["resnet"]).validate()


def test_saved_students_load_in_plain_tf_keras(tmp_path):
    images = np.random.default_rng(0).uniform(0, 255, (2, *CIFAR)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    for family, text in TINY.items():
        spec = models.parse_student_spec(text)
        student = models.with_preprocessing(spec.build_core(10, CIFAR), spec.input_spec)
        student.save(str(tmp_path / f"{family}.h5"))
        np.save(tmp_path / f"{family}.npy", student.predict(images, verbose=0))
    script = ("import os, sys\nos.environ['TF_USE_LEGACY_KERAS'] = '1'\nimport numpy as np, tf_keras as keras\n"
              f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
              f"for family in {sorted(TINY)!r}:\n"
              f"    model = keras.models.load_model(os.path.join({str(tmp_path)!r}, family + '.h5'), compile=False)\n"
              f"    diff = np.abs(model.predict(x, verbose=0) - np.load(os.path.join({str(tmp_path)!r}, family + "
              "'.npy'))).max()\n"
              "    assert diff == 0.0, (family, diff)\n"
              "assert 'kdig_tf' not in sys.modules\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- slow: train, export, deploy

def _classify(model_path, image_dir):
    completed = subprocess.run([sys.executable, RUNNER, model_path, str(image_dir), "--json", "--top_k", "2"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)["results"]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_trains_exports_int8_and_classifies_through_the_runner(tmp_path, family):
    from kdig_tf import pipeline

    config = pipeline.DistillConfig(method="student", student=TINY[family], train_split="train", val_split="train",
                                    epochs=1, batch_size=4, export_modes="int8", qat_epochs=1, verbose=0)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        results = pipeline.run_distillation(config, str(tmp_path / "run"), progress=False)
    spec = models.parse_student_spec(TINY[family])
    assert results["trainable_params"] == models.count_trainable_params(spec.build_core(10, CIFAR))
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (3, *CIFAR), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(images / f"img{index}.png")  # 32x32: the runner need not resize
    for mode in ("int8", "qat_int8"):
        path = results["tflite"][mode]["path"]
        sidecar = export.load_sidecar(path)
        assert sidecar["conversion"]["mode"] == "int8" and sidecar["input"]["input_kind"] == "unit"
        assert sidecar["conversion"]["quantization_aware"] == (mode == "qat_int8")
        assert export.TFLiteModel(path).reduced_precision_dtypes(), f"{mode} export holds no int8 tensors"
        guesses = _classify(path, images)
        assert len(guesses) == len(pixels)
        # The runner's top class is the in-process LiteRT model's on the same [0, 1] images.
        logits = export.TFLiteModel(path).predict(pixels.astype(np.float32) / 255.0)
        by_name = {os.path.basename(guess["image"]): guess for guess in guesses}
        for index, row in enumerate(logits):
            assert by_name[f"img{index}.png"]["top_k"][0]["index"] == int(np.argmax(row))


@pytest.mark.slow
def test_every_candidate_of_the_screen_flagfile_builds():
    specs = [line.split("=", 1)[1].strip() for line in open(os.path.join(REPO, "flags", "screen_students.cfg"))
             if line.startswith("--student_spec=")]
    families = {models.parse_student_spec(text).family for text in specs}
    assert families == set(TINY)
    for text in specs:
        model = build(text)
        assert model.output_shape == (None, 10) and benchmark.count_macs(model) > 0

