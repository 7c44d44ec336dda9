"""Every user path goes through `storage` (so gs:// works wherever a local path does): no module of models/, data/,
trainer/, eval/, experiments/, launch/ or an entry point opens, lists, moves or deletes a path with the local-only
APIs — builtin `open`, `pathlib.Path(...)`, `os` / `os.path` file operations, `shutil`, `glob`, `tarfile.open` —
except the places listed in ALLOWED, each local by nature, with the reason. `pathlib.Path(__file__)` (the
repository's own files) and `tempfile` (a local temporary file is local) are always allowed.

A new use of those APIs fails this test, naming the file, line and function: route the path through `storage`
(storage.Path is pathlib's API for local paths and gs://), or, if the path is genuinely local, add it to ALLOWED
with its reason.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "trainer", "eval", "experiments", "launch")
ENTRY_POINTS = ("train.py", "sweep.py")

OS_FILE_OPS = {"open", "fdopen", "remove", "unlink", "replace", "rename", "renames", "makedirs", "mkdir", "rmdir",
               "removedirs", "listdir", "scandir", "walk", "stat", "lstat", "link", "symlink", "chmod", "access",
               "truncate", "utime"}
OS_PATH_OPS = {"exists", "isfile", "isdir", "islink", "lexists", "getsize", "getmtime", "getctime", "getatime",
               "samefile", "realpath"}
PATHLIB_TYPES = {"Path", "PurePath", "PosixPath"}

# (file, function or class.method) -> why that path is local by nature.
ALLOWED = {
    ("train.py", "check_model_dir"): "checks that a local MODEL_DIR is a writable folder (os.access has no storage "
                                     "equivalent); a URL returns before it",
    ("models/hf_io.py", "save_pretrained"): "writes an HF folder on local disk (safetensors writes local files); "
                                            "trainer.export gives it a temporary folder and uploads that",
    ("models/hf_io.py", "_write_json"): "the same local folder as save_pretrained",
    ("trainer/run_lock.py", "LocalStore"): "the writer lock's local-filesystem store; gs:// has ObjectStore",
    ("trainer/demo_assets.py", "cache_dir"): "the local cache folder of the generated demo assets",
    ("data/demo.py", "kjv_chapters"): "reads the KJV text from an installed package",
    ("data/demo.py", "_cache_key"): "hashes the repository's own modules",
    ("data/demo.py", "prepare"): "builds the demo assets in a local cache folder (under a file lock)",
    ("data/jsonl_reader.py", "_Spill"): "a local temporary file holding lines of remote or compressed corpora",
    ("data/jsonl_reader.py", "JsonlReader._map"): "memory-maps its local spill files",
    ("data/pretokenize.py", "_write_file"): "deletes its local temporary ArrayRecord file once uploaded",
    ("data/synth/store.py", "JsonlStore"): "the generation journal, appended to after every item (crash-safe "
                                           "resume): local only, as an object store cannot append",
    ("data/synth/cli.py", "cmd_generate"): "the same local journal; a gs:// --out is refused before this line",
    ("launch/remote.py", "code_files"): "lists the repository's own files for the code archive",
    ("launch/remote.py", "code_archive"): "writes the code archive to a local temporary file",
    ("launch/tpu.py", "launch"): "a local temporary folder for the code archive",
    ("launch/aot.py", "run_all"): "a local temporary folder holding the config.json of a compile's INIT_FROM",
    ("launch/job.py", "<module>"): "the job's log folder on the worker's own disk (copied to MODEL_DIR/launch/ "
                                   "through storage)",
    ("launch/job.py", "Job.run"): "the same log file on the worker's own disk",
    ("launch/local_cloud.py", "LocalCloud.preempt"): "the local cloud's stand-in VMs are folders on this machine",
    ("launch/local_cloud.py", "LocalCloud.delete"): "the same stand-in VM folders",
    ("launch/local_cloud.py", "LocalCloud.scp"): "copies between this machine and a stand-in VM's folder",
    ("launch/local_cloud.py", "check_requirements"): "reads the repository's own requirements files",
    ("launch/local_cloud.py", "main"): "the local cloud's state folder on this machine",
    ("launch/rehearsal.py", "stage"): "reads the generated demo assets from their local cache",
    ("launch/rehearsal.py", "run"): "the rehearsal's local temporary folder (its cloud and worker homes)",
}


def _calls(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line, enclosing function or Class.method, call) of every local-only path call in one module."""
    tree = ast.parse(path.read_text(), str(path))
    from_pathlib = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "pathlib" for a in node.names if a.name in PATHLIB_TYPES}
    found = []

    def name_of(call: ast.Call) -> str | None:
        f = call.func
        if isinstance(f, ast.Name):
            return "open" if f.id == "open" else f"pathlib.{f.id}" if f.id in from_pathlib else None
        if not isinstance(f, ast.Attribute):
            return None
        owner = f.value
        if isinstance(owner, ast.Name):
            if (owner.id, f.attr in PATHLIB_TYPES) == ("pathlib", True) or (owner.id == "os" and f.attr in OS_FILE_OPS):
                return f"{owner.id}.{f.attr}"
            if owner.id == "shutil" and f.attr not in ("which", "get_terminal_size"):
                return f"shutil.{f.attr}"
            if (owner.id, f.attr) in (("glob", "glob"), ("glob", "iglob"), ("tarfile", "open")):
                return f"{owner.id}.{f.attr}"
        if (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name)
                and (owner.value.id, owner.attr) == ("os", "path") and f.attr in OS_PATH_OPS):
            return f"os.path.{f.attr}"
        return None

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + (node.name,)
        if isinstance(node, ast.Call):
            call = name_of(node)
            own_file = call and call.startswith("pathlib.") and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id == "__file__"
            if call and not own_file:
                found.append((node.lineno, ".".join(scope) or "<module>", call))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, ())
    return found


