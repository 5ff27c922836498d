"""Network building blocks: MLPs, ensembles of MLPs, time embeddings and the behaviour models noise
networks (Diffusion-QL's MLP, IDQL's LayerNorm ResNet). No diffusion math."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _MishFunction(torch.autograd.Function):
    """mish(x) = x tanh(softplus(x)) with one exp: tanh(softplus(x)) = n / (n + 2),
    n = e^x (e^x + 2). Same values and gradients as ``torch.nn.functional.mish`` (to float32
    rounding; tested), at about half its forward cost on CPUs, where torch's kernel evaluates
    softplus and tanh separately. Works under vmap and torch.compile."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = x.clamp(max=20.0).exp_()  # tanh(softplus(20)) is 1 in float32 and float64
        n = (e + 2.0).mul_(e)
        t = n.div_(n + 2.0)
        return x * t, t

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_t: torch.Tensor) -> torch.Tensor:
        x, t = ctx.saved_tensors
        # d/dx [x tanh(softplus x)] = t + x (1 - t^2) sigmoid(x)
        return grad * torch.addcmul(t, x * torch.sigmoid(x), 1.0 - t * t)


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish activation, x tanh(softplus(x)) (see :class:`_MishFunction`)."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # sampling: skip autograd's wrapper
        return _MishFunction.forward(x)[0]
    return _MishFunction.apply(x)[0]


class Mish(nn.Module):
    """Mish as a module (the behaviour models' default activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "mish": Mish,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    # GELU's tanh approximation: flax's ``nn.gelu`` default (FQL's networks)
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    """An activation module by name (relu, mish, tanh, elu, gelu, gelu_tanh, silu)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


INITS = ("torch", "xavier_uniform")
LAYER_NORM_EPS = 1e-6  # flax's LayerNorm epsilon (torch's default is 1e-5)


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


@torch.no_grad()
def init_linear_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int, fan_out: int, init: str):
    """Initialise a linear layer's ``weight`` and ``bias`` in place: ``torch`` (nn.Linear's
    default: both U(-1/sqrt(fan_in), 1/sqrt(fan_in))) or ``xavier_uniform`` (flax's
    ``variance_scaling(1, "fan_avg", "uniform")``, FQL's ``default_init``: weights
    U(-sqrt(6 / (fan_in + fan_out)), +...), biases 0)."""
    _check_init(init)
    if init == "torch":
        bound = 1.0 / math.sqrt(fan_in)
        weight.uniform_(-bound, bound)
        bias.uniform_(-bound, bound)
    else:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight.uniform_(-bound, bound)
        bias.zero_()


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int] = (256, 256, 256),
    act: str = "relu",
    out_act: str | None = None,
    layer_norm: bool = False,
    init: str = "torch",
) -> nn.Sequential:
    """Plain MLP: Linear -> act (-> LayerNorm, with ``layer_norm``: FQL's order) for each
    hidden width, then a Linear output (and out_act). ``init``: see :func:`init_linear_`."""
    _check_init(init)
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), activation(act)]
        if layer_norm:
            layers.append(nn.LayerNorm(h, eps=LAYER_NORM_EPS))
        d = h
    layers.append(nn.Linear(d, out_dim))
    if out_act is not None:
        layers.append(activation(out_act))
    if init != "torch":  # nn.Linear already made torch's
        for layer in layers:
            if isinstance(layer, nn.Linear):
                init_linear_(layer.weight, layer.bias, *layer.weight.shape[::-1], init)
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul: [E, *B, in] -> [E, *B, out].

    Each member is initialised exactly like ``nn.Linear`` (Kaiming-uniform weights, uniform bias)
    by default; ``init="xavier_uniform"``: as flax's default for FQL (see :func:`init_linear_`).
    """

    def __init__(
        self, num_members: int, in_features: int, out_features: int, init: str = "torch"
    ) -> None:
        super().__init__()
        _check_init(init)
        self.num_members = num_members
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "torch":
            bound = 1.0 / math.sqrt(self.in_features)
            # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in)).
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            init_linear_(self.weight, self.bias, self.in_features, self.out_features, self.init)

    def forward(self, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if detach_params:
            weight, bias = weight.detach(), bias.detach()
        shape = x.shape
        x = x.reshape(self.num_members, -1, self.in_features)
        y = torch.baddbmm(bias, x, weight)
        return y.reshape(*shape[:-1], self.out_features)

    def member(self, index: int, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Member ``index`` alone, as a plain linear layer: [*B, in] -> [*B, out].

        ``detach_params``: no gradient reaches the weights (gradients still flow to ``x``), so
        a backward pass skips the weight gradients nobody will use.
        """
        weight, bias = self.weight[index], self.bias[index, 0]
        if detach_params:
            weight, bias = weight.detach(), bias.detach()
        return torch.addmm(bias, x.reshape(-1, self.in_features), weight).reshape(
            *x.shape[:-1], self.out_features
        )


