"""Data-parallel natural gradient on a device mesh, with JAX's own sharding.

The batch is sharded along its example axis over every device; parameters and the
optimizer state are replicated; ``jax.jit`` (GSPMD) inserts the all-reduces of the
curvature statistics. Runs on 8 CPU "devices" when no accelerator is present:

    python examples/data_parallel.py

On several hosts (``examples/multi_process.py`` runs and tests this), call
``jax.distributed.initialize()`` first on every host (it reads
the coordinator address, process count and index from the environment or arguments),
build the mesh over ``jax.devices()`` (all hosts' devices), and assemble each global
batch with ``jax.make_array_from_process_local_data(batch_sharding, local_batch)``;
the training step below is unchanged.

About 15 s on 2 CPU cores (jax 0.9.1 and 0.10.2): batch NLL 0.23 after 10 steps,
0.0098 after 60, training-set accuracy 0.999.
"""

import os

# 8 host devices for a CPU-only machine (added to any other XLA flags already set).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import natgrad_jax as ng


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def main():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    print(f"mesh: {mesh.devices.size} devices ({jax.devices()[0].platform})")

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target)
    model = ng.Model(mlp, ng.Categorical())
    # mesh=: each refresh factorises the Kronecker factors spread over the devices.
    optimizer = ng.natural_gradient(
        model, 1.0, solver="kronecker", damping=1e-2, max_kl=0.05, mesh=mesh
    )
    params = jax.device_put(init_mlp(jax.random.PRNGKey(0), [64, 64, 10]), replicated)
    state = jax.device_put(optimizer.init(params), replicated)

    @jax.jit
    def step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(model.nll)(params, xb, yb)
        updates, state = optimizer.update(grads, state, params, inputs=xb, targets=yb)
        return optax.apply_updates(params, updates), state, loss

    batch = 256  # divisible by the number of devices
    rng = np.random.default_rng(0)
    for t in range(1, 61):
        index = rng.choice(len(x), batch, replace=False)
        xb = jax.device_put(x[index], batch_sharding)
        yb = jax.device_put(y[index], batch_sharding)
        params, state, loss = step(params, state, xb, yb)
        if t % 10 == 0:
            print(f"step {t:3d}  batch NLL {float(loss):.4f}")
    accuracy = jnp.mean(jnp.argmax(mlp(params, x), -1) == y)
    print(f"training-set accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
    main()
