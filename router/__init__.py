"""The router's pure core (torch only; no grpc, no ray): the sparse path of one MoE layer.

```
hidden [T, H] ──gate──▶ Routing ──plan──▶ DispatchPlan (one HostBatch per host)
   ──dispatch (ExpertTransport, concurrent)──▶ expert rows ──combine──▶ out [T, H]
```

- `gating.py`: gate (scores, groups, top-k / top-p / threshold), per-request policies;
- `dispatch.py`: plan, replan after a failure, pack and combine; the routing table;
- `replicas.py`: replica choice and host health;
- `pipeline.py`: `SparseMoE`, the async pipeline over the `ExpertTransport` protocol.
Shared types (GateConfig, Routing, RoutingPolicy, Segment, HostInfo) come from `moemesh.protos.spec`.
"""
