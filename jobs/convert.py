"""Convert stage as a Ray job (rewrite chunks into reading-comprehension text with vLLM actors).

    python -m jobs.convert --config configs/debug-local.yaml
    ray job submit --working-dir . -- python -m jobs.convert --config configs/mistral-legal-7b.yaml
"""

import sys

from transformllm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(default_stage="convert"))
