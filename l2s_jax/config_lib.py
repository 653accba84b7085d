"""Shared pieces of the config files in ``configs/``: the full schema, the recipes, validation.

Every config starts from :func:`base_config`, which lists every key the trainer reads with the
paper's Section 3 recipe as defaults (SLaK-T -> ConvNeXt-T+BN, NKD, 120 epochs, ImageNet).
:func:`validate` rejects keys the schema does not have, naming them, so a typo in a config
file fails as loudly as a typo on the command line (``--config.optim.lrr=1`` is rejected by
``config_flags`` with ``lock_config=True``). ``parse_arg`` reads big_vision-style config
arguments (``--config configs/paper.py:table=1,teacher=slak_t``).
"""
from __future__ import annotations

import difflib
from typing import Any, Iterator

import ml_collections
from ml_collections import config_dict

from l2s_jax import losses

# Sub-trees whose keys are free-form: constructor overrides and dotted config overrides.
FREE_FORM = ("model.overrides", "teacher.train", "baseline.overrides")
IMAGENET_TRAIN_IMAGES = 1_281_167


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with the paper's Section 3 recipe as values."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        name="convnext_tiny_bn",   # student, any name of l2s_jax.models.list_models()
        label="ConvNeXt-T+BN",     # display name
        overrides={},              # constructor arguments, e.g. drop_path_rate, layer_scale_init_value
        dtype="float32",           # compute dtype ("bfloat16": mixed precision, float32 master weights)
        bn_stat_groups=1,          # 1: SyncBN over the global batch; 0: per device (DDP); G: G groups
        depthwise_impl="auto",     # auto | direct | fft | toeplitz
    )
    c.teacher = dict(
        name="SLaK-T",             # display name
        model="slak_tiny",         # registered architecture (shape checks; conversion hint)
        arch="slak",               # --arch of tools/convert_weights.py
        checkpoint="",             # converted checkpoint directory (spec.json + state/)
        top1=config_dict.placeholder(float),  # known ImageNet top-1 (%) if not evaluated here
        dtype="float32",           # teacher compute dtype
        param_dtype="float32",     # "bfloat16" halves the teacher's memory
        fuse=True,                 # SLaK: fold branches + BN into one kernel (exact in eval mode)
        depthwise_impl="auto",
        train={},                  # nested overrides: train the teacher from scratch here (demo)
        evaluate=True,             # evaluate the teacher before distilling
    )
    c.distill = dict(
        method="nkd",              # ce | kd | nkd | fd | fd+nkd | fd+kd
        kd_temperature=1.0, kd_lam=0.1, kd_hard=False,
        nkd_temperature=1.0, nkd_lam=1.0, nkd_variant="paper",
        fd_stages=1, fd_weight=1.0, fd_beta=2.0, fd_loss_type="smooth_l1",
    )
    c.label_smoothing = 0.1
    c.data = dict(
        name="imagenet2012", data_dir=config_dict.placeholder(str), train_split="train",
        eval_split="validation", image_size=224, eval_crop_pct=0.875, num_workers=8, prefetch=2,
        demo_num_train=4000, demo_num_test=1000, demo_seed=0,  # data.name="demo" only
    )
    c.aug = dict(
        rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.25, remode="pixel", interpolation="bicubic",
    )
    c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
    c.optim = dict(
        name="adamw", lr=4e-3, lr_base_batch_size=4096, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
        min_lr=1e-6, warmup_epochs=20.0, clip_grad_norm=0.0, momentum=0.9,  # momentum: sgd only
    )
    c.init = ""                    # checkpoint or workdir whose weights start the student (fresh head)
    c.ema_decay = 0.9999           # 0 disables the EMA
    c.batch_size = 4096            # global
    c.accum_steps = 1              # micro-batches per step (gradient accumulation)
    c.eval_batch_size = 1024
    c.epochs = 120.0
    c.total_steps = 0              # > 0 overrides epochs
    c.sharding = dict(fsdp=False, fsdp_teacher=False, fsdp_min_size=2**18)
    c.log_every_steps = 100
    c.eval_every_epochs = 10.0     # 0: evaluate at the end only
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.report = "student"           # which top-1 is "distilled": student | ema
    c.nan_policy = "stop"          # a non-finite loss/gradient: "stop" the run, or "skip" the update
    c.baseline = dict(
        top1=config_dict.placeholder(float),  # baseline student top-1 (%), if known
        workdir="",                # a finished baseline run to read (default WORKDIR/baseline)
        train=False,               # train the baseline (method ce) in WORKDIR/baseline first
        overrides={},              # nested overrides of the baseline run (e.g. a shorter schedule)
    )
    c.paper = dict(teacher_top1=config_dict.placeholder(float), student_top1=config_dict.placeholder(float),
                   distilled_top1=config_dict.placeholder(float))
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """``"a=1,b=x,flag"`` -> ConfigDict typed by ``defaults``; unknown names are rejected."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, sep, value = item.partition("=")
        if name not in defaults:
            raise ValueError(f"unknown config argument {name!r}; known: {sorted(defaults)}")
        default = defaults[name]
        if not sep:
            value = True
        elif isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and default is not None:
            value = type(default)(value)
        out[name] = value
    return out


def _walk(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, (dict, ml_collections.ConfigDict)) and path not in FREE_FORM:
            yield from _walk(value, path + ".")


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject keys the schema of :func:`base_config` does not know, naming them."""
    known = {path for path, _ in _walk(base_config())}
    for path, _ in _walk(config):
        if path not in known:
            close = difflib.get_close_matches(path, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {path!r}{hint}")
    try:
        distill_method(config)
    except ValueError as e:
        raise ValueError(f"config.distill: {e}") from e
    if config.nan_policy not in ("stop", "skip"):
        raise ValueError(f"config.nan_policy must be 'stop' or 'skip', got {config.nan_policy!r}")
    if config.report not in ("student", "ema"):
        raise ValueError(f"config.report must be 'student' or 'ema', got {config.report!r}")
    for section, key in (("teacher", "train"), ("baseline", "overrides")):  # nested overrides of the config
        try:
            apply_overrides(config, config[section][key])
        except ValueError as e:
            raise ValueError(f"config.{section}.{key}: {e}") from e


def distill_method(config: ml_collections.ConfigDict) -> losses.Method:
    """``config.distill`` (and the label smoothing of its CE) as one typed method."""
    return losses.Method.from_settings(config.distill.method,
                                       {**config.distill.to_dict(), "label_smoothing": config.label_smoothing})


def apply_overrides(config: ml_collections.ConfigDict, overrides: Any, _path: str = "") -> ml_collections.ConfigDict:
    """A copy of ``config`` with nested ``{"optim": {"lr": 1e-3}}`` overrides; unknown keys rejected.

    Free-form sub-trees (``model.overrides``, ...) are replaced as a whole.
    """
    out = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        path = f"{_path}{key}"
        if key not in out:
            raise ValueError(f"override {path!r}: the config has no such key")
        nested = isinstance(value, (dict, ml_collections.ConfigDict))
        if nested and path not in FREE_FORM and isinstance(out[key], ml_collections.ConfigDict):
            out[key] = apply_overrides(out[key], value, path + ".")
        else:
            out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return out


# --- the paper's models and recipes ----------------------------------------------------------

# Teachers: registered architecture, converter family, ImageNet top-1 (%) as the paper reports it.
TEACHERS = {
    "vit_s": dict(name="ViT-S", model="vit_small_patch16_224", arch="vit", top1=79.8),
    "swin_t": dict(name="Swin-T", model="swin_tiny_patch4_window7_224", arch="swin", top1=81.3),
    "cswin_t": dict(name="CSWin-T", model="cswin_tiny_224", arch="cswin", top1=82.7),
    "resnet50": dict(name="ResNet-50", model="resnet50", arch="resnet", top1=80.4),
    "convnext_t": dict(name="ConvNeXt-T", model="convnext_tiny", arch="convnext", top1=82.1),
    "slak_t": dict(name="SLaK-T", model="slak_tiny", arch="slak", top1=82.5),
}
# Students: the paper's ConvNeXt-T is ConvNeXt + BN (SyncBN, as the authors' SLaK class); timm's
# ResNet-50 and MobileNetV3 normalise per device under DDP (bn_stat_groups=0).
STUDENTS = {
    "convnext_t": dict(name="ConvNeXt-T+BN", model="convnext_tiny_bn", bn_stat_groups=1,
                       overrides=dict(drop_path_rate=0.1, layer_scale_init_value=1e-6)),
    "resnet50": dict(name="ResNet-50", model="resnet50", bn_stat_groups=0, overrides=dict(drop_path_rate=0.0)),
    "mobilenetv3": dict(name="MobileNetV3", model="mobilenetv3_large_100", bn_stat_groups=0,
                        overrides=dict(drop_path_rate=0.0)),
}
RECIPES = ("convnext", "timm")


def experiment(*, teacher: str, student: str, method: str, epochs: float = 120, recipe: str = "convnext",
               fd_stages: int = 1, temperature: float = 1.0) -> ml_collections.ConfigDict:
    """One ImageNet experiment of the paper: ``teacher`` -> ``student`` with ``method``.

    ``recipe="convnext"`` is Section 3 (AdamW 4e-3 @ 4096, 20 warmup epochs, cosine to 1e-6,
    wd 0.05, EMA 0.9999, RandAugment m9, Mixup 0.8 / CutMix 1.0, smoothing 0.1, erasing 0.25).
    ``recipe="timm"`` is timm's ResNet strikes back A1-style recipe of Appendix C/D (LAMB 5e-3 @
    2048, 5 warmup epochs, wd 0.01, RandAugment m7, Mixup 0.2 / CutMix 1.0, no smoothing, no
    erasing, drop path 0.05, no EMA, eval crop 0.95); its binary cross-entropy is replaced by the
    cross-entropy every distillation loss here is built on. ``teacher="none"`` (with method ``ce``)
    is the baseline student. The teacher checkpoint defaults to ``checkpoints/<model>``.
    """
    if student not in STUDENTS:
        raise ValueError(f"unknown student {student!r}; expected one of {sorted(STUDENTS)}")
    if teacher != "none" and teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; expected one of {sorted(TEACHERS)} or 'none'")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    if (teacher == "none") != (method == "ce"):
        raise ValueError("method 'ce' is the baseline (teacher=none); distillation methods need a teacher")
    c = base_config()
    s = STUDENTS[student]
    c.model.name = s["model"]
    c.model.label = s["name"]
    c.model.overrides = dict(s["overrides"])
    c.model.bn_stat_groups = s["bn_stat_groups"]
    if teacher != "none":
        t = TEACHERS[teacher]
        c.teacher.update(name=t["name"], model=t["model"], arch=t["arch"], checkpoint=f"checkpoints/{t['model']}")
    c.distill.method = method
    c.distill.fd_stages = fd_stages
    c.distill.kd_temperature = c.distill.nkd_temperature = temperature
    c.epochs = float(epochs)
    if recipe == "timm":
        c.optim.update(name="lamb", lr=5e-3, lr_base_batch_size=2048, weight_decay=0.01, warmup_epochs=5.0,
                       min_lr=1e-6)
        c.batch_size = 2048
        c.aug.update(auto_augment="rand-m7-mstd0.5-inc1", reprob=0.0)
        c.mixup.update(mixup_alpha=0.2, cutmix_alpha=1.0)
        c.label_smoothing = 0.0
        c.ema_decay = 0.0
        c.data.eval_crop_pct = 0.95
        c.model.overrides = {**c.model.overrides.to_dict(), "drop_path_rate": 0.05}
    return c
