"""Built-in tasks and on-device batching.

Tasks (DESIGN.md, "Tasks and hosts"):

- `digits`  scikit-learn's bundled 8×8 handwritten digits (1,797 images), (N, 1, 8, 8) in [0, 1].
- vectors   (N, F) features standardised with the training split's statistics: scikit-learn's
            bundled `breast_cancer` (569 × 30, 2 classes), `wine` (178 × 13, 3) and `iris`
            (150 × 4, 3), and `synthetic-easy` / `synthetic-hard`, fixed `make_classification`
            draws (well-separated classes; overlapping classes, noisy labels). An MLP host.
- `text`    character-level LM on the Python standard library's own top-level `*.py` sources, as
            bytes (vocab 256); x, y are (N, T) int64 windows with y = x shifted by one.
- `cifar10` the standard CIFAR-10 files from a local folder, binary or python format, (N, 3, 32, 32)
            normalised per channel. Pickles are read with an allow-list unpickler: no code runs.
- `from_tensors` wraps user tensors: classification, or next-token prediction on token ids.

`Batches` keeps a whole split on the device and slices it by a seeded permutation, so a batch costs
one gather and no Python DataLoader machinery; its generator state goes into checkpoints.
"""

from __future__ import annotations

import functools
import pickle
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper.contracts import Topology
from esper.contracts.errors import EsperError

try:  # numpy >= 2 (and 1.26's forward-compat alias); the old path only warns there
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as _multiarray

Device = str | torch.device


class TaskError(EsperError, ValueError):
    """A task cannot be built: unknown name, missing or unsafe files, impossible sizes."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class TaskData:
    """One task's splits, already on the target device, and how to score it."""

    name: str
    topology: Topology
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    input_shape: tuple[int, ...]
    """Shape of one sample, without the batch dimension."""
    metric: str
    """"accuracy" for classification, "bits_per_char" for the text task, "bits_per_token" for a
    user's token data."""
    higher_is_better: bool
    num_classes: int | None = None
    """Classification only."""
    vocab_size: int | None = None
    """Text only: token ids lie in [0, vocab_size)."""
    sources: tuple[str, ...] = field(default=())
    """Files the data came from (text: stdlib file names, in the order concatenated)."""

    @property
    def num_outputs(self) -> int:
        """Width of the model's output head: classes, or vocabulary for text."""
        out = self.num_classes if self.num_classes is not None else self.vocab_size
        assert out is not None, "a task has either num_classes or vocab_size"
        return out

    def describe(self) -> str:
        """One line: name, topology, sizes, outputs and metric."""
        outputs = f"{self.num_classes} classes" if self.num_classes else f"vocab {self.vocab_size}"
        sense = "higher" if self.higher_is_better else "lower"
        text = (
            f"{self.name}: {self.topology.name}, train {len(self.train_x)} x "
            f"{self.input_shape}, val {len(self.val_x)}, {outputs}, "
            f"{self.metric} ({sense} is better)"
        )
        if self.sources:
            text += f", from {len(self.sources)} files ({self.sources[0]} … {self.sources[-1]})"
        return text


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise TaskError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")


# ─────────────────────────────────────────────────────────────────────────────
# digits
# ─────────────────────────────────────────────────────────────────────────────


def _load_digits(seed: int, device: torch.device, val_fraction: float) -> TaskData:
    from sklearn.datasets import load_digits  # sklearn is slow to import; only this task needs it
    from sklearn.model_selection import train_test_split

    _check_val_fraction(val_fraction)
    images, labels = load_digits(return_X_y=True)  # (1797, 64) float64 in 0…16, (1797,) int
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = labels.astype(np.int64)
    tr_x, va_x, tr_y, va_y = train_test_split(
        images, labels, test_size=val_fraction, random_state=seed, stratify=labels
    )
    return TaskData(
        name="digits",
        topology=Topology.CNN,
        train_x=torch.from_numpy(tr_x).to(device),
        train_y=torch.from_numpy(tr_y).to(device),
        val_x=torch.from_numpy(va_x).to(device),
        val_y=torch.from_numpy(va_y).to(device),
        input_shape=(1, 8, 8),
        metric="accuracy",
        higher_is_better=True,
        num_classes=10,
    )


# ─────────────────────────────────────────────────────────────────────────────
# vector tasks: scikit-learn's bundled tables and fixed synthetic draws
# ─────────────────────────────────────────────────────────────────────────────

