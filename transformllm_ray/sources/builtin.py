"""Built-in corpora read from installed PyPI packages: real text for the embedded default, none written by us.

- `licensedcode`: ScanCode's licence database (`pip install licensedcode-data`): ~2,300 licence texts, EULAs,
  terms of service, contributor and patent agreements (CC-BY-4.0 data; texts belong to their authors).
- `package-docs`: the long descriptions (READMEs) in the METADATA of the installed Python distributions:
  general English prose, used as the general-text mix of the debug pipeline.

Refs are machine-independent (`licensedcode-data/licenses/mit.LICENSE`), so ids and provenance match across
machines even though the files live in different site-packages folders.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from transformllm_ray.sources.readers import WorkFile


def licensedcode_dir() -> str:
    spec = importlib.util.find_spec("licensedcode")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("input.builtin=licensedcode needs the `licensedcode-data` package: "
                                  "pip install licensedcode-data==32.1.0")
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "data", "licenses")
        if os.path.isdir(d):
            return d
    raise FileNotFoundError("licensedcode-data is installed but has no data/licenses folder")


def licensedcode_files() -> list[WorkFile]:
    d = licensedcode_dir()
    try:
        version = importlib.metadata.version("licensedcode-data")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".LICENSE"):
            path = os.path.join(d, name)
            out.append(WorkFile(uri=path, size=os.path.getsize(path), fmt="licensedcode",
                                ref=f"licensedcode-data=={version}/licenses/{name}"))
    return out


def package_doc_files() -> list[WorkFile]:
    """The READMEs (METADATA long descriptions) of the packages installed in this environment's site-packages.

    Only there, not along sys.path: `import ray` puts Ray's vendored `thirdparty_files` on sys.path, so a
    listing along it changed within one run (200 -> 213 files) and the recorded inputs of ingest with it."""
    import sysconfig

    out = {}
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in importlib.metadata.distributions(path=paths):
        name = (dist.metadata["Name"] or "").lower()
        path = getattr(dist, "_path", None)
        meta = os.path.join(str(path), "METADATA") if path else ""
        if name and os.path.isfile(meta) and name not in out:
            out[name] = WorkFile(uri=meta, size=os.path.getsize(meta), fmt="package-doc",
                                 ref=f"package-docs/{name}=={dist.version}")
    return [out[k] for k in sorted(out)]


BUILTINS = {"licensedcode": licensedcode_files, "package-docs": package_doc_files}
