"""Running the mesh: the `moemesh` CLI, local meshes (embedded, processes), Ray deployment, the
placement planner and accelerator table, `offload_experts` for transformers models, trace
tooling, cluster manifests and dashboards. The only package that imports ray."""
