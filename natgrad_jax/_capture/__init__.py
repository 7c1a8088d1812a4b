r"""Layer capture: the inputs a and output-gradients g of every matmul on a parameter leaf.

For a parameter W used as ``y = dot_general(W, x)`` (or ``dot_general(x, W)``), the
gradient of example i is built from the layer's input x restricted to that example and
the gradient g of the loss w.r.t. y restricted to that example; for a dense layer it is
the outer product xᵢ gᵢᵀ. Kronecker factors, exact diagonals and Woodbury kernels all
follow from a and g, so they never need the (N, P) matrix of per-example gradients.

How a and g are obtained, with public JAX APIs only (no tagging, no special layers):

1. ``jax.make_jaxpr(apply_fn)`` is read equation by equation. A variable *derives from
   leaf ℓ* if it is the leaf or comes from it through dtype/layout operations
   (convert_element_type, reshape, transpose, copy, squeeze, expand_dims; placements
   such as ``jax.sharding.reshard``, which leave the values as they are). A **layer**
   is an equation with exactly one such operand that is

   * a ``dot_general`` with no batch dimensions on it (dense layers, attention
     projections, MLPs applied per token),
   * a ``conv_general_dilated`` with the leaf as its kernel and one feature group
     (KFC, Grosse & Martens 2016: the kernel multiplies the input's patches),
   * a ``gather`` of whole rows of a (V, D) table (embeddings: the table multiplies
     one-hot rows of the indices),
   * an ``add`` of a (broadcast) bias, or a ``mul`` by a (broadcast) elementwise scale
     (LayerNorm/RMSNorm scales, BatchNorm in inference mode): their per-example
     gradients are g and g ⊙ x summed over the broadcast axes. A scale first multiplied
     by a value c computed without the inputs (BatchNorm's running 1/σ) is followed
     through that product; its layer input is x ⊙ c.

   Nested ``jit`` calls and ``jax.checkpoint`` (remat) bodies are entered recursively,
   and a leaf such a body returns (``nnx.remat`` returns its module's parameters) is
   followed after it; the interpreter of 4. keeps each checkpoint, policy and all.
   Leaves concatenated (then passed through layout operations) before a ``dot_general``
   along one of its free axes, or before an ``add``, are a layer each: the same input,
   their slice of the output (flax's ``OptimizedLSTMCell`` joins its four gates' kernels
   for one matmul).
   Equations whose results are never used (dead code) are skipped.
2. A leaf is **captured** if every use of it is such a layer (one layer per leaf); any
   other leaf (weights inside custom derivatives, tied weights, a weight multiplied by
   a computed value before its matmul) is
   left to the **fallback**: ``jax.vmap`` of per-example gradients restricted to those
   leaves. Nothing is silently approximated: ``describe`` lists both sets.
3. The example axis of each layer's input is the axis whose size follows the batch
   size: the function is traced a second time with N + 1 examples (N + the device
   count under ``jax.set_mesh``) and the shapes compared. A layer whose input has no
   such axis is left to the fallback.
4. The jaxpr is then evaluated by a small interpreter that adds a zero "probe" to the
   output of every captured layer and returns the layer inputs: the gradient w.r.t. a
   probe is g, from one batched backward pass. Inside ``shard_map`` the function is
   first traced again on the device-varying values and its layers found again there
   (``_traced_here``), so that its primitives get the casts JAX requires.

Assumes examples do not interact (no batch normalisation across the batch), as every
per-example Fisher does.
"""

from natgrad_jax._capture.find import capture
from natgrad_jax._capture.forward_pass import ForwardPass, probed_forward
from natgrad_jax._capture.interpreter import probed_apply
from natgrad_jax._capture.layer import Capture, Layer, operand_of

__all__ = [
    "Capture",
    "ForwardPass",
    "Layer",
    "capture",
    "operand_of",
    "probed_apply",
    "probed_forward",
]
