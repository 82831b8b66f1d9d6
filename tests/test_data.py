"""Built-in tasks (digits, text, cifar10, user tensors) and on-device batching."""

from __future__ import annotations

import os
import pickle
import struct
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from esper.contracts import Topology
from esper.tolaria.data import (
    CIFAR_MEAN,
    CIFAR_PYTHON_FILES,
    CIFAR_STD,
    Batches,
    TaskError,
    from_tensors,
    load_task,
)

# ─────────────────────────────────────────────────────────────────────────────
# digits
# ─────────────────────────────────────────────────────────────────────────────


def test_digits_shapes_ranges_and_split_sizes() -> None:
    task = load_task("digits")
    assert task.topology is Topology.CNN and task.num_classes == 10 and task.higher_is_better
    assert task.train_x.shape == (1437, 1, 8, 8) and task.val_x.shape == (360, 1, 8, 8)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    both = torch.cat([task.train_x, task.val_x])
    assert both.min() == 0.0 and both.max() == 1.0
    # Nothing lost or altered: the pixel total equals sklearn's raw images / 16.
    raw = load_digits().images
    assert both.double().sum().item() == pytest.approx(raw.sum() / 16.0)
    assert set(task.val_y.tolist()) == set(range(10))  # stratified: every class in val
    assert "digits" in task.describe()


def test_digits_split_follows_seed() -> None:
    a, b, c = load_task("digits", seed=3), load_task("digits", seed=3), load_task("digits", seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.val_x, c.val_x)


def test_digits_val_fraction_and_stratification() -> None:
    task = load_task("digits", val_fraction=0.5)
    assert len(task.train_x) + len(task.val_x) == 1797
    train_counts = torch.bincount(task.train_y, minlength=10)
    val_counts = torch.bincount(task.val_y, minlength=10)
    assert (train_counts - val_counts).abs().max() <= 1  # classes split evenly
    with pytest.raises(TaskError, match="val_fraction"):
        load_task("digits", val_fraction=1.0)


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(TaskError, match="digits, text, cifar10") as info:
        load_task("mnist")
    assert isinstance(info.value, ValueError)


# ─────────────────────────────────────────────────────────────────────────────
# text
# ─────────────────────────────────────────────────────────────────────────────


