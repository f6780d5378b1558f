"""full/evaluate.py, full/scorers.py and full/eval_plots.py on tiny offline models.

The scorers are checked against transformers' own `CLIPModel.forward` (which computes
`logit_scale.exp() * cos` and the normalised image embeddings independently of our code); the CLI runs
generate -> score -> report on a tiny SD1.5 pipeline with one random LoRA; FID is checked against the
closed-form Frechet distance and its unavailable path against a missing package."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from full import evaluate
from full.eval import evaluate as evaluate_library
from full.eval import scorers

PROMPTS = ["a photo of a cat", "a red car on a road", "a bowl of fruit", "a city skyline at night"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box (or under xdist) the
    extra threads only contend: one thread runs this module about twice as fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_reference(tiny_clip):
    """transformers' own forward pass on the tiny CLIP: logits_per_image and normalised image embeddings."""
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    images = _images(len(PROMPTS))
    with torch.no_grad():
        out = model(**processor(text=PROMPTS, images=images, padding=True, return_tensors="pt"))
    return {"images": images, "logits": out.logits_per_image.diagonal(), "image_embeds": out.image_embeds,
            "scale": model.logit_scale.exp().item(), "model": model, "processor": processor}


@pytest.fixture(scope="module")
def lora_dir(tiny_sd15, tmp_path_factory):
    """A random rank-4 LoRA on the tiny UNet, saved by the trainers' own `full.models.save_lora`."""
    from diffusers import UNet2DConditionModel

    from full import models

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    torch.manual_seed(1)
    models.add_lora(unet, rank=4)
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B = 0 (a no-op adapter); make it change the images
            param.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("lora")
    models.save_lora("sd15", unet, path)
    return str(path)


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    torch.manual_seed(0)
    head = scorers.AestheticMLP(input_size=32)  # the tiny CLIP's projection_dim
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(head.state_dict(), path)
    return str(path), head.eval()


# ----------------------------------------------------------------------------------------------
# Scorers


def test_pickscore_is_logit_scale_times_cosine(tiny_clip, clip_reference):
    pick = scorers.PickScore(model=tiny_clip, device="cpu")
    values = pick.score(clip_reference["images"], PROMPTS)
    np.testing.assert_allclose(values, clip_reference["logits"].numpy(), rtol=1e-4, atol=1e-5)


def test_clip_score_is_100_cosine_clipped_at_zero_per_image(tiny_clip, clip_reference):
    clip = scorers.ClipScore(model=tiny_clip, device="cpu")
    cosine = clip_reference["logits"].numpy() / clip_reference["scale"]
    values = np.array(clip.score(clip_reference["images"], PROMPTS))
    np.testing.assert_allclose(values, np.maximum(100 * cosine, 0), rtol=1e-4, atol=1e-4)
    # Flip the sign of every text embedding: the images clamped to 0 above now score 100|cos| and vice versa,
    # so the two runs add up to 100|cos| image by image (the clamp is per image, at zero).
    clip.clip.model.text_projection.weight.data.neg_()
    flipped = np.array(clip.score(clip_reference["images"], PROMPTS))
    np.testing.assert_allclose(values + flipped, 100 * np.abs(cosine), rtol=1e-4, atol=1e-4)
    assert (values == 0).any() or (flipped == 0).any()


def test_clip_score_agrees_with_torchmetrics(tiny_clip, clip_reference):
    functional = pytest.importorskip("torchmetrics.functional.multimodal")

    class TensorFeatures(torch.nn.Module):  # torchmetrics 1.9 expects transformers-4 tensors back
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return scorers._projected(self.model.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return scorers._projected(self.model.get_text_features(*a, **k))

    ours = scorers.ClipScore(model=tiny_clip, device="cpu")
    ours.clip.model.text_projection.weight.data.neg_()  # make at least some scores positive (see above)
    shim = TensorFeatures(ours.clip.model)
    for image, prompt in zip(clip_reference["images"], PROMPTS):
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        theirs = functional.clip_score(pixels, prompt, lambda: (shim, clip_reference["processor"]))
        assert ours.score([image], [prompt])[0] == pytest.approx(float(theirs.detach()), abs=1e-3)


def test_aesthetic_is_mlp_on_normalised_clip_image_embeddings(tiny_clip, clip_reference, aesthetic_head, tmp_path):
    path, head = aesthetic_head
    with torch.no_grad():
        expected = head(clip_reference["image_embeds"]).numpy()  # CLIPModel.forward normalises image_embeds
    for head_file in (path, str(tmp_path / "head.safetensors")):
        if head_file.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(head.state_dict(), head_file)
        aesthetic = scorers.AestheticScore(head=head_file, clip_model=tiny_clip, device="cpu")
        values = aesthetic.score(clip_reference["images"], PROMPTS)
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)


