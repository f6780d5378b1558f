"""SPO (full/spo.py) on tiny offline SD1.5 / SDXL pipelines and a tiny time-conditioned CLIP as the SPM.

What is proved: pairs are made only at steps with t < 750, from one shared x_t, with the expected shapes; the SPM
scores each candidate's own DDIM x0 prediction at the next timestep (recomputed here by hand); the threshold filters
(0 keeps every pair with a gap, 0.99 keeps none and the trainer says so and leaves the LoRA untouched); the chain
continues from the randomly chosen candidate, which is not always the winner; MSPO rolls each candidate chain and
trains on every step of it; the training log-probability is the Gaussian the step was sampled from (CFG included);
a run starts at loss log 2, changes only the LoRA, and saves a LoRA that a fresh pipeline loads and is changed by;
an interrupted run resumes to the same weights; bad flags are rejected with messages.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

import minipref
from full import models
from full.online import sampler as spo_sampler
from full.online.preference import decode_latents, predicted_x0
from full.online.spm import StepAwarePreferenceModel, load_spm
from full.trainers import spo

PROMPTS = ["a photo of a cat", "a bowl of fruit", "a red car on a road"]
LATENT = (4, 16, 16)  # 32 px images, the tiny VAE halves the side


@pytest.fixture(scope="module")
def spm_dir(tiny_clip, tmp_path_factory) -> str:
    """A time-conditioned SPM saved as full/train_spm.py saves one (adaLN-Zero: at init it is the CLIP scorer)."""
    return StepAwarePreferenceModel.from_pretrained(tiny_clip, time_conditioned=True).save_pretrained(
        tmp_path_factory.mktemp("spm"))


class Sampler:
    """The pieces `collect_step_pairs` needs, for one tiny pipeline (LoRA added, still zero, so policy == base)."""

    def __init__(self, model_dir: str, spm_dir: str, steps: int = 4):
        self.parts = models.load_components(model_dir)
        models.add_lora(self.parts.unet, 4)
        self.family = self.parts.family
        self.scheduler = spo.ddim_scheduler(model_dir, None, steps, "cpu")
        self.spm = load_spm(spm_dir)
        self.guide = spo.Guidance(self.family, spo.unconditional_embeds(self.parts, "cpu"),
                                  None if self.family == "sd15" else torch.tensor([[32.0, 32, 0, 0, 32, 32]]),
                                  5.0, torch.float32)

    def collect(self, threshold: float, k: int = 4, inner: int = 0, prompts=PROMPTS, seed: int = 0):
        cond = models.encode_prompts(self.parts, prompts, "cpu")
        settings = spo.SpoSettings(k, threshold, num_inner_steps=inner)
        return spo.collect_step_pairs(self.parts.unet, self.scheduler, self.parts.vae, self.spm, prompts, cond,
                                      self.guide, settings, LATENT, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd15(tiny_sd15, spm_dir) -> Sampler:
    return Sampler(tiny_sd15, spm_dir)


# ----------------------------------------------------------------------------------------------------------------
# Collection
# ----------------------------------------------------------------------------------------------------------------


def test_pairs_come_from_a_shared_x_t_below_t_750(sd15):
    assert sd15.scheduler.timesteps.tolist() == [751, 501, 251, 1]
    pairs, branches = sd15.collect(threshold=0.0)
    # t = 751 is plain sampling; every later step branches; candidates are scored at the *next* step's t
    assert [b.timestep for b in branches] == [501, 251, 1]
    assert [b.score_timestep for b in branches] == [251, 1, 0]
    kept = sum(int(b.keep.sum()) for b in branches)
    assert kept == len(pairs) >= 7  # a gap of exactly 0 (a tie) is the only way to miss threshold 0
    assert pairs.x_t.shape == pairs.x_prev.shape == (len(pairs), 2, *LATENT)
    assert pairs.hidden.shape == (len(pairs), 77, 32) and pairs.pooled is None
    assert set(pairs.timesteps.tolist()) <= {501, 251, 1} and bool((pairs.timesteps < 750).all())
    torch.testing.assert_close(pairs.x_t[:, 0], pairs.x_t[:, 1], rtol=0, atol=0)  # one shared x_t per pair
    assert bool(((pairs.x_prev[:, 0] - pairs.x_prev[:, 1]).flatten(1).abs().max(1).values > 1e-3).all())
    for b in branches:
        assert b.scores.shape == (4, 3)
        assert torch.equal(b.best, b.scores.argmax(0)) and torch.equal(b.worst, b.scores.argmin(0))


def test_the_spm_scores_each_candidates_own_x0_prediction(sd15):
    """Recompute the first branch's winner/loser scores by hand: guided UNet output at t_prev, DDIM x0, VAE, SPM."""
    pairs, branches = sd15.collect(threshold=0.0)
    first = branches[0]
    rows = torch.nonzero(pairs.timesteps == first.timestep).flatten()  # prompts are in order within a step
    prompts = [PROMPTS[b] for b in torch.nonzero(first.keep).flatten().tolist()]
    cond = models.encode_prompts(sd15.parts, prompts, "cpu")
    with torch.no_grad():
        for side, index in ((0, first.best), (1, first.worst)):
            x_prev = pairs.x_prev[rows, side]
            t_prev = torch.full((len(rows),), first.score_timestep)
            out = spo_sampler.guided_prediction(sd15.parts.unet, x_prev, t_prev, cond, sd15.guide)
            images = decode_latents(sd15.parts.vae, predicted_x0(x_prev, out, t_prev, sd15.scheduler))
            scores = sd15.spm.score_images(images, t_prev, prompts=prompts)
            expected = first.scores[index, torch.arange(3)][first.keep]
            torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_the_chain_continues_from_the_random_candidate(sd15):
    """The next branch's shared x_t is the chosen candidate: the winner's x_{t-1} exactly when the winner was drawn,
    the loser's exactly when the loser was; over the run the draw is not always the winner."""
    draws, winners = [], []
    for seed in (0, 1):
        pairs, branches = sd15.collect(threshold=0.0, seed=seed)
        assert all(bool(b.keep.all()) for b in branches)  # so that row j of a step is prompt j
        for here, after in zip(branches, branches[1:]):
            x_prev = pairs.x_prev[pairs.timesteps == here.timestep]  # (3, 2, ...)
            x_next = pairs.x_t[pairs.timesteps == after.timestep][:, 0]  # (3, ...)
            for b in range(3):
                chosen = int(here.chosen[b])
                assert torch.equal(x_next[b], x_prev[b, 0]) == (chosen == int(here.best[b]))
                assert torch.equal(x_next[b], x_prev[b, 1]) == (chosen == int(here.worst[b]))
        draws += torch.cat([b.chosen for b in branches]).tolist()
        winners += torch.cat([b.best for b in branches]).tolist()
    assert any(d != w for d, w in zip(draws, winners)), "the chain must not always continue from the winner"
    assert len(set(draws)) >= 3  # uniform over the 4 candidates, not a fixed index


