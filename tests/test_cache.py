"""`full/cache.py`: the cache holds exactly what the frozen encoders produce, and `--cached_dir` training works
without loading them (SD1.5 pairs with CLIP embeddings for dpo and contrast, SDXL feedback for kto)."""

from __future__ import annotations

import pytest
import torch

from full.cache import main as cache_main
from full import models
from full.data import cache, cache_build, embeddings
from full.trainers import offline as train
from tests import tiny_models
from tests.conftest import train_argv
from tests.test_train import assert_lora_loads_and_changes_output, assert_only_lora_trained
from tests.two_processes import cache_argv


def build(model, dataset, out, method, *extra) -> str:
    return str(cache_main(cache_argv(model, dataset, out, method, "--device", "cpu", *extra)))


@pytest.fixture(scope="module")
def sd15_pair_cache(tiny_sd15, tiny_clip, pickapic_parquet, tmp_path_factory):
    return build(tiny_sd15, pickapic_parquet, tmp_path_factory.mktemp("c") / "pairs", "contrast",
                 "--clip_model_name_or_path", tiny_clip)


def test_cache_holds_the_encoder_outputs(sd15_pair_cache, tiny_sd15):
    meta = cache.read_cache_meta(sd15_pair_cache)
    assert meta["kind"] == "pairs" and meta["family"] == "sd15" and meta["has_embeddings"]
    assert meta["n_items"] == 14 and len(meta["shards"]) == 4  # 16 rows - 2 ties, shards of 4
    dataset = cache.CachedDataset(sd15_pair_cache)
    item = dataset[0]
    assert item["latents"].shape == (2, 4, 16, 16)  # winner, loser; tiny VAE downsamples by 2
    assert item["prompt_embeds"].shape == (2, 77, 32) and item["embeddings"].shape == (2, 64)
    # the prompt embedding is the text encoder's output for the row's caption, for both images of the pair
    parts = models.load_components(tiny_sd15, with_vae=False)
    caption = tiny_models.CAPTIONS[item["row_id"] % len(tiny_models.CAPTIONS)]
    expected = models.encode_prompts(parts, [caption], "cpu").hidden[0]
    torch.testing.assert_close(item["prompt_embeds"][0], expected)
    torch.testing.assert_close(item["prompt_embeds"][1], expected)
    # caption dropout from a cache swaps in the stored embedding of ""
    dropped = cache.CachedDataset(sd15_pair_cache, caption_dropout=1.0)[0]["prompt_embeds"]
    torch.testing.assert_close(dropped[0], models.encode_prompts(parts, [""], "cpu").hidden[0])


def test_each_image_draws_its_own_posterior_sample(sd15_pair_cache, tiny_sd15, pickapic_parquet):
    """latents = scale * (mean + std * eps) with eps from the image's own generator, seeded by (--seed, row index,
    slot): recovered from the VAE's posterior, eps is that generator's draw, and differs between the two images."""
    from full.data import load_pair_rows
    from full.data.images import PairDataset

    parts = models.load_components(tiny_sd15)
    item = cache.CachedDataset(sd15_pair_cache)[0]
    pixels = PairDataset(load_pair_rows(pickapic_parquet), 32)[0]["pixel_values"]  # (2, 3, 32, 32)
    with torch.no_grad():
        posterior = parts.vae.encode(pixels).latent_dist
    eps = (item["latents"] / parts.vae.config.scaling_factor - posterior.mean) / posterior.std
    for slot in (0, 1):  # row index 0, seed 0
        expected = torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(slot))
        torch.testing.assert_close(eps[slot], expected, rtol=1e-3, atol=1e-3)
    assert (eps[0] - eps[1]).abs().max() > 1.0