SYNTHETIC = {
    # 4 well-separated classes, 10 informative features of 20, 1% flipped labels
    "synthetic-easy": dict(
        n_samples=2000,
        n_features=20,
        n_informative=10,
        n_redundant=4,
        n_classes=4,
        class_sep=1.5,
        flip_y=0.01,
    ),
    # 6 overlapping classes of 3 clusters each, 8 informative features of 40, 5% flipped labels
    "synthetic-hard": dict(
        n_samples=2000,
        n_features=40,
        n_informative=8,
        n_redundant=8,
        n_classes=6,
        n_clusters_per_class=3,
        class_sep=0.6,
        flip_y=0.05,
    ),
}
VECTOR_TASKS = ("breast_cancer", "wine", "iris", *SYNTHETIC)


def _vector_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # slow to import; only these tasks need it

    if name in SYNTHETIC:  # the same draw everywhere: random_state is part of the task
        return datasets.make_classification(**SYNTHETIC[name], random_state=0)  # type: ignore[arg-type]
    return getattr(datasets, f"load_{name}")(return_X_y=True)


def _load_vector(name: str, seed: int, device: torch.device, val_fraction: float) -> TaskData:
    from sklearn.model_selection import train_test_split

    _check_val_fraction(val_fraction)
    x, y = _vector_arrays(name)
    tr_x, va_x, tr_y, va_y = train_test_split(
        x.astype(np.float64),
        y.astype(np.int64),
        test_size=val_fraction,
        random_state=seed,
        stratify=y,
    )
    mean, std = tr_x.mean(0), tr_x.std(0)
    std[std == 0] = 1.0  # a constant column stays 0

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return TaskData(
        name=name,
        topology=Topology.VEC,
        train_x=tensor(((tr_x - mean) / std).astype(np.float32)),
        train_y=tensor(tr_y),
        val_x=tensor(((va_x - mean) / std).astype(np.float32)),
        val_y=tensor(va_y),
        input_shape=(x.shape[1],),
        metric="accuracy",
        higher_is_better=True,
        num_classes=int(y.max()) + 1,
    )


# ─────────────────────────────────────────────────────────────────────────────
# text: the Python standard library as a byte-level corpus
# ─────────────────────────────────────────────────────────────────────────────


def stdlib_corpus(text_bytes: int) -> tuple[bytes, tuple[str, ...]]:
    """The first `text_bytes` bytes of the stdlib's top-level `*.py` files in sorted name order.

    Each file is preceded by a `# ===== name =====` header line. `_sysconfigdata_*.py` is skipped:
    it is written at build time and holds machine-specific paths, so it would make the corpus
    differ between two installs of the same Python.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(
        p.name
        for p in stdlib.glob("*.py")
        if p.is_file() and not p.name.startswith("_sysconfigdata")
    )
    chunks, used, total = [], [], 0
    for name in names:
        if total >= text_bytes:
            break
        chunk = f"# ===== {name} =====\n".encode() + (stdlib / name).read_bytes() + b"\n"
        chunks.append(chunk)
        used.append(name)
        total += len(chunk)
    return b"".join(chunks)[:text_bytes], tuple(used)


def _windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of seq_len + 1 → x = w[:, :-1], y = w[:, 1:], each (N, T)."""
    n = len(tokens) // (seq_len + 1)
    w = tokens[: n * (seq_len + 1)].view(n, seq_len + 1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _load_text(
    device: torch.device, val_fraction: float, seq_len: int, text_bytes: int
) -> TaskData:
    _check_val_fraction(val_fraction)
    if seq_len < 1 or text_bytes < 1:
        raise TaskError(f"seq_len and text_bytes must be positive, got {seq_len}, {text_bytes}")
    corpus, sources = stdlib_corpus(text_bytes)
    tokens = torch.from_numpy(np.frombuffer(corpus, dtype=np.uint8).astype(np.int64))
    n_train = int(len(tokens) * (1.0 - val_fraction))  # contiguous split: val is unseen text
    train_x, train_y = _windows(tokens[:n_train], seq_len)
    val_x, val_y = _windows(tokens[n_train:], seq_len)
    if len(train_x) == 0 or len(val_x) == 0:
        raise TaskError(
            f"text: {len(corpus)} bytes with val_fraction={val_fraction} leave no full window of "
            f"{seq_len + 1} bytes in one split; raise text_bytes or lower seq_len"
        )
    return TaskData(
        name="text",
        topology=Topology.SEQ,
        train_x=train_x.to(device),
        train_y=train_y.to(device),
        val_x=val_x.to(device),
        val_y=val_y.to(device),
        input_shape=(seq_len,),
        metric="bits_per_char",
        higher_is_better=False,
        vocab_size=256,
        sources=sources,
    )


# ─────────────────────────────────────────────────────────────────────────────
# cifar10: binary or python-pickle files from a local folder
# ─────────────────────────────────────────────────────────────────────────────

CIFAR_BINARY_FILES = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
CIFAR_PYTHON_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR_PIXELS = 3 * 32 * 32  # per record: 1024 R, then 1024 G, then 1024 B, each row-major 32×32
# Per-channel statistics of the 50,000 training images (pixels / 255).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# The only globals a pickled plain ndarray needs (protocol 2, as the real files use): its
# reconstructor, the ndarray and dtype types, and the scalar builder. Old pickles name
# numpy.core, newer ones numpy._core; both resolve to the same objects here.
_ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    (module, name): obj
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, obj in (("_reconstruct", _multiarray._reconstruct), ("scalar", _multiarray.scalar))
} | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and plain numpy arrays; refuses every other global."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the real files were written by Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise TaskError(
                f"{self._path}: refused as unsafe: the pickle asks for {module}.{name}, and only "
                "plain numpy arrays are allowed in a CIFAR-10 batch"
            ) from None


