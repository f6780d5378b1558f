"""Every tutorial runs, in quick mode, exactly as a student runs it (`python tutorials/NN_*.py --quick`).

Each lesson checks its own claims as it goes (`lesson.check` raises on a false one); here we also assert that it
exited cleanly, printed no `[FAILED]`, wrote the figures its text points to, and that the key numbers it saved
(`<lesson>.json`) say what the lesson's text says. A lesson that rots (an API it calls changed, a claim no longer
holds) fails this test.

Budget: about 125 CPU seconds for the five lessons, serially (tutorials/README.md has the measured table), on top
of the quick CPU image lab that lesson 5 trains on: the session fixture `quick_lab` (tests/conftest.py), which
tests/test_lab.py builds anyway on the same xdist worker. Lesson 5 trains DPO for 120 steps on it and evaluates the
LoRA on the 18 held-out captions (61-67 CPU seconds, 112-123 s wall at load average 5-7 on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"

LESSONS = {  # script -> the figures it must write
    "01_policy": ["01_log_ratio_vs_implicit_reward", "01_timestep_weight"],
    "02_dpo": ["02_dpo_curves"],
    "03_kto": ["03_utilities", "03_kto_loss_vs_progress", "03_toy_samples"],
    "04_beyond_pairs": ["04_contrast_weights", "04_spo_clip", "04_toy_samples"],
    "05_scaling_up": ["05_lab_pairs", "05_tensorboard_scalars", "05_lab_samples"],
}


def run_lesson(name: str, out: Path, **extra_env: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "MINIPREF_TUTORIAL_OUT": str(out), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **extra_env}
    env.pop("MINIPREF_QUICK", None)  # --quick on the command line is the path under test
    result = subprocess.run([sys.executable, str(TUTORIALS / f"{name}.py"), "--quick"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "[FAILED]" not in result.stdout
    assert "QUICK mode" in result.stdout
    for figure in LESSONS[name]:
        path = out / f"{figure}.png"
        assert path.is_file() and path.stat().st_size > 5000, f"{name} did not write {path.name}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / f"{name}.json").read_text())
    assert results["quick"] is True
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
    chain = r["chain"]  # the chain's log-ratio under q is the sum of the per-step closed forms; Jensen bounds it
    assert chain["sampled_mean"] < -5 * chain["sampled_se"] and abs(chain["paired_gap"]) < 4 * chain["paired_gap_se"]
    assert abs(chain["one_t_mean"] - chain["closed_form_mean"]) < 4 * chain["one_t_se"] and chain["jensen_min_gap"] >= 0


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
    assert r["beta_lr_curve_gap"] < 0.05 and 5 < r["beta_lr_distance_ratio"] < 20
    for run in r["runs"].values():  # held-out accuracy can't beat the Bayes ceiling (0.921) beyond sampling noise
        assert 0.5 < run["final_heldout_acc"] < 0.921 + 0.06


def test_03_kto(tmp_path):
    _, r = run_lesson("03_kto", tmp_path)
    assert all(abs(v) < 1e-12 for v in r["kto_minus_lambda_d_times_one_plus_dpo"].values())  # lambda_d = 1 and 2
    g = r["gradients_at_init"]
    assert math.isclose(g["loss_averse"], g["risk_seeking"]) and math.isclose(g["kahneman_tversky"], g["loss_averse"] / 2)
    kt = r["kt_loss"]  # the KT loss starts at 0.5 and ends above it while the samples improve
    assert abs(kt["start"] - 0.5) < 1e-6 and kt["end"] > 0.5 and kt["zero_ref_end"] < kt["zero_ref_start"]
    assert r["kt_desirable_frac"][-1] > r["kt_desirable_frac"][0] + 0.1
    rob = r["robustness"]
    assert abs(rob["kahneman_tversky, flip 0.2"]["desirable_frac"] - rob["kahneman_tversky, flip 0.0"]["desirable_frac"]) < 0.05
    assert r["gradient_share_flipped"]["kahneman_tversky"] < min(0.2, r["gradient_share_flipped"]["loss_averse"])
    assert r["rho_gap"] < 1e-9
    toy = r["toy"]
    assert toy["dpo"]["desirable_frac"] < toy["kto_kahneman_tversky"]["desirable_frac"] < toy["sft"]["desirable_frac"]
    assert toy["dpo"]["mean"][1] > 0.95  # DPO drifts up, above the desirable mean 0.8
    assert (tmp_path / "03_toy_run" / "metrics.json").is_file()


def test_04_beyond_pairs(tmp_path):
    _, r = run_lesson("04_beyond_pairs", tmp_path)
    assert all(abs(v - math.log(2)) < 1e-6 for v in r["spin"]["first_loss"])
    assert r["spin"]["energy_distance"][-1] < r["spin"]["energy_distance"][0]
    diag = r["contrast_diag"]
    assert diag["0.01"] > 0.99 and diag["0.01"] > diag["0.1"] > diag["0.5"] > diag["5.0"]
    assert math.isclose(r["dspo_factors"]["beta=500, gamma=0.001"], 0.75, rel_tol=1e-9)
    assert math.isclose(r["dspo_factors"]["beta=0.001, gamma=1"], 0.9995, rel_tol=1e-9)
    assert r["spo_pairs"] > 0 and abs(r["spo_loss_at_init"] - math.log(2)) < 1e-6
    assert max(r["spo_kept_t"]) <= 249 and r["spo_keep"]["worst_z"] < 4  # kept only where the oracle can tell
    assert r["dspo_minimiser_gap"] < 1e-6 and abs(r["spin_target_exact_acc"] - 0.80) < 0.02
    toy = r["toy"]
    assert toy["dspo"]["mean"][0] < toy["sft"]["mean"][0] - 0.02  # DSPO extrapolates past the desirable mean


# Lesson 5 trains on the quick CPU image lab's pretrained model and pairs (conftest.py's quick_lab): on the worker
# that already built it for tests/test_lab.py.
@pytest.mark.xdist_group("quick_lab")
def test_05_scaling_up(tmp_path, quick_lab):
    lab_dir, _ = quick_lab
    result, r = run_lesson("05_scaling_up", tmp_path, MINIPREF_LAB=str(lab_dir))
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
    work = tmp_path / "05_work"
    assert (work / "dpo-run" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "eval" / "results.json").is_file()


def test_05_without_a_lab_says_what_to_run(tmp_path):
    """No lab folder: one line naming the command that builds one, a non-zero exit, no traceback."""
    env = {**os.environ, "MINIPREF_TUTORIAL_OUT": str(tmp_path), "MINIPREF_LAB": str(tmp_path / "no-lab")}
    result = subprocess.run([sys.executable, str(TUTORIALS / "05_scaling_up.py"), "--quick"], cwd=REPO, env=env,
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
    )
    env = {**os.environ, "MINIPREF_TUTORIAL_OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=TUTORIALS, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("[ok]") == 2 and result.stdout.count("[FAILED]") == 2
    assert "raised: far: 1.1 vs 1 (gap 0.1, tolerance 0.05)" in result.stdout
    assert "raised: above: -inf < 2 < 1" in result.stdout
