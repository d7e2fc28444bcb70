"""Pipeline stages: cached when unchanged, redone when their config or inputs change."""

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