def _corrupt(path: Path, why: str) -> TaskError:
    return TaskError(f"{path}: truncated or corrupt CIFAR-10 batch ({why})")


def _check_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() > 9)):
        raise _corrupt(path, f"expected {n} labels in 0…9")
    return labels.astype(np.int64)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes → (N, 3072) uint8 pixels, (N,) int64 labels."""
    raw = path.read_bytes()
    record = 1 + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise _corrupt(path, f"{len(raw)} bytes is not a positive multiple of {record}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return rows[:, 1:], _check_labels(path, rows[:, 0], len(rows))


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A pickled dict {b'data': (N, 3072) uint8, b'labels': [N ints], ...}, read without code."""
    try:
        with path.open("rb") as f:
            batch = _ArrayOnlyUnpickler(f, path).load()
    except TaskError:
        raise
    except Exception as e:  # only allow-listed numpy callables ran, so any failure is bad data
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise _corrupt(path, "no b'data' uint8 array of shape (N, 3072)")
    if data.shape[1] != _CIFAR_PIXELS:
        raise _corrupt(path, f"b'data' has shape {data.shape}, expected (N, {_CIFAR_PIXELS})")
    try:
        labels = np.asarray(batch.get(b"labels"), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise _corrupt(path, "b'labels' is not a list of integers") from e
    return data, _check_labels(path, labels, len(data))


def _find_cifar_files(data_dir: Path | None) -> tuple[list[Path], bool]:
    """The six batch files (five train, then test) and whether they are the binary format."""
    expected = (
        f"binary files {', '.join(CIFAR_BINARY_FILES)} (in data_dir or data_dir/"
        f"cifar-10-batches-bin) or python files {', '.join(CIFAR_PYTHON_FILES)} (in data_dir "
        "or data_dir/cifar-10-batches-py)"
    )
    if data_dir is None:
        raise TaskError(f"cifar10 needs data_dir, a folder holding the {expected}")
    data_dir = Path(data_dir)
    layouts = [
        (data_dir, CIFAR_BINARY_FILES),
        (data_dir / "cifar-10-batches-bin", CIFAR_BINARY_FILES),
        (data_dir, CIFAR_PYTHON_FILES),
        (data_dir / "cifar-10-batches-py", CIFAR_PYTHON_FILES),
    ]
    partial = []
    for folder, names in layouts:
        present = [(folder / n).is_file() for n in names]
        if all(present):
            return [folder / n for n in names], names is CIFAR_BINARY_FILES
        if any(present):
            missing = [n for n, ok in zip(names, present, strict=True) if not ok]
            partial.append(f"{folder} lacks {', '.join(missing)}")
    found = f" ({'; '.join(partial)})" if partial else ""
    raise TaskError(
        f"cifar10: no complete CIFAR-10 set under {data_dir}{found}; expected the {expected}"
    )


def _to_images(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, 3072) uint8 → (N, 3, 32, 32) float32, normalised per channel; converted on device."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).view(-1, 3, 32, 32)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


def _load_cifar10(data_dir: Path | None, device: torch.device) -> TaskData:
    paths, binary = _find_cifar_files(data_dir)
    read = _read_binary_batch if binary else _read_python_batch
    batches = [read(p) for p in paths]
    train_pixels = np.concatenate([b[0] for b in batches[:5]])
    train_labels = np.concatenate([b[1] for b in batches[:5]])
    val_pixels, val_labels = batches[5]
    return TaskData(
        name="cifar10",
        topology=Topology.CNN,
        train_x=_to_images(train_pixels, device),
        train_y=torch.from_numpy(train_labels).to(device),
        val_x=_to_images(val_pixels, device),
        val_y=torch.from_numpy(val_labels).to(device),
        input_shape=(3, 32, 32),
        metric="accuracy",
        higher_is_better=True,
        num_classes=10,
        sources=tuple(str(p) for p in paths),
    )


# ─────────────────────────────────────────────────────────────────────────────
# entry points
# ─────────────────────────────────────────────────────────────────────────────

TASK_NAMES = ("digits", "text", "cifar10", *VECTOR_TASKS)
SEEDED_SPLITS = ("digits", *VECTOR_TASKS)
"""Tasks whose validation split depends on the seed; the others' splits are fixed."""


def load_task(
    name: str,
    *,
    seed: int = 0,
    device: Device = "cpu",
    data_dir: Path | None = None,
    val_fraction: float = 0.2,
    seq_len: int = 64,
    text_bytes: int = 1_500_000,
) -> TaskData:
    """Build a built-in task on `device`.

    `seed` picks the digits and vector splits; text and cifar10 splits are fixed (contiguous
    tail; the official test batch). `seq_len` and `text_bytes` apply to text, `data_dir` to
    cifar10.
    """
    device = torch.device(device)
    if name == "digits":
        return _load_digits(seed, device, val_fraction)
    if name in VECTOR_TASKS:
        return _load_vector(name, seed, device, val_fraction)
    if name == "text":
        return _load_text(device, val_fraction, seq_len, text_bytes)
    if name == "cifar10":
        return _load_cifar10(data_dir, device)
    raise TaskError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")


def shared_task(
    name: str, *, seed: int = 0, device: Device = "cpu", data_dir: Path | None = None
) -> TaskData:
    """`load_task` with default options, built once per process for each (task, split, device,
    folder) and shared: episodes never write a task's tensors. Splits that do not depend on the
    seed are shared across seeds."""
    split = seed if name in SEEDED_SPLITS else 0
    return _shared(name, split, str(torch.device(device)), data_dir)


@functools.lru_cache(maxsize=8)
def _shared(name: str, seed: int, device: str, data_dir: Path | None) -> TaskData:
    return load_task(name, seed=seed, device=device, data_dir=data_dir)


_TOPOLOGY_BY_DIM = {4: Topology.CNN, 3: Topology.SEQ, 2: Topology.VEC}


def from_tensors(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    name: str = "custom",
    device: Device = "cpu",
) -> TaskData:
    """A task from user tensors.

    Classification: x (N, C, H, W), (N, T, C) or (N, C); y (N,) integer labels; scored by accuracy.
    Language modelling: x and y (N, T) integer token ids, y[:, t] the token that follows x[:, t]
    (the `text` task's windows); scored in bits per token (lower is better).
    """
    if train_x.dim() not in _TOPOLOGY_BY_DIM:
        raise TaskError(f"train_x must have 2, 3 or 4 dims (batch first), got {train_x.dim()}")
    if val_x.shape[1:] != train_x.shape[1:]:
        raise TaskError(
            f"val_x samples {tuple(val_x.shape[1:])} differ from train_x samples "
            f"{tuple(train_x.shape[1:])}"
        )
    if train_x.dim() == 2 and _is_ids(train_x) and train_y.shape == train_x.shape:
        return _token_task(train_x, train_y, val_x, val_y, name, torch.device(device))
    for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
        if y.dim() != 1 or len(x) != len(y):
            raise TaskError(
                f"{split}_y must be 1-D with one label per {split}_x row (or, for language "
                f"modelling, integer token ids shaped like {split}_x): x has shape "
                f"{tuple(x.shape)}, y has shape {tuple(y.shape)}"
            )
        _check_ids(f"{split}_y", y, "labels")
    device = torch.device(device)
    return TaskData(
        name=name,
        topology=_TOPOLOGY_BY_DIM[train_x.dim()],
        train_x=train_x.to(device),
        train_y=train_y.to(device, torch.int64),
        val_x=val_x.to(device),
        val_y=val_y.to(device, torch.int64),
        input_shape=tuple(train_x.shape[1:]),
        metric="accuracy",
        higher_is_better=True,
        num_classes=int(max(train_y.max(), val_y.max())) + 1,
    )


def _is_ids(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_ids(what: str, t: torch.Tensor, kind: str) -> None:
    if t.numel() == 0 or not _is_ids(t) or int(t.min()) < 0:
        raise TaskError(f"{what} must hold non-negative integer {kind}, at least one")


def _token_task(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    name: str,
    device: torch.device,
) -> TaskData:
    """Next-token prediction on (N, T) token-id windows."""
    if val_y.shape != val_x.shape:
        raise TaskError(
            f"val_y {tuple(val_y.shape)} must be shaped like val_x {tuple(val_x.shape)} "
            "(the next token of each position)"
        )
    splits = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}
    for what, t in splits.items():
        _check_ids(what, t, "token ids")
    ids = {k: v.to(device, torch.int64) for k, v in splits.items()}
    return TaskData(
        name=name,
        topology=Topology.SEQ,
        **ids,
        input_shape=tuple(train_x.shape[1:]),
        metric="bits_per_token",
        higher_is_better=False,
        vocab_size=max(int(t.max()) for t in splits.values()) + 1,
    )


# ─────────────────────────────────────────────────────────────────────────────
# batching
# ─────────────────────────────────────────────────────────────────────────────


class Batches:
    """Seeded mini-batches over tensors that stay on their device.

    Batches form one stream, epoch after epoch; each epoch's order is a permutation drawn from a
    CPU `torch.Generator` seeded once here. `iter(batches)` yields the rest of the current epoch
    (a whole epoch unless `take` stopped part-way); `take(n)` yields exactly n batches, crossing
    epoch boundaries. State advances as batches are consumed, and `state_dict()` captures it, so a
    resumed run draws the same future batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        generator_seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.num_samples = len(x)
        full, rest = divmod(self.num_samples, batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples make no batch of {batch_size}")
        self._generator = torch.Generator().manual_seed(generator_seed)
        self.epoch = 0
        """Epochs completed."""
        self._cursor = 0  # batches consumed in the current epoch
        self._order: torch.Tensor | None = None  # this epoch's permutation, on x's device
        self._epoch_start_state = self._generator.get_state()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.take(self.batches_per_epoch - self._cursor)

    def take(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly `n` batches (xb, yb) from the stream, continuing across epochs."""
        for _ in range(n):
            yield self._next_batch()

    def _draw_order(self) -> torch.Tensor | None:
        self._epoch_start_state = self._generator.get_state()
        if not self.shuffle:
            return None
        return torch.randperm(self.num_samples, generator=self._generator).to(self.x.device)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cursor == 0:
            self._order = self._draw_order()
        start = self._cursor * self.batch_size
        stop = min(start + self.batch_size, self.num_samples)
        if self._order is None:  # unshuffled: views, no copy
            xb, yb = self.x[start:stop], self.y[start:stop]
        else:
            index = self._order[start:stop]
            xb, yb = self.x[index], self.y[index]
        self._cursor += 1
        if self._cursor == self.batches_per_epoch:
            self._cursor, self.epoch = 0, self.epoch + 1
        return xb, yb

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only, so it loads with `torch.load(weights_only=True)`."""
        # Mid-epoch we keep the state from before this epoch's draw; loading redraws the order.
        mid_epoch = self._cursor > 0
        state = self._epoch_start_state if mid_epoch else self._generator.get_state()
        return {
            "generator_state": state.clone(),
            "epoch": self.epoch,
            "cursor": self._cursor,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next batch is the one that followed when `state` was taken."""
        for key in ("num_samples", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state has {key}={state[key]}, these batches have {getattr(self, key)}"
                )
        if not 0 <= state["cursor"] < self.batches_per_epoch:
            raise ValueError(f"cursor {state['cursor']} outside 0…{self.batches_per_epoch - 1}")
        self._generator.set_state(state["generator_state"])
        self.epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        if self._cursor > 0:
            self._order = self._draw_order()
