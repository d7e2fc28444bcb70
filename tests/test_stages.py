"""Pipeline stages: cached when unchanged, redone when their config or inputs change."""

import json
import shutil
import sys
from pathlib import Path

from satori.stages import Runner


def test_cache_invalidation_and_resume(tmp_path):
    calls = []

    def make(tag):
        def fn(folder):
            calls.append(tag)
            (folder / "out.txt").write_text(tag)
            return {"tag": tag}
        return fn

    lines = []
    r = Runner(tmp_path, echo=lines.append)
    assert r.run("a", {"x": 1}, [], make("a1")) == {"tag": "a1"}
    assert r.run("b", {"y": 1}, ["a"], make("b1")) == {"tag": "b1"}
    # same configs: nothing runs again, results come from stage.json
    r2 = Runner(tmp_path, echo=lines.append)
    assert r2.run("a", {"x": 1}, [], make("a2")) == {"tag": "a1"}
    assert r2.run("b", {"y": 1}, ["a"], make("b2")) == {"tag": "b1"}
    assert calls == ["a1", "b1"] and r2.summary()[0]["skipped"]
    # a changed upstream config changes the downstream key too
    r3 = Runner(tmp_path, echo=lines.append)
    r3.run("a", {"x": 2}, [], make("a3"))
    r3.run("b", {"y": 1}, ["a"], make("b3"))
    assert calls == ["a1", "b1", "a3", "b3"]
    # an unfinished stage with the same key keeps its folder (the trainer resumes from it)
    meta = tmp_path / "b" / "stage.json"
    meta.write_text(meta.read_text().replace('"done": true', '"done": false'))
    seen = []
    Runner(tmp_path, echo=lines.append).run("a", {"x": 2}, [], make("a4"))
    r4 = Runner(tmp_path, echo=lines.append)
    r4.keys["a"] = r3.keys["a"]
    r4.run("b", {"y": 1}, ["a"], lambda f: seen.append((f / "out.txt").read_text()))
    assert seen == ["b3"] and any("resuming" in line for line in lines)


def _grow(folder):
    """Hold 300 MB in this process and report its pid."""
    import os

    global _ballast
    _ballast = bytearray(300 * 2**20)
    return {"pid": os.getpid()}


def _rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_isolated_stage_runs_in_a_child_and_its_memory_goes_with_it(tmp_path):
    import os

    before = _rss_mib()
    r = Runner(tmp_path, echo=lambda s: None, isolate=True)
    res = r.run("big", {}, [], _grow)
    assert res["pid"] != os.getpid()
    assert _rss_mib() - before < 100  # the 300 MB lived and died in the child
    assert "_ballast" not in globals()
    # the result is cached like any other stage's
    assert Runner(tmp_path, echo=lambda s: None, isolate=True).run("big", {}, [], _grow) == res


def test_isolated_stage_errors_keep_their_type_and_message(tmp_path):
    import pytest

    from satori.errors import SatoriError, Stopped

    def user_error(folder):
        raise SatoriError("data.jsonl line 3: missing field 'question'")

    def stopped(folder):
        raise Stopped("stopped by SIGTERM at step 4; resume with --resume", signum=15)

    def bug(folder):
        return 1 / 0

    def dies(signum):
        def fn(folder):
            import os
            import signal

            if signum != signal.SIGKILL:  # SIGKILL cannot be caught at all
                signal.signal(signum, signal.SIG_DFL)  # as before a trainer installs its handler
            os.kill(os.getpid(), signum)
        return fn

    r = Runner(tmp_path, echo=lambda s: None, isolate=True)
    with pytest.raises(SatoriError, match="line 3: missing field 'question'"):
        r.run("a", {}, [], user_error)
    with pytest.raises(Stopped, match="step 4") as info:
        r.run("b", {}, [], stopped)
    assert info.value.signum == 15
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        r.run("c", {}, [], bug)
    # a signal that kills the stage's process: a stop if it was a stop request, else named, with the OOM hint for SIGKILL
    import signal

    with pytest.raises(Stopped, match="stage d: stopped by SIGTERM before it could write a checkpoint") as info:
        r.run("d", {}, [], dies(signal.SIGTERM))
    assert info.value.signum == signal.SIGTERM
    with pytest.raises(RuntimeError, match=r"stage e: its process was killed by SIGKILL without a result; out of memory"):
        r.run("e", {}, [], dies(signal.SIGKILL))
    with pytest.raises(RuntimeError, match=r"stage f: its process was killed by SIGSEGV without a result$"):
        r.run("f", {}, [], dies(signal.SIGSEGV))
    # none of them was recorded as done
    assert not any(rec.name in "abcdef" for rec in r.records)


