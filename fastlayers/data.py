"""Byte-level language-model data from a corpus every machine has offline: the Python standard library.

The corpus is the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` and
``__pycache__`` left out), read in sorted order of their path relative to that directory and
concatenated as bytes (vocabulary 256: a token is a byte). The split is by file: a file belongs to the
validation split when ``crc32(relative path) % 100 < val_percent`` (5 by default), so the split of a
file never depends on which other files exist.

Batches are random windows of ``seq_len + 1`` bytes (inputs and the next-byte labels). The windows of
training step ``s`` depend only on ``(seed, s)`` (a generator seeded from both), never on earlier
draws: a run resumed at step ``s`` sees exactly the data an uninterrupted run sees, and under DDP rank
``r`` of ``W`` takes rows ``[r B/W, (r+1) B/W)`` of the same global batch of ``B`` windows, so the data
order is identical for every world size at the same global batch. Validation batches are fixed windows
of the validation split (their own generator, independent of the training seed).
"""
import os
import sysconfig
import zlib

import torch

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root=None):
    """Sorted relative paths of the ``*.py`` files of the standard library (or of ``root``)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return root, sorted(out)


def is_validation(relpath, val_percent=5):
    """Whether a file (path relative to the corpus root) is in the validation split."""
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % 100 < val_percent


class ByteCorpus:
    """The train and validation byte streams: ``ByteCorpus(root=None, val_percent=5, max_bytes=None)``.

    ``train`` and ``val`` are 1-D uint8 tensors. ``max_bytes`` caps each split (the first files in
    sorted order), for quick runs; the cap keeps the split and the order.
    """

    def __init__(self, root=None, val_percent=5, max_bytes=None):
        if not 0 < val_percent < 100:
            raise ValueError(f"ByteCorpus: val_percent must be in (0, 100); got {val_percent}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"ByteCorpus: max_bytes must be positive; got {max_bytes}")
        self.root, files = stdlib_files(root)
        if not files:
            raise RuntimeError(f"ByteCorpus: no *.py files under {self.root}")
        parts = {"train": [], "val": []}
        sizes = {"train": 0, "val": 0}
        self.files = {"train": [], "val": []}
        for rel in files:
            split = "val" if is_validation(rel, val_percent) else "train"
            if max_bytes is not None and sizes[split] >= max_bytes:
                continue
            with open(os.path.join(self.root, rel), "rb") as f:
                data = f.read()
            parts[split].append(data)
            self.files[split].append(rel)
            sizes[split] += len(data)
        for split in parts:
            buf = b"".join(parts[split])
            if max_bytes is not None:
                buf = buf[:max_bytes]
            setattr(self, split, torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else
                    torch.empty(0, dtype=torch.uint8))

    def __repr__(self):
        return (f"ByteCorpus({self.root}: train {len(self.files['train'])} files {self.train.numel():,} bytes, "
                f"val {len(self.files['val'])} files {self.val.numel():,} bytes)")


def _generator(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def windows(data, starts, seq_len):
    """``(tokens, labels)``: int64 ``(len(starts), seq_len)`` windows of ``data`` and the next bytes."""
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def _check(data, seq_len, what):
    if data.numel() < seq_len + 2:
        raise ValueError(f"the {what} split has {data.numel()} bytes, too few for windows of seq_len {seq_len}")


def train_batch(data, step, global_batch, seq_len, seed, rank=0, world_size=1):
    """Rank ``rank``'s rows of the global batch of training step ``step``: ``(tokens, labels)`` of shape
    ``(global_batch // world_size, seq_len)``. The global batch depends only on ``(seed, step)``."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    _check(data, seq_len, "training")
    starts = torch.randint(0, data.numel() - seq_len - 1, (global_batch,), generator=_generator("train", seed, step))
    per = global_batch // world_size
    return windows(data, starts[rank * per:(rank + 1) * per], seq_len)


def val_batches(data, n_batches, batch, seq_len, rank=0, world_size=1):
    """The fixed validation set: ``n_batches`` batches of ``batch`` windows (rank's rows of each)."""
    if batch % world_size:
        raise ValueError(f"validation batch {batch} is not divisible by the world size {world_size}")
    _check(data, seq_len, "validation")
    g = _generator("val", seq_len)
    per = batch // world_size
    out = []
    for _ in range(n_batches):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
        out.append(windows(data, starts[rank * per:(rank + 1) * per], seq_len))
    return out
