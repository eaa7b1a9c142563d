"""Third-party log noise that says nothing about a run, kept off the user's terminal."""
from __future__ import annotations

import logging

# torchao, imported by transformers when installed and by the torchao exporter, warns at import that
# its GPU kernels cannot load on a CPU machine, and torch warns about its deprecated pytree registrations.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """Raise those loggers to ERROR, unless the user configured them."""
    for name in IMPORT_NOISE:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.ERROR)
