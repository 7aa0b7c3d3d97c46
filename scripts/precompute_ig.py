"""Precompute the teacher's IG maps and logits for a split into a validated TFRecord store.

    python scripts/precompute_ig.py --teacher=pretrained/teacher.h5 --split='train[:45000]' \
        --output_dir=runs/store --data_dir=../shared/tensorflow_datasets

``--map_encoding=none`` stores the logits only (one teacher pass instead of IG), for the
methods without the overlay such as ``kd``.

Resumable: finished shards are kept and never recomputed; a shard whose sidecar is
unreadable is redone, and the temporary files of a killed run are removed. A second process
writing the same store (or the same worker's shards) is refused (WorkdirBusyError), and a
full disk stops with OutOfSpaceError, keeping every finished shard. To scale out, start one
process per worker with --shard_index=i --num_workers=n (same flags otherwise), then run
once with --merge to write the manifest.

A store can outlive its machine as a pack (targets without images, ~2/5 of the store):

    python scripts/precompute_ig.py ... --pack=results/store_train45000_gl16.npz   # after building
    python scripts/precompute_ig.py --unpack=results/store_train45000_gl16.npz \
        --output_dir=runs/store --data_dir=../shared/tensorflow_datasets              # minutes, not an hour

Unpacking checks that every image carries the packed example id and that every shard is
byte-identical to the packed store's.
"""
import os


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_string("teacher", "pretrained/teacher.h5", "Teacher weights (.h5/.keras model, or a .pt state dict).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("split", "train[:45000]", "Split to precompute.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_string("output_dir", "runs/store", "Store directory.")
flags.DEFINE_integer("steps", 50, "IG quadrature steps.")
flags.DEFINE_string("method", "gausslegendre", "gausslegendre | riemann_left | riemann_right | riemann_middle | "
                    "riemann_trapezoid.")
flags.DEFINE_string("baseline", "zeros", "zeros (in the teacher's normalised space) | black | blur | uniform.")
flags.DEFINE_integer("max_batch", 256, "Path points per gradient batch (memory bound).")
flags.DEFINE_integer("batch_size", 64, "Images per IG call.")
flags.DEFINE_integer("examples_per_shard", 2500, "Records per shard (the unit of resume).")
flags.DEFINE_string("map_encoding", "float16", "float16, uint8 with a per-map scale, or none (logits only).")
flags.DEFINE_integer("shard_index", 0, "This worker's index in [0, num_workers).")
flags.DEFINE_integer("num_workers", 1, "Number of workers splitting the shards.")
flags.DEFINE_bool("merge", False, "Only merge finished shards into manifest.json.")
flags.DEFINE_string("pack", None, "After building (or merging), also save the store without images to this .npz.")
flags.DEFINE_string("unpack", None, "Rebuild the store in --output_dir from this pack and the dataset "
                    "(no teacher needed; the teacher and IG flags are ignored).")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from kdig_tf import cli
    cli.run(_run)


def _run():
    import time

    from kdig_tf import records
    from kdig_tf.errors import InvalidArgumentError
    from kdig_tf.pipeline import load_teacher

    if FLAGS.unpack:
        if FLAGS.pack or FLAGS.merge:
            raise InvalidArgumentError("--unpack cannot be combined with --pack or --merge")
        start = time.time()
        store = records.unpack_store(FLAGS.unpack, FLAGS.output_dir, FLAGS.data_dir)
        print(f"unpacked {store.num_examples} examples of {store.manifest['split']} in {time.time() - start:.0f}s "
              f"-> {os.path.join(FLAGS.output_dir, records.MANIFEST)}")
        return
    if FLAGS.merge:
        manifest = records.finalize_store(FLAGS.output_dir)
        records.Store(FLAGS.output_dir)
        print(f"merged {len(manifest['shards'])} shards, {manifest['num_examples']} examples -> "
              f"{os.path.join(FLAGS.output_dir, records.MANIFEST)}")
        _pack()
        return
    teacher = load_teacher(FLAGS.teacher)
    targets = records.TeacherTargets(teacher, steps=FLAGS.steps, method=FLAGS.method, baseline=FLAGS.baseline,
                                     max_batch=FLAGS.max_batch, with_maps=FLAGS.map_encoding != records.NO_MAPS)
    start = time.time()
    settings = records.precompute_store(
        FLAGS.output_dir, targets, records.weights_fingerprint(teacher), FLAGS.dataset, FLAGS.split,
        FLAGS.data_dir, examples_per_shard=FLAGS.examples_per_shard, batch_size=FLAGS.batch_size,
        shard_index=FLAGS.shard_index, num_workers=FLAGS.num_workers, map_encoding=FLAGS.map_encoding)
    seconds = time.time() - start
    done = "manifest written" if FLAGS.num_workers == 1 else "run --merge once every worker has finished"
    print(f"{settings['num_examples']} examples of {FLAGS.split} in {seconds:.0f}s "
          f"(this worker: {FLAGS.shard_index}/{FLAGS.num_workers}); {done}")
    if FLAGS.num_workers == 1:
        _pack()


def _pack():
    from kdig_tf import records

    if FLAGS.pack:
        records.pack_store(FLAGS.output_dir, FLAGS.pack)
        print(f"packed -> {FLAGS.pack} ({os.path.getsize(FLAGS.pack) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    cli.main(main)
