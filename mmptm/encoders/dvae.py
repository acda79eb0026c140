"""Discrete image tokenizers: the DALL-E discrete VAE and a VQ-VAE with an EMA codebook.

Both compress an image to a ``grid_size × grid_size`` grid of codebook indices
(``2 ** num_downsamples`` pixels per token side) and back, with the same small
surface used by the token decoder and ``mmptm tokenizer images``:

- ``encode_tokens(images) -> LongTensor[B, grid_size * grid_size]`` (row-major),
- ``decode_tokens(tokens) -> Tensor[B, 3, image_size, image_size]`` in [0, 1],
- ``codebook_size``, ``grid_size``, ``image_size``.

Pixels: both models store ``image_mean = (0, 0, 0)`` and ``image_std = (1, 1, 1)``,
which the data context of a run (and ``load_pretrained``'s preprocess) reads,
so the ``image_text`` stream hands them images in [0, 1], and ``encode_tokens``
takes exactly those.

:class:`DiscreteVAE` follows Ramesh et al. 2021, "Zero-Shot Text-to-Image
Generation", sec. 2.1 and appendix A: a convolutional encoder (7×7 stem, groups
of bottleneck residual blocks separated by max-pooling, post-gain
``1 / n_blocks ** 2``) gives logits over the codebook at every grid position;
training relaxes the categorical latent with Gumbel-softmax, the decoder (1×1
stem, residual groups separated by nearest upsampling) reads the relaxed
one-hot vectors and predicts the parameters of a logit-Laplace distribution
per pixel channel (appendix A.3), or pixels for an MSE loss. At evaluation the
tokens are the argmax of the logits.

:class:`VQVAE` follows van den Oord et al. 2017, "Neural Discrete Representation
Learning": the encoder's vectors are replaced by their nearest codebook entry
(straight-through gradient, commitment loss), the codebook is an exponential
moving average of the vectors assigned to each entry (appendix A.1), and
entries whose EMA usage falls below a threshold are restarted at encoder
outputs of the batch (Dhariwal et al. 2020, Jukebox, sec. 3.1; Razavi et al. 2019).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmptm.registry import register_model

Reconstruction = Literal["logit_laplace", "mse"]


# --------------------------------------------------------------------------- relaxation and pixel likelihood


def gumbel_softmax(
    logits: torch.Tensor,
    temperature: float,
    straight_through: bool = False,
    gumbels: torch.Tensor | None = None,
    dim: int = -1,
) -> torch.Tensor:
    """The Gumbel-softmax relaxation of a categorical sample (Jang et al. 2017; Maddison et al. 2017).

    ``softmax((logits + g) / temperature)`` with ``g`` standard Gumbel noise: a
    point on the simplex that tends to the one-hot vector of
    ``argmax(logits + g)`` (an exact categorical sample) as the temperature
    goes to 0. DALL-E trains its dVAE on this relaxation (Ramesh et al. 2021,
    sec. 2.1).

    Args:
        logits: unnormalised log-probabilities.
        temperature: relaxation temperature (> 0).
        straight_through: return the hard one-hot sample in the forward pass with the
            relaxed sample's gradient (Bengio et al. 2013).
        gumbels: the noise, same shape as ``logits`` (default: drawn from the global generator).
        dim: the category dimension.

    Returns:
        A tensor like ``logits``, each slice along ``dim`` on the simplex.
    """
    if temperature <= 0:
        raise ValueError(f"gumbel_softmax: temperature must be > 0, got {temperature}")
    if gumbels is None:
        gumbels = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbels) / temperature).softmax(dim)
    if not straight_through:
        return soft
    hard = F.one_hot(soft.argmax(dim), logits.shape[dim]).movedim(-1, dim).to(soft.dtype)
    return hard - soft.detach() + soft


def map_pixels(pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], where the logit-Laplace density is bounded (Ramesh et al. 2021, appendix A.3)."""
    return (1 - 2 * eps) * pixels + eps


