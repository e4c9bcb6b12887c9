"""Writes docs/bad_inputs.md: what `mmdiff` does with each class of bad input, found by doing it.

Each case builds its input in a fresh folder (a tiny random LLaVA, a 16-record JSONL dataset and a
reduced study config, shared by all cases), runs the command line in this process exactly as a user
would type it, and records the exit code, the first line of what was printed, and what the command
left on disk. tests/test_bad_inputs.py runs this script and compares its output with the committed
page, so the page stays true.

    python docs/bad_inputs.py            # rewrite docs/bad_inputs.md
    python docs/bad_inputs.py --check    # exit 1 when the page is stale
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE = Path(__file__).with_name("bad_inputs.md")
EXIT_CODES = {0: "ok", 1: "internal error (a bug: please report it)", 2: "bad input or config",
              130: "interrupted"}


@dataclass
class Case:
    """One class of bad input: `setup(root)` writes what it needs and returns the argv after `mmdiff`."""

    what: str
    setup: Callable[["Fixture"], list[str]]
    expect: int  # the exit code the scheme asks for
    unprivileged: bool = False  # run as an ordinary user: root writes into read-only folders


@dataclass
class Row:
    what: str
    how: str
    code: int
    first_line: str
    left: str


# ----------------------------------------------------------------------------- the shared fixture
class Fixture:
    """A tiny model pair, a JSONL dataset with images and a reduced study config, in `root`."""

    def __init__(self, root: Path):
        import yaml
        from PIL import Image

        from mmdiff.models.tiny import build_tiny

        self.root = root
        self.models = build_tiny("llava", root / "tiny")
        rows = []
        for i in range(16):
            Image.new("RGB", (32, 32), ((37 * i) % 255, (91 * i) % 255, 200)).save(root / f"im{i}.png")
            spatial = i % 2 == 0
            rows.append({"id": f"r{i}", "image": f"im{i}.png",
                         "question": "Is the square left of the circle?" if spatial else "What colour is it?",
                         "answers": ["yes" if spatial else "red"], "caption": f"a red square and a circle {i}",
                         "tasks": ["spatial", "yesno"] if spatial else ["vqa"]})
        (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        data = {"kind": "jsonl", "args": {"path": str(root / "data.jsonl")}}
        self.config: dict[str, Any] = {
            "name": "tiny",
            "model": {"vlm": str(self.models / "vlm"), "base_lm": str(self.models / "base")},
            "layers": [0, 1],
            "datasets": {"train": data, "test": {**data, "limit": 8}, "validation": {**data, "limit": 8}},
            "capture": {"datasets": ["train"], "batch_size": 8, "shard_tokens": 1024},
            "train": {"k": 4, "batch_size": 64, "total_tokens": 256, "expansion_factor": 2},
            "stats": {"tasks": ["spatial"], "neutral_tasks": []},
        }
        self._yaml = yaml
        self.write_config("study.yaml")

    def write_config(self, name: str, **changes: Any) -> Path:
        """The fixture's config with dotted-path changes ({"train.k": 0}); a value None deletes the key."""
        import copy

        cfg = copy.deepcopy(self.config)
        for dotted, value in changes.items():
            *path, last = dotted.split(".")
            node = cfg
            for key in path:
                node = node.setdefault(key, {})
            if value is None:
                node.pop(last, None)
            else:
                node[last] = value
        p = self.root / name
        p.write_text(self._yaml.safe_dump(cfg, sort_keys=False))
        return p

    def run(self, *extra: str, config: str = "study.yaml") -> list[str]:
        return ["run", "--config", str(self.root / config), "--runs-dir", str(self.root / "runs"),
                "--no-progress", *extra]


# ----------------------------------------------------------------------------- the cases
def _bad_yaml(f: Fixture) -> list[str]:
    (f.root / "broken.yaml").write_text("name: tiny\nlayers: [0, 1\n")
    return f.run(config="broken.yaml")


def _sae_folder(f: Fixture, d_in: int) -> str:
    from mmdiff.sae import SAEConfig, build_sae

    for L in f.config["layers"]:
        sae = build_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=4 * d_in, k=4, hook_layer=L))
        sae.save(f.root / f"sae_{d_in}" / f"layer_{L}")
    return str(f.root / f"sae_{d_in}" / "layer_{layer}")


def _d_model(f: Fixture) -> int:
    return json.loads((f.models / "base" / "config.json").read_text())["hidden_size"]


def _read_only_runs(f: Fixture) -> list[str]:
    (f.root / "runs").mkdir(exist_ok=True)
    os.chmod(f.root / "runs", 0o555)
    return f.run()


