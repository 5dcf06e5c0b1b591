"""Sharded runs of a Flax twin: a mesh string or jax.sharding.Mesh, the rule table that gives every
parameter a PartitionSpec (FSDP over "data", tensor parallel over "model", the user's regex
rules), and the Placement that ports weights straight into those shardings (parity.verify's
``mesh=``; docs/golden.md, "Sharded verify")."""
from parity.sharding._mesh import DATA, MODEL, ShardingError, make_mesh, mesh_devices, parse_mesh
from parity.sharding._placement import Placement
from parity.sharding._processes import join, launch
from parity.sharding._rules import STYLES, Note, ShardOptions, ShardRule, plan_specs

__all__ = ["DATA", "MODEL", "Note", "Placement", "STYLES", "ShardOptions", "ShardRule", "ShardingError",
           "join", "launch", "make_mesh", "mesh_devices", "parse_mesh", "plan_specs"]
