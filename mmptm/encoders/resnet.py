"""OpenAI CLIP's modified ResNet image tower (the RN50, RN101, RN50x4, ... models).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Sec. 2.4: a ResNet (He et al. 2016, "Deep Residual Learning for Image
Recognition") with the ResNet-D tweaks of He et al. 2019 ("Bag of Tricks for Image
Classification with Convolutional Neural Networks": a three-convolution stem, and an
average pool before each strided step, the anti-aliasing of Zhang 2019), and attention
pooling in place of global average pooling. Module and parameter names follow
open_clip's ``ModifiedResNet`` (and OpenAI's release), so their weights load one to one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmptm.encoders.layers import check_image_size
from mmptm.encoders.vision import OPENAI_MEAN, OPENAI_STD
from mmptm.registry import register_encoder


def _downsample(stride: int) -> nn.Module:
    """Anti-aliased striding: average ``stride x stride`` windows instead of skipping pixels."""
    return nn.AvgPool2d(stride) if stride > 1 else nn.Identity()


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1 convolutions) whose stride is an average pool.

    Args:
        inplanes: input channels.
        planes: bottleneck channels; the block outputs ``4 * planes``.
        stride: spatial downsampling factor, applied by average pooling after the 3x3
            convolution and before the 1x1 shortcut convolution (every convolution has stride 1).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = _downsample(stride)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.downsample = None
        if stride > 1 or inplanes != outplanes:
            # Named "-1" so the convolution and norm keep OpenAI's keys downsample.0 / downsample.1.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", _downsample(stride)),
                        ("0", nn.Conv2d(inplanes, outplanes, 1, bias=False)),
                        ("1", nn.BatchNorm2d(outplanes)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, inplanes, H, W] -> [B, 4 * planes, H / stride, W / stride]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Pool a feature map by one attention query: the mean feature attends over all positions.

    The query is the spatial mean plus its position embedding; keys and values are the mean
    and every position. Only that one query is computed (OpenAI's version computes all of them
    and keeps the first), so the output is the same at a fraction of the cost.

    Args:
        grid_size: side of the square input feature map.
        width: input channels; a multiple of ``heads``.
        heads: attention heads.
        output_dim: output features.
    """

    def __init__(self, grid_size: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"the pooled width ({width}) must be divisible by 'heads' ({heads})")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid_size**2 + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``[B, width, grid_size, grid_size]`` into ``[B, output_dim]``."""
        batch, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, grid**2, width]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.heads, width // self.heads).transpose(1, 2)

        q = split_heads(self.q_proj(x[:, :1]))
        out = F.scaled_dot_product_attention(q, split_heads(self.k_proj(x)), split_heads(self.v_proj(x)))
        return self.c_proj(out.reshape(batch, width))  # [B, heads, 1, head_dim] -> [B, width]


@contextmanager
def _batch_norm_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Normalise by batch statistics as usual but leave the running statistics as they are.

    Used while gradient checkpointing recomputes a stage in backward, so that each training
    step moves BatchNorm's running statistics once, as without checkpointing. A zero momentum
    (rather than not tracking) keeps the recomputation's saved tensors those of the forward.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, num_batches_tracked) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(num_batches_tracked)


@register_encoder("modified_resnet")
class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: ResNet-D stem and striding, attention pooling, projection.

    Radford et al. 2021, Sec. 2.4 (see the module docstring). The stem is three 3x3
    convolutions (the first with stride 2) and a 2x2 average pool; stage ``i`` of
    :class:`Bottleneck` blocks has ``width * 2**i`` bottleneck channels and all but the first
    halve the resolution; :class:`AttentionPool2d` pools the ``32 * width``-channel,
    ``image_size / 32``-sided map and projects it to ``embed_dim``. Names and init follow
    open_clip's ``ModifiedResNet``.

    Args:
        embed_dim: joint embedding size (filled in from the model).
        layers: blocks in each of the four stages: ``(3, 4, 6, 3)`` is RN50, ``(3, 4, 23, 3)``
            RN101.
        width: stem width; stage ``i`` outputs ``4 * width * 2**i`` channels.
        heads: attention-pooling heads; default ``width // 2`` (head size 64), as open_clip
            derives them for its RN configs.
        image_size: input height and width in pixels; a multiple of 32.
        image_mean: per-channel mean used to normalise input images.
        image_std: per-channel standard deviation used to normalise input images.
    """

    input_key = "image"

    def __init__(
        self,
        embed_dim: int,
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
        width: int = 64,
        heads: int | None = None,
        image_size: int = 224,
        image_mean: tuple[float, float, float] = OPENAI_MEAN,
        image_std: tuple[float, float, float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"'layers' must be four positive block counts, got {list(layers)}")
        if image_size < 32 or image_size % 32:
            raise ValueError(f"'image_size' ({image_size}) must be a multiple of 32, the tower's total stride")
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(
                    Bottleneck(inplanes, planes, stride),
                    *(Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)),
                )
            )
            inplanes = planes * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.attnpool = AttentionPool2d(image_size // 32, inplanes, width // 2 if heads is None else heads, embed_dim)
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's (and OpenAI's) init: scaled attention-pool projections, zero last norm per block.

        Zeroing each block's ``bn3`` scale starts every residual branch at zero, so the stages
        begin as identities (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
        Convolutions keep PyTorch's default init, as in open_clip.
        """
        pool = self.attnpool
        std = pool.c_proj.in_features**-0.5
        nn.init.normal_(pool.positional_embedding, std=std)
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward to save memory."""
        self.grad_checkpointing = enable

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, width, H / 4, W / 4]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: normalised images ``[B, 3, image_size, image_size]``.

        Returns:
            Unnormalised features ``[B, embed_dim]``.
        """
        check_image_size(x, self.image_size)
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(
                    stage,
                    x,
                    use_reentrant=False,
                    context_fn=lambda: (nullcontext(), _batch_norm_statistics_frozen(self)),
                )
            else:
                x = stage(x)
        return self.attnpool(x)
