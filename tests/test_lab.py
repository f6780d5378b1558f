"""full/lab: the reader and rater on rendered scenes (exact), the labelling rule, and the quick lab end to end.

The end-to-end test runs `full.lab.run.run_lab` with the quick preset in this process (each trainer's main(argv)):
pretraining a tiny SD1.5-shaped pipeline, preference data from its own samples, every method, full.evaluate on the
held-out captions. It asserts that DPO and SFT raise the rater's mean score over the base model with fixed seeds,
that DPO on winner/loser-swapped pairs lowers it (so the test can fail), and that every other method wrote a LoRA
that full.evaluate loaded and that changes the samples.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from full.lab import rater, reader, shapes


# ---------------------------------------------------------------------------------------------------------------
# The world and its reader
# ---------------------------------------------------------------------------------------------------------------


def test_captions_split_every_colour_shape_pair_between_training_and_held_out():
    assert len(shapes.ALL_CAPTIONS) == 36 and len(set(shapes.ALL_CAPTIONS)) == 36
    assert sorted(shapes.TRAIN_CAPTIONS + shapes.HELD_OUT_CAPTIONS) == sorted(shapes.ALL_CAPTIONS)
    strip = lambda c: shapes.parse_caption(c)[:2]  # noqa: E731
    assert sorted(map(strip, shapes.TRAIN_CAPTIONS)) == sorted(map(strip, shapes.HELD_OUT_CAPTIONS))
    with pytest.raises(ValueError, match="not a lab caption"):
        shapes.parse_caption("a photo of a cat")


def test_reader_reads_every_rendered_scene_exactly():
    images, scenes = shapes.make_images(400, seed=123)
    for image, scene in zip(images, scenes):
        found = reader.read(image)
        assert (found.colour, found.shape, found.background) == (scene.colour, scene.shape, scene.background), scene
        # the area is the coverage the renderer drew, to anti-aliasing precision
        assert found.area == pytest.approx(shapes.shape_mask(scene).mean(), abs=2e-3)


def test_reader_ignores_a_speckle_and_finds_no_shape_on_grey():
    scene = shapes.Scene("blue", "square", "dark", grey=0.2, size=12, cx=16, cy=16)
    image = shapes.render(scene)
    speckled = image.copy()
    speckled[1, 1] = (255, 0, 0)  # one saturated pixel far from the shape: not the shape, not its size
    assert reader.read(speckled).area == pytest.approx(reader.read(image).area)
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert reader.read(blank) == reader.Reading(None, None, "light", 0.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The scorers and the labelling rule
# ---------------------------------------------------------------------------------------------------------------


def test_rater_prefers_the_larger_shape_and_fidelity_checks_every_attribute():
    sizes = [8, 11, 14, 17, 20]
    images = [Image.fromarray(shapes.render(shapes.Scene("green", "circle", "light", 0.7, s, 16, 16))) for s in sizes]
    prompt = shapes.caption("green", "circle", "light")
    scores = rater.Rater(device="cpu").score(images, [prompt] * len(images))  # unknown options are accepted
    assert np.all(np.diff(scores) > 0)
    assert scores[-1] == pytest.approx(np.pi * 10**2 / 32**2, rel=0.02)
    fidelity = rater.Fidelity()
    wrong = [shapes.caption("red", "circle", "light"), shapes.caption("green", "square", "light"),
             shapes.caption("green", "circle", "dark")]
    assert fidelity.score(images[:1], [prompt]) == [1.0]
    assert fidelity.score(images[:1], ["good image, " + prompt]) == [1.0]  # CSFT's prompt at sampling time
    assert fidelity.score(images[:1] * 3, wrong) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        rater.Rater().score(images[:2], [prompt])


def test_label_pairs_ties_the_closest_pairs_and_flips_the_requested_fraction():
    rng = np.random.default_rng(0)
    a, b = rng.random(2000), rng.random(2000)
    clean = rater.label_pairs(a, b)
    assert np.array_equal(clean, (a > b).astype(float))
    tied = rater.label_pairs(a, b, tie_rate=0.1)
    ties = tied == 0.5
    assert ties.sum() == 200
    assert np.abs(a - b)[ties].max() <= np.abs(a - b)[~ties].min()  # the closest pairs, and only those
    noisy = rater.label_pairs(a, b, label_noise=0.2, seed=1)
    assert 0.17 < np.mean(noisy != clean) < 0.23
    with pytest.raises(ValueError, match="label_noise"):
        rater.label_pairs(a, b, label_noise=0.5)


def test_tokenizer_spells_every_caption_and_csft_prefix_word_as_one_token():
    from minipref.sft import BAD_PREFIX, GOOD_PREFIX

    from full.lab.pretrain import TOKEN_LENGTH, VOCABULARY, build_tokenizer

    tokenizer = build_tokenizer(VOCABULARY)
    ids = tokenizer("a magenta triangle on a light background").input_ids
    assert len(ids) == 2 + 7  # start, seven words, end
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a magenta triangle on a light background"
    for prefix in (GOOD_PREFIX, BAD_PREFIX):  # CSFT's prompts: "good image, a ..." = start, 3 + 7 pieces, end
        ids = tokenizer(prefix + "a magenta triangle on a light background").input_ids
        assert len(ids) == 2 + 3 + 7 <= TOKEN_LENGTH, tokenizer.convert_ids_to_tokens(ids)
    # the longest prefixed caption is encoded whole (nothing truncated) by the pipeline's own call
    longest = max(shapes.ALL_CAPTIONS, key=lambda c: len(tokenizer(c).input_ids))
    ids = tokenizer(GOOD_PREFIX + longest, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == (GOOD_PREFIX + longest).replace(",", " ,")
    assert len(tokenizer("an unknown word!").input_ids) > 4  # any text tokenizes, byte by byte


def test_each_method_is_an_entry_point_argv_with_its_own_data_and_flags(tmp_path):
    from full.lab.methods import all_methods, flag_list, trainer_argv
    from full.lab.presets import FULL

    assert flag_list({"seed": 0, "lr_warmup_steps": 0, "bce_reference": True, "x": None, "y": False}) == [
        "--seed", "0", "--lr_warmup_steps", "0", "--bce_reference"]  # a 0 is a value, not a missing flag
    data = {k: str(tmp_path / f"{k}.parquet") for k in ("pairs", "pairs_swapped", "feedback", "prompts")}
    argvs = {m.name: (m.entry, trainer_argv(m, FULL, tmp_path / "model", tmp_path / "clip", tmp_path / "spm", data,
                                            tmp_path / m.name)) for m in all_methods()}
    value = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert value(argvs["dpo"][1], "--dataset_name") == data["pairs"]
    assert value(argvs["dpo_swapped"][1], "--dataset_name") == data["pairs_swapped"]
    assert value(argvs["kto_loss_averse"][1], "--utility") == "loss_averse"
    assert value(argvs["dspo_e"][1], "--dspo_variant") == "dspo_e"
    assert value(argvs["contrast"][1], "--clip_model_name_or_path") == str(tmp_path / "clip")
    assert "--bce_reference" in argvs["bce"][1] and value(argvs["sft"][1], "--dataset_name") == data["feedback"]
    assert argvs["spin"][0] == "full.spin" and argvs["spo"][0] == "full.spo"
    assert value(argvs["spo"][1], "--spm_model_name_or_path") == str(tmp_path / "spm")
    # one preset per family: every reference-based method trains with the same beta, lr and steps
    for name in ("dpo", "kto_kahneman_tversky", "dspo", "contrast", "bce", "spin"):
        assert value(argvs[name][1], "--beta") == "5000.0" and value(argvs[name][1], "--max_train_steps") == "300"
    # DSPO at Diffusion-DPO's beta takes gamma = 1/(2 beta): its start is then 3/4 SFT, not -2499 x SFT
    for name in ("dspo", "dspo_e", "dspo_ref"):
        assert float(value(argvs[name][1], "--dspo_gamma")) * 2 * 5000.0 == pytest.approx(1.0)
    assert "--dspo_gamma" not in argvs["dpo"][1]


def test_a_seed_suffix_trains_the_same_method_with_another_seed(tmp_path):
    from full.lab.methods import method_named, trainer_argv
    from full.lab.presets import FULL

    data = {k: str(tmp_path / f"{k}.parquet") for k in ("pairs", "pairs_swapped", "feedback", "prompts")}
    argv = lambda name: trainer_argv(method_named(name), FULL, tmp_path / "model", tmp_path / "clip",  # noqa: E731
                                     tmp_path / "spm", data, tmp_path / "lora")
    for name in ("dpo", "spo", "kto_kahneman_tversky"):
        first, second = argv(name), argv(f"{name}_seed1")
        at = first.index("--seed") + 1
        assert (first[at], second[at]) == ("0", "1")
        assert first[:at] + first[at + 1:] == second[:at] + second[at + 1:]  # nothing else differs
    assert method_named("csft_seed12").prompt_prefix == method_named("csft").prompt_prefix
    for bad in ("dpo_seed", "dpo_seedx", "nope_seed1", "seed1"):
        with pytest.raises(KeyError):
            method_named(bad)


def test_evaluation_deals_models_over_runs_and_samples_csft_with_its_prefix():
    from full.lab.run import evaluation_runs

    trained = {name: {"prompt_prefix": "good image, " if name == "csft" else ""}
               for name in ("sft", "csft", "dpo", "kto", "spo")}
    runs = evaluation_runs(trained, workers=2)
    assert [(r["name"], r["prefix"], r["models"]) for r in runs] == [
        ("part0", "", ["base", "dpo", "spo"]), ("part1", "", ["sft", "kto"]), ("prefix_csft", "good image, ", ["csft"])]
    assert [r["models"] for r in evaluation_runs({"dpo": {"prompt_prefix": ""}}, workers=3)] == [["base"], ["dpo"]]


def test_lab_cli_names_an_unknown_method_in_one_line(capsys):
    from full.lab.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--methods", "dpo,nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--methods: unknown ['nope']" in err and "kto_loss_averse" in err
    with pytest.raises(SystemExit):  # 'all' and a seed suffix are names too; only the bad one is named
        main(["--methods", "all,dpo_seed1,dpo_seedx"])
    assert "unknown ['dpo_seedx']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--guidance", "0.5"])
    assert "--guidance must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The quick lab, end to end through the real entry points
# ---------------------------------------------------------------------------------------------------------------


# Both tests read one quick lab (the session fixture `quick_lab`, tests/conftest.py): the group keeps them on one
# xdist worker (`--dist loadgroup`, Makefile), so it is built once instead of once per worker.
@pytest.mark.xdist_group("quick_lab")
def test_quick_lab_dpo_and_sft_raise_the_reward_and_swapped_pairs_lower_it(quick_lab):
    out, results = quick_lab
    base = results["base"]["mean_score"]
    methods = results["methods"]
    assert methods["dpo"]["mean_score"] > base, (methods["dpo"], results["base"])
    assert methods["sft"]["mean_score"] > base, (methods["sft"], results["base"])
    assert methods["dpo_swapped"]["mean_score"] < base, (methods["dpo_swapped"], results["base"])
    assert json.loads((out / "results.json").read_text())["methods"].keys() == methods.keys()


@pytest.mark.xdist_group("quick_lab")
def test_quick_lab_every_method_writes_a_lora_that_evaluate_loads(quick_lab):
    from full.lab.methods import all_methods

    out, results = quick_lab
    assert set(results["methods"]) == {m.name for m in all_methods()}
    scores = [json.loads(line) for line in (out / "eval" / "scores.jsonl").read_text().splitlines()]
    reward = {}
    for row in scores:
        if row["scorer"].endswith("Rater"):
            reward.setdefault(row["model"], []).append(row["score"])
    for name, entry in results["methods"].items():
        full = "--train_mode full" in entry["command"]  # dpo_full: the whole UNet, evaluated with --full_model
        weights = "unet/config.json" if full else "pytorch_lora_weights.safetensors"
        assert (out / "train" / name / weights).is_file(), name
        assert 0.0 <= entry["win_rate"] <= 1.0 and entry["ci"][0] <= entry["win_rate"] <= entry["ci"][1], name
        assert 0.0 <= entry["fidelity"] <= 1.0
        # full.evaluate drew this method's images with its LoRA loaded: they are not the base model's
        assert reward[name] != reward["base"], name
    # CSFT was sampled as it was trained, "good image, <caption>"; every other model with the plain caption
    manifest = [json.loads(line) for line in (out / "eval" / "manifest.jsonl").read_text().splitlines()]
    assert {r["prompt"].startswith("good image, ") for r in manifest if r["model"] == "csft"} == {True}
    assert {r["prompt"].startswith("a ") for r in manifest if r["model"] != "csft"} == {True}
    assert {r["full_model"] is not None for r in manifest if r["model"] == "dpo_full"} == {True}
    assert 0.0 <= results["base"]["fidelity"] <= 1.0 and results["wall_s"] > 0
    assert (out / "lab.png").is_file()


def test_fidelity_tool_names_bad_input_in_one_line(tmp_path, capsys):
    from full.lab.fidelity import main, pretrain_overrides
    from full.lab.presets import FULL_PRETRAIN

    config = pretrain_overrides(["unet_steps=10", "unet_lr=0.5"])
    assert (config.unet_steps, config.unet_lr, config.vae_steps) == (10, 0.5, FULL_PRETRAIN.vae_steps)
    for argv, named in ((["--model", str(tmp_path)], "holds no pipeline"),
                        (["--model", str(tmp_path), "--guidance", "3,x"], "--guidance"),
                        (["--model", str(tmp_path), "--pretrain", "unet_stepz=3"], "unet_stepz")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err and named in err, err


@pytest.mark.xdist_group("quick_lab")
def test_fidelity_tool_reads_the_quick_model_as_the_lab_does(quick_lab):
    from full.lab.fidelity import caption_fidelity
    from full.lab.presets import QUICK

    out, results = quick_lab
    # the lab's own evaluation of the base model: the same captions, seeds, steps and guidance, the same reader
    measured = caption_fidelity(out / "model", QUICK.guidance, seeds=QUICK.eval_seeds, steps=QUICK.sample_steps)
    assert measured["n_images"] == 18 * QUICK.eval_seeds
    assert measured["all"] == pytest.approx(results["base"]["fidelity"])
    assert measured["all"] <= min(measured["colour"], measured["shape"], measured["background"])
