"""Reference code for the parity tests, loaded from the installed packages' own files without the
package-level imports that need what these machines lack: open_clip's ``__init__`` pulls in
torchvision's transforms (PyPI's torchvision does not import beside the CPU torch here), and
open-flamingo's pulls in open_clip. Each package's directory is registered under a private name,
so its modules and their relative imports run unchanged and nothing named ``open_clip`` or
``open_flamingo`` is left in ``sys.modules`` for other tests.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import sys
import types

import pytest


def _package_dir(name: str, install: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"needs {name} ({install})")
    return os.path.dirname(spec.origin)


def _import(name: str, install: str, module: str):
    """``{name}.{module}`` from the installed package, under the private name ``_ref_{name}``."""
    alias = f"_ref_{name}"
    if alias not in sys.modules:
        package = types.ModuleType(alias)
        package.__path__ = [_package_dir(name, install)]
        sys.modules[alias] = package
    return importlib.import_module(f"{alias}.{module}")


@contextlib.contextmanager
def _modules(**stand_ins):
    """Names another module imports at its top level, present only while it is imported."""
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def open_clip_transformer():
    """open_clip's ``transformer`` module (``VisionTransformer``, ``QuickGELU``). Its ``utils``
    imports torchvision's ``FrozenBatchNorm2d`` for a helper that freezes ResNet batch norms,
    which no ViT uses: when torchvision does not import, a class that refuses to be built
    stands in for it during the import."""
    try:
        import torchvision.ops.misc  # noqa: F401

        stand_ins = {}
    except Exception:
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision is not installed: open_clip's batch-norm freezing is unavailable")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        ops = types.ModuleType("torchvision.ops")
        ops.misc = misc
        root = types.ModuleType("torchvision")
        root.ops = ops
        stand_ins = {"torchvision": root, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    with _modules(**stand_ins):
        return _import("open_clip", "pip install --no-deps open_clip_torch", "transformer")


def openflamingo_module(module: str):
    """``open_flamingo.src.{module}`` (``helpers``, ``flamingo``, ``flamingo_lm``, ``factory``)."""
    install = "pip install --no-deps open-flamingo"
    if module != "factory":
        return _import("open_flamingo", install, f"src.{module}")
    # factory.py imports open_clip for its model zoo; the test binds ``factory.open_clip`` to an
    # object with the two functions the factory calls (open_clip_zoo).
    with _modules(open_clip=types.ModuleType("open_clip")):
        return _import("open_flamingo", install, "src.factory")


def open_clip_zoo(visual, width: int):
    """What ``create_model_and_transforms`` asks of open_clip: a model whose ``visual`` is
    ``visual`` (an open_clip ``VisionTransformer`` built by the test, in place of a downloaded
    one) and the zoo config's vision width."""
    zoo = types.SimpleNamespace()
    zoo.create_model_and_transforms = lambda name, pretrained=None: (types.SimpleNamespace(visual=visual), None, None)
    zoo.get_model_config = lambda name: {"vision_cfg": {"width": width}}
    return zoo


def openflamingo_trainable_state(model) -> dict:
    """The state dict OpenFlamingo's training script saves as ``checkpoint.pt``: its own
    ``filter_state_dict_to_trainable`` (train/train_utils.py, which imports wandb at its top,
    so the function is compiled from that file's source alone)."""
    import torch

    path = os.path.join(_package_dir("open_flamingo", "pip install --no-deps open-flamingo"), "train", "train_utils.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    name = "filter_state_dict_to_trainable"
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)
    namespace = {"torch": torch}
    exec(compile(ast.Module([function], type_ignores=[]), path, "exec"), namespace)
    return namespace[name](model, model.state_dict())