def test_aesthetic_rejects_wrong_heads(tiny_clip, tmp_path):
    torch.save(scorers.AestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="768-d"):
        scorers.AestheticScore(head=str(tmp_path / "l14.pth"), clip_model=tiny_clip, device="cpu")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor head"):
        scorers.load_aesthetic_head(str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="needs its head weights"):
        scorers.AestheticScore(head=None, clip_model=tiny_clip)
    with pytest.raises(ValueError, match="is not a file"):
        scorers.load_aesthetic_head(str(tmp_path / "missing.pth"))


def test_registry_and_optional_scorers(monkeypatch, tiny_clip):
    with pytest.raises(ValueError, match="pickscore, clip, aesthetic, hpsv2, imagereward"):
        scorers.build_scorer("hps")
    monkeypatch.setitem(sys.modules, "hpsv2", None)  # import hpsv2 -> ImportError, installed or not
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(scorers.ScorerUnavailable, match="pip install hpsv2"):
        scorers.build_scorer("hpsv2")
    with pytest.raises(scorers.ScorerUnavailable, match="pip install image-reward"):
        scorers.build_scorer("imagereward")
    pick = scorers.build_scorer("pickscore", model=tiny_clip, device="cpu")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        pick.score(_images(2), ["a cat"])
    with pytest.raises(ValueError, match="could not load CLIP model"):
        scorers.build_scorer("clip", model="/nonexistent/clip")


# ----------------------------------------------------------------------------------------------
# FID


class PooledPixels(torch.nn.Module):
    """A deterministic stand-in feature extractor: uint8 (B, 3, H, W) -> (B, 12) mean colours of 4 quadrants."""

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


def test_fid_matches_the_closed_form_frechet_distance(tmp_path):
    pytest.importorskip("torchmetrics")
    from scipy import linalg

    generated, reference = _images(24, 32, seed=1), [im.point(lambda v: v // 2) for im in _images(30, 32, seed=2)]
    result = scorers.frechet_inception_distance(generated, reference, feature=PooledPixels(), device="cpu")

    def features(images):
        return PooledPixels()(torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images]))

    f_gen, f_ref = features(generated).double().numpy(), features(reference).double().numpy()
    mu_g, mu_r = f_gen.mean(0), f_ref.mean(0)
    cov_g, cov_r = np.cov(f_gen, rowvar=False), np.cov(f_ref, rowvar=False)
    expected = ((mu_g - mu_r) ** 2).sum() + np.trace(cov_g + cov_r - 2 * linalg.sqrtm(cov_g @ cov_r).real)
    assert result["fid"] == pytest.approx(expected, rel=1e-3)
    assert expected > 0.1
    same = scorers.frechet_inception_distance(generated, generated, feature=PooledPixels(), device="cpu")
    assert same["fid"] == pytest.approx(0.0, abs=1e-4)
    paths = []  # files on disk (what the CLI passes) give the same number as images in memory
    for i, image in enumerate(generated):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    from_files = scorers.frechet_inception_distance(paths, reference, feature=PooledPixels(), device="cpu")
    assert from_files["fid"] == pytest.approx(result["fid"], rel=1e-6)


def test_fid_unavailable_is_reported_not_raised(monkeypatch):
    with pytest.raises(ValueError, match="at least 2"):
        scorers.frechet_inception_distance(_images(1), _images(2))
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    result = scorers.frechet_inception_distance(_images(2), _images(2, seed=1))
    assert result["fid"] is None and "torchmetrics is not installed" in result["unavailable"]
    monkeypatch.delitem(sys.modules, "torchmetrics.image.fid")
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    def offline(*args, **kwargs):  # what building InceptionV3 does without the network
        raise OSError("could not download pt_inception-2015-12-05-6726825d.pth")

    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", offline)
    result = scorers.frechet_inception_distance(_images(2), _images(2, seed=1))
    assert result["fid"] is None and "could not download pt_inception" in result["unavailable"]


# ----------------------------------------------------------------------------------------------
# Prompt sets and model specs


def test_shipped_paper000_prompts():
    prompts = evaluate.load_prompts("paper000")
    assert [pid for pid, _ in prompts] == ["A1", "A2", "A3", "A4", "A5", "B1", "B2", "B3", "B4", "B5"]
    assert prompts[0][1] == "A photo of a cat with blue eyes"
    assert prompts[-1][1] == "A cyberpunk digital art of a city skyline at sunset, neon colors, volumetric lighting"
    assert evaluate.load_prompts("paper000_appendix", limit=3) == prompts[:3]


