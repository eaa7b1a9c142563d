"""``digits``: a small CNN on scikit-learn's bundled 8x8 digits (no download).

The weights ship as ``data/digits_cnn.npz`` (about 160 KB); ``python -m
mpsearch.tasks.digits`` retrains them deterministically from the same split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .task import Task, classification_task, shipped_weights

WEIGHTS = Path(__file__).parent / "data" / "digits_cnn.npz"
SEARCH_SPACE = "digits.yaml"
N_CALIBRATION = 300
N_VALIDATION = 300
BATCH = 100


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed train / calibration / validation split of the 1,797 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    x, y = x[perm], y[perm]
    n_train = len(y) - N_CALIBRATION - N_VALIDATION
    return {
        "train": (x[:n_train], y[:n_train]),
        "calibration": (x[n_train:n_train + N_CALIBRATION], y[n_train:n_train + N_CALIBRATION]),
        "validation": (x[n_train + N_CALIBRATION:], y[n_train + N_CALIBRATION:]),
    }


def train(epochs: int = 60, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    x, y = splits()["train"]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def load_model() -> DigitsCNN:
    return shipped_weights(DigitsCNN(), WEIGHTS)


def load_task() -> Task:
    s = splits()
    return classification_task(load_model(), s["calibration"], s["validation"], BATCH, "digits",
                               search_space=SEARCH_SPACE)


def accuracy(model: nn.Module, split: str) -> float:
    x, y = splits()[split]
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item()


if __name__ == "__main__":
    m = train()
    np.savez(WEIGHTS, **{k: v.numpy() for k, v in m.state_dict().items()})
    print({s: round(accuracy(m, s), 4) for s in ("train", "calibration", "validation")})
