"""``speech``: keyword spotting, 14 spoken words, a small convolutional-recurrent network.

Classes (``WORDS``, label = index): "zero" .. "nine", "yes", "no", "up", "down". The clips are
1 s of espeak-ng speech at 16 kHz with random speed, pitch, level, time shift and background
noise (``make_speech_data``); the model reads log-mel features (``log_mel``: torch STFT, 25 ms
Hann window, 10 ms hop, 40 mel bands) shaped (batch, 40, 98). Calibration and validation use
voices never heard in training: the split is by espeak-ng voice variant (the speaker). 392
calibration and 392 validation clips (28 of each word), in four batches of 98, speakers mixed.

Shipped: ``data/speech_eval.npz`` (calibration and validation features as uint8 codes of
``LOGMEL_RANGE``, with labels and voice names; 2.7 MB) and ``data/speech_crnn.npz`` (the
weights, 0.2 MB). ``python -m mpsearch.tasks.speech`` retrains the weights deterministically from the
training features, which do not ship: it makes them first with ``make_speech_data`` (needs
espeak-ng) when they are not in ``$MPSEARCH_CACHE`` (default ``~/.cache/mpsearch``).

Model (``SpeechCRNN``): ``front`` Conv1d(40, 64, 5, stride 2) -> ReLU -> Conv1d(64, 64, 3,
stride 2) -> ReLU over the mel frames (98 -> 24 steps), ``gru`` one GRU layer (64 -> 64), the
mean and the max of its outputs over time, ``head`` Linear(128, 14).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .task import Task, classification_task, fit_epoch, shipped_weights

DATA = Path(__file__).parent / "data"
EVAL_DATA = DATA / "speech_eval.npz"
WEIGHTS = DATA / "speech_crnn.npz"
SEARCH_SPACE = "speech.yaml"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "yes", "no", "up", "down"]
SAMPLE_RATE = 16000
N_FFT = 512
WIN = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
F_MIN, F_MAX = 20.0, 8000.0
N_FRAMES = 1 + (SAMPLE_RATE - WIN) // HOP  # 98 frames in a 1 s clip
LOGMEL_RANGE = (-14.0, 9.0)  # natural-log mel energy covered by the uint8 codes
BATCH = 98


# ---- features -----------------------------------------------------------------------------------
def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=None)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, HTK mel scale, each peaking at 1."""
    hz = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    fb = np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    return torch.from_numpy(fb).float()


def log_mel(audio: torch.Tensor) -> torch.Tensor:
    """(batch, samples) at 16 kHz -> (batch, 40, frames) natural-log mel energies (no padding)."""
    frames = audio.float().unfold(-1, WIN, HOP)  # (batch, frames, 400)
    window = torch.hann_window(WIN, periodic=True, dtype=torch.float32)
    power = torch.fft.rfft(frames * window, n=N_FFT).abs().pow(2)  # (batch, frames, 257)
    return torch.log(power @ mel_filterbank().T + 1e-6).transpose(-1, -2).contiguous()


def encode(features: torch.Tensor) -> np.ndarray:
    """Log-mel features -> uint8 codes of ``LOGMEL_RANGE`` (what ships)."""
    lo, hi = LOGMEL_RANGE
    q = torch.round((features.clamp(lo, hi) - lo) / (hi - lo) * 255.0)
    return q.to(torch.uint8).numpy()


def decode(codes: np.ndarray) -> torch.Tensor:
    """uint8 codes -> model inputs: log-mel energies, shifted and scaled to roughly [-1, 1]."""
    lo, hi = LOGMEL_RANGE
    x = torch.from_numpy(np.asarray(codes)).float() * ((hi - lo) / 255.0) + lo
    return (x - (hi + lo) / 2) / ((hi - lo) / 2)


# ---- model --------------------------------------------------------------------------------------
class SpeechCRNN(nn.Module):
    def __init__(self, n_mels: int = N_MELS, channels: int = 64, hidden: int = 64, n_classes: int = len(WORDS)):
        super().__init__()
        self.front = nn.Sequential(
            nn.Conv1d(n_mels, channels, 5, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2), nn.ReLU(),
        )
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, n_classes)

    def forward(self, x):  # x: (batch, 40, frames)
        h = self.front(x).transpose(1, 2)  # (batch, steps, channels)
        out, _ = self.gru(h)
        return self.head(torch.cat([out.mean(1), out.amax(1)], dim=1))


