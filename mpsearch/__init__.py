"""mpsearch: search-based mixed-precision quantization for PyTorch models."""
from .cost import SizeModel
from .errors import MPSearchError
from .evaluator import Evaluation, Evaluator
from .quantize import QuantizerConfig, quantize_weight
from .space import Decision, LayerSpec, SearchSpace
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "Decision", "Evaluation", "Evaluator", "LayerSpec", "MPSearchError", "QuantizerConfig",
    "SearchSpace", "SizeModel", "Task", "quantize_weight", "__version__",
]
