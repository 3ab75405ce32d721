"""Expert compute: the pure torch core an expert host runs (no grpc, no ray).

```
config.json | preset   --spec_from_config-->       ModelSpec                  (model.py)
checkpoint dir | preset --open_source-->           WeightSource               (weights.py)
WeightSource + [(layer, expert)] --ExpertBank.from_source--> ExpertBank on device/dtype (ffn.py)
ExpertBank.compute(spans, rows [R, H]) -->         [R, H], one SwiGLU FFN per expert
"auto" | "cuda:1" | "bf16" --resolve_device / parse_dtype--> torch.device / dtype (device.py)
```
"""
