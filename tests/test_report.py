"""The run report: claims on hand-made results, the written files, escaping, and the HTML in Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from satori.report import (
    claims_rows, compute_claims, length_claim, mean_std, paired_accuracy_difference, script_json, smooth, write_report,
)

XSS = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"


def metrics(pass1: float, reflect: float = 0.3, ft: int = 2, tf: int = 1, levels: dict | None = None,
            maj: float | None = None) -> dict:
    """A metrics dict shaped like satori.evaluate.compute_metrics output."""
    reflection = {"n_reflected": ft + tf + 3, "counts": {"F->T": ft, "T->F": tf, "T->T": 2, "F->F": 1},
                  "f_to_t_share": ft / (ft + tf) if ft + tf else 0.0,
                  "t_to_f_share": tf / (ft + tf) if ft + tf else 0.0,
                  "f_to_t_rate": 0.0, "t_to_f_rate": 0.0}
    m = {
        "n": 50, "pass@1": pass1, "format_compliance": 0.9, "reflect_rate": reflect, "explore_rate": reflect / 2,
        "truncation_rate": 0.0, "mean_tokens": 80.0, "reflection": reflection,
        "sampled": {"n": 400, "reflect_rate": reflect, "explore_rate": reflect / 2,
                    "reflection": {**reflection, "steps": {"p_reflect_after_mistake": reflect / 4,
                                                           "p_reflect_after_wrong": reflect / 2,
                                                           "p_reflect_after_right": reflect / 8,
                                                           "p_repair_after_reflect": reflect / 3,
                                                           "p_break_after_reflect": reflect / 5}}},
    }
    if maj is not None:
        m.update({"k": 8, "k_problems": 20, "pass@8": maj + 0.1, "maj@8": maj, "sample_accuracy": pass1})
    if levels:
        m["by_level"] = {str(lv): {"n": 10, "pass@1": v} for lv, v in levels.items()}
    return m


def model(label: str, per_seed: list[float], **kw) -> dict:
    return {"label": label, "seeds": {str(i): {"test": metrics(p, **kw), "ood": metrics(p / 2)}
                                      for i, p in enumerate(per_seed)}}


def curve(lengths: list[float], reward0: float = -0.8) -> list[dict]:
    return [{"step": i + 1, "reward": reward0 + 0.02 * i, "accuracy": 0.2 + 0.01 * i, "response_length": v}
            for i, v in enumerate(lengths)]


DIP = [100, 90, 80, 70, 60, 55, 60, 70, 85, 100, 110, 120]


@pytest.fixture()
def results() -> dict:
    """Two seeds; rl_round1 beats sft_coat, loses to rl_no_rae; rl_cot and sft_gold missing."""
    return {
        "preset": "quick", "date": "2026-11-22T01:00:00", "command": "satori run configs/quick.yaml",
        "seconds": 812.3, "version": "0.1.0", "seeds": [0, 1],
        "models": {
            "base": model("testbed base model", [0.10, 0.12], reflect=0.0, ft=0, tf=0),
            "sft_coat": model("format tuned", [0.30, 0.32], ft=1, tf=3, levels={1: 0.5, 2: 0.2}, maj=0.35),
            "rl_round1": model("PPO round 1", [0.40, 0.44], ft=3, tf=1, levels={1: 0.7, 2: 0.3}, maj=0.45),
            "rl_round2": model("PPO round 2", [0.45, 0.47]),
            "rl_no_rae": model("no RAE", [0.50, 0.52]),
            "latro": model("LaTRO | gold", [0.20, 0.22], reflect=0.0, ft=0, tf=0),
        },
        "curves": {
            "rl_round1": {"0": curve(DIP), "1": curve([v + 4 for v in DIP])},
            "rl_no_rae": {"0": curve([100 - 2 * i for i in range(12)]), "1": curve([98 - 2 * i for i in range(12)])},
            "latro": {"0": [{"step": i + 1, "reward": -3.0 + 0.1 * i, "kl": 0.01 * i} for i in range(10)]},
        },
        "trajectories": [
            {"model": "rl_round1", "id": "test-3", "question": "What is 3 * 6?", "answer": "18",
             "response": "Step 1: 3*6 = 16.<|reflect|>Check: 3*6 is 18, not 16.<|explore|>So the answer is "
                         "\\boxed{18}.", "extracted": "18", "correct": True},
            {"model": "sft_coat", "id": "test-4", "question": "a < b & c?", "answer": "7",
             "response": "Step 1: " + XSS + "<|continue|>\\boxed{5}", "extracted": "5", "correct": False},
        ],
        "stages": [{"name": "pretrain", "seconds": 1.2, "skipped": True},
                   {"name": "ppo_round1", "seconds": 300.5, "skipped": False,
                    "final": "best held-out model (step 10)"}],
    }


def test_stages_table_names_the_model_a_trainer_kept(results):
    from satori.report import stages_rows

    header, rows = stages_rows(results)
    assert header[-1] == "final model"
    assert rows == [["pretrain", "1.2", "yes (cached)", ""],
                    ["ppo_round1", "300.5", "no", "best held-out model (step 10)"], ["total", "301.7", "", ""]]
    results["stages"][0]["other_code"] = results["stages"][1]["other_code"] = True  # recorded before the files were
    assert [row[2] for row in stages_rows(results)[1]] == [
        "yes (cached, made by other satori code)", "no (resumed, started by other satori code)", ""]
    results["stages"][0]["other_code"] = ["rae.py", "train/ppo.py", "train/sft.py", "utils.py"]
    results["stages"][1]["other_code"] = ["train/ppo.py"]
    assert [row[2] for row in stages_rows(results)[1]] == [
        "yes (cached, made by other satori code: rae.py, train/ppo.py, train/sft.py and 1 more changed since)",
        "no (resumed, started by other satori code: train/ppo.py changed since)", ""]


def by_name(claims: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in claims}


# --------------------------------------------------------------------------- claims


def test_claims_held_not_held_and_missing(results):
    claims = by_name(compute_claims(results))
    held = claims["RL beats format tuning"]
    assert held["held"] is True
    assert held["numbers"]["mean_a"] == pytest.approx(0.42) and held["numbers"]["mean_b"] == pytest.approx(0.31)
    assert held["numbers"]["diff"] == pytest.approx(0.11)
    assert held["numbers"]["significant"] is True  # 0.11 > pooled std ≈ 0.021
    assert "n=2" in held["detail"] and "42.0 ± 2.8" in held["detail"]
    assert claims["RAE helps"]["held"] is False
    assert claims["round 2 ≥ round 1"]["held"] is True
    assert claims["LaTRO beats the base model"]["held"] is True
    for name in ("COAT beats plain CoT", "LaTRO beats SFT on gold rationales", "the ORM bonus helps"):
        assert claims[name]["held"] is None and claims[name]["detail"].startswith("Not measured")
    # F→T share: 3/4 after RL vs 1/4 before
    ft = claims["F→T rises after RL"]
    assert ft["held"] is True and ft["numbers"]["mean_a"] == pytest.approx(0.75)
    assert len(claims) == 10


def test_round2_equal_counts_as_held_but_equal_beats_does_not(results):
    results["models"]["rl_round2"] = model("PPO round 2", [0.40, 0.44])
    results["models"]["sft_coat"] = model("format tuned", [0.40, 0.44])
    claims = by_name(compute_claims(results))
    assert claims["round 2 ≥ round 1"]["held"] is True
    assert claims["RL beats format tuning"]["held"] is False
    assert claims["RL beats format tuning"]["numbers"]["significant"] is False


def test_reflection_share_without_changed_answers_is_not_measured(results):
    results["models"]["sft_coat"] = model("format tuned", [0.3], ft=0, tf=0)
    claim = by_name(compute_claims(results))["F→T rises after RL"]
    assert claim["held"] is None


def test_f_to_t_claim_reads_the_sampled_answers(results):
    # greedy answers never reflect (as on the testbed after RL); the samples do: 1/4 F→T before, 3/4 after
    for name, (ft, tf) in (("rl_round1", (3, 1)), ("sft_coat", (1, 3))):
        for seed in results["models"][name]["seeds"].values():
            seed["test"]["reflection"] = {"n_reflected": 0, "counts": {"F->T": 0, "T->F": 0, "T->T": 0, "F->F": 0},
                                          "f_to_t_share": 0.0, "t_to_f_share": 0.0}
            seed["test"]["sampled"]["reflection"].update(counts={"F->T": ft, "T->F": tf}, f_to_t_share=ft / 4)
    claim = by_name(compute_claims(results))["F→T rises after RL"]
    assert claim["held"] is True and claim["numbers"]["metric"] == "sampled.reflection.f_to_t_share"
    assert claim["numbers"]["mean_a"] == pytest.approx(0.75) and claim["numbers"]["mean_b"] == pytest.approx(0.25)
    assert "sampled answers" in claim["detail"]
    # the shares rest on few events: the detail says how many (2 seeds × 4 changed answers each)
    assert claim["numbers"]["changed_a"] == {"F->T": 6, "T->F": 2}
    assert "rl_round1 8 (6 F→T, 2 T→F), sft_coat 8 (2 F→T, 6 T→F)" in claim["detail"]
    assert "step_effect_a" not in claim["numbers"]  # no step checker's counts in these results


def test_f_to_t_claim_adds_the_checks_own_effect_by_the_step_checker(results):
    # per seed: round 1's checks repair 3 wrong lines and break 5 right ones, format tuning's 2 and 18
    for name, (repaired, broken) in (("rl_round1", (3, 5)), ("sft_coat", (2, 18))):
        for seed in results["models"][name]["seeds"].values():
            seed["test"]["sampled"]["reflection"]["steps"]["counts"] = {
                "wrong": 40, "wrong_reflected": 10, "right": 400, "right_reflected": 60,
                "wrong_repaired": repaired, "right_broken": broken}
    claim = by_name(compute_claims(results))["F→T rises after RL"]
    n = claim["numbers"]
    assert n["step_effect_a"] == {"wrong_repaired": 6, "right_broken": 10}  # two seeds summed
    assert n["step_effect_b"] == {"wrong_repaired": 4, "right_broken": 36}
    assert "rl_round1 6 / 10 (37.5% repairs), sft_coat 4 / 36 (10.0% repairs)" in claim["detail"]
    # the verdict still reads the answer-level share
    assert claim["held"] is (n["mean_a"] > n["mean_b"])


def test_mean_std_over_three_seeds():
    results = {"models": {"rl_round1": model("r1", [0.2, 0.4, 0.6]), "sft_coat": model("s", [0.1, 0.2, 0.3])}}
    claim = by_name(compute_claims(results))["RL beats format tuning"]
    n = claim["numbers"]
    assert n["n_a"] == 3 and n["mean_a"] == pytest.approx(0.4) and n["std_a"] == pytest.approx(0.2)
    assert n["std_b"] == pytest.approx(0.1)
    assert n["pooled_std"] == pytest.approx(math.sqrt((0.04 + 0.01) / 2))
    assert n["significant"] is True  # diff 0.2 > pooled std 0.158
    assert "40.0 ± 20.0 (n=3)" in claim["detail"] and "20.0 ± 10.0 (n=3)" in claim["detail"]


def test_one_seed_has_no_significance():
    results = {"models": {"rl_round1": model("r1", [0.5]), "sft_coat": model("s", [0.1])}}
    claim = by_name(compute_claims(results))["RL beats format tuning"]
    assert claim["held"] is True and claim["numbers"]["significant"] is None
    assert "±" not in claim["detail"]


def test_length_drop_then_grow_rule():
    dip = {"curves": {"rl_round1": {"0": curve(DIP)}}}
    c = length_claim(dip)
    assert c["held"] is True and c["numbers"]["min_step"] == 6
    falling = {"curves": {"rl_round1": {"0": curve([100 - 5 * i for i in range(12)])}}}
    assert length_claim(falling)["held"] is False
    rising = {"curves": {"rl_round1": {"0": curve([50 + 5 * i for i in range(12)])}}}
    assert length_claim(rising)["held"] is False
    assert c["numbers"]["significant"] is None  # one seed: no spread to compare with
    # two seeds that agree on the dip: significant; a rise at the end within their spread: held, not significant
    two = {"curves": {"rl_round1": {"0": curve(DIP), "1": curve([v + 2 for v in DIP])}}}
    assert length_claim(two)["held"] is True and length_claim(two)["numbers"]["significant"] is True
    late = [100, 90, 80, 70, 60, 50, 40, 30, 25, 24, 26, 28]  # smoothed: minimum 25, end 27, seeds' std 5.7
    flat_end = {"curves": {"rl_round1": {"0": curve(late), "1": curve([v + 8 for v in late])}}}
    c = length_claim(flat_end)
    assert c["held"] is True and c["numbers"]["significant"] is False and "not both larger" in c["detail"]
    short = {"curves": {"rl_round1": {"0": curve([100, 50, 100])}}}
    assert length_claim(short)["held"] is None
    assert length_claim({})["held"] is None


def test_smooth_and_mean_std_helpers():
    assert smooth([0, 3, 6, 9], 3) == [1.5, 3.0, 6.0, 7.5]
    assert mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_script_json_cannot_close_the_script_element():
    text = script_json({"r": XSS + "</SCRIPT>&"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"r": XSS + "</SCRIPT>&"}


# --------------------------------------------------------------------------- files


def test_write_report_files(results, tmp_path):
    paths = write_report(results, tmp_path / "report")
    for key in ("markdown", "html", "json", "plot_rl_reward", "plot_rl_accuracy", "plot_rl_response_length",
                "plot_accuracy_by_level", "plot_behaviour", "plot_other_curves"):
        assert paths[key].is_file() and paths[key].stat().st_size > 1000, key
        if key.startswith("plot_"):
            assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    assert saved["models"].keys() == results["models"].keys()
    assert [c["name"] for c in saved["claims"]] == [c["name"] for c in compute_claims(results)]
    for c in saved["claims"]:
        assert {"name", "held", "numbers"} <= c.keys()
    md = paths["markdown"].read_text()
    for name in results["models"]:
        assert f"\n| {name} |" in md
    assert "| RL beats format tuning | held |" in md
    assert "| RAE helps | not held |" in md
    assert "| COAT beats plain CoT | not measured |" in md
    assert "LaTRO \\| gold" in md  # a pipe in a label does not break the table
    assert "42.0 ± 2.8" in md and "maj@8 (%)" in md
    assert "Test split unless noted (50 problems; maj@k and the sampled columns over the first 20)" in md
    assert "reflect after a mistake / a wrong / a right step, sampled (%)" in md
    assert "| 7.5 ± 0.0 / 15.0 ± 0.0 / 3.8 ± 0.0 |" in md
    assert "repair / break after a reflect, sampled (%)" in md and "3.8 ± 0.0 | 10.0 ± 0.0 / 6.0 ± 0.0 |" in md
    assert "![" in md and "(plots/rl_reward.png)" in md
    assert "| pretrain | 1.2 | yes (cached) |" in md
    assert "satori run configs/quick.yaml" in md and "13 min 32 s" in md


def test_write_report_minimal_input(tmp_path):
    paths = write_report({"models": {"base": model("b", [0.1])}}, tmp_path)
    assert "Test split unless noted (50 problems); mean" in paths["markdown"].read_text()
    assert paths["html"].is_file() and "plot_rl_reward" not in paths
    claims = json.loads(paths["json"].read_text())["claims"]
    assert all(c["held"] is None for c in claims)


def test_html_escapes_model_output(results, tmp_path):
    page = write_report(results, tmp_path)["html"].read_text()
    assert XSS not in page and "<script>alert" not in page
    assert page.count("<script") == 2  # the JSON data element and our own viewer script
    assert "\\u003cscript\\u003ealert(1)" in page


# --------------------------------------------------------------------------- Chromium


class DomIndex(HTMLParser):
    """Element ids, classes, img sources and text from a serialised DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.classes: list[set[str]] = []
        self.img_src: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.add(a["id"])
        self.classes.append(set((a.get("class") or "").split()))
        if tag == "img":
            self.img_src.append(a.get("src") or "")

    def handle_data(self, data):
        self.text.append(data)

    def count_class(self, *names: str) -> int:
        return sum(set(names) <= c for c in self.classes)