def test_a_huge_threshold_keeps_no_pair(sd15):
    pairs, branches = sd15.collect(threshold=0.99)
    assert len(pairs) == 0 and pairs.x_t.shape == (0, 2, *LATENT)
    assert len(branches) == 3 and not any(bool(b.keep.any()) for b in branches)
    assert max(float(b.gap.max()) for b in branches) < 0.99


def test_training_log_prob_is_the_sampling_gaussian_with_cfg(sd15):
    """x_{t-1} was drawn from N(mean, std^2) of the guided step: the standardised residual under that Gaussian is
    N(0, 1), and `step_log_probs` (what training differentiates) is its log-density. Without CFG (--no-train_cfg)
    the residual is visibly not N(0, 1): those log-probs score another policy than the one that sampled."""
    from minipref import gaussian_step_log_prob

    pairs, _ = sd15.collect(threshold=0.0)
    x_t, x_prev = torch.cat([pairs.x_t[:, 0], pairs.x_t[:, 1]]), torch.cat([pairs.x_prev[:, 0], pairs.x_prev[:, 1]])
    timesteps, cond = pairs.timesteps.repeat(2), models.PromptEmbeds(pairs.hidden.repeat(2, 1, 1))
    spread, log_probs = {}, {}
    with torch.no_grad():
        for use_cfg in (True, False):
            out = spo_sampler.guided_prediction(sd15.parts.unet, x_t, timesteps, cond, sd15.guide, use_cfg)
            mean, std = spo_sampler.step_gaussian(sd15.scheduler, out, x_t, timesteps, eta=1.0)
            z = (x_prev - mean) / std
            spread[use_cfg] = (z.mean().item(), z.std().item())
            log_probs[use_cfg] = spo.step_log_probs(sd15.parts.unet, sd15.scheduler, pairs, sd15.guide, 1.0, use_cfg)
            torch.testing.assert_close(log_probs[use_cfg], gaussian_step_log_prob(x_prev, mean, std))
    assert abs(spread[True][0]) < 0.05 and abs(spread[True][1] - 1) < 0.05
    assert abs(spread[False][1] - 1) > 0.2 and log_probs[True].mean() > log_probs[False].mean()
    # and the policy's log-probability (LoRA still zero) equals the reference's: the ratio starts at exactly 1
    out = spo.spo_step_loss(sd15.parts.unet, models.adapters_disabled(sd15.parts.unet), sd15.scheduler, pairs,
                            sd15.guide, eta=1.0, train_cfg=True, beta=10.0, clip=0.1)
    assert out.metrics["log_ratio_w"] == 0 and out.metrics["clip_frac"] == 0
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_mspo_rolls_candidate_chains_and_trains_on_every_step(tiny_sdxl, spm_dir):
    sampler = Sampler(tiny_sdxl, spm_dir)
    pairs, branches = sampler.collect(threshold=0.0, k=2, inner=1)
    # 501 branches, its chains roll through 251 and are scored at 1; the last step of this scheduler is
    # deterministic (set_alpha_to_one): no branch there
    assert [(b.timestep, b.score_timestep) for b in branches] == [(501, 1)]
    kept = int(branches[0].keep.sum())
    assert kept >= 2 and pairs.timesteps.tolist() == [501] * kept + [251] * kept
    assert pairs.pooled.shape == (2 * kept, 32) and pairs.hidden.shape == (2 * kept, 77, 64)
    first, inner = pairs.select(torch.arange(kept)), pairs.select(torch.arange(kept, 2 * kept))
    torch.testing.assert_close(first.x_t[:, 0], first.x_t[:, 1], rtol=0, atol=0)  # the branch: a shared x_t
    torch.testing.assert_close(inner.x_t, first.x_prev, rtol=0, atol=0)  # the inner step continues each chain
    assert bool((inner.x_t[:, 0] != inner.x_t[:, 1]).any())  # so winner and loser no longer share x_t