@pytest.mark.parametrize("method", ["dpo", "contrast"])
def test_training_from_a_pair_cache(sd15_pair_cache, tiny_sd15, tmp_path, run_train, method):
    summary = run_train(tiny_sd15, None, tmp_path, method, cached_dir=sd15_pair_cache)
    assert summary["global_step"] == 2
    assert_only_lora_trained(summary["unet"], tiny_sd15)
    assert_lora_loads_and_changes_output("sd15", tiny_sd15, tmp_path, summary["unet"])


def test_sdxl_feedback_cache_trains_kto(tiny_sdxl, pickapic_parquet, tmp_path, run_train):
    cached = build(tiny_sdxl, pickapic_parquet, tmp_path / "fb", "kto")
    meta = cache.read_cache_meta(cached)
    assert meta["kind"] == "feedback" and meta["family"] == "sdxl"
    item = cache.CachedDataset(cached)[0]
    assert item["pooled"].shape == (1, 32) and item["time_ids"].shape == (1, 6) and isinstance(item["desirable"], bool)
    assert item["time_ids"][0, 4:].tolist() == [32.0, 32.0]  # target size; original size and crop come first
    summary = run_train(tiny_sdxl, None, tmp_path / "run", "kto", "--desirable_ratio", "0.8", cached_dir=cached)
    assert summary["global_step"] == 2 and "kl" in summary["metrics"]
    assert_only_lora_trained(summary["unet"], tiny_sdxl)
    with pytest.raises(ValueError, match="built without CSFT prompts"):  # "good/bad image" prompts are cached
        train.main(train_argv(tiny_sdxl, None, tmp_path / "csft", "csft", cached_dir=cached))


def test_cache_must_match_the_method(sd15_pair_cache, tiny_sd15, tmp_path):
    with pytest.raises(ValueError, match="holds pairs but --method kto needs feedback"):
        train.main(train_argv(tiny_sd15, None, tmp_path, "kto", cached_dir=sd15_pair_cache))
    with pytest.raises(ValueError, match="has no cache_meta.json"):
        train.main(train_argv(tiny_sd15, None, tmp_path, "dpo", cached_dir=str(tmp_path)))


