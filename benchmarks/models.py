"""Model builders with the layer shapes of ResNet-18/50, ResNeXt-50, Inception v3, EfficientNet-B0, MobileNetV2,
ConvNeXt-T and DenseNet-121, in plain torch.nn.

No torchvision or timm needed (PyPI's torchvision does not import beside our CPU torch): each builder
reproduces the published architecture's conv/pool shapes, normalisation and activations, with width
(and for Inception, EfficientNet and ConvNeXt, depth; for DenseNet, growth and blocks) arguments so that
tests can run a narrow copy at small inputs. At their defaults the parameter counts equal torchvision's.
Nothing here imports torch_manualgrad; tests and benchmarks (model_bench.py) convert the models themselves.

    resnet18(), resnet50()   11,689,512 / 25,557,032   He et al. 2016, "Deep Residual Learning", Table 1
    resnext50_32x4d()        25,028,904                Xie et al. 2017, "Aggregated Residual Transformations",
                                                       Table 1
    inception_v3()                                     Szegedy et al. 2016, "Rethinking the Inception
                                                       Architecture", Table 1 (up to the 17 x 17 grid)
    efficientnet_b0()        5,288,548                 Tan & Le 2019, "EfficientNet", Table 1
    mobilenet_v2()           3,504,872                 Sandler et al. 2018, "MobileNetV2", Table 2
    convnext_tiny()          28,589,128                Liu et al. 2022, "A ConvNet for the 2020s", section 2
    densenet121()            7,978,856                 Huang et al. 2017, "Densely Connected Convolutional
                                                       Networks", Table 1
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["resnet18", "resnet50", "resnext50_32x4d", "inception_v3", "efficientnet_b0", "mobilenet_v2", "convnext_tiny", "densenet121",
           "Conv2dSame", "ResNet", "Inception3", "EfficientNet", "MobileNetV2", "ConvNeXt", "DenseNet"]


def _channels(base, width):
    """base channels scaled by `width`, at least 1 (width=1.0 gives the published sizes)."""
    return max(1, int(round(base * width)))


# ---------------------------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first strides, a 1x1 conv + BN projects the shortcut when shapes change."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(inplanes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) (ResNet-50/101/152); the stride sits on the 3x3 conv, as in
    torchvision's "v1.5" ResNet-50. With groups > 1 (ResNeXt) the 3x3 conv is grouped, `groups` paths of
    `base_width` channels per 64 planes each."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, groups=1, base_width=64):
        super().__init__()
        inner = max(1, planes * base_width // 64) * groups
        self.conv1 = nn.Conv2d(inplanes, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(inplanes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _projection(inplanes, outplanes, stride):
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
    """Stem 7x7/2 conv (64) + BN + ReLU + 3x3/2 max-pool, four stages of blocks (64, 128, 256, 512
    planes; every stage but the first halves the resolution), global average pool, fully connected."""

    def __init__(self, block, layers, num_classes=1000, width=1.0, **block_args):
        super().__init__()
        self.block_args = block_args  # groups and base_width of ResNeXt's bottlenecks
        planes = [_channels(p, width) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, planes[0], layers[0], 1)
        self.layer2 = self._stage(block, planes[1], layers[1], 2)
        self.layer3 = self._stage(block, planes[2], layers[2], 2)
        self.layer4 = self._stage(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)

    def _stage(self, block, planes, blocks, stride):
        stage = [block(self.inplanes, planes, stride, **self.block_args)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, **self.block_args) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000, width=1.0):
    """ResNet-18: basic blocks [2, 2, 2, 2]; 20 convs + 1 max-pool converted. Input N x 3 x 224 x 224
    (any size >= 32 works)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)


def resnet50(num_classes=1000, width=1.0):
    """ResNet-50: bottleneck blocks [3, 4, 6, 3]; 53 convs + 1 max-pool converted. Input N x 3 x 224 x 224."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width)


def resnext50_32x4d(num_classes=1000, width=1.0):
    """ResNeXt-50 (32x4d): ResNet-50's bottlenecks with their 3x3 convs in 32 groups of 4 channels per 64
    planes (128..1024 channels, 4..32 a group); 53 convs (16 grouped) + 1 max-pool converted."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width, groups=32, base_width=4)


# ------------------------------------------------------------------------------------------- Inception

