"""``ng.eigenbasis_adam``: Adam in K-FAC's eigenbasis as an optax optimizer."""

from __future__ import annotations

from typing import Any

import optax

from natgrad_jax._model import Model
from natgrad_jax._solvers.eigenbasis_adam import EigenbasisAdam
from natgrad_jax._solvers.factored import DEFAULT_MAX_EXACT_ROWS
from natgrad_jax._solvers.kronecker import DEFAULT_BLOCK_SIZE
from natgrad_jax._transform import scale_by_natural_gradient


def eigenbasis_adam(
    model: Model,
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    refresh_every: int = 10,
    decay: float = 0.95,
    fisher: str = "monte_carlo",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    max_exact_rows: int | None = DEFAULT_MAX_EXACT_ROWS,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam run in the eigenbasis of each layer's K-FAC factors (``ng.EigenbasisAdam``).

    Every ``refresh_every`` steps the K-FAC factors A and G of each layer (averaged with
    ``decay``; Monte-Carlo labels by default, as K-FAC measures them) give the basis
    U = U_A ⊗ U_G; Adam's moments run on the weight's coordinates in it, and leaves the
    capture does not factor get plain Adam. With AdamW's ``weight_decay`` (decoupled,
    applied to every leaf as ``optax.adamw`` does with its default mask).

    It takes AdamW's learning rates. A step costs two rotations per layer beyond Adam's
    work (2·(K + D)·K·D multiply-adds for a K×D weight: about an AdamW step where K + D
    is well below the rows of a batch, as on a transformer's tokens), and each refresh
    K-FAC's statistics and one symmetric eigendecomposition per factor. On the
    character-level transformer of ``benchmarks/transformer_lm.py`` it was level with
    Muon and ahead of AdamW at equal time (docs/benchmarks.md); ``ng.natural_gradient``
    stays the choice where the Fisher's own step pays (the CNN, the autoencoder, GLMs).

    Args:
      model: the ``ng.Model`` being trained (the capture reads its layers).
      learning_rate: a number or an optax schedule.
      b1: Adam's β₁, the first moment's decay, in [0, 1).
      b2: Adam's β₂, the second moment's decay, in [0, 1).
      eps: Adam's ε ≥ 0 (the transform's damping).
      weight_decay: AdamW's decoupled weight decay (0: none).
      refresh_every: steps between eigenbases (and K-FAC statistics).
      decay: EMA factor of the K-FAC factors across refreshes, in [0, 1).
      fisher: the K-FAC factors' Fisher: ``"monte_carlo"``, ``"exact"`` or ``"empirical"``.
      block_size: a factor side over twice this is kept as its diagonal blocks of
        about this side, each with its own eigenbasis (``None``: whole).
      max_exact_rows: with ``fisher="exact"``, the most output-Fisher rows per example
        a refresh back-propagates, one backward pass each (a per-token language model
        has positions × classes: the update refuses more and names the remedies);
        ``None``: no limit.
      **options: other keywords of ``scale_by_natural_gradient`` (``statistics_every``,
        ``seed``, ``mesh``, ``axis_name``, ``max_curvature_bytes``, ``precision``...).

    Example:
      >>> import jax, jax.numpy as jnp, optax, natgrad_jax as ng
      >>> def mlp(p, x):
      ...     return jnp.tanh(x @ p["w1"]) @ p["w2"]
      >>> model = ng.Model(mlp, ng.Categorical())
      >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
      >>> p = {"w1": jax.random.normal(k1, (4, 8)) / 2, "w2": jax.random.normal(k2, (8, 3)) / 3}
      >>> x = jax.random.normal(k3, (32, 4))
      >>> y = jnp.argmax(x[:, :3], axis=1)
      >>> optimizer = ng.eigenbasis_adam(model, 3e-2)
      >>> state, before = optimizer.init(p), model.nll(p, x, y)
      >>> for _ in range(20):
      ...     g = jax.grad(model.nll)(p, x, y)
      ...     updates, state = optimizer.update(g, state, p, inputs=x, targets=y)
      ...     p = optax.apply_updates(p, updates)
      >>> bool(model.nll(p, x, y) < 0.8 * before)
      True
    """
    for name, value in (("eps", eps), ("weight_decay", weight_decay)):
        if not value >= 0:
            raise ValueError(f"eigenbasis_adam: {name} must be ≥ 0, got {value!r}.")
    refused = {"damping", "solver", "rescale", "momentum", "max_kl"} & set(options)
    if refused:
        raise TypeError(
            f"eigenbasis_adam sets {sorted(refused)} itself (Adam's ε is eps); use "
            "ng.scale_by_natural_gradient(model, solver=ng.EigenbasisAdam(...), ...) "
            "to choose them."
        )
    solver = EigenbasisAdam(b1=b1, b2=b2, block_size=block_size, max_exact_rows=max_exact_rows)
    return optax.chain(
        scale_by_natural_gradient(
            model,
            fisher=fisher,
            damping=eps,
            solver=solver,
            decay=decay,
            refresh_every=refresh_every,
            rescale=False,
            momentum=False,
            **options,
        ),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
