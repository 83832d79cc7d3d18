"""DenseNet-BC (Huang et al. 2017) from resfast's dense blocks: each block
builds its concatenated features in one preallocated buffer, so activation
memory grows linearly with depth. Attribute names follow torchvision's
DenseNet, so its state dicts load with strict=True."""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from resfast.nn.dense import DenseBlock, Transition
from resfast.nn.members import has_hooks
from resfast.nn.norm_conv import batch_norm_max_pool


class Features(nn.Sequential):
    """torchvision's `features` Sequential (conv0, norm0, relu0, pool0, the
    dense blocks and transitions, norm5), with the stem's norm0 → relu0 →
    pool0 applied as one op that saves only its input. A stem changed by the
    user (other modules, hooks, a slice) and torch.fx traces get
    nn.Sequential's forward."""

    def _fused_stem(self):
        names = list(self._modules)[:4]
        if names != ["conv0", "norm0", "relu0", "pool0"] or torch.fx._symbolic_trace.is_fx_tracing():
            return None
        norm, relu, pool = (self._modules[n] for n in names[1:])
        if type(norm) is not nn.BatchNorm2d or type(relu) is not nn.ReLU or type(pool) is not nn.MaxPool2d \
                or pool.return_indices or any(has_hooks(m) for m in (norm, relu, pool)):
            return None
        return norm, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self._fused_stem()
        if stem is None:
            return super().forward(x)
        modules = list(self._modules.values())
        x = batch_norm_max_pool(*stem, modules[0](x), "relu")
        for module in modules[4:]:
            x = module(x)
        return x


class DenseNet(nn.Module):
    """torchvision.models.DenseNet's architecture and parameter names
    (`features.conv0`, `features.denseblock1.denselayer1.norm1`, ...,
    `classifier`) on resfast's fused dense blocks and transitions."""

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000):
        super().__init__()
        self.features = Features(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def _densenet(growth_rate, block_config, num_init_features, **kwargs) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


def densenet121(**kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 24, 16), 64, **kwargs)


def densenet161(**kwargs) -> DenseNet:
    return _densenet(48, (6, 12, 36, 24), 96, **kwargs)


def densenet169(**kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 32, 32), 64, **kwargs)


def densenet201(**kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 48, 32), 64, **kwargs)


def densenet264(**kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 64, 48), 64, **kwargs)
