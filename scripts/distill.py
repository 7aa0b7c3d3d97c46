"""Distil a student from the teacher with KD and the IG overlay, end to end.

    python scripts/distill.py --flagfile=flags/quick.cfg

Under ``--workdir`` it writes the IG/logit store (built if missing, reused if its manifest
matches), ``student.h5``, ``student_<mode>.tflite`` with sidecar JSON, ``history.csv``,
with ``--qat_epochs``/``--prune_sparsity`` also ``student_qat_int8.tflite`` and
``student_pruned_<mode>.tflite``, and, last, ``results.json``. Every flag is optional;
defaults are the paper's settings.
A killed run resumes at its last finished epoch when started again with the same flags.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdig_tf  # noqa: E402,F401
from absl import app, flags  # noqa: E402

from kdig_tf.pipeline import DistillConfig  # noqa: E402

HELP = {
    "method": "student | kd | ig | kd_ig | at | kd_at | ig_at | kd_ig_at | kd_online (the teacher runs on each "
              "augmented batch instead of its cached logits).",
    "teacher": "Teacher weights: a tf-keras .h5/.keras model or a PyTorch .pt state dict.",
    "dataset": "tfds dataset name.",
    "data_dir": "tfds data_dir (default: $TFDS_DATA_DIR).",
    "train_split": "Split the student trains on (the store covers it).",
    "val_split": "Validation split: the only one used for selection.",
    "eval_split": "Optional extra split to report (e.g. a final test report).",
    "subset_fraction": "Train on a class-stratified random fraction of train_split (Monte Carlo protocol).",
    "subset_seed": "Seed of the stratified subset.",
    "alpha": "Weight of the KD term: alpha*T^2*KL + (1-alpha)*CE.",
    "temperature": "Distillation temperature T (> 0).",
    "p": "Probability of overlaying the IG map on an image.",
    "beta": "Overlay weight: x <- (1-beta) x + beta m.",
    "power_low": "The map is raised to s = exp(U(ln power_low, ln power_high)).",
    "power_high": "Upper end of the random map power.",
    "paper_overlay": "Reproduce the authors' code: do not crop/flip the map with its image.",
    "cached_targets_order": "aligned, or shuffled: the misalignment control pairing images with other images' targets.",
    "gamma": "Weight of attention transfer (methods with 'at').",
    "at_teacher_layer": "Teacher layer for attention transfer.",
    "at_student_layer": "Student layer for attention transfer.",
    "epochs": "Training epochs.",
    "batch_size": "Batch size.",
    "optimizer": "adam or sgd (Nesterov, momentum 0.9).",
    "learning_rate": "Initial learning rate.",
    "lr_schedule": "constant or cosine.",
    "weight_decay": "Decoupled weight decay (0 = none).",
    "seed": "Seed of initialisation, shuffling, augmentation and overlay draws.",
    "keep_blocks": "Student = first keep_blocks teacher feature modules (14 = 4.1x).",
    "width_multiplier": "Student width multiplier.",
    "stem_stride": "Student stem stride: 1 (the teacher's) or 2 (4x fewer MACs; not with attention transfer).",
    "store_dir": "IG/logit store directory (default <workdir>/store); share it between runs.",
    "ig_steps": "IG quadrature steps.",
    "ig_method": "gausslegendre | riemann_left | riemann_right | riemann_middle | riemann_trapezoid.",
    "ig_baseline": "zeros (in the teacher's normalised space) | black | blur | uniform.",
    "ig_max_batch": "Path points per gradient batch (memory bound; results do not depend on it).",
    "map_encoding": "float16, or uint8 with a per-map scale.",
    "examples_per_shard": "Records per store shard (the unit of resume).",
    "export_modes": "Comma-separated TFLite modes: fp32, fp16, dynamic, int8 ('' = none).",
    "qat_epochs": "After training, fine-tune a quantisation-aware copy with the KD loss for this many epochs and "
                  "export it as student_qat_int8.tflite (0 = no QAT).",
    "qat_learning_rate": "Constant Adam learning rate of the QAT fine-tuning.",
    "prune_sparsity": "After training, magnitude-prune a copy to this fraction of zero Conv2D/Dense weights while "
                      "fine-tuning with the KD loss; exported as student_pruned_<mode>.tflite (0 = no pruning).",
    "prune_epochs": "Fine-tuning epochs of the pruned copy (the sparsity ramps up over them).",
    "prune_learning_rate": "Constant Adam learning rate of the pruning fine-tuning.",
    "verbose": "Keras verbosity: 1 = progress bar, 2 = one line per epoch.",
}
FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """One flag per DistillConfig field (same name, type and default), plus --workdir."""
    flags.DEFINE_string("workdir", "runs/distill", "Output directory of this run.", flag_values=flag_values)
    for field in dataclasses.fields(DistillConfig):
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}.get(
            field.type, flags.DEFINE_string)
        define(field.name, field.default, HELP[field.name], flag_values=flag_values)


def config_from_flags(flag_values=FLAGS):
    return DistillConfig(**{field.name: flag_values[field.name].value for field in dataclasses.fields(DistillConfig)})


define_flags()


def main(argv):
    del argv
    from kdig_tf import cli, pipeline

    def run():
        config = config_from_flags()
        results = pipeline.run_distillation(config, FLAGS.workdir)
        print(f"{config.method}: val_accuracy={results['val_accuracy']:.2f}% on {config.val_split} "
              f"({results['trainable_params']:,} params, {results['compression']:.2f}x, "
              f"{results['train_seconds']:.0f}s) -> {os.path.join(FLAGS.workdir, pipeline.RESULTS)}")
    cli.run(run)


if __name__ == "__main__":
    app.run(main)
