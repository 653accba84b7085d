"""The built-in demo: large-to-small kernel distillation end to end on a 2-core CPU.

    python -m l2s_jax.main --config configs/demo.py --workdir /tmp/demo

On the procedurally generated demo dataset (l2s_jax/data/demo.py: 4000 train / 1000 test images
of 32 px; the class is the orientation of a line of three dots a third of the image apart, on
a distracting texture, so relating far-apart pixels is what matters) it trains

1. a small SLaK-style teacher (decomposed large kernels, 15 -> 7 -> 3 -> 3 per stage, 4x4 stem,
   so the first stage's kernel spans the whole 8x8 map) from scratch for 400 steps
   (``WORKDIR/teacher``, exported as a converted checkpoint and evaluated like any teacher),
2. the baseline: a ConvNeXt+BN student with 3x3 kernels and half the width, cross-entropy only,
   300 steps (``WORKDIR/baseline``),
3. the same student distilled from the teacher with NKD, 300 steps (``WORKDIR``),

and prints the teacher / baseline / distilled top-1 with Direct and Effective Gain. Re-running
the command resumes (or skips) finished parts. The augmentation keeps what the label depends on
(flips, mild crops that keep the dots; no RandAugment, no erasing); Mixup is on for half of the
batches, so the teacher labels the very images the student sees. Layer scale starts at 1 (the
paper's 1e-6 needs longer schedules than a demo has).

Arguments (``configs/demo.py:steps=...``): ``steps`` of the student runs, ``teacher_steps``,
``method`` (nkd | kd | fd | fd+nkd), ``size`` (image side, 32).
"""
from l2s_jax import config_lib

TEACHER = dict(
    name="slak",
    label="SLaK-style demo teacher",
    overrides=dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), kernel_size=(15, 7, 3, 3, 3), decompose=True,
                   bn=True, sparse=False, width_factor=1.0, drop_path_rate=0.0, layer_scale_init_value=1.0),
)
STUDENT = dict(
    name="slak",
    label="ConvNeXt+BN 3x3 (demo)",
    overrides=dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), kernel_size=(3, 3, 3, 3, 100), decompose=False,
                   bn=True, sparse=False, width_factor=1.0, drop_path_rate=0.0, layer_scale_init_value=1.0),
)


def get_config(arg: str | None = None):
    """The demo config; see the module docstring."""
    args = config_lib.parse_arg(arg, steps=300, teacher_steps=400, method="nkd", size=32)
    c = config_lib.base_config()
    c.model.update(STUDENT)
    c.teacher.update(name=TEACHER["label"], model="slak", checkpoint="")
    c.teacher.train = dict(model=TEACHER, total_steps=args.teacher_steps)
    c.distill.method = args.method
    c.distill.nkd_temperature = 1.0
    c.distill.fd_stages = 1
    c.data.update(name="demo", data_dir=None, train_split="train", eval_split="test", image_size=args.size,
                  eval_crop_pct=1.0, num_workers=0, prefetch=2, demo_num_train=4000, demo_num_test=1000)
    c.aug.update(rrc_scale=(0.9, 1.0), rrc_ratio=(0.95, 1.05), hflip=0.5, auto_augment="", reprob=0.0)
    c.mixup.update(mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.0, prob=0.5)
    c.optim.update(lr=3e-3, lr_base_batch_size=64, warmup_epochs=0.5, min_lr=1e-5, weight_decay=0.05)
    c.ema_decay = 0.0
    c.batch_size = 64
    c.eval_batch_size = 200
    c.total_steps = args.steps
    c.log_every_steps = 50
    c.eval_every_epochs = 0.0
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    c.baseline.train = True
    return c