def _modules() -> list[pathlib.Path]:
    return [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))] + [REPO / e for e in ENTRY_POINTS]


def _entry(file: str, scope: str) -> tuple[str, str] | None:
    """The ALLOWED entry covering a call in `scope` of `file` (a class entry covers its methods)."""
    return next(((f, s) for f, s in ALLOWED if f == file and (scope == s or scope.startswith(s + "."))), None)


def test_every_user_path_goes_through_storage():
    found = [(str(p.relative_to(REPO)), line, scope, call) for p in _modules() for line, scope, call in _calls(p)]
    bad = [f"{file}:{line} in {scope}: {call}(...)" for file, line, scope, call in found if not _entry(file, scope)]
    assert not bad, ("local-only path calls outside `storage` (use storage.Path / storage helpers, or add the place "
                     "to ALLOWED with its reason):\n  " + "\n  ".join(bad))
    unused = set(ALLOWED) - {_entry(file, scope) for file, _, scope, _ in found}
    assert not unused, f"ALLOWED entries that no longer match anything (remove them): {sorted(unused)}"


def test_the_check_sees_what_it_must(tmp_path):
    """The scan itself: each kind of call is found, with its function; the repository's own files are not."""
    module = tmp_path / "m.py"
    module.write_text("import os, pathlib, shutil, glob\nfrom pathlib import Path as P\n"
                      "HERE = pathlib.Path(__file__).parent\n"
                      "def f(x):\n    open(x)\n    pathlib.Path(x)\n    P(x)\n    os.remove(x)\n"
                      "    os.path.exists(x)\n    shutil.rmtree(x)\n    glob.glob(x)\n    shutil.which('git')\n"
                      "class C:\n    def g(self, x):\n        os.replace(x, x)\n")
    assert _calls(module) == [(5, "f", "open"), (6, "f", "pathlib.Path"), (7, "f", "pathlib.P"),
                              (8, "f", "os.remove"), (9, "f", "os.path.exists"), (10, "f", "shutil.rmtree"),
                              (11, "f", "glob.glob"), (15, "C.g", "os.replace")]
