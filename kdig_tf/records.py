"""The precompute store: teacher logits and IG maps, one self-contained record per image.

Layout of a store directory::

    shard-00000-of-00008.tfrecord   records of examples [0, n) in tfds read order
    shard-00000-of-00008.json       that shard's count, sha256, ids digest and settings
    manifest.json                   written last, once every shard is complete

Each record holds ``id`` (the tfds example id), ``index`` (position in the split),
``label``, ``image`` (raw uint8), ``logits`` (float32) and ``map`` (float16, or uint8 with
a per-map ``map_scale``). Nothing is ever looked up by position across files: an image
and its targets travel in the same record, so they cannot be misaligned.

A *logits-only* store (``map_encoding="none"``, IG settings ``None``) holds no maps. It
costs one teacher pass instead of IG for every image, and serves the methods without
the overlay; reading it with an overlay probability p > 0 raises :class:`MissingMapsError`.

A shard is written under a temporary name and renamed when complete, then its sidecar
JSON is written. A rerun skips every shard whose sidecar matches the settings, so a
killed run resumes without recomputing; a sidecar that cannot be read marks its shard as
not done, and the leftover temporary files of a killed writer are removed. A full disk
raises :class:`~kdig_tf.errors.OutOfSpaceError` and keeps every finished shard.
``shard_index``/``num_workers`` split the shards across processes or machines;
:func:`finalize_store` then merges the sidecars.

A writer holds a lock in the store directory (``.lock``; ``.lock-<i>-of-<n>`` for worker
``i`` of ``n``), so the same command started twice gets
:class:`~kdig_tf.errors.WorkdirBusyError` instead of two processes writing one shard.
"""
import kdig_tf  # noqa: F401

import glob
import hashlib
import json
import os
import zipfile

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from kdig_tf import attribution, data, guards, loading, locks, models
from kdig_tf.errors import InvalidArgumentError, KdigError, ShapeMismatchError
from kdig_tf.io_utils import atomic_path, atomic_write_json, sha256_file

STORE_VERSION = 1
MANIFEST = "manifest.json"
NO_MAPS = "none"  # the map encoding of a logits-only store
MAP_ENCODINGS = ("float16", "uint8", NO_MAPS)
MAP_BYTES_PER_PIXEL = {"float16": 2, "uint8": 1, NO_MAPS: 0}
TMP_PREFIX = ".tmp-"  # io_utils.atomic_path's temporary names; a killed writer leaves them behind


class StoreError(KdigError):
    """The store is incomplete, corrupt, or inconsistent."""


class CorruptShardError(StoreError):
    """A shard's bytes do not match its recorded checksum, or cannot be parsed."""


class StoreMismatchError(StoreError):
    """The store was built with another teacher, dataset, split or IG settings."""


class DuplicateIdError(StoreError):
    """Two records share an example id, or ids are missing."""


class NonFiniteMapError(StoreError):
    """An IG map or logits vector holds NaN or Inf."""


class MissingMapsError(StoreError):
    """A logits-only store was asked for IG maps."""


# The one weights hash of kdig_tf (stores, run configs and TFLite sidecars record it).
weights_fingerprint = models.weights_fingerprint


def store_settings(dataset, split, teacher_hash, ig_settings, map_encoding="float16", image_size=None):
    """Everything a store depends on. A reader's request must match it exactly.

    ``ig_settings`` is None exactly when ``map_encoding`` is ``"none"`` (a logits-only store).
    ``image_size`` is recorded only when images are resized, so earlier stores still match.
    """
    if map_encoding not in MAP_ENCODINGS:
        raise InvalidArgumentError(f"map_encoding must be one of {MAP_ENCODINGS}, got {map_encoding!r}")
    if (ig_settings is None) != (map_encoding == NO_MAPS):
        raise InvalidArgumentError(f"map_encoding {map_encoding!r} needs IG settings exactly when it stores maps, "
                                   f"got {ig_settings!r}")
    settings = {"version": STORE_VERSION, "dataset": dataset, "split": split, "teacher_sha256": teacher_hash,
                "ig": None if ig_settings is None else dict(ig_settings), "map_encoding": map_encoding}
    if image_size:
        settings["image_size"] = [int(image_size), int(image_size)] if np.isscalar(image_size) else \
            [int(value) for value in image_size]
    return settings


