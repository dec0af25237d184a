"""The parameter layout: shapes, logical axes and shardings, fitted to the mesh once.

Training, in-loop eval, launch.eval, launch.infer and Hugging Face import all place
parameters by this one layout, so a checkpoint written by one is read by the others
without a reshard, and a GQA model's few kv heads are replicated the same way
everywhere (a layout built without fitting used to split them unevenly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from t5x_like.models.trainable import Model
from t5x_like.parallel.partitioning import Partitioner


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamsLayout:
    """Shapes, logical specs and shardings of the parameters alone."""
    abstract: Any                 # ShapeDtypeStructs
    logical_specs: Any            # PartitionSpecs of logical axis names
    shardings: Any                # NamedShardings on the partitioner's mesh

    def abstract_with_shardings(self) -> Any:
        """ShapeDtypeStructs carrying shardings: where restored or loaded arrays go."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract, self.shardings)



def for_model(*, model: Model, partitioner: Partitioner,
                  feature_lengths: Mapping[str, int]) -> ParamsLayout:
    """The one home of the parameter layout: train, eval, infer and HF import use it.

    Fits the partitioner to the parameters first (mutating its rules), so a GQA
    model's few kv heads are replicated everywhere alike rather than split unevenly
    wherever a layout was built without fitting.
    """
    shape_kwargs = model.init_lengths(feature_lengths)
    rng = jax.random.key(0)   # made outside the mesh: an AOT mesh's devices cannot run it
    with partitioner.context():
        boxed = jax.eval_shape(
            lambda r: model.init_params(r, batch_size=1, **shape_kwargs), rng)
    param_specs = nn.get_partition_spec(boxed)
    abstract = nn.unbox(boxed)
    # Heads too few for their mesh axes are replicated; a dimension that cannot be
    # split is an error here, before anything is placed or compiled.
    partitioner.fit_to_parameters(abstract, param_specs)
    return ParamsLayout(abstract=abstract, logical_specs=param_specs,
                        shardings=partitioner.shardings(param_specs))
