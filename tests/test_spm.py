"""The step-aware preference model (full/spm.py) and its trainer (full/train_spm.py) on tiny offline models.

What is proved: at initialisation the time-conditioned SPM *is* the plain CLIP/PickScore scorer (paper 003, Supp.
Sec. 2); the adaLN conditioning is wired (a perturbed modulation makes the score depend on t, and adaLN-Zero still
passes gradient to it at init); the trainer reduces the PickScore loss on a learnable synthetic preference; the
save/load round trip is exact; the x0 helper equals diffusers' DDIM ``pred_original_sample``; a pair shares its noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from full.online.preference import best_worst_pair, pair_preference_loss, predicted_x0, preference_gap
from full.online.spm import StepAwarePreferenceModel, load_spm

PROMPTS = ["a photo of a cat", "a bowl of fruit", "a red car on a road", "a dog playing in the snow"]
T = torch.tensor([0, 1, 500, 999])


@pytest.fixture()
def spm(tiny_clip):
    return StepAwarePreferenceModel.from_pretrained(tiny_clip).eval()


def _images(seed=0, shape=(4, 3, 40, 56)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _perturb(model, seed=1, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.time_modulation.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


# ----------------------------------------------------------------------------------------------------------------
# (1) at initialisation the SPM is the plain scorer
# ----------------------------------------------------------------------------------------------------------------


def test_spm_at_init_equals_plain_clip_scorer(spm, tiny_clip):
    from transformers import AutoProcessor, CLIPModel

    plain, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    pixel_values = spm.preprocess(_images())
    tokens = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = plain(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         pixel_values=pixel_values).logits_per_image.diag()  # logit_scale.exp() * cos, PickScore
        for t in (T, torch.tensor(0), torch.full((4,), 999)):
            torch.testing.assert_close(spm.score(pixel_values, t, prompts=PROMPTS), expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 1e-3  # the four scores differ, so equality is not trivial


def test_preprocess_matches_clip_image_processor(spm, tiny_clip):
    """Same size: exactly the processor's rescale + normalise; other sizes: its resize + centre crop, approximately."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_clip).image_processor
    rng = np.random.default_rng(0)
    for height, width, tol in ((32, 32, 1e-5), (48, 64, 0.08)):  # squashing instead of cropping: 0.17
        coarse = rng.uniform(0, 255, (4, 4, 3))  # a smooth image, so resampling kernels barely matter
        rgb = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR))
        expected = torch.as_tensor(np.asarray(processor(images=Image.fromarray(rgb), return_tensors="pt")
                                              ["pixel_values"]))
        ours = spm.preprocess(torch.tensor(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().mean() < tol


# ----------------------------------------------------------------------------------------------------------------
# (2) the conditioning is wired
# ----------------------------------------------------------------------------------------------------------------


def test_perturbed_modulation_makes_scores_depend_on_t(spm, tiny_clip):
    pixel_values = spm.preprocess(_images())[:1].expand(4, -1, -1, -1)  # one image, four timesteps
    with torch.no_grad():
        before = spm.score(pixel_values, T, prompts=PROMPTS[:1])
        _perturb(spm)
        after = spm.score(pixel_values, T, prompts=PROMPTS[:1])
    assert torch.allclose(before, before[0].expand(4))  # at init t changes nothing
    assert (after[:, None] - after[None, :]).abs().add(torch.eye(4)).min() > 1e-4  # all four differ

    plain = StepAwarePreferenceModel.from_pretrained(tiny_clip, time_conditioned=False).eval()
    assert not hasattr(plain, "time_modulation")
    with torch.no_grad():
        scores = plain.score(pixel_values, T, prompts=PROMPTS[:1])
    torch.testing.assert_close(scores, before)  # the plain scorer is the SPM at init, for every t


def test_adaln_zero_still_gets_gradient_at_init(spm):
    scores = spm.score(spm.preprocess(_images()), T, prompts=PROMPTS)
    pair_preference_loss(scores[:2], scores[2:]).loss.backward()
    assert spm.time_modulation.blocks[0].weight.grad.abs().sum() > 0
    assert spm.time_modulation.pooled.weight.grad.abs().sum() > 0


def test_deepcopy_has_its_own_conditioning(spm):
    import copy

    pixel_values = spm.preprocess(_images())
    twin = copy.deepcopy(spm)
    _perturb(twin)
    with torch.no_grad():
        assert not torch.allclose(twin.score(pixel_values, T, prompts=PROMPTS), spm.score(pixel_values, T, prompts=PROMPTS))


# ----------------------------------------------------------------------------------------------------------------
# (3) training reduces the loss; (4) save -> load
# ----------------------------------------------------------------------------------------------------------------


def test_train_spm_reduces_loss_and_saves_a_loadable_model(tiny_clip, pickapic_parquet, tmp_path):
    """Bright winners, dark losers (tests/tiny_models.py): a preference the SPM can learn through the noise."""
    from full.trainers.spm import main

    out = tmp_path / "spm"
    metrics = main(["--spm_model_name_or_path", tiny_clip, "--pixel_space", "--x0_estimate", "noisy",
                    "--dataset_name", pickapic_parquet, "--output_dir", str(out), "--max_train_steps", "4",
                    "--train_batch_size", "8", "--learning_rate", "1e-3", "--validation_timesteps", "0,300",
                    "--num_validation_pairs", "8"])
    before, after = metrics["validation_before"]["mean_loss"], metrics["validation_after"]["mean_loss"]
    assert after < before - 0.2, (before, after)
    assert after < np.log(2)  # better than chance, not only better than the start
    assert json.loads((out / "metrics.json").read_text())["validation_after"]["mean_loss"] == pytest.approx(after)

    spm = load_spm(out)
    assert spm.time_conditioned and spm.num_train_timesteps == 1000
    with torch.no_grad():
        scores = spm.score(spm.preprocess(_images()), T, prompts=PROMPTS)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("time_conditioned", [True, False])
def test_save_load_round_trip(tiny_clip, tmp_path, time_conditioned):
    spm = StepAwarePreferenceModel.from_pretrained(tiny_clip, time_conditioned=time_conditioned).eval()
    if time_conditioned:
        _perturb(spm)
    with torch.no_grad():
        torch.nn.init.normal_(spm.clip.visual_projection.weight)  # CLIP weights round-trip too
    pixel_values = spm.preprocess(_images())
    with torch.no_grad():
        expected = spm.score(pixel_values, T, prompts=PROMPTS)
        loaded = load_spm(spm.save_pretrained(tmp_path / "spm"))
        assert loaded.time_conditioned == time_conditioned
        assert torch.equal(loaded.score(pixel_values, T, prompts=PROMPTS), expected)
    assert (tmp_path / "spm" / "spm_time_modulation.safetensors").exists() == time_conditioned


# ----------------------------------------------------------------------------------------------------------------
# Losses, the SPO pair rule, the x0 estimate, the shared noise
# ----------------------------------------------------------------------------------------------------------------


def test_pair_loss_gap_and_pair_rule():
    s_w, s_l = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([1.0, 0.5, 0.3])
    hard = pair_preference_loss(s_w, s_l)
    torch.testing.assert_close(hard.loss, F.cross_entropy(torch.stack([s_w, s_l], -1), torch.zeros(3, dtype=torch.long)))
    assert hard.metrics["accuracy"] == pytest.approx(0.5)  # right, wrong, and a score tie that counts half
    tie = pair_preference_loss(s_w[2:], s_l[2:], torch.tensor([0.5]))
    assert tie.loss.item() == pytest.approx(0.0, abs=1e-7)  # equal scores are the ideal answer to a tie

    gap = preference_gap(s_w, s_l)
    probs = torch.stack([s_w, s_l], -1).softmax(-1)
    torch.testing.assert_close(gap, (probs[:, 0] - probs[:, 1]).abs())

    scores = torch.tensor([[0.0, 5.0], [1.0, 5.1], [0.2, 4.9]])  # (k=3 candidates, B=2 prompts)
    best, worst, keep = best_worst_pair(scores, threshold=0.3)
    assert best.tolist() == [1, 1] and worst.tolist() == [0, 2]
    assert keep.tolist() == [True, False]  # tanh(0.5) = 0.46 > 0.3; tanh(0.1) = 0.10 < 0.3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_equals_ddim_pred_original_sample(prediction_type):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(1000)
    gen = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 480, 999])
    ours = predicted_x0(x_t, out, t, scheduler)
    for i in range(3):
        expected = scheduler.step(out[i:i + 1], int(t[i]), x_t[i:i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i:i + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny_sd15", "tiny_sdxl"])
def test_a_pair_shares_noise_and_t(family, request, tmp_path):
    """Winner and loser are noised with the same eps and t (Sec. 4.2); different pairs get different ones."""
    from full.trainers.spm import NoisyPairImages, parse_args

    args = parse_args(["--pretrained_model_name_or_path", request.getfixturevalue(family), "--dataset_name", "x",
                       "--output_dir", str(tmp_path)])
    noiser = NoisyPairImages(args, torch.device("cpu"), torch.float32)
    calls, add_noise = [], noiser.scheduler.add_noise
    noiser.scheduler.add_noise = lambda x0, noise, t: calls.append((noise, t)) or add_noise(x0, noise, t)
    batch = {"pixel_values": _images(shape=(2, 2, 3, 32, 32)), "captions": PROMPTS[:2],
             "original_sizes": torch.full((2, 2, 2), 32), "crop_top_lefts": torch.zeros(2, 2, 2, dtype=torch.long)}
    images, t = noiser(batch, torch.tensor([100, 700]), torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    (noise, noised_t), = calls  # (2B, 4, 16, 16): winners then losers
    assert t.tolist() == noised_t.tolist() == [100, 700, 100, 700]
    assert torch.equal(noise[:2], noise[2:]) and not torch.allclose(noise[0], noise[1])


# ----------------------------------------------------------------------------------------------------------------
# (5) bad inputs
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error(spm, tmp_path):
    pixel_values = spm.preprocess(_images())
    bad_calls = {
        "t out of range": lambda: spm.score(pixel_values, torch.full((4,), 1000), prompts=PROMPTS),
        "negative t": lambda: spm.score(pixel_values, -1, prompts=PROMPTS),
        "t batch mismatch": lambda: spm.score(pixel_values, torch.tensor([1, 2, 3]), prompts=PROMPTS),
        "fractional t": lambda: spm.score(pixel_values, torch.full((4,), 0.5), prompts=PROMPTS),
        "missing t": lambda: spm.score(pixel_values, prompts=PROMPTS),
        "prompt batch mismatch": lambda: spm.score(pixel_values, T, prompts=PROMPTS[:3]),
        "raw images": lambda: spm.score(_images(), T, prompts=PROMPTS),
        "no prompts": lambda: spm.score(pixel_values, T),
        "loss shapes": lambda: pair_preference_loss(torch.zeros(3), torch.zeros(2)),
        "tie label range": lambda: pair_preference_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.5, 0.0])),
        "one candidate": lambda: best_worst_pair(torch.zeros(1, 3), 0.3),
        "not an SPM dir": lambda: load_spm(tmp_path),
    }
    for name, call in bad_calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{name} did not raise")
    with pytest.raises(ValueError, match="without a timestep"):
        spm.clip.get_image_features(pixel_values=pixel_values)  # bypassing the SPM must not use a stale t


