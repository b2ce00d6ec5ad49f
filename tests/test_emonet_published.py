"""Our EmoNet against the network as the published definition builds it (face-analysis/emonet,
``emonet/models/emonet.py``).

``PublishedEmoNet`` below is written for this test from a reading of that file (structure only,
nothing copied): FAN's ConvBlock (pre-activation BN -> ReLU -> 3x3 conv, three times, the three
outputs concatenated, plus a BN -> ReLU -> 1x1 residual when widths differ), the hourglass that
downsamples with max pooling, two stacked modules, the heatmap-summed attention mask, and the
emotion head. Both networks get the same random weights; outputs and key names must agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.emotion import EmoNet


class PublishedConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = nn.Conv2d(cout // 2, cout // 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = nn.Conv2d(cout // 4, cout // 4, 3, padding=1, bias=False)
        self.downsample = None
        if cin != cout:
            self.downsample = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x):
        a = self.conv1(torch.relu(self.bn1(x)))
        b = self.conv2(torch.relu(self.bn2(a)))
        c = self.conv3(torch.relu(self.bn3(b)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat([a, b, c], 1) + skip


class PublishedHourGlass(nn.Module):
    def __init__(self, depth: int = 4):
        super().__init__()
        self.depth = depth
        self._build(depth)

    def _build(self, level):  # registration order as published: b1, b2, deeper levels, b3
        setattr(self, f"b1_{level}", PublishedConvBlock(256, 256))
        setattr(self, f"b2_{level}", PublishedConvBlock(256, 256))
        if level > 1:
            self._build(level - 1)
        else:
            setattr(self, f"b2_plus_{level}", PublishedConvBlock(256, 256))
        setattr(self, f"b3_{level}", PublishedConvBlock(256, 256))

    def _run(self, level, x):
        upper = getattr(self, f"b1_{level}")(x)
        lower = getattr(self, f"b2_{level}")(F.max_pool2d(x, 2, stride=2))
        lower = self._run(level - 1, lower) if level > 1 else getattr(self, f"b2_plus_{level}")(lower)
        lower = getattr(self, f"b3_{level}")(lower)
        return upper + F.interpolate(lower, scale_factor=2, mode="nearest")

    def forward(self, x):
        return self._run(self.depth, x)


class PublishedEmoNet(nn.Module):
    def __init__(self, n_expression: int = 8, modules_count: int = 2, blocks: int = 4):
        super().__init__()
        self.modules_count = modules_count
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = PublishedConvBlock(64, 128)
        self.conv3 = PublishedConvBlock(128, 128)
        self.conv4 = PublishedConvBlock(128, 256)
        for i in range(modules_count):
            setattr(self, f"m{i}", PublishedHourGlass())
            setattr(self, f"top_m_{i}", PublishedConvBlock(256, 256))
            setattr(self, f"conv_last{i}", nn.Conv2d(256, 256, 1))
            setattr(self, f"bn_end{i}", nn.BatchNorm2d(256))
            setattr(self, f"l{i}", nn.Conv2d(256, 68, 1))
            if i < modules_count - 1:
                setattr(self, f"bl{i}", nn.Conv2d(256, 256, 1))
                setattr(self, f"al{i}", nn.Conv2d(68, 256, 1))
        self.conv1x1_input_emo_2 = nn.Conv2d(256 * (modules_count + 1), 256, 1)
        head = []
        for _ in range(blocks):
            head += [PublishedConvBlock(256, 256), nn.MaxPool2d(2, 2)]
        self.emo_net_2 = nn.Sequential(*head)
        self.avg_pool_2 = nn.AvgPool2d(4)
        self.emo_fc_2 = nn.Sequential(nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, n_expression + 2))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2, stride=2)
        x = self.conv4(self.conv3(x))
        previous, features = x, []
        for i in range(self.modules_count):
            ll = getattr(self, f"top_m_{i}")(getattr(self, f"m{i}")(previous))
            ll = torch.relu(getattr(self, f"bn_end{i}")(getattr(self, f"conv_last{i}")(ll)))
            heatmap = getattr(self, f"l{i}")(ll)
            if i < self.modules_count - 1:
                ll = getattr(self, f"bl{i}")(ll)
                previous = previous + ll + getattr(self, f"al{i}")(heatmap)
            features.append(ll)
        mask = heatmap.sum(1, keepdim=True)  # the last module's heatmaps weight every module's features
        emo = torch.cat([x, torch.cat(features, 1) * mask], 1)
        out = self.avg_pool_2(self.emo_net_2(self.conv1x1_input_emo_2(emo)))
        out = self.emo_fc_2(out.reshape(out.shape[0], -1))
        return {"heatmap": heatmap, "expression": out[:, :-2], "valence": out[:, -2], "arousal": out[:, -1]}


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics, scaled so 30-odd residual blocks stay in a sane range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif tensor.dim() == 1:  # BatchNorm scale
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
    return model.eval()


def test_state_dict_keys_and_shapes_are_the_published_ones():
    ours, published = EmoNet().state_dict(), PublishedEmoNet().state_dict()
    assert list(ours) == list(published)  # same names, same registration order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in published.items()}


def test_outputs_equal_the_published_network_on_the_same_weights():
    torch.manual_seed(0)
    published = randomised(PublishedEmoNet(), seed=3)
    ours = EmoNet()
    ours.load_state_dict(published.state_dict(), strict=True)
    ours.eval()
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = published(images), ours(images)
    for key in ("heatmap", "expression", "valence", "arousal"):
        scale = expected[key].abs().max()
        assert torch.isfinite(expected[key]).all() and scale > 0
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5 * float(scale), msg=key)