# ----------------------------------------------------------------------------------------------------------------
# The trainer, end to end
# ----------------------------------------------------------------------------------------------------------------


def spo_argv(model, spm, dataset, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--spm_model_name_or_path", spm, "--dataset_name", dataset,
            "--output_dir", str(out), "--num_inference_steps", "4", "--sample_batch_size", "2", "--train_batch_size",
            "3", "--max_train_samples", "4", "--num_epochs", "1", "--learning_rate", "1e-3", "--report_to", "none",
            "--gradient_accumulation_steps", "1", *extra]


def lora_ups(unet, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if f"lora_B.{adapter}" in n}


def assert_base_unchanged_and_lora_trained(unet, model_dir):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
    for name, param in unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), base[name.replace(".base_layer", "")]), name
    assert all(p.abs().max() > 0 for p in lora_ups(unet).values())
    assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)


def assert_lora_loads_and_changes_output(family, model_dir, lora_dir):
    pipe = models.pipeline_class(family).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    sample = lambda: pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa
                          generator=torch.Generator().manual_seed(0)).images
    before = sample()
    pipe.load_lora_weights(str(lora_dir))
    assert np.abs(sample() - before).max() > 1e-6


def test_spo_trains_and_saves_a_loadable_lora(tiny_sd15, spm_dir, pickapic_parquet, tmp_path):
    summary = spo.main(spo_argv(tiny_sd15, spm_dir, pickapic_parquet, tmp_path, "--threshold", "0"))
    # 2 prompt batches x 2 prompts x 3 branching steps, every pair kept; 6 tuples per batch = 2 steps of 3
    assert [c["tuples"] for c in summary["collects"]] == [6, 6] and summary["global_step"] == 4
    assert all(c["kept_fraction"] == 1 for c in summary["collects"])
    first = summary["history"][0]  # policy == reference before the first update: ratio 1, loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["clip_frac"] == 0
    assert summary["history"][-1]["log_ratio_w"] != 0
    assert_base_unchanged_and_lora_trained(summary["unet"], tiny_sd15)
    assert_lora_loads_and_changes_output("sd15", tiny_sd15, tmp_path)
    assert (tmp_path / "checkpoint-4" / models.LORA_WEIGHT_NAME).is_file()


