"""The contract: `moemesh.proto` (package `moemesh.v1`) and the code generated from it, the same
contract as Python types (`spec.py`, pure: no grpc, no protobuf), and `wire.py`, the one module
that converts between the two. Depends on nothing else in moemesh."""