def shard_name(shard_id, num_shards):
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def _bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _float_feature(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def encode_map(ig_map, encoding):
    """Map [H,W] float -> (bytes, scale). uint8 stores round(map / max * 255) and max."""
    if encoding == NO_MAPS:
        return b"", 0.0
    if encoding == "float16":
        return ig_map.astype(np.float16).tobytes(), 1.0
    scale = float(ig_map.max()) if ig_map.size else 0.0
    quantised = np.zeros(ig_map.shape, np.uint8) if scale <= 0 else np.round(ig_map / scale * 255.0)
    return quantised.astype(np.uint8).tobytes(), scale


def serialize_example(example_id, index, label, image, logits, ig_map, encoding="float16"):
    """One self-contained record. Refuses non-finite values and mismatched shapes.

    ``ig_map`` is None exactly for ``encoding="none"`` (a logits-only record).
    """
    image = np.asarray(image)
    logits = np.asarray(logits, np.float32)
    if (ig_map is None) != (encoding == NO_MAPS):
        raise InvalidArgumentError(f"a map is needed exactly when encoding is not {NO_MAPS!r} "
                                   f"(encoding {encoding!r}, example {example_id})")
    ig_map = np.zeros(image.shape[:2], np.float32) if ig_map is None else np.asarray(ig_map, np.float32)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ShapeMismatchError(f"image must be uint8 [H,W,C], got {image.dtype} {image.shape}")
    if ig_map.shape != image.shape[:2]:
        raise ShapeMismatchError(f"map shape {ig_map.shape} does not match image {image.shape[:2]} ({example_id})")
    if not (np.all(np.isfinite(ig_map)) and np.all(np.isfinite(logits))):
        raise NonFiniteMapError(f"NaN or Inf in the map or logits of example {example_id}")
    if np.any(ig_map < 0):
        raise InvalidArgumentError(f"IG maps are sums of |attribution| and cannot be negative ({example_id})")
    map_bytes, scale = encode_map(ig_map, encoding)
    features = {
        "id": _bytes_feature(example_id if isinstance(example_id, bytes) else example_id.encode()),
        "index": _int_feature(index),
        "label": _int_feature(label),
        "image": _bytes_feature(image.tobytes()),
        "logits": _float_feature(logits),
        "map": _bytes_feature(map_bytes),
        "map_scale": _float_feature([scale]),
    }
    # Deterministic bytes: a resumed store must checksum like a clean one, across processes.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def _parse_spec(num_classes):
    return {
        "id": tf.io.FixedLenFeature([], tf.string),
        "index": tf.io.FixedLenFeature([], tf.int64),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "image": tf.io.FixedLenFeature([], tf.string),
        "logits": tf.io.FixedLenFeature([num_classes], tf.float32),
        "map": tf.io.FixedLenFeature([], tf.string),
        "map_scale": tf.io.FixedLenFeature([1], tf.float32),
    }


def parse_batch(serialized, image_shape, num_classes, map_encoding):
    """Parse a batch of serialized records (batched parsing is ~3x faster than per record)."""
    parsed = tf.io.parse_example(serialized, _parse_spec(num_classes))
    height, width, channels = image_shape
    images = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), [-1, height, width, channels])
    if map_encoding == NO_MAPS:  # constant maps: they never reach an image, see MissingMapsError
        maps = tf.zeros([tf.shape(images)[0], height * width])
    elif map_encoding == "float16":
        maps = tf.cast(tf.io.decode_raw(parsed["map"], tf.float16), tf.float32)
    else:
        maps = tf.cast(tf.io.decode_raw(parsed["map"], tf.uint8), tf.float32) / 255.0 * parsed["map_scale"]
    maps = tf.reshape(maps, [-1, height, width])
    return {"id": parsed["id"], "index": parsed["index"], "label": parsed["label"], "image": images,
            "logits": parsed["logits"], "map": maps}


def _ids_digest(ids):
    digest = hashlib.sha256()
    for example_id in ids:
        digest.update(example_id + b"\n")
    return digest.hexdigest()