def unmap_pixels(mapped: torch.Tensor, eps: float) -> torch.Tensor:
    """The inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((mapped - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(pixels: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-element negative log-likelihood of pixels under the logit-Laplace distribution.

    Ramesh et al. 2021, appendix A.3: the density on (0, 1) of a variable whose
    logit is Laplace(mu, b), ``f(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))``,
    evaluated at the pixels mapped to ``[eps, 1 - eps]`` (:func:`map_pixels`).

    Args:
        pixels: targets in [0, 1].
        mu / log_scale: the decoder's location and log-scale ``ln b``, same shape.
        eps: the pixel mapping's margin (the paper: 0.1).

    Returns:
        ``-ln f(map_pixels(pixels))``, elementwise.
    """
    x = map_pixels(pixels, eps)
    return (
        (torch.logit(x) - mu).abs() * torch.exp(-log_scale)
        + log_scale
        + math.log(2.0)
        + torch.log(x)
        + torch.log1p(-x)
    )


def codebook_statistics(tokens: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and usage of the codebook over a set of tokens.

    Args:
        tokens: token ids of any shape.
        codebook_size: number of codebook entries.

    Returns:
        ``(perplexity, usage)``: ``exp`` of the entropy of the token histogram (1 when a single
        entry is used, ``codebook_size`` when all are used equally), and the fraction of entries
        used at least once.
    """
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return entropy.exp(), (counts > 0).float().mean()


# --------------------------------------------------------------------------- convolutional encoder and decoder


class BottleneckBlock(nn.Module):
    """DALL-E's residual block: ``x + post_gain * f(x)``, f four ReLU-convolutions through a width/4 bottleneck.

    Ramesh et al. 2021, appendix A.1 (and the released ``dall_e`` code): the
    post-gain ``1 / n_blocks ** 2`` keeps the residual stream's scale at
    initialisation; a 1×1 projection matches the identity path's width.
    """

    def __init__(self, in_channels: int, out_channels: int, post_gain: float) -> None:
        super().__init__()
        hidden = max(out_channels // 4, 1)
        self.identity = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.residual = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.identity(x) + self.post_gain * self.residual(x)


def _group_widths(hidden: int, num_stages: int) -> list[int]:
    """Widths of the ``num_stages + 1`` resolution groups: the width doubles at every halving (DALL-E)."""
    return [hidden * 2**g for g in range(num_stages + 1)]


class ConvEncoder(nn.Module):
    """7×7 stem, ``num_downsamples + 1`` groups of blocks with a 2× max-pool between them, ReLU + 1×1 head.

    Args:
        out_channels: channels per grid position (codebook logits or code vectors).
        hidden: width of the first group (doubling per group).
        num_downsamples: stride-2 stages; a grid cell covers ``2 ** num_downsamples`` pixels per side.
        blocks_per_group: residual blocks per group.
    """

    def __init__(self, out_channels: int, hidden: int, num_downsamples: int, blocks_per_group: int) -> None:
        super().__init__()
        widths = _group_widths(hidden, num_downsamples)
        post_gain = 1.0 / (len(widths) * blocks_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(3, hidden, 7, padding=3)]
        previous = hidden
        for g, width in enumerate(widths):
            for _ in range(blocks_per_group):
                layers.append(BottleneckBlock(previous, width, post_gain))
                previous = width
            if g < num_downsamples:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(previous, out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class ConvDecoder(nn.Module):
    """1×1 stem, the encoder's groups in reverse with 2× nearest upsampling between them, ReLU + 1×1 head.

    Args:
        in_channels: channels per grid position read (relaxed one-hot codes or code vectors).
        out_channels: channels per pixel predicted.
        hidden / num_downsamples / blocks_per_group: as the encoder's.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, num_downsamples: int, blocks_per_group: int
    ) -> None:
        super().__init__()
        widths = _group_widths(hidden, num_downsamples)[::-1]
        post_gain = 1.0 / (len(widths) * blocks_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 1)]
        previous = widths[0]
        for g, width in enumerate(widths):
            for _ in range(blocks_per_group):
                layers.append(BottleneckBlock(previous, width, post_gain))
                previous = width
            if g < num_downsamples:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(previous, out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.layers(codes)


# --------------------------------------------------------------------------- the shared surface


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s parameters: what its inputs are cast to outside an autocast."""
    return next(module.parameters()).dtype


class ImageTokenizer(nn.Module):
    """What the discrete image tokenizers share: geometry, pixel likelihood, token interface and step counter.

    Subclasses build ``self.encoder`` and ``self.decoder`` and define
    :meth:`encode_tokens` and :meth:`code_inputs` (tokens -> the decoder's input).

    Args:
        image_size: side of the square input images (a multiple of ``2 ** num_downsamples``).
        num_downsamples: stride-2 stages of the encoder.
        codebook_size: number of codebook entries (the token vocabulary).
        reconstruction: ``logit_laplace`` (the decoder predicts location and log-scale per pixel
            channel, Ramesh et al. 2021 appendix A.3) or ``mse`` (it predicts pixels).
        logit_laplace_eps: the margin of the pixel mapping to ``[eps, 1 - eps]`` (the paper: 0.1).

    Attributes:
        step: training batches seen (a buffer, so checkpoints keep it and a resumed run continues
            the annealing schedules of the ``image_tokenizer`` objective, which advances it).
    """

    # The data context reads these: streams hand the tokenizer un-normalised [0, 1] pixels.
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(
        self,
        image_size: int,
        num_downsamples: int,
        codebook_size: int,
        reconstruction: Reconstruction,
        logit_laplace_eps: float,
    ) -> None:
        super().__init__()
        if num_downsamples < 0 or image_size % 2**num_downsamples:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2 ** num_downsamples = 2 ** {num_downsamples}"
            )
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if not 0 < logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must be in (0, 0.5), got {logit_laplace_eps}")
        self.image_size = image_size
        self.grid_size = image_size // 2**num_downsamples
        self.codebook_size = codebook_size
        self.reconstruction = reconstruction
        self.logit_laplace_eps = logit_laplace_eps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def decoder_channels(self) -> int:
        """Channels the decoder predicts: location and log-scale per colour channel, or the pixels."""
        return 6 if self.reconstruction == "logit_laplace" else 3

    def pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        """The decoder output as an image in [0, 1] (the logit-Laplace mode: ``sigmoid(mu)``, unmapped)."""
        if self.reconstruction == "logit_laplace":
            return unmap_pixels(torch.sigmoid(decoded[:, :3].float()), self.logit_laplace_eps)
        return decoded.float().clamp(0, 1)

    def reconstruction_loss(self, images: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """Mean per pixel value of the negative log-likelihood (logit-Laplace) or squared error (mse).

        Args:
            images: the targets, ``[B, 3, H, W]`` in [0, 1].
            decoded: the decoder output for them.
        """
        decoded = decoded.float()
        if self.reconstruction == "logit_laplace":
            mu, log_scale = decoded[:, :3], decoded[:, 3:]
            return logit_laplace_nll(images.float(), mu, log_scale, self.logit_laplace_eps).mean()
        return F.mse_loss(decoded, images.float())

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} takes images [B, {', '.join(map(str, expected))}], "
                             f"got {tuple(images.shape)}")

    def encode_exactly(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's output for ``images`` in its weights' precision (fp32 for a run's frozen tokenizer), as fp32.

        Tokens are argmaxes and nearest codes: under a bf16 autocast the rounding flips near-ties
        (about 6% of a trained dvae's tokens), so the tokens of a batch would depend on the run's
        precision and disagree with precomputed ones. The encoder therefore runs outside any autocast.
        """
        self._check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.encoder(images.to(weight_dtype(self.encoder))).float()

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] -> ``LongTensor[B, grid_size ** 2]`` tokens, row-major."""
        raise NotImplementedError

    def code_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` tokens -> the decoder's input ``[B, C, h, w]``."""
        raise NotImplementedError

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, grid_size ** 2]`` (row-major) -> images ``[B, 3, image_size, image_size]`` in [0, 1]."""
        expected = self.grid_size**2
        if tokens.ndim != 2 or tokens.shape[1] != expected:
            raise ValueError(f"decode_tokens takes tokens [B, {expected}] (a {self.grid_size}x{self.grid_size} "
                             f"grid, row-major), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"tokens must be in [0, {self.codebook_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        grid = tokens.view(-1, self.grid_size, self.grid_size)
        return self.pixels(self.decoder(self.code_inputs(grid).to(weight_dtype(self.decoder))))


# --------------------------------------------------------------------------- DALL-E's discrete VAE


class DVAEOutput(NamedTuple):
    """What :meth:`DiscreteVAE.forward` returns.

    Attributes:
        decoded: the decoder output ``[B, 6 | 3, H, W]`` (logit-Laplace parameters or pixels).
        logits: the encoder's codebook logits ``[B, codebook_size, h, w]``.
        tokens: the argmax tokens ``[B, h * w]``, row-major.
    """

    decoded: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor


@register_model("dvae")
class DiscreteVAE(ImageTokenizer):
    """DALL-E's discrete VAE (Ramesh et al. 2021, sec. 2.1, appendix A): images <-> a grid of codebook tokens.

    Args:
        image_size: side of the square input images.
        num_downsamples: stride-2 stages (DALL-E: 3, 256 px -> 32×32 tokens).
        hidden: width of the first resolution group, doubling per group (DALL-E: 256).
        blocks_per_group: residual blocks per group (DALL-E: 2).
        codebook_size: number of codebook entries (DALL-E: 8192).
        reconstruction: ``logit_laplace`` (the paper) or ``mse``.
        logit_laplace_eps: the pixel mapping's margin (the paper: 0.1).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_downsamples: int = 2,
        hidden: int = 32,
        blocks_per_group: int = 1,
        codebook_size: int = 512,
        reconstruction: Reconstruction = "logit_laplace",
        logit_laplace_eps: float = 0.1,
    ) -> None:
        super().__init__(image_size, num_downsamples, codebook_size, reconstruction, logit_laplace_eps)
        self.encoder = ConvEncoder(codebook_size, hidden, num_downsamples, blocks_per_group)
        self.decoder = ConvDecoder(codebook_size, self.decoder_channels, hidden, num_downsamples, blocks_per_group)

    def forward(self, images: torch.Tensor, temperature: float = 1.0, straight_through: bool = False) -> DVAEOutput:
        """Encode, relax (training: Gumbel-softmax; eval: hard argmax codes) and decode.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1].
            temperature: the Gumbel-softmax temperature (training only).
            straight_through: hard one-hot codes forward, relaxed gradient backward (training only).
        """
        self._check_images(images)
        logits = self.encoder(images)
        tokens = logits.argmax(1)
        if self.training:
            codes = gumbel_softmax(logits.float(), temperature, straight_through, dim=1).to(logits.dtype)
        else:
            codes = self.code_inputs(tokens).to(logits.dtype)
        return DVAEOutput(self.decoder(codes), logits, tokens.flatten(1))

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_exactly(images).argmax(1).flatten(1)

    def code_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, self.codebook_size).permute(0, 3, 1, 2).float()

    @staticmethod
    def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
        """KL(q(z | x) || uniform) per grid position, ``[B, h, w]``: ``sum_k q_k ln(q_k K)`` (sec. 2.1's prior)."""
        log_q = logits.float().log_softmax(1)
        return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1)


