"""``video``: clip classification, moving digits in the manner of Moving MNIST, a small Conv3d net.

Each clip is 8 frames of 32x32 (shape (1, 8, 32, 32), values about 0..1): one of scikit-learn's
bundled 8x8 digit images, upscaled to 16x16, crosses the frame in one of four directions at 1
or 2 pixels a frame, over Gaussian noise (std 0.1-0.2). In a third of the clips a second,
*static* digit of another class sits somewhere in the frame at 40-100 % brightness (the
distractor), overlapping the moving one or not; the model must name the digit that moves.

Label = ``4 * digit + direction`` (40 classes), direction 0 right, 1 left, 2 down, 3 up
(``DIRECTIONS``); ``label // 4`` is the digit, ``label % 4`` the direction.

Clips are generated at load time, deterministically (``numpy.random.RandomState`` with fixed
seeds; no file but the weights ships): the 1,797 digit images are split once (seed 0) into
1,197 training, 300 calibration and 300 validation source images, so calibration and validation
clips (256 and 512) show digit images, distractors included, never seen in training.
Labels are drawn at random, so the 40 classes are only roughly balanced. ``python -m
mpsearch.tasks.video`` retrains ``data/video_c3d.npz`` deterministically (40 epochs of 6,000
fresh training clips, seeds 1000 + epoch; about 9 minutes on one thread).

Model (``VideoC3D``): ``features`` three Conv3d (1->8, 8->32, 32->48; 3x3x3, the first two
striding space by 2, the last space and time by 2), each followed by BatchNorm3d and ReLU;
``pool`` a global max over time and space; ``classifier`` Linear(48, 96) -> ReLU -> Linear(96,
40). ``Task.check`` folds the three BatchNorm3d into their Conv3d (``mpsearch.model.fold``), so
the task's model holds Conv3d ``features.0``, ``features.3``, ``features.6`` and Linear
``classifier.1``, ``classifier.3``; the BatchNorms become Identity.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .task import Task, classification_task, fit_epoch, shipped_weights

WEIGHTS = Path(__file__).parent / "data" / "video_c3d.npz"
SEARCH_SPACE = "video.yaml"
FRAMES, SIZE, DIGIT = 8, 32, 16
DIRECTIONS = ["right", "left", "down", "up"]
N_CLASSES = 10 * len(DIRECTIONS)
N_SOURCE = {"train": 1197, "calibration": 300, "validation": 300}
N_CLIPS = {"calibration": 256, "validation": 512}
SEEDS = {"calibration": 1, "validation": 2}
P_DISTRACTOR = 1 / 3
BATCH = 128


@lru_cache(maxsize=1)
def _source_images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digit images of each split, upscaled to 16x16, values 0..1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.kron(d.images / 16.0, np.ones((2, 2))).astype(np.float32)  # nearest-neighbour x2
    perm = np.random.RandomState(0).permutation(len(d.target))
    out, start = {}, 0
    for split, n in N_SOURCE.items():
        idx = perm[start:start + n]
        out[split] = (img[idx], d.target[idx].astype(np.int64))
        start += n
    return out


def make_clips(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips (n, 1, 8, 32, 32) float32 and labels (n,) int64 from ``split``'s source images."""
    images, digits = _source_images()[split]
    rng = np.random.RandomState(seed)
    clips = np.zeros((n, FRAMES, SIZE, SIZE), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    room = SIZE - DIGIT
    for i in range(n):
        k = rng.randint(len(images))
        direction, speed = rng.randint(4), rng.randint(1, 3)
        travel = speed * (FRAMES - 1)
        along = rng.randint(0, room - travel + 1)  # start along the motion axis
        across = rng.randint(0, room + 1)
        bright = rng.uniform(0.7, 1.0)
        if rng.rand() < P_DISTRACTOR:
            others = np.nonzero(digits != digits[k])[0]
            j = others[rng.randint(len(others))]
            r, c = rng.randint(0, room + 1, size=2)
            clips[i, :, r:r + DIGIT, c:c + DIGIT] = images[j] * rng.uniform(0.4, 1.0)
        for t in range(FRAMES):
            pos = along + speed * t if direction in (0, 2) else along + travel - speed * t
            r, c = (across, pos) if direction in (0, 1) else (pos, across)
            patch = clips[i, t, r:r + DIGIT, c:c + DIGIT]
            np.maximum(patch, images[k] * bright, out=patch)
        clips[i] += rng.randn(FRAMES, SIZE, SIZE).astype(np.float32) * rng.uniform(0.1, 0.2)
        labels[i] = 4 * digits[k] + direction
    return torch.from_numpy(clips).unsqueeze(1), torch.from_numpy(labels)


class VideoC3D(nn.Module):
    def __init__(self, n_classes: int = N_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 8, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(8), nn.ReLU(),
            nn.Conv3d(8, 32, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(32), nn.ReLU(),
            nn.Conv3d(32, 48, 3, stride=2, padding=1), nn.BatchNorm3d(48), nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(48, 96), nn.ReLU(),
            nn.Linear(96, n_classes),
        )

    def forward(self, x):  # x: (batch, 1, 8, 32, 32)
        return self.classifier(self.pool(self.features(x)))


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {s: make_clips(s, N_CLIPS[s], SEEDS[s]) for s in ("calibration", "validation")}


def train(epochs: int = 40, clips_per_epoch: int = 6000, seed: int = 0, log=print) -> VideoC3D:
    """Deterministic on one thread: fresh clips each epoch from seeded generators."""
    torch.manual_seed(seed)
    model = VideoC3D()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = epochs * math.ceil(clips_per_epoch / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    for ep in range(epochs):
        x, y = make_clips("train", clips_per_epoch, 1000 + seed * 1000 + ep)
        batches = ((x[idx], y[idx]) for idx in torch.arange(len(y)).split(64))
        total = fit_epoch(model, opt, sched, batches, nn.functional.cross_entropy)
        if log:
            log(f"epoch {ep + 1}/{epochs} loss {total / len(y):.4f}")
    return model.eval()


def load_model() -> VideoC3D:
    return shipped_weights(VideoC3D(), WEIGHTS)


def load_task() -> Task:
    s = splits()
    return classification_task(load_model(), s["calibration"], s["validation"], BATCH, "video",
                               search_space=SEARCH_SPACE,
                               meta={"classes": [f"{d} {DIRECTIONS[k]}" for d in range(10) for k in range(4)]})


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return torch.cat([model(xb).argmax(-1) for xb in x.split(BATCH)]).eq(y).float().mean().item()


if __name__ == "__main__":
    import time

    torch.set_num_threads(1)
    t0 = time.time()
    m = train()
    np.savez(WEIGHTS, **{k: v.numpy() for k, v in m.state_dict().items()})
    print({k: round(accuracy(m, *v), 4) for k, v in splits().items()}, f"{time.time() - t0:.0f} s")
