"""Parallelism: the mesh, the one logical-axis rule table, TPU topologies, and the
parameter layout every stage shares."""