# --------------------------------------------------------------------------- VQ-VAE with an EMA codebook


class EMACodebook(nn.Module):
    """A codebook learned by exponential moving averages, with dead-code restarts.

    van den Oord et al. 2017, appendix A.1: with ``n_i`` the number of vectors
    assigned to entry i in a batch and ``s_i`` their sum,
    ``N_i <- decay N_i + (1 - decay) n_i``, ``m_i <- decay m_i + (1 - decay) s_i``,
    ``e_i = m_i / N_i`` (N Laplace-smoothed: ``(N_i + eps) / (sum N + K eps) * sum N``).
    Entries with ``N_i < dead_code_threshold`` after an update are restarted at
    random encoder vectors of the batch with ``N_i = 1`` (Dhariwal et al. 2020,
    sec. 3.1). Under ``torch.distributed`` the counts and sums are all-reduced
    and rank 0's restart vectors are broadcast, so every rank holds the same codebook.

    Args:
        codebook_size: K.
        dim: D, the vectors' size.
        decay: the EMA decay.
        dead_code_threshold: the EMA count below which an entry is restarted (0: never).
        eps: Laplace smoothing of the counts.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float, dead_code_threshold: float, eps: float) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.decay, self.dead_code_threshold, self.eps = decay, dead_code_threshold, eps
        embedding = torch.randn(codebook_size, dim)
        self.register_buffer("embedding", embedding)
        # Counts start at 1 (the entry stands for one vector): unused entries fall below a threshold
        # of 1 at the first update and restart on data, as Jukebox initialises from the first batch.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", embedding.clone())

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry (Euclidean) of each row of fp32 ``vectors [M, D]``."""
        embedding = self.embedding.float()  # a codebook cast to low precision with its model still compares in fp32
        distances = (
            vectors.pow(2).sum(1, keepdim=True)
            - 2 * vectors @ embedding.T
            + embedding.pow(2).sum(1)[None, :]
        )
        return distances.argmin(1)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, indices: torch.Tensor) -> int:
        """One EMA step with this batch's ``vectors [M, D]`` and their ``indices [M]``; returns the restarts."""
        vectors = vectors.float()
        assigned = F.one_hot(indices, len(self.embedding)).float()
        counts, sums = assigned.sum(0), assigned.T @ vectors
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + len(self.embedding) * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < self.dead_code_threshold
        if not dead.any():
            return 0
        candidates = self._restart_vectors(vectors)
        if distributed:
            dist.broadcast(candidates, src=0)
        self.embedding[dead] = candidates[dead]
        self.embed_sum[dead] = candidates[dead]
        self.cluster_size[dead] = 1.0
        return int(dead.sum())

    def _restart_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """K vectors drawn from the batch: distinct ones when there are enough, else with repeats and noise."""
        size = len(self.embedding)
        if len(vectors) >= size:
            return vectors[torch.randperm(len(vectors), device=vectors.device)[:size]].clone()
        drawn = vectors[torch.randint(len(vectors), (size,), device=vectors.device)]
        # Jukebox's noise: repeated vectors would otherwise stay tied forever.
        return drawn + 0.01 / math.sqrt(vectors.shape[1]) * torch.randn_like(drawn)


