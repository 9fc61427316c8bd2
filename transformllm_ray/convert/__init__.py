"""Convert stage: chunks -> reading-comprehension training text, with vLLM (the paper) or mined rules (AdaptLLM).

    transformllm convert --config configs/debug-local.yaml

Modules: stage.py (selection, resume, passes, accounting), ledger.py (exactly-once commits), vllm_engine.py
(Ray Data + ray.data.llm pipeline), regex_engine.py (AdaptLLM baseline), prompts.py (the YAML prompt database
in transformllm_ray/prompts/), quality.py (the gate on every answer), format.py (the training-text layout).
"""