def test_clip_embeddings_are_computed_once(tiny_clip, pickapic_parquet, tmp_path, monkeypatch):
    from full import data

    rows = data.load_pair_rows(pickapic_parquet)
    first = embeddings.pair_embeddings(rows, tiny_clip, tmp_path / "emb.safetensors", source="x")
    assert len(first) == len(rows) and first[rows[0]["row_id"]].shape == (2, 64)
    # f = [image / |image|, text / |text|]: both halves unit-norm, and winner and loser share the text half
    w, l = first[rows[0]["row_id"]]
    torch.testing.assert_close(w[:32].norm(), torch.tensor(1.0))
    torch.testing.assert_close(w[32:], l[32:])
    monkeypatch.setattr(embeddings, "compute_pair_embeddings", lambda *a, **k: pytest.fail("recomputed"))
    again = embeddings.pair_embeddings(rows, tiny_clip, tmp_path / "emb.safetensors", source="x")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_embedding_column_is_oriented_winner_first(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"label_0": [1.0, 0.0, 0.5], "emb_0": [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]],
                             "emb_1": [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]}), path)
    table = embeddings.embeddings_from_column(str(path), "train", "emb")
    assert sorted(table) == [0, 1]  # the tie (row 2) has no winner
    assert table[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert table[1].tolist() == [[0.0, 2.0], [2.0, 0.0]]  # jpg_1 won: its embedding comes first


def test_a_cache_is_keyed_by_the_models_content_not_the_path_that_named_it(sd15_pair_cache, tiny_sd15, tmp_path,
                                                                           monkeypatch):
    """A relative --pretrained_model_name_or_path at build time, and training from another working directory where
    the same relative path names another model: refused (the record used to resolve it against the new cwd)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from full.data.cache import check_cache_model
    from full.paths import model_fingerprint

    meta = json.loads((Path(sd15_pair_cache) / "cache_meta.json").read_text())
    (tmp_path / "here").mkdir()
    shutil.copytree(tiny_sd15, tmp_path / "here" / "model")
    monkeypatch.chdir(tmp_path / "here")
    meta |= {"pretrained": "model", "model_fingerprint": model_fingerprint("model")}  # as built from here
    check_cache_model(meta, sd15_pair_cache, "model", None, None)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_sd15, elsewhere / "model")
    vae_file = next((elsewhere / "model" / "vae").glob("*.safetensors"))
    weights = load_file(str(vae_file))
    weights = {k: v * 1.01 for k, v in weights.items()}
    save_file(weights, str(vae_file))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match="their contents differ"):
        check_cache_model(meta, sd15_pair_cache, "model", None, None)


def test_training_refuses_a_cache_of_another_checkpoint_and_augmentation_flags(sd15_pair_cache, tiny_sd15,
                                                                                tmp_path, run_train):
    """A cache records the checkpoint (path, revision) that encoded it; the trainer refuses any other, and the
    augmentation flags a cache cannot honour, each with one line that says why."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from full.data.cache import check_cache_model

    meta = json.loads((Path(sd15_pair_cache) / "cache_meta.json").read_text())
    assert meta["pretrained"] == tiny_sd15 and meta["revision"] is None
    same = shutil.copytree(tiny_sd15, tmp_path / "same_sd15")  # the same weights in another folder: the same model
    check_cache_model(meta, sd15_pair_cache, str(same), None, None)
    other = shutil.copytree(tiny_sd15, tmp_path / "other_sd15")  # same family, another checkpoint
    unet_file = next((other / "unet").glob("*.safetensors"))
    weights = load_file(str(unet_file))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(unet_file))
    with pytest.raises(ValueError, match=r"was encoded by .*not --pretrained_model_name_or_path .*other_sd15"):
        run_train(str(other), None, tmp_path / "out", "dpo", cached_dir=sd15_pair_cache)
    with pytest.raises(ValueError, match="revision"):
        run_train(tiny_sd15, None, tmp_path / "out", "dpo", "--revision", "v2", cached_dir=sd15_pair_cache)
    for flag in ("--random_crop", "--random_flip"):
        with pytest.raises(SystemExit):
            train.parse_args(train_argv(tiny_sd15, None, tmp_path / "out", "dpo", flag, cached_dir=sd15_pair_cache))
    args = train.parse_args(train_argv(tiny_sd15, None, tmp_path / "out", "dpo", cached_dir=sd15_pair_cache))
    assert args.random_flip is False  # the default flip is off from a cache (and args.json says so)


# ---------------------------------------------------------------------------------------------------------------
# A killed build resumes; several processes share a build (full/data/cache_build.py)
# ---------------------------------------------------------------------------------------------------------------


def cache_tensors(cache_dir) -> dict:
    """{(file, key): tensor} of every shard, and the shard list: what two equal caches must share."""
    from safetensors.torch import load_file

    meta = cache.read_cache_meta(cache_dir)
    return {(s["file"], k): v for s in meta["shards"] for k, v in load_file(f"{cache_dir}/{s['file']}").items()}


