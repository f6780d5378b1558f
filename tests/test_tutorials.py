"""Every tutorial runs, in quick mode, exactly as a student runs it, with its exercises' solutions
(`python tutorials/NN_*.py --quick --solutions`).

Each lesson checks its own claims as it goes (`lesson.check` raises on a false one); here we also assert that it
exited cleanly, printed no `[FAILED]`, wrote the figures its text points to, ran a checked solution for every
exercise, and that the key numbers it saved (`<lesson>.json`, `<lesson>_solutions.json`) say what the lesson's text
says. A lesson that rots (an API it calls changed, a claim no longer holds) fails this test.

Budget (tutorials/README.md has the measured table): lessons 1-6 with their solutions about 100 CPU seconds,
serially, on top of the quick CPU image lab that lesson 7 trains on: the session fixture `quick_lab`
(tests/conftest.py), which tests/test_lab.py builds anyway on the same xdist worker. Lesson 7 trains DPO for 120
steps on it, evaluates the LoRA on the 18 held-out captions, and its solutions train 20 + 3 more steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"

LESSONS = {  # script -> the figures it must write
    "01_policy": ["01_chains", "01_log_ratio_vs_implicit_reward", "01_timestep_weight"],
    "02_dpo": ["02_dpo_curves"],
    "03_kto": ["03_utilities", "03_kto_loss_vs_progress", "03_toy_samples"],
    "04_spin": ["04_toy_samples"],
    "05_contrast_dspo": ["05_contrast_weights", "05_toy_samples"],
    "06_spo": ["06_spo_clip", "06_toy_samples"],
    "07_scaling_up": ["07_lab_pairs", "07_tensorboard_scalars", "07_lab_samples"],
}


def exercise_count(name: str) -> int:
    """How many numbered exercises the lesson's "## Exercises" cell lists."""
    text = (TUTORIALS / f"{name}.py").read_text()
    exercises = text[text.index("# ## Exercises"):].split("\n# Next:")[0]
    return sum(bool(re.match(r"# [1-9]\. ", line)) for line in exercises.splitlines())


