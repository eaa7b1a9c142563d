"""Make the ``speech`` task's data: 14 spoken words synthesised by espeak-ng, split by voice.

Nothing here runs when the task loads: the calibration and validation features ship in
``data/speech_eval.npz`` (so users and CI never need espeak-ng); only the training features,
too large to ship, are written outside the package. To regenerate everything::

    apt-get install espeak-ng            # Debian 12: espeak-ng 1.51
    python -m mpsearch.tasks.make_speech_data          # ~8 min on one core
                                                       # (--eval-only: the shipped file, ~30 s)
    python -m mpsearch.tasks.speech                    # retrain data/speech_crnn.npz

``--train PATH`` (default ``$MPSEARCH_CACHE/speech_train.npz``, ``MPSEARCH_CACHE`` defaulting to
``~/.cache/mpsearch``) says where the training features go; ``python -m mpsearch.tasks.speech``
reads them from the same place and runs this script first when they are missing.

What is made. Words: the ten digits, "yes", "no", "up", "down" (class = index in ``WORDS``).
A *voice* is one of espeak-ng's English accents (``ACCENTS``) with one of its voice variants
(``VARIANTS``, the ``!v/`` files: speaker timbre, pitch range, formants), written
``accent+variant``. The *speaker* is the variant: the variants are dealt (seed 0) into three
disjoint groups, training (70), calibration (14) and validation (14), whole families at a time
(``klatt``..``klatt5`` go together, see ``family``), and every accent appears in all three; so
no validation variant, nor a sibling of one, hence no validation voice, is ever heard in
training or in calibration. Each utterance gets a random speed (``-s`` 130-210 words/min) and
pitch (``-p`` 20-80), is resampled from espeak-ng's 22,050 Hz to 16 kHz, trimmed of silence, scaled to a
random level, placed at a random offset in a 1 s clip, and mixed with background noise (white,
pink or brown, at 5-30 dB SNR, plus a hum tone in a quarter of the clips). All randomness comes
from ``numpy.random.RandomState`` seeds fixed per split; espeak-ng itself is deterministic
(two runs give byte-identical files), though another espeak-ng release may render differently.

Features: ``speech.log_mel`` (torch STFT, 25 ms Hann window, 10 ms hop, 40 mel bands,
20 Hz-8 kHz, natural log) -> 40 x 98 per clip, stored as uint8 codes of the range
``speech.LOGMEL_RANGE`` (steps of 0.09 nepers, 0.4 dB), decoded by ``speech.decode``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
from math import gcd
from pathlib import Path

import numpy as np

from .speech import WORDS

# espeak-ng 1.51's English voices (``espeak-ng --voices=en``; the mbrola ones need mbrola, not used).
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
# espeak-ng 1.51's voice variants (``espeak-ng --voices=variant``, the file names after ``!v/``);
# "" is the accent's own default voice. Left out: "Mr serious" (its name has a space), and "fast",
# "caleb" and "klatt6", which render exactly like "", "klatt" and "klatt" (same bytes out).
VARIANTS = [
    "", "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris",
    "david", "Demonic", "Denis", "Diogo", "ed", "edward", "edward2", "Gene", "Gene2", "gustave", "announcer",
    "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo",
    "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Nguyen", "pablo", "paul", "pedro", "quincy",
    "RicishayMax", "RicishayMax2", "RicishayMax3", "rob", "robert", "robosoft", "robosoft2", "robosoft3", "robosoft4",
    "robosoft5", "robosoft6", "robosoft7", "robosoft8", "steph", "steph2", "steph3", "Storm", "Tweaky", "UniRobot",
    "zac", "anika", "anikaRobot", "AnxiousAndy", "f1", "f2", "f3", "f4", "f5", "whisperf", "grandpa",
    "grandma", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "m8", "norbert", "sandro", "shelby", "travis", "victor", "whisper", "croak",
]
N_VARIANTS_CALIBRATION = 14
N_VARIANTS_VALIDATION = 14
RENDITIONS_TRAIN = 2  # per (variant, accent, word): 70 x 8 x 14 x 2 = 15,680 training clips
ACCENTS_CALIBRATION = 2  # accents drawn per (variant, word): 14 x 14 x 2 = 392 calibration clips
ACCENTS_VALIDATION = 2  # 14 x 14 x 2 = 392 validation clips
SEEDS = {"train": 1, "calibration": 2, "validation": 3}
SR = 16000
ESPEAK_SR = 22050


def family(variant: str) -> str:
    """Numbered variants are one family of close voices (m1..m8, klatt..klatt5, robosoft..robosoft8)."""
    return re.sub(r"\d+$", "", variant)


def variant_split() -> dict[str, list[str]]:
    """The speakers (variants) of each split: disjoint, and a family never straddles two splits.

    Families are shuffled once (seed 0) and dealt to validation, then calibration, while each
    holds at most 14 variants; the rest train."""
    fams: dict[str, list[str]] = {}
    for v in VARIANTS:
        fams.setdefault(family(v), []).append(v)
    names = list(fams)
    out: dict[str, list[str]] = {"validation": [], "calibration": [], "train": []}
    for i in np.random.RandomState(0).permutation(len(names)):
        members = fams[names[int(i)]]
        if len(out["validation"]) + len(members) <= N_VARIANTS_VALIDATION:
            out["validation"] += members
        elif len(out["calibration"]) + len(members) <= N_VARIANTS_CALIBRATION:
            out["calibration"] += members
        else:
            out["train"] += members
    return out


def voice_name(accent: str, variant: str) -> str:
    return f"{accent}+{variant}" if variant else accent


def synthesise(word: str, voice: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """espeak-ng's rendering of ``word`` as float32 at 16 kHz."""
    from scipy.signal import resample_poly

    out = tmp / "w.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), word],
                   check=True, capture_output=True)
    with wave.open(str(out)) as w:
        assert w.getframerate() == ESPEAK_SR and w.getnchannels() == 1 and w.getsampwidth() == 2
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    g = gcd(SR, ESPEAK_SR)
    return resample_poly(x, SR // g, ESPEAK_SR // g).astype(np.float32)


def trim(x: np.ndarray, rel_db: float = -40.0) -> np.ndarray:
    """Cut leading and trailing silence: 10 ms frames more than 40 dB below the loudest frame."""
    n = len(x) // 160
    if n == 0:
        return x
    e = (x[: n * 160].reshape(n, 160) ** 2).mean(1)
    keep = np.nonzero(e > e.max() * 10 ** (rel_db / 10))[0]
    return x[keep[0] * 160:(keep[-1] + 1) * 160]


def _colored_noise(rng: np.random.RandomState, n: int) -> np.ndarray:
    kind = rng.randint(3)
    w = rng.randn(n)
    if kind == 0:  # white
        return w
    spec = np.fft.rfft(w)
    f = np.maximum(np.arange(len(spec)), 1.0)
    spec = spec / (np.sqrt(f) if kind == 1 else f)  # pink (1/f power) or brown (1/f^2 power)
    x = np.fft.irfft(spec, n)
    return x / x.std()


def make_clip(speech: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """One second: the word at a random level and offset, mixed with noise at 5-30 dB SNR."""
    speech = speech[:SR]
    speech = speech / (np.abs(speech).max() + 1e-9) * rng.uniform(0.1, 0.9)
    clip = np.zeros(SR)
    start = rng.randint(0, SR - len(speech) + 1)
    clip[start:start + len(speech)] = speech
    noise = _colored_noise(rng, SR)
    if rng.rand() < 0.25:  # mains hum with harmonics
        t = np.arange(SR) / SR
        f0 = rng.choice([50.0, 60.0])
        noise = noise + sum(rng.uniform(0.5, 2.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3))
                            for k in (1, 2, 3))
    p_speech = (speech ** 2).mean()
    snr_db = rng.uniform(5.0, 30.0)
    noise = noise / np.sqrt((noise ** 2).mean()) * np.sqrt(p_speech / 10 ** (snr_db / 10))
    return (clip + noise).astype(np.float32)


def jobs(split: str) -> list[tuple[str, str, int]]:
    """(variant, accent, word index) of every clip of ``split``, in a fixed order."""
    variants = variant_split()[split]
    rng = np.random.RandomState(100 + SEEDS[split])
    out = []
    for v in variants:
        for w in range(len(WORDS)):
            if split == "train":
                out += [(v, a, w) for a in ACCENTS for _ in range(RENDITIONS_TRAIN)]
            else:
                k = ACCENTS_CALIBRATION if split == "calibration" else ACCENTS_VALIDATION
                out += [(v, ACCENTS[i], w) for i in sorted(rng.choice(len(ACCENTS), k, replace=False))]
    return out


def make_split(split: str, tmp: Path, log=print) -> dict[str, np.ndarray]:
    import torch

    from .speech import encode, log_mel

    rng = np.random.RandomState(SEEDS[split])
    todo = jobs(split)
    clips, labels, voices, speakers = [], [], [], []
    t0 = time.time()
    for i, (variant, accent, w) in enumerate(todo):
        speed, pitch = rng.randint(130, 211), rng.randint(20, 81)
        voice = voice_name(accent, variant)
        audio = trim(synthesise(WORDS[w], voice, speed, pitch, tmp))
        clips.append(make_clip(audio, rng))
        labels.append(w)
        voices.append(voice)
        speakers.append(variant or "default")
        if (i + 1) % 2000 == 0:
            log(f"  {split}: {i + 1}/{len(todo)} clips, {time.time() - t0:.0f} s")
    feats = []
    with torch.inference_mode():
        for i in range(0, len(clips), 512):
            feats.append(encode(log_mel(torch.from_numpy(np.stack(clips[i:i + 512])))))
    return {"x": np.concatenate(feats), "y": np.array(labels, dtype=np.int64),
            "voice": np.array(voices), "speaker": np.array(speakers)}


def default_train_path() -> Path:
    return Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch")) / "speech_train.npz"


def generate(train_path: Path | None = None, eval_path: Path | None = None, eval_only: bool = False,
             log=print) -> None:
    from .speech import EVAL_DATA

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    import torch

    torch.set_num_threads(1)
    train_path = Path(train_path or default_train_path())
    eval_path = Path(eval_path or EVAL_DATA)
    todo = ("calibration", "validation") if eval_only else ("calibration", "validation", "train")
    with tempfile.TemporaryDirectory() as d:
        parts = {s: make_split(s, Path(d), log) for s in todo}  # each split has its own seeds
    eval_arrays = {f"{s}_{k}": v for s in ("calibration", "validation") for k, v in parts[s].items()}
    eval_arrays["words"] = np.array(WORDS)
    np.savez_compressed(eval_path, **eval_arrays)
    log(f"wrote {eval_path} ({eval_path.stat().st_size} bytes)")
    if not eval_only:
        train_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(train_path, **parts["train"])
        log(f"wrote {train_path} ({train_path.stat().st_size} bytes)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=Path, default=None, help="where the training features go")
    p.add_argument("--eval", type=Path, default=None, help="where the shipped calibration/validation features go")
    p.add_argument("--eval-only", action="store_true", help="remake only the shipped calibration/validation file")
    a = p.parse_args()
    t = time.time()
    generate(a.train, a.eval, a.eval_only)
    print(f"done in {time.time() - t:.0f} s")