class TeacherTargets:
    """Computes (logits, IG map) for uint8 images with one teacher and one IG setup.

    With ``with_maps=False`` it computes the logits only and returns None for the maps.
    """

    def __init__(self, teacher, preprocess=data.preprocess_teacher, steps=50, method="gausslegendre",
                 baseline="zeros", max_batch=256, pixel_to_input=data.normalize_teacher, with_maps=True,
                 baseline_colour=None):
        self.teacher = teacher
        self.preprocess = preprocess
        self.ig = None
        if with_maps:
            self.ig = attribution.IntegratedGradients(
                teacher, steps=steps, method=method, baseline=baseline, max_batch=max_batch,
                pixel_to_input=pixel_to_input, baseline_colour=baseline_colour)
        self._logits = tf.function(lambda x: teacher(x, training=False), reduce_retracing=True)

    @classmethod
    def for_model(cls, teacher, baseline="zeros", baseline_colour=None, **kwargs):
        """Targets of any classifier taking pixels (see ``kdig_tf.models``).

        IG runs on the network behind the teacher's preprocessing layers, so ``zeros``
        is zero in its normalised input space, as the paper's teacher had it (for the CIFAR
        teacher, exactly the maps and logits of the bare network). For ``mean_colour`` the
        colour defaults to the normalisation's mean.
        """
        core, spec = models.split_preprocessing(loading.as_pixel_model(teacher))
        if baseline == "mean_colour" and baseline_colour is None:
            if spec.mean is None:
                raise InvalidArgumentError(f"{teacher.name} holds no normalisation mean: give baseline_colour")
            baseline_colour = spec.mean
        return cls(core, preprocess=spec.from_pixels, pixel_to_input=spec.from_unit, baseline=baseline,
                   baseline_colour=baseline_colour, **kwargs)

    @property
    def with_maps(self):
        return self.ig is not None

    def settings(self):
        return None if self.ig is None else self.ig.settings()

    def __call__(self, images_uint8, labels):
        inputs = self.preprocess(tf.convert_to_tensor(images_uint8))
        logits = self._logits(inputs)
        if self.ig is None:
            return logits.numpy(), None
        result = self.ig(inputs, tf.cast(labels, tf.int32))
        return logits.numpy(), attribution.attribution_map(result.attributions).numpy()


