.PHONY: generate lint format test demo imports families

generate:  ## regenerate protos/moemesh_pb2*.py from protos/moemesh.proto
	python -m moemesh.protos.generate

lint:
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

test:
	python -m pytest

demo:
	moemesh demo

imports:  ## the import graph of moemesh's packages (tests/unit/test_layers.py checks its layering)
	python -m tests.import_graph

families:  ## the README's table of supported transformers families, from what the tests prove
	python -m tests.integration.test_experts_interface
