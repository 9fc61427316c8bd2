"""Train stage as a Ray job (FSDP2 continued pre-training on Ray Train; resumes from the latest checkpoint).

    python -m jobs.train --config configs/debug-local.yaml
    ray job submit --working-dir . -- python -m jobs.train --config configs/phi2-legal.yaml
"""

import sys

from transformllm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(default_stage="train"))