def test_spo_with_a_huge_threshold_does_not_update(tiny_sd15, spm_dir, pickapic_parquet, tmp_path, caplog):
    from safetensors.torch import load_file

    with caplog.at_level(logging.WARNING, logger="full.trainers.spo"):
        summary = spo.main(spo_argv(tiny_sd15, spm_dir, pickapic_parquet, tmp_path, "--threshold", "0.99"))
    assert summary["global_step"] == 0 and all(c["kept_pairs"] == 0 for c in summary["collects"])
    assert "no SPO pair passed --threshold 0.99" in caplog.text
    saved = load_file(str(tmp_path / models.LORA_WEIGHT_NAME))
    ups = [v for k, v in saved.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(bool((v == 0).all()) for v in ups)  # the zero-initialised up-projections never moved


def test_spo_sdxl_mspo_end_to_end(tiny_sdxl, spm_dir, pickapic_parquet, tmp_path):
    summary = spo.main(spo_argv(tiny_sdxl, spm_dir, pickapic_parquet, tmp_path, "--threshold", "0",
                                "--mspo_inner_steps", "1", "--train_batch_size", "4"))
    assert summary["family"] == "sdxl"
    assert all(c["tuples"] == 2 * c["kept_pairs"] > 0 for c in summary["collects"])  # branch step + inner step
    assert summary["global_step"] == 2
    assert_base_unchanged_and_lora_trained(summary["unet"], tiny_sdxl)
    assert_lora_loads_and_changes_output("sdxl", tiny_sdxl, tmp_path)


def test_spo_resumes_to_the_same_weights(tiny_sd15, spm_dir, pickapic_parquet, tmp_path):
    """Checkpoints are taken between phases; a run resumed from one ends with the uninterrupted run's LoRA."""
    from safetensors.torch import load_file

    extra = ("--threshold", "0", "--checkpointing_steps", "2", "--train_batch_size", "6")
    full = spo.main(spo_argv(tiny_sd15, spm_dir, pickapic_parquet, tmp_path / "a", *extra))
    assert full["global_step"] == 2
    half = spo.main(spo_argv(tiny_sd15, spm_dir, pickapic_parquet, tmp_path / "b", *extra, "--max_train_steps", "1"))
    assert half["global_step"] == 1
    resumed = spo.main(spo_argv(tiny_sd15, spm_dir, pickapic_parquet, tmp_path / "b", *extra,
                                "--resume_from_checkpoint", "latest"))
    assert resumed["global_step"] == 2 and len(resumed["collects"]) == 1  # only the second prompt batch was left
    a, b = (load_file(str(tmp_path / d / models.LORA_WEIGHT_NAME)) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# Flags and prompts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "1.5"], "--threshold must be in [0, 1)"),
    (["--num_candidates", "1"], "--num_candidates must be at least 2"),
    (["--eta", "0"], "--eta must be in (0, 1]"),
    (["--clip", "1"], "--clip must be in (0, 1)"),
    (["--prompts_file", "p.txt"], "exactly one of --prompts_file and --dataset_name"),
    (["--preset", "sd15-dpo"], "is for --method dpo"),
    (["--lr_scheduler", "cosine"], "needs --max_train_steps"),
])
def test_bad_flags_are_rejected_with_a_message(extra, message, capsys):
    with pytest.raises(SystemExit):
        spo.parse_args(spo_argv("m", "s", "d.parquet", "out", *extra))
    assert message in capsys.readouterr().err