def precompute_store(store_dir, teacher_targets, teacher_hash, dataset="cifar10", split="train",
                     data_dir=None, examples_per_shard=2500, batch_size=64, shard_index=0, num_workers=1,
                     map_encoding="float16", progress=True, image_size=None):
    """Write the shards this worker owns, skipping finished ones. Returns the settings dict.

    With ``num_workers == 1`` the manifest is finalised at the end; otherwise run
    :func:`finalize_store` once every worker has finished.
    """
    if examples_per_shard < 1 or batch_size < 1:
        raise InvalidArgumentError("examples_per_shard and batch_size must be >= 1")
    if not 0 <= shard_index < num_workers:
        raise InvalidArgumentError(f"shard_index must be in [0, {num_workers}), got {shard_index}")
    ds, _ = data.load(dataset, split, data_dir, image_size=image_size)  # a subset is a split slice, e.g. train[:2000]
    total = data.count_examples(ds)
    if total == 0:
        raise InvalidArgumentError(f"split {split!r} of {dataset} is empty")
    settings = store_settings(dataset, split, teacher_hash, teacher_targets.settings(), map_encoding, image_size)
    settings["num_examples"] = total
    settings["image_shape"] = [int(d) for d in ds.element_spec[0].shape]
    settings["num_classes"] = int(teacher_targets.teacher.output_shape[-1])
    settings["examples_per_shard"] = examples_per_shard
    num_shards = -(-total // examples_per_shard)
    owned = [shard for shard in range(num_shards) if shard % num_workers == shard_index]
    with locks.DirLock(store_dir, name=store_lock_name(shard_index, num_workers), what="store"):
        # A single writer owns every temporary file in the store; a worker only those of its shards.
        remove_orphans(store_dir, None if num_workers == 1 else [shard_name(shard, num_shards) for shard in owned])
        _refuse_foreign_store(store_dir, settings)
        todo = [shard for shard in owned if not _shard_done(store_dir, shard, num_shards, settings)]
        counts = [min(examples_per_shard, total - shard * examples_per_shard) for shard in todo]
        what = "IG+logits" if teacher_targets.with_maps else "logits"
        bar = tqdm(total=sum(counts), unit="img", desc=f"{what} ({len(todo)}/{len(owned)} shards to do)",
                   disable=not progress)
        with guards.disk_full_as_error(store_dir, lambda: estimated_bytes(settings, sum(counts))):
            for shard in todo:
                start = shard * examples_per_shard
                count = min(examples_per_shard, total - start)
                _write_shard(store_dir, shard, num_shards, ds.skip(start).take(count), start, count,
                             teacher_targets, batch_size, settings, bar)
                counts.pop(0)
            bar.close()
            if num_workers == 1:
                _finalize(store_dir)
    return settings


def store_lock_name(shard_index=0, num_workers=1):
    """The lock file of a store writer: one for a single writer, one per worker otherwise."""
    return locks.LOCK_FILE if num_workers == 1 else f"{locks.LOCK_FILE}-{shard_index}-of-{num_workers}"


def remove_orphans(store_dir, shard_names=None):
    """Delete temporary files a killed writer left in ``store_dir`` (only those of ``shard_names`` if given).

    Call it holding the store's lock: a live writer's temporary file must not be removed.
    """
    patterns = [TMP_PREFIX + "*"] if shard_names is None else [f"{TMP_PREFIX}{name}-*" for name in shard_names]
    removed = sorted({path for pattern in patterns for path in glob.glob(os.path.join(store_dir, pattern))})
    for path in removed:
        os.remove(path)
    return removed


def estimated_bytes(settings, num_examples):
    """About how many bytes ``num_examples`` records of a store with ``settings`` take (with sidecars)."""
    height, width, channels = settings["image_shape"]
    per_record = (height * width * channels + height * width * MAP_BYTES_PER_PIXEL[settings["map_encoding"]]
                  + 4 * settings["num_classes"] + 200)  # ids, keys and TFRecord framing
    return int(num_examples) * per_record + 4096


def _refuse_foreign_store(store_dir, settings):
    """A directory holding shards of other settings must not be silently mixed with ours."""
    for name in sorted(os.listdir(store_dir)):
        if name.startswith("shard-") and name.endswith(".json"):
            other = (_read_sidecar(os.path.join(store_dir, name)) or {}).get("settings")
            if other is None:
                continue  # unreadable: its shard is redone, and the next sidecar decides
            if other != settings:
                raise StoreMismatchError(
                    f"{store_dir} holds shards built with other settings ({_diff(other, settings)}); "
                    "use another directory or delete it")
            return


def _diff(found, wanted):
    keys = sorted(set(found) | set(wanted))
    return ", ".join(f"{k}: {found.get(k)!r} != {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k))


def _read_sidecar(path):
    """A shard sidecar as a dict, or None if it cannot be read (cut off, edited, not JSON)."""
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _shard_done(store_dir, shard, num_shards, settings):
    sidecar = os.path.join(store_dir, shard_name(shard, num_shards) + ".json")
    record = os.path.join(store_dir, shard_name(shard, num_shards) + ".tfrecord")
    if not (os.path.exists(sidecar) and os.path.exists(record)):
        return False
    meta = _read_sidecar(sidecar)
    # A shard damaged after it was finished (or whose sidecar is) is recomputed, not carried into the manifest.
    return meta is not None and meta.get("settings") == settings and meta.get("sha256") == sha256_file(record)


def _write_shard(store_dir, shard, num_shards, shard_ds, start, count, teacher_targets, batch_size,
                 settings, bar):
    def rows():
        for images, labels, batch_ids in shard_ds.batch(batch_size):
            logits, maps = teacher_targets(images, labels)
            for row in range(len(batch_ids)):
                yield (batch_ids[row].numpy(), labels[row].numpy(), images[row].numpy(), logits[row],
                       None if maps is None else maps[row])
            bar.update(len(batch_ids))

    _write_shard_rows(store_dir, shard, num_shards, start, count, rows(), settings)


def _write_shard_rows(store_dir, shard, num_shards, start, count, rows, settings, expected_sha256=None):
    """Write one shard from (id, label, image, logits, map) rows, then its sidecar.

    With ``expected_sha256`` a shard whose bytes differ is deleted and refused.
    """
    name = shard_name(shard, num_shards)
    record_path = os.path.join(store_dir, name + ".tfrecord")
    ids = []
    with atomic_path(record_path, prefix=f"{TMP_PREFIX}{name}-") as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for index, (example_id, label, image, logits, ig_map) in enumerate(rows, start):
                writer.write(serialize_example(example_id, index, label, image, logits, ig_map,
                                               settings["map_encoding"]))
                ids.append(example_id)
        if len(ids) != count:
            raise StoreError(f"shard {name}: expected {count} examples, read {len(ids)}")
        if len(set(ids)) != len(ids):
            raise DuplicateIdError(f"shard {name} holds duplicate example ids")
        if expected_sha256 is not None and sha256_file(tmp) != expected_sha256:
            raise CorruptShardError(f"shard {name} rebuilt from a pack differs from the packed store's "
                                    "(other images in the dataset, or a damaged pack)")
    atomic_write_json(os.path.join(store_dir, name + ".json"), {
        "file": name + ".tfrecord", "shard": shard, "start": start, "count": count,
        "sha256": sha256_file(record_path), "ids_sha256": _ids_digest(ids), "settings": settings})


def finalize_store(store_dir):
    """Merge shard sidecars into ``manifest.json`` once every shard is present and consistent."""
    if not os.path.isdir(store_dir):
        raise StoreError(f"no store directory {store_dir}")
    with locks.DirLock(store_dir, what="store"):
        return _finalize(store_dir)


def _finalize(store_dir):
    """:func:`finalize_store`, for a caller that holds the store's lock."""
    sidecars = sorted(name for name in os.listdir(store_dir) if name.startswith("shard-") and name.endswith(".json"))
    if not sidecars:
        raise StoreError(f"no finished shards in {store_dir}")
    metas = []
    for name in sidecars:
        meta = _read_sidecar(os.path.join(store_dir, name))
        if meta is None or not {"file", "shard", "start", "count", "sha256", "ids_sha256", "settings"} <= set(meta):
            raise CorruptShardError(f"shard sidecar {os.path.join(store_dir, name)} is unreadable; rerun the "
                                    "precompute with the same flags: it redoes that shard")
        metas.append(meta)
    settings = metas[0]["settings"]
    for meta in metas[1:]:
        if meta["settings"] != settings:
            raise StoreMismatchError(f"shard {meta['file']} was built with other settings: "
                                     f"{_diff(meta['settings'], settings)}")
    num_shards = -(-settings["num_examples"] // settings["examples_per_shard"])
    missing = sorted(set(range(num_shards)) - {meta["shard"] for meta in metas})
    if missing:
        raise StoreError(f"store {store_dir} is incomplete: shards {missing} of {num_shards} are missing")
    if sum(meta["count"] for meta in metas) != settings["num_examples"]:
        raise StoreError("shard counts do not add up to the split size")
    manifest = dict(settings)
    manifest["shards"] = [{k: meta[k] for k in ("file", "start", "count", "sha256", "ids_sha256")}
                          for meta in sorted(metas, key=lambda m: m["shard"])]
    atomic_write_json(os.path.join(store_dir, MANIFEST), manifest)
    return manifest


PACK_VERSION = 1


def pack_store(store_dir, pack_path):
    """Save a finished store without its images: ids, labels, logits and the encoded maps.

    The pack (a compressed ``.npz``, about a fifth of the store) keeps the manifest, so
    :func:`unpack_store` can rebuild the store from it and the dataset and prove the result
    byte-identical. It lets a store outlive a machine when the teacher pass took an hour.
    """
    store = Store(store_dir)
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
            "logits": tf.io.FixedLenFeature([store.num_classes], tf.float32),
            "map": tf.io.FixedLenFeature([], tf.string), "map_scale": tf.io.FixedLenFeature([1], tf.float32)}
    columns = {key: [] for key in spec}
    for batch in store.raw_dataset().batch(4096).map(lambda serialized: tf.io.parse_example(serialized, spec)):
        for key, value in batch.items():
            columns[key].append(value.numpy())
    columns = {key: np.concatenate(values) for key, values in columns.items()}
    map_dtype = {"float16": np.float16, "uint8": np.uint8, NO_MAPS: np.uint8}[store.map_encoding]
    maps = np.frombuffer(b"".join(columns["map"].tolist()), map_dtype)
    maps = maps.reshape(store.num_examples, *store.image_shape[:2]) if store.has_maps else maps[:0]
    store_bytes = sum(os.path.getsize(file) for file in store.files)  # a pack is smaller than its store
    with guards.disk_full_as_error(pack_path, store_bytes), atomic_path(pack_path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, version=np.int64(PACK_VERSION), manifest=np.array(json.dumps(store.manifest)),
                                ids=columns["id"].astype(np.bytes_), labels=columns["label"],
                                logits=columns["logits"], maps=maps, map_scales=columns["map_scale"][:, 0])
    return pack_path


def unpack_store(pack_path, store_dir, data_dir=None, progress=True):
    """Rebuild the store a :func:`pack_store` pack came from, with the images of the dataset.

    Every image must carry the id packed at its position (else :class:`StoreMismatchError`)
    and every shard must checksum like the packed store's (else :class:`CorruptShardError`);
    finished shards are skipped, so an interrupted unpack resumes. Returns the :class:`Store`.
    """
    if not os.path.isfile(pack_path):
        raise StoreError(f"store pack {pack_path} does not exist")
    try:
        with np.load(pack_path, allow_pickle=False) as pack:
            if int(pack["version"]) != PACK_VERSION:
                raise StoreMismatchError(f"pack version {int(pack['version'])} != {PACK_VERSION}")
            manifest = json.loads(str(pack["manifest"]))
            ids, labels, logits = pack["ids"], pack["labels"], pack["logits"]
            maps, scales = pack["maps"], pack["map_scales"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptShardError(f"{pack_path} is not a readable store pack: {err}") from err
    total = int(manifest["num_examples"])
    if not len(ids) == len(labels) == len(logits) == total or (manifest["map_encoding"] != NO_MAPS and len(maps) != total):
        raise CorruptShardError(f"{pack_path}: column lengths do not match the manifest's {total} examples")
    settings = {key: value for key, value in manifest.items() if key != "shards"}
    with locks.DirLock(store_dir, what="store"):
        remove_orphans(store_dir)
        _refuse_foreign_store(store_dir, settings)
        _unpack(manifest, settings, ids, labels, logits, maps, scales, store_dir, data_dir, progress)
    return Store(store_dir, expected=settings)


def _unpack(manifest, settings, ids, labels, logits, maps, scales, store_dir, data_dir, progress):
    """:func:`unpack_store`'s writing, under the store's lock."""
    ds, _ = data.load(manifest["dataset"], manifest["split"], data_dir, image_size=manifest.get("image_size"))
    num_shards = len(manifest["shards"])
    encoding = manifest["map_encoding"]

    def decoded_map(index):
        if encoding == NO_MAPS:
            return None
        if encoding == "float16":
            return maps[index].astype(np.float32)
        return maps[index].astype(np.float32) / 255.0 * scales[index]

    def rows(shard_ds, start):
        for index, (image, label, example_id) in enumerate(shard_ds.as_numpy_iterator(), start):
            if example_id != ids[index] or label != labels[index]:
                raise StoreMismatchError(f"example {index} of {manifest['split']} is {example_id!r} (label {label}), "
                                         f"the pack has {ids[index]!r} (label {labels[index]}): other data")
            yield example_id, label, image, logits[index], decoded_map(index)
            bar.update(1)

    todo = [(shard, entry) for shard, entry in enumerate(manifest["shards"])
            if not _shard_done(store_dir, shard, num_shards, settings)]
    bar = tqdm(total=sum(entry["count"] for _, entry in todo), unit="img", desc="unpacking store",
               disable=not progress)
    counts = [entry["count"] for _, entry in todo]
    with guards.disk_full_as_error(store_dir, lambda: estimated_bytes(settings, sum(counts))):
        for shard, entry in todo:
            _write_shard_rows(store_dir, shard, num_shards, entry["start"], entry["count"],
                              rows(ds.skip(entry["start"]).take(entry["count"]), entry["start"]), settings,
                              expected_sha256=entry["sha256"])
            counts.pop(0)
        bar.close()
        _finalize(store_dir)


class Store:
    """A validated, read-only view of a finished store."""

    def __init__(self, store_dir, expected=None, verify_checksums=True, verify_ids=True):
        """``expected`` is a :func:`store_settings` dict; any difference raises StoreMismatchError."""
        self.store_dir = store_dir
        path = os.path.join(store_dir, MANIFEST)
        if not os.path.exists(path):
            raise StoreError(f"{store_dir} has no {MANIFEST}: the store is missing or unfinished")
        try:
            with open(path) as handle:
                self.manifest = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptShardError(f"{path} is not valid JSON: {err}") from err
        if self.manifest.get("version") != STORE_VERSION:
            raise StoreMismatchError(f"store version {self.manifest.get('version')} != {STORE_VERSION}")
        if expected is not None:
            found = {key: self.manifest.get(key) for key in expected}
            if found != expected:
                raise StoreMismatchError(f"store {store_dir} does not match the request: {_diff(found, expected)}")
        self._check_manifest_fields()
        self.files = [os.path.join(store_dir, shard["file"]) for shard in self.manifest["shards"]]
        for shard, file in zip(self.manifest["shards"], self.files):
            if not os.path.exists(file):
                raise StoreError(f"shard file {file} is missing")
            if verify_checksums and sha256_file(file) != shard["sha256"]:
                raise CorruptShardError(f"shard {file} does not match its checksum (corrupt or truncated)")
        self._check_records_match_manifest()
        if verify_ids:
            self.verify_ids()

    def _mismatch(self, what):
        return StoreMismatchError(f"{os.path.join(self.store_dir, MANIFEST)} {what}: the manifest was edited or "
                                  "belongs to another store; rebuild the store (delete the directory and rerun)")

    def _check_manifest_fields(self):
        """Every field a reader relies on is present, well-formed and consistent with the shard list."""
        manifest = self.manifest
        shape, classes, total = manifest.get("image_shape"), manifest.get("num_classes"), manifest.get("num_examples")
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise self._mismatch(f"has image_shape {shape!r}, not [height, width, channels]")
        if not (isinstance(classes, int) and classes > 0 and isinstance(total, int) and total > 0):
            raise self._mismatch(f"has num_classes {classes!r} and num_examples {total!r}, not positive integers")
        if manifest.get("map_encoding") not in MAP_ENCODINGS:
            raise self._mismatch(f"has map_encoding {manifest.get('map_encoding')!r}, not one of {MAP_ENCODINGS}")
        shards, per_shard = manifest.get("shards"), manifest.get("examples_per_shard")
        if not isinstance(shards, list) or not shards or not isinstance(per_shard, int) or per_shard < 1:
            raise self._mismatch("has no shard list or examples_per_shard")
        if len(shards) != -(-total // per_shard):
            raise self._mismatch(f"lists {len(shards)} shards, {total} examples at {per_shard} per shard make "
                                 f"{-(-total // per_shard)}")
        start = 0
        for shard_id, shard in enumerate(shards):
            expected = {"file": shard_name(shard_id, len(shards)) + ".tfrecord", "start": start,
                        "count": min(per_shard, total - start)}
            found = {key: shard.get(key) if isinstance(shard, dict) else None for key in expected}
            if found != expected or not isinstance(shard.get("sha256"), str) or not shard.get("ids_sha256"):
                raise self._mismatch(f"lists shard {shard_id} as {found}, expected {expected} with checksums")
            start += expected["count"]

    def _check_records_match_manifest(self):
        """The first record of every shard has the image, logits and map sizes the manifest states."""
        height, width, channels = self.image_shape
        map_bytes = height * width * MAP_BYTES_PER_PIXEL[self.map_encoding]
        spec = {"index": tf.io.FixedLenFeature([], tf.int64), "image": tf.io.FixedLenFeature([], tf.string),
                "logits": tf.io.VarLenFeature(tf.float32), "map": tf.io.FixedLenFeature([], tf.string)}
        for shard, file in zip(self.manifest["shards"], self.files):
            try:
                for serialized in tf.data.TFRecordDataset(file).take(1):
                    record = tf.io.parse_single_example(serialized, spec)
                    found = {"index": int(record["index"]), "image bytes": len(record["image"].numpy()),
                             "logits": int(tf.size(record["logits"].values)), "map bytes": len(record["map"].numpy())}
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
                raise CorruptShardError(f"shard {file} is corrupt: {err.message.splitlines()[0]}") from err
            expected = {"index": shard["start"], "image bytes": height * width * channels,
                        "logits": self.num_classes, "map bytes": map_bytes}
            if found != expected:
                raise self._mismatch(f"says {self.image_shape} images, {self.num_classes} classes and "
                                     f"{self.map_encoding} maps, but the first record of {shard['file']} holds "
                                     f"{found} (expected {expected})")

    def check_fits(self, num_classes, image_shape):
        """Raise StoreMismatchError unless the store holds ``num_classes`` logits for ``image_shape`` images."""
        if self.num_classes != int(num_classes) or self.image_shape != tuple(int(d) for d in image_shape):
            raise StoreMismatchError(
                f"store {self.store_dir} holds {self.num_classes}-class logits of {self.image_shape} images, the "
                f"data and models have {int(num_classes)} classes and {tuple(image_shape)} images; use the store "
                "built for this data (or another --store_dir)")

    @property
    def num_examples(self):
        return int(self.manifest["num_examples"])

    @property
    def map_encoding(self):
        return self.manifest["map_encoding"]

    @property
    def has_maps(self):
        return self.map_encoding != NO_MAPS

    @property
    def num_classes(self):
        return int(self.manifest["num_classes"])

    @property
    def image_shape(self):
        return tuple(self.manifest["image_shape"])

    def raw_dataset(self):
        """Serialized records in store order (the split's tfds read order)."""
        return tf.data.TFRecordDataset(self.files, num_parallel_reads=1)

    def parse(self, serialized):
        return parse_batch(serialized, self.image_shape, self.num_classes, self.map_encoding)

    def read_all(self, batch_size=1024):
        """Every record as numpy arrays, in store order (for small stores and tests)."""
        columns = {}
        try:
            for batch in self.raw_dataset().batch(batch_size).map(self.parse):
                for key, value in batch.items():
                    columns.setdefault(key, []).append(value.numpy())
        except tf.errors.DataLossError as err:
            raise CorruptShardError(f"a shard of {self.store_dir} is corrupt: {err.message.splitlines()[0]}") from err
        return {key: np.concatenate(values) for key, values in columns.items()}

    def verify_ids(self):
        """Every id appears once, per-shard digests match, indices are 0..N-1 in order."""
        ids_and_index = self.raw_dataset().batch(4096).map(
            lambda s: tf.io.parse_example(s, {"id": tf.io.FixedLenFeature([], tf.string),
                                              "index": tf.io.FixedLenFeature([], tf.int64)}))
        ids, indices = [], []
        try:
            for batch in ids_and_index:
                ids.extend(batch["id"].numpy().tolist())
                indices.append(batch["index"].numpy())
        except tf.errors.DataLossError as err:
            raise CorruptShardError(f"a shard of {self.store_dir} is corrupt: {err.message.splitlines()[0]}") from err
        if len(ids) != self.num_examples:
            raise DuplicateIdError(f"store holds {len(ids)} records, manifest says {self.num_examples}")
        if len(set(ids)) != len(ids):
            raise DuplicateIdError(f"store {self.store_dir} holds duplicate example ids")
        if not np.array_equal(np.concatenate(indices), np.arange(len(ids))):
            raise StoreError("record indices are not 0..N-1 in order")
        position = 0
        for shard in self.manifest["shards"]:
            if _ids_digest(ids[position:position + shard["count"]]) != shard["ids_sha256"]:
                raise DuplicateIdError(f"ids of {shard['file']} do not match the manifest")
            position += shard["count"]
        return ids


def open_or_build_random_store(store_dir, dataset, split, data_dir=None, ig_steps=1, examples_per_shard=512,
                               seed=0):
    """(Store, build seconds or None): ``store_dir`` opened, or first built with a random-weight
    CIFAR teacher. For benchmarks: what a store costs to read does not depend on its content."""
    import time

    import tf_keras as keras

    if os.path.exists(os.path.join(store_dir, MANIFEST)):
        return Store(store_dir), None
    keras.utils.set_random_seed(seed)
    teacher = models.build_teacher()
    start = time.perf_counter()
    precompute_store(store_dir, TeacherTargets(teacher, steps=ig_steps), weights_fingerprint(teacher), dataset,
                     split, data_dir, examples_per_shard=examples_per_shard, progress=False)
    return Store(store_dir), time.perf_counter() - start
