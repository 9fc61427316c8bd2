"""The reading-comprehension layout of the training text: the raw chunk, then its tasks.

    text = training_text(chunk_text, [("Summarize the passage above.", "The licence ...")], db)

Layout (from the prompt database's `format`, `legal/v1`):

    <raw chunk>

    Question: <question 1>
    Answer: <answer 1>

    Question: <question 2>
    Answer: <answer 2>

The raw chunk is always the whole chunk, also when the prompt had to shorten it to fit the engine's context.
Both engines (vllm, regex) write this layout, so pack and train see one format.
"""

from __future__ import annotations

from transformllm_ray.convert.prompts import PromptDB


def training_text(chunk_text: str, tasks: list[tuple[str, str]], db: PromptDB) -> str:
    parts = [chunk_text.strip()]
    parts += [db.task_format.format(question=q.strip(), answer=a.strip()) for q, a in tasks]
    return db.separator.join(parts)
