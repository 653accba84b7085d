r"""SLaK-T (51x51) -> ConvNeXt-T + BN with NKD for 120 epochs on ImageNet: the paper's headline run.

Table 1, last row: teacher 82.5, student 81.00 (120-epoch CE), distilled 82.17 top-1.

    python tools/convert_weights.py --arch slak --src SLaK_tiny_checkpoint.pth --out ckpt/slak_tiny
    python -m l2s_jax.main --config configs/nkd_slak_convnext.py \
        --config.teacher.checkpoint=ckpt/slak_tiny --config.data.data_dir=$TFDS_DATA_DIR --workdir runs/l2s_t

Arguments (``configs/nkd_slak_convnext.py:epochs=300,T=2``): ``epochs`` (120; 300 gives the
ConvNeXt L2S-T of Section 4.2), ``T`` (NKD temperature), ``variant`` (paper | official NKD).
Add ``--config.baseline.workdir=runs/cnx_baseline`` (a finished ``configs/paper.py:table=1,
student=convnext_t,teacher=none`` run) for measured gains; otherwise the paper's are shown.
"""
from l2s_jax import config_lib


def get_config(arg: str | None = None):
    """Section 3 recipe, spelled out."""
    args = config_lib.parse_arg(arg, epochs=120.0, T=1.0, variant="paper")
    c = config_lib.base_config()

    c.model.name = "convnext_tiny_bn"                 # ConvNeXt-T with BN after every 7x7 depthwise conv
    c.model.overrides = dict(drop_path_rate=0.1, layer_scale_init_value=1e-6)
    c.model.bn_stat_groups = 1                        # SyncBN over the global batch, as the authors

    c.teacher.update(name="SLaK-T", model="slak_tiny", arch="slak", checkpoint="checkpoints/slak_tiny",
                     fuse=True)                       # 3 branches + BN folded into one 51x51 kernel

    c.distill.method = "nkd"                          # eq. (4)
    c.distill.nkd_variant = args.variant
    c.distill.nkd_temperature = args.T
    c.distill.nkd_lam = 1.0

    c.data.update(name="imagenet2012", train_split="train", eval_split="validation", image_size=224,
                  eval_crop_pct=0.875)                # resize 256, centre crop 224
    c.aug.update(rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1",
                 reprob=0.25, remode="pixel", interpolation="bicubic")
    c.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
    c.label_smoothing = 0.1

    c.optim.update(name="adamw", lr=4e-3, lr_base_batch_size=4096, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                   warmup_epochs=20.0, min_lr=1e-6)
    c.ema_decay = 0.9999
    c.batch_size = 4096
    c.epochs = args.epochs

    if args.epochs == 120:                            # Table 1
        c.paper.update(teacher_top1=82.5, student_top1=81.0, distilled_top1=82.17)
    elif args.epochs == 300:                          # Table 6: ConvNeXt L2S-T vs supervised ConvNeXt-T
        c.paper.update(teacher_top1=82.5, student_top1=82.1, distilled_top1=83.1)
    return c
