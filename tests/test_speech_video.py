"""The ``speech`` and ``video`` built-in tasks: offline loading, shipped weights, honest splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpsearch.tasks import load_task
from mpsearch.tasks import make_speech_data, speech, video

MAX_SHIPPED = 3_000_000  # bytes of data files per task
# Full-precision accuracies of the shipped weights (the task's model, BatchNorm folded), as
# printed by `python -m mpsearch.tasks.speech` / `python -m mpsearch.tasks.video`.
RECORDED = {
    "speech": {"calibration": 380 / 392, "validation": 385 / 392},
    "video": {"calibration": 245 / 256, "validation": 494 / 512},
}


@pytest.fixture(scope="module")
def speech_task():
    return load_task("speech")


@pytest.fixture(scope="module")
def video_task():
    return load_task("video")


def _accuracy(task) -> dict[str, float]:
    out = {}
    with torch.inference_mode():
        for split in ("calibration", "validation"):
            batches = getattr(task, split)
            pred = torch.cat([task.model(x).argmax(-1) for x, _ in batches])
            out[split] = (pred == torch.cat([y for _, y in batches])).float().mean().item()
    return out


def _n(batches) -> int:
    return sum(len(y) for _, y in batches)


# ---- speech -------------------------------------------------------------------------------------
def test_speech_task_facts(speech_task):
    t = speech_task
    assert t.name == "speech" and t.metric == "accuracy" and t.search_space == "speech.yaml"
    assert _n(t.calibration) == 392 and _n(t.validation) == 392
    for x, y in t.calibration + t.validation:
        assert x.dtype == torch.float32 and x.shape[1:] == (speech.N_MELS, speech.N_FRAMES) == (40, 98)
        assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < len(speech.WORDS) == 14
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    for split in ("calibration", "validation"):  # every word, equally often
        y = torch.cat([y for _, y in getattr(t, split)])
        assert torch.bincount(y, minlength=14).unique().numel() == 1
    kinds = {type(m).__name__ for m in t.model.modules()}
    assert {"Conv1d", "GRU", "Linear"} <= kinds
    n_params = sum(p.numel() for p in t.model.parameters())
    assert 10_000 <= n_params <= 200_000


def test_speech_weights_reproduce_recorded_accuracy(speech_task):
    acc = _accuracy(speech_task)
    assert acc["validation"] >= 0.90
    for split, want in RECORDED["speech"].items():
        assert acc[split] == pytest.approx(want, abs=1e-6)


def test_speech_split_is_by_voice():
    s = speech.splits()
    cal_val = {k: set(s[k]["speaker"].tolist()) for k in s}
    plan = make_speech_data.variant_split()
    train_speakers = {v or "default" for v in plan["train"]}
    # the shipped data matches the plan: every validation speaker is a validation variant
    assert cal_val["validation"] == {v or "default" for v in plan["validation"]}
    assert cal_val["calibration"] == {v or "default" for v in plan["calibration"]}
    assert not cal_val["validation"] & (cal_val["calibration"] | train_speakers)
    assert not cal_val["calibration"] & train_speakers
    # no family of close variants straddles two splits, so no validation voice is heard elsewhere
    fam = {k: {make_speech_data.family(v) for v in vs} for k, vs in plan.items()}
    assert not fam["validation"] & (fam["train"] | fam["calibration"])
    train_voices = {make_speech_data.voice_name(a, v) for v in plan["train"] for a in make_speech_data.ACCENTS}
    val_voices = set(s["validation"]["voice"].tolist())
    assert val_voices and not val_voices & (train_voices | set(s["calibration"]["voice"].tolist()))
    assert {j[0] for j in make_speech_data.jobs("train")} == set(plan["train"])


def test_log_mel_matches_a_direct_dft():
    """The torch STFT + mel filterbank against numpy: 1 s -> (40, 98), a tone lands in its band."""
    t = np.arange(speech.SAMPLE_RATE) / speech.SAMPLE_RATE
    audio = 0.5 * np.sin(2 * np.pi * 1000.0 * t) + 0.01 * np.random.RandomState(0).randn(len(t))
    feats = speech.log_mel(torch.from_numpy(audio).float()[None])[0]
    assert feats.shape == (40, 98)
    frame = audio[:speech.WIN] * np.hanning(speech.WIN + 1)[:-1]
    power = np.abs(np.fft.rfft(frame, speech.N_FFT)) ** 2
    want = np.log(speech.mel_filterbank().double().numpy() @ power + 1e-6)
    assert np.allclose(feats[:, 0].double().numpy(), want, atol=1e-3)
    centres = speech.mel_filterbank().argmax(1) * speech.SAMPLE_RATE / speech.N_FFT
    assert abs(float(centres[feats[:, 50].argmax()]) - 1000.0) < 150.0
    codes = speech.encode(feats[None])
    lo, hi = speech.LOGMEL_RANGE
    back = speech.decode(codes)[0] * (hi - lo) / 2 + (hi + lo) / 2
    inside = (feats > lo) & (feats < hi)
    assert (back - feats)[inside].abs().max() <= (hi - lo) / 255 / 2 + 1e-5


# ---- video --------------------------------------------------------------------------------------
def test_video_task_facts(video_task):
    t = video_task
    assert t.name == "video" and t.metric == "accuracy" and t.search_space == "video.yaml"
    assert _n(t.calibration) == 256 and _n(t.validation) == 512
    for x, y in t.calibration + t.validation:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 32, 32)
        assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < 40
    y = torch.cat([y for _, y in t.validation])
    assert len(set((y // 4).tolist())) == 10 and len(set((y % 4).tolist())) == 4
    kinds = {type(m).__name__ for m in t.model.modules()}
    assert {"Conv3d", "Linear"} <= kinds
    assert 10_000 <= sum(p.numel() for p in t.model.parameters()) <= 200_000


def test_video_weights_reproduce_recorded_accuracy(video_task):
    acc = _accuracy(video_task)
    assert acc["validation"] >= 0.90
    for split, want in RECORDED["video"].items():
        assert acc[split] == pytest.approx(want, abs=1e-6)


def test_video_generation_is_deterministic(video_task):
    again = video.load_task()
    for split in ("calibration", "validation"):
        for (x1, y1), (x2, y2) in zip(getattr(video_task, split), getattr(again, split)):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = video.make_clips("train", 4, 7)
    x2, y2 = video.make_clips("train", 4, 7)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_video_sources_are_disjoint():
    """Calibration and validation clips are drawn from digit images that training never sees."""
    src = video._source_images()
    assert {s: len(src[s][0]) for s in src} == {"train": 1197, "calibration": 300, "validation": 300}
    pixels = {s: {img.tobytes() for img in src[s][0]} for s in src}
    assert sum(len(p) for p in pixels.values()) == 1797  # all distinct, none shared between splits
    assert all(set(src[s][1].tolist()) == set(range(10)) for s in src)


def test_video_clip_semantics():
    """The digit moves the labelled way: where the last frame gained ink versus where it lost it."""
    x, y = video.make_clips("validation", 128, 11)
    rows, cols = np.mgrid[:32, :32]
    for clip, label in zip(x[:, 0], y):
        diff = (clip[-1] - clip[0]).numpy()
        gain, loss = np.where(diff > 0.4, diff, 0), np.where(diff < -0.4, -diff, 0)
        drow = (gain * rows).sum() / gain.sum() - (loss * rows).sum() / loss.sum()
        dcol = (gain * cols).sum() / gain.sum() - (loss * cols).sum() / loss.sum()
        got = (0 if dcol > 0 else 1) if abs(dcol) > abs(drow) else (2 if drow > 0 else 3)
        assert got == int(label) % 4


# ---- both ---------------------------------------------------------------------------------------
def test_shipped_files_are_small():
    speech_files = sorted(speech.DATA.glob("speech_*.npz"))
    video_files = sorted(speech.DATA.glob("video_*.npz"))
    assert {f.name for f in speech_files} == {"speech_eval.npz", "speech_crnn.npz"}
    assert {f.name for f in video_files} == {"video_c3d.npz"}
    assert sum(f.stat().st_size for f in speech_files) <= MAX_SHIPPED
    assert sum(f.stat().st_size for f in video_files) <= MAX_SHIPPED
    assert speech.WEIGHTS.stat().st_size <= 500_000 and video.WEIGHTS.stat().st_size <= 500_000


@pytest.mark.parametrize("name", ["speech", "video"])
def test_shipped_space_searches_every_weight(name, speech_task, video_task):
    """The task's space covers every weight of two or more dimensions (so no warning), the GRU's and
    Conv3d's included, and the quantized GRU/Conv3d change what the model computes."""
    import warnings

    from mpsearch.errors import MPSearchWarning
    from mpsearch.evaluator import Evaluator
    from mpsearch.model import space_for

    task = speech_task if name == "speech" else video_task
    with warnings.catch_warnings():
        warnings.simplefilter("error", MPSearchWarning)
        space = space_for(task, None)
    weights = {n for n, p in task.model.named_parameters() if p.dim() >= 2}
    assert {s.weight_name for s in space.layers.values()} == weights
    kinds = {s.kind for s in space.layers.values()}
    assert kinds == ({"Conv1d", "GRU", "Linear"} if name == "speech" else {"Conv3d", "Linear"})
    special = [d for d in space.decisions if space.layers[d.layers[0]].kind in ("GRU", "Conv3d")]
    with Evaluator(task, space, cache_dir=None) as ev:
        top = ev.evaluate(space.highest()).metric
        for d in special:  # 2 bits on that weight alone costs accuracy: it is really swapped in
            cand = tuple(2 if e is d else e.choices[-1] for e in space.decisions)
            assert ev.evaluate(cand).metric < top, d.name