def run_lesson(name: str, out: Path, **extra_env: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "MINIPREF_TUTORIAL_OUT": str(out), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **extra_env}
    env.pop("MINIPREF_QUICK", None)  # --quick on the command line is the path under test
    result = subprocess.run([sys.executable, str(TUTORIALS / f"{name}.py"), "--quick", "--solutions"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "[FAILED]" not in result.stdout
    assert "QUICK mode" in result.stdout
    for figure in LESSONS[name]:
        path = out / f"{figure}.png"
        assert path.is_file() and path.stat().st_size > 5000, f"{name} did not write {path.name}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / f"{name}.json").read_text())
    assert results["quick"] is True
    solutions = json.loads((out / f"{name}_solutions.json").read_text())  # one checked solution per exercise
    assert sorted(solutions["solutions"]) == [str(i) for i in range(1, exercise_count(name) + 1)]
    results["solutions"] = solutions["solutions"]
    return result, results


def test_01_policy(tmp_path):
    result, r = run_lesson("01_policy", tmp_path)
    assert result.stdout.count("[ok]") >= 6
    for row in r["timesteps"]:  # Monte Carlo within 5 standard errors, antithetic exact
        assert row["max_z"] < 5 and row["antithetic_gap"] < 1e-9
        assert math.isclose(row["mean_monte_carlo"], row["mean_predicted"],
                            abs_tol=5 * row["single_draw_std"] / math.sqrt(r["draws"] * r["points"]))
    assert r["diffusers_step_gap"] < 1e-4
    assert r["sd15_t_where_kD_is_5000"] == 3  # the text says "at t ~ 3"
    kd = r["sd15_kD"]
    assert 16000 < kd["t1"] < 17000 and 100 < kd["t500"] < 120 and 100 < kd["median"] < 170  # "16,500", "110", "~133"
    assert 1.5e5 < kd["T_times_mean"] < 3e5  # "about 2e5"
    assert math.isclose(r["sdxl_kl_weight_ratio"], 4.0, rel_tol=1e-9)  # the same beta at SDXL: a 4x smaller KL weight
    chain = r["chain"]  # the chain's log-ratio under q is the sum of the per-step closed forms; Jensen bounds it
    assert chain["sampled_mean"] < -5 * chain["sampled_se"] and abs(chain["paired_gap"]) < 4 * chain["paired_gap_se"]
    assert abs(chain["one_t_mean"] - chain["closed_form_mean"]) < 4 * chain["one_t_se"] and chain["jensen_min_gap"] >= 0
    end = r["reverse_chain_end"]  # the reverse chains end on the pretraining Gaussian N((0.5, 0.8), 0.04 I)
    assert abs(end["mean"][0] - 0.5) < 0.05 and abs(end["mean"][1] - 0.8) < 0.05
    flow = r["flow"]  # the rectified-flow section: err_eps = (1 - sigma)^2 err_v, DPO at the reference, beta's scale
    assert flow["identity_gap"] < 1e-12 and flow["wrong_weight_gap"] > 0.5 and flow["reward_gap"] < 1e-9
    assert flow["loss_at_reference"] == pytest.approx(math.log(2), abs=1e-12)
    sd3, flux = flow["scale"]["SD3"], flow["scale"]["FLUX.1"]  # the text: "about 0.11 ... beta_v ~ 560; ... 1670"
    assert abs(sd3["second_moment"] - 0.1126) < 5 * sd3["se"] * 1.05 + 5e-5 and 540 < sd3["beta_v_for_5000"] < 580
    assert abs(flux["second_moment"] - 0.3336) < 5 * flux["se"] * 1.05 + 5e-5 and 1620 < flux["beta_v_for_5000"] < 1720
    assert 0.7 < sd3["median_sigma"] < 0.8  # "median sigma about 0.75"
    sol = r["solutions"]
    assert math.isclose(sol["1"]["beta_same_kl"], 20000.0) and sol["2"]["mean_0.03"] / sol["2"]["mean_0.1"] < 0.17
    assert 10 < sol["3"]["gap_x10"] / sol["3"]["gap"] < 100


def test_02_dpo(tmp_path):
    _, r = run_lesson("02_dpo", tmp_path)
    assert r["gradient_identity_gap"] < 1e-9
    tiny = r["runs"]["beta 500, lr 1e-7 (tiny steps)"]
    assert tiny["min_smoothed_loss"] > 0.6 and tiny["heldout_acc"][1] > 0.88  # "barely leaves 0.693", ceiling at once
    taylor = r["taylor"]["beta 500, lr 1e-7 (tiny steps)"]
    assert abs(taylor["taylor"] - taylor["exact"]) < 1e-3
    scaled = r["scaled_margins"]  # same accuracy, loss above log 2 once the margins are 10x
    assert scaled["1"][1] == scaled["10"][1] and scaled["10"][0] > math.log(2) > scaled["1"][0]
    assert r["too_big_batches_above_log2"] > 0 and r["sign_agreement_with_y"] > 0.95
    assert 0 < r["sign_flip_gap"] < 0.2  # the loss sees the signs, by mean(m): small at tiny steps
    # beta x10 with lr / 10: the same curve, 10x less distance; beta x10 at a fixed lr: far less than 10x ("2.4x")
    assert r["beta_lr_curve_gap"] < 0.05 and 5 < r["beta_lr_distance_ratio"] < 20 and 1 < r["fixed_lr_distance_ratio"] < 5
    for run in r["runs"].values():  # held-out accuracy can't beat the Bayes ceiling (0.921) beyond sampling noise
        assert 0.5 < run["final_heldout_acc"] < 0.921 + 0.06
    sol = r["solutions"]  # beta 50: the same final margin (~4, the Bradley-Terry log-odds), a longer way to it
    assert all(abs(m - 4) < 0.8 for m in sol["1"]["margins"].values()) and sol["1"]["distances"]["50"] > sol["1"]["distances"]["500"]
    assert 3 < sol["2"]["k_star"] <= 10 and sol["3"]["heldout_acc"][1] > 0.85


def test_03_kto(tmp_path):
    _, r = run_lesson("03_kto", tmp_path)
    assert all(abs(v) < 1e-12 for v in r["kto_minus_lambda_d_times_one_plus_dpo"].values())  # lambda_d = 1 and 2
    g = r["gradients_at_init"]
    assert math.isclose(g["loss_averse"], g["risk_seeking"]) and math.isclose(g["kahneman_tversky"], g["loss_averse"] / 2)
    sgd, adam = r["lambda_d_vs_lr"]["SGD, no clipping"], r["lambda_d_vs_lr"]["Adam, clipped at 1.0"]
    assert sgd["lambda_2_vs_lr_x2"] < 1e-3 * sgd["lr_x2_vs_lambda_1"]  # SGD: lambda_d = the lr's factor
    assert adam["lambda_2_vs_lambda_1"] < 0.2 * adam["lr_x2_vs_lambda_1"]  # clipped Adam: it nearly cancels
    kt = r["kt_loss"]  # 0.5 at the start, ~0.6 within a few steps, flat, no lower at the best checkpoint than at the end
    assert kt["start"] == 0.5 and abs(kt["plateau_mean"] - 0.6) < 0.05 and kt["after_best_checkpoint"] > kt["at_end"] - 0.02
    assert kt["correlation_with_z_ref"] > 0.5
    point = r["kt_reference_point"]  # z_ref above the median reward; most desirable samples below it
    assert point["z_ref_above_median"] > 0.9 and 0.6 < point["desirable_below_ref"] < 0.9
    frac = r["kt_desirable_frac"]
    assert max(frac) > frac[0] + 0.1 and frac[-1] < max(frac) - 0.03
    change, se = r["flip_change"], r["flip_change_se"]  # 20% flips: KT not shown more robust than loss-averse or SFT
    assert max(abs(v) for v in change.values()) < 0.05
    for other in ("loss_averse", "sft"):
        assert abs(change["kahneman_tversky"] - change[other]) < 3 * math.hypot(se["kahneman_tversky"], se[other])
    assert r["gradient_share_flipped"]["kahneman_tversky"] < min(0.2, r["gradient_share_flipped"]["loss_averse"])
    assert r["rho_gap"] < 1e-9
    toy = r["toy"]
    assert toy["dpo"]["desirable_frac"] < toy["kto_kahneman_tversky"]["desirable_frac"] < toy["sft"]["desirable_frac"]
    assert toy["dpo"]["mean"][1] > 0.95  # DPO drifts up, above the desirable mean 0.8
    bounded, kahneman = toy["kto_risk_seeking_bounded"], toy["kto_kahneman_tversky"]  # closest to SFT: it depends how
    assert abs(bounded["desirable_frac"] - toy["sft"]["desirable_frac"]) < abs(kahneman["desirable_frac"] - toy["sft"]["desirable_frac"])
    assert kahneman["energy_distance"] < bounded["energy_distance"]
    assert (tmp_path / "03_toy_run" / "metrics.json").is_file()
    sol = r["solutions"]
    assert sol["1"]["distance_lambda_d_2"] < sol["1"]["distance_lr_x2"] and math.isclose(sol["2"]["exposure"], 0.2, abs_tol=0.005)
    moved = {m: abs(v) for m, v in sol["2"]["change"].items()}  # gamma 0.5: KT moves most, loss-averse least
    assert moved["kahneman_tversky"] > max(0.1, moved["sft"]) and moved["loss_averse"] < moved["sft"]
    assert sol["3"]["late_loss"] < 0.5


def test_04_spin(tmp_path):
    _, r = run_lesson("04_spin", tmp_path)
    spin = r["spin"]
    assert all(abs(v - math.log(2)) < 1e-6 for v in spin["first_loss"])
    assert abs(spin["late_acc"][-1] - 0.5) < abs(spin["late_acc"][0] - 0.5)
    assert spin["energy_distance"][-1] < 0.5 * spin["energy_distance"][0]
    assert abs(r["spin_target_exact_acc"] - 0.80) < 0.02 and abs(r["ranked"]["x part"] - 0.5) < 0.01
    toy = r["toy"]
    assert abs(toy["spin"]["mean"][0] - 0.3) < 0.05 and abs(toy["spin"]["mean"][1] - toy["reference"]["mean"][1]) < 0.05
    means, accuracies = r["solutions"]["1"]["means"], r["solutions"]["1"]["accuracies"]
    assert len(means) == 3 and max(accuracies) - min(accuracies) > max(max(m) - min(m) for m in zip(*means))


def test_05_contrast_dspo(tmp_path):
    _, r = run_lesson("05_contrast_dspo", tmp_path)
    diag = r["contrast_diag"]
    assert diag["0.01"] > 0.99 and diag["0.01"] > diag["0.1"] > diag["0.5"] > diag["5.0"]
    assert math.isclose(r["dspo_factors"]["beta=500, gamma=0.001"], 0.75, rel_tol=1e-9)
    assert math.isclose(r["dspo_factors"]["beta=0.001, gamma=1"], 0.9995, rel_tol=1e-9)
    assert r["dspo_minimiser_gap"] < 1e-6
    toy = r["toy"]
    assert toy["reference"]["mean"][1] + 0.03 < toy["contrast"]["mean"][1] < toy["dpo"]["mean"][1]  # a weaker DPO drift
    assert toy["dspo"]["mean"][0] < toy["sft"]["mean"][0] - 0.02  # DSPO extrapolates past the desirable mean
    sol = r["solutions"]
    assert math.isclose(sol["1"]["factor_at_ref"], 3.0) and sol["1"]["gradient_ratio_at_g_1"] < 1e-12
    assert 0.5 < sol["2"]["crossing_tau"] < 5


def test_06_spo(tmp_path):
    _, r = run_lesson("06_spo", tmp_path)
    assert r["spo_pairs"] > 0 and abs(r["spo_loss_at_init"] - math.log(2)) < 1e-6
    assert max(r["spo_kept_t"]) <= 299 and r["spo_keep"]["worst_z"] < 4  # kept only where the oracle can tell
    assert r["toy"]["spo"]["mean"][1] > r["toy"]["reference"]["mean"][1] + 0.03
    sol = r["solutions"]
    assert sol["1"]["new_steps"] and min(sol["1"]["new_steps"]) >= 299 and sol["2"]["left_gradient_mean"] != 0


# Lesson 7 trains on the quick CPU image lab's pretrained model and pairs (conftest.py's quick_lab): on the worker
# that already built it for tests/test_lab.py.
@pytest.mark.xdist_group("quick_lab")
def test_07_scaling_up(tmp_path, quick_lab):
    lab_dir, _ = quick_lab
    result, r = run_lesson("07_scaling_up", tmp_path, MINIPREF_LAB=str(lab_dir))
    assert r["lab"] == str(lab_dir)
    assert "-m accelerate.commands.launch" in result.stdout and "8gpu_ddp.yaml" in result.stdout
    assert "%|" not in result.stdout + result.stderr  # no progress bars in the lesson's output
    assert {"train/loss", "train/implicit_acc", "train/margin"} <= set(r["logged_tags"])
    # the curves the text calls a healthy start: log 2 first, then accuracy and margin rise
    assert abs(r["first_loss"] - math.log(2)) < 1e-4 and r["margin_identity_gap"] < 5e-3
    assert r["accuracy_z"] > 4 and r["accuracy_thirds"][1] > r["accuracy_thirds"][0]
    assert r["margin_thirds"][1] > 0 and r["loss_first_third"] > math.log(2) and r["spread_share"] > 0.9
    # and the samples moved the rater's way on held-out captions
    assert r["held_out_area"]["dpo"] > r["held_out_area"]["base"] and r["win_rate"] > 0.5
    assert r["lora_pixel_change"] > 0
    work = tmp_path / "07_work"
    assert (work / "dpo-run" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "eval" / "results.json").is_file()
    sol = r["solutions"]  # swapped labels: accuracy up, win rate down; beta 500: smaller margins; KTO starts at 0.5
    assert sol["1"]["accuracy_z"] > 2 and sol["1"]["win_rate"] < 0.5 and 1 / 30 < sol["2"]["margin_ratio"] < 1 / 3
    assert abs(sol["3"]["first_loss"] - 0.5) < 1e-4 and "train/kl" in sol["3"]["new_tags"]


def test_07_without_a_lab_says_what_to_run(tmp_path):
    """No lab folder: one line naming the command that builds one, a non-zero exit, no traceback."""
    env = {**os.environ, "MINIPREF_TUTORIAL_OUT": str(tmp_path), "MINIPREF_LAB": str(tmp_path / "no-lab")}
    result = subprocess.run([sys.executable, str(TUTORIALS / "07_scaling_up.py"), "--quick"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "no-lab" in message[0] and "python -m full.lab --out runs/lab-quick --quick" in message[0]


def test_lessons_are_jupytext_notebooks():
    """Each lesson opens as a notebook: markdown and code cells, a title first, and it starts with `import lesson`."""
    jupytext = pytest.importorskip("jupytext")
    for name in LESSONS:
        notebook = jupytext.read(TUTORIALS / f"{name}.py")
        kinds = [cell.cell_type for cell in notebook.cells]
        assert kinds.count("markdown") >= 4 and kinds.count("code") >= 4, name
        assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith(f"# Lesson {int(name[:2])}")
        first_code = next(cell.source for cell in notebook.cells if cell.cell_type == "code")
        assert "import lesson" in first_code, name
        assert all(cell.source.strip() for cell in notebook.cells), f"{name}: an empty cell"
        for cell in notebook.cells:  # a markdown table ends with a blank line, or the next paragraph renders as a row
            lines = cell.source.splitlines() + [""] if cell.cell_type == "markdown" else []
            for line, after in zip(lines, lines[1:]):
                assert not line.startswith("|") or after.startswith("|") or not after.strip(), f"{name}: {after[:60]}"


def test_readme_lists_every_lesson():
    readme = (TUTORIALS / "README.md").read_text()
    for name, figures in LESSONS.items():
        assert f"{name}.py" in readme
        for figure in figures:
            assert f"{figure}.png" in readme


def test_every_lesson_ends_with_takeaways_and_exercises():
    jupytext = pytest.importorskip("jupytext")
    for name in LESSONS:
        markdown = [c.source for c in jupytext.read(TUTORIALS / f"{name}.py").cells if c.cell_type == "markdown"]
        headings = [line for cell in markdown for line in cell.splitlines() if line.startswith("## ")]
        assert "## Takeaways" in headings and "## Exercises" in headings, name
        exercises = next(cell for cell in markdown if "## Exercises" in cell)
        assert 2 <= sum(line.startswith(("1. ", "2. ", "3. ", "4. ")) for line in exercises.splitlines()) <= 3, name


def test_every_exercise_has_a_checked_solution():
    """Each exercise N has a `solution_N` that checks its prediction, and the lesson runs them all."""
    for name in LESSONS:
        text = (TUTORIALS / f"{name}.py").read_text()
        count = exercise_count(name)
        assert 2 <= count <= 3, name
        for number in range(1, count + 1):
            body = text[text.index(f"def solution_{number}()"):].split("\n\n\n")[0]
            assert "lesson.check" in body, f"{name}: solution {number} checks nothing"
        solutions = ", ".join(f"solution_{n}" for n in range(1, count + 1))
        assert f'lesson.run_solutions("{name}", {solutions})' in text, name


def test_prerequisites_page_and_what_each_lesson_assumes():
    page = (TUTORIALS / "00_prerequisites.md").read_text()
    for topic in ("Bradley-Terry", "DPO for language models", "closed-form optimum", "reference point", "LoRA",
                  "accelerate"):
        assert topic in page, topic
    jupytext = pytest.importorskip("jupytext")
    for name in LESSONS:  # a line at the top of each lesson names what it assumes
        first = jupytext.read(TUTORIALS / f"{name}.py").cells[0].source
        assert "**Assumes**" in first and "00_prerequisites.md" in first, name


def test_tutorials_cite_only_what_users_have():
    """No pointer to files outside the repository (the project's private spec, the papers' text files)."""
    for path in sorted(TUTORIALS.iterdir()):
        if path.suffix in (".py", ".md"):
            text = path.read_text()
            for private in ("SPEC", "../shared", "shared/papers", "paper 00"):
                assert private not in text, f"{path.name} mentions {private!r}"


def test_lesson_checks_fail_on_a_false_claim(tmp_path):
    """check_close and check_range pass a true claim and stop the lesson on a false one, naming the numbers."""
    script = (
        "import lesson\n"
        "lesson.check_close('close', 1.0005, 1.0, abs_tol=1e-3)\n"
        "lesson.check_range('in range', 0.5, 0.0, 1.0)\n"
        "for call in (lambda: lesson.check_close('far', 1.1, 1.0, rel_tol=0.05), lambda: lesson.check_range('above', 2.0, high=1.0)):\n"
        "    try:\n"
        "        call()\n"
        "    except AssertionError as error:\n"
        "        print('raised:', error)\n"
        "lesson.run_solutions('x', lambda: print('ran a solution'))\n"
    )
    env = {**os.environ, "MINIPREF_TUTORIAL_OUT": str(tmp_path)}
    env.pop("MINIPREF_SOLUTIONS", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=TUTORIALS, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("[ok]") == 2 and result.stdout.count("[FAILED]") == 2
    assert "raised: far: 1.1 vs 1 (gap 0.1, tolerance 0.05)" in result.stdout
    assert "raised: above: -inf < 2 < 1" in result.stdout
    assert "solutions: not run" in result.stdout and "ran a solution" not in result.stdout  # only with --solutions


def test_readme_failing_check_demo_still_patches_lesson_2():
    """tutorials/README.md shows a check failing by replacing one expression of lesson 2 in memory: that expression
    must still be there exactly once, or the demonstration would silently run the unbroken lesson."""
    readme = (TUTORIALS / "README.md").read_text()
    assert ".replace('logs[SAME_CURVE], logs[TOO_BIG]'" in readme
    assert (TUTORIALS / "02_dpo.py").read_text().count("logs[SAME_CURVE], logs[TOO_BIG]") == 1
    assert "[FAILED] at a fixed lr 1e-3, beta x10 moves the network less" in readme
    assert "at a fixed lr 1e-3, beta x10 moves the network less, but by far less than ten times (1 to" in (
        TUTORIALS / "02_dpo.py").read_text()


def test_repository_cites_only_what_users_have():
    """Issue 25's rule for every tracked file, not only the tutorials: no pointer to the project's private spec, to a
    ../shared folder or the papers' text files, and no absolute path of one machine. The conventions are cited as
    docs/conventions.md §N / IN, the papers by title and arXiv id (docs/methods.md, Papers). Makefile's TORCH_SPEC is
    a variable name, not a reference; this file and tests/test_presets.py hold the guard lists themselves."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    guards = {"tests/test_tutorials.py", "tests/test_presets.py"}
    private = re.compile(r"\bSPEC\b|\.\./shared|shared/papers|/work/|/home/")
    found = []
    for name in listed.stdout.split("\0"):
        path = REPO / name
        if not name or name in guards or not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files (figures, weights)
        found += [f"{name}:{n}: {line.strip()[:80]}" for n, line in enumerate(text.splitlines(), 1) if private.search(line)]
    assert not found, "\n".join(found)
