"""Small helpers for tests (importable as tests.helpers)."""

from __future__ import annotations


def write_config(tmp_path, **sections) -> str:
    """A YAML config file under tmp_path: output_dir there, sections merged over a minimal base."""
    import yaml

    data = {"output_dir": str(tmp_path / "out"), "input": {"builtin": "licensedcode"}}
    for k, v in sections.items():
        data[k] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)
