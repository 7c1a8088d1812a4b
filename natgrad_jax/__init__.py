"""natgrad_jax: natural gradient descent for JAX and optax.

Fisher information matrices of probabilistic models (exact, Monte-Carlo, empirical,
matrix-free) and optax transforms that precondition gradients by the damped inverse
Fisher.
"""

from natgrad_jax._capture import ForwardPass as ForwardPass
from natgrad_jax._damping import LevenbergMarquardt as LevenbergMarquardt
from natgrad_jax._describe import describe as describe
from natgrad_jax._diagnostics import Diagnostics as Diagnostics
from natgrad_jax._diagnostics import diagnostics as diagnostics
from natgrad_jax._eigenbasis_adam import eigenbasis_adam as eigenbasis_adam
from natgrad_jax._fisher import empirical_fisher as empirical_fisher
from natgrad_jax._fisher import fisher as fisher
from natgrad_jax._fisher import fisher_hessian as fisher_hessian
from natgrad_jax._fisher import fisher_operator as fisher_operator
from natgrad_jax._fisher import fisher_vector_product as fisher_vector_product
from natgrad_jax._fisher import kl_divergence as kl_divergence
from natgrad_jax._fisher import monte_carlo_fisher as monte_carlo_fisher
from natgrad_jax._fisher import per_example_scores as per_example_scores
from natgrad_jax._likelihoods import Bernoulli as Bernoulli
from natgrad_jax._likelihoods import Categorical as Categorical
from natgrad_jax._likelihoods import Gaussian as Gaussian
from natgrad_jax._likelihoods import Likelihood as Likelihood
from natgrad_jax._likelihoods import Masked as Masked
from natgrad_jax._likelihoods import Poisson as Poisson
from natgrad_jax._model import Model as Model
from natgrad_jax._solvers.auto import choose_solver as choose_solver
from natgrad_jax._solvers.block import BlockDiagonal as BlockDiagonal
from natgrad_jax._solvers.conjugate_gradient import ConjugateGradient as ConjugateGradient
from natgrad_jax._solvers.dense import Dense as Dense
from natgrad_jax._solvers.diagonal import Diagonal as Diagonal
from natgrad_jax._solvers.eigenbasis_adam import EigenbasisAdam as EigenbasisAdam
from natgrad_jax._solvers.ekfac import EKFAC as EKFAC
from natgrad_jax._solvers.kronecker import Kronecker as Kronecker
from natgrad_jax._solvers.solver import Solver as Solver
from natgrad_jax._solvers.woodbury import Woodbury as Woodbury
from natgrad_jax._state import NaturalGradientState as NaturalGradientState
from natgrad_jax._transform import natural_gradient as natural_gradient
from natgrad_jax._transform import scale_by_natural_gradient as scale_by_natural_gradient
from natgrad_jax._value_and_grad import value_and_grad as value_and_grad

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "Bernoulli",
    "BlockDiagonal",
    "Categorical",
    "ConjugateGradient",
    "Dense",
    "Diagnostics",
    "Diagonal",
    "EigenbasisAdam",
    "ForwardPass",
    "Gaussian",
    "Kronecker",
    "LevenbergMarquardt",
    "Likelihood",
    "Masked",
    "Model",
    "NaturalGradientState",
    "Poisson",
    "Solver",
    "Woodbury",
    "choose_solver",
    "describe",
    "diagnostics",
    "eigenbasis_adam",
    "empirical_fisher",
    "fisher",
    "fisher_hessian",
    "fisher_operator",
    "fisher_vector_product",
    "kl_divergence",
    "monte_carlo_fisher",
    "natural_gradient",
    "per_example_scores",
    "scale_by_natural_gradient",
    "value_and_grad",
]