class VQOutput(NamedTuple):
    """What :meth:`VQVAE.forward` returns.

    Attributes:
        decoded: the decoder output ``[B, 6 | 3, H, W]``.
        tokens: the codebook indices ``[B, h * w]``, row-major.
        commitment: ``mean ||z_e - sg(e)||^2`` (van den Oord et al. 2017, eq. 3's third term, unweighted).
        restarted: codebook entries restarted by this forward pass (0 at eval).
    """

    decoded: torch.Tensor
    tokens: torch.Tensor
    commitment: torch.Tensor
    restarted: int


@register_model("vqvae")
class VQVAE(ImageTokenizer):
    """VQ-VAE with an EMA codebook and dead-code restarts (van den Oord et al. 2017; Dhariwal et al. 2020).

    Args:
        image_size / num_downsamples / hidden / blocks_per_group / codebook_size: as :class:`DiscreteVAE`.
        codebook_dim: size of the code vectors.
        ema_decay: decay of the codebook's moving averages (the paper: 0.99).
        dead_code_threshold: EMA usage below which an entry is restarted at a batch vector (0: never).
        reconstruction / logit_laplace_eps: as :class:`DiscreteVAE`.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_downsamples: int = 2,
        hidden: int = 32,
        blocks_per_group: int = 1,
        codebook_size: int = 512,
        codebook_dim: int = 64,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        reconstruction: Reconstruction = "mse",
        logit_laplace_eps: float = 0.1,
    ) -> None:
        super().__init__(image_size, num_downsamples, codebook_size, reconstruction, logit_laplace_eps)
        self.encoder = ConvEncoder(codebook_dim, hidden, num_downsamples, blocks_per_group)
        self.codebook = EMACodebook(codebook_size, codebook_dim, ema_decay, dead_code_threshold, eps=1e-5)
        self.decoder = ConvDecoder(codebook_dim, self.decoder_channels, hidden, num_downsamples, blocks_per_group)

    def forward(self, images: torch.Tensor) -> VQOutput:
        """Encode, quantise (training: update the codebook), decode with the straight-through estimator.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1].
        """
        self._check_images(images)
        encoded = self.encoder(images).float()
        batch, dim, height, width = encoded.shape
        vectors = encoded.permute(0, 2, 3, 1).reshape(-1, dim)
        # fp32 distances and moving averages under bf16/fp16 autocast: rounding would change assignments.
        with torch.autocast(images.device.type, enabled=False):
            indices = self.codebook.nearest(vectors.detach())
            quantized = self.codebook.embedding[indices].float()
            commitment = F.mse_loss(vectors, quantized)
            restarted = self.codebook.update(vectors.detach(), indices) if self.training else 0
        straight_through = vectors + (quantized - vectors).detach()
        codes = straight_through.view(batch, height, width, dim).permute(0, 3, 1, 2).to(weight_dtype(self.decoder))
        return VQOutput(self.decoder(codes), indices.view(batch, -1), commitment, restarted)

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.encode_exactly(images)
        vectors = encoded.permute(0, 2, 3, 1).reshape(-1, encoded.shape[1])
        with torch.autocast(images.device.type, enabled=False):
            return self.codebook.nearest(vectors).view(len(images), -1)

    def code_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codebook.embedding[tokens].permute(0, 3, 1, 2)