class EnsembleLayerNorm(nn.Module):
    """``E`` independent LayerNorms (each with its own scale and shift) over the last dim:
    [E, *B, D] -> [E, *B, D] (flax's LayerNorm inside an ensemble, as FQL's critic)."""

    def __init__(self, num_members: int, width: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.num_members = num_members
        self.width = width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_members, 1, width))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, width))

    def forward(self, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if detach_params:
            weight, bias = weight.detach(), bias.detach()
        shape = x.shape
        y = F.layer_norm(x.reshape(self.num_members, -1, self.width), (self.width,), eps=self.eps)
        return torch.addcmul(bias, y, weight).reshape(shape)

    def member(self, index: int, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Member ``index`` alone: [*B, D] -> [*B, D]."""
        weight, bias = self.weight[index, 0], self.bias[index, 0]
        if detach_params:
            weight, bias = weight.detach(), bias.detach()
        return F.layer_norm(x, (self.width,), weight, bias, self.eps)


class EnsembleMLP(nn.Module):
    """``E`` independent MLPs evaluated in one batched call.

    Input ``[*B, in]`` (shared by all members) or ``[E, *B, in]``; output ``[E, *B, out]``.
    ``layer_norm``: a LayerNorm after each hidden activation (FQL's critic); ``init``: see
    :class:`EnsembleLinear`.
    """

    def __init__(
        self,
        num_members: int,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        act: str = "relu",
        layer_norm: bool = False,
        init: str = "torch",
    ) -> None:
        super().__init__()
        self.num_members = num_members
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [EnsembleLinear(num_members, d, h, init), activation(act)]
            if layer_norm:
                layers.append(EnsembleLayerNorm(num_members, h))
            d = h
        layers.append(EnsembleLinear(num_members, d, out_dim, init))
        self.net = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, shared: bool = True, detach_params: bool = False
    ) -> torch.Tensor:
        """``detach_params``: gradients reach ``x`` but no weight (an actor's loss through the
        critic needs dQ/da only)."""
        if shared:
            x = x.unsqueeze(0).expand(self.num_members, *x.shape)
        if not detach_params:
            return self.net(x)
        for layer in self.net:
            if isinstance(layer, EnsembleLinear | EnsembleLayerNorm):
                x = layer(x, detach_params=True)
            else:
                x = layer(x)
        return x

    def member(self, index: int, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Member ``index`` alone on [*B, in] -> [*B, out]: 1/E of the arithmetic of
        ``forward``. ``detach_params`` stops gradients at the weights (not at ``x``)."""
        for layer in self.net:
            if isinstance(layer, EnsembleLinear | EnsembleLayerNorm):
                x = layer.member(index, x, detach_params)
            else:
                x = layer(x)
        return x


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal embedding of (integer or real) diffusion times: [*B] -> [*B, D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        half = dim // 2
        scale = math.log(10000.0) / max(half - 1, 1)
        self.register_buffer("freqs", torch.exp(-scale * torch.arange(half)), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float().unsqueeze(-1) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class _TimeConditioned(nn.Module):
    """A noise network's shared call: the time code of ``t`` (``self.time_mlp``, computed once
    when one time serves every row), then ``body`` on the rows."""

    time_mlp: nn.Module

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        observation: torch.Tensor,
        training_pass: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x [B, A], t [B] (or [1]: one time for every row, embedded once), observation [B, O]
        -> [B, A]. ``training_pass`` marks the loss's pass (dropout, if the network has any,
        its masks drawn from ``generator``)."""
        code = self.time_mlp(t)
        if code.shape[0] != x.shape[0]:
            code = code.expand(x.shape[0], -1)
        return self.body(x, observation, code, training_pass, generator)

    def body(self, x, observation, code, training_pass, generator) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract


class NoiseNetwork(_TimeConditioned):
    """Conditional noise/denoiser network used by the diffusion and consistency models.

    Diffusion-QL's architecture: sinusoidal time embedding (``time_dim``) -> Linear(2*time_dim)
    -> Mish -> Linear(time_dim); the MLP reads concat[x, time embedding, state] through
    ``hidden`` Mish layers and a linear output of size ``action_dim``.
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        time_dim: int = 16,
        act: str = "mish",
    ) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(time_dim),
            nn.Linear(time_dim, 2 * time_dim),
            activation(act),
            nn.Linear(2 * time_dim, time_dim),
        )
        self.net = mlp(action_dim + time_dim + observation_dim, action_dim, hidden, act)

    def body(self, x, observation, code, training_pass, generator) -> torch.Tensor:
        # no dropout: ``training_pass`` and ``generator`` change nothing
        return self.net(torch.cat([x, code, observation], dim=-1))


class LearnableFourierFeatures(nn.Module):
    """Random Fourier features of a scalar time with trainable frequencies: t [*B] ->
    [cos(2 pi t w), sin(2 pi t w)] [*B, dim], w ~ N(0, 0.2^2) at initialisation (IDQL's time
    embedding, ``FourierFeatures(learnable=True)`` in its code)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 or dim < 2:
            raise ValueError(f"Fourier feature size must be even and >= 2, got {dim}")
        self.weight = nn.Parameter(torch.randn(dim // 2) * 0.2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = (2.0 * math.pi) * t.to(self.weight.dtype).unsqueeze(-1) * self.weight
        return torch.cat([arg.cos(), arg.sin()], dim=-1)


class _ResidualBlock(nn.Module):
    """x + Linear(4w -> w)(act(Linear(w -> 4w)(LayerNorm(dropout(x))))): IDQL's block."""

    def __init__(self, width: int, act: str, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, 4 * width)
        self.act = activation(act)
        self.outer = nn.Linear(4 * width, width)

    def forward(
        self, x: torch.Tensor, training_pass: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        h = x
        if training_pass and self.dropout > 0:  # inverted dropout, drawn from ``generator``
            keep = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            h = x * (keep >= self.dropout).to(x.dtype) / (1.0 - self.dropout)
        return x + self.outer(self.act(self.inner(self.norm(h))))


class ResidualNoiseNetwork(_TimeConditioned):
    """IDQL's noise network (Hansen-Estruch et al. 2023, appendix G; ``ln_resnet`` in its code):
    learnable Fourier features of the step (``time_dim``) -> Linear(128) -> act -> Linear(128)
    make the time code; concat[x, observation, time code] -> Linear(width) -> one residual block
    per entry of ``hidden`` (dropout, LayerNorm, Linear(4 width), act, Linear(width), plus the
    input) -> act -> Linear(action_dim).

    Dropout acts only in the loss's pass (``training_pass=True``, its masks drawn from the
    loss's ``generator``); sampling never drops units, as IDQL samples with ``training=False``,
    whatever mode the module is in.
    """

    TIME_WIDTH = 128  # IDQL: cond_encoder MLP hidden_dims (128, 128)

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        time_dim: int = 64,
        act: str = "mish",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = set(hidden)
        if len(widths) != 1:
            raise ValueError(
                f"network=ln_resnet needs one width for all its residual blocks (hidden lists "
                f"one entry per block, e.g. [256, 256, 256]); got hidden={list(hidden)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        (width,) = widths
        self.time_mlp = nn.Sequential(
            LearnableFourierFeatures(time_dim),
            nn.Linear(time_dim, self.TIME_WIDTH),
            activation(act),
            nn.Linear(self.TIME_WIDTH, self.TIME_WIDTH),
        )
        self.inp = nn.Linear(action_dim + observation_dim + self.TIME_WIDTH, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, act, dropout) for _ in hidden)
        self.act = activation(act)
        self.out = nn.Linear(width, action_dim)

    def body(self, x, observation, code, training_pass, generator) -> torch.Tensor:
        h = self.inp(torch.cat([x, observation, code], dim=-1))
        for block in self.blocks:
            h = block(h, training_pass, generator)
        return self.out(self.act(h))


NOISE_NETWORKS = {"mlp": NoiseNetwork, "ln_resnet": ResidualNoiseNetwork}


def noise_network(
    kind: str,
    observation_dim: int,
    action_dim: int,
    hidden: Sequence[int],
    time_dim: int,
    act: str,
    dropout: float = 0.0,
) -> nn.Module:
    """The noise network by name: ``mlp`` (Diffusion-QL's, :class:`NoiseNetwork`) or
    ``ln_resnet`` (IDQL's, :class:`ResidualNoiseNetwork`; ``dropout`` applies to it only)."""
    if kind not in NOISE_NETWORKS:
        raise ValueError(
            f"network={kind!r} is not a noise network; choose one of {', '.join(NOISE_NETWORKS)}"
        )
    if kind == "mlp":
        if dropout:
            raise ValueError(
                f"dropout={dropout} needs network=ln_resnet (the MLP has no dropout); set "
                "dropout=0 or network=ln_resnet"
            )
        return NoiseNetwork(observation_dim, action_dim, tuple(hidden), time_dim, act)
    return ResidualNoiseNetwork(observation_dim, action_dim, tuple(hidden), time_dim, act, dropout)
