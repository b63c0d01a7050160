"""Checkpoint discovery and cached generation on the built-in model (a few 4-step images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import PROMPTS, base_model, lora_tensors, write_run
from safetensors.torch import save_file

from lorakit.evaluate.checkpoints import CheckpointError, discover, read_run
from lorakit.evaluate.generate import (
    ImageCache,
    SamplerSettings,
    applied,
    check_checkpoints,
    generate_all,
    load_images,
    make_jobs,
)

SETTINGS = SamplerSettings(steps=4, cfg_scale=6.0)


def test_discover_a_run_lists_the_base_model_and_every_epoch_with_settings(tmp_path):
    run = write_run(tmp_path / "runA", epochs=3, turning_epoch=2)
    checkpoints, runs = discover([run])
    assert [c.label for c in checkpoints] == ["base", "runA/e1", "runA/e2", "runA/e3"]
    assert [c.epoch for c in checkpoints] == [0, 1, 2, 3]
    assert runs[0].settings["algorithm"] == "lora" and runs[0].settings["rank"] == 2
    assert runs[0].settings["lr"] == pytest.approx(1e-3)
    assert runs[0].turning_epoch == 2
    assert len({c.hash for c in checkpoints[1:]}) == 3  # different files, different hashes
    # every 2nd epoch, the last always
    assert [c.epoch for c in read_run(run, every=2).checkpoints] == [2, 3]
    # an adapter file given directly, and the same run twice: labels stay unique
    file = run / "checkpoints" / "epoch-0001" / "trained.safetensors"
    checkpoints, _ = discover([file, run], include_base=False)
    assert checkpoints[0].label == "runA/epoch-0001" and checkpoints[0].epoch == 1  # the run's, not "trained"
    # a step checkpoint (training.save_every_n_steps) is not one of the run's epochs; as a file it is compared
    step_dir = run / "checkpoints" / "step-00000005"
    step_dir.mkdir()
    (step_dir / "trained.safetensors").write_bytes(file.read_bytes())
    assert [c.label for c in discover([run], include_base=False)[0]] == ["runA/e1", "runA/e2", "runA/e3"]
    assert discover([step_dir / "trained.safetensors"], include_base=False)[0][0].label == "runA/step-00000005"
    # asked for, it is placed between the epochs by the steps per epoch the log counts (4): step 5 is epoch 1.25
    info = read_run(run, step_checkpoints=True)
    assert [(c.label, c.epoch, c.step) for c in info.checkpoints] == [
        ("runA/e1", 1, None), ("runA/s5", 1.25, 5), ("runA/e2", 2, None), ("runA/e3", 3, None)]
    assert info.step_checkpoints_left_out == 0 and read_run(run).step_checkpoints_left_out == 1
    (run / "log.jsonl").unlink()  # without the log its place is unknown: compared, last, off the charts
    assert [(c.label, c.epoch) for c in read_run(run, step_checkpoints=True).checkpoints][-1] == ("runA/s5", None)
    checkpoints, _ = discover([run, run], include_base=False)
    assert len({c.label for c in checkpoints}) == 6


def test_an_empty_run_or_a_folder_that_is_no_run_is_an_error_naming_it(tmp_path):
    empty = write_run(tmp_path / "empty", epochs=0)
    with pytest.raises(CheckpointError, match="empty.*no saved checkpoint"):
        discover([empty])
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="plain.*not a lorakit run"):
        discover([tmp_path / "plain"])
    with pytest.raises(CheckpointError, match="missing.pt"):
        discover([tmp_path / "missing.pt"])


def test_a_checkpoint_that_does_not_fit_the_base_model_fails_before_any_image(tmp_path):
    tensors = lora_tensors(0.1, seed=0)
    name = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()  # one input column short
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    checkpoints, _ = discover([bad])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        check_checkpoints(base_model(), checkpoints)
    # the model was left as it was: no adapter attached
    assert not any("lora" in n for n, _ in base_model().unet.named_modules())


def test_generation_is_cached_so_no_image_is_made_twice(tmp_path):
    run = write_run(tmp_path / "run", epochs=1)
    checkpoints, _ = discover([run])
    jobs = make_jobs(PROMPTS[:2], seeds=1)
    cache = ImageCache(tmp_path / "cache")
    model = base_model()
    paths, stats = generate_all(model, "m", checkpoints, jobs, SETTINGS, cache, progress=False)
    assert (stats.made, stats.cached) == (4, 0)
    first = {k: [np.asarray(im) for im in v] for k, v in load_images(paths).items()}
    # the adapter changes the images; the base model is back to itself afterwards
    assert not np.array_equal(first["base"][0], first["run/e1"][0])
    paths2, stats2 = generate_all(model, "m", checkpoints, jobs, SETTINGS, cache, progress=False)
    assert (stats2.made, stats2.cached) == (0, 4) and paths2 == paths
    # an interrupted call: only the missing image is made, and it is the same image (up to one level of 255 in
    # a few pixels: a batch of one rounds differently from a batch of two on the CPU)
    paths["run/e1"][1].unlink()
    _, stats3 = generate_all(model, "m", checkpoints, jobs, SETTINGS, cache, progress=False)
    assert (stats3.made, stats3.cached) == (1, 3)
    again = load_images(paths)
    for k in first:
        for a, b in zip(again[k], first[k], strict=True):
            assert np.abs(np.asarray(a).astype(int) - b).max() <= 1
    # other sampler settings or another base model: other keys
    _, stats4 = generate_all(model, "other-base", checkpoints[:1], jobs[:1], SETTINGS, cache, progress=False)
    assert stats4.made == 1
    assert not list(tmp_path.glob("cache/*/.*"))  # no temporary files left behind


def test_seeds_per_prompt_and_applied_restores_the_model(tmp_path):
    jobs = make_jobs(PROMPTS, seeds=2, base_seed=5)
    assert [j.seed for j in jobs] == [1, 10_001, 2, 10_002, 3, 10_003]
    run = write_run(tmp_path / "run", epochs=1)
    ckpt = discover([run], include_base=False)[0][0]
    model = base_model()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with applied(model, ckpt):
        assert any("lora" in n for n, _ in model.unet.named_modules())
    after = model.unet.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_a_native_run_is_applied_as_weights_and_put_back(tmp_path):
    import json

    import torch

    from lorakit.config import TrainConfig, to_toml

    model = base_model()
    name = "conv_in.weight"
    run = tmp_path / "native"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    cfg = TrainConfig()
    cfg.method.kind = "native"
    (run / "config.toml").write_text(to_toml(cfg))
    (run / "summary.json").write_text(json.dumps({"turning_point": None}))
    weight = dict(model.unet.named_parameters())[name]
    original = weight.detach().clone()
    save_file({name: original + 0.5}, str(run / "checkpoints" / "epoch-0001" / "trained.safetensors"))
    ckpt = discover([run], include_base=False)[0][0]
    assert ckpt.kind == "native"
    # the run's checkpoint file given alone is read as its run says: native weights, not an adapter
    alone = discover([run / "checkpoints" / "epoch-0001" / "trained.safetensors"], include_base=False)[0][0]
    assert (alone.kind, alone.label, alone.hash) == ("native", "native/epoch-0001", ckpt.hash)
    with applied(model, ckpt):
        assert torch.allclose(weight, original + 0.5)
    assert torch.equal(weight, original)
    # a native checkpoint for another model: the parameter's shape does not fit
    save_file({name: torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    bad = ckpt.__class__("other", "native", tmp_path / "other.safetensors", "x")
    with pytest.raises(CheckpointError, match=r"other.safetensors.*conv_in.weight"):
        check_checkpoints(model, [bad])
    assert torch.equal(weight, original)


def test_steps_per_epoch_counts_each_step_once_and_reads_past_a_cut_line(tmp_path):
    from lorakit.evaluate.checkpoints import steps_per_epoch

    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "epoch": (s - 1) // 3 + 1, "loss": 0.1} for s in range(1, 8)]  # 3 per epoch, 1 in the 3rd
    lines += [{"step": 3, "epoch": 1, "val_loss": 0.2}, {"step": 3, "epoch": 1, "sample_score": 0.5}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 8, "ep')
    assert steps_per_epoch(log) == 3
    assert steps_per_epoch(tmp_path / "missing.jsonl") is None


# ------------------------------------------------------------------------ textual inversion and pivotal tuning
def write_embedding_run(folder, vectors, kind: str = "ti", extra=None):
    """A textual-inversion (or pivotal) run folder whose one checkpoint holds ``vectors`` for the token zkz."""
    from lorakit.config import TrainConfig, to_toml

    ckpt = folder / "checkpoints" / "epoch-0001"
    ckpt.mkdir(parents=True)
    cfg = TrainConfig()
    cfg.method.kind, cfg.method.ti_token, cfg.method.ti_vectors = kind, "zkz", vectors.shape[0]
    (folder / "config.toml").write_text(to_toml(cfg))
    prefix = "ti." if kind == "pivotal" else ""
    save_file({**(extra or {}), f"{prefix}clip_l": vectors}, str(ckpt / "trained.safetensors"))
    return folder


def model_state(model):
    emb = model.text_encoder.get_input_embeddings().weight
    return len(model.tokenizer), model.tokenizer("a zkz shape").input_ids, emb.detach().clone()


def test_a_textual_inversion_run_reads_its_token_and_leaves_the_model_as_it_was(tmp_path):
    import torch

    model = base_model()
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    run = write_embedding_run(tmp_path / "ti", vectors)
    (ckpt,) = discover([run], include_base=False)[0]
    assert (ckpt.kind, ckpt.token, ckpt.label) == ("embedding", "zkz", "ti/e1")
    before = model_state(model)
    for _ in range(2):  # a second time: the token is not "already in the vocabulary"
        with applied(model, ckpt) as written:
            assert written("a zkz shape, zkzz") == "a zkz zkz_1 shape, zkzz"  # as training read it
            ids = model.tokenizer.convert_tokens_to_ids(["zkz", "zkz_1"])
            assert torch.equal(model.text_encoder.get_input_embeddings().weight[ids], vectors)
        after = model_state(model)
        assert after[:2] == before[:2] and torch.equal(after[2], before[2])
    # the embedding changes the images of prompts with its token, and no other image
    prompts = [PROMPTS[0], PROMPTS[2]]  # "... zkz shape ...", and an agnostic prompt without it
    base = discover([run])[0][0]
    paths, _ = generate_all(model, "m", [base, ckpt], make_jobs(prompts, 1), SETTINGS, ImageCache(tmp_path / "c"),
                            progress=False)
    images = {k: [np.asarray(im) for im in v] for k, v in load_images(paths).items()}
    assert not np.array_equal(images["base"][0], images["ti/e1"][0])
    assert np.array_equal(images["base"][1], images["ti/e1"][1])


def test_embedding_files_are_compared_under_the_token_they_name_or_their_file_name(tmp_path):
    import torch

    width = base_model().text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"emb_params": torch.ones(1, width)}, str(tmp_path / "my_style.safetensors"))  # A1111's layout
    save_file({"clip_l": torch.ones(3, width)}, str(tmp_path / "lorakit-qwx.safetensors"),
              metadata={"lorakit_ti_token": "qwx", "ss_epoch": "4"})
    run = write_embedding_run(tmp_path / "ti", torch.ones(1, width))
    found = discover([tmp_path / "my_style.safetensors", tmp_path / "lorakit-qwx.safetensors",
                      run / "checkpoints" / "epoch-0001" / "trained.safetensors"], include_base=False)[0]
    assert [(c.kind, c.token, c.label, c.epoch) for c in found] == [
        ("embedding", "my_style", "my_style", None), ("embedding", "qwx", "lorakit-qwx", 4),
        ("embedding", "zkz", "ti/epoch-0001", None)]  # a run's own file: the run's token, not "trained"
    with applied(base_model(), found[1]) as written:
        assert written("qwx") == "qwx qwx_1 qwx_2"
    # the same vectors under another token read other prompts: another cache key
    save_file({"clip_l": torch.ones(3, width)}, str(tmp_path / "other.safetensors"))
    assert discover([tmp_path / "other.safetensors"], include_base=False)[0][0].hash != found[1].hash


def test_a_pivotal_checkpoint_applies_its_adapter_and_its_embedding_together(tmp_path):
    import torch

    model = base_model()
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    run = write_embedding_run(tmp_path / "piv", torch.ones(1, width), kind="pivotal", extra=lora_tensors(0.3, 1))
    (ckpt,) = discover([run], include_base=False)[0]
    assert (ckpt.kind, ckpt.token) == ("pivotal", "zkz")
    before = model_state(model)
    with applied(model, ckpt) as written:
        assert any("lora" in n for n, _ in model.unet.named_modules())
        assert "zkz" in model.tokenizer.get_vocab() and written("zkz") == "zkz"
    assert not any("lora" in n for n, _ in model.unet.named_modules())
    assert model_state(model)[:2] == before[:2]
    # an embedding for another text encoder: an error naming the file, the adapter taken off again
    bad = write_embedding_run(tmp_path / "bad", torch.ones(1, width + 1), kind="pivotal", extra=lora_tensors(0.3, 1))
    with pytest.raises(CheckpointError, match=r"bad/checkpoints/epoch-0001/trained.safetensors.*another model"):
        check_checkpoints(model, discover([bad], include_base=False)[0])
    assert not any("lora" in n for n, _ in model.unet.named_modules())
    after = model_state(model)
    assert after[:2] == before[:2] and torch.equal(after[2], before[2])
