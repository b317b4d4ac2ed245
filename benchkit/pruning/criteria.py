"""Importance criteria: one score per weight element, higher = more important.

A criterion is a class registered in ``CRITERIA`` with

* ``needs_data`` — it needs a batch ``(x, y)`` or a loader (the engine refuses to run it without);
* ``runs_model`` — it runs the network. Such a criterion receives a *scoring copy* of the model: a deep
  copy with every mask folded into plain parameters (pruned entries exactly zero), so it may switch
  modes, cast to double or take ``abs`` of every parameter without touching the user's model;
* ``scores(model, layers, data) -> {name: Tensor}``, each tensor shaped like ``layers[name].weight``.

The engine sets already-pruned weights to −inf afterwards, so a criterion never has to care about masks.
Criteria are constructed as ``cls(seed=...)``; subclass ``Criterion`` to get that for free::

    @CRITERIA.register("fisher")
    class Fisher(Criterion):
        needs_data = True
        def scores(self, model, layers, data):
            grads = loss_gradients(model, layers, data)
            return {n: grads[n].square() for n in layers}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit.pruning.masks import param_value
from benchkit.registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("criterion")

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ScoringData:
    """What a data-driven criterion sees: one batch ``(x, y)`` or the first ``max_batches`` batches of a
    loader, and the loss (``loss_fn(logits, y)``, cross-entropy by default). Several batches act as one
    larger batch. ``input_shape`` (per example, e.g. ``(1, 28, 28)``) serves data-free SynFlow."""

    batch: tuple[Tensor, Tensor] | None = None
    loader: Iterable | None = None
    loss_fn: LossFn | None = None
    max_batches: int = 1
    input_shape: tuple[int, ...] | None = None

    @property
    def has_examples(self) -> bool:
        return self.batch is not None or self.loader is not None

    def batches(self, device: torch.device | None = None, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        if self.batch is not None:
            x, y = self.batch
            yield x.to(device), y.to(device)
            return
        if self.loader is None:
            raise ValueError("this criterion needs data: pass batch=(x, y) or loader=... to prune()")
        limit = self.max_batches if limit is None else limit
        seen = 0
        for item in self.loader:
            if seen >= limit:
                break
            yield item[0].to(device), item[1].to(device)
            seen += 1
        if seen == 0:
            raise ValueError("the scoring loader yielded no batches")

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return (self.loss_fn or F.cross_entropy)(logits, y)

    def example_shape(self) -> tuple[int, ...]:
        """Shape of one input example (without the batch dimension)."""
        if self.input_shape is not None:
            return tuple(self.input_shape)
        x, _ = next(iter(self.batches()))
        return tuple(x.shape[1:])


class Criterion:
    """Base class: stores ``seed``; subclasses set the flags and implement ``scores``."""

    name: str = ""
    needs_data: bool = False
    needs_input_shape: bool = False
    runs_model: bool = True
    signed: bool = False  # scores can be negative (GraSP): group them with a sign-keeping reduction
    default_iterations: int = 1
    #: True for one-shot methods that prune layer by layer in sequence from calibration activations and may
    #: update the surviving weights (Wanda, SparseGPT): the engine hands them to benchkit.pruning.calibrated
    #: instead of asking for scores. ``comparison`` is their default comparison group (row or layer).
    calibrated: bool = False
    comparison: str = "layer"

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def scores(self, model: nn.Module, layers: dict[str, nn.Module], data: ScoringData | None) -> dict[str, Tensor]:
        raise NotImplementedError


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def loss_gradients(
    model: nn.Module, layers: dict[str, nn.Module], data: ScoringData, limit: int | None = None
) -> dict[str, Tensor]:
    """dL/dw of the mean loss over the scoring batches (batches weighted by their size, so several
    batches equal one big one). Runs in the model's current mode."""
    weights = [m.weight for m in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    acc = [torch.zeros_like(w) for w in weights]
    total = 0
    for x, y in data.batches(model_device(model), limit):
        grads = torch.autograd.grad(data.loss(model(x), y), weights, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g, alpha=len(x))
        total += len(x)
    return {name: a / total for name, a in zip(layers, acc)}


def _weight(module: nn.Module) -> Tensor:
    return param_value(module, "weight").detach()


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """|w| (Han et al. 2015; ShrinkBench Mag)."""

    name = "magnitude"
    runs_model = False

    def scores(self, model, layers, data):
        return {n: _weight(m).abs() for n, m in layers.items()}


@CRITERIA.register("random")
class Random(Criterion):
    """Uniform random scores from a seeded generator (the random-pruning control). Without ``seed`` the
    seed is drawn from torch's global RNG, so ``torch.manual_seed`` still makes runs repeatable."""

    name = "random"
    runs_model = False

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        super().__init__(seed)
        self.generator = torch.Generator().manual_seed(int(seed))

    def scores(self, model, layers, data):
        # float64 so that ties are practically impossible even in 100M-weight layers
        return {
            n: torch.rand(m.weight.shape, generator=self.generator, dtype=torch.float64).to(m.weight.device)
            for n, m in layers.items()
        }


@CRITERIA.register("gradient")
class Gradient(Criterion):
    """|dL/dw| on the scoring batches."""

    name = "gradient"
    needs_data = True

    def scores(self, model, layers, data):
        return {n: g.abs() for n, g in loss_gradients(model, layers, data).items()}


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """|w · dL/dw|: first-order Taylor estimate of the loss change when w is removed (ShrinkBench MagGrad)."""

    name = "taylor"
    needs_data = True

    def scores(self, model, layers, data):
        grads = loss_gradients(model, layers, data)
        return {n: (m.weight.detach() * grads[n]).abs() for n, m in layers.items()}


@CRITERIA.register("snip")
class SNIP(Criterion):
    """Connection sensitivity |g ⊙ w|, normalised to sum to 1 (Lee et al. 2019).

    With mask variables c = 1, dL/dc = g ⊙ w; the normalisation is one global constant, so it changes
    no ranking but keeps the published numbers. The paper scores one batch (``score_batches: 1``, the
    default); with more, g is the gradient of the mean loss over all of them, as for the other criteria."""

    name = "snip"
    needs_data = True

    def scores(self, model, layers, data):
        grads = loss_gradients(model, layers, data)
        sal = {n: (m.weight.detach() * grads[n]).abs() for n, m in layers.items()}
        total = sum(float(s.sum()) for s in sal.values())
        return {n: s / total for n, s in sal.items()} if total > 0 else sal


@CRITERIA.register("grasp")
class GraSP(Criterion):
    """Gradient Signal Preservation (Wang et al. 2020): importance θ ⊙ Hg.

    The paper scores S = −θ ⊙ Hg and removes the *highest* S; we return −S, so the usual "keep the
    highest" rule removes the same weights. As in the authors' code the logits are divided by a
    temperature of 200, g is the gradient summed over the scoring batches and Hg = Σ_b ∇(gᵀ∇L_b).
    The authors split one batch into two halves and sum over them; with BatchNorm in train mode the
    halves are normalised by their own statistics, so that is *not* the same as one batch up to a factor
    (it is only in eval mode or without BatchNorm). Scores are signed:
    for structured granularities use ``reduce="mean"`` to keep the sign. The authors' optional
    re-initialisation of Linear layers before scoring is not reproduced (it scores different weights
    than the ones that are pruned)."""

    name = "grasp"
    needs_data = True
    signed = True
    temperature: float = 200.0

    def scores(self, model, layers, data):
        weights = [m.weight for m in layers.values()]
        for w in weights:
            w.requires_grad_(True)
        batches = list(data.batches(model_device(model)))
        g = [torch.zeros_like(w) for w in weights]
        for x, y in batches:
            grads = torch.autograd.grad(data.loss(model(x) / self.temperature, y), weights, allow_unused=True)
            for a, gi in zip(g, grads):
                if gi is not None:
                    a.add_(gi)
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in batches:
            grads = torch.autograd.grad(
                data.loss(model(x) / self.temperature, y), weights, create_graph=True, allow_unused=True
            )
            z = sum((gd * gi).sum() for gd, gi in zip(g, grads) if gi is not None)
            if not torch.is_tensor(z) or not z.requires_grad:
                continue  # loss does not depend on the weights twice (e.g. purely linear in them)
            for a, h in zip(hg, torch.autograd.grad(z, weights, allow_unused=True)):
                if h is not None:
                    a.add_(h)
        return {n: w.detach() * h for n, w, h in zip(layers, weights, hg)}


@CRITERIA.register("synflow")
class SynFlow(Criterion):
    """Iterative Synaptic Flow (Tanaka et al. 2020): data-free, |θ ⊙ dR/dθ| with R = Σ f(1; |θ|).

    As in the authors' code: every floating tensor of the state (parameters *and* BatchNorm buffers) is
    replaced by its absolute value, BatchNorm runs in eval mode and the input is all ones (one example).
    Unlike the authors' code (float32), everything is in float64 here, so products over deep networks do not
    underflow to zero; rankings can differ from theirs where float32 would have tied or underflowed. The
    engine iterates it (default 100
    rounds, exponential compression schedule), re-scoring the masked network each round. Needs only the
    input shape: from ``batch``/``loader`` or ``input_shape=``."""

    name = "synflow"
    needs_input_shape = True
    default_iterations = 100

    def scores(self, model, layers, data):
        shape = data.example_shape()
        model.double().eval()  # our own scoring copy
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.abs_()
        weights = [m.weight for m in layers.values()]
        for w in weights:
            w.requires_grad_(True)
        x = torch.ones((1, *shape), dtype=torch.float64, device=model_device(model))
        grads = torch.autograd.grad(model(x).sum(), weights, allow_unused=True)
        return {
            n: (w.detach() * (gr if gr is not None else torch.zeros_like(w))).abs()
            for n, w, gr in zip(layers, weights, grads)
        }


@CRITERIA.register("activation")
class Activation(Criterion):
    """|w| times the mean |activation| of the input unit/channel that w multiplies (ShrinkBench MagAct),
    averaged over every example (and spatial position) of the scoring batches."""

    name = "activation"
    needs_data = True

    def scores(self, model, layers, data):
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name: str):
            def record(module: nn.Module, args: tuple) -> None:
                a = args[0].detach().abs()
                if isinstance(module, nn.Linear):
                    per_unit, n = a.reshape(-1, a.shape[-1]).sum(0), a.numel() // a.shape[-1]
                else:  # conv: [batch, channels, *spatial]
                    per_unit, n = a.transpose(0, 1).reshape(a.shape[1], -1).sum(1), a.numel() // a.shape[1]
                sums[name] = per_unit.double() + sums.get(name, 0)
                counts[name] = counts.get(name, 0) + n

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        try:
            with torch.no_grad():
                for x, _ in data.batches(model_device(model)):
                    model(x)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for n, m in layers.items():
            if n not in sums:
                raise ValueError(f"criterion 'activation': layer {n!r} received no input in the forward pass")
            w = m.weight.detach()
            mean_act = (sums[n] / counts[n]).to(w.dtype)  # [in_channels]
            groups = getattr(m, "groups", 1)
            out_ch, in_per_group = w.shape[0], w.shape[1]
            act = mean_act.reshape(groups, in_per_group).repeat_interleave(out_ch // groups, dim=0)
            out[n] = w.abs() * act.reshape(out_ch, in_per_group, *([1] * (w.dim() - 2)))
        return out


class _Calibrated(Criterion):
    """A one-shot method of :mod:`benchkit.pruning.calibrated`: it is not a score, so the engine hands it the
    layers, their sparsities and the calibration inputs instead of calling :meth:`scores`."""

    needs_data = True
    calibrated = True

    def scores(self, model, layers, data):
        raise NotImplementedError(f"{self.name} prunes layer by layer from calibration activations: use "
                                  "benchkit.prune (it calls benchkit.pruning.calibrated.prune_calibrated)")


@CRITERIA.register("wanda")
class Wanda(_Calibrated):
    """|W_ij| · ||X_j||_2 over the calibration tokens, compared within each output row; no weight update
    (Sun et al. 2024)."""

    name = "wanda"
    comparison = "row"


@CRITERIA.register("sparsegpt")
class SparseGPT(_Calibrated):
    """Row-wise OBS reconstruction from each layer's calibration Hessian, which also updates the surviving
    weights (Frantar & Alistarh 2023)."""

    name = "sparsegpt"
    comparison = "row"
