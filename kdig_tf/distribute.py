"""Where training runs and in which float format: tf.distribute strategies and mixed-precision policies.

``make_strategy(name)`` gives TensorFlow's own engine for one device (``default``), the GPUs of
one machine (``mirrored``; its logical CPUs if it has no GPU), several machines (``multi_worker``,
from the ``TF_CONFIG`` environment variable) or a TPU (``tpu``). Models, optimizer and datasets
are built in its scope; Keras's stock ``train_step`` then averages gradients over the replicas. The batch size stays the global one, and
the learning rate is not rescaled. Under ``multi_worker`` every worker runs the same program; only
the chief writes a run's outputs (:func:`worker_workdir`).

``precision_policy(name)`` builds models under ``float32``, ``mixed_float16`` or ``mixed_bfloat16``;
:func:`float32_copy` turns a trained mixed-precision model back into a float32 one for saving.
"""
import kdig_tf  # noqa: F401

import contextlib
import shutil
import tempfile

import tensorflow as tf
import tf_keras as keras

from kdig_tf.errors import DistributionError, UnknownKeyError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# A strategy is made once per process: TensorFlow's collective ops are configured a single time.
_made = {}


def check_strategy(name):
    if name not in STRATEGIES:
        raise UnknownKeyError(f"unknown distribution {name!r}; known: {STRATEGIES}")


def check_precision(name):
    if name not in PRECISIONS:
        raise UnknownKeyError(f"unknown precision {name!r}; known: {PRECISIONS}")


def make_strategy(name="default"):
    """The tf.distribute strategy ``name`` (one of STRATEGIES), made once per process.

    ``multi_worker`` reads the cluster from ``TF_CONFIG`` and must be made before TensorFlow runs
    any op in the process. ``tpu`` connects to the TPU the environment names.
    """
    check_strategy(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _made:
        try:
            if name == "mirrored":
                _made[name] = tf.distribute.MirroredStrategy(mirrored_devices())
            elif name == "multi_worker":
                _made[name] = tf.distribute.MultiWorkerMirroredStrategy()
            else:
                resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
                tf.config.experimental_connect_to_cluster(resolver)
                tf.tpu.experimental.initialize_tpu_system(resolver)
                _made[name] = tf.distribute.TPUStrategy(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            raise DistributionError(f"cannot make the {name!r} strategy: {err}") from err
    return _made[name]


def mirrored_devices():
    """The GPUs of this machine; without any, its logical CPU devices if there are several (as tests make
    them), else None (TensorFlow's default: the CPU)."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [device.name for device in gpus]
    cpus = tf.config.list_logical_devices("CPU")
    return [device.name for device in cpus] if len(cpus) > 1 else None


def is_chief(strategy):
    """True for the worker that writes a run's outputs: the only one, the ``chief`` task, or worker 0
    of a cluster without a chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, resolver.task_id
    if not cluster or task_type is None:
        return True
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)


@contextlib.contextmanager
def worker_workdir(workdir, strategy):
    """The directory this worker writes its outputs to: ``workdir`` on the chief, a temporary
    directory (removed afterwards) on every other worker, which computes the same run in lockstep."""
    if is_chief(strategy):
        yield workdir
        return
    folder = tempfile.mkdtemp(prefix="kdig_worker_")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def shard_by_data(dataset, strategy):
    """``dataset`` for ``fit`` under ``strategy``: across workers each global batch is split by
    examples (the store's files are not the unit: every worker reads the same seeded stream)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)
    return dataset


@contextlib.contextmanager
def precision_policy(name):
    """Build models under Keras's global dtype policy ``name`` (one of PRECISIONS), then restore the old one."""
    check_precision(name)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _float32_config(value):
    """A model config with every layer's dtype policy replaced by float32."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "dtype" and (isinstance(item, dict) and item.get("class_name") in ("Policy", "DTypePolicy")
                                   or item in PRECISIONS[1:]):
                out[key] = "float32"
            else:
                out[key] = _float32_config(item)
        return out
    if isinstance(value, list):
        return [_float32_config(item) for item in value]
    return value


def float32_copy(model):
    """``model`` itself if all its layers compute in float32, else a float32 model with its weights."""
    if all(layer.dtype_policy.name == "float32" for layer in model.submodules
           if isinstance(layer, keras.layers.Layer)) and model.dtype_policy.name == "float32":
        return model
    copy = keras.layers.deserialize(_float32_config(keras.layers.serialize(model)))
    copy.set_weights(model.get_weights())
    return copy

