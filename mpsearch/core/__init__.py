"""What strategies see, as plain data: no torch is imported here or below.

space (decisions, choices, candidates), sizes (exact bytes and average bits), budget (the one
feasibility rule), records (the one evaluation record), pareto (fronts, hypervolume, knee),
repair (the one descent rule) and qconfig (how integer weights are stored).
"""
from .budget import Budget
from .pareto import HV_REFERENCE, ParetoFront, hypervolume_curve, normalize, pareto_front
from .qconfig import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig
from .records import Evaluation
from .sizes import MB, Size, SizeTable, layer_bytes
from .space import DEFAULT_BITS, Candidate, Decision, LayerSpec, SearchSpace

__all__ = ["Budget", "Candidate", "DEFAULT_BITS", "Decision", "Evaluation", "FLOAT16_BITS", "HV_REFERENCE",
           "LayerSpec", "MB", "ParetoFront", "QuantizerConfig", "SearchSpace", "Size", "SizeTable", "UNQUANTIZED_BITS",
           "hypervolume_curve", "layer_bytes", "normalize", "pareto_front"]