class BasicConv2d(nn.Module):
    """Conv (no bias) + BN (eps 1e-3) + ReLU, Inception v3's unit."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    """Four parallel branches at one resolution: 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; 3x3 average pool -> 1x1."""

    def __init__(self, cin, pool_features, width):
        super().__init__()
        c = lambda n: _channels(n, width)  # noqa: E731
        self.branch1x1 = BasicConv2d(cin, c(64), 1)
        self.branch5x5_1 = BasicConv2d(cin, c(48), 1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)
        self.out_channels = c(64) + c(64) + c(96) + pool_features

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction (35 -> 17 at full size): 3x3/2; 1x1 -> 3x3 -> 3x3/2; and a 3x3/2 max-pool called as
    F.max_pool2d, which convert() cannot reach (it is no module)."""

    def __init__(self, cin, width):
        super().__init__()
        c = lambda n: _channels(n, width)  # noqa: E731
        self.branch3x3 = BasicConv2d(cin, c(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + cin

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions (1x7 and 7x1) in parallel branches, at 17x17 in the full-size net."""

    def __init__(self, cin, c7, width):
        super().__init__()
        c = lambda n: _channels(n, width)  # noqa: E731
        self.branch1x1 = BasicConv2d(cin, c(192), 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c(192), 1)
        self.out_channels = 3 * c(192) + c(192)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], 1)


class Inception3(nn.Module):
    """Inception v3's stem (3x3/2, 3x3, 3x3 pad 1, F.max_pool2d 3x3/2, 1x1, 3x3, F.max_pool2d 3x3/2), then
    Mixed_5b-d (InceptionA x3), Mixed_6a (InceptionB), Mixed_6b.. (InceptionC), average pool, dropout, fc.
    depth: how many InceptionA and InceptionC blocks (3 and 4 in the paper). Full size takes 299 x 299
    input; 64 x 64 is the smallest comfortable one (the stem leaves 5 x 5, Mixed_6a 2 x 2)."""

    def __init__(self, num_classes=1000, width=1.0, depth_a=3, depth_c=4, dropout=0.5):
        super().__init__()
        c = lambda n: _channels(n, width)  # noqa: E731
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3)
        blocks, cin = [], c(192)
        for i, pool_features in enumerate(([32] + [64] * (depth_a - 1))[:depth_a]):
            blocks.append((f"Mixed_5{'bcdefgh'[i]}", InceptionA(cin, c(pool_features), width)))
            cin = blocks[-1][1].out_channels
        blocks.append(("Mixed_6a", InceptionB(cin, width)))
        cin = blocks[-1][1].out_channels
        for i, c7 in enumerate(([128, 160, 160, 192] + [192] * depth_c)[:depth_c]):
            blocks.append((f"Mixed_6{'bcdefgh'[i]}", InceptionC(cin, c(c7), width)))
            cin = blocks[-1][1].out_channels
        for name, block in blocks:
            self.add_module(name, block)
        self.blocks = [name for name, _ in blocks]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in self.blocks:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def inception_v3(num_classes=1000, width=1.0, depth_a=3, depth_c=4, dropout=0.5):
    """Inception v3 up to the 17 x 17 grid (Mixed_5b..6e, no auxiliary head, no 8 x 8 stage); its max-pools
    are F.max_pool2d calls as in torchvision, so they stay torch's after convert()."""
    return Inception3(num_classes, width, depth_a, depth_c, dropout)


# ---------------------------------------------------------------------------------------- EfficientNet

class Conv2dSame(nn.Conv2d):
    """TensorFlow's "SAME" padding, as timm's tf_* models use: pad (asymmetrically where needed) by the
    input size at each call, then F.conv2d. A torch.nn.Conv2d subclass with its own forward, so
    convert() leaves it alone."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _drop_path(branch, rate, training):
    """Stochastic depth (Huang et al. 2016): in training, zero a residual branch for a random `rate` of the
    samples and scale the rest by 1 / (1 - rate), so that eval (the identity) sees the same expectation."""
    if not training or rate == 0:
        return branch
    keep = 1 - rate
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    return branch * mask / keep


def _conv(cin, cout, k, stride=1, groups=1, tf_same=False):
    if tf_same:
        return Conv2dSame(cin, cout, k, stride, 0, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    """Global average pool, 1x1 reduce (to a quarter of the block's input channels) + SiLU, 1x1 expand,
    sigmoid gate on every channel."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(s))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (x6) + BN + SiLU, depthwise kxk (stride) + BN + SiLU, squeeze-excite,
    1x1 project + BN (no activation); identity shortcut with stochastic depth when shapes allow."""

    def __init__(self, cin, cout, expand, kernel, stride, drop_path, tf_same):
        super().__init__()
        mid = cin * expand
        self.expand = None
        if expand != 1:
            self.expand = nn.Sequential(_conv(cin, mid, 1, tf_same=tf_same), nn.BatchNorm2d(mid), nn.SiLU())
        self.depthwise = nn.Sequential(_conv(mid, mid, kernel, stride, groups=mid, tf_same=tf_same),
                                       nn.BatchNorm2d(mid), nn.SiLU())
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.project = nn.Sequential(_conv(mid, cout, 1, tf_same=tf_same), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.se(self.depthwise(out)))
        if not self.residual:
            return out
        return _drop_path(out, self.drop_path, self.training) + x


class EfficientNet(nn.Module):
    """EfficientNet-B0: stem 3x3/2 (32) + BN + SiLU; MBConv stages (expand, channels, repeats, stride,
    kernel) = (1,16,1,1,3) (6,24,2,2,3) (6,40,2,2,5) (6,80,3,2,3) (6,112,3,1,5) (6,192,4,2,5) (6,320,1,1,3);
    head 1x1 (1280) + BN + SiLU, average pool, dropout 0.2, fc. width scales every channel count,
    depth the repeats (rounded up). tf_same=True pads as TensorFlow does, with Conv2dSame layers."""

    STAGES = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
              (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]

    def __init__(self, num_classes=1000, width=1.0, depth=1.0, dropout=0.2, drop_path=0.2, tf_same=False):
        super().__init__()
        stem = _channels(32, width)
        self.stem = nn.Sequential(_conv(3, stem, 3, 2, tf_same=tf_same), nn.BatchNorm2d(stem), nn.SiLU())
        blocks, cin = [], stem
        repeats = [math.ceil(r * depth) for *_, r, _, _ in self.STAGES]
        total, index = sum(repeats), 0
        for (expand, channels, _, stride, kernel), n in zip(self.STAGES, repeats):
            cout = _channels(channels, width)
            for i in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1,
                                     drop_path * index / total, tf_same))
                cin, index = cout, index + 1
        self.blocks = nn.Sequential(*blocks)
        head = _channels(1280, width)
        self.head = nn.Sequential(_conv(cin, head, 1, tf_same=tf_same), nn.BatchNorm2d(head), nn.SiLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def efficientnet_b0(num_classes=1000, width=1.0, depth=1.0, dropout=0.2, drop_path=0.2, tf_same=False):
    """EfficientNet-B0 (5,288,548 parameters at full size, as timm's): 81 convs, 16 of them depthwise and 32 in
    the squeeze-excite gates. Input 224 x 224."""
    return EfficientNet(num_classes, width, depth, dropout, drop_path, tf_same)


# ----------------------------------------------------------------------------------------- MobileNetV2

def _conv_bn_relu6(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's bottleneck: 1x1 expand (x t) + BN + ReLU6 (left out when t = 1), depthwise 3x3 (stride)
    + BN + ReLU6, 1x1 project + BN with no activation (the "linear bottleneck": a ReLU on the narrow
    tensor would destroy information, section 3.2); identity shortcut when stride 1 and cin == cout."""

    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, mid, 1)]
        layers += [_conv_bn_relu6(mid, mid, 3, stride, groups=mid),
                   nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return out + x if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Table 2): stem 3x3/2 (32) + BN + ReLU6; bottleneck stages (t, c, n, s) = (1,16,1,1)
    (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), the stride on each stage's first
    block; 1x1 conv (1280) + BN + ReLU6, average pool, dropout 0.2, fc. width scales every channel count,
    the last conv's too (the paper keeps 1280 there for multipliers below 1; here width is only a knob for
    small test copies, so it shrinks everything)."""

    STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1)]

    def __init__(self, num_classes=1000, width=1.0, dropout=0.2):
        super().__init__()
        cin = _channels(32, width)
        layers = [_conv_bn_relu6(3, cin, 3, 2)]
        for expand, channels, repeats, stride in self.STAGES:
            cout = _channels(channels, width)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, expand, stride if i == 0 else 1))
                cin = cout
        head = _channels(1280, width)
        layers.append(_conv_bn_relu6(cin, head, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(torch.flatten(self.avgpool(self.features(x)), 1)))


def mobilenet_v2(num_classes=1000, width=1.0, dropout=0.2):
    """MobileNetV2 (3,504,872 parameters at full size, as torchvision's): 52 convs, 17 of them depthwise;
    no max-pool. Input 224 x 224."""
    return MobileNetV2(num_classes, width, dropout)


# -------------------------------------------------------------------------------------------- ConvNeXt

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W tensor (ConvNeXt's stem and downsampling layers):
    moved to channels-last for F.layer_norm and back, which costs no copy when the tensor is already
    laid out channels-last."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, pointwise expand (x4) + GELU, pointwise project, layer scale (a learned
    per-channel factor that starts at 1e-6, so each block begins near the identity), stochastic depth,
    identity shortcut. The pointwise layers are nn.Linear on a channels-last view, as in the reference
    implementation, so only the depthwise conv is a Conv2d that convert() swaps."""

    def __init__(self, dim, drop_path, layer_scale=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = drop_path

    def forward(self, x):
        out = self.dwconv(x).permute(0, 2, 3, 1)  # N x H x W x C: Linear and LayerNorm act on the last dim
        out = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        return x + _drop_path(out.permute(0, 3, 1, 2), self.drop_path, self.training)


class ConvNeXt(nn.Module):
    """ConvNeXt-T: stem 4x4/4 conv (96) + LayerNorm ("patchify"); stages of [3, 3, 9, 3] blocks at dims
    [96, 192, 384, 768], each later stage entered through LayerNorm + 2x2/2 conv; global average pool,
    LayerNorm, fc. Stochastic depth rises linearly over the blocks to drop_path (0.1 for ConvNeXt-T);
    LayerNorm eps 1e-6 throughout. width scales the dims, depth the block counts (rounded up)."""

    DEPTHS, DIMS = (3, 3, 9, 3), (96, 192, 384, 768)

    def __init__(self, num_classes=1000, width=1.0, depth=1.0, drop_path=0.1, layer_scale=1e-6):
        super().__init__()
        dims = [_channels(d, width) for d in self.DIMS]
        depths = [math.ceil(d * depth) for d in self.DEPTHS]
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.downsample = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            for i in range(len(dims) - 1))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for dim, n in zip(dims, depths):
            self.stages.append(nn.Sequential(*(ConvNeXtBlock(dim, rates.pop(0), layer_scale) for _ in range(n))))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stages[0](self.stem(x))
        for downsample, stage in zip(self.downsample, self.stages[1:]):
            x = stage(downsample(x))
        return self.fc(self.norm(x.mean((2, 3))))


def convnext_tiny(num_classes=1000, width=1.0, depth=1.0, drop_path=0.1, layer_scale=1e-6):
    """ConvNeXt-T (28,589,128 parameters at full size, as torchvision's): 22 convs converted (stem, 18
    depthwise 7x7, 3 downsampling); the 36 pointwise layers are nn.Linear and stay torch's. Input 224 x 224
    (any multiple of 32)."""
    return ConvNeXt(num_classes, width, depth, drop_path, layer_scale)


# -------------------------------------------------------------------------------------------- DenseNet

class DenseLayer(nn.Module):
    """DenseNet-B's composite function on the concatenation of every earlier output in the block:
    BN-ReLU-1x1 conv (bottleneck, bn_size * growth) - BN-ReLU-3x3 conv (growth new channels)."""

    def __init__(self, cin, growth, bn_size):
        super().__init__()
        mid = bn_size * growth
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.Module):
    """Layers whose outputs are concatenated on to their input: layer i sees cin + i * growth channels."""

    def __init__(self, cin, layers, growth, bn_size):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers))
        self.out_channels = cin + layers * growth

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """Between dense blocks: BN-ReLU-1x1 conv (compression: keep half the channels) - 2x2/2 average pool."""

    def __init__(self, cin, cout):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC: stem 7x7/2 conv (2 * growth) + BN + ReLU + 3x3/2 max-pool; dense blocks separated by
    transitions; final BN + ReLU, global average pool, fc. DenseNet-121: growth 32, blocks (6, 12, 24, 16),
    bottleneck 4 * growth, compression 0.5. width multiplies the growth rate (and with it the stem and
    the bottlenecks), as the other builders' width multiplies their channels."""

    def __init__(self, num_classes=1000, growth=32, blocks=(6, 12, 24, 16), width=1.0, bn_size=4,
                 compression=0.5):
        super().__init__()
        growth = _channels(growth, width)
        cin = 2 * growth
        layers = [nn.Conv2d(3, cin, 7, 2, 3, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, 1)]
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(cin, n, growth, bn_size))
            cin = layers[-1].out_channels
            if i != len(blocks) - 1:
                layers.append(Transition(cin, int(cin * compression)))
                cin = int(cin * compression)
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def densenet121(num_classes=1000, growth=32, blocks=(6, 12, 24, 16), width=1.0):
    """DenseNet-121 (7,978,856 parameters at full size, as torchvision's): 120 convs + 1 max-pool converted
    (the transitions' average pools stay torch's). Input 224 x 224 (any multiple of 32)."""
    return DenseNet(num_classes, growth, blocks, width)
