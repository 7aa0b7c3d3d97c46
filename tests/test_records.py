import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras

from kdig_tf import data, models, overlay, records
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError

NUM_EXAMPLES = 12


@pytest.fixture(scope="module")
def mock_cifar():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture(scope="module")
def tiny_teacher():
    return models.build_student(keep_blocks=2)


_TARGETS = {}


def _targets(teacher, steps=3):
    # One TeacherTargets per teacher: tracing the IG function dominates a tiny build.
    key = (id(teacher), steps)
    if key not in _TARGETS:
        _TARGETS[key] = records.TeacherTargets(teacher, steps=steps, max_batch=64)
    return _TARGETS[key]


def _build(store_dir, teacher, **kwargs):
    return records.precompute_store(str(store_dir), _targets(teacher), records.weights_fingerprint(teacher),
                                    split="train", examples_per_shard=5, batch_size=4, progress=False, **kwargs)


def _request(teacher, steps=3):
    return records.store_settings("cifar10", "train", records.weights_fingerprint(teacher),
                                  _targets(teacher, steps).settings())


@pytest.fixture(scope="module")
def built_store(mock_cifar, tiny_teacher, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    _build(store_dir, tiny_teacher)
    return store_dir


@pytest.fixture
def store_copy(built_store, tmp_path):
    """A private copy for tests that damage the store."""
    return shutil.copytree(built_store, tmp_path / "store")


def test_store_is_aligned_by_id(built_store, tiny_teacher):
    store = records.Store(str(built_store), expected=_request(tiny_teacher))
    ds, _ = data.load("cifar10", "train")
    tfds_by_id = {i.numpy(): (image.numpy(), int(label)) for image, label, i in ds}
    assert len(tfds_by_id) == NUM_EXAMPLES
    shuffled = store.raw_dataset().shuffle(64, seed=3).batch(5).map(store.parse)
    seen = 0
    for batch in shuffled:
        for row, example_id in enumerate(batch["id"].numpy()):
            image, label = tfds_by_id[example_id]
            np.testing.assert_array_equal(batch["image"][row].numpy(), image)
            assert int(batch["label"][row]) == label
            seen += 1
    assert seen == NUM_EXAMPLES
    manifest = store.manifest
    assert manifest["num_examples"] == NUM_EXAMPLES and len(manifest["shards"]) == 3


def test_stored_targets_match_the_teacher(built_store, tiny_teacher):
    everything = records.Store(str(built_store)).read_all()
    logits, maps = _targets(tiny_teacher)(everything["image"], everything["label"])
    np.testing.assert_allclose(everything["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(everything["map"], maps, rtol=2e-3, atol=1e-6)  # float16 storage


def test_uint8_map_encoding_round_trips(mock_cifar, tiny_teacher, tmp_path):
    _build(tmp_path, tiny_teacher, map_encoding="uint8")
    everything = records.Store(str(tmp_path)).read_all()
    _, maps = _targets(tiny_teacher)(everything["image"], everything["label"])
    scale = maps.reshape(NUM_EXAMPLES, -1).max(axis=1)[:, None, None]
    assert np.all(np.abs(everything["map"] - maps) <= scale / 255.0 * 0.5 + 1e-6)


class _Killed(Exception):
    pass


class _DiesAfter:
    """TeacherTargets that 'is killed' after a number of batches."""

    def __init__(self, inner, batches):
        self.inner, self.batches = inner, batches

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images, labels):
        if self.batches == 0:
            raise _Killed()
        self.batches -= 1
        return self.inner(images, labels)


def test_resume_keeps_finished_shards(mock_cifar, tiny_teacher, tmp_path):
    teacher_hash = records.weights_fingerprint(tiny_teacher)
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"
    kwargs = dict(split="train", examples_per_shard=5, batch_size=5, progress=False)
    with pytest.raises(_Killed):  # dies in the middle of the second shard
        records.precompute_store(str(resumed), _DiesAfter(_targets(tiny_teacher), 1), teacher_hash, **kwargs)
    finished = sorted(p for p in os.listdir(resumed) if p.endswith(".tfrecord"))
    assert finished == ["shard-00000-of-00003.tfrecord"]  # no half-written shard under a final name
    assert not os.path.exists(resumed / records.MANIFEST)
    with pytest.raises(records.StoreError):
        records.Store(str(resumed))
    first = resumed / finished[0]
    mtime = os.stat(first).st_mtime_ns
    records.precompute_store(str(resumed), _targets(tiny_teacher), teacher_hash, **kwargs)
    assert os.stat(first).st_mtime_ns == mtime
    records.precompute_store(str(clean), _targets(tiny_teacher), teacher_hash, **kwargs)
    shards = lambda d: [s["sha256"] for s in records.Store(str(d)).manifest["shards"]]  # noqa: E731
    assert shards(resumed) == shards(clean)


def test_resume_recomputes_a_finished_shard_damaged_afterwards(mock_cifar, tiny_teacher, tmp_path):
    teacher_hash = records.weights_fingerprint(tiny_teacher)
    store_dir = tmp_path / "store"
    kwargs = dict(split="train", examples_per_shard=5, batch_size=5, progress=False)
    with pytest.raises(_Killed):
        records.precompute_store(str(store_dir), _DiesAfter(_targets(tiny_teacher), 1), teacher_hash, **kwargs)
    first = store_dir / "shard-00000-of-00003.tfrecord"
    intact = first.read_bytes()
    first.write_bytes(intact[: len(intact) // 2])  # its sidecar still says "finished"
    records.precompute_store(str(store_dir), _targets(tiny_teacher), teacher_hash, **kwargs)
    assert first.read_bytes() == intact
    assert records.Store(str(store_dir)).num_examples == 12


def test_workers_split_shards_and_merge(mock_cifar, tiny_teacher, tmp_path):
    for worker in range(2):
        _build(tmp_path, tiny_teacher, shard_index=worker, num_workers=2)
        if worker == 0:
            with pytest.raises(records.StoreError, match="missing"):
                records.finalize_store(str(tmp_path))
    records.finalize_store(str(tmp_path))
    assert records.Store(str(tmp_path), expected=_request(tiny_teacher)).num_examples == NUM_EXAMPLES


def test_store_of_another_teacher_is_refused(store_copy, tiny_teacher):
    tmp_path = store_copy
    keras.utils.set_random_seed(1)  # the autouse fixture reseeds with 0: same seed, same weights
    other = models.build_student(keep_blocks=2)
    assert records.weights_fingerprint(other) != records.weights_fingerprint(tiny_teacher)
    with pytest.raises(records.StoreMismatchError, match="teacher_sha256"):
        records.Store(str(tmp_path), expected=_request(other))
    with pytest.raises(records.StoreMismatchError, match="steps"):
        records.Store(str(tmp_path), expected=_request(tiny_teacher, steps=4))
    with pytest.raises(records.StoreMismatchError):  # and shards are never mixed
        records.precompute_store(str(tmp_path), _targets(other), records.weights_fingerprint(other),
                                 split="train", examples_per_shard=5, progress=False)


def test_corrupt_and_truncated_shards_are_detected(store_copy):
    tmp_path = store_copy
    shard = tmp_path / "shard-00001-of-00003.tfrecord"
    payload = shard.read_bytes()
    shard.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(records.CorruptShardError):
        records.Store(str(tmp_path))
    flipped = bytearray(payload)
    flipped[100] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(records.CorruptShardError):
        records.Store(str(tmp_path))
    with pytest.raises(records.CorruptShardError):  # even when checksums are skipped, parsing fails
        records.Store(str(tmp_path), verify_checksums=False)


def test_duplicate_ids_are_detected(store_copy):
    tmp_path = store_copy
    store = records.Store(str(tmp_path))
    everything = store.read_all()
    # Rewrite shard 2 with shard 0's first id, fixing its checksum so only the id check can fail.
    name = "shard-00002-of-00003"
    with tf.io.TFRecordWriter(str(tmp_path / f"{name}.tfrecord")) as writer:
        for row in range(10, NUM_EXAMPLES):
            example_id = everything["id"][0] if row == 10 else everything["id"][row]
            writer.write(records.serialize_example(example_id, row, everything["label"][row], everything["image"][row],
                                                   everything["logits"][row], everything["map"][row]))
    manifest = json.loads((tmp_path / records.MANIFEST).read_text())
    manifest["shards"][2]["sha256"] = records.sha256_file(str(tmp_path / f"{name}.tfrecord"))
    (tmp_path / records.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(records.DuplicateIdError):
        records.Store(str(tmp_path))


def test_bad_records_are_refused():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(records.NonFiniteMapError):
        records.serialize_example("a", 0, 1, image, np.zeros(10), np.full((4, 4), np.nan))
    with pytest.raises(records.NonFiniteMapError):
        records.serialize_example("a", 0, 1, image, np.full(10, np.inf), np.zeros((4, 4)))
    with pytest.raises(ShapeMismatchError):
        records.serialize_example("a", 0, 1, image, np.zeros(10), np.zeros((5, 4)))


def test_nan_map_leaves_no_store(mock_cifar, tiny_teacher, tmp_path):
    class NanTargets(_DiesAfter):
        def __call__(self, images, labels):
            logits, maps = self.inner(images, labels)
            maps[0, 0, 0] = np.nan
            return logits, maps
    with pytest.raises(records.NonFiniteMapError):
        records.precompute_store(str(tmp_path), NanTargets(_targets(tiny_teacher), 99),
                                 records.weights_fingerprint(tiny_teacher), split="train",
                                 examples_per_shard=5, progress=False)
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


def test_precompute_rejects_bad_arguments(mock_cifar, tiny_teacher, tmp_path):
    with pytest.raises(InvalidArgumentError):
        _build(tmp_path, tiny_teacher, shard_index=2, num_workers=2)
    with pytest.raises(InvalidArgumentError):
        records.TeacherTargets(tiny_teacher, steps=0)


def test_target_permutation_has_about_one_fixed_point():
    fixed = [np.mean(overlay.target_permutation(10_000, seed) == np.arange(10_000)) for seed in range(50)]
    # A random permutation has one fixed point on average: the match rate is about 1/N.
    assert abs(np.mean(fixed) - 1e-4) < 5e-5
    assert not np.array_equal(overlay.target_permutation(100, 0), overlay.target_permutation(100, 1))


def test_shuffled_targets_control_permutes_pairing(built_store):
    store = records.Store(str(built_store))
    everything = store.read_all()
    logits_by_id = dict(zip(everything["id"], everything["logits"]))

    def pairs(**kwargs):
        ds = overlay.training_dataset(store, 4, p=0.0, return_target_ids=True, **kwargs)
        return [(i, t, lg) for batch in ds for i, t, lg in zip(batch[3].numpy(), batch[4].numpy(), batch[2].numpy())]

    aligned = pairs()
    assert all(i == t for i, t, _ in aligned) and len(aligned) == NUM_EXAMPLES
    for i, _, logits in aligned:
        np.testing.assert_array_equal(logits, logits_by_id[i])
    shuffled = pairs(seed=5, cached_targets_order="shuffled")
    permutation = overlay.target_permutation(NUM_EXAMPLES, 5)
    expected_source = dict(zip(everything["id"], everything["id"][permutation]))
    for i, t, logits in shuffled:
        assert t == expected_source[i]
        np.testing.assert_array_equal(logits, logits_by_id[t])  # the logits really are another image's
    assert np.mean([i == t for i, t, _ in shuffled]) == np.mean(permutation == np.arange(NUM_EXAMPLES))


def _build_logits_only(store_dir, teacher):
    targets = records.TeacherTargets(teacher, with_maps=False)
    return records.precompute_store(str(store_dir), targets, records.weights_fingerprint(teacher), split="train",
                                    examples_per_shard=5, batch_size=4, map_encoding=records.NO_MAPS,
                                    progress=False)


def test_logits_only_store_holds_the_full_stores_logits_and_no_maps(built_store, tiny_teacher, tmp_path):
    _build_logits_only(tmp_path, tiny_teacher)
    request = records.store_settings("cifar10", "train", records.weights_fingerprint(tiny_teacher), None,
                                     records.NO_MAPS)
    logits_only = records.Store(str(tmp_path), expected=request)
    full = records.Store(str(built_store))
    assert full.has_maps and not logits_only.has_maps
    assert logits_only.manifest["ig"] is None
    # A full-store request never opens a logits-only store, and the other way round.
    with pytest.raises(records.StoreMismatchError):
        records.Store(str(tmp_path), expected=_request(tiny_teacher))
    with pytest.raises(records.StoreMismatchError):
        records.Store(str(built_store), expected=request)
    without_maps, with_maps = logits_only.read_all(), full.read_all()
    for key in ("id", "index", "label", "image", "logits"):
        np.testing.assert_array_equal(without_maps[key], with_maps[key])
    assert np.all(without_maps["map"] == 0) and np.any(with_maps["map"] > 0)


def test_logits_only_store_refuses_the_overlay_and_feeds_kd_the_same_batches(built_store, tiny_teacher, tmp_path):
    _build_logits_only(tmp_path, tiny_teacher)
    logits_only, full = records.Store(str(tmp_path)), records.Store(str(built_store))
    with pytest.raises(records.MissingMapsError):
        overlay.training_dataset(logits_only, 4, p=0.1)
    for order in overlay.TARGET_ORDERS:
        batches = 0
        for ours, theirs in zip(overlay.training_dataset(logits_only, 4, p=0.0, seed=7, cached_targets_order=order),
                                overlay.training_dataset(full, 4, p=0.0, seed=7, cached_targets_order=order)):
            for mine, other in zip(ours, theirs):
                np.testing.assert_array_equal(mine.numpy(), other.numpy())
            batches += 1
        assert batches == 3


def test_map_presence_must_match_the_encoding(mock_cifar, tiny_teacher, tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(InvalidArgumentError):
        records.serialize_example("a", 0, 1, image, np.zeros(10), None, encoding="float16")
    with pytest.raises(InvalidArgumentError):
        records.serialize_example("a", 0, 1, image, np.zeros(10), np.zeros((4, 4)), encoding=records.NO_MAPS)
    with pytest.raises(InvalidArgumentError):  # IG targets cannot fill a logits-only store, nor the reverse
        _build(tmp_path, tiny_teacher, map_encoding=records.NO_MAPS)
    with pytest.raises(InvalidArgumentError):
        records.precompute_store(str(tmp_path), records.TeacherTargets(tiny_teacher, with_maps=False),
                                 records.weights_fingerprint(tiny_teacher), split="train", progress=False)
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


def _shard_checksums(store_dir):
    return [shard["sha256"] for shard in records.Store(str(store_dir)).manifest["shards"]]


@pytest.mark.parametrize("encoding", ["float16", "uint8", records.NO_MAPS])
def test_a_pack_rebuilds_the_identical_store(mock_cifar, tiny_teacher, tmp_path, encoding):
    original = tmp_path / "original"
    if encoding == records.NO_MAPS:
        _build_logits_only(original, tiny_teacher)
    else:
        _build(original, tiny_teacher, map_encoding=encoding)
    pack = records.pack_store(str(original), str(tmp_path / "store.npz"))
    with np.load(pack) as columns:  # the images stay in the dataset
        assert sorted(columns.files) == ["ids", "labels", "logits", "manifest", "map_scales", "maps", "version"]
    assert os.path.getsize(pack) < sum(os.path.getsize(f) for f in records.Store(str(original)).files)
    rebuilt = records.unpack_store(pack, str(tmp_path / "rebuilt"), progress=False)
    assert rebuilt.manifest == records.Store(str(original)).manifest
    assert _shard_checksums(tmp_path / "rebuilt") == _shard_checksums(original)
    # A second unpack finds every shard finished and leaves them alone.
    stamps = [os.path.getmtime(f) for f in rebuilt.files]
    records.unpack_store(pack, str(tmp_path / "rebuilt"), progress=False)
    assert stamps == [os.path.getmtime(f) for f in rebuilt.files]


def test_an_unpack_on_other_data_or_a_damaged_pack_is_refused(mock_cifar, built_store, tmp_path):
    pack_path = records.pack_store(str(built_store), str(tmp_path / "store.npz"))
    with np.load(pack_path) as pack:
        columns = dict(pack)
    # The ids of two examples swapped: the dataset's images no longer carry the packed ids.
    swapped = dict(columns, ids=columns["ids"][[1, 0, *range(2, NUM_EXAMPLES)]])
    np.savez_compressed(tmp_path / "swapped.npz", **swapped)
    with pytest.raises(records.StoreMismatchError):
        records.unpack_store(str(tmp_path / "swapped.npz"), str(tmp_path / "a"), progress=False)
    assert not os.path.exists(tmp_path / "a" / records.MANIFEST)
    # A map changed by one float16 step: the rebuilt shard does not checksum like the original.
    maps = columns["maps"].copy()
    maps.view(np.uint16)[0, 0, 0] += 1
    np.savez_compressed(tmp_path / "damaged.npz", **dict(columns, maps=maps))
    with pytest.raises(records.CorruptShardError):
        records.unpack_store(str(tmp_path / "damaged.npz"), str(tmp_path / "b"), progress=False)
    assert not os.path.exists(tmp_path / "b" / records.MANIFEST)
    assert not [name for name in os.listdir(tmp_path / "b") if name.startswith("shard-00000")]
    (tmp_path / "truncated.npz").write_bytes(open(pack_path, "rb").read()[:100])
    with pytest.raises(records.CorruptShardError):
        records.unpack_store(str(tmp_path / "truncated.npz"), str(tmp_path / "c"), progress=False)
    with pytest.raises(records.StoreError):
        records.unpack_store(str(tmp_path / "missing.npz"), str(tmp_path / "d"), progress=False)
