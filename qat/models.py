"""Models by name: ``torchvision.<name>``, ``timm.<name>`` (random init offline, pretrained when online).

Recipes name their model as a string (``model: torchvision.resnet18``), so a YAML file can pick any
architecture the two zoos register without code. Hugging Face transformers models are built by
the language-model tasks from a config or a local path.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from qat.errors import QATError

ZOOS = ("torchvision", "timm")


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``name`` (``torchvision.resnet18``, ``timm.vit_tiny_patch16_224``…) with a ``num_classes`` head.

    ``pretrained`` downloads weights (it needs the internet, or the zoo's local cache); with a
    new head, timm keeps the backbone and re-initialises the classifier. torchvision models take
    3-channel inputs only.

    Example:
        >>> create_model("torchvision.resnet18", num_classes=10).fc
        Linear(in_features=512, out_features=10, bias=True)
    """
    zoo, _, arch = name.partition(".")
    if zoo not in ZOOS or not arch:
        raise QATError(f"model `{name}` must be `<zoo>.<architecture>` with zoo one of {', '.join(ZOOS)} (e.g. torchvision.resnet18)")
    if importlib.util.find_spec(zoo) is None:
        raise QATError(f"model `{name}` needs `{zoo}`, which is not installed: pip install {zoo}")
    if zoo == "timm":
        import timm

        if arch not in timm.list_models():
            raise QATError(f"timm has no model `{arch}` (timm.list_models() lists them)")
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
        return torchvision.models.get_model(arch, weights="DEFAULT", **kwargs)
    return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)
