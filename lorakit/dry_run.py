"""``lorakit train --dry-run``: what a run would train on, checked as the trainer checks it, without loading the
model's weights or writing a file.

Before a run of hours a user wants to know that the images, captions, repeats, buckets and settings are what they
meant: every problem the trainer would stop on (a corrupt image, a missing caption, a setting out of range, a base
model lorakit cannot load) is reported here in seconds, with the captions as they will be trained and the steps the
run will take.  kohya's ``--debug_dataset`` shows images one by one in a window; this is its plain-text, scriptable
counterpart.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lorakit.checkpoints import check_run_folder
from lorakit.config import TrainConfig
from lorakit.data import TrainingData
from lorakit.methods import check_sdxl_settings, check_second_text_encoder_rate
from lorakit.models import describe_base_model
from lorakit.network_preview import network_preview
from lorakit.prior import class_images_parent, missing_class_images
from lorakit.run_messages import base_weight_specs, count, early_stop_text, opening_line, setting_lines
from lorakit.trackers import check_tracker, read_tracker_settings
from lorakit.train import (
    check_data_settings,
    check_paths,
    check_resume_settings,
    paths_read,
    planned_epochs,
    planned_steps,
    sample_prompts,
    sample_stop_line,
    saves_epoch,
    start_adapter,
    ti_start_vectors,
    ti_token_note,
)

#: captions shown as examples, and tags per folder in the frequency list
EXAMPLES, TOP_TAGS = 3, 8


def dry_run(cfg: TrainConfig, config_file: str | Path | None = None) -> str:
    """The report of a run that is checked but not started (raises what the trainer would raise)."""
    cfg.validate()
    check_tracker(cfg.output.log_with)
    check_paths(cfg, config_file)
    # the output folder's refusals, as the run gives them (a folder of files, one holding the data, ...)
    check_run_folder(cfg.output.dir, cfg.output.if_exists, paths_read(cfg, config_file), cfg.output.name)
    sampled = len(sample_prompts(cfg))
    read_tracker_settings(cfg.output.log_tracker_config, cfg.output.log_with)  # refused as the run refuses it
    previous = Path(cfg.output.dir) / "config.toml"
    resuming = cfg.output.if_exists == "resume" and previous.is_file()
    if resuming:  # the settings a resume may not change are refused as the resume would refuse them
        check_resume_settings(previous, cfg)
    described = describe_base_model(cfg.model.base, cfg.model.prediction_type)  # also refuses what cannot load
    resolution, family = described.resolution, described.family
    if family == "SDXL":
        check_sdxl_settings(cfg)
    check_second_text_encoder_rate(cfg, 2 if family == "SDXL" else 1)
    # made on the meta device from the model's configs (its block-wise rules read on this family's blocks): what the
    # run would train, or the error it would give
    network = network_preview(cfg, described.configs) if cfg.method.kind in ("adapter", "pivotal") else None
    if described.unsaid_sd2_prediction:
        family += (" (the file does not say whether it predicts noise or v: read as the 512 ε model; for a 768 v "
                   "model such as 2.1 set model.prediction_type = \"v_prediction\")")
    start = ti_start_vectors(cfg) if not resuming else None  # read as the run reads it (a resume does not)
    start_file = start_adapter(cfg) if not resuming else None
    token_note = ti_token_note(cfg)
    data_cfg, notes = cfg.data, []
    if cfg.data.num_class_images > 0:  # prior preservation: the class images are drawn when the run starts
        # where the run keeps them (a resumed run has drawn them there); data.class_prompt: cfg.validate() checked it
        parent = class_images_parent(cfg.data.reg_data, cfg.output.dir)
        missing = len(missing_class_images(parent, cfg.data.class_prompt, cfg.data.num_class_images))
        if missing:
            notes.append(f"prior preservation: {count(missing, 'class image')} of {cfg.data.class_prompt!r} would be "
                         "drawn first; the counts below leave them out")
            data_cfg = replace(cfg.data, reg_data=None)
        else:
            data_cfg = replace(cfg.data, reg_data=str(parent))
    data = TrainingData(data_cfg, seed=cfg.training.seed, default_resolution=resolution)
    check_data_settings(cfg, data)
    steps_per_epoch, total = planned_steps(cfg, data)
    capped = total < steps_per_epoch * cfg.training.max_epochs

    lines = ["lorakit train --dry-run: the run checked, no weight loaded, nothing written", opening_line(cfg),
             f"base model: {cfg.model.base or 'built-in'}, {family}, made for {resolution}×{resolution} "
             "(from its configs)"]
    lines += [f"base weights: {spec}, merged into the model before training (checked against it when it loads)"
              for spec in base_weight_specs(cfg)]
    lines += ["data:"] + [f"  {line}" for line in data.summary().splitlines()]
    lines += [f"  note: {n}" for n in notes]
    if start_file is not None:
        lines.append(f"the adapter starts from {start_file.path} ({count(len(start_file.modules()), 'module')}, "
                     "checked against the network when the model loads)")
    if start is not None:
        sizes = " and ".join(str(t.shape[1]) for t in start)  # SDXL's: one size per text encoder
        lines.append(f"textual inversion starts from {cfg.method.ti_weights} ({count(start[0].shape[0], 'vector')} "
                     f"of size {sizes} per token, checked against the model when it loads)")
    if token_note:
        lines.append(token_note)
    trained = [r for i, r in enumerate(data.records) if not r.is_reg and i not in data.held_out]
    templated = [r for r in trained if data.subset_of(r).templated]
    uncaptioned = [r for r in trained if not r.has_caption_file and not data.subset_of(r).templated]
    worded = sum(bool(r.caption) for r in uncaptioned)  # a TOML subset without class_tokens has no words to give
    if worded:
        lines.append(f"  {count(worded, 'image')} without a caption file: trained with the folder's words")
    if len(uncaptioned) > worded:
        lines.append(f"  {count(len(uncaptioned) - worded, 'image')} without a caption file or folder words: "
                     "trained with an empty caption")
    if templated:
        kinds = sorted({data.subset_of(r).caption_templates for r in templated})
        lines.append(f"  {count(len(templated), 'image')} trained with caption templates ({', '.join(kinds)}), one "
                     "drawn per step, not their captions")
    lines.append(f"captions as trained (before each step's shuffling and dropout), {min(EXAMPLES, len(trained))} of "
                 f"{len(trained)}:")
    for r in trained[:EXAMPLES]:
        shown = repr(r.caption)
        if data.subset_of(r).templated:
            lines_of = r.caption.split("\n")
            shown = f"one of {len(lines_of)} templates, e.g. {lines_of[0]!r}"
        lines.append(f"  {r.path.name}: {shown}")
    frequency = data.tag_frequency
    if frequency:
        lines.append(f"most frequent tags (images with the tag), up to {TOP_TAGS} per folder:")
        for folder, tags in frequency.items():
            top = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
            lines.append(f"  {folder}: " + ", ".join(f"{tag} ({n})" for tag, n in top))
    epochs = planned_epochs(cfg, steps_per_epoch, total)
    lines.append(f"training: {count(steps_per_epoch, 'step')} per epoch × {count(epochs, 'epoch')}"
                 f" = {count(total, 'step')}" + (f" (training.max_steps {cfg.training.max_steps})" if capped else "")
                 + f"; early stopping: {early_stop_text(cfg, cfg.method.kind != 'ti')}")
    if network is not None:
        lines.append(f"network: {network}")
    lines.append(_checkpoints_line(cfg, steps_per_epoch, total))
    if sampled:
        lines.append(_samples_line(cfg, sampled))
    lines += setting_lines(cfg)
    if cfg.early_stop.samples and cfg.early_stop.mode != "off":
        lines.append(sample_stop_line(cfg))
    if data.warnings:
        lines.append(f"warnings: {len(data.warnings)} (above)")
    if resuming:
        lines.append(f"resume: continues the run in {cfg.output.dir} from its last checkpoint")
    lines.append("checked: run the same command without --dry-run to train")
    return "\n".join(lines)


def _samples_line(cfg: TrainConfig, prompts: int) -> str:
    when = [f"every {count(cfg.sample.every_n_epochs, 'epoch')}" if cfg.sample.every_n_epochs > 1 else "every epoch"]
    if cfg.sample.every_n_steps:
        when.append(f"every {count(cfg.sample.every_n_steps, 'step')}")
    if cfg.sample.at_first:
        when.append("before the first step")
    return f"samples: {count(prompts, 'prompt')} ({cfg.sample.prompts}) drawn {', '.join(when)}"


def _checkpoints_line(cfg: TrainConfig, steps_per_epoch: int, total: int) -> str:
    """When checkpoints would be saved: every N epochs and the last, and step checkpoints at the multiples of
    save_every_n_steps that do not fall on an epoch saved anyway (as the trainer decides)."""
    line = f"checkpoints: every {count(cfg.training.save_every_n_epochs, 'epoch')} and the last"
    every = cfg.training.save_every_n_steps
    if not every:
        return line
    epoch_saved = {e * steps_per_epoch for e in range(1, cfg.training.max_epochs + 1) if saves_epoch(cfg, e)}
    steps = [s for s in range(every, total, every) if s not in epoch_saved]
    kept = f", those of the last {cfg.training.save_last_n_steps} steps kept" if cfg.training.save_last_n_steps else ""
    return f"{line}; a step checkpoint every {count(every, 'step')} ({count(len(steps), 'checkpoint')}{kept})"
