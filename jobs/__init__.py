"""Thin Ray job entry points over transformllm_ray.cli (same code path as the `transformllm` command)."""
