"""BatchNorm folded into the convolution before it, as every deployment runtime does.

ONNX export, ONNX Runtime, TFLite and TensorRT all fold an inference-mode BatchNorm into the
preceding convolution's weight and bias, then quantize the folded weight. mpsearch scores
exactly that weight: a task's model is folded once (a copy; the user's module is untouched),
and the space, the evaluator, plans and exporters all see the folded model.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the batchnorm is applied to that conv's output and nothing
    else reads it; both called exactly once. Found by tracing the forward with torch.fx; a model
    that does not trace folds nothing."""
    modules = dict(model.named_modules())
    if not any(isinstance(m, _BN) for m in modules.values()):
        return []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return []
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BN) or bn.running_mean is None or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), _CONV)):
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1:
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``(model, [])`` when there is nothing to fold, else a folded copy and the batchnorms folded away."""
    pairs = foldable_pairs(model)
    if not pairs:
        return model, []
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
            conv.weight, conv.bias = w, b
            parent, _, attr = bn_name.rpartition(".")
            setattr(modules[parent] if parent else folded, attr, nn.Identity())
    return folded, [bn for _, bn in pairs]
