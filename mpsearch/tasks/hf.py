"""transformers, imported for offline use: nothing is downloaded, nothing is printed."""
from __future__ import annotations

import os

from ..errors import TaskError
from ..logs import quiet_import_noise


def offline_transformers(missing: str):
    """The transformers module with the hub offline and its logging quiet; ``missing``: the one-line error
    when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    quiet_import_noise()
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise TaskError(missing) from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers
