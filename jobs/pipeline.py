"""Whole pipeline as one Ray job: every stage in order, skipping finished ones (a resubmitted job resumes).

    python -m jobs.pipeline --config configs/debug-local.yaml            # local single-node Ray
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/debug-local.yaml
"""

import sys

from transformllm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(default_stage="run"))