def test_text_is_deterministic_byte_windows() -> None:
    a = load_task("text", text_bytes=50_000, seq_len=32)
    b = load_task("text", text_bytes=50_000, seq_len=32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert a.sources == b.sources
    assert a.topology is Topology.SEQ and a.vocab_size == 256 and a.num_classes is None
    assert a.metric == "bits_per_char" and not a.higher_is_better
    assert a.train_x.shape[1:] == (32,) and a.input_shape == (32,)
    assert a.train_x.dtype == torch.int64 and int(a.train_x.min()) >= 0 and a.train_x.max() < 256
    assert torch.equal(a.train_x[:, 1:], a.train_y[:, :-1])  # y is x shifted by one
    assert torch.equal(a.val_x[:, 1:], a.val_y[:, :-1])
    # 50,000 bytes, 80/20, windows of 33: nothing but the remainders is dropped.
    assert len(a.train_x) == 40_000 // 33 and len(a.val_x) == 10_000 // 33


def test_text_comes_from_sorted_stdlib_files() -> None:
    task = load_task("text", text_bytes=50_000, seq_len=32)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert list(task.sources) == sorted(task.sources) and len(task.sources) >= 2
    assert all(name.endswith(".py") and (stdlib / name).is_file() for name in task.sources)
    # Independent check: the first window is the first file's header and first bytes.
    first = f"# ===== {task.sources[0]} =====\n".encode() + (stdlib / task.sources[0]).read_bytes()
    window = bytes([*task.train_x[0].tolist(), int(task.train_y[0, -1])])
    assert first.startswith(window)
    assert f"{len(task.sources)} files" in task.describe()


# ─────────────────────────────────────────────────────────────────────────────
# cifar10: small folders in the real formats
# ─────────────────────────────────────────────────────────────────────────────

RECORDS = 20


def _batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Six batches of RECORDS random images: name stem → ((N, 3072) uint8, (N,) labels)."""
    rng = np.random.default_rng(seed)
    return {
        stem: (
            rng.integers(0, 256, (RECORDS, 3072), dtype=np.uint8),
            rng.integers(0, 10, RECORDS, dtype=np.int64),
        )
        for stem in CIFAR_PYTHON_FILES
    }


def _write_binary(folder: Path, batches: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (pixels, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], pixels], axis=1)
        (folder / f"{stem}.bin").write_bytes(records.tobytes())


def _py2_str(s: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING or BINSTRING."""
    if len(s) < 256:
        return b"U" + bytes([len(s)]) + s
    return b"T" + struct.pack("<i", len(s)) + s


def _py2_pickle(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch pickled the way Python 2's cPickle wrote the real files (protocol 2, numpy.core)."""
    dtype = [
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"\x89\x88\x87R",  # dtype('u1', False, True)
        b"(K\x03" + _py2_str(b"|") + b"NNN",  # state (3, '|', None, None, None,
        b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",  # -1, -1, 0); BUILD
    ]
    array = [
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n",
        b"K\x00\x85" + _py2_str(b"b") + b"\x87R",  # _reconstruct(ndarray, (0,), 'b')
        b"(K\x01J" + struct.pack("<i", len(pixels)) + b"M\x00\x0c\x86",  # state (1, (N, 3072),
        *dtype,
        b"\x89" + _py2_str(pixels.tobytes()) + b"tb",  # False, raw bytes); BUILD
    ]
    label_list = b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    items = [
        _py2_str(b"batch_label") + _py2_str(b"training batch"),
        _py2_str(b"labels") + label_list,
        _py2_str(b"data") + b"".join(array),
    ]
    return b"\x80\x02}(" + b"".join(items) + b"u."  # PROTO 2, {...} via SETITEMS, STOP


def _write_python(folder: Path, batches: dict, py2: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (pixels, labels) in batches.items():
        if py2:
            blob = _py2_pickle(pixels, labels)
        else:  # re-pickled from Python 3: numpy._core names, BINBYTES
            batch = {b"batch_label": b"b", b"labels": labels.tolist(), b"data": pixels}
            blob = pickle.dumps(batch, protocol=3)
        (folder / stem).write_bytes(blob)


def _expected_pixel(pixels: np.ndarray, i: int, c: int, h: int, w: int) -> float:
    raw = pixels[i, c * 1024 + h * 32 + w] / 255.0
    return (raw - CIFAR_MEAN[c]) / CIFAR_STD[c]


def _check_cifar(task, batches: dict) -> None:
    assert task.topology is Topology.CNN and task.num_classes == 10
    assert task.train_x.shape == (5 * RECORDS, 3, 32, 32)
    assert task.val_x.shape == (RECORDS, 3, 32, 32)
    assert task.train_x.dtype == torch.float32 and task.val_y.dtype == torch.int64
    pixels, labels = batches["data_batch_3"]
    row = 2 * RECORDS + 7  # record 7 of the third training batch
    assert int(task.train_y[row]) == labels[7]
    assert float(task.train_x[row, 1, 5, 9]) == pytest.approx(_expected_pixel(pixels, 7, 1, 5, 9))
    pixels, labels = batches["test_batch"]
    assert task.val_y.tolist() == labels.tolist()
    assert float(task.val_x[3, 2, 31, 0]) == pytest.approx(_expected_pixel(pixels, 3, 2, 31, 0))


def test_py2_pickle_helper_matches_standard_unpickling() -> None:
    pixels, labels = _batches()["test_batch"]
    batch = pickle.loads(_py2_pickle(pixels, labels), encoding="bytes")
    assert np.array_equal(batch[b"data"], pixels) and batch[b"labels"] == labels.tolist()


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-bin"])
def test_cifar10_binary_format(tmp_path: Path, subfolder: str) -> None:
    batches = _batches()
    _write_binary(tmp_path / subfolder, batches)
    _check_cifar(load_task("cifar10", data_dir=tmp_path), batches)


@pytest.mark.parametrize(
    ("subfolder", "py2"), [("", True), ("cifar-10-batches-py", True), ("", False)]
)
def test_cifar10_python_format(tmp_path: Path, subfolder: str, py2: bool) -> None:
    batches = _batches(seed=1)
    _write_python(tmp_path / subfolder, batches, py2=py2)
    _check_cifar(load_task("cifar10", data_dir=tmp_path), batches)


def test_cifar10_missing_files_name_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"data_batch_1\.bin"):
        load_task("cifar10")
    with pytest.raises(TaskError, match=r"test_batch\.bin"):
        load_task("cifar10", data_dir=tmp_path / "nowhere")
    _write_binary(tmp_path, _batches())
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(TaskError, match=r"lacks test_batch\.bin"):
        load_task("cifar10", data_dir=tmp_path)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesWithNumpy:
    """Uses a numpy global that is not on the allow-list (np.save writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (np.save, (str(self.marker), np.zeros(1)))


@pytest.mark.parametrize("payload", [_RunsCommand, _WritesWithNumpy])
def test_cifar10_hostile_pickle_is_refused_unexecuted(tmp_path: Path, payload: type) -> None:
    _write_python(tmp_path, _batches())
    marker = tmp_path / "pwned"
    hostile = {b"data": payload(marker), b"labels": [0]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(hostile, protocol=3))
    with pytest.raises(TaskError, match="data_batch_1: refused as unsafe") as info:
        load_task("cifar10", data_dir=tmp_path)
    assert payload.__reduce__(payload(marker))[0].__name__ in str(info.value)
    assert not list(tmp_path.glob("pwned*"))


def test_cifar10_truncated_files_are_named(tmp_path: Path) -> None:
    _write_binary(tmp_path / "bin", _batches())
    path = tmp_path / "bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TaskError, match=r"data_batch_3\.bin: truncated or corrupt"):
        load_task("cifar10", data_dir=tmp_path / "bin")

    _write_python(tmp_path / "py", _batches())
    path = tmp_path / "py" / "test_batch"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(TaskError, match="test_batch: truncated or corrupt"):
        load_task("cifar10", data_dir=tmp_path / "py")


def test_cifar10_bad_labels_are_corrupt(tmp_path: Path) -> None:
    batches = _batches()
    batches["data_batch_2"][1][0] = 12  # labels live in 0…9
    _write_binary(tmp_path, batches)
    with pytest.raises(TaskError, match=r"data_batch_2\.bin: truncated or corrupt"):
        load_task("cifar10", data_dir=tmp_path)


# ─────────────────────────────────────────────────────────────────────────────
# user tensors
# ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("shape", "topology"),
    [((3, 4, 4), Topology.CNN), ((5, 2), Topology.SEQ), ((6,), Topology.VEC)],
)
def test_from_tensors_infers_topology_and_classes(shape: tuple, topology: Topology) -> None:
    task = from_tensors(
        torch.randn(10, *shape),
        torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
        torch.randn(4, *shape),
        torch.tensor([0, 4, 1, 2]),
    )
    assert task.topology is topology and task.num_classes == 5 and task.num_outputs == 5
    assert task.input_shape == shape and task.name == "custom"


def test_from_tensors_rejects_mismatches() -> None:
    x, y = torch.randn(10, 6), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="train_y"):
        from_tensors(x, y[:9], x, y)
    with pytest.raises(ValueError, match="val_x samples"):
        from_tensors(x, y, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match="integer labels"):
        from_tensors(x, y.float(), x, y)
    with pytest.raises(ValueError, match="dims"):
        from_tensors(torch.randn(10), y, x, y)


def test_from_tensors_takes_token_windows_as_next_token_prediction() -> None:
    text = load_task("text", text_bytes=20_000, seq_len=16)
    task = from_tensors(text.train_x, text.train_y, text.val_x, text.val_y)
    assert task.topology is Topology.SEQ and task.input_shape == (16,)
    assert (task.metric, task.higher_is_better, task.num_classes) == ("bits_per_token", False, None)
    top = max(int(t.max()) for t in (text.train_x, text.train_y, text.val_x, text.val_y))
    assert task.vocab_size == task.num_outputs == top + 1
    assert torch.equal(task.train_y, text.train_y)
    ids = torch.randint(0, 5, (4, 8))
    with pytest.raises(ValueError, match="val_y"):
        from_tensors(ids, ids, ids, ids[:, 0])
    with pytest.raises(ValueError, match="non-negative integer token ids"):
        from_tensors(ids, ids, ids, ids - 1)
    # integer features with one label per row stay a classification task
    assert from_tensors(ids, ids[:, 0], ids, ids[:, 0]).metric == "accuracy"


# ─────────────────────────────────────────────────────────────────────────────
# Batches
# ─────────────────────────────────────────────────────────────────────────────

N, BATCH = 103, 10  # 11 batches per epoch, the last one of 3


def _batcher(seed: int = 0, **kwargs) -> Batches:
    index = torch.arange(N)
    return Batches(index[:, None].float(), index, BATCH, generator_seed=seed, **kwargs)


def _order(batches) -> list[int]:
    return [i for _, yb in batches for i in yb.tolist()]


def test_one_epoch_covers_every_index_once() -> None:
    b = _batcher()
    assert len(b) == b.batches_per_epoch == 11
    epoch = list(b)
    assert len(epoch) == 11 and len(epoch[-1][1]) == 3
    order = _order(epoch)
    assert sorted(order) == list(range(N)) and order != list(range(N))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in epoch)  # x and y stay paired
    assert b.epoch == 1


def test_order_follows_seed_and_changes_each_epoch() -> None:
    a, b, c = _batcher(5), _batcher(5), _batcher(6)
    first = _order(a)
    assert first == _order(b) and first != _order(c)
    assert _order(a) != first


def test_unshuffled_and_drop_last() -> None:
    assert _order(_batcher(shuffle=False)) == list(range(N))
    b = _batcher(drop_last=True)
    assert len(b) == 10 and all(len(yb) == BATCH for _, yb in b)
    with pytest.raises(ValueError, match="no batch"):
        Batches(torch.zeros(3, 1), torch.zeros(3), 4, generator_seed=0, drop_last=True)


def test_take_continues_across_epochs() -> None:
    b, reference = _batcher(), _batcher()
    taken = list(b.take(25))
    assert len(taken) == 25 and b.epoch == 2
    expected = _order(reference) + _order(reference) + _order(reference)
    assert _order(taken) == expected[: len(_order(taken))]
    assert sorted(_order(taken[:11])) == list(range(N))
    rest = list(b)  # iterating finishes the epoch that take() left part-way
    assert len(rest) == 8 and _order(taken[22:]) + _order(rest) == expected[2 * N :]


@pytest.mark.parametrize("consumed", [11, 14])  # at an epoch boundary, and mid-epoch
def test_state_dict_round_trip_resumes_the_same_batches(tmp_path: Path, consumed: int) -> None:
    b = _batcher()
    list(b.take(consumed))
    torch.save(b.state_dict(), tmp_path / "batches.pt")
    future = _order(b.take(30))
    resumed = _batcher(seed=999)
    resumed.load_state_dict(torch.load(tmp_path / "batches.pt", weights_only=True))
    assert resumed.epoch == 1
    assert _order(resumed.take(30)) == future


def test_load_state_dict_rejects_other_sizes() -> None:
    state = _batcher().state_dict()
    other = Batches(torch.zeros(50, 1), torch.zeros(50), BATCH, generator_seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        other.load_state_dict(state)