def test_a_killed_build_resumes_to_the_cache_of_an_unkilled_one(tiny_sd15, tmp_path, monkeypatch, capsys):
    """Killed after 2 of 3 shards (and in the middle of writing the third): the same command keeps the 2 shards,
    encodes only the third, and gives the cache an unkilled build gives, bit for bit; other flags or another
    checkpoint are refused with one line."""
    import shutil

    from full import cli
    from tests import tiny_models

    data = tiny_models.make_pickapic_parquet(tmp_path / "d.parquet", 10, 32, truncated_rows=[5])
    flags = ["--shard_size", "4", "--batch_size", "2"]  # shards: rows 0-3, 4-7 (row 5 undecodable), 8-9
    whole = build(tiny_sd15, data, tmp_path / "whole", "dpo", *flags)
    written = []

    def killed_after_two(path, tensors, n_undecodable):
        if len(written) == 2:
            path.with_name(path.name + ".partial").write_bytes(b"half a shard")  # killed while writing it
            raise KeyboardInterrupt("killed")
        written.append(path.name)
        real_write(path, tensors, n_undecodable)

    real_write = cache_build.write_shard
    monkeypatch.setattr(cache_build, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_sd15, data, tmp_path / "resumed", "dpo", *flags)
    building = tmp_path / ".resumed.building"
    assert written == ["shard-00000.safetensors", "shard-00001.safetensors"] and not (tmp_path / "resumed").exists()
    kept = {name: (building / name).stat().st_mtime_ns for name in written}

    # Another checkpoint, or other flags: refused with one line naming what changed; the partial build is kept.
    other = shutil.copytree(tiny_sd15, tmp_path / "other_sd15")
    for model, extra, changed in ((str(other), flags, "--pretrained_model_name_or_path"),
                                  (tiny_sd15, ["--shard_size", "5", "--batch_size", "2"], "--shard_size 4 -> 5")):
        argv = cache_argv(model, data, tmp_path / "resumed", "dpo", *extra)
        capsys.readouterr()
        assert cli.entry_point(cache_main, argv, prog="full.cache") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "has an unfinished build" in err and changed in err, err
    assert {name: (building / name).stat().st_mtime_ns for name in written} == kept

    monkeypatch.setattr(cache_build, "write_shard", real_write)
    encoded = []
    real_encode = cache_build.encode_shard
    monkeypatch.setattr(cache_build, "encode_shard", lambda parts, ds, shard, *a: encoded.append(shard.start)
                        or real_encode(parts, ds, shard, *a))
    resumed = build(tiny_sd15, data, tmp_path / "resumed", "dpo", *flags)
    assert encoded == [8]  # only the third shard was encoded again
    assert {name: (tmp_path / "resumed" / name).stat().st_mtime_ns for name in written} == kept
    meta, meta_whole = cache.read_cache_meta(resumed), cache.read_cache_meta(whole)
    assert meta["n_undecodable"] == meta_whole["n_undecodable"] == 1  # counted before the kill, kept in the shard
    assert meta["n_items"] == 9 and meta["shards"] == meta_whole["shards"]
    a, b = cache_tensors(whole), cache_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "resumed").glob("*.partial"))



@pytest.mark.xdist_group("two_processes")
def test_two_processes_build_the_cache_of_one_process(sd15_pair_cache, two_process_jobs):
    """`full.cache` launched as 2 processes (gloo, CPU): each encodes 2 of the 4 shards (0 and 2, 1 and 3),
    and the cache equals the 1-process one item by item (latents, prompt and CLIP embeddings). Measured: bit for
    bit (the same batches, one thread each); the tolerance allows the round-off of another thread count."""
    out, result = two_process_jobs
    for p in (0, 1):
        assert f"process {p} of 2: 2 shards to encode (4 of 4 left)" in result.stderr, result.stderr[-2000:]
    meta_one, meta_two = cache.read_cache_meta(sd15_pair_cache), cache.read_cache_meta(out / "cache")
    assert meta_two["shards"] == meta_one["shards"] and meta_two["n_items"] == 14
    one, two = cache_tensors(sd15_pair_cache), cache_tensors(out / "cache")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=str(key))


@pytest.mark.parametrize("method, extra, complaint", [
    ("spin", [], "spin and spo sample their own images during training and read no cache"),
    ("contrast", [], "--method contrast: add --clip_model_name_or_path"),
    ("dpo", ["--clip_model_name_or_path", "./no/such/clip"], "--clip_model_name_or_path ./no/such/clip: no such"),
])
def test_the_cache_builder_refuses_what_no_trainer_could_read(tmp_path, capsys, method, extra, complaint):
    from full.cache import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path),
                    "--method", method, *extra])
    assert exit_info.value.code == 2 and complaint in capsys.readouterr().err