def _finished_run(f: Fixture) -> Path:
    """runs/tiny as a finished run leaves it (a manifest and config.yaml; no weights needed)."""
    run = f.root / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text((f.root / "study.yaml").read_text())
    (run / "manifest.json").write_text(json.dumps({"mmdiff_version": "0.1.0", "stages": {}}))
    return run


def _failed_command_on_a_finished_run(f: Fixture) -> list[str]:
    _finished_run(f)
    return f.run("--only", "nosuchstage", config=f.write_config("other.yaml", **{"train.k": 8}).name)


def _read_only_finished_run(f: Fixture) -> list[str]:
    run = _finished_run(f)
    os.chmod(run, 0o555)
    return ["report", str(run)]


def _corrupt_manifest(f: Fixture) -> list[str]:
    run = _finished_run(f)
    (run / "manifest.json").write_text('{"stages": {')
    return f.run()


def _not_a_run(f: Fixture) -> list[str]:
    (f.root / "notes").mkdir()
    (f.root / "notes" / "todo.txt").write_text("x")
    return ["report", str(f.root / "notes")]


def _a_file(f: Fixture) -> list[str]:
    (f.root / "notes.txt").write_text("x")
    return ["report", str(f.root / "notes.txt")]


CASES: list[Case] = [
    Case("config file missing", lambda f: f.run(config="nope.yaml"), 2),
    Case("config is not valid YAML", _bad_yaml, 2),
    Case("misspelt config key", lambda f: f.run(config=f.write_config("c.yaml", **{"train.kk": 4}).name), 2),
    Case("config value of the wrong type",
         lambda f: f.run(config=f.write_config("c.yaml", layers="two").name), 2),
    Case("stage names a dataset that is not defined",
         lambda f: f.run(config=f.write_config("c.yaml", **{"capture.datasets": ["nope"]}).name), 2),
    Case("unknown dataset kind",
         lambda f: f.run(config=f.write_config("c.yaml", **{"datasets.train.kind": "jsonll"}).name), 2),
    Case("misspelt dataset argument",
         lambda f: f.run(config=f.write_config("c.yaml", **{"datasets.train.args": {"pth": "x"}}).name), 2),
    Case("dataset argument of the wrong type (dry run)",
         lambda f: f.run("--dry-run", config=f.write_config("c.yaml", **{"datasets.train": {
             "kind": "shapes", "args": {"split": "train", "n_per_family": "eight"}}}).name), 2),
    Case("empty training split (n_per_family: 0, dry run)",
         lambda f: f.run("--dry-run", config=f.write_config("c.yaml", **{"datasets.train": {
             "kind": "shapes", "args": {"split": "train", "n_per_family": 0}}}).name), 2),
    Case("dataset file missing",
         lambda f: f.run(config=f.write_config("c.yaml", **{"datasets.train.args.path": "/nonexistent/d.jsonl"}).name), 2),
    Case("model folder missing",
         lambda f: f.run(config=f.write_config("c.yaml", **{"model.vlm": str(f.root / "no_model")}).name), 2),
    Case("layer beyond the model's depth",
         lambda f: f.run(config=f.write_config("c.yaml", layers=[0, 99]).name), 2),
    Case("device: cuda where torch has no CUDA (dry run)",
         lambda f: f.run("--dry-run", config=f.write_config("c.yaml", **{"model.device": "cuda"}).name), 2),
    Case("base SAEs of another model (d_in)",
         lambda f: f.run(config=f.write_config("c.yaml", **{"train.base_saes": _sae_folder(f, 2 * _d_model(f))}).name), 2),
    Case("misspelt stage in --only (dry run)", lambda f: f.run("--dry-run", "--only", "trian"), 2),
    Case("unknown stage in --from", lambda f: f.run("--from", "foo"), 2),
    Case("--name that leaves the runs folder", lambda f: f.run("--name", "../escape_dir", "--only", "capture"), 2),
    Case("unknown command-line option", lambda f: f.run("--fast"), 2),
    Case("runs folder not writable", _read_only_runs, 2, unprivileged=True),
    Case("`mmdiff report` on a folder that is not a run", _not_a_run, 2),
    Case("`mmdiff report` on a file", _a_file, 2),
    Case("stage run alone before the stage it reads", lambda f: f.run("--only", "stats"), 2),
    Case("failing command on a finished run (config.yaml kept)", _failed_command_on_a_finished_run, 2),
    Case("corrupt manifest.json", _corrupt_manifest, 2),
    Case("`mmdiff report` on a run folder that is not writable", _read_only_finished_run, 2, unprivileged=True),
    Case("run name with a path separator", lambda f: f.run("--dry-run", "--name", "a/b"), 2),
]