# ---- data ---------------------------------------------------------------------------------------
def _load_eval() -> dict[str, np.ndarray]:
    with np.load(EVAL_DATA) as d:
        return {k: d[k] for k in d.files}


def splits() -> dict[str, dict]:
    """Calibration and validation: ``x`` (n, 40, 98) float32, ``y`` (n,) int64, ``voice`` and
    ``speaker`` (n,) names."""
    d = _load_eval()
    out = {}
    for s in ("calibration", "validation"):
        order = np.random.RandomState(0).permutation(len(d[f"{s}_y"]))  # mix speakers in every batch
        out[s] = {"x": decode(d[f"{s}_x"][order]), "y": torch.from_numpy(d[f"{s}_y"][order].astype(np.int64)),
                  "voice": d[f"{s}_voice"][order], "speaker": d[f"{s}_speaker"][order]}
    return out


def training_data(path: Path | None = None) -> dict:
    """The training features (made by ``make_speech_data`` when missing: needs espeak-ng)."""
    from . import make_speech_data

    path = Path(path or make_speech_data.default_train_path())
    if not path.exists():
        make_speech_data.generate(train_path=path)
    with np.load(path) as d:
        return {"x": decode(d["x"]), "y": torch.from_numpy(d["y"].astype(np.int64)),
                "voice": d["voice"], "speaker": d["speaker"]}


def _spec_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random band of up to 6 mel bins and one span of up to 12 frames set to the floor."""
    x = x.clone()
    n, f, t = x.shape
    f0 = torch.randint(0, f - 6, (n,), generator=gen)
    fw = torch.randint(0, 7, (n,), generator=gen)
    t0 = torch.randint(0, t - 12, (n,), generator=gen)
    tw = torch.randint(0, 13, (n,), generator=gen)
    fi, ti = torch.arange(f), torch.arange(t)
    fmask = (fi[None] >= f0[:, None]) & (fi[None] < (f0 + fw)[:, None])
    tmask = (ti[None] >= t0[:, None]) & (ti[None] < (t0 + tw)[:, None])
    return x.masked_fill(fmask[:, :, None] | tmask[:, None, :], -1.0)


def train(epochs: int = 30, seed: int = 0, data: dict | None = None, log=print) -> SpeechCRNN:
    """Deterministic on one thread: fixed seeds, a fixed batch order."""
    torch.manual_seed(seed)
    model = SpeechCRNN()
    d = data or training_data()
    x, y = d["x"], d["y"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = epochs * math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    def loss(out, target):
        return nn.functional.cross_entropy(out, target, label_smoothing=0.05)

    for ep in range(epochs):
        order = torch.randperm(len(y), generator=gen).split(64)  # drawn before the batches' augmentation
        total = fit_epoch(model, opt, sched, ((_spec_augment(x[idx], gen), y[idx]) for idx in order), loss, clip=1.0)
        if log:
            log(f"epoch {ep + 1}/{epochs} loss {total / len(y):.4f}")
    return model.eval()


def load_model() -> SpeechCRNN:
    return shipped_weights(SpeechCRNN(), WEIGHTS)


def load_task() -> Task:
    s = splits()
    cal, val = s["calibration"], s["validation"]
    return classification_task(load_model(), (cal["x"], cal["y"]), (val["x"], val["y"]), BATCH, "speech",
                               search_space=SEARCH_SPACE,
                               meta={"classes": list(WORDS)})


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item()


if __name__ == "__main__":
    import time

    torch.set_num_threads(1)
    t0 = time.time()
    data = training_data()
    m = train(data=data)
    np.savez(WEIGHTS, **{k: v.numpy() for k, v in m.state_dict().items()})
    s = splits()
    print({"train": round(accuracy(m, data["x"], data["y"]), 4),
           **{k: round(accuracy(m, v["x"], v["y"]), 4) for k, v in s.items()}},
          f"{time.time() - t0:.0f} s")