def test_video_plan_runs_in_onnxruntime_and_speech_plan_is_refused(video_task, speech_task, tmp_path):
    """Conv3d weights travel to ONNX Runtime as their integers (ORT computes what was scored); the speech
    plan's GRU matrices, which torch's ONNX export packs and reorders by gate, are refused in one line."""
    from mpsearch.errors import MPSearchError
    from mpsearch.evaluator import Evaluator
    from mpsearch.exporters import export
    from mpsearch.exporters.onnxruntime import run_onnx, session
    from mpsearch.model import space_for
    from mpsearch.plan import QuantizationPlan

    space = space_for(video_task)
    cand = tuple(d.choices[i % 3] for i, d in enumerate(space.decisions))  # 2, 3 and 4 bits
    with Evaluator(video_task, space, cache_dir=None) as ev:
        plan = QuantizationPlan.from_candidate(ev, cand)
        ev.apply(cand)
        with torch.no_grad():
            expected = torch.cat([video_task.model(x) for x, _ in ev.validation])
        ev.restore()
    res = export(plan, "onnxruntime", tmp_path / "video.onnx", video_task)
    kinds = {plan.layers[d["layer"]]["kind"] for d in res.details["initializers"].values()}
    assert kinds == {"Conv3d", "Linear"}
    assert torch.allclose(run_onnx(session(tmp_path / "video.onnx"), video_task.validation), expected, atol=1e-4)

    sspace = space_for(speech_task)
    with Evaluator(speech_task, sspace, cache_dir=None) as ev:
        splan = QuantizationPlan.from_candidate(ev, sspace.uniform(4))
    with pytest.raises(MPSearchError, match="^onnxruntime export: layer 'gru.weight_ih_l0' is a GRU weight"):
        export(splan, "onnxruntime", tmp_path / "speech.onnx", speech_task)