def test_presets_and_family_defaults():
    minimal = ["--pretrained_model_name_or_path", "m", "--spm_model_name_or_path", "s", "--output_dir", "o",
               "--dataset_name", "d"]
    args = spo.parse_args(minimal + ["--preset", "sdxl-spo", "--threshold", "0.5"])  # a flag given wins
    assert (args.rank, args.learning_rate, args.train_batch_size, args.gradient_accumulation_steps,
            args.num_candidates, args.threshold, args.num_inner_steps) == (64, 1e-5, 2, 2, 2, 0.5, 3)
    args = spo.parse_args(minimal)
    spo.resolve_family_defaults(args, "sd15")  # nothing given: the paper's SD1.5 values
    assert (args.rank, args.learning_rate, args.num_candidates, args.threshold, args.num_inner_steps) == \
        (4, 6e-5, 4, 0.3, 0)


def test_prompts_from_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"caption": "a cat"}, {"caption": "a dog"}, {"caption": "a cat"}]))
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    for name in ("p.json", "p.txt"):
        args = spo.parse_args(["--pretrained_model_name_or_path", "m", "--spm_model_name_or_path", "s",
                               "--output_dir", "o", "--prompts_file", str(tmp_path / name)])
        assert spo.load_prompts(args) == ["a cat", "a dog"]
    args.prompts_file = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="does not exist"):
        spo.load_prompts(args)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_step_alphas_equal_the_authors_clamp_unless_set_alpha_to_one(set_alpha_to_one):
    """Issue 12 point 9: the SPO authors clamp the previous timestep at 0 (alphas_cumprod[0]); `step_alphas` keeps
    diffusers' final_alpha_cumprod. With SD1.5's / SDXL-base's `set_alpha_to_one: false` every step agrees; with
    true only the last one differs, and there diffusers' step is deterministic."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    scheduler.set_timesteps(20)
    timesteps = scheduler.timesteps.long()
    abar_t, abar_prev = spo_sampler.step_alphas(scheduler, timesteps)
    prev = (timesteps - 1000 // 20).clamp(min=0)
    authors = scheduler.alphas_cumprod.float()[prev]  # ddim_with_logprob.py: prev_timestep clamped to [0, 999]
    torch.testing.assert_close(abar_t, scheduler.alphas_cumprod.float()[timesteps], rtol=0, atol=0)
    if not set_alpha_to_one:
        torch.testing.assert_close(abar_prev, authors, rtol=0, atol=0)
    else:
        torch.testing.assert_close(abar_prev[:-1], authors[:-1], rtol=0, atol=0)
        assert abar_prev[-1].item() == 1.0 != authors[-1].item()
        _, std = minipref.ddim_step_gaussian(torch.zeros(1, 4), torch.zeros(1, 4), abar_t[-1:], abar_prev[-1:])
        assert float(std.max()) == 0  # the deterministic last step: nothing to score
