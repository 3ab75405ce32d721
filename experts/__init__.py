"""Expert compute: the pure torch core an expert host runs (no grpc, no ray).

Owns model parsing, weight loading, the expert FFN bank and devices; the types it shares with
the rest of moemesh (ModelSpec, Segment, ExpertKey, dtypes) come from `moemesh.protos.spec`.

```
config.json | preset   --spec_from_config-->       ModelSpec                  (model.py)
checkpoint dir | preset --open_source-->           WeightSource               (weights.py; presets.py)
WeightSource + [(layer, expert)] --ExpertBank.from_source--> ExpertBank on device/dtype (ffn.py)
ExpertBank.compute(segments, rows [R, H]) -->      [R, H], one SwiGLU FFN per expert
"auto" | "cuda:1" --resolve_device-->              torch.device; torch_executor (device.py)
```
"""