def chromium_or_skip() -> str:
    if Path(CHROMIUM).exists() or shutil.which("chromium"):
        return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    reason = "chromium not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_html_in_headless_chromium(results, tmp_path):
    from PIL import Image

    binary = chromium_or_skip()
    page = write_report(results, tmp_path / "out")["html"]
    url = page.resolve().as_uri()
    proc = run_chromium(binary, tmp_path / "profile", "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = DomIndex()
    dom.feed(proc.stdout)
    assert {"results-table", "claims-table", "stages-table", "traj-list"} <= dom.ids
    # plots: embedded PNGs that decode to real images
    pngs = [s for s in dom.img_src if s.startswith("data:image/png;base64,")]
    assert len(pngs) == 6
    for src in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.size[0] > 100 and img.size[1] > 100
    # the viewer was built by the script: cards, steps with highlight classes and badges
    assert dom.count_class("traj") == 2
    assert dom.count_class("step", "step-reflect") == 1
    assert dom.count_class("step", "step-explore") == 1
    assert dom.count_class("step", "step-continue") == 3
    assert dom.count_class("badge", "badge-reflect") >= 2  # legend + the step
    assert dom.count_class("verdict", "wrong") == 1
    text = "".join(dom.text)
    assert "showing 2 of 2" in text
    assert XSS in text  # shown as text ...
    assert dom.tags.count("script") == 2  # ... never as an element (only our two scripts)
    # a screenshot of the page is a real, non-blank image
    shot = tmp_path / "shot.png"
    proc = run_chromium(binary, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,2400",
                        "--hide-scrollbars", url)
    assert shot.is_file(), proc.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_claims_pair_the_models_of_each_seed():
    # seed 2 of the format-tuned model was not measured: only seeds 0 and 1 pair up
    results = {"models": {"rl_round1": model("r1", [0.90, 0.91, 0.92]), "sft_coat": model("s", [0.88, 0.92])}}
    claim = by_name(compute_claims(results))["RL beats format tuning"]
    n = claim["numbers"]
    assert n["seed_diffs"] == pytest.approx({"0": 0.02, "1": -0.01})
    assert n["seeds_ahead"] == 1
    assert n["paired_mean"] == pytest.approx(0.005) and n["paired_std"] == pytest.approx(math.sqrt(0.03 ** 2 / 2))
    assert "Paired by seed (0, 1): +2.0 / -1.0" in claim["detail"] and "ahead in 1 of 2" in claim["detail"]
    header, rows = claims_rows([claim])
    assert rows[0][header.index("seeds ahead")] == "1 of 2"
    # "round 2 ≥ round 1" counts a tie as level
    results["models"]["rl_round2"] = model("r2", [0.90, 0.90, 0.93])
    tie = by_name(compute_claims(results))["round 2 ≥ round 1"]
    assert tie["numbers"]["seeds_ahead"] == 2 and "level or ahead in 2 of 3" in tie["detail"]
    # one seed: nothing to pair, no column value
    single = {"models": {"rl_round1": model("r1", [0.5]), "sft_coat": model("s", [0.1])}}
    one = by_name(compute_claims(single))["RL beats format tuning"]
    assert "seed_diffs" not in one["numbers"] and claims_rows([one])[1][0][4] == "—"


def test_paired_accuracy_difference_by_hand():
    # 5 problems: A alone right on 2, B alone on 1, both right on 1, both wrong on 1 -> d = 1, 1, -1, 0, 0
    a = [True, True, False, True, False]
    b = [False, False, True, True, False]
    got = paired_accuracy_difference(a, b)
    mean = 1 / 5
    var = ((1 - mean) ** 2 * 2 + (-1 - mean) ** 2 + mean ** 2 * 2) / 4
    assert got["n"] == 5 and got["diff"] == pytest.approx(mean) and got["se"] == pytest.approx(math.sqrt(var / 5))
    assert (got["a_only"], got["b_only"]) == (2, 1)
    with pytest.raises(ValueError, match="equal-length"):
        paired_accuracy_difference(a, b[:4])