def test_cli_rejects_inconsistent_arguments(tmp_path):
    from full.trainers.spm import parse_args

    base = ["--dataset_name", "x", "--output_dir", str(tmp_path)]
    for argv in (base + ["--pixel_space"],  # nothing to predict x0 with
                 base,  # latent space without a diffusion pipeline
                 base + ["--pixel_space", "--x0_estimate", "noisy", "--max_train_steps", "0"],
                 base + ["--pixel_space", "--x0_estimate", "noisy", "--validation_timesteps", "a,b"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_train_spm_resumes_to_the_same_weights(tiny_clip, pickapic_parquet, tmp_path):
    """The SPM trainer runs on the shared loop: a run stopped at step 2 and resumed ends where the whole run ends."""
    from safetensors.torch import load_file

    from full.trainers.spm import main

    def argv(out, steps, *extra):
        return ["--spm_model_name_or_path", tiny_clip, "--pixel_space", "--x0_estimate", "noisy", "--dataset_name",
                pickapic_parquet, "--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size",
                "4", "--learning_rate", "1e-3", "--validation_timesteps", "0", "--num_validation_pairs", "4",
                "--report_to", "none", "--checkpointing_steps", "2", *extra]

    main(argv(tmp_path / "a", 4))
    main(argv(tmp_path / "b", 2))
    main(argv(tmp_path / "b", 4, "--resume_from_checkpoint", "latest"))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    mid, end = (load_file(str(tmp_path / "b" / f"checkpoint-{n}" / "model.safetensors")) for n in (2, 4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(mid[k], end[k]) for k in end)  # steps 3-4 moved the weights: not vacuous
    assert (tmp_path / "b" / "README.md").is_file() and (tmp_path / "b" / "args.json").is_file()


def test_train_spm_takes_the_column_flags_its_data_errors_name(tiny_clip, pickapic_parquet, tmp_path):
    from full.trainers import spm as train_spm

    argv = ["--spm_model_name_or_path", tiny_clip, "--dataset_name", pickapic_parquet, "--pixel_space",
            "--x0_estimate", "noisy", "--output_dir", str(tmp_path), "--report_to", "none", "--max_train_steps", "1",
            "--caption_column", "prompt", "--dataset_split_name", "train"]
    args = train_spm.parse_args(argv)
    assert args.caption_column == "prompt" and args.split == "train"
    with pytest.raises(ValueError, match="missing column.*--caption_column prompt"):  # the flag reaches the reader
        train_spm.main(argv)