def test_prompt_files(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\nx7\ta dog\n")
    assert evaluate.load_prompts(str(tmp_path / "p.txt")) == [("0000", "a cat"), ("x7", "a dog")]
    (tmp_path / "p.csv").write_text("id,caption,other\n10,a cat,1\n11,a dog,2\n")
    assert evaluate.load_prompts(str(tmp_path / "p.csv")) == [("10", "a cat"), ("11", "a dog")]
    (tmp_path / "p.json").write_text(json.dumps(["a cat", "a dog"]))
    assert evaluate.load_prompts(str(tmp_path / "p.json")) == [("0000", "a cat"), ("0001", "a dog")]
    (tmp_path / "d.json").write_text(json.dumps({"k1": "a cat"}))
    assert evaluate.load_prompts(str(tmp_path / "d.json")) == [("k1", "a cat")]
    (tmp_path / "p.jsonl").write_text('{"text": "a cat"}\n{"text": "a dog"}\n')
    assert evaluate.load_prompts(str(tmp_path / "p.jsonl"), limit=1) == [("0000", "a cat")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"Prompt": ["a cat"], "jpg": [b"\xff"]}), tmp_path / "p.parquet")
    assert evaluate.load_prompts(str(tmp_path / "p.parquet")) == [("0000", "a cat")]
    with pytest.raises(ValueError, match=r"no prompt column 'desc' \(columns: \['Prompt', 'jpg'\]\)"):
        evaluate.load_prompts(str(tmp_path / "p.parquet"), column="desc")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts found"):
        evaluate.load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "dup.txt").write_text("a\tx\na\ty\n")
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        evaluate.load_prompts(str(tmp_path / "dup.txt"))
    with pytest.raises(ValueError, match="neither a file nor a shipped set"):
        evaluate.load_prompts(str(tmp_path / "missing.txt"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        evaluate.load_prompts("hf:yuvalkirstain/pickapic_v2:test_unique", column="caption")


def test_parse_models(tmp_path):
    (tmp_path / "kto").mkdir()
    models = evaluate.parse_models([str(tmp_path / "kto"), f"dpo={tmp_path / 'kto'}"], "sd15")
    assert [(m.name, m.lora is None) for m in models] == [("sd15", True), ("kto", False), ("dpo", False)]
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.parse_models([f"x={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="unique"):
        evaluate.parse_models([f"base={tmp_path / 'kto'}"])
    with pytest.raises(ValueError, match="may only contain"):
        evaluate.parse_models([f"a b={tmp_path / 'kto'}"])


# ----------------------------------------------------------------------------------------------
# The CLI end to end: generate -> score -> report, then resume.


def _png_ok(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    return path.stat().st_size > 1000 and pixels.std() > 1.0  # written, and not a blank canvas


def test_cli_end_to_end(tmp_path, tiny_sd15, tiny_clip, lora_dir, aesthetic_head, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hpsv2", None)
    out = tmp_path / "eval"
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(_images(3, 32, seed=5)):
        image.save(reference / f"{i}.png")
    generation = ["--base-model", tiny_sd15, "--prompts", "paper000", "--max-prompts", "2", "--seeds", "2",
                  "--steps", "2", "--batch-size", "3", "--device", "cpu"]
    with_lora = ["--out", str(out), "--lora", f"lora={lora_dir}", *generation]
    summary = evaluate.main([
        *with_lora, "--scorers", "pickscore,clip,aesthetic,hpsv2", "--pickscore-model", tiny_clip,
        "--clip-model", tiny_clip, "--aesthetic-clip-model", tiny_clip, "--aesthetic-head", aesthetic_head[0],
        "--bootstrap", "500", "--fid-reference", str(reference)])

    manifest = evaluate.read_jsonl(out / "manifest.jsonl")
    assert len(manifest) == 2 * 2 * 2  # models x prompts x seeds
    assert {(r["model"], r["prompt_id"], r["seed"]) for r in manifest} == {
        (m, p, s) for m in ("base", "lora") for p in ("A1", "A2") for s in (0, 1)}
    row = manifest[0]
    assert (row["scheduler"], row["steps"], row["guidance"], row["height"], row["width"]) == ("PNDMScheduler", 2, 7.5, 32, 32)
    assert row["prompt"] == "A photo of a cat with blue eyes" and row["lora"] is None
    pixels = {(r["model"], r["prompt_id"], r["seed"]): np.asarray(Image.open(out / r["path"]), dtype=int) for r in manifest}
    assert all(p.shape == (32, 32, 3) for p in pixels.values())
    assert np.abs(pixels["base", "A1", 0] - pixels["lora", "A1", 0]).max() > 10  # the LoRA was applied
    assert np.abs(pixels["base", "A1", 0] - pixels["base", "A1", 1]).max() > 10  # seeds differ

    scores = evaluate.read_jsonl(out / "scores.jsonl")
    assert len(scores) == 8 * 3 and {r["scorer"] for r in scores} == {"pickscore", "clip", "aesthetic"}
    assert "pip install hpsv2" in summary["skipped_scorers"]["hpsv2"]
    results = json.loads((out / "results.json").read_text())
    (comparison,) = results["win_rates"]["pickscore"]
    assert (comparison["model"], comparison["baseline"], comparison["n_prompts"]) == ("lora", "base", 2)
    assert results["means"]["clip"]["base"]["n_images"] == 4
    assert set(results["fid"]["models"]) == {"base", "lora"}
    for entry in results["fid"]["models"].values():  # no InceptionV3 weights offline: said, not faked
        assert entry["fid"] is not None or entry["unavailable"]
    markdown = (out / "results.md").read_text()
    assert "| lora vs. base |" in markdown and "Skipped scorer hpsv2" in markdown and "FID against" in markdown
    for name in ("means", "distributions", "win_rates"):
        assert _png_ok(out / "plots" / f"{name}.png")
    assert _png_ok(out / "grids" / "A1.png") and _png_ok(out / "grids" / "A2.png")

    # Resume: nothing is regenerated, the manifest is unchanged.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    capsys.readouterr()
    evaluate.main([*with_lora, "--stages", "generate"])
    assert "generated 0 new image(s)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(evaluate.read_jsonl(out / "manifest.jsonl")) == 8
    # ... and a resumed run with other settings is refused instead of mixing two samplers.
    with pytest.raises(SystemExit, match="steps=2.*steps=3"):
        evaluate.main([*with_lora, "--stages", "generate", "--steps", "3"])

    # ... or with the same prompt id meaning another prompt.
    (tmp_path / "other.txt").write_text("A1\ta different prompt\n")
    with pytest.raises(SystemExit, match="prompt id 'A1'"):
        evaluate.main([*with_lora, "--stages", "generate", "--prompts", str(tmp_path / "other.txt")])
    # A scorer that misses some images would give medians over fewer seeds: the report refuses.
    scores_path = out / "scores.jsonl"
    scores_path.write_text("".join(line + "\n" for line in scores_path.read_text().splitlines()[1:]))
    with pytest.raises(SystemExit, match="has no score for 1 image"):
        evaluate.main(["--out", str(out), "--stages", "report"])

    # Reproducible image by image: batch size 1 draws the same base images as batch size 3 did.
    out_b1 = tmp_path / "batch1"
    evaluate.main(["--out", str(out_b1), *generation, "--stages", "generate", "--batch-size", "1"])
    for r in evaluate.read_jsonl(out_b1 / "manifest.jsonl"):
        again = np.asarray(Image.open(out_b1 / r["path"]), dtype=int)
        assert np.abs(again - pixels[r["model"], r["prompt_id"], r["seed"]]).max() <= 2  # float round-off only


def test_cli_rejects_bad_input(tmp_path, tiny_sd15):
    with pytest.raises(SystemExit, match="needs --base-model"):
        evaluate.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown scorer 'hps'"):
        evaluate.main(["--out", str(tmp_path), "--stages", "score", "--scorers", "hps"])
    with pytest.raises(SystemExit, match="manifest.jsonl is empty or missing"):
        evaluate.main(["--out", str(tmp_path), "--stages", "score", "--scorers", "clip"])
    with pytest.raises(SystemExit, match="incompatible scheduler 'FooScheduler'.*DDIMScheduler"):
        evaluate.main(["--out", str(tmp_path), "--base-model", tiny_sd15, "--scheduler", "FooScheduler"])
    with pytest.raises(SystemExit, match="LoRA 'x'"):
        evaluate.main(["--out", str(tmp_path), "--base-model", tiny_sd15, "--lora", f"x={tmp_path / 'none'}"])


# ----------------------------------------------------------------------------------------------
# Across processes, and scorers first.


class _SeededPipe:
    """A stand-in pipeline: image = a function of its generator only (as a real pipeline with per-image seeds)."""

    def __call__(self, prompt, generator, **_):
        images = []
        for g in generator:
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            images.append(Image.fromarray(pixels))
        return type("Result", (), {"images": images, "nsfw_content_detected": None})()


def test_processes_split_the_images_and_make_those_of_one_process(tmp_path):
    """`accelerate launch -m full.evaluate`: process p of P takes every P-th missing image; the merged manifest and
    the images equal one process's, and a killed process's part is picked up by the next run."""
    models = evaluate.parse_models([], "base")
    prompts = [("p0", "a cat"), ("p1", "a dog"), ("p2", "a fox")]
    settings = {"base_model": "m", "scheduler": "S", "steps": 1, "guidance": 1.0, "height": 8, "width": 8,
                "negative_prompt": None, "dtype": "float32"}
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        out.mkdir()
    assert evaluate.generate(_SeededPipe(), models, prompts, [0, 1], one, settings=settings, batch_size=2) == 6
    made = [evaluate.generate(_SeededPipe(), models, prompts, [0, 1], two, settings=settings, batch_size=3,
                              process_index=p, num_processes=2) for p in (1, 0)]
    assert made == [3, 3] and len(list(two.glob("manifest.part-*.jsonl"))) == 2
    assert len(evaluate.read_manifest(two)) == 6  # parts count before the merge (a resumed run skips them)
    assert evaluate.generate(_SeededPipe(), models, prompts, [0, 1], two, settings=settings) == 0
    evaluate.merge_manifest_parts(two)
    assert not list(two.glob("manifest.part-*.jsonl"))
    key = lambda r: (r["prompt_id"], r["seed"])  # noqa: E731
    rows_one, rows_two = sorted(evaluate.read_manifest(one), key=key), sorted(evaluate.read_manifest(two), key=key)
    assert [key(r) for r in rows_one] == [key(r) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        assert np.array_equal(np.asarray(Image.open(one / a["path"])), np.asarray(Image.open(two / b["path"])))


def test_a_scorer_that_cannot_load_stops_before_generation(tmp_path, tiny_sd15):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match="scorer pickscore cannot be loaded.*nothing was generated"):
        evaluate.main(["--out", str(out), "--base-model", tiny_sd15, "--prompts", "paper000", "--max-prompts", "1",
                       "--seeds", "1", "--steps", "1", "--device", "cpu", "--scorers", "pickscore",
                       "--pickscore-model", str(tmp_path / "no_such_model")])
    assert not (out / "manifest.jsonl").exists() and not (out / "images").exists()


# ---------------------------------------------------------------------------- your own reward: module.path:ClassName


class Brightness:
    """A user's reward, as a user would write it: keyword options only and score(images, prompts)."""

    def __init__(self, channel: int = 0):
        self.channel = channel

    def score(self, images, prompts):
        return [float(np.asarray(image, dtype=float)[..., self.channel].mean()) for image in images]


class NotAScorer:
    pass


def test_a_scorer_named_module_colon_class_scores_like_a_builtin(tmp_path):
    name = f"{__name__}:Brightness"
    scorer = scorers.build_scorer(name)
    images = [Image.new("RGB", (8, 8), (10, 0, 0)), Image.new("RGB", (8, 8), (200, 0, 0))]
    assert scorer.score(images, ["a", "b"]) == [10.0, 200.0]
    # Through full.evaluate's score and report stages, on a manifest of two "models".
    rows = []
    for model, red in (("base", 10), ("tuned", 200)):
        for prompt_id in ("p0", "p1", "p2"):
            path = f"{model}_{prompt_id}.png"
            Image.new("RGB", (8, 8), (red, 0, 0)).save(tmp_path / path)
            rows.append({"model": model, "prompt_id": prompt_id, "prompt": "x", "seed": 0, "path": path})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate.score_manifest(tmp_path, [name], {})
    scored = evaluate.read_jsonl(tmp_path / "scores.jsonl")
    assert {(r["model"], r["score"]) for r in scored} == {("base", 10.0), ("tuned", 200.0)}
    assert all(r["scorer"] == name for r in scored)


@pytest.mark.parametrize("name,message", [
    ("no_such_module_xyz:Reward", "cannot import module 'no_such_module_xyz'"),
    (f"{__name__}:NoSuchReward", "has no class or function 'NoSuchReward'"),
    (f"{__name__}:NotAScorer", None),
    ("hps", "unknown scorer 'hps'; valid scorers: pickscore"),
])
def test_a_bad_scorer_name_is_one_clear_error_before_anything_is_generated(name, message, tmp_path):
    if message is None:  # importable and callable, but what it builds has no score(): refused when built
        with pytest.raises(ValueError, match="has no score"):
            scorers.build_scorer(name)
        return
    with pytest.raises(ValueError, match=message):
        scorers.scorer_factory(name)
    with pytest.raises(SystemExit, match="scorer"):  # the CLI stops with one line, no manifest needed
        evaluate.main(["--out", str(tmp_path), "--stages", "score", "--scorers", name])


@pytest.mark.xdist_group("two_processes")
def test_two_processes_generate_and_score_what_one_process_does(tiny_sd15, tiny_clip, two_process_jobs, tmp_path):
    """`full.evaluate` launched as 2 processes (gloo, CPU; tests/two_processes.py): each generates 2 of the 4 images
    and scores 2, and the images equal a 1-process run's pixel for pixel (batch size 1 in both: the same
    computation); the CLIP scores agree to float32 round-off (rel 1e-5)."""
    from tests.two_processes import evaluate_argv

    out, result = two_process_jobs
    two = out / "eval"
    for p in (0, 1):
        assert f"process {p}: generated 2 new image(s)" in result.stdout, result.stdout[-2000:]
        assert f"process {p}: scored 2 image(s)" in result.stdout, result.stdout[-2000:]
    assert not list(two.glob("*.part-*.jsonl"))  # manifest and score parts merged
    one = tmp_path / "one"
    evaluate.main([*evaluate_argv(tiny_sd15, tiny_clip, one), "--device", "cpu"])
    key = lambda r: (r["model"], r["prompt_id"], r["seed"])  # noqa: E731
    rows_one = sorted(evaluate.read_manifest(one), key=key)
    rows_two = sorted(evaluate.read_manifest(two), key=key)
    assert [key(r) for r in rows_one] == [key(r) for r in rows_two] and len(rows_one) == 4
    for a, b in zip(rows_one, rows_two):
        assert np.array_equal(np.asarray(Image.open(one / a["path"])), np.asarray(Image.open(two / b["path"])))
    scores_one = {key(r): r["score"] for r in evaluate.read_jsonl(one / "scores.jsonl")}
    scores_two = {key(r): r["score"] for r in evaluate.read_jsonl(two / "scores.jsonl")}
    assert scores_two.keys() == scores_one.keys() and len(scores_one) == 4
    assert all(scores_two[k] == pytest.approx(scores_one[k], rel=1e-5) for k in scores_one)
    assert json.loads((two / "results.json").read_text())["means"]["clip"]["base"]["n_images"] == 4


# ---------------------------------------------------------------------------- stale images and bad input, found early


def _copy_lora(source_dir, target_dir, change=lambda key, tensor: tensor):
    """The LoRA of `source_dir` written to `target_dir` (same file name, same header metadata), each tensor passed
    through `change(key, tensor)`."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    name = "pytorch_lora_weights.safetensors"
    with safe_open(str(Path(source_dir) / name), framework="pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    save_file({key: change(key, tensor).contiguous() for key, tensor in tensors.items()}, str(Path(target_dir) / name),
              metadata=metadata)
    return str(target_dir)


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, tmp_path_factory):
    """A LoRA of the tiny SDXL UNet (cross-attention width 64; the tiny SD1.5 has 32): another model family."""
    from diffusers import UNet2DConditionModel

    from full import models

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    models.add_lora(unet, rank=4)
    path = tmp_path_factory.mktemp("sdxl_lora")
    models.save_lora("sdxl", unet, path)
    return str(path)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load fails the test: what it checks must be found before the base model or a scorer loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(evaluate_library, "load_pipeline", refuse)  # where run() looks it up
    monkeypatch.setattr(scorers, "build_scorer", refuse)


def _console(monkeypatch, argv):
    """`minipref-evaluate ARGV` as the console script runs it: its exit status."""
    import importlib

    monkeypatch.setattr(sys, "argv", ["minipref-evaluate", *argv])
    try:
        return importlib.import_module("full.evaluate").console()
    except SystemExit as stop:  # argparse's own errors exit from inside
        return stop.code


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0]


def test_a_lora_retrained_in_place_is_drawn_and_scored_again(tmp_path, tiny_sd15, tiny_clip, lora_dir, capsys):
    """The manifest knows a LoRA by its weights (sha256), not by its folder: new weights at the same path give new
    images and new scores; the base model's images stay. A base model re-saved in place is drawn again too."""
    import os
    import shutil

    base, lora, out = tmp_path / "base", tmp_path / "lora", tmp_path / "eval"
    shutil.copytree(tiny_sd15, base)
    _copy_lora(lora_dir, lora)
    argv = ["--out", str(out), "--base-model", str(base), "--lora", f"tuned={lora}", "--prompts", "paper000",
            "--max-prompts", "2", "--seeds", "1", "--steps", "2", "--device", "cpu", "--scorers", "pickscore",
            "--pickscore-model", tiny_clip, "--bootstrap", "100", "--grid-prompts", "0"]

    def images_and_scores():
        manifest = evaluate.read_manifest(out)
        images = {(r["model"], r["prompt_id"]): np.asarray(Image.open(out / r["path"]), dtype=int) for r in manifest}
        scores = {(r["model"], r["prompt_id"]): r["score"] for r in evaluate.read_jsonl(out / "scores.jsonl")}
        return images, scores, {r["model"]: r.get("lora_sha256") for r in manifest}

    evaluate.main(argv)
    images, scores, sha = images_and_scores()
    assert "generated 4 new image(s)" in capsys.readouterr().out
    _copy_lora(lora, lora, lambda key, tensor: -tensor if ".up." in key else tensor)  # retrained, same folder
    evaluate.main(argv)
    assert "generated 2 new image(s)" in capsys.readouterr().out  # the LoRA's; the base model's are kept
    new_images, new_scores, new_sha = images_and_scores()
    assert new_sha["tuned"] != sha["tuned"] and new_sha["base"] is None
    for pid in ("A1", "A2"):
        assert np.abs(new_images["tuned", pid] - images["tuned", pid]).max() > 10
        assert np.array_equal(new_images["base", pid], images["base", pid])
        assert new_scores["tuned", pid] != pytest.approx(scores["tuned", pid], abs=1e-4)
        assert new_scores["base", pid] == pytest.approx(scores["base", pid], abs=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["generation"]["models"]["tuned"]["lora_sha256"] == new_sha["tuned"]

    evaluate.main([*argv, "--stages", "generate"])  # unchanged weights: nothing to draw
    assert "generated 0 new image(s)" in capsys.readouterr().out
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # re-saved, same bytes
    evaluate.main([*argv, "--stages", "generate"])
    assert "generated 0 new image(s)" in capsys.readouterr().out  # keyed by content, not by the file's date
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(weights))  # the base retrained in place
    evaluate.main([*argv, "--stages", "generate"])
    assert "generated 4 new image(s)" in capsys.readouterr().out


def test_a_bad_lora_is_one_line_before_anything_loads(tmp_path, tiny_sd15, sdxl_lora, nothing_loads, monkeypatch,
                                                       capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no weights here\n")
    cases = {"missing/dir": "LoRA 'x': 'missing/dir' is not a local folder",  # a Hub id: offline in the tests
             str(tmp_path / "runs" / "dpo"): "does not exist",
             str(tmp_path / "empty"): "holds no LoRA weights",
             sdxl_lora: f"cross-attention width 64, but the base model '{tiny_sd15}' has 32"}
    for lora, needle in cases.items():
        out = tmp_path / "eval"
        assert _console(monkeypatch, ["--out", str(out), "--base-model", tiny_sd15, "--lora", f"x={lora}",
                                      "--steps", "1", "--seeds", "1", "--max-prompts", "1", "--device", "cpu"]) == 2
        line = _one_error_line(capsys)
        assert "LoRA 'x'" in line and needle in line, line
        assert not (out / "manifest.jsonl").exists() and not (out / "images").exists()


def test_a_lora_that_fails_to_load_names_itself_and_the_base_before_any_image(tmp_path, tiny_sd15, lora_dir,
                                                                              monkeypatch, capsys):
    """A mismatch the header check does not see (here a self-attention matrix of the wrong width) fails the trial
    load of every LoRA, before the base model's images: one line naming the LoRA and the base model."""
    def widen(key, tensor):
        return torch.zeros(tensor.shape[0], 48) if "attn1.to_q.lora.down" in key else tensor

    bad = _copy_lora(lora_dir, tmp_path / "bad", widen)
    out = tmp_path / "eval"
    assert _console(monkeypatch, ["--out", str(out), "--base-model", tiny_sd15, "--lora", f"bad={bad}", "--steps", "1",
                                  "--seeds", "1", "--max-prompts", "1", "--device", "cpu", "--stages", "generate"]) == 2
    line = _one_error_line(capsys)
    assert f"could not load LoRA 'bad' from '{bad}' into the base model '{tiny_sd15}'" in line, line
    assert "size mismatch" in line, line
    assert not list(out.rglob("*.png")) and not evaluate.read_manifest(out)


@pytest.mark.parametrize("flag,value,needle", [
    ("--steps", "0", "--steps must be positive, got 0"),
    ("--seeds", "0", "--seeds must be positive, got 0"),
    ("--batch-size", "0", "--batch_size must be positive, got 0"),
    ("--max-prompts", "-1", "--max_prompts must be positive, got -1"),
    ("--score-batch-size", "0", "--score_batch_size must be positive, got 0"),
    ("--height", "33", "--height must be a positive multiple of 8, got 33"),
    ("--width", "-64", "--width must be a positive multiple of 8, got -64"),
    ("--confidence", "1.5", "--confidence must be in (0, 1), got 1.5"),
    ("--bootstrap", "0", "--bootstrap must be positive, got 0"),
    ("--grid-prompts", "-1", "--grid_prompts must be in [0, inf], got -1"),
    ("--seed-start", "-1", "--seed_start must be in [0, "),
    ("--bootstrap-seed", "-3", "--bootstrap_seed must be in [0, inf], got -3"),
    ("--guidance", "nan", "--guidance must be a finite number, got nan"),
])
def test_numeric_flags_are_checked_at_parse_time(flag, value, needle, tmp_path, nothing_loads, monkeypatch, capsys):
    out = tmp_path / "eval"
    assert _console(monkeypatch, ["--out", str(out), "--base-model", "some/model", flag, value]) == 2
    line = _one_error_line(capsys)
    assert needle in line, line
    assert not out.exists()


def test_focus_names_an_evaluated_model_before_anything_runs(tmp_path, lora_dir, nothing_loads, monkeypatch, capsys):
    out = tmp_path / "eval"
    assert _console(monkeypatch, ["--out", str(out), "--base-model", "some/model", "--lora", f"tuned={lora_dir}",
                                  "--focus", "nope"]) == 2
    assert "--focus 'nope' is not one of the evaluated models: base, tuned" in _one_error_line(capsys)
    out.mkdir()  # report only: the models are the manifest's
    (out / "manifest.jsonl").write_text(json.dumps({"model": "sd", "prompt_id": "p", "seed": 0}) + "\n")
    with pytest.raises(SystemExit, match="--focus 'base' is not one of the evaluated models: sd$"):
        evaluate.main(["--out", str(out), "--stages", "report", "--focus", "base"])


def test_out_that_is_a_file_is_one_line(tmp_path, nothing_loads, monkeypatch, capsys):
    (tmp_path / "results.txt").write_text("not a folder\n")
    for out, needle in ((tmp_path / "results.txt", "is a file"),
                        (tmp_path / "results.txt" / "eval", f"is under '{tmp_path / 'results.txt'}', which is a file")):
        assert _console(monkeypatch, ["--out", str(out), "--base-model", "some/model"]) == 2
        line = _one_error_line(capsys)
        assert f"--out '{out}' {needle}" in line, line


@pytest.mark.parametrize("flag,value,needle", [
    ("--clip-model", "./no_such_clip", "scorer clip cannot be loaded: --clip_model './no_such_clip' does not exist"),
    ("--pickscore-model", "{tmp}/pick", "scorer pickscore cannot be loaded: --pickscore_model"),
    ("--pickscore-processor", "{tmp}/proc", "--pickscore_processor"),
    ("--aesthetic-clip-model", "{tmp}/a/b", "--aesthetic_clip_model"),
    ("--imagereward-model", "{tmp}/ir.pt", "--imagereward_model"),
    ("--base-model", "{tmp}/sd15", "--base_model '{tmp}/sd15' does not exist"),
    ("--aesthetic-head", "head.pth", "--aesthetic_head 'head.pth' does not exist"),
    ("--fid-reference", "{tmp}/reference", "--fid_reference '{tmp}/reference' is not a folder"),
    ("--fid-inception-weights", "{tmp}/inception.pth", "--fid_inception_weights '{tmp}/inception.pth' is not a file"),
])
def test_a_missing_local_model_path_is_one_line_without_a_hub_lookup(flag, value, needle, tmp_path, nothing_loads,
                                                                     monkeypatch, capsys):
    value, needle = value.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    argv = ["--out", str(tmp_path / "eval"), "--base-model", "some/model", "--scorers", "clip,aesthetic", flag, value]
    assert _console(monkeypatch, argv) == 2
    line = _one_error_line(capsys)
    assert needle in line, line


def test_a_scorer_built_from_a_missing_local_path_never_asks_the_hub(monkeypatch):
    import transformers

    def hub_lookup(*args, **kwargs):
        raise AssertionError("a local path that does not exist was sent to transformers (a Hub lookup)")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", hub_lookup)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", hub_lookup)
    for name, options in (("clip", {"model": "./no_such_clip"}),
                          ("pickscore", {"model": "./no_such_pickscore", "processor": "./no_such_processor"})):
        with pytest.raises(ValueError, match=r"could not load CLIP model .*'\./no_such_\w+' does not exist"):
            scorers.build_scorer(name, **options)


def test_a_full_fine_tune_is_drawn_with_its_own_unet_and_the_base_is_put_back(tmp_path, tiny_sd15, capsys):
    """`--full_model NAME=DIR`: the UNet a `--train_mode full` run saves (DIR/unet) replaces the base model's while
    that model's images are drawn; the manifest knows it by its weights; a folder without one is one line."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from full.eval.generate import ModelSpec
    from full.eval.loras import denoiser_of, full_model_folder

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.2 * torch.randn_like(param))
    full = tmp_path / "full"
    unet.save_pretrained(full / "unet")
    out = tmp_path / "eval"
    argv = ["--out", str(out), "--base-model", tiny_sd15, "--full_model", f"tuned={full}", "--prompts", "paper000",
            "--max-prompts", "1", "--seeds", "1", "--steps", "2", "--device", "cpu", "--stages", "generate"]
    evaluate.main(argv)
    rows = {r["model"]: r for r in evaluate.read_manifest(out)}
    assert rows["tuned"]["full_model"] == str(full) and rows["tuned"]["lora_sha256"] and rows["base"]["full_model"] is None
    tuned, base = (np.asarray(Image.open(out / rows[m]["path"]), dtype=int) for m in ("tuned", "base"))
    assert np.abs(tuned - base).max() > 10  # the fine-tuned UNet drew it
    capsys.readouterr()
    evaluate.main(argv)
    assert "generated 0 new image(s)" in capsys.readouterr().out  # the same weights: nothing to draw again

    original = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    pipe = SimpleNamespace(unet=original)
    spec = ModelSpec("tuned", None, full_model=str(full), **full_model_folder("tuned", str(full)))
    with denoiser_of(pipe, spec):
        assert pipe.unet is not original and torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)
    assert pipe.unet is original  # the base model's UNet is back for the next model
    with pytest.raises(SystemExit, match=r"full model 'x': .* has no unet/ or transformer/ folder"):
        evaluate.main([*argv[:4], "--full_model", f"x={tmp_path / 'eval'}", *argv[6:]])
