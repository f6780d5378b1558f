"""The command lines of full/: every input error is one line naming the flag (exit 2, no traceback unless --debug),
checked before any model loads; the diffusers conventions (--beta_dpo, random flip, epochs, model card, args.json,
validation images in every tracker); train.sh from any directory; no matplotlib backend switch at import."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from full import cli
from full.models.config import ModelConfig
from full.run.config import RunConfig
from full.trainers import offline, spin, spo
from tests.conftest import train_argv

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, main, argv, prog="full.train") -> str:
    """Run `main` as the console scripts do; the error must be exactly one line on stderr, exit status 2."""
    assert cli.entry_point(main, argv, prog=prog) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # progress bars of the loading may come first (each ends its own line); the error is the one last line
    errors = [line for line in err.splitlines() if f"{prog}: error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: ") and err.endswith(errors[0] + "\n"), err
    return errors[0]


def parse_error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err  # one line, not argparse's usage block
    return err


# ---------------------------------------------------------------------------- parse-time checks, one per message


@pytest.mark.parametrize("extra,needle", [
    (["--beta", "-100"], "--beta must be positive, got -100.0"),
    (["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
    (["--caption_dropout", "1.5"], "--caption_dropout must be in [0, 1], got 1.5"),
    (["--feedback_policy", "best_only"], "--feedback_policy must be one of winner_once, always_win"),
    (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1.0"),
    (["--hub_model_id", "me/x"], "--hub_model_id is used with --push_to_hub"),
    (["--report_to", "neptune"], "--report_to neptune: unknown tracker 'neptune'"),
])
def test_offline_flag_errors_name_the_flag_and_range(capsys, tmp_path, extra, needle):
    assert needle in parse_error(capsys, offline.parse_args, train_argv("m", "d.parquet", tmp_path, "kto", *extra))


def test_desirable_ratio_outside_zero_one(capsys, tmp_path):
    err = parse_error(capsys, offline.parse_args, train_argv("m", "d.parquet", tmp_path, "kto", "--desirable_ratio", "1.5"))
    assert "--desirable_ratio must be in [0, 1], got 1.5" in err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_a_tracker_that_is_not_installed_fails_at_start(capsys, tmp_path):
    err = parse_error(capsys, offline.parse_args, train_argv("m", "d.parquet", tmp_path, "dpo", "--report_to", "wandb"))
    assert 'wandb is not installed (pip install "minipref[wandb]")' in err


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_8bit_adam_without_bitsandbytes(capsys, tmp_path):
    err = parse_error(capsys, offline.parse_args, train_argv("m", "d.parquet", tmp_path, "dpo", "--use_8bit_adam"))
    assert '--use_8bit_adam needs bitsandbytes' in err and 'minipref[8bit]' in err


def test_unknown_method_lists_only_what_each_entry_point_takes(capsys, tmp_path):
    err = parse_error(capsys, offline.parse_args, train_argv("m", "d.parquet", tmp_path, "ppo"))
    assert "full.train takes sft, csft, bce, dpo, kto, contrast, dspo" in err
    err = parse_error(capsys, spin.parse_args, ["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                                "--dataset_name", "d", "--method", "dpo"])
    assert "invalid choice: 'dpo'" in err and err.split("choose from")[1].strip(" ')(\n").startswith("spin")
    err = parse_error(capsys, spo.parse_args, ["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                               "--spm_model_name_or_path", "s", "--prompts_file", "p", "--method", "kto"])
    assert "invalid choice: 'kto'" in err and err.split("choose from")[1].strip(" ')(\n").startswith("spo")


# ---------------------------------------------------------------------------- errors found before the model loads


def test_missing_local_model_dir_is_not_sent_to_the_hub(capsys, pickapic_parquet, tmp_path):
    err = one_line_error(capsys, offline.main, train_argv(str(tmp_path / "no_model"), pickapic_parquet, tmp_path, "dpo"))
    assert f"--pretrained_model_name_or_path={str(tmp_path / 'no_model')!r}: no such local directory" in err


def test_a_file_that_is_not_parquet_is_named(capsys, tiny_sd15, tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_text("caption,image\n")
    err = one_line_error(capsys, offline.main, train_argv(tiny_sd15, str(bad), tmp_path / "out", "dpo"))
    assert f"cannot read {bad} as parquet" in err


def test_data_whose_every_image_fails_to_decode_stops_instead_of_looping(capsys, tiny_sd15, tmp_path):
    from tests import tiny_models

    bad = tiny_models.make_pickapic_parquet(tmp_path / "bad.parquet", 4, truncated_rows=range(4))
    err = one_line_error(capsys, offline.main, train_argv(tiny_sd15, str(bad), tmp_path / "out", "dpo"))
    assert f"a whole pass over --dataset_name {bad} gave no usable batch" in err


def test_cache_flags_are_checked_at_parse_time(capsys, tmp_path):
    from full import cache

    argv = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--method", "dpo", "--output_dir", "o"]
    assert "--shard_size must be positive, got 0" in parse_error(capsys, cache.parse_args, argv + ["--shard_size", "0"])


def test_debug_shows_the_traceback_instead(tmp_path, pickapic_parquet):
    argv = train_argv(str(tmp_path / "no_model"), pickapic_parquet, tmp_path, "dpo", "--debug")
    with pytest.raises(ValueError, match="no such local directory"):
        cli.entry_point(offline.main, argv)


def test_spo_without_a_kept_pair_exits_non_zero(capsys, monkeypatch):
    untrained = {"global_step": 0, "threshold": 0.99, "branch_points": 12.0, "lora_path": "out/lora.safetensors"}
    monkeypatch.setattr(spo, "main", lambda argv=None: untrained)
    err = one_line_error(capsys, spo.main_requiring_pairs, [], prog="full.spo")
    assert "no SPO pair passed --threshold 0.99 in 12 branch points" in err and "untrained" in err
    monkeypatch.setattr(spo, "main", lambda argv=None: {**untrained, "global_step": 3})
    assert cli.entry_point(spo.main_requiring_pairs, [], prog="full.spo") == 0


def test_the_entry_point_module_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "full.train", *train_argv("m", "d.parquet", tmp_path, "dpo",
                                                                              "--beta", "-1")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--beta must be positive" in result.stderr


def test_main_in_a_notebook_does_not_parse_the_kernel_arguments(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", Namespace())
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/run/kernel-1.json"])
    err = parse_error(capsys, offline.parse_args, None)
    assert "required" in err and "--pretrained_model_name_or_path" in err and "kernel-1.json" not in err


# ---------------------------------------------------------------------------- diffusers conventions


def test_beta_dpo_follows_the_diffusers_script_of_the_family(capsys, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    args = offline.parse_args(train_argv("m", "d.parquet", tmp_path, "dpo", "--beta_dpo", "2500"))
    objective = offline.objective_for(args, "sd15")  # train_diffusion_dpo.py: logsigmoid(beta_dpo * diff), no 1/2
    assert objective.beta == 5000.0 and "beta 5000 (from --beta_dpo 2500 in the convention of diffusers' " \
        "train_diffusion_dpo.py)" in caplog.text
    args = offline.parse_args(train_argv("m", "d.parquet", tmp_path, "dpo", "--beta_dpo", "5000"))
    assert offline.objective_for(args, "sdxl").beta == 5000.0  # train_diffusion_dpo_sdxl.py: -0.5 * beta_dpo * diff
    err = parse_error(capsys, offline.parse_args, train_argv("m", "d.parquet", tmp_path, "kto", "--beta_dpo", "1"))
    assert "--beta_dpo applies to --method dpo, not kto" in err
    err = parse_error(capsys, offline.parse_args,
                      train_argv("m", "d.parquet", tmp_path, "dpo", "--beta_dpo", "1", "--beta", "2"))
    assert "give --beta or --beta_dpo, not both" in err


def test_beta_is_resolved_in_one_place_and_says_where_it_came_from(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    cases = [((), 5000.0, "the default of minipref.dpo_loss"), (("--beta", "250"), 250.0, "--beta"),
             (("--preset", "sd15-kto"), None, "--preset sd15-kto")]
    for extra, beta, source in cases:
        method = "kto" if "--preset" in extra else "dpo"
        args = offline.parse_args(train_argv("m", "d.parquet", tmp_path, method, *extra))
        objective = offline.objective_for(args, "sd15")
        assert (beta is None or objective.beta == beta) and f"(from {source})" in caplog.text, source


def test_random_flip_is_on_by_default_and_can_be_turned_off(tmp_path):
    assert offline.parse_args(train_argv("m", "d.parquet", tmp_path, "dpo")).random_flip is True
    assert offline.parse_args(train_argv("m", "d.parquet", tmp_path, "dpo", "--no-random_flip")).random_flip is False
    minimal = ["--pretrained_model_name_or_path", "m", "--method", "dpo", "--output_dir", "o", "--dataset_name", "d"]
    assert offline.parse_args(minimal).resolution is None  # set from the model: 512 (SD1.5) / 1024 (SDXL)


@pytest.mark.parametrize("batches,processes,accumulation,epochs,steps", [(10, 1, 1, 1, 10), (10, 2, 2, 3, 9),
                                                                         (1, 4, 8, 2, 2)])
def test_num_train_epochs_as_optimizer_steps(batches, processes, accumulation, epochs, steps):
    assert offline.steps_for_epochs(epochs, batches, processes, accumulation) == steps


def test_a_run_writes_args_json_and_a_model_card(run_train, tiny_sd15, pickapic_parquet, tmp_path):
    summary = run_train(tiny_sd15, pickapic_parquet, tmp_path, "dpo", "--beta_dpo", "1000", steps=1)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["beta"] == 2000.0 and saved["method"] == "dpo" and saved["pretrained_model_name_or_path"] == tiny_sd15
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + tiny_sd15) and "- dpo" in card and "| `beta` | 2000.0 |" in card
    assert f"| loss | {summary['metrics']['loss']:.4g} |" in card and "minipref" in card


def test_validation_images_go_to_every_tracker(monkeypatch, tmp_path):
    from PIL import Image

    from full.run import validation

    class Tracker:
        def __init__(self, name):
            self.name, self.logged = name, []

        def log_images(self, values, step, **kwargs):
            self.logged.append((values, step, kwargs))

    trackers = [Tracker("tensorboard"), Tracker("wandb")]
    accelerator = Namespace(is_main_process=True, device="cpu", trackers=trackers)
    images = [Image.new("RGB", (8, 8), (255, 0, 0)) for _ in range(2)]
    monkeypatch.setattr(validation, "sample_images", lambda *a, **k: images)
    config = RunConfig(method="dpo", output_dir=str(tmp_path), model=ModelConfig("base/model"), resolution=8,
                       validation_prompts=["a", "b"], num_validation_images=1, num_validation_inference_steps=1,
                       validation_guidance_scale=1.0)
    path = validation.log_validation(accelerator, None, config, 7, None)
    assert path.is_file()
    (tb_values, tb_step, tb_kwargs), = trackers[0].logged
    assert tb_values["validation"].shape == (2, 8, 8, 3) and tb_step == 7 and tb_kwargs == {"dataformats": "NHWC"}
    (wandb_values, wandb_step, _), = trackers[1].logged
    assert wandb_values["validation"] == images and wandb_step == 7


# ---------------------------------------------------------------------------- launch script and imports


def test_train_sh_runs_from_any_directory_with_relative_paths(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "DATASET": "data/pairs.parquet",
           "MODEL_NAME": "models/sd15", "PYTHONPATH": ""}
    result = subprocess.run(["bash", str(REPO / "full/launch/train.sh"), "dpo", "sd15", "1gpu"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    # relative paths stay relative to the caller's directory (the script no longer changes into the checkout)
    assert "data/pairs.parquet" in command and "models/sd15" in command and "runs/sd15-dpo-1gpu" in command


def test_train_sh_exports_the_chosen_allocators_and_a_value_already_set_wins():
    from full.data.allocators import CHOSEN

    assert '/../data/allocators.py")"' in (REPO / "full/launch/train.sh").read_text()  # what train.sh evaluates
    exports = f'eval "$("{sys.executable}" "{REPO}/full/data/allocators.py")"; env'
    clean = {k: v for k, v in os.environ.items() if k not in CHOSEN}
    chosen = subprocess.run(["bash", "-c", exports], env=clean, capture_output=True, text=True, timeout=60).stdout
    assert CHOSEN and all(f"{name}={value}\n" in chosen for name, value in CHOSEN.items())
    mine = {**clean, **{name: "mine" for name in CHOSEN}}
    kept = subprocess.run(["bash", "-c", exports], env=mine, capture_output=True, text=True, timeout=60).stdout
    assert all(f"{name}=mine\n" in kept for name in CHOSEN)


def test_importing_the_plots_does_not_switch_the_matplotlib_backend():
    code = ("import matplotlib; matplotlib.use('svg'); import full.eval.plots; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_num_train_epochs_sets_the_number_of_steps(tiny_sd15, pickapic_parquet, tmp_path, capsys):
    from full.data import load_pair_rows
    from full.trainers import offline

    pairs = len(load_pair_rows(pickapic_parquet, max_rows=4))  # ties dropped
    argv = train_argv(tiny_sd15, pickapic_parquet, tmp_path, "sft", "--num_train_epochs", "1", "--data_format",
                      "pairs", "--max_train_samples", "4")
    with pytest.raises(SystemExit):  # both given: one of them would be ignored without a word (it was: 7 steps)
        offline.parse_args(argv)
    assert "give it or --max_train_steps, not both" in capsys.readouterr().err
    at = argv.index("--max_train_steps")
    summary = offline.main(argv[:at] + argv[at + 2:])
    assert summary["global_step"] == -(-pairs // 2) > 1  # sft trains on the winners: batch 2, no accumulation


def test_push_to_hub_uploads_the_output_dir_without_checkpoints(monkeypatch, tmp_path):
    import huggingface_hub

    from full.run import outputs

    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, exist_ok, token: calls.setdefault("repo", Namespace(repo_id=f"me/{repo_id}")))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.setdefault("upload", kwargs))
    args = Namespace(pretrained_model_name_or_path="base/model", method="dpo", output_dir=str(tmp_path / "run-1"),
                     dataset_name="pairs.parquet", beta=5000.0, push_to_hub=True, hub_model_id=None, hub_token=None)
    outputs.write_run_outputs(cli.run_config(args), "sd15", 10, [{"loss": 0.5}])
    assert calls["repo"].repo_id == "me/run-1"  # --hub_model_id defaults to the output dir's name
    assert calls["upload"]["folder_path"] == args.output_dir and "checkpoint-*" in calls["upload"]["ignore_patterns"]
    assert {"README.md", "args.json"} <= {p.name for p in (tmp_path / "run-1").iterdir()}


def test_evaluate_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    from full import evaluate

    with pytest.raises(SystemExit, match="^full.evaluate: error: --stages: unknown"):
        evaluate.main(["--out", str(tmp_path), "--stages", "paint"])
    with pytest.raises(ValueError, match="--stages: unknown"):
        evaluate.main(["--out", str(tmp_path), "--stages", "paint", "--debug"])


def test_progress_bars_respect_tqdm_disable_and_show_on_the_main_process_only(monkeypatch):
    from full.progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_bar(range(3), main_process=True).disable is False
    assert progress_bar(range(3), main_process=False).disable is True
    monkeypatch.setenv("TQDM_DISABLE", "1")  # a notebook, a log file, the tutorials
    assert progress_bar(range(3), main_process=True).disable is True


def test_usage_lines_name_the_console_script_the_user_typed(monkeypatch, capsys):
    from full.trainers import offline

    monkeypatch.setattr(sys, "argv", ["/venv/bin/minipref-train"])
    with pytest.raises(SystemExit):
        offline.parse_args(["--method", "dpo"])
    assert capsys.readouterr().err.startswith("minipref-train: error: ")
    monkeypatch.setattr(sys, "argv", ["/repo/full/train.py"])  # python -m full.train
    assert offline.build_parser().prog == "full.train"


def test_the_torchvision_fallback_notice_is_silenced_and_nothing_else(tmp_path):
    # transformers prints it once per image-processor class, on every run; `import full` filters exactly it.
    code = "import sys; {}from transformers import CLIPImageProcessor; CLIPImageProcessor()"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    bare = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, env=env)
    ours = subprocess.run([sys.executable, "-c", code.format("import full; ")], capture_output=True, text=True, env=env,
                          cwd=str(Path(__file__).resolve().parents[1]))
    if importlib.util.find_spec("torchvision") is None:  # with torchvision there is nothing to fall back from
        assert "requires torchvision" in bare.stderr  # the notice exists: the check below can fail
    assert ours.returncode == 0 and "requires torchvision" not in ours.stderr


def test_a_multi_process_launch_that_started_one_process_says_so(monkeypatch):
    from full.processes import single_process_of_a_multi_process_launch

    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert single_process_of_a_multi_process_launch() is None  # python -m full.train
    # what accelerate 1.x's simple launcher sets for `accelerate launch --num_processes 2` without GPUs
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "training runs as 1 process" in single_process_of_a_multi_process_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: really 2 processes
    assert single_process_of_a_multi_process_launch() is None

