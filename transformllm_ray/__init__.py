"""TransformLLM-Ray: turn a raw domain corpus into a domain-adapted LLM on Ray.

Stages (each `transformllm <stage> --config PATH [key=value ...]`): ingest -> convert -> pack -> train -> eval
-> report; `run` does them in order and skips finished ones. This top-level import stays light: torch, vllm and
transformers are imported only inside the functions that need them (tests/test_light_import.py proves it).
"""

__version__ = "0.1.0"