# ----------------------------------------------------------------------------- running them
def _files(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _left(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], root: Path) -> str:
    """Files and folders the command created or changed, top-most first, at most 4 named."""
    changed = sorted(p for p, v in after.items() if before.get(p) != v and not (root / p).is_dir())
    created_dirs = sorted(p for p in after if p not in before and (root / p).is_dir())
    tops = [d for d in created_dirs if not any(d.startswith(o + "/") for o in created_dirs if o != d)]
    items = [d + "/" for d in tops] + [p for p in changed if not any(p.startswith(d + "/") for d in tops)]
    if not items:
        return "nothing"
    return ", ".join(f"`{i}`" for i in items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def invoke(argv: list[str]) -> tuple[int, str]:
    """Run `mmdiff ARGV` in this process as the console script does: (exit code, output)."""
    from mmdiff import cli

    out = io.StringIO()
    old_width = cli.console.width
    cli.console.width = 400  # one message, one line
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = cli.run_cli(argv)
            except Exception as exc:  # what the user would see as a traceback (exit 1)
                print(f"Traceback (most recent call last): ... {type(exc).__name__}: {exc}")
                code = 1
    finally:
        cli.console.width = old_width
    return code, out.getvalue()


def _drop_dac_override() -> None:
    """Give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: still root (who owns everything here),
    but bound by permission bits, so a folder of mode 0555 is read-only as for anyone else."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for d in data[:1]:
        d.effective &= ~((1 << 1) | (1 << 2))
        d.permitted &= ~((1 << 1) | (1 << 2))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def invoke_unprivileged(argv: list[str]) -> tuple[int, str]:
    """`invoke` in a child process bound by permission bits, when this one is root and so
    would write into read-only folders."""
    if os.geteuid() != 0:
        return invoke(argv)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop the override, run, send the result back
        try:
            _drop_dac_override()
            result = invoke(argv)
        except BaseException as exc:  # noqa: BLE001
            result = (1, f"Traceback (most recent call last): ... {type(exc).__name__}: {exc}")
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    code, text = json.loads(b"".join(chunks))
    return code, text


def _first_line(text: str, root: Path) -> str:
    """The line that says what happened: the error (with its first item when it lists several),
    else the first line printed."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("─-+|╭╮╰╯│ ")]
    line = lines[0] if lines else ""
    for i, ln in enumerate(lines):
        if ln.startswith(("Traceback", "error:", "x ", "│ No such option")):
            line = ln + (" " + lines[i + 1] if ln.endswith(":") and i + 1 < len(lines) else "")
            break
    line = line.replace(str(root), "<tmp>").replace(str(Path.home()), "~").strip("│ ")
    return re.sub(r"\s+", " ", line)


def run_cases(cases: list[Case] | None = None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdiff-bad-") as tmp:
        base = Path(tmp)
        shared = Fixture(base / "fixture")
        for i, case in enumerate(cases or CASES):
            root = base / f"case{i}"
            root.mkdir()
            # each case gets its own folder holding links to the shared model, data and config
            for item in shared.root.iterdir():
                (root / item.name).symlink_to(item)
            f = Fixture.__new__(Fixture)
            f.__dict__.update({**shared.__dict__, "root": root})
            argv = case.setup(f)
            before = _files(root)
            code, text = (invoke_unprivileged if case.unprivileged else invoke)(argv)
            after = _files(root)
            for p in root.rglob("*"):  # undo read-only folders so the temporary tree can go
                with contextlib.suppress(OSError):
                    if p.is_dir() and not p.is_symlink():
                        os.chmod(p, p.stat().st_mode | stat.S_IWUSR)
            how = "mmdiff " + " ".join(a.replace(str(root), "<tmp>") for a in argv)
            text = text.replace(str(shared.root), str(root))  # one name for the case's files
            rows.append(Row(case.what, how, code, _first_line(text, root), _left(before, after, root)))
    return rows


def render(rows: list[Row]) -> str:
    head = [
        "# What mmdiff does with bad input",
        "",
        "Generated by `python docs/bad_inputs.py` (tests/test_bad_inputs.py checks it is current).",
        "Each row is one class of bad input, done for real on a tiny random LLaVA with a reduced",
        "config; `<tmp>` is the folder the case ran in. Exit codes, the same for every command:",
        "",
        *[f"- **{c}**: {what}" for c, what in EXIT_CODES.items()],
        "",
        "| bad input | how | exit | first line of the message | left on disk |",
        "|---|---|---|---|---|",
    ]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    body = [f"| {esc(r.what)} | `{esc(r.how)}` | {r.code} | {esc(r.first_line)} | {esc(r.left)} |" for r in rows]
    return "\n".join(head + body) + "\n"


def main() -> int:
    page = render(run_cases())
    if "--check" in sys.argv[1:]:
        if PAGE.read_text() != page:
            print(f"{PAGE} is stale: run python docs/bad_inputs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