def test_sigterm_to_the_pipeline_reaches_the_stage_once(tmp_path):
    """The stage sees one SIGTERM (checkpoint-and-stop), however it was sent to the parent."""
    import os
    import signal
    import threading
    import time

    import pytest

    from satori.errors import Stopped
    from satori.train.common import StopSignal

    def loop(folder):
        with StopSignal() as stop:
            (folder / "started").write_text("1")
            for step in range(600):
                time.sleep(0.05)
                if stop.requested:
                    raise Stopped(f"stopped by SIGTERM at step {step}", signum=stop.signum)
        return {"finished": True}

    def kill_when_started():
        for _ in range(400):
            if (tmp_path / "s" / "started").exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_when_started, daemon=True).start()
    with pytest.raises(Stopped, match="stopped by SIGTERM") as info:
        Runner(tmp_path, echo=lambda s: None, isolate=True).run("s", {}, [], loop)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the parent's own handler is back


def test_base_model_fingerprint_follows_content_not_location(tmp_path, monkeypatch):
    import satori.stages as stages

    a, b = tmp_path / "here" / "base", tmp_path / "there" / "copy"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        (folder / "config.json").write_text('{"hidden_size": 8}')
        (folder / "sub" / "tokenizer.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    assert stages.folder_fingerprint(a) == stages.folder_fingerprint(b)  # a moved checkout keeps its cache
    (b / "config.json").write_text('{"hidden_size": 9}')
    assert stages.folder_fingerprint(a) != stages.folder_fingerprint(b)
    (b / "config.json").write_text('{"hidden_size": 8}')
    (b / "sub" / "extra.txt").write_text("x")
    assert stages.folder_fingerprint(a) != stages.folder_fingerprint(b)
    # large files: size and both ends count, so a changed last byte changes the key
    monkeypatch.setattr(stages, "FINGERPRINT_WHOLE", 1000)
    monkeypatch.setattr(stages, "FINGERPRINT_ENDS", 100)
    (b / "sub" / "extra.txt").unlink()
    assert stages.folder_fingerprint(a) == stages.folder_fingerprint(b)
    weights = bytearray((b / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (b / "model.safetensors").write_bytes(bytes(weights))
    assert stages.folder_fingerprint(a) != stages.folder_fingerprint(b)


def test_relocatable_writes_paths_under_known_folders_as_placeholders():
    from satori.stages import relocatable

    places = {"/home/u/runs/quick": "$RUN", "/home/u/runs/quick/base": "$BASE", "/opt/m/": "$M"}
    cfg = {"out": "/home/u/runs/quick/sft-s0", "model": "/home/u/runs/quick/base", "tag": "/home/u/runs/quickly",
           "nested": {"paths": ["/home/u/runs/quick", "/opt/m/x", "/opt/m", "testbed:train"]}, "n": 3}
    assert relocatable(cfg, places) == {
        "out": "$RUN/sft-s0", "model": "$BASE", "tag": "/home/u/runs/quickly",  # a sibling is not under the folder
        "nested": {"paths": ["$RUN", "$M/x", "$M", "testbed:train"]}, "n": 3}


def test_a_stage_made_by_other_code_is_kept_and_flagged(tmp_path):
    from satori.stages import source_hashes

    calls, lines = [], []

    def fn(folder):
        calls.append(folder.name)
        return {"ok": folder.name}

    # "zz_unused.py": a source file no stage loads
    then = {**source_hashes(), "zz_unused.py": "1"}
    Runner(tmp_path, echo=lines.append, sources=then).run("a", {"x": 1}, [], fn)
    meta = tmp_path / "a" / "stage.json"
    record = json.loads(meta.read_text())
    assert record["sources"] == then and "stages.py" in record["modules"] and "zz_unused.py" not in record["modules"]

    def again(sources, name="a"):
        runner = Runner(tmp_path, echo=lines.append, sources=sources)
        assert runner.run(name, {"x": 1}, [], fn) == {"ok": name}
        return runner.summary()[0].get("other_code", False)

    # the same code, or a change to a file the stage did not load: cached, not flagged
    assert not again(then) and not again({**then, "zz_unused.py": "2"}) and calls == ["a"]
    assert "cached" in lines[-1] and "other satori code" not in lines[-1]
    # a file it loaded changed (or is gone): kept (not run again), and flagged, naming the file
    assert again({**then, "stages.py": "2"}) == ["stages.py"] and calls == ["a"]
    assert "cached" in lines[-1] and "made by other satori code: stages.py changed since" in lines[-1]
    assert again({k: v for k, v in then.items() if k != "stages.py"}) and calls == ["a"]
    # an unfinished stage resumed after any change is flagged and keeps the sources that started it
    meta.write_text(meta.read_text().replace('"done": true', '"done": false'))
    assert again({**then, "zz_unused.py": "3"}) and calls == ["a", "a"]
    assert "resuming" in lines[-2] and "zz_unused.py changed since" in lines[-2]
    assert json.loads(meta.read_text())["sources"] == then
    # a stage.json from before the files were recorded: the package's fingerprint decides, if there is one
    record = json.loads(meta.read_text())
    del record["sources"], record["modules"]
    for code, flagged in (("aaa", False), ("bbb", True), (None, False)):
        if code is None:
            del record["code"]
        else:
            record["code"] = code
        meta.write_text(json.dumps(record))
        runner = Runner(tmp_path, echo=lines.append, code="aaa")
        runner.run("a", {"x": 1}, [], fn)
        assert ("(bbb, now aaa)" in lines[-1]) is flagged and runner.summary()[0].get("other_code", False) is flagged
    assert calls == ["a", "a"]


def test_loaded_sources_are_the_package_files_this_process_imported(tmp_path, monkeypatch):
    import importlib

    from satori.stages import loaded_sources, source_hashes

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "used.py", "unused.py", "sub/__init__.py", "sub/deep.py"):
        (package / name).write_text(f"NAME = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("pkg.used")
    importlib.import_module("pkg.sub.deep")
    try:
        assert loaded_sources(package) == ["__init__.py", "sub/__init__.py", "sub/deep.py", "used.py"]
        assert sorted(source_hashes(package)) == ["__init__.py", "sub/__init__.py", "sub/deep.py", "unused.py",
                                                  "used.py"]
    finally:
        for name in ("pkg", "pkg.used", "pkg.sub", "pkg.sub.deep"):
            sys.modules.pop(name, None)

    # a stage run in its own process records what *that* process loaded
    from satori import stages

    monkeypatch.setattr(stages, "_package_root", lambda: package)

    def fn(folder):
        importlib.import_module("pkg.unused")
        return 1

    Runner(tmp_path / "run", echo=lambda line: None, isolate=True, sources=source_hashes(package)).run("a", {}, [], fn)
    record = json.loads((tmp_path / "run" / "a" / "stage.json").read_text())
    assert record["result"] == 1 and record["modules"] == ["__init__.py", "unused.py"]
    assert "pkg.unused" not in sys.modules  # imported in the stage's process only


def test_code_fingerprint_follows_the_source_not_its_location(tmp_path):
    from satori import stages
    from satori.stages import code_fingerprint, source_hashes

    package = Path(stages.__file__).parent
    first, moved = tmp_path / "one" / "satori", tmp_path / "two" / "satori"
    shutil.copytree(package, first, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copytree(first, moved)
    assert code_fingerprint(first) == code_fingerprint(moved) == code_fingerprint(package)
    (moved / "assets").mkdir()  # data files are not code
    (moved / "assets" / "x.json").write_text("{}")
    source_hashes.cache_clear()
    assert code_fingerprint(moved) == code_fingerprint(first)
    rae = moved / "rae.py"
    rae.write_text(rae.read_text().replace("line steps", "all steps"))
    source_hashes.cache_clear()  # a process reads the sources once
    assert code_fingerprint(moved) != code_fingerprint(first)
